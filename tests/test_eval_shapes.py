"""The shapes evaluator: its detector on ground-truth renders, and its verdicts."""

import json

import numpy as np
import pytest

from parti_jax.data import images, records
from parti_jax.eval import shapes as evaluator
from parti_jax.shapes import dataset, judge, render, scenes, vocabulary


@pytest.fixture(scope="module")
def renders(tmp_path_factory):
  out = tmp_path_factory.mktemp("shapes")
  dataset.write(out, scenes.Spec(), num=4, num_validation=160, num_heldout=80, seed=7,
                progress=False)
  return out


def test_ground_truth_renders_are_judged_correct(renders):
  for split in ("validation", "heldout"):
    items, spec = dataset.shard_items(renders / split)
    report = judge.evaluate(items, spec, progress=False)
    assert report["accuracy"]["all"] >= 0.98, (split, report["accuracy"])
    other = "seen" if split == "heldout" else "heldout"
    assert report["counts"]["all"] == len(items) and other not in report["counts"]
    for kind in vocabulary.KINDS:
      assert f"all/{kind}" in report["counts"], kind


def test_a_render_of_another_scene_is_judged_wrong(renders):
  recs = list(records.ShardSet.open(renders / "validation").read_all())[:60]
  wrong = checked = 0
  for a, b in zip(recs, recs[1:]):
    if scenes.caption_matches_scene(a["captions"][0], b["extra"]["scene"]):
      continue  # b's picture happens to satisfy a's caption too
    image = np.asarray(images.rgb_array(images.open_image(b["image"])))
    checked += 1
    wrong += not judge.judge(a["captions"][0], judge.detect(image))
  assert checked > 50 and wrong == checked


def test_detector_reads_objects_back():
  rng = np.random.default_rng(3)
  scene, caption = scenes.sample_scene(rng, scenes.Spec(), "validation")
  image = render.render_scene(scene)
  found = sorted(judge.detect(image), key=lambda o: o["center"])
  truth = sorted(scene["objects"], key=lambda o: o["center"])
  assert [(o["color"], o["shape"], o["size"]) for o in found] == \
      [(o["color"], o["shape"], o["size"]) for o in truth]
  for f, t in zip(found, truth):
    np.testing.assert_allclose(f["center"], t["center"], atol=0.5)
  assert not judge.detect(np.full((32, 32, 3), vocabulary.BACKGROUND, np.uint8))


def test_heldout_prompts_are_recognized():
  spec = scenes.Spec()
  assert judge.prompt_is_heldout("a red star", spec)
  assert judge.prompt_is_heldout("a green circle above a large blue triangle", spec)
  assert judge.prompt_is_heldout("a blue triangle below a green circle", spec)  # converse
  assert not judge.prompt_is_heldout("a red circle above a blue square", spec)


def test_command_line_on_a_shard_set(renders, tmp_path, capsys):
  evaluator.main(["--shards", str(renders / "heldout"), "--out", str(tmp_path / "r.json")])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  saved = json.loads((tmp_path / "r.json").read_text())
  assert printed["accuracy"] == saved["accuracy"] and len(saved["judged"]) == 80
  with pytest.raises(SystemExit, match="samples.json"):
    evaluator.main(["--images", str(tmp_path)])


def test_reconstruct_judges_the_renders_after_a_tokenizer_round_trip(renders, tmp_path,
                                                                     capsys):
  import helpers
  helpers.vitvqgan_run(tmp_path / "run")  # untrained: its reconstructions show no shapes
  items, spec = dataset.shard_items(renders / "validation")
  items = items[:20]
  round_trip = evaluator.reconstruct(items, f"vitvqgan:{tmp_path / 'run'}", batch_size=8)
  assert [p for p, _ in round_trip] == [p for p, _ in items]
  assert all(a.shape == b.shape and a.dtype == b.dtype == np.uint8
             for (_, a), (_, b) in zip(items, round_trip))
  assert judge.evaluate(items, spec, progress=False)["accuracy"]["all"] == 1.0
  assert judge.evaluate(round_trip, spec, progress=False)["accuracy"]["all"] < 0.5
  colored = evaluator.reconstruct(items, "color:patch=4")  # any tokenizer spec
  assert [a.shape for _, a in colored] == [a.shape for _, a in items]
  with pytest.raises(ValueError, match="expected vitvqgan:RUN_DIR"):
    evaluator.reconstruct(items, "vitvqgan:")
  with pytest.raises(ValueError, match="no config.json"):
    evaluator.reconstruct(items, f"vitvqgan:{tmp_path}")
  with pytest.raises(SystemExit) as stop:  # --reconstruct reconstructs renders, not samples
    evaluator.main(["--images", str(tmp_path), "--reconstruct", f"vitvqgan:{tmp_path / 'run'}"])
  assert "--reconstruct needs --shards" in str(stop.value.code)
