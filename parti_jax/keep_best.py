"""The best checkpoint of a run, and a note when evaluations keep getting worse.

With `train.keep_best`, every evaluation offers the parameters to a second orbax
CheckpointManager over WORKDIR/checkpoints_best, whose `best_fn` ranks checkpoints by
`train.best_metric` (`train.best_mode` "min" or "max") and whose `max_to_keep=1` deletes
all but the best. It is separate from WORKDIR/checkpoints, so resuming (always from the
newest checkpoint there) is untouched, and it holds the parameters only: what sampling,
export and `--config.init_from=RUN@best` read (`parti_jax.runs` resolves `best`).

Small datasets overfit: `Trend` says so when the metric has got worse at
`train.worse_evals_note` evaluations in a row.
"""

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from parti_jax import config as config_lib

DIRECTORY = "checkpoints_best"  # under the work directory


def manager_options(config: ml_collections.ConfigDict, read_only: bool = False):
  """orbax's options that rank by the config's metric and keep the best one."""
  t = config.train
  metric, mode = t.get("best_metric", "eval/loss"), t.get("best_mode", "min")
  return ocp.CheckpointManagerOptions(
      best_fn=lambda metrics: metrics[metric], best_mode=mode, max_to_keep=1,
      keep_checkpoints_without_metrics=False, read_only=read_only, create=not read_only,
      enable_async_checkpointing=t.get("async_checkpoints", True) and not read_only,
      cleanup_tmp_directories=not read_only)


def best_step(directory, config: ml_collections.ConfigDict) -> int | None:
  """The best finished step in a checkpoints_best directory (None: none there).

  Ranked by orbax with the run's own metric: normally one step is left, but a run cut
  short between saving a step and deleting the worse one leaves two.
  """
  directory = epath.Path(directory)
  if not directory.exists():
    return None
  manager = ocp.CheckpointManager(directory, options=manager_options(config, read_only=True))
  try:
    return manager.best_step()
  finally:
    manager.close()


class BestCheckpoint:
  """WORKDIR/checkpoints_best/STEP/state: the parameters at the best evaluation so far."""

  def __init__(self, workdir, config: ml_collections.ConfigDict):
    self.metric = config.train.best_metric
    self.directory = epath.Path(workdir) / DIRECTORY
    self._manager = ocp.CheckpointManager(self.directory, item_names=("state",),
                                          options=manager_options(config))

  def offer(self, step: int, params, metrics: dict) -> None:
    """Saves the parameters with their metric; orbax keeps whichever is best.

    A step already there is skipped: a restart from before it evaluates the same
    parameters again (resuming is exact).
    """
    if self.metric not in metrics:
      raise config_lib.ConfigError(
          f"train.best_metric={self.metric!r} is not among the evaluation's metrics "
          f"{sorted(k for k in metrics if k.startswith('eval/'))}")
    if step in self._manager.all_steps():
      return
    self._manager.save(step, force=True, metrics={self.metric: float(metrics[self.metric])},
                       args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})))

  @property
  def best_step(self) -> int | None:
    return self._manager.best_step()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


class Trend:
  """Counts evaluations in a row at which the metric got worse than at the one before."""

  def __init__(self, metric: str, mode: str, note_after: int, history=()):
    self.metric, self._sign, self.note_after = metric, 1 if mode == "min" else -1, note_after
    self._values = []  # (step, value) of the current streak and the evaluation before it
    for step, value in history:
      self.add(step, value)

  def add(self, step: int, value: float) -> str | None:
    """Records an evaluation; returns a note once `note_after` worse ones come in a row."""
    value = float(value)
    if self._values and not self._sign * (value - self._values[-1][1]) > 0:
      self._values = []  # not worse: a new streak may start from here
    if not np.isfinite(value):
      self._values = []
      return None
    self._values.append((step, value))
    worse = len(self._values) - 1
    if not self.note_after or worse < self.note_after:
      return None
    word = "risen" if self._sign == 1 else "fallen"
    trail = " -> ".join(f"{v:.4g} (step {s})" for s, v in self._values)
    return (f"note: {self.metric} has {word} at {worse} evaluation{'s' * (worse > 1)} in a "
            f"row: {trail}; the model may be overfitting its data")


class AtEvaluation:
  """What the trainer does with each evaluation's metrics: offers the parameters to the
  best checkpoint (with `train.keep_best`) and notes a worsening trend.

  `rows`: the run's metrics history (`metrics.read`), whose evaluations up to `start_step`
  continue the trend across a restart.
  """

  def __init__(self, workdir, config: ml_collections.ConfigDict, start_step: int,
               rows: list[dict], log=print):
    t = config.train
    self.best = BestCheckpoint(workdir, config) if t.get("keep_best") else None
    metric = t.get("best_metric", "eval/loss")
    self.trend = Trend(metric, t.get("best_mode", "min"), t.get("worse_evals_note", 3),
                       [(r["step"], r[metric]) for r in rows
                        if metric in r and r["step"] <= start_step])
    self._log = log

  def __call__(self, step: int, params, metrics: dict) -> None:
    if self.best is not None:
      self.best.offer(step, params, metrics)
    if self.trend.metric not in metrics:
      return
    note = self.trend.add(step, metrics[self.trend.metric])
    if note:
      where = (f"the best so far is kept in {self.best.directory}/{self.best.best_step}"
               if self.best is not None else
               "train.keep_best=True keeps the checkpoint of the best evaluation")
      self._log(f"{note}; {where}")

  def close(self) -> None:
    if self.best is not None:
      self.best.close()
