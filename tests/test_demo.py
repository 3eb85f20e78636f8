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


CHILD = """
import pathlib, signal, sys, time
def save(signum, frame):
  time.sleep(1)  # a checkpoint being written
  pathlib.Path(sys.argv[1], "saved").write_text(signal.Signals(signum).name)
  sys.exit(75)
signal.signal(signal.SIGTERM, save)
pathlib.Path(sys.argv[1], "ready").touch()
time.sleep(60)
"""

PARENT = """
import json, os, sys
from parti_jax import demo
print(json.dumps(demo.run_stage_command([sys.executable, "-c", sys.argv[1], sys.argv[2]],
                                        dict(os.environ))))
"""


def test_ctrl_c_to_the_demo_lets_the_stage_save_before_it_stops(tmp_path):
  """A stage's trainer gets SIGTERM and the time to save (subprocess.run killed it 0.25 s
  after Ctrl-C, mid-save)."""
  import signal
  import time
  parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  deadline = time.time() + 60
  while not (tmp_path / "ready").exists() and time.time() < deadline:
    time.sleep(0.1)
  parent.send_signal(signal.SIGINT)
  out, _ = parent.communicate(timeout=60)
  assert json.loads(out.strip().splitlines()[-1]) == [75, True]
  assert (tmp_path / "saved").read_text() == "SIGTERM"


def test_a_bucket_workdir_is_refused_by_name(tmp_path):
  done = subprocess.run([sys.executable, "-m", "parti_jax.demo", "--workdir", "gs://b/demo"],
                        cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                        capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "--workdir gs://b/demo: the demo works in a local" in \
      done.stderr
  assert not (tmp_path / "gs:").exists()
