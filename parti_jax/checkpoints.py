"""Checkpoints of a run: orbax CheckpointManager over the train state and the data iterators.

Layout of a work directory (local or a bucket path; orbax and etils.epath read both):

  WORKDIR/config.json             the resolved config of the first start
  WORKDIR/checkpoints/STEP/state  model and optimizer state, step, RNG (sharded arrays)
  WORKDIR/checkpoints/STEP/data   every process's grain iterator state (one JSON each)

orbax writes a checkpoint under a temporary name and renames it when complete, so a save
cut short is never listed. A listed checkpoint that cannot be read (a truncated file, a
lost shard) is reported, moved to WORKDIR/checkpoints_unreadable/ and the one before it
used. Restoring builds each array with the sharding of the current mesh, so a run saved on
one mesh or device count resumes on another.
"""

import json
import os

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath

from parti_jax.config import ConfigError

# Fields whose change alters the shapes or structure of the saved state: a restart with a
# different value cannot restore its checkpoints and is refused.
SHAPE_FIELDS = (
    "task", "model.text_vocab_size", "model.text_len", "model.image_grid", "model.codebook_size",
    "model.d_model", "model.num_heads", "model.head_dim", "model.mlp_dim",
    "model.encoder_layers", "model.decoder_layers", "model.share_image_embedding",
    "optimizer.name", "optimizer.momentum_dtype",
    # the image tokenizer's
    "model.resolution", "model.patch_size", "model.code_dim", "model.logit_laplace",
    "model.encoder", "model.decoder",
)


def _lookup(config_dict: dict, dotted: str):
  for part in dotted.split("."):
    if not isinstance(config_dict, dict) or part not in config_dict:
      return None
    config_dict = config_dict[part]
  return config_dict


def absolute(path) -> epath.Path:
  """orbax wants absolute local paths; bucket paths (gs://...) stay as given."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def check_config(workdir, config: ml_collections.ConfigDict) -> None:
  """Saves the config at the first start; refuses a restart that changes a shape field."""
  path = epath.Path(workdir) / "config.json"
  current = json.loads(config.to_json_best_effort())
  if path.exists():
    saved = json.loads(path.read_text())
    changed = [f"{f}: {_lookup(saved, f)!r} in {path}, now {_lookup(current, f)!r}"
               for f in SHAPE_FIELDS if _lookup(saved, f) != _lookup(current, f)]
    if changed:
      raise ConfigError("the config changes fields that the checkpoints' shapes depend on:\n  "
                        + "\n  ".join(changed)
                        + "\nuse a new --workdir, or --config.init_from to start from this run")
    return
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")


class Checkpoints:
  """Saving and restoring (state, data iterator) pairs in WORKDIR/checkpoints."""

  def __init__(self, workdir, config: ml_collections.ConfigDict):
    t = config.train
    self.directory = epath.Path(workdir) / "checkpoints"
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=("state", "data"),
        options=ocp.CheckpointManagerOptions(
            # Only every N steps (orbax's default would also save the first step it sees).
            save_decision_policy=ocp.checkpoint_managers.FixedIntervalPolicy(t.checkpoint_every),
            max_to_keep=t.keep_checkpoints,
            keep_period=t.keep_every or None, enable_async_checkpointing=t.async_checkpoints,
            create=True, cleanup_tmp_directories=True))

  def save(self, step: int, state, data_iterator, force: bool = False) -> bool:
    """Saves if `step` is due (or `force`); asynchronous unless configured otherwise."""
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore_latest(self, abstract_state, data_iterator, log=print):
    """(state, step) of the newest readable checkpoint, or (None, 0) when there is none.

    `abstract_state` carries the target shardings; the data iterator's state is set in
    place. Unreadable checkpoints are moved aside so that later saves can reuse their steps.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(data_iterator)))
        return restored.state, step
      except Exception as e:  # noqa: BLE001  orbax and tensorstore raise many types
        log(f"checkpoint {self.directory / str(step)} cannot be restored "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); moving it to "
            f"{self.directory.parent / 'checkpoints_unreadable'} and trying the one before")
        self._set_aside(step)
    return None, 0

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      aside = self.directory.parent / "checkpoints_unreadable"
      aside.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(aside / str(step))
    _sync("parti_jax.checkpoints: unreadable checkpoint set aside")
    self._manager.reload()

  @property
  def steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def load_params(path, abstract_params, groups=()):
  """Parameters of another run (its workdir: the latest checkpoint; or a STEP directory).

  Only the parameters are read (orbax partial restore), with the shardings of
  `abstract_params`, so a run can start from one with another optimizer or mesh. With
  `groups`, only those top-level groups are read (e.g. a tokenizer's encoder and codebook
  for a run whose decoder has another size).
  """
  path = absolute(path)
  if (path / "checkpoints").exists():
    steps = sorted(int(p.name) for p in (path / "checkpoints").iterdir() if p.name.isdigit())
    if not steps:
      raise FileNotFoundError(f"init_from={path}: no checkpoints in {path / 'checkpoints'}")
    path = path / "checkpoints" / str(steps[-1])
  if not (path / "state").exists():
    raise FileNotFoundError(f"init_from={path}: not a run directory or a checkpoint step "
                            "directory (no state/ inside)")
  if groups:
    abstract_params = {g: abstract_params[g] for g in groups}
  target = {"params": abstract_params}
  restored = ocp.PyTreeCheckpointer().restore(
      path / "state", args=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True))
  return restored["params"]


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
