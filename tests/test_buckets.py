"""The trainer with its work directory in a bucket (gs://, on the emulator of tests/gcs.py):
checkpoints, metrics and TensorBoard files, a restart, a process killed while saving, and an
unreadable step. The data stays on local disk; the model is configs/parti_tiny.py."""

import signal
import struct
import subprocess
import sys
import time

import data_helpers
import pytest
from conftest import ROOT, load_config
from gcs import gcs_emulator, gs_dir, listing, new_dir  # noqa: F401  (fixtures)

from parti_jax import metrics
from parti_jax import train as trainer


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Shapes at 32 px -> SentencePiece -> colour-code token shards (4x4, codebook 64)."""
  return data_helpers.token_data(tmp_path_factory.mktemp("bucket_data"), num_validation=16)


def tiny(data, steps=12, **train_fields):
  c = load_config("parti_tiny")
  c.data.update(train=str(data / "tokens" / "train"), eval=str(data / "tokens" / "validation"))
  c.num_train_steps = steps
  c.train.update(log_every=2, checkpoint_every=4, eval_every=6)
  c.train.update(train_fields)
  return c


def run_cli(workdir, data, *extra, timeout=300, log=None):
  """The trainer's command; with `log` (a local file) started in the background, its output
  going there (not to a pipe that nobody reads while it runs)."""
  command = [sys.executable, "-m", "parti_jax.train", "--config", "configs/parti_tiny.py",
             "--workdir", str(workdir), f"--config.data.train={data / 'tokens' / 'train'}",
             *extra]
  if log is not None:
    with open(log, "w") as out:  # a test's own local file
      return subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def steps_saved(workdir) -> tuple[list[int], list[int]]:
  """(finished, unfinished) steps in WORKDIR/checkpoints, from one listing of the bucket.

  On a bucket orbax writes a step in place and writes STEP/commit_success.txt last.
  """
  found = [p.relative_to(workdir / "checkpoints").parts
           for p in listing(workdir / "checkpoints", "*/*")]
  steps = {int(parts[0]) for parts in found if parts[0].isdigit()}
  finished = {int(parts[0]) for parts in found if parts[0].isdigit()
              and parts[1] == "commit_success.txt"}
  return sorted(finished), sorted(steps - finished)


def losses(rows) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in rows if "loss" in r}


def tensorboard_tags(directory) -> set[str]:
  """Scalar tags in the event files (TFRecord framing of Event protos) of a directory."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in listing(directory, "events.out.tfevents.*"):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      tags |= {v.tag for v in event_pb2.Event.FromString(data[i + 12:i + 12 + length])
               .summary.value}
      i += 12 + length + 4
  return tags


def test_metrics_in_a_bucket_show_during_the_run_and_merge_in_the_order_begun(gs_dir,
                                                                             monkeypatch):
  monkeypatch.setattr(metrics, "SEGMENT_BYTES", 150)  # about 3 rows a segment

  def run(start, steps, loss):
    writer = metrics.Writer(gs_dir, 100, flush_secs=0)
    writer.progress(start)
    for step in steps:
      writer.scalars(step, {"loss": loss})
    return writer

  writer = run(0, range(1, 11), 1.0)
  deadline = time.time() + 30
  while max(losses(metrics.read(gs_dir)), default=0) < 10 and time.time() < deadline:
    writer.progress(10)  # the trainer's every step: writes what waits, when due
    time.sleep(0.05)
  assert sorted(losses(metrics.read(gs_dir))) == list(range(1, 11))  # before close
  writer.close()
  assert len(listing(gs_dir / "metrics")) > 2  # full segments closed, others begun
  run(8, range(9, 13), 2.0).close()  # a restart from step 8
  run(4, range(5, 7), 3.0).close()  # and one from 4, after 8 was set aside
  assert [(r["step"], r["loss"]) for r in metrics.read(gs_dir)] == (
      [(s, 1.0) for s in range(1, 5)] + [(5, 3.0), (6, 3.0)])
  assert listing(gs_dir / "tensorboard", "events.out.tfevents.*")


@pytest.fixture(scope="module")
def first_run(data, gcs_emulator):
  """10 of 12 steps in gs://...: checkpoints at 4 and 8, what the bucket held right after."""
  workdir = new_dir()
  trainer.train(tiny(data), workdir, stop_after_step=10)
  return dict(workdir=workdir, rows=metrics.read(workdir), saved=steps_saved(workdir),
              segments=[p.name for p in listing(workdir / "metrics")],
              tags=tensorboard_tags(workdir / "tensorboard"),
              config=(workdir / "config.json").exists())


def test_a_run_in_a_bucket_saves_checkpoints_and_metrics(first_run):
  assert first_run["saved"] == ([4, 8], [])
  assert first_run["config"]
  rows = first_run["rows"]
  assert sorted(losses(rows)) == [2, 4, 6, 8, 10]
  assert [r["step"] for r in rows if "eval/loss" in r] == [6]
  (segment,) = first_run["segments"]
  assert segment.startswith("0000000000-") and segment.endswith(".jsonl")
  assert {"loss", "accuracy", "learning_rate", "mfu", "eval/loss"} <= first_run["tags"]


def test_a_restart_in_a_bucket_resumes_and_keeps_the_history(first_run, data, capsys):
  workdir, before = first_run["workdir"], first_run["rows"]
  trainer.train(tiny(data), workdir)
  assert f"resumed from {workdir / 'checkpoints' / '8'}" in capsys.readouterr().err
  assert steps_saved(workdir) == ([4, 8, 12], [])
  rows = metrics.read(workdir)
  assert sorted(losses(rows)) == [2, 4, 6, 8, 10, 12]
  # Rows up to the checkpoint are the first run's own; the restart's replace those after it.
  assert [r for r in rows if r["step"] <= 8] == [r for r in before if r["step"] <= 8]
  (again,) = [r for r in rows if r["step"] == 10]
  assert again["time"] > max(r["time"] for r in before)
  # It resumed exactly (state, RNG and data position from the bucket): the same loss.
  assert again["loss"] == losses(before)[10]
  assert [r["step"] for r in rows if "eval/loss" in r] == [6, 12]
  assert len(listing(workdir / "metrics")) == 2


def test_a_process_killed_while_saving_resumes_from_the_last_finished_step(data, gs_dir,
                                                                          tmp_path):
  """kill -9 while a step is written to the bucket; the next start resumes from the last
  finished one and saves the unfinished step again."""
  for attempt in range(4):  # until a kill lands in a save (nearly always the first)
    log = tmp_path / f"killed_{attempt}.log"
    process = run_cli(gs_dir, data, "--config.num_train_steps=100000",
                      "--config.train.checkpoint_every=1", "--config.train.log_every=1",
                      "--config.train.async_checkpoints=False",
                      "--config.train.keep_checkpoints=100000", log=log)
    try:
      deadline = time.time() + 180
      # Progress first: metrics rows (written every few seconds) and a finished step.
      while (process.poll() is None and time.time() < deadline
             and (len(metrics.read(gs_dir)) < 3 or not steps_saved(gs_dir)[0])):
        time.sleep(0.5)
      while process.poll() is None and time.time() < deadline and not steps_saved(gs_dir)[1]:
        time.sleep(0.02)  # a save (one per step) is nearly always under way
      alive = process.poll() is None
    finally:
      process.send_signal(signal.SIGKILL)
      process.wait()
    assert alive, log.read_text()[-3000:]
    finished, unfinished = steps_saved(gs_dir)
    if unfinished:
      break
  assert unfinished, f"no kill landed in a save in {attempt + 1} tries"
  assert unfinished[0] > finished[-1]
  last = finished[-1]
  # Tools (sample, init_from) take orbax's finished steps, never the half-written one.
  from parti_jax import checkpoints, runs
  assert checkpoints.finished_steps(gs_dir / "checkpoints") == finished
  assert runs.checkpoint_dir(gs_dir)[1] == last
  again = run_cli(gs_dir, data, f"--config.num_train_steps={last + 3}",
                  "--config.train.checkpoint_every=1", "--config.train.log_every=1",
                  "--config.train.keep_checkpoints=100000")
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from {gs_dir / 'checkpoints' / str(last)}" in again.stderr
  finished_now, unfinished_now = steps_saved(gs_dir)
  assert unfinished_now == [] and {last + 1, last + 2, last + 3} <= set(finished_now)
  # The killed run's rows stay (all but its last few seconds', which kill -9 loses); the
  # restart's follow the step it resumed from.
  logged = sorted(losses(metrics.read(gs_dir)))
  assert {1, 2, 3} <= set(logged)
  assert [s for s in logged if s > last] == [last + 1, last + 2, last + 3]


def test_an_unreadable_step_in_a_bucket_is_set_aside(data, gs_dir):
  """The newest step loses most of an array data object: the next start says so, moves it
  to WORKDIR/checkpoints_unreadable/ and resumes exactly from the step before."""
  trainer.train(tiny(data), gs_dir, stop_after_step=8)
  before = losses(metrics.read(gs_dir))
  assert steps_saved(gs_dir) == ([4, 8], [])
  state = gs_dir / "checkpoints" / "8" / "state"  # epath globs no "**" on a bucket
  objects = [p for depth in (1, 2, 3) for p in listing(state, "/".join(["*"] * depth))
             if p.is_file()]
  victim = max(objects, key=lambda p: p.stat().length)  # the biggest: array data
  victim.write_bytes(victim.read_bytes()[:victim.stat().length // 3])
  # A subprocess with a timeout: a restore that hangs on the bucket fails the test.
  again = run_cli(gs_dir, data, "--config.num_train_steps=12",
                  "--config.train.checkpoint_every=4", "--config.train.log_every=2",
                  timeout=240)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"{gs_dir / 'checkpoints' / '8'} cannot be restored" in again.stderr
  assert f"resumed from {gs_dir / 'checkpoints' / '4'}" in again.stderr
  assert listing(gs_dir / "checkpoints_unreadable" / "8", "*")
  assert steps_saved(gs_dir) == ([4, 8, 12], [])
  after = losses(metrics.read(gs_dir))
  assert sorted(after) == [2, 4, 6, 8, 10, 12]
  assert after[6] == before[6] and after[8] == before[8]  # resumed exactly from step 4
