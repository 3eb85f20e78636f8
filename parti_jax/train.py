"""The trainer.

  python -m parti_jax.train --config configs/NAME.py --workdir DIR [--config.FIELD=VALUE ...]

Starting in a work directory that holds checkpoints resumes from the newest readable one
(model, optimizer, step, RNG and every process's data iterator), so an interrupted run
continues exactly as if it had not stopped. The first start saves the resolved config
as DIR/config.json; a restart that changes a field the checkpoints' shapes depend on is
refused. `--config.init_from=RUN_DIR` starts from another run's parameters.

SIGTERM (a TPU preemption) or Ctrl-C: the step in flight finishes, a checkpoint is
written and the process exits with status 75 (EX_TEMPFAIL: "stopped, start me again").
On one process, one that arrives before the first step stops the run without a step; one
during the last checkpoint's save waits for it to finish.
With several processes, SIGTERM to any one reaches all through JAX's preemption service,
and they save the same step. A restart on another number of processes or another global
batch size goes on from the saved global data position.
One run writes a work directory: process 0 holds DIR/lock.json while it trains, and a
second start on it is refused naming the holder; a lock whose run is gone is taken over,
and --force takes any (parti_jax.workdir_lock).
An update whose gradients are not finite is skipped and counted; `train.nan_policy="halt"`
stops at the first one instead, and `train.max_consecutive_skips` in a row stop the run.

Process 0 writes DIR/metrics/ (read with `metrics.read`) and TensorBoard event files under
DIR/tensorboard:
loss, accuracy, learning rate, gradient norm, step time, image tokens/s, TFLOP/s per
device and MFU (as benchmarks/train_throughput.py computes them), records skipped since
the last write (`skipped_records/REASON`), skipped updates (in the window and in total),
data-wait time, and evaluation loss and accuracy on `data.eval`.
"""

import contextlib
import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P

from parti_jax import checkpoints, cli, disk_full, distributed, flops, runs, sharding, tasks
from parti_jax import keep_best, workdir_lock
from parti_jax import config as config_lib
from parti_jax import metrics as metrics_lib
from parti_jax.data import pipeline, records
from parti_jax.tasks.base import Task

PREEMPTED_EXIT_CODE = os.EX_TEMPFAIL  # 75
MULTI_PROCESS_STOP_CHECK = 10


class Preempted(Exception):
  """Stopped by SIGTERM or Ctrl-C after saving a checkpoint."""


class TrainingError(RuntimeError):
  """The run cannot go on (non-finite updates); the message says why and where."""


class StopRequest:
  """Turns a stop signal into a request the loop honours between steps.

  One process: SIGTERM and the first Ctrl-C. Several processes: SIGTERM is left to JAX's
  preemption service (a Python handler would replace its own), which makes every process
  save at the same step (orbax's `reached_preemption`); Ctrl-C is agreed on every
  MULTI_PROCESS_STOP_CHECK steps, since agreeing is a collective that waits for the device.
  """

  def __init__(self, checkpoints_):
    self.requested = False
    self._checkpoints = checkpoints_
    self._previous = {}

  def __enter__(self):
    signals = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C stops at once
    self.requested = True

  def __exit__(self, *_):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, step: int) -> bool:
    """True on every process once the run should stop (they stop together)."""
    if jax.process_count() == 1:
      return self.requested
    if self._checkpoints.reached_preemption(step):
      return True
    if step % MULTI_PROCESS_STOP_CHECK:
      return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())


def use_compilation_cache(setting: str, workdir) -> None:
  """JAX's persistent compilation cache (`train.compilation_cache`), unless the
  environment already chose one (JAX_COMPILATION_CACHE_DIR): a restart, on every host,
  loads the compiled step instead of compiling it again."""
  if setting == "off" or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  directory = setting or str(epath.Path(workdir) / "compilation_cache")
  jax.config.update("jax_compilation_cache_dir", directory)
  # The train step is what matters; tiny helper programs are not worth a file each.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def peak_tflops_per_device() -> tuple[float, str]:
  device = jax.devices()[0]
  spec = flops.spec_peak_tflops(device.device_kind)
  if spec:
    return spec
  # A CPU (or an accelerator without a known spec): measure a float32 matrix product once,
  # shared by the host's simulated devices.
  return (flops.cpu_matmul_peak_tflops(n=1024, reps=10) / jax.local_device_count(),
          "measured float32 matmul")


def evaluate(config, task: Task, params, writer=None, step: int = 0,
             source: pipeline.Source | None = None) -> dict:
  """The task's metrics over the whole of `data.eval` (padding rows masked out), and its
  picture of the first batch (PNG in WORKDIR/pictures/ and a TensorBoard image).
  `source`: the eval set, opened once for every evaluation of a run."""
  batch_size = config.train.eval_batch_size or config.global_batch_size
  results = []
  for i, b in enumerate(pipeline.eval_batches(config, task.setup.mesh, batch_size, source)):
    results.append(task.eval_step(params, {k: b[k] for k in (*task.inputs, "mask")}))
    if i == 0 and task.picture is not None and writer is not None:
      writer.picture(step, "eval/picture", task.picture(params, b))
  results = jax.device_get(results)
  weight = sum(float(r["weight"]) for r in results)
  return {f"eval/{k}": sum(float(r[k]) * float(r["weight"]) for r in results) / max(weight, 1)
          for k in results[0] if k != "weight"} | {"eval/examples": weight}


def train(config: ml_collections.ConfigDict, workdir, devices=None,
          stop_after_step: int | None = None) -> dict:
  """Trains to `config.num_train_steps` (or `stop_after_step`, to test interruptions).

  Returns the last metrics written. Raises Preempted after saving on SIGTERM/Ctrl-C.
  """
  devices = devices or jax.devices()
  workdir = checkpoints.absolute(workdir)
  mesh = sharding.make_mesh(config, devices)  # checks the config against the devices
  if config.optimizer.get("frozen") and not config.init_from:
    raise config_lib.ConfigError(
        f"optimizer.frozen={tuple(config.optimizer.frozen)} without init_from: the frozen "
        "groups would keep their random initial values")
  t = config.train
  if config.data.eval:  # before anything is compiled, not at the first evaluation
    pipeline.check(config, train=False)
  # Whatever ends the run, what was opened is closed in reverse order; the last checkpoint's
  # wait comes before the stop handler is given back, so a SIGTERM then cannot cut a save.
  with contextlib.ExitStack() as cleanup:
    loader = pipeline.Loader(config, mesh, train=True)  # checks the data config
    cleanup.callback(loader.close)
    use_compilation_cache(t.compilation_cache, workdir)
    task = tasks.build(config, mesh)
    runs.write_config(workdir, config)
    ckpt = checkpoints.Checkpoints(workdir, config)
    cleanup.callback(ckpt.close)
    total = config.num_train_steps
    writer = metrics_lib.Writer(workdir, total)
    cleanup.callback(writer.close)
    stop = cleanup.enter_context(StopRequest(ckpt))
    cleanup.callback(ckpt.wait)
    abstract_state = task.setup.abstract_state()
    state, start = ckpt.restore_latest(abstract_state, loader, writer.log)
    if state is None:
      state = task.setup.init_state()
      if config.init_from:
        groups = tuple(config.get("init_from_groups", ()))
        loaded = runs.load_init_params(config.init_from, abstract_state.params, groups)
        state = state.replace(params={**state.params, **loaded})
        writer.log(f"parameters {', '.join(groups) or 'all'} from {config.init_from}")
    else:
      writer.log(f"resumed from {ckpt.directory / str(start)}")
    writer.progress(start)

    start_time = time.perf_counter()
    train_step = task.train_step.lower(abstract_state, task.setup.abstract_batch()).compile()
    writer.log(f"train step compiled in {time.perf_counter() - start_time:.1f} s")
    peak, peak_source = peak_tflops_per_device()
    replicated = NamedSharding(mesh, P())
    count_skipped = jax.jit(lambda s: s.sum(0), out_shardings=replicated)
    skipped_records = jnp.zeros(len(records.SKIP_REASONS), jnp.int32)
    if jax.process_count() == 1 and stop.requested:  # no step taken: nothing new to save
      writer.log(f"stopped before step {start + 1}; the newest checkpoint stays as it was")
      raise Preempted(start)
    distributed.barrier("compiled")  # the first step's collectives start together
    window, window_start, wait_start = [], time.perf_counter(), loader.data_wait_s
    saved = start
    profiler = Profiler(t.profile_steps, workdir)
    cleanup.callback(profiler.stop)
    last, eval_source = {}, None
    if config.data.eval:  # the best checkpoint (train.keep_best) and the trend of evaluations
      at_evaluation = keep_best.AtEvaluation(workdir, config, start,
                                             metrics_lib.read(workdir), writer.log)
      cleanup.callback(at_evaluation.close)
    for step in range(start, total):
      profiler.before(step)
      batch = next(loader)
      state, step_metrics = train_step(state, {k: batch[k] for k in task.inputs})
      profiler.after(step, step_metrics)
      skipped_records = skipped_records + count_skipped(batch["skipped"])
      window.append(step_metrics)
      done = step + 1
      writer.progress(done)
      if done % t.log_every == 0 or done == total or done == stop_after_step:
        # Steps are dispatched ahead of the device: time the window to its last step's end.
        jax.block_until_ready(step_metrics)
        elapsed = time.perf_counter() - window_start
        last = _report(config, task, writer, done, window, elapsed,
                       loader.data_wait_s - wait_start, skipped_records, state, peak)
        window, skipped_records = [], jnp.zeros_like(skipped_records)
      if config.data.eval and ((t.eval_every and done % t.eval_every == 0) or done == total):
        eval_source = eval_source or pipeline.Source(config.data.eval, config.data)
        last |= evaluate(config, task, state.params, writer, done, eval_source)
        writer.scalars(done, {k: v for k, v in last.items() if k.startswith("eval/")})
        at_evaluation(done, state.params, last)
      if ckpt.save(done, state, loader, force=done == total):
        saved = done
      if not window:  # a report was made: time the next window from here
        window_start, wait_start = time.perf_counter(), loader.data_wait_s
      if done == stop_after_step:
        break
      if stop.agreed(done):
        if saved != done:
          ckpt.save(done, state, loader, force=True)
        ckpt.wait()
        writer.log(f"stopped at step {done}; checkpoint saved in {ckpt.directory / str(done)}")
        raise Preempted(done)
  last["peak_tflops_source"] = peak_source
  return last


def _report(config, task: Task, writer, step, window, elapsed, data_wait, skipped_records,
            state, peak) -> dict:
  window = jax.device_get(window)
  skipped = [int(m["update_skipped"]) for m in window]
  t = config.train
  if any(skipped) and t.nan_policy == "halt":
    first = step - len(window) + skipped.index(1)
    raise TrainingError(f"step {first}: loss or gradients are not finite "
                        "(train.nan_policy='halt'); the last checkpoint holds no NaN")
  streak = max(int(m["consecutive_skips"]) for m in window)
  if streak >= t.max_consecutive_skips:
    raise TrainingError(f"{streak} updates in a row skipped for non-finite loss or gradients, "
                        f"up to step {step} (train.max_consecutive_skips="
                        f"{t.max_consecutive_skips}): check the data and the learning rate")
  finite = [m for m, s in zip(window, skipped) if not s] or window
  step_time = elapsed / len(window)
  tflops = task.step_flops / step_time / jax.device_count() / 1e12
  # Every per-step metric of the task is averaged over the window's finite steps.
  special = ("learning_rate", "update_skipped", "consecutive_skips")
  values = {k: np.mean([m[k] for m in finite]) for k in window[0] if k not in special}
  values |= dict(
      learning_rate=window[-1]["learning_rate"], step_time_s=step_time,
      image_tokens_per_s=config.global_batch_size * task.tokens_per_example / step_time,
      tflops_per_device=tflops, mfu=tflops / peak, data_wait_s=data_wait / len(window),
      skipped_updates=sum(skipped),
      skipped_updates_total=int(jax.device_get(state.opt_state.total_notfinite)))
  counts = jax.device_get(skipped_records)
  values |= {f"skipped_records/{r}": int(c) for r, c in zip(records.SKIP_REASONS, counts)}
  writer.scalars(step, values)
  writer.progress(step, loss=values["loss"])
  return values


class Profiler:
  """A jax.profiler trace of steps first..last (`train.profile_steps`) in WORKDIR/profile."""

  def __init__(self, profile_steps, workdir):
    self._steps = tuple(profile_steps) if len(profile_steps) == 2 else None
    self._directory = str(epath.Path(workdir) / "profile")
    self._active = False

  def before(self, step: int) -> None:
    if self._steps and step == self._steps[0]:
      jax.profiler.start_trace(self._directory)
      self._active = True

  def after(self, step: int, outputs) -> None:
    if self._active and step == self._steps[1]:
      self.stop(outputs)

  def stop(self, outputs=None) -> None:
    if self._active:
      jax.block_until_ready(outputs)  # the traced steps' device work included
      jax.profiler.stop_trace()
      self._active = False


FLAGS = cli.Flags(__doc__)
FLAGS.config()
FLAGS.string("workdir", None, "Work directory: checkpoints, metrics, config.")
FLAGS.bool("verbose", False, "Log at INFO (orbax logs every save there).")
FLAGS.bool("force", False, "Train even if WORKDIR/lock.json says another live run uses the "
           "work directory (parti_jax.workdir_lock).")


def main(argv=None):
  a = FLAGS.parse(argv)
  logging.set_verbosity(logging.INFO if a.verbose else logging.WARNING)
  try:
    distributed.initialize()
  except distributed.DistributedError as e:
    sys.exit(f"error: {e}")
  config, workdir = a.config, a.workdir
  if config is None or not workdir:
    sys.exit("error: --config and --workdir are required")
  try:  # one writer per work directory, before anything is written there
    lock = workdir_lock.acquire_for_run(checkpoints.absolute(workdir), force=a.force)
  except workdir_lock.LockError as e:
    sys.exit(f"error: {e}")
  try:
    summary = train(config, workdir)
  except (config_lib.ConfigError, records.DataError, TrainingError,
          checkpoints.CheckpointError, runs.RunError) as e:
    sys.exit(f"error: {e}")
  except Preempted:
    sys.exit(PREEMPTED_EXIT_CODE)
  except Exception as e:  # noqa: BLE001  a full disk is said plainly; the rest is raised
    message = disk_full.message(e, workdir)
    if message is None:
      raise
    sys.exit(f"error: {message}")
  finally:
    lock.release()
  if jax.process_index() == 0:
    shown = {k: round(float(v), 4) for k, v in summary.items()
             if k in ("loss", "accuracy", "eval/loss", "eval/accuracy")}
    print(f"done: {config.num_train_steps} steps; {shown}")


if __name__ == "__main__":
  cli.run(main)
