"""Run directories: the one place that reads and writes them, for every task.

  RUN/config.json        the resolved config of the first start (`write_config`)
  RUN/checkpoints/STEP/  orbax checkpoints (parti_jax.checkpoints writes them)
  RUN/checkpoints_best/STEP/  the parameters of the best evaluation (`train.keep_best`)

A checkpoint is named by a step: an integer, `best`, or none for the latest (`parse_step`;
`RUN@STEP` in `--config.init_from`). This module is the one place that resolves them.

`load(RUN)` gives any task's model and parameters for inference on any mesh, with the
config held to what the model needs (no batch size, optimizer or loss weights are checked).
Run directories may be in buckets (gs://...).
"""

import dataclasses
import json

import jax
import ml_collections
from etils import epath

from parti_jax import checkpoints, keep_best, sharding, tasks
from parti_jax import config as config_lib
from parti_jax.data import records

# Fields whose change alters the shapes or structure of the saved state: a restart with a
# different value cannot restore its checkpoints and is refused.
SHAPE_FIELDS = (
    "task", "model.text_vocab_size", "model.text_len", "model.image_grid", "model.codebook_size",
    "model.d_model", "model.num_heads", "model.head_dim", "model.mlp_dim",
    "model.encoder_layers", "model.decoder_layers", "model.share_image_embedding",
    "optimizer.name", "optimizer.momentum_dtype", "optimizer.momentum_block",
    "train.prng_impl",  # the state's key: another implementation cannot restore it
    # the image tokenizer's
    "model.resolution", "model.patch_size", "model.code_dim", "model.logit_laplace",
    "model.encoder", "model.decoder",
    # the reranker's towers and the upsampler's network
    "model.text", "model.image", "model.embed_dim",
    "model.scale", "model.channels", "model.blocks", "model.expansion", "model.crop",
    "model.discriminator",
)


class RunError(ValueError):
  """A run directory cannot be used; the message names it and says why."""


MAX_CONFIG_BYTES = 16 << 20  # a resolved config is a few kilobytes


def read_config(workdir) -> ml_collections.ConfigDict:
  """RUN/config.json as a ConfigDict (with the tuples JSON turned into lists restored).

  The file is data, parsed as JSON and never run (docs/trust.md); one over MAX_CONFIG_BYTES
  is refused unread.
  """
  path = epath.Path(workdir) / "config.json"
  try:
    return read_config_file(path, "a run's config.json")
  except FileNotFoundError:
    raise RunError(f"{workdir}: no config.json; not a training run directory") from None


def read_config_file(path, what: str) -> ml_collections.ConfigDict:
  """A resolved config saved as JSON (a run's, a model folder's), parsed as data.

  FileNotFoundError when it is missing; RunError naming it when it is no config."""
  path = epath.Path(path)
  try:
    text = records.read_limited(path, MAX_CONFIG_BYTES, what).decode("utf-8")
  except records.DataError as e:  # too large, or a bucket that cannot be reached
    raise RunError(str(e)) from None
  except UnicodeDecodeError as e:
    raise RunError(f"{path} is not a config (not UTF-8 text: {e})") from None
  try:
    config = ml_collections.ConfigDict(json.loads(text))
    config.sharding_rules = tuple(tuple(rule) for rule in config.get("sharding_rules", ()))
  except (ValueError, TypeError, AttributeError, RecursionError) as e:
    raise RunError(f"{path} is not a config ({type(e).__name__}: {str(e)[:200]})") from None
  return config


def write_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Saves the config at the first start; refuses a restart that changes a shape field."""
  path = epath.Path(workdir) / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = read_config_file(path, "a run's config.json").to_dict()
    changed = [f"{f}: {_lookup(saved, f)!r} in {path}, now {_lookup(current, f)!r}"
               for f in SHAPE_FIELDS if _lookup(saved, f) != _lookup(current, f)]
    if changed:
      raise config_lib.ConfigError(
          "the config changes fields that the checkpoints' shapes depend on:\n  "
          + "\n  ".join(changed)
          + "\nuse a new --workdir, or --config.init_from to start from this run")
    return
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or not at all: a half-written one (a full disk) would stop every restart.
    records.atomic_write_text(path, json.dumps(current, indent=1, sort_keys=True) + "\n")


def _lookup(config_dict: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(config_dict, dict) or part not in config_dict:
      return None
    config_dict = config_dict[part]
  return config_dict


def checkpoint_steps(workdir) -> list[int]:
  """The run's finished checkpoint steps, ascending (never a step still being written)."""
  return checkpoints.finished_steps(checkpoints.absolute(workdir) / "checkpoints")


BEST = "best"  # the step name of the best checkpoint


def parse_step(text, what: str = "--step") -> int | str | None:
  """A step as a user writes it: "" or None (the latest), an integer, or "best"."""
  if text is None or str(text).strip() == "":
    return None
  text = str(text).strip()
  if text == BEST:
    return BEST
  try:
    step = int(text)
  except ValueError:
    raise RunError(f"{what}={text!r} is not a step: give a number or {BEST!r}") from None
  if step < 0:
    raise RunError(f"{what}={step} is not a step: steps are not negative")
  return step


def best_dir(workdir) -> tuple[epath.Path, int]:
  """The best checkpoint's directory (`train.keep_best`) and its step."""
  directory = checkpoints.absolute(workdir) / keep_best.DIRECTORY
  step = keep_best.best_step(directory, read_config(workdir))
  if step is None:
    raise RunError(f"{workdir} has no best checkpoint (nothing in {directory}): it trained "
                   "without train.keep_best=True, or before its first evaluation")
  return directory / str(step), step


def checkpoint_dir(workdir, step: int | str | None = None) -> tuple[epath.Path, int]:
  """The directory of checkpoint `step` (default: the latest; `best`: the best evaluation's)
  and its step."""
  if step == BEST:
    return best_dir(workdir)
  directory = checkpoints.absolute(workdir) / "checkpoints"
  steps = checkpoints.finished_steps(directory)
  if not steps:
    raise RunError(f"{workdir} has no checkpoint (nothing in {directory}); train it first")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise RunError(f"{workdir} has no checkpoint at step {step}; it has steps {steps}")
  return directory / str(step), step


def resolve_checkpoint(path) -> epath.Path:
  """A run directory's latest checkpoint, RUN@STEP (a number or `best`), or a checkpoint's
  STEP directory as given (what `--config.init_from` names)."""
  run, at, step = str(path).rpartition("@")
  if at and run and not checkpoints.absolute(path).exists():
    if not (checkpoints.absolute(run) / "config.json").exists():
      raise RunError(f"init_from={path}: {run} is not a run directory (no config.json)")
    return checkpoint_dir(run, parse_step(step, f"init_from={path}: the step"))[0]
  path = checkpoints.absolute(path)
  if (path / "checkpoints").exists():
    steps = checkpoints.finished_steps(path / "checkpoints")
    if not steps:
      raise RunError(f"init_from={path}: no checkpoints in {path / 'checkpoints'}")
    return path / "checkpoints" / str(steps[-1])
  if not (path / "state").exists():
    raise RunError(f"init_from={path}: not a run directory or a checkpoint step directory "
                   "(no state/ inside)")
  return path


def load_init_params(init_from, abstract_params, groups=()) -> dict:
  """The parameters `--config.init_from` names, with the shardings of `abstract_params`:
  of a run (RUN, RUN@STEP, a STEP directory) or of a model folder (parti_jax.model_folder).
  `groups`: only these top-level groups."""
  from parti_jax import model_folder  # it reads runs through this module
  if model_folder.is_model_folder(init_from):
    return model_folder.load_init_params(init_from, abstract_params, groups)
  return checkpoints.load_params(resolve_checkpoint(init_from), abstract_params, groups)


def inference_setup(config: ml_collections.ConfigDict, where: str, mesh=None,
                    mesh_axes: dict | None = None, devices=None):
  """The config's task Setup for inference on `mesh`, or on a mesh of `devices` (default:
  all) shaped by `mesh_axes` (default: every device on fsdp). `where` names the config's
  origin in errors. The config's mesh is updated to the one used."""
  try:
    if mesh is None:
      config.mesh.update(mesh_axes or dict(data=1, fsdp=-1, tensor=1))
      mesh = sharding.make_mesh(config, devices, training=False)
    else:
      config.mesh.update(dict(zip(config_lib.MESH_AXES, mesh.devices.shape)))
      config_lib.check(config, mesh.size, training=False)
    return tasks.of(config).Setup(config, mesh, training=False)
  except config_lib.ConfigError as e:
    raise RunError(f"{where}: {e}") from None


@dataclasses.dataclass
class Run:
  """A run opened for inference at one checkpoint: `setup.model(load_params())` is the
  network. Opening checks everything but reads no parameters, so that a caller can check
  its own inputs before the slow part."""
  workdir: str
  step: int
  path: epath.Path  # the checkpoint's directory
  config: ml_collections.ConfigDict
  setup: object  # the task's Setup, built with training=False

  def load_params(self) -> dict:
    return checkpoints.load_params(self.path, self.setup.sharded_abstract_params())


def prepare(workdir, step: int | str | None = None, task: str | None = None, mesh=None,
            mesh_axes: dict | None = None, devices=None) -> Run:
  """Opens the run at `step` (default: the latest; `best`: the best evaluation's) for
  inference on `mesh`, or on a mesh of `devices` (default: all) shaped by `mesh_axes`
  (default: every device on fsdp), whatever mesh the run trained on. `task`: refuse a run
  of another task."""
  workdir = str(workdir)
  config = read_config(workdir)
  name = config.get("task", "parti")
  if task and name != task:
    raise RunError(f"{workdir} trained {name!r}, not {task!r}")
  path, step = checkpoint_dir(workdir, step)
  setup = inference_setup(config, workdir, mesh, mesh_axes, devices)
  return Run(workdir, step, path, config, setup)


def load(workdir, step: int | str | None = None, task: str | None = None, mesh=None,
         mesh_axes: dict | None = None, devices=None) -> tuple[Run, dict]:
  """`prepare`, then the parameters: (run, params)."""
  run = prepare(workdir, step, task, mesh, mesh_axes, devices)
  return run, run.load_params()
