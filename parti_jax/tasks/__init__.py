"""The tasks the trainer knows, by the name a config gives in `config.task`.

Each task module has a `Setup` (its model and batch shapes on the model-agnostic
`base.Setup`), `config_problems(config, mesh_sizes, training)` (what `config.check`
refuses), `train_step_flops(config)`, `tokens_per_example(config)` and
`build(config, mesh) -> base.Task`, which the trainer, `inspect`, `aot`, the benchmarks
and the run loader (`parti_jax.runs`) use. A new task is one module here, its network
under `parti_jax/models/`, a config, and a line in TASKS (docs/architecture.md).
"""

import types

import ml_collections

from parti_jax.config import ConfigError
from parti_jax.tasks import parti, vitvqgan

TASKS = {"parti": parti, "vitvqgan": vitvqgan}


class UnknownTask(ConfigError):
  """`config.task` names no task here."""


def get(name: str) -> types.ModuleType:
  if name not in TASKS:
    raise UnknownTask(f"task={name!r} is not one of {sorted(TASKS)}")
  return TASKS[name]


def of(config: ml_collections.ConfigDict) -> types.ModuleType:
  """The task module of a config (configs made before `task` existed are Parti's)."""
  return get(config.get("task", "parti"))


def build(config: ml_collections.ConfigDict, mesh):
  """The trainer's view of the config's task on `mesh` (a `base.Task`)."""
  return of(config).build(config, mesh)
