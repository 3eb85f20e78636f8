"""The trainer: exact resume, preemption, unreadable checkpoints, other meshes, NaNs,
config changes, init_from, metrics, and two processes training like one."""

import json
import os
import pathlib
import random
import re
import signal
import struct
import subprocess
import sys
import time

import data_helpers
import jax
import numpy as np
import pytest
from conftest import ROOT, load_config
from orbax import checkpoint as ocp

from parti_jax import checkpoints, runs, sharding
from parti_jax import config as common
from parti_jax import train as trainer
from parti_jax.tasks import parti as parti_task
from parti_jax.data import encode


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Shapes at 32 px -> SentencePiece -> colour-code token shards (4x4, codebook 64)."""
  return data_helpers.token_data(tmp_path_factory.mktemp("trainer_data"), num_validation=40)


def tiny(data, **train_fields):
  c = load_config("parti_tiny")
  c.data.update(train=str(data / "tokens" / "train"), eval=str(data / "tokens" / "validation"))
  c.num_train_steps = 12
  c.train.update(log_every=2, checkpoint_every=4, eval_every=6)
  c.train.update(train_fields)
  return c


def final_params(workdir, config, devices=None):
  """The parameters of the run's last checkpoint, on the host."""
  setup = parti_task.Setup(config, sharding.make_mesh(config, devices or jax.devices()))
  manager = ocp.CheckpointManager(pathlib.Path(workdir) / "checkpoints", item_names=("state",))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(setup.abstract_state()))).state
  manager.close()
  return step, jax.device_get(state.params)


def logged(workdir, key="loss") -> dict[int, float]:
  from parti_jax import metrics  # the run's history, merged from its metrics segments
  return {r["step"]: r[key] for r in metrics.read(workdir) if key in r}


def assert_same_params(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  summary = trainer.train(tiny(data), workdir)
  return workdir, summary


def test_a_run_trains_evaluates_and_reports(uninterrupted):
  workdir, summary = uninterrupted
  losses = logged(workdir)
  assert sorted(losses) == [2, 4, 6, 8, 10, 12]
  assert losses[12] < losses[2]
  assert 0 < summary["mfu"] < 1 and summary["image_tokens_per_s"] > 0
  assert summary["eval/examples"] == 40 and np.isfinite(summary["eval/loss"])
  assert sorted(logged(workdir, "eval/loss")) == [6, 12]
  assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [4, 8, 12]
  tags = tensorboard_tags(workdir / "tensorboard")
  for tag in ("loss", "accuracy", "learning_rate", "grad_norm", "step_time_s",
              "image_tokens_per_s", "tflops_per_device", "mfu", "data_wait_s",
              "skipped_updates", "skipped_records/corrupt_image", "eval/loss"):
    assert tag in tags, tag
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["model"]["d_model"] == 64


def tensorboard_tags(directory) -> set[str]:
  """Scalar tags in TensorBoard event files (TFRecord framing of Event protos)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in pathlib.Path(directory).glob("events.out.tfevents.*"):
    data = path.read_bytes()
    i = 0
    while i < len(data):
      (length,) = struct.unpack("<Q", data[i:i + 8])
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + length])
      tags |= {v.tag for v in event.summary.value}
      i += 12 + length + 4
  return tags


def test_an_interrupted_run_resumes_exactly(data, uninterrupted, tmp_path):
  stop = random.choice([5, 6, 7, 9, 10, 11])  # a random step between checkpoints
  trainer.train(tiny(data), tmp_path, stop_after_step=stop)
  trainer.train(tiny(data), tmp_path)
  reference, _ = uninterrupted
  after = {s: v for s, v in logged(tmp_path).items() if s > stop}
  assert after == {s: v for s, v in logged(reference).items() if s > stop}, f"stopped at {stop}"
  assert_same_params(final_params(tmp_path, tiny(data))[1],
                     final_params(reference, tiny(data))[1])


def test_an_unreadable_latest_checkpoint_falls_back_to_the_one_before(data, uninterrupted,
                                                                     tmp_path, capsys):
  trainer.train(tiny(data), tmp_path, stop_after_step=8)
  files = sorted((p for p in (tmp_path / "checkpoints" / "8" / "state").rglob("*")
                  if p.is_file()), key=lambda p: p.stat().st_size)
  victim = files[-1]  # the biggest file: array data
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
  trainer.train(tiny(data), tmp_path)
  err = capsys.readouterr().err
  assert "checkpoints/8 cannot be restored" in err and "resumed from" in err
  assert (tmp_path / "checkpoints_unreadable" / "8").is_dir()
  assert_same_params(final_params(tmp_path, tiny(data))[1],
                     final_params(uninterrupted[0], tiny(data))[1])


def test_a_run_saved_on_one_mesh_resumes_on_another(data, tmp_path):
  on_eight = tiny(data)
  on_eight.mesh.update(data=2, fsdp=2, tensor=2)
  trainer.train(on_eight, tmp_path, stop_after_step=4)
  on_four = tiny(data)
  on_four.mesh.update(data=1, fsdp=4, tensor=1)
  setup = parti_task.Setup(on_four, sharding.make_mesh(on_four, jax.devices()[:4]))
  ckpts = checkpoints.Checkpoints(tmp_path, on_four)
  from parti_jax.data import pipeline
  loader = pipeline.Loader(on_four, setup.mesh)
  state, step = ckpts.restore_latest(setup.abstract_state(), loader)
  ckpts.close()
  loader.close()
  assert step == 4 and int(state.step) == 4
  kernel = state.params["decoder"]["blocks"]["mlp"]["up"]["kernel"]
  assert dict(kernel.sharding.mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 1}
  assert_same_params(jax.device_get(state.params), final_params(tmp_path, on_eight)[1])
  summary = trainer.train(on_four, tmp_path, devices=jax.devices()[:4])
  assert np.isfinite(summary["loss"])
  assert final_params(tmp_path, on_four, jax.devices()[:4])[0] == 12


def test_non_finite_updates_are_skipped_counted_and_never_saved(data, tmp_path):
  config = tiny(data, inject_nan_steps=(2, 3), checkpoint_every=2, keep_checkpoints=2,
                keep_every=4)
  summary = trainer.train(config, tmp_path)
  # Checkpoints: the last 2, and every 4th step's.
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [4, 8, 10, 12]
  assert summary["skipped_updates_total"] == 2 and np.isfinite(summary["loss"])
  assert sum(logged(tmp_path, "skipped_updates").values()) == 2
  for leaf in jax.tree.leaves(final_params(tmp_path, tiny(data))[1]):
    assert np.isfinite(leaf).all()


def test_non_finite_updates_can_halt_the_run(data, tmp_path):
  with pytest.raises(trainer.TrainingError, match="step 2: loss or gradients are not finite"):
    trainer.train(tiny(data, inject_nan_steps=(2,), nan_policy="halt"), tmp_path)
  with pytest.raises(trainer.TrainingError, match="4 updates in a row skipped"):
    trainer.train(tiny(data, inject_nan_steps=tuple(range(12)), max_consecutive_skips=4),
                  tmp_path / "streak")


def test_a_restart_that_changes_shapes_is_refused(data, tmp_path):
  trainer.train(tiny(data, profile_steps=(0, 1)), tmp_path, stop_after_step=2)
  assert list((tmp_path / "profile").rglob("*.xplane.pb")), "profiler trace missing"
  wider = tiny(data)
  wider.model.d_model = 128
  with pytest.raises(common.ConfigError, match="model.d_model: 64 in .*config.json, now 128"):
    trainer.train(wider, tmp_path)
  longer = tiny(data)
  longer.num_train_steps = 14  # not a shape field: accepted, the run goes on
  assert trainer.train(longer, tmp_path)["image_tokens_per_s"] > 0


def test_init_from_starts_from_another_runs_parameters(data, uninterrupted, tmp_path):
  other = tiny(data)
  other.optimizer.name = "adafactor"  # another optimizer: only the parameters are read
  setup = parti_task.Setup(other)
  params = checkpoints.load_params(runs.resolve_checkpoint(uninterrupted[0]),
                                  setup.abstract_state().params)
  assert_same_params(jax.device_get(params), final_params(uninterrupted[0], tiny(data))[1])
  other.init_from = str(uninterrupted[0])
  other.num_train_steps = 2
  fresh = tiny(data)
  fresh.num_train_steps = 2
  assert (trainer.train(other, tmp_path / "init")["loss"]
          < trainer.train(fresh, tmp_path / "fresh")["loss"])


def run_cli(workdir, data, *extra, processes=1, timeout=300):
  command = [sys.executable, "-m", "parti_jax.train", "--config", "configs/parti_tiny.py",
             "--workdir", str(workdir), f"--config.data.train={data / 'tokens' / 'train'}",
             f"--config.data.eval={data / 'tokens' / 'validation'}", *extra]
  if processes > 1:
    command = [sys.executable, "launch/local.py", "--num_processes", str(processes),
               "--devices_per_process", str(8 // processes), "--", *command]
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_sigterm_saves_a_checkpoint_and_the_next_start_resumes(data, tmp_path):
  command = [sys.executable, "-m", "parti_jax.train", "--config", "configs/parti_tiny.py",
             "--workdir", str(tmp_path), f"--config.data.train={data / 'tokens' / 'train'}",
             "--config.num_train_steps=100000", "--config.train.checkpoint_every=100000",
             "--config.train.log_every=1"]
  process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  deadline = time.time() + 120
  while not logged_ok(tmp_path) and time.time() < deadline and process.poll() is None:
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  _, err = process.communicate(timeout=120)
  assert process.returncode == trainer.PREEMPTED_EXIT_CODE, err[-3000:]
  (step,) = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
  assert step >= 3 and f"stopped at step {step}" in err
  again = run_cli(tmp_path, data, f"--config.num_train_steps={step + 2}",
                  "--config.train.checkpoint_every=100000", "--config.train.log_every=1")
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from {tmp_path / 'checkpoints' / str(step)}" in again.stderr
  assert max(logged(tmp_path)) == step + 2


def logged_ok(workdir) -> bool:
  from parti_jax import metrics  # the run's history, merged from its metrics segments
  return len(metrics.read(workdir)) >= 3


def test_two_processes_train_like_one_and_resume(data, uninterrupted, tmp_path):
  """2 processes x 4 devices (gloo) reach the losses of 1 process x 8 devices."""
  run = run_cli(tmp_path, data, "--config.num_train_steps=12", "--config.train.log_every=2",
                "--config.train.checkpoint_every=4", "--config.train.eval_every=6", processes=2)
  assert run.returncode == 0, run.stdout[-3000:]
  reference = logged(uninterrupted[0])
  two = logged(tmp_path)
  assert sorted(two) == sorted(reference)
  for step in reference:  # row order differs (each process's rows), so sums may round apart
    assert two[step] == pytest.approx(reference[step], rel=1e-5), step
  # Step 12 becomes unreadable for process 1 alone (the data it wrote): both processes
  # agree to set it aside, resume from step 8 (exactly) and go on.
  written_by_1 = [p for p in (tmp_path / "checkpoints" / "12" / "state").rglob("*")
                  if p.is_file() and "ocdbt.process_1" in str(p)]
  victim = max(written_by_1, key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
  more = run_cli(tmp_path, data, "--config.num_train_steps=14", "--config.train.log_every=2",
                 "--config.train.checkpoint_every=4", "--config.train.eval_every=0",
                 "--config.train.restore_attempts=1", processes=2)
  assert more.returncode == 0, more.stdout[-3000:]
  # Process 0 read its part; it learns of process 1's failure from the exchange.
  assert "checkpoints/12 cannot be restored (unreadable on another process)" in more.stdout
  assert f"resumed from {tmp_path / 'checkpoints' / '8'}" in more.stdout
  assert (tmp_path / "checkpoints_unreadable" / "12").is_dir()
  again = logged(tmp_path)
  assert again[10] == two[10] and again[12] == two[12] and 14 in again


def test_skipped_records_reach_the_metrics(data, tmp_path):
  from parti_jax.data import records
  good = list(records.ShardSet.open(data / "tokens" / "train").read_all())[:20]
  damaged = [dict(good[0], image_codes=b""), dict(good[1], text_tokens=[])]
  records.write_shard_set(tmp_path / "set", "set", "tokens", good + damaged, 1, made_by={},
                          fields=encode.TOKEN_FIELDS,
                          tokens=records.ShardSet.open(data / "tokens" / "train").meta["tokens"])
  config = tiny(data, eval_every=0)
  config.data.update(train=str(tmp_path / "set"), max_bad_fraction=0.2)
  trainer.train(config, tmp_path / "run")
  skipped = sum(logged(tmp_path / "run", "skipped_records/missing_tokens").values())
  assert skipped >= 2 * 4  # 12 steps x 8 rows read the 22 records 4 times or more


def test_model_axes_across_processes_and_resuming_on_other_process_counts(data, tmp_path):
  """Saved by 2 processes (x 4 devices), resumed by 4 (x 2: the tensor axis spans
  processes), then by 1 (x 8), then by 1 again (the same layout: grain's exact state, which
  counts from where the previous start began reading): each at the same step and data
  position, with the losses of 1 process x 8 devices throughout."""
  mesh = ["--config.mesh.fsdp=2", "--config.mesh.tensor=4"]
  cadence = ["--config.train.log_every=2", "--config.train.checkpoint_every=4",
             "--config.train.eval_every=6"]
  reference = tiny(data)
  reference.mesh.update(fsdp=2, tensor=4)
  reference.num_train_steps = 16
  trainer.train(reference, tmp_path / "reference")
  expected = logged(tmp_path / "reference")
  workdir = tmp_path / "run"
  for processes, steps in ((2, 4), (4, 8), (1, 12)):
    run = run_cli(workdir, data, f"--config.num_train_steps={steps}", *mesh, *cadence,
                  processes=processes)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    if steps > 4:
      assert f"resumed from {workdir / 'checkpoints' / str(steps - 4)}" in run.stdout + run.stderr
      assert f"from global position {(steps - 4) * 8} on" in run.stdout + run.stderr
  again = tiny(data)
  again.mesh.update(fsdp=2, tensor=4)
  again.num_train_steps = 16
  trainer.train(again, workdir)
  losses = logged(workdir)
  assert sorted(losses) == sorted(expected)
  for step in expected:
    assert losses[step] == pytest.approx(expected[step], rel=1e-5), step
  assert logged(workdir, "eval/loss")[12] == pytest.approx(
      logged(tmp_path / "reference", "eval/loss")[12], rel=1e-5)
  assert not (workdir / "checkpoints_unreadable").exists()  # nothing set aside


def test_sigterm_to_one_of_several_processes_saves_the_same_step_on_all(data, tmp_path):
  """JAX's preemption service spreads one process's SIGTERM: all save one step and stop."""
  import psutil
  launcher = subprocess.Popen(
      [sys.executable, "launch/local.py", "--num_processes", "2", "--devices_per_process", "4",
       "--", sys.executable, "-m", "parti_jax.train", "--config", "configs/parti_tiny.py",
       "--workdir", str(tmp_path), f"--config.data.train={data / 'tokens' / 'train'}",
       "--config.num_train_steps=100000", "--config.train.checkpoint_every=100000",
       "--config.train.log_every=1"], cwd=ROOT, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 240
  while not logged_ok(tmp_path) and time.time() < deadline and launcher.poll() is None:
    time.sleep(0.5)
  if launcher.poll() is not None or not logged_ok(tmp_path):  # say why, not a psutil error
    if launcher.poll() is None:
      for child in psutil.Process(launcher.pid).children(recursive=True):
        child.kill()
    out, _ = launcher.communicate(timeout=120)
    pytest.fail(f"the run never logged a step (exit {launcher.returncode}):\n{out[-3000:]}")
  (second,) = [p for p in psutil.Process(launcher.pid).children()
               if p.environ().get("PARTI_PROCESS_ID") == "1"]
  second.send_signal(signal.SIGTERM)  # as a preempted host gets it
  out, _ = launcher.communicate(timeout=180)
  assert launcher.returncode == trainer.PREEMPTED_EXIT_CODE, out[-3000:]
  (step,) = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
  assert f"stopped at step {step}" in out and step >= 3


def test_the_compilation_cache_lives_in_the_work_directory(tmp_path):
  """Without JAX_COMPILATION_CACHE_DIR, a restart finds the compiled step in WORKDIR."""
  code = ("import sys, jax, jax.numpy as jnp\n"
          "from parti_jax import train\n"
          "train.use_compilation_cache(sys.argv[2], sys.argv[1])\n"
          "print(jax.config.jax_compilation_cache_dir)\n")
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  def cache_dir(setting):
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path), setting], env=env,
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout.strip()
  assert cache_dir("") == str(tmp_path / "compilation_cache")
  assert cache_dir("/elsewhere") == "/elsewhere"
  assert cache_dir("off") == "None"


def test_a_second_unreadable_checkpoint_stops_the_run_instead_of_its_history(data, tmp_path):
  """Two in a row is likelier memory, config or storage than damage: one is set aside, the
  other kept, and the run stops saying so (it never starts again from step 0)."""
  trainer.train(tiny(data), tmp_path, stop_after_step=8)
  for step in (4, 8):
    files = [p for p in (tmp_path / "checkpoints" / str(step) / "state").rglob("*")
             if p.is_file()]
    victim = max(files, key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 3])
  # In a process of its own: orbax's failed reads leave threads that outlive the error.
  run = run_cli(tmp_path, data, "--config.train.restore_attempts=1")
  assert run.returncode == 1, run.stderr[-3000:]
  assert re.search(r"error: \S*checkpoints/4 cannot be restored either .* after "
                   r"\S*checkpoints/8 was set aside", run.stderr), run.stderr[-3000:]
  assert (tmp_path / "checkpoints_unreadable" / "8").is_dir()
  assert (tmp_path / "checkpoints" / "4").is_dir()


@pytest.fixture
def sigterm_default():
  """SIGTERM's default action (ending the process) recorded instead; the list of arrivals."""
  arrivals = []
  previous = signal.signal(signal.SIGTERM, lambda *_: arrivals.append(True))
  yield arrivals
  signal.signal(signal.SIGTERM, previous)


def sigterm_after(monkeypatch, owner, name):
  """Makes `owner.name` send this process a SIGTERM (as a scheduler's stop) when called."""
  original = getattr(owner, name)

  def then_sigterm(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)
    return original(*args, **kwargs)

  monkeypatch.setattr(owner, name, then_sigterm)


def test_a_sigterm_during_the_last_save_does_not_cut_it(data, tmp_path, monkeypatch,
                                                        sigterm_default):
  """The final checkpoint is waited for with the trainer's stop handler still in place."""
  config = tiny(data)
  config.data.eval = ""
  sigterm_after(monkeypatch, checkpoints.Checkpoints, "wait")  # called once: at the end
  trainer.train(config, tmp_path)
  assert not sigterm_default
  assert final_params(tmp_path, config)[0] == 12  # complete and readable


def test_a_sigterm_while_compiling_stops_before_the_first_step(data, tmp_path, monkeypatch,
                                                               sigterm_default, capsys):
  sigterm_after(monkeypatch, trainer, "peak_tflops_per_device")  # right after compiling
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(trainer.Preempted):
    trainer.train(tiny(data), tmp_path)
  assert not sigterm_default
  assert "stopped before step 1" in capsys.readouterr().err
  assert not list((tmp_path / "checkpoints").iterdir())
  assert signal.getsignal(signal.SIGTERM) is handler  # given back
