"""Faults the trainer and the data commands survive, with real processes and real files: a
second writer on a work directory (the lock, locally and in a bucket), kill -9 at random
moments and in the middle of an asynchronous save, a full disk under checkpoints and
metrics, and ingest and encode killed mid-shard."""

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import data_helpers as h
import jax
import pytest
from array_record.python import array_record_module
from conftest import ROOT, load_config
from gcs import gcs_emulator, gs_dir  # noqa: F401  (fixtures)
from orbax import checkpoint as ocp
from test_ingest import write
from test_trainer import assert_same_params, logged

from parti_jax import checkpoints, metrics, runs, sharding, workdir_lock
from parti_jax import train as trainer
from parti_jax.data import encode, ingest, records
from parti_jax.tasks import parti as parti_task

STEPS = 16


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Shapes at 32 px -> SentencePiece -> colour-code token shards (4x4, codebook 64)."""
  return h.token_data(tmp_path_factory.mktemp("faults_data"), num_validation=16)


def tiny(data):
  """What `command` trains, built in this process: the same config, hence the same run."""
  c = load_config("parti_tiny")
  c.data.update(train=str(data / "tokens" / "train"), eval="")
  c.num_train_steps = STEPS
  c.train.update(log_every=1, checkpoint_every=4, keep_checkpoints=100)
  return c


def command(workdir, data, *extra) -> list[str]:
  return [sys.executable, "-m", "parti_jax.train", "--config", "configs/parti_tiny.py",
          "--workdir", str(workdir), f"--config.data.train={data / 'tokens' / 'train'}",
          "--config.data.eval=", f"--config.num_train_steps={STEPS}",
          "--config.train.log_every=1", *extra]


def start(workdir, data, log, *extra) -> subprocess.Popen:
  """The trainer in the background, its output to the local file `log`."""
  with open(log, "w") as out:  # the test's own file
    return subprocess.Popen(command(workdir, data, *extra), cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT)


def run(workdir, data, *extra, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run(command(workdir, data, *extra), cwd=ROOT, capture_output=True,
                        text=True, timeout=timeout)


def wait_for(condition, process=None, timeout=240, poll=0.2):
  deadline = time.time() + timeout
  while not condition():
    assert time.time() < deadline, "timed out"
    assert process is None or process.poll() is None, "the process ended"
    time.sleep(poll)


def params_at(workdir, step, config):
  """The parameters of checkpoint `step`, on the host."""
  setup = parti_task.Setup(config, sharding.make_mesh(config, jax.devices()))
  manager = ocp.CheckpointManager(workdir / "checkpoints", item_names=("state",))
  try:
    state = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(setup.abstract_state()))).state
  finally:
    manager.close()
  return jax.device_get(state.params)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
  """An uninterrupted run of STEPS steps, checkpoints every 4 steps, all kept."""
  workdir = tmp_path_factory.mktemp("reference")
  trainer.train(tiny(data), workdir)
  return workdir


# ------------------------------------------------------------------------------------------
# The lock


@pytest.fixture
def quick_settle(monkeypatch):
  monkeypatch.setattr(workdir_lock, "SETTLE_S", 0.2)


def lock_file(directory, **fields):
  (directory / workdir_lock.LOCK_NAME).write_text(json.dumps(dict(
      host=socket.gethostname(), pid=os.getpid(), started="2030-01-01T00:00:00+00:00",
      heartbeat=time.time(), token="theirs") | fields))


def dead_pid() -> int:
  process = subprocess.Popen([sys.executable, "-c", "pass"])
  process.wait()
  return process.pid


def test_the_lock_refuses_a_live_holder_and_takes_over_a_gone_one(tmp_path, quick_settle):
  messages = []
  held = workdir_lock.WorkdirLock(tmp_path, heartbeat_s=0.05)
  held.acquire()
  holder = json.loads((tmp_path / "lock.json").read_text())
  assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
  first_beat = holder["heartbeat"]
  wait_for(lambda: held.read()["heartbeat"] > first_beat, timeout=30, poll=0.02)
  with pytest.raises(workdir_lock.LockError) as refused:
    workdir_lock.WorkdirLock(tmp_path).acquire()
  assert (f"{tmp_path / 'lock.json'}: the work directory is in use by another run (host "
          f"{socket.gethostname()}, process {os.getpid()}, started {holder['started']}"
          in str(refused.value)) and "--force" in str(refused.value)

  forced = workdir_lock.WorkdirLock(tmp_path, force=True, log=messages.append)
  forced.acquire()
  assert "forced (--force)" in messages[-1] and f"process {os.getpid()}" in messages[-1]
  wait_for(lambda: held.lost_to is not None, timeout=30, poll=0.02)  # it notices, and stops
  held.release()  # not its lock any more: left alone
  assert (tmp_path / "lock.json").exists()
  forced.release()
  assert not (tmp_path / "lock.json").exists()

  gone = dead_pid()  # a holder of this host that is no longer running
  lock_file(tmp_path, pid=gone, heartbeat=time.time())
  taker = workdir_lock.WorkdirLock(tmp_path, log=messages.append)
  taker.acquire()
  assert f"process {gone} is not running on this host" in messages[-1]
  taker.release()

  lock_file(tmp_path, host="elsewhere", pid=1)  # another host, heartbeat fresh: alive
  with pytest.raises(workdir_lock.LockError, match="host elsewhere, process 1, started"):
    workdir_lock.WorkdirLock(tmp_path).acquire()
  lock_file(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 1000)
  taker = workdir_lock.WorkdirLock(tmp_path, stale_after_s=300, log=messages.append)
  taker.acquire()
  assert "last heartbeat was 1000 s ago (stale after 300 s)" in messages[-1]
  taker.release()

  (tmp_path / "lock.json").write_text('["not a lock"]')  # no holder, no heartbeat: stale
  taker = workdir_lock.WorkdirLock(tmp_path, log=messages.append)
  taker.acquire()
  assert "of host ?, process ?, started ?" in messages[-1]
  taker.release()


def test_the_lock_in_a_bucket(gs_dir, quick_settle):
  messages = []
  held = workdir_lock.WorkdirLock(gs_dir)
  held.acquire()
  with pytest.raises(workdir_lock.LockError, match=f"process {os.getpid()}, started"):
    workdir_lock.WorkdirLock(gs_dir).acquire()
  held.release()
  assert not (gs_dir / "lock.json").exists()
  lock_file(gs_dir, host="elsewhere", pid=7, heartbeat=time.time() - 1000)
  taker = workdir_lock.WorkdirLock(gs_dir, log=messages.append)
  taker.acquire()
  assert "taking over the lock" in messages[-1] and "host elsewhere, process 7" in messages[-1]
  assert json.loads((gs_dir / "lock.json").read_text())["pid"] == os.getpid()
  taker.release()
  assert not (gs_dir / "lock.json").exists()


def test_all_processes_of_a_run_stop_at_a_lock_another_run_holds(data, tmp_path):
  with workdir_lock.WorkdirLock(tmp_path):  # a live run of this host holds it
    launched = subprocess.run(
        [sys.executable, "launch/local.py", "--num_processes", "2", "--devices_per_process",
         "4", "--", *command(tmp_path, data)], cwd=ROOT, capture_output=True, text=True,
        timeout=240)
  assert launched.returncode == 1, launched.stdout[-3000:]
  for process in (0, 1):  # process 1 hears it from process 0, and does not hang
    assert re.search(rf"\[{process}\].*error: .*in use by another run \(host "
                     rf"{re.escape(socket.gethostname())}, process {os.getpid()}",
                     launched.stdout), launched.stdout[-3000:]
  assert not (tmp_path / "checkpoints").exists()


# ------------------------------------------------------------------------------------------
# kill -9


def saving(workdir) -> list[int]:
  """Steps orbax is writing now (its temporary directories)."""
  directory = workdir / "checkpoints"
  return sorted(int(p.name.split(".")[0]) for p in directory.glob("*.orbax-checkpoint-tmp*"))


def test_kill_9_at_random_moments_resumes_bitwise_from_finished_checkpoints(
    data, reference, tmp_path):
  workdir, often = tmp_path / "run", ["--config.train.checkpoint_every=1",
                                      "--config.train.keep_checkpoints=3"]
  first = start(workdir, data, tmp_path / "first.log", *often)
  try:
    wait_for(lambda: len(checkpoints.finished_steps(workdir / "checkpoints")) >= 2, first)
    # A second start while it trains is refused, naming it (stopped meanwhile, so that it
    # cannot finish first: a stopped process is alive).
    first.send_signal(signal.SIGSTOP)
    second = run(workdir, data, *often)
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 1 and (
        f"in use by another run (host {socket.gethostname()}, process {first.pid}, started"
        in second.stderr), second.stderr[-3000:]
    assert first.poll() is None
    # Killed while an asynchronous checkpoint is written: stopped the moment one is seen,
    # killed if it is still unfinished (else let go, to try the next).
    while True:
      wait_for(lambda: saving(workdir), first, poll=0.005)
      first.send_signal(signal.SIGSTOP)
      if saving(workdir):
        break
      first.send_signal(signal.SIGCONT)
  finally:
    first.kill()
    first.wait()
  finished = checkpoints.finished_steps(workdir / "checkpoints")
  assert saving(workdir) and max(saving(workdir)) > max(finished)
  assert (workdir / "lock.json").exists()  # nobody released it

  # The restart takes the lock over, resumes from the newest finished step, and is killed
  # at a random moment of its training.
  third = start(workdir, data, tmp_path / "third.log", *often)
  try:
    wait_for(lambda: "resumed from" in (tmp_path / "third.log").read_text(), third)
    time.sleep(random.uniform(0, 3))
  finally:
    third.kill()
    third.wait()
  log = (tmp_path / "third.log").read_text()
  assert (f"taking over the lock {workdir / 'lock.json'} of host {socket.gethostname()}, "
          f"process {first.pid}" in log and "is not running on this host" in log), log[-3000:]
  assert f"resumed from {workdir / 'checkpoints' / str(max(finished))}\n" in log

  finished = checkpoints.finished_steps(workdir / "checkpoints")
  last = run(workdir, data, *often)
  assert last.returncode == 0, last.stderr[-3000:]
  assert f"resumed from {workdir / 'checkpoints' / str(max(finished))}\n" in last.stderr
  assert not (workdir / "lock.json").exists()  # released at the end
  assert_same_params(params_at(workdir, STEPS, tiny(data)), params_at(reference, STEPS,
                                                                       tiny(data)))
  assert logged(workdir)[STEPS] == logged(reference)[STEPS]


# ------------------------------------------------------------------------------------------
# A full disk


@pytest.fixture
def small_disk(tmp_path):
  """A mount point for a tmpfs of the test's size (`mount(size)`); unmounted after."""
  point = tmp_path / "disk"
  point.mkdir()

  def mount(size: int, remount: bool = False):
    options = f"{'remount,' if remount else ''}size={size}"
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
      pytest.skip(f"a small file system is needed to fill a disk for real, and mounting a "
                  f"tmpfs is not permitted here: {done.stderr.strip()}")
    return point

  yield mount
  subprocess.run(["umount", "-l", str(point)], capture_output=True)


def size_of(directory) -> int:
  return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def test_a_full_disk_under_checkpoints_is_named_and_the_run_resumes_when_freed(
    data, reference, small_disk):
  # Room for one checkpoint and a half: step 4 is saved, step 8 finds the disk full.
  ckpt = size_of(reference / "checkpoints" / "4")
  disk = small_disk(int(ckpt * 1.6) // 4096 * 4096)
  workdir = disk / "run"
  keep = "--config.train.keep_checkpoints=100"
  full = run(workdir, data, "--config.train.checkpoint_every=4", keep)
  assert full.returncode == 1, full.stderr[-3000:]
  (said,) = [line for line in full.stderr.splitlines() if line.startswith("error: ")]
  assert said.startswith(f"error: {workdir}: no space left on the device (the disk is "
                         "full"), full.stderr[-3000:]
  assert "the latest: step 4" in said
  assert checkpoints.finished_steps(workdir / "checkpoints") == [4]
  assert_same_params(params_at(workdir, 4, tiny(data)), params_at(reference, 4, tiny(data)))
  assert not (workdir / "lock.json").exists()

  small_disk(64 << 20, remount=True)  # space freed
  again = run(workdir, data, "--config.train.checkpoint_every=4", keep)
  assert again.returncode == 0, again.stderr[-3000:]
  assert f"resumed from {workdir / 'checkpoints' / '4'}\n" in again.stderr
  assert_same_params(params_at(workdir, STEPS, tiny(data)), params_at(reference, STEPS,
                                                                       tiny(data)))


def fill(disk):
  """Fills the disk with the test's own file; returns it (delete it to free the space)."""
  ballast = disk / "ballast"
  with open(ballast, "wb", buffering=0) as f:
    try:
      while True:
        f.write(b"\0" * 4096)
    except OSError:
      pass
  return ballast


def test_a_full_disk_leaves_no_half_written_config_json(data, small_disk):
  disk = small_disk(256 << 10)
  (disk / "run").mkdir()
  ballast = fill(disk)
  with pytest.raises(OSError, match="No space left"):
    runs.write_config(disk / "run", tiny(data))
  ballast.unlink()  # space freed: the restart writes it, as it would have the first time
  runs.write_config(disk / "run", tiny(data))
  assert runs.read_config(disk / "run").model.d_model == tiny(data).model.d_model

  (disk / "run" / "config.json").write_text('{"model": {"d_model": 6')  # cut by other means
  with pytest.raises(runs.RunError, match=f"{disk / 'run' / 'config.json'} is not a config"):
    runs.write_config(disk / "run", tiny(data))


def test_an_output_cut_short_leaves_the_file_before_it_and_nothing_else(small_disk, gs_dir):
  """records.atomic_output, through which the commands write samples, reports and weights."""
  disk = small_disk(256 << 10)
  for path in (disk / "samples.json", gs_dir / "samples.json"):
    path.write_bytes(b"before")
    ballast = fill(disk) if path.parent == disk else None
    with pytest.raises(OSError if ballast else KeyboardInterrupt):
      with records.atomic_output(path) as f:
        f.write(b"after" * (20 << 10))  # a disk full mid-file, or an interrupt before the end
        raise KeyboardInterrupt
    assert path.read_bytes() == b"before"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["samples.json"] + (["ballast"] if ballast else []))
    if ballast:
      ballast.unlink()
    with records.atomic_output(path) as f:
      f.write(b"after")
    assert path.read_bytes() == b"after"


def test_a_full_disk_under_metrics_keeps_what_was_written_and_writes_the_rest_later(
    small_disk, capsys):
  disk = small_disk(256 << 10)
  writer = metrics.Writer(disk / "run", 100, start_step=0, flush_secs=0)
  writer.scalars(1, {"loss": 1.0})
  wait_for(lambda: [r["step"] for r in metrics.read(disk / "run")] == [1], timeout=30)
  ballast = fill(disk)
  said = ""
  for step in range(2, 41):
    writer.scalars(step, {"loss": 1.0})
  def told():
    nonlocal said
    writer.progress(40)  # the trainer's every step: writes what waits, when due
    said += capsys.readouterr().err
    return "no space left on the device (the disk is full)" in said
  wait_for(told, timeout=30, poll=0.05)
  assert f"metrics: could not write {disk / 'run'}/" in said
  assert [r["step"] for r in metrics.read(disk / "run")] == [1]  # intact, not truncated
  ballast.unlink()  # space freed: the rows kept are written
  wait_for(lambda: writer.progress(40) or len(metrics.read(disk / "run")) == 40, timeout=30)
  writer.close()
  assert [r["step"] for r in metrics.read(disk / "run")] == list(range(1, 41))
  assert not [p for p in (disk / "run" / "metrics").iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------
# Ingest and encode killed mid-shard


def raw_records(directory) -> dict[str, list[bytes]]:
  """Every shard's records as the bytes stored, by shard file name."""
  result = {}
  for path in records.ShardSet.open(directory).paths:
    reader = array_record_module.ArrayRecordReader(str(path))
    try:
      result[path.name] = list(reader.read_all())
    finally:
      reader.close()
  return result


def leftovers(directory) -> list[str]:
  return sorted(p.name for p in directory.rglob(".*.tmp"))


# Runs a command's main() and kill -9s the process once `calls` calls of MODULE.NAME
# have begun, from inside it: the moment is exact, the kill real.
KILLED_AT_CALL = """
import importlib, os, signal, sys
module_name, name, calls, main_module = sys.argv[1:5]
module, owner_name = importlib.import_module(module_name), None
owner = module
if "." in name:
  owner_name, name = name.split(".")
  owner = getattr(module, owner_name)
real, seen = getattr(owner, name), []
def dies(*args, **kwargs):
  seen.append(1)
  if len(seen) == int(calls):
    os.kill(os.getpid(), signal.SIGKILL)
  return real(*args, **kwargs)
setattr(owner, name, dies)
importlib.import_module(main_module).main(sys.argv[5:])
"""


def killed_at_call(module, name, calls, main_module, *argv) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-c", KILLED_AT_CALL, module, name, str(calls),
                         main_module, *map(str, argv)], cwd=ROOT, capture_output=True,
                        text=True, timeout=240)


def test_an_ingest_killed_mid_shard_reruns_to_the_records_of_a_clean_run(tmp_path):
  for i in range(9):
    write(tmp_path / "images" / f"img{i}.png", h.encoded(h.rgb(8, 8, i), "PNG"))
    write(tmp_path / "images" / f"img{i}.txt", f"image {i}")
  argv = ["folder", "--images", tmp_path / "images", "--num_shards", "3", "--num_threads", "1",
          "--no_progress"]
  out = tmp_path / "set"
  # The fifth record: shard 0 is finished, shard 1 has its first record written.
  killed = killed_at_call("parti_jax.data.shard_writer", "check_record", 5,
                          "parti_jax.data.ingest", *argv, "--out", out)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  names = [records.shard_name("set", s, 3) for s in range(3)]
  assert sorted(p.name for p in out.glob("*.array_record")) == names[:1]
  assert [records.is_temp_of(n, names[1:2]) for n in leftovers(out)] == [True]
  assert not (out / records.METADATA).exists()

  meta = ingest.main([*map(str, argv), "--out", str(out)])
  clean = ingest.main([*map(str, argv), "--out", str(tmp_path / "clean" / "set")])
  assert raw_records(out) == raw_records(tmp_path / "clean" / "set")
  assert meta["count"] == 9 and leftovers(out) == []
  assert {k: v for k, v in meta.items() if k != "made_by"} == {
      k: v for k, v in clean.items() if k != "made_by"}


def test_an_encode_killed_mid_shard_reruns_to_the_records_of_a_clean_run(data, tmp_path):
  argv = ["--data", data / "shapes" / "validation", "--spm", data / "spm.model",
          "--tokenizer", "color", "--resolution", "32", "--text_len", "16", "--batch_size",
          "8", "--shards_per_process", "2"]
  out = tmp_path / "tokens"
  # The eleventh record of sixteen: each of the two shards is half written.
  killed = killed_at_call("parti_jax.data.records", "ShardWriter.write", 11,
                          "parti_jax.data.encode", *argv, "--out", out)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert len(leftovers(out)) == 2 and not list(out.glob("*.array_record"))
  assert not (out / records.METADATA).exists()

  encode.main([*map(str, argv), "--out", str(out)])
  encode.main([*map(str, argv), "--out", str(tmp_path / "clean")])
  assert raw_records(out) == raw_records(tmp_path / "clean")
  assert sum(map(len, raw_records(out).values())) == 16 and leftovers(out) == []

  # A rerun over the finished set, killed as it replaces the second shard (the first holds
  # the rerun's records already): the set it leaves does not read as finished.
  killed = killed_at_call("parti_jax.data.records", "ShardWriter.close", 2,
                          "parti_jax.data.encode", *argv, "--out", out)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  with pytest.raises(records.DataError, match="is not a finished shard set"):
    records.ShardSet.open(out)


def test_an_encode_into_a_bucket_killed_mid_shard_leaves_its_files_to_the_rerun(data, gs_dir):
  argv = ["--data", data / "shapes" / "validation", "--spm", data / "spm.model",
          "--tokenizer", "color", "--resolution", "32", "--text_len", "16", "--batch_size",
          "8", "--shards_per_process", "2", "--out", gs_dir / "tokens"]
  staging = records.staging_dir(gs_dir / "tokens")  # local: a bucket holds whole objects only
  killed = killed_at_call("parti_jax.data.records", "ShardWriter.write", 11,
                          "parti_jax.data.encode", *argv)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  names = [records.shard_name("shapes-validation", j, 2) for j in range(2)]
  assert [records.is_temp_of(p.name, names) for p in staging.iterdir()] == [True, True]

  encode.main(list(map(str, argv)))
  assert records.ShardSet.open(gs_dir / "tokens").meta["count"] == 16
  assert not staging.exists()  # swept, then removed
