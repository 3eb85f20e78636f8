"""The tasks the trainer knows, by the name a config gives in `config.task`.

Each task module has a `Setup` (its model and batch shapes on the model-agnostic
`base.Setup`), `config_problems(config, mesh_sizes, training)` (what `config.check`
refuses), `train_step_flops(config)`, `tokens_per_example(config)` and
`build(config, mesh) -> base.Task`, which the trainer, `inspect`, `aot`, the benchmarks
and the run loader (`parti_jax.runs`) use. A new task is one module here, its network
under `parti_jax/models/`, a config, and a line in TASKS (docs/architecture.md).
"""

import importlib
import types

import ml_collections

from parti_jax.config import ConfigError

# A task's module is imported when a config names it, so that a run of one task does not
# import the others' networks. Values are module paths or, in tests, modules.
TASKS = {
    "parti": "parti_jax.tasks.parti",
    "vitvqgan": "parti_jax.tasks.vitvqgan",
    "contrastive": "parti_jax.tasks.contrastive",  # the reranker's dual encoder
    "superres": "parti_jax.tasks.superres",  # the super-resolution upsampler
}


class UnknownTask(ConfigError):
  """`config.task` names no task here."""


def get(name: str) -> types.ModuleType:
  if name not in TASKS:
    raise UnknownTask(f"task={name!r} is not one of {sorted(TASKS)}")
  module = TASKS[name]
  return importlib.import_module(module) if isinstance(module, str) else module


def of(config: ml_collections.ConfigDict) -> types.ModuleType:
  """The task module of a config (configs made before `task` existed are Parti's)."""
  return get(config.get("task", "parti"))


def build(config: ml_collections.ConfigDict, mesh):
  """The trainer's view of the config's task on `mesh` (a `base.Task`)."""
  return of(config).build(config, mesh)
