"""The built-in demo end to end, at a much smaller setting than its default."""

import json
import os
import subprocess
import sys

from conftest import ROOT

from parti_jax import demo
from parti_jax.data import records


def run_demo(workdir, *extra):
  env = dict(os.environ, XLA_FLAGS="")  # the demo runs on the machine's own devices
  return subprocess.run(
      [sys.executable, "-m", "parti_jax.demo", "--workdir", str(workdir), "--train_images", "96",
       "--eval_prompts", "8", "--tokenizer_steps", "20", "--parti_steps", "20", "--reranker_steps", "20",
       "--candidates", "2", *extra],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_demo_runs_every_stage_and_reports_what_it_measured(tmp_path):
  done = run_demo(tmp_path)
  assert done.returncode == 0, done.stderr[-4000:]
  for stage in demo.STAGES:
    marker = json.loads((tmp_path / "stages" / f"{stage}.json").read_text())
    assert marker["seconds"] > 0 and marker["commands"][0].startswith("python -m parti_jax.")
  report = json.loads((tmp_path / "report.json").read_text())
  for split in ("validation", "heldout"):
    judged = json.loads((tmp_path / f"eval_{split}.json").read_text())
    assert report["accuracy"][split] == judged["accuracy"]
    assert report["prompts"][split] == 8 == len(judged["judged"])
    # Two candidates a prompt, ranked by the reranker; its best judged beside the first.
    samples = json.loads((tmp_path / "samples" / split / "samples.json").read_text())
    assert all(len(e["scores"]) == 2 and len(e["files"]) == 2 for e in samples["prompts"])
    best = json.loads((tmp_path / f"eval_{split}_reranked.json").read_text())
    assert report["accuracy_reranked"][split] == best["accuracy"]
    assert len(best["judged"]) == 8
  assert "eval/recall@1_text_to_image" in report["reranker"]
  assert json.loads((tmp_path / "reranker" / "config.json").read_text())["task"] == \
      "contrastive"
  assert set(report["stage_seconds"]) == set(demo.STAGES)
  # The demo's scenes stand on a lattice of the tokenizer's 8 px patches.
  for split in ("train", "validation", "heldout"):
    assert records.ShardSet.open(tmp_path / "data" / split).meta["lattice"] == 8
  assert report["settings"]["lattice"] == 8
  # Train draws the two-object kinds more often than the prompts it is scored on.
  weights = records.ShardSet.open(tmp_path / "data" / "train").meta["train_kinds"]
  assert weights["relation"] > weights["single"] and weights["binding"] > weights["count"]
  tokenizer = json.loads((tmp_path / "tokenizer" / "config.json").read_text())["model"]
  assert tokenizer["patch_size"] == 8  # one object's quarter per patch
  parti = json.loads((tmp_path / "parti" / "config.json").read_text())["model"]
  assert parti["text_rope"]  # word order binds colors to shapes
  assert report["tokenizer"]["eval_psnr"] > 0
  # The bound the tokenizer sets: the validation renders judged after its round trip.
  ceiling = json.loads((tmp_path / "eval_reconstructions.json").read_text())
  assert report["tokenizer"]["reconstruction_accuracy"] == ceiling["accuracy"]
  assert len(ceiling["judged"]) == 8
  markdown = (tmp_path / "report.md").read_text()
  assert f"{report['accuracy']['validation']['seen']:.1%}" in markdown
  assert "python -m parti_jax.train --config" in done.stdout  # each stage's command is shown
  for split in ("validation", "heldout"):
    assert (tmp_path / report["grids"][split]).exists()

  # A rerun finds every stage done and only rewrites the report.
  again = run_demo(tmp_path)
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stdout.count("skipped") == len(demo.STAGES)
