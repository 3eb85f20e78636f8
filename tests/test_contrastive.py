"""The contrastive reranker: its losses, global-batch negatives, a real trained run, the
scorer and the alignment command."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from PIL import Image
from sampling_helpers import RERANKER_BATCH as BATCH
from sampling_helpers import reranker_run

from parti_jax import config as config_lib
from parti_jax import rerank, runs, sharding
from parti_jax.data import spm
from parti_jax.eval import alignment
from parti_jax.shapes import dataset
from parti_jax.tasks import contrastive



@pytest.fixture(scope="module")
def trained(tmp_path_factory, worker_id):
  """A tiny dual encoder trained by the real trainer on shapes, shared by the xdist workers:
  (workdir, the trainer's last metrics, data root)."""
  return reranker_run(tmp_path_factory, worker_id)


def unit(x):
  x = np.asarray(x, np.float32)
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def logits_fn(similarity, with_bias):
  return 10.0 * similarity + (-5.0 if with_bias else 0.0)


def losses(image_emb, text_emb, same=None):
  """{loss name: value} for embeddings, positives the identity unless given."""
  n = len(image_emb)
  same = np.eye(n, dtype=bool) if same is None else same
  valid = jnp.ones(n, bool)
  return {name: float(contrastive.loss_of(name)(jnp.asarray(image_emb), jnp.asarray(text_emb),
                                                jnp.asarray(same), valid, logits_fn))
          for name in contrastive.LOSSES}


# ------------------------------------------------------------------------- the losses

def test_a_perfectly_aligned_batch_has_the_lowest_loss():
  rng = np.random.default_rng(0)
  text = unit(np.eye(8, 16) + 0.1 * rng.normal(size=(8, 16)))
  aligned = losses(text, text)
  for noise in (0.3, 1.0):
    partly = losses(unit(text + noise * rng.normal(size=text.shape)), text)
    assert all(aligned[k] < partly[k] for k in aligned), (aligned, partly)
  swapped = losses(text[::-1], text)  # every image with another caption
  assert all(partly[k] < swapped[k] for k in aligned), (partly, swapped)
  assert aligned["softmax"] < 1e-3  # the positives hold nearly all the probability


def test_sigmoid_and_softmax_losses_rank_candidate_images_alike():
  """One caption, candidate images of decreasing likeness put in its row in turn: both
  losses order the candidates as their cosines do."""
  rng = np.random.default_rng(1)
  text = unit(rng.normal(size=(6, 32)))
  candidates = [unit(text[0] + w * rng.normal(size=32)) for w in (0.1, 0.4, 0.8, 1.5, 3.0)]
  cosines = [float(c @ text[0]) for c in candidates]
  by = {name: [] for name in contrastive.LOSSES}
  for c in candidates:
    images = np.concatenate([c[None], text[1:]])
    for name, value in losses(images, text).items():
      by[name].append(value)
  expected = list(np.argsort(-np.asarray(cosines)))
  for name, values in by.items():
    assert list(np.argsort(values)) == expected, (name, values, cosines)


def test_equal_captions_are_positives_in_the_losses_accuracy_and_recall():
  tokens = np.array([[5, 6, 2, 0], [5, 6, 2, 0], [7, 2, 0, 0], [5, 6, 9, 2]], np.int32)
  same = np.asarray(contrastive.positives(jnp.asarray(tokens)))
  expected = np.eye(4, dtype=bool)
  expected[0, 1] = expected[1, 0] = True  # same ids; row 3 shares a prefix only
  np.testing.assert_array_equal(same, expected)

  # Equal captions embed alike; their images both match that embedding.
  text = unit(np.eye(4, 8)[[0, 0, 2, 3]])
  images = text.copy()
  with_duplicates, as_negatives = losses(images, text, same), losses(images, text)
  for name in contrastive.LOSSES:
    assert with_duplicates[name] < as_negatives[name] - 0.1, name
  assert with_duplicates["softmax"] < 1e-3

  valid = jnp.ones(4, bool)
  similarity = jnp.asarray(images @ text.T)
  # Image 1 ties between captions 0 and 1: with them one caption it is found at rank 1.
  assert np.asarray(contrastive.hits_at(similarity, jnp.asarray(same), valid, 1)).all()
  assert not np.asarray(contrastive.hits_at(similarity, jnp.eye(4, dtype=bool), valid, 1)).all()


def test_recall_counts_ties_against_the_query_and_ignores_padding_rows():
  same, valid = jnp.eye(4, dtype=bool), jnp.asarray([True, True, True, False])
  alike = jnp.zeros((4, 4))  # a collapsed model: every score the same
  assert not np.asarray(contrastive.hits_at(alike, same, valid, 1)).any()
  # Key 3 is padding: its high scores must not push anything out of the top 1.
  similarity = jnp.eye(4).at[:, 3].set(9.0)
  hits = np.asarray(contrastive.hits_at(similarity, same, valid, 1))
  assert hits[:3].all()


# ---------------------------------------------------------- negatives of the global batch

def setup_on(mesh_shape, num_devices):
  config = load_config("contrastive_tiny").copy_and_resolve_references()
  for tower in (config.model.text, config.model.image):
    tower.layers = 1  # compiles faster; the layers are the same code
  config.model.scan_unroll = 1
  config.global_batch_size = 16
  config.mesh.update(dict(zip(config_lib.MESH_AXES, mesh_shape)))
  return contrastive.Setup(config, sharding.make_mesh(config, jax.devices()[:num_devices]))


def test_loss_and_gradients_on_eight_devices_equal_one_device():
  one, eight = setup_on((1, 1, 1), 1), setup_on((2, 4, 1), 8)
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (16, 32, 32, 3)).astype(np.float32)
  text = rng.integers(3, 128, (16, 16)).astype(np.int32)
  text[:, 6:] = 0
  text[:, 5] = 2
  text[9] = text[1]  # equal captions on different devices' shards
  batch = dict(images=images, text_tokens=text)
  params = one.init_state().params
  loss_1, acc_1, grads_1 = contrastive.jit_loss_and_grads(one)(params, batch)
  sharded = jax.device_put(params, eight.param_shardings)
  loss_8, acc_8, grads_8 = contrastive.jit_loss_and_grads(eight)(sharded, batch)
  kernel = lambda tree: tree["text_tower"]["blocks"]["mlp"]["up"]["kernel"]
  assert kernel(grads_8).sharding.spec == kernel(eight.param_shardings).spec
  np.testing.assert_allclose(float(loss_8), float(loss_1), rtol=1e-5)
  assert float(acc_8) == float(acc_1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=2e-4, atol=1e-6),
               grads_8, grads_1)

  # Negatives from each device's own 2 rows only would give another loss: far lower, with
  # one negative per row instead of 14 or 15.
  image_emb, text_emb = jax.jit(lambda p: one.model(p)(images, text))(params)
  same = contrastive.positives(jnp.asarray(text))
  logits = one.model(params).logits
  loss = lambda rows: float(contrastive.softmax_loss(
      image_emb[rows], text_emb[rows], same[rows][:, rows], jnp.ones(len(rows), bool), logits))
  np.testing.assert_allclose(loss(np.arange(16)), float(loss_1), rtol=1e-5)
  local = np.mean([loss(np.arange(i, i + 2)) for i in range(0, 16, 2)])
  assert local < float(loss_1) - 0.5, (local, float(loss_1))


def test_config_problems_are_refused_naming_the_field():
  config = load_config("contrastive_tiny")
  config.data.update(train="somewhere", spm_model="", caption_dropout=0.1, resolution=64,
                     kind="tokens")
  config.grad_accum_steps = 2
  config.loss.name = "hinge"
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check(config, 8)
  for field in ("data.spm_model is empty", "data.caption_dropout=0.1", "data.kind='tokens'",
                "data.resolution=64 is not model.resolution=32", "grad_accum_steps=2",
                "loss.name='hinge'"):
    assert field in str(e.value), (field, str(e.value))
  # Planning a config (no data named) needs no SentencePiece model.
  assert config_lib.check(load_config("contrastive_paper"), 8)


# ------------------------------------------------------------------- a trained run

def test_a_trained_run_recalls_far_above_chance(trained):
  _, summary, _ = trained
  assert summary["eval/examples"] == 64
  chance = 1 / BATCH  # about: one right image in a gallery of BATCH (duplicates aside)
  for key in ("eval/recall@1_text_to_image", "eval/recall@1_image_to_text"):
    assert summary[key] > 5 * chance, (key, summary[key])
  for key in ("eval/recall@5_text_to_image", "eval/recall@5_image_to_text"):
    assert summary[key] >= summary[key.replace("@5", "@1")]
  assert 0 < summary["temperature"] < 1 and summary["accuracy"] > 5 * chance


def validation_items(data, count):
  items, _ = dataset.shard_items(data / "shapes" / "validation")
  return items[:count]


def test_the_scorer_prefers_each_captions_own_image(trained):
  workdir, _, data = trained
  scorer = rerank.Scorer.load(workdir, devices=jax.devices()[:2])
  items = [(p, x) for p, x in validation_items(data, 64)]
  prompts = [p for p, _ in items]
  images = np.stack([x for _, x in items])
  own = scorer.scores(images, prompts)
  other = np.roll(images, 1, axis=0)
  differs = np.asarray([p != q for p, q in zip(prompts, np.roll(prompts, 1))])
  theirs = scorer.scores(other, prompts)
  assert own.dtype == np.float32 and own.shape == (64,)
  assert np.all(np.abs(own) <= 1 + 1e-5)
  assert (own > theirs)[differs].mean() > 0.8
  order = rerank.rank(np.asarray([0.1, 0.7, 0.7, -0.2]))
  assert order.tolist() == [1, 2, 0, 3]
  # Larger images are box-filtered down: 3x3 copies of each pixel give the original back.
  big = [np.kron(x, np.ones((3, 3, 1), np.uint8)) for x in images[:3]]
  np.testing.assert_allclose(scorer.scores(big, prompts[:3]), own[:3], atol=1e-5)
  with pytest.raises(rerank.RerankError, match="3 images but 2 prompts"):
    scorer.scores(images[:3], prompts[:2])
  with pytest.raises(rerank.RerankError, match="uint8"):
    scorer.scores(images[:2].astype(np.float32), prompts[:2])


def test_the_scorer_refuses_another_tasks_run_and_a_mismatched_spm_model(trained, tmp_path):
  workdir, _, _ = trained
  runs.write_config(tmp_path / "parti_run", load_config("parti_tiny"))
  with pytest.raises(rerank.RerankError, match=r"parti_run trained 'parti', not 'contrastive'"):
    rerank.Scorer.load(tmp_path / "parti_run")
  words = ["".join(chr(97 + int(c)) for c in np.random.default_rng(i).integers(0, 26, 6))
           for i in range(3000)]
  spm.train([" ".join(words[i:i + 8]) for i in range(0, 3000, 8)] * 3, tmp_path / "big",
            vocab_size=400, model_type="bpe")
  big = str(tmp_path / "big.model")
  with pytest.raises(rerank.RerankError) as e:
    rerank.Scorer.load(workdir, spm_model=big)
  assert big in str(e.value) and "model.text_vocab_size=128" in str(e.value)


def write_samples(directory, entries):
  """A sampler output directory as parti_jax.sampling._write lays it out."""
  directory.mkdir(parents=True)
  report = dict(workdir="some/run", step=1, prompts=[])
  for i, (prompt, pictures) in enumerate(entries):
    files = [f"{i:04d}_{s:02d}.png" for s in range(len(pictures))]
    for name, picture in zip(files, pictures):
      Image.fromarray(picture).save(directory / name)
    report["prompts"].append(dict(index=i, prompt=prompt, files=files, grid=f"{i:04d}_grid.png",
                                  kept=list(range(len(files)))))
  (directory / "samples.json").write_text(json.dumps(report))


def test_alignment_scores_a_sample_directory(trained, tmp_path, capsys):
  workdir, _, data = trained
  items = validation_items(data, 8)
  prompts = [p for p, _ in items]
  a, b = next((i, j) for i in range(8) for j in range(8) if prompts[i] != prompts[j])
  # Prompt a: its own image and b's; prompt b: its own image.
  write_samples(tmp_path / "samples", [(prompts[a], [items[a][1], items[b][1]]),
                                       (prompts[b], [items[b][1]])])
  out = tmp_path / "alignment.json"
  alignment.main(["--model", str(workdir), "--images", str(tmp_path / "samples"),
                  "--out", str(out)])
  printed = capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report["count"] == 3 and [e["count"] for e in report["prompts"]] == [2, 1]
  first = report["prompts"][0]["scores"]
  assert first[0] > first[1]  # its own image above the other prompt's
  everything = first + report["prompts"][1]["scores"]
  assert report["mean_score"] == pytest.approx(np.mean(everything), abs=1e-5)
  assert report["prompts"][0]["mean_score"] == pytest.approx(np.mean(first), abs=1e-5)
  assert f"mean score {report['mean_score']:+.4f} over 3 images of 2 prompts" in printed

  # A file name leading out of the directory is refused in one line, before loading.
  meta = json.loads((tmp_path / "samples" / "samples.json").read_text())
  meta["prompts"][1]["files"] = ["../alignment.json"]
  (tmp_path / "samples" / "samples.json").write_text(json.dumps(meta))
  with pytest.raises(SystemExit) as e:
    alignment.main(["--model", str(workdir), "--images", str(tmp_path / "samples")])
  assert str(e.value).startswith("error: ") and "'../alignment.json'" in str(e.value)
  assert "\n" not in str(e.value)
  # A run of another task, named in one line.
  runs.write_config(tmp_path / "parti_run", load_config("parti_tiny"))
  meta["prompts"][1]["files"] = ["0001_00.png"]
  (tmp_path / "samples" / "samples.json").write_text(json.dumps(meta))
  with pytest.raises(SystemExit) as e:
    alignment.main(["--model", str(tmp_path / "parti_run"), "--images",
                    str(tmp_path / "samples")])
  assert "trained 'parti', not 'contrastive'" in str(e.value) and "\n" not in str(e.value)
