"""Parti's helpers in the sampler and the sampling server: `--rerank` scores and keeps the
best samples, `--upsample` writes them upsampled; the shapes evaluator judges the first or
the reranked best. Real trained runs of the three tasks, real commands and a real server."""

import json

import numpy as np
import pytest
from PIL import Image
from sampling_helpers import reranker_run, superres_run, tiny_run
from serve_helpers import gallery_pixels, server

from parti_jax import rerank, sample, upsample
from parti_jax.eval import shapes as shapes_eval

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, worker_id):
  """(Parti run, reranker run, upsampler run)."""
  return (tiny_run(tmp_path_factory), reranker_run(tmp_path_factory, worker_id)[0],
          superres_run(tmp_path_factory, worker_id)[0])


def sample_to(out, parti, *flags):
  args = ["--workdir", str(parti), "--num_samples", "4", "--out", str(out), "--seed", "3"]
  for prompt in PROMPTS:
    args += ["--prompt", prompt]
  sample.main(args + list(flags))
  return json.loads((out / "samples.json").read_text())


def pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def test_rerank_keeps_the_best_scored_and_upsample_writes_them_larger(runs, tmp_path):
  parti, reranker, upsampler = runs
  plain = sample_to(tmp_path / "plain", parti)
  best = sample_to(tmp_path / "best", parti, "--rerank", str(reranker), "--keep", "2",
                   "--upsample", str(upsampler))
  scorer = rerank.Scorer.load(reranker)
  assert best["rerank"]["keep"] == 2 and best["upsample"]["scale"] == 2
  for entry, plain_entry in zip(best["prompts"], plain["prompts"]):
    # Every candidate scored as the scorer scores the plain run's images of the same seed:
    # a reranker chooses among the samples, it does not change them.
    candidates = np.stack([pixels(tmp_path / "plain" / f) for f in plain_entry["files"]])
    scores = scorer.scores(candidates, [entry["prompt"]] * 4)
    np.testing.assert_allclose(entry["scores"], scores, rtol=1e-5, atol=1e-6)
    order = list(np.argsort(-scores, kind="stable"))
    assert entry["kept"] == order[:2] and entry["ranks"][order[0]] == 0
    assert entry["ranked"] == [f"{entry['index']:04d}_{s:02d}.png" for s in order[:2]]
    assert entry["files"] == sorted(entry["ranked"])  # only the kept two were written
    written = sorted(p.name for p in (tmp_path / "best").glob(f"{entry['index']:04d}_??.png"))
    assert written == entry["files"]
    for name, up in zip(entry["files"], entry["upsampled"]):
      original = pixels(tmp_path / "best" / name)
      np.testing.assert_array_equal(original, candidates[int(name[5:7])])
      assert pixels(tmp_path / "best" / up).shape == (64, 64, 3)  # 32 px, x2
  # The evaluator judges the reranked best, or sample 0; `best` needs ranks.
  items, _ = shapes_eval.samples_of(tmp_path / "best", "best")
  assert len(items) == len(PROMPTS)
  np.testing.assert_array_equal(
      items[1][1], pixels(tmp_path / "best" / best["prompts"][1]["ranked"][0]))
  with pytest.raises(ValueError, match="no reranker ranks"):
    shapes_eval.samples_of(tmp_path / "plain", "best")
  first, _ = shapes_eval.samples_of(tmp_path / "plain", "first")
  np.testing.assert_array_equal(first[0][1], pixels(tmp_path / "plain" / "0000_00.png"))


@pytest.mark.parametrize("flags, message", [
    (["--keep", "2"], "--keep needs --rerank"),
    (["--rerank", "RERANKER", "--keep", "5"], "--keep=5 is more than --num_samples=4"),
    (["--rerank_step", "3"], "--rerank_step needs --rerank"),
    (["--rerank", "PARTI"], "trained 'parti', not 'contrastive'"),
    (["--upsample", "RERANKER"], "trained 'contrastive', not 'superres'"),
])
def test_wrong_helper_flags_are_refused_in_one_line(runs, tmp_path, capsys, flags, message):
  parti, reranker, _ = runs
  flags = [dict(RERANKER=str(reranker), PARTI=str(parti)).get(f, f) for f in flags]
  with pytest.raises(SystemExit) as e:
    sample_to(tmp_path / "out", parti, *flags)
  assert message in str(e.value) and str(e.value).startswith("error: ")
  assert not (tmp_path / "out" / "samples.json").exists()


gradio_client = pytest.importorskip("gradio_client", reason="pip install -e '.[test]'")


def test_the_server_keeps_the_best_and_upsamples(runs, tmp_path):
  parti, reranker, upsampler = runs
  with server(parti, tmp_path / "server.log", "--rerank", str(reranker), "--upsample",
              str(upsampler), "--batch_sizes", "8") as (url, _):
    client = gradio_client.Client(url, verbose=False)
    ask = lambda keep, up: client.predict("\n".join(PROMPTS), 4, 3, 0, 1.5, 0.2, 0, 1.0, False,
                                          keep, up, api_name="/generate")
    all_gallery, _, all_details = ask(0, False)
    gallery, status, details = ask(1, True)
  candidates = gallery_pixels(all_gallery)
  assert len(candidates) == 8 and candidates[0].shape == (32, 32, 3)
  assert "score" not in all_details["images"][0]  # keep 0: every image, unscored
  scores = rerank.Scorer.load(reranker).scores(np.stack(candidates), [p for p in PROMPTS
                                                                     for _ in range(4)])
  np.testing.assert_allclose([x["score"] for x in details["images"]], scores, rtol=1e-5,
                             atol=1e-6)
  best = [int(np.argmax(scores[:4])), 4 + int(np.argmax(scores[4:]))]
  assert [i for i, x in enumerate(details["images"]) if x["kept"]] == best
  shown = gallery_pixels(gallery)
  assert len(shown) == 2 and all(x.shape == (64, 64, 3) for x in shown)
  expected = upsample.Upsampler.load(upsampler)(np.stack([candidates[i] for i in best]))
  np.testing.assert_array_equal(np.stack(shown), expected)
  assert f"score {scores[best[0]]:.3f}" in gallery[0]["caption"]
  assert "the best 1 of each prompt's 4 kept by the reranker" in status
