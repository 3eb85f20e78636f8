"""Checkpoints of a run: orbax CheckpointManager over the train state and the data iterators.

Layout of a work directory (local or a bucket path; orbax and etils.epath read both):

  WORKDIR/config.json             the resolved config of the first start (parti_jax.runs)
  WORKDIR/checkpoints/STEP/state  model and optimizer state, step, RNG (sharded arrays)
  WORKDIR/checkpoints/STEP/data   every process's grain iterator state (one JSON each)
  WORKDIR/checkpoints/STEP/data_position  the global data position and reading layout

orbax marks a checkpoint finished last (a rename locally, a marker object on a bucket),
so a save cut short is never listed. A listed checkpoint that some process cannot read
after `train.restore_attempts` tries (a truncated file, a lost shard) is reported, moved to
WORKDIR/checkpoints_unreadable/ and the one before it used; all processes agree on that
before anything moves, and at most one is set aside per start. Restoring builds each array with the sharding of the current mesh,
and the data continues from the saved global position when the processes or the batch
size differ, so a run saved on one slice resumes on another.
"""

import os
import time

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath


def absolute(path) -> epath.Path:
  """orbax wants absolute local paths; bucket paths (gs://...) stay as given."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


# How a process read a checkpoint, worst last (the processes act on the worst of theirs).
# DEFECT: a program error while reading (re-raised on every process, never set aside).
EXACT, FROM_POSITION, UNREADABLE, DEFECT = 0, 1, 2, 3


class CheckpointError(RuntimeError):
  """The checkpoints cannot be used or moved; the message names the path."""


class Checkpoints:
  """Saving and restoring (state, data position) in WORKDIR/checkpoints.

  A checkpoint holds three items: `state` (sharded arrays), `data` (grain's iterator
  state, one file per process: exact for the same processes and batch) and
  `data_position` (the global position in the data, from which a run laid out on other
  processes or another batch size continues).
  """

  def __init__(self, workdir, config: ml_collections.ConfigDict):
    t = config.train
    self.directory = epath.Path(workdir) / "checkpoints"
    self._restore_attempts = max(1, t.restore_attempts)
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data", "data_position"),
        options=ocp.CheckpointManagerOptions(
            # Every N steps (orbax's default would also save the first step it sees), and
            # at the step all processes agree on after a preemption notice (SIGTERM), through
            # JAX's preemption service where several processes run.
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy([
                ocp.checkpoint_managers.FixedIntervalPolicy(t.checkpoint_every),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]),
            max_to_keep=t.keep_checkpoints,
            keep_period=t.keep_every or None, enable_async_checkpointing=t.async_checkpoints,
            async_options=ocp.AsyncOptions(timeout_secs=t.checkpoint_timeout_s),
            create=True, cleanup_tmp_directories=True))

  def save(self, step: int, state, loader, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); asynchronous unless configured otherwise."""
    if not (force or self._manager.should_save(step)):
      return False
    # The next position no process has read: where a run on another layout goes on.
    position = _max_over_processes(loader.position)
    return self._manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(loader.iterator),
        data_position=ocp.args.JsonSave(dict(position=position, start=loader.start,
                                             **loader.layout))))

  def reached_preemption(self, step: int) -> bool:
    """True on every process at the step JAX's preemption service agreed on."""
    return self._manager.reached_preemption(step)

  def restore_latest(self, abstract_state, loader, log=print):
    """(state, step) of the newest readable checkpoint, or (None, 0) when there is none.

    `abstract_state` carries the target shardings; the loader is set to go on where the
    checkpoint's run stopped reading. A checkpoint that a process cannot read after
    `train.restore_attempts` tries is set aside, once all processes have heard of it, and
    the one before is used. Only one is set aside per start: when the one before fails as
    well, the cause is rarely two damaged checkpoints (more often memory, the config or the
    storage), so the run stops with an error instead of setting its history aside.
    """
    set_aside = None
    for step in sorted(self._manager.all_steps(), reverse=True):
      state, status, error, saved = None, UNREADABLE, None, None
      for attempt in range(self._restore_attempts):
        try:
          state, exact_data, saved = self._restore(step, abstract_state, loader)
          status = EXACT if exact_data else FROM_POSITION
          break
        except (AttributeError, NameError, ImportError) as e:
          status, error = DEFECT, e  # of the program, not of the checkpoint: raised below
          break
        except Exception as e:  # noqa: BLE001  orbax and tensorstore raise many types
          error = e
          log(f"checkpoint {self.directory / str(step)}: read failed (attempt {attempt + 1} "
              f"of {self._restore_attempts}): {_summary(e)}")
          if attempt + 1 < self._restore_attempts:
            time.sleep(2 ** attempt)
      # One exchange decides for all: every process reaches it, whatever it read.
      worst = _max_over_processes(status)
      if worst == DEFECT:
        if status == DEFECT:
          raise error
        raise CheckpointError(f"reading {self.directory / str(step)} failed on another "
                              "process with a program error (see its log)")
      if worst == FROM_POSITION:
        log(f"checkpoint {step} was saved by {saved['process_count']} process(es) reading "
            f"batches of {saved['global_batch']}; this run reads from global position "
            f"{saved['position']} on with its own layout")
        loader.start_at(saved["position"])
      if worst != UNREADABLE:
        return state, step
      reason = _summary(error) if error else "unreadable on another process"
      if set_aside is not None:
        raise CheckpointError(
            f"{self.directory / str(step)} cannot be restored either ({reason}), after "
            f"{self.directory / str(set_aside)} was set aside: two in a row is more likely "
            "the run's memory, config or storage than two damaged checkpoints, so nothing "
            "more is set aside; fix the cause (the log says what failed) and restart")
      log(f"checkpoint {self.directory / str(step)} cannot be restored ({reason}); moving it "
          f"to {self.directory.parent / 'checkpoints_unreadable'} and trying the one before")
      self._set_aside(step)
      set_aside = step
    return None, 0

  def _restore(self, step: int, abstract_state, loader) -> tuple:
    """(state, whether the loader got this process's exact iterator state, the saved data
    position or None).

    Each item is read by its own handler, not through the manager: the manager's restore
    ends in a barrier of all processes, which a process whose read failed never reaches,
    so the others would wait there instead of agreeing on the failure.
    """
    directory = self.directory / str(step)
    saved = self._data_position(step)
    state = _read(ocp.StandardCheckpointHandler(), directory / "state",
                  ocp.args.StandardRestore(abstract_state))
    if saved is not None and any(saved.get(k) != v for k, v in loader.layout.items()):
      return state, False, saved  # another layout: the global position serves all of them
    if saved is not None and saved.get("start", 0) != loader.start:
      loader.start_at(saved["start"])  # grain's state counts from where that run began
    try:
      _read(grain.checkpoint.CheckpointHandler(), directory / "data",
            grain.checkpoint.CheckpointRestore(loader.iterator))
    except Exception:  # noqa: BLE001
      if saved is None:
        raise
      return state, False, saved  # an iterator state this grain cannot read: model is fine
    return state, True, saved

  def _data_position(self, step: int) -> dict | None:
    """The saved global data position and layout (None for checkpoints made before it)."""
    directory = self.directory / str(step) / "data_position"
    if not directory.exists():
      return None
    return _read(ocp.JsonCheckpointHandler(), directory, ocp.args.JsonRestore())

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step out of orbax's sight; every process learns the outcome.

    Process 0 moves the directory; the others wait for it and raise the same error if
    the move failed, so no process is left waiting in a barrier.
    """
    error = ""
    if jax.process_index() == 0:
      source = self.directory / str(step)
      target = self.directory.parent / "checkpoints_unreadable" / str(step)
      try:
        move_tree(source, target)
      except Exception as e:  # noqa: BLE001  local and bucket file systems differ in types
        error = f"cannot move {source} to {target}: {_summary(e)}"
    error = _from_process_0(error)
    if error:
      raise CheckpointError(error + "; move or delete that step by hand, then restart")
    self._manager.reload()

  @property
  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _read(handler, directory: epath.Path, args):
  """One checkpoint item through its orbax handler, which is closed after."""
  try:
    return handler.restore(directory, args=args)
  finally:
    handler.close()


def move_tree(source: epath.Path, target: epath.Path) -> None:
  """Moves a directory; on buckets, where nothing renames a prefix, object by object.

  A copy that stops half-way leaves `source` whole (it is deleted last). An older step of
  the same number already set aside is kept: the new one gets a time suffix.
  """
  if target.exists():
    target = target.parent / f"{target.name}.{time.strftime('%Y%m%dT%H%M%S')}"
  target.parent.mkdir(parents=True, exist_ok=True)
  if "://" not in str(source):
    source.rename(target)
    return
  _copy_tree(source, target)
  source.rmtree()


def _copy_tree(source: epath.Path, target: epath.Path) -> None:
  # iterdir, not walk: on gs:// paths epath's walk yields roots without the scheme.
  target.mkdir(parents=True, exist_ok=True)
  for child in source.iterdir():
    if child.is_dir():
      _copy_tree(child, target / child.name)
    else:
      child.copy(target / child.name, overwrite=True)


def finished_steps(directory) -> list[int]:
  """The steps orbax counts as finished in a checkpoints directory, ascending.

  On a bucket orbax writes a step in place and marks it finished last, so a directory
  listing would also return a step still being written (or cut short).
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return []
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
      read_only=True, create=False))
  try:
    return sorted(manager.all_steps())
  finally:
    manager.close()


def load_params(step_dir, abstract_params, groups=()):
  """The parameters saved in a checkpoint's STEP directory (`parti_jax.runs` finds it).

  Only the parameters are read (orbax partial restore), with the shardings of
  `abstract_params`, so a run can start from one with another optimizer or mesh. With
  `groups`, only those top-level groups are read (e.g. a tokenizer's encoder and codebook
  for a run whose decoder has another size).
  """
  path = absolute(step_dir)
  if groups:
    abstract_params = {g: abstract_params[g] for g in groups}
  target = {"params": abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      path / "state", args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  return restored["params"]


def _summary(error: Exception) -> str:
  return f"{type(error).__name__}: {str(error).strip().splitlines()[0][:300] if str(error) else ''}"


def _max_over_processes(value: int) -> int:
  """The largest of every process's non-negative `value` (below 2^62), on every process."""
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils
  # Device arrays are 32-bit unless x64 is on: a position past 2^31 travels as two halves.
  halves = np.array([value >> 31, value & (2 ** 31 - 1)], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(halves)).astype(np.int64)
  return int(max((high << 31) + low for high, low in gathered.reshape(-1, 2)))


def _from_process_0(text: str, size: int = 2048) -> str:
  """Process 0's `text` on every process (also a barrier)."""
  if jax.process_count() == 1:
    return text
  from jax.experimental import multihost_utils
  data = np.zeros(size, np.uint8)
  encoded = text.encode()[:size]
  data[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  data = np.asarray(multihost_utils.broadcast_one_to_all(data))
  return bytes(data[data != 0]).decode(errors="replace")
