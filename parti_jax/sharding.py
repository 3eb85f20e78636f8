"""The device mesh and how logical axis names map onto it.

Parameters and activations carry logical axis names ("embed", "heads", "batch", ...).
`config.sharding_rules` maps them to mesh axes in priority order (flax's
`logical_to_mesh_axes` semantics: rules are tried in order and each mesh axis is used
at most once per array). Everything here turns those names into `NamedSharding`s.
"""

import collections
import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parti_jax import config as config_lib

Rules = Sequence[tuple[str, Any]]

# The mesh activations are constrained to while a step is traced (see `activation_mesh`).
_ACTIVATION_MESH: list[Mesh] = []


def make_mesh(config, devices: Sequence[jax.Device] | None = None,
              training: bool = True) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices, checked against the config first.

  Over several TPU slices (mesh.num_slices), the data axis is split across the slices and
  fsdp and tensor stay inside each: only the gradient reduction of data parallelism
  crosses the slow network between slices, once per step.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = config_lib.check(config, len(devices), training)
  # Auto axes: GSPMD propagates shardings between the constraints we set.
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  num_slices = int(config.mesh.get("num_slices", 1))
  found = len({getattr(d, "slice_index", 0) for d in devices})
  if found != num_slices:
    raise config_lib.ConfigError(
        f"mesh.num_slices={num_slices}, but the {len(devices)} devices are in {found} "
        f"slice(s): set mesh.num_slices={found}")
  if num_slices == 1:
    return jax.make_mesh(shape, config_lib.MESH_AXES, devices=devices, axis_types=axis_types)
  per_slice = (shape[0] // num_slices,) + shape[1:]  # over ICI, the links inside a slice
  # As jax.make_mesh does: v5e slices may need a physical axis split between mesh axes.
  v5e = devices[0].device_kind in ("TPU v5 lite", "TPU v5e")
  grid = mesh_utils.create_hybrid_device_mesh(per_slice, (num_slices, 1, 1), devices,
                                              allow_split_physical_axes=v5e)
  return Mesh(grid, config_lib.MESH_AXES, axis_types=axis_types)


def abstract_mesh(config, num_devices: int) -> jax.sharding.AbstractMesh:
  """The config's mesh over `num_devices` devices that need not exist (planning, lowering)."""
  return jax.sharding.AbstractMesh(config_lib.check(config, num_devices), config_lib.MESH_AXES)


def rules_of(config) -> tuple[tuple[str, Any], ...]:
  return tuple((logical, tuple(a) if isinstance(a, list) else a)
               for logical, a in config.sharding_rules)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh, rules: Rules):
  """While active, `constrain` pins activations to `mesh` by `rules`; a no-op outside."""
  _ACTIVATION_MESH.append(mesh)
  try:
    with spmd.logical_axis_rules(rules):
      yield
  finally:
    _ACTIVATION_MESH.pop()


def current_activation_mesh() -> Mesh | None:
  """The mesh `activation_mesh` set while this step is traced; None outside one."""
  return _ACTIVATION_MESH[-1] if _ACTIVATION_MESH else None


def compile_device() -> jax.Device:
  """The kind of device the step being traced is compiled for: the activation mesh's first
  (compile-only TPU devices when planning on a CPU host), else JAX's default (also under an
  abstract mesh, which has no devices to ask)."""
  mesh = current_activation_mesh()
  if mesh is None or isinstance(mesh, jax.sharding.AbstractMesh):
    return jax.devices()[0]
  return mesh.devices.flat[0]


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
  """Sharding constraint on an activation by logical axis names (no-op without a mesh)."""
  if not _ACTIVATION_MESH:
    return x
  spec = nn.logical_to_mesh_axes(names, spmd.get_logical_axis_rules())
  return jax.lax.with_sharding_constraint(x, NamedSharding(_ACTIVATION_MESH[-1], spec))


def logical_to_mesh(spec: Sequence[str | None], rules: Rules) -> P:
  return nn.logical_to_mesh_axes(tuple(spec), rules)


def named(mesh: Mesh, logical_specs: Any, rules: Rules) -> Any:
  """A tree of logical PartitionSpecs -> the same tree of NamedShardings."""
  return jax.tree.map(lambda s: NamedSharding(mesh, logical_to_mesh(s, rules)), logical_specs,
                      is_leaf=lambda s: isinstance(s, P))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Inputs of any rank: the leading (batch) axis over the batch mesh axes, the rest whole."""
  return NamedSharding(mesh, logical_to_mesh(("batch",), rules))


def rows_by_process(batch_sharding: NamedSharding, global_batch: int) -> dict[int, list[int]]:
  """For every process, the rows of a global batch that its devices hold (sorted).

  Where the batch axes do not span every device (a `tensor` axis across hosts, say),
  several processes hold the same rows: the input pipeline reads exactly these rows on
  each process, so replica hosts read, and feed, identical data.
  """
  rows = collections.defaultdict(set)
  for device, index in batch_sharding.devices_indices_map((global_batch,)).items():
    rows[device.process_index].update(range(*index[0].indices(global_batch)))
  return {p: sorted(r) for p, r in sorted(rows.items())}


def check_input_layout(rows_by_process: dict[int, list[int]], global_batch: int) -> dict:
  """Refuses a reading layout (`rows_by_process`) the input pipeline cannot feed.

  The loader reads, on each process, the rows its devices hold, and builds every device's
  shard from them; rows shared by several processes (replicas of a batch shard) are read
  by each. So a layout feeds as long as no process is left without rows and every row of
  the global batch is held somewhere. Returns hosts, rows_per_host (the most any reads),
  row_sets (distinct) and hosts_per_row (the most replicas: above 1 where a model axis
  spans hosts).
  """
  empty = [p for p, rows in rows_by_process.items() if not rows]
  if empty:
    raise config_lib.ConfigError(
        f"processes {empty} hold no rows of the global batch (global_batch_size="
        f"{global_batch}): every process must feed its devices")
  readers = collections.Counter(r for rows in rows_by_process.values() for r in rows)
  if set(readers) != set(range(global_batch)):
    raise config_lib.ConfigError(
        f"global_batch_size={global_batch} is not covered by the batch shards: rows "
        f"{sorted(set(range(global_batch)) - set(readers))[:8]} are held by no device")
  return dict(hosts=len(rows_by_process),
              rows_per_host=max(len(rows) for rows in rows_by_process.values()),
              row_sets=len({tuple(rows) for rows in rows_by_process.values()}),
              hosts_per_row=max(readers.values()), valid=True)


def place_global_batch(sharding: NamedSharding, batch: Any) -> Any:
  """Global arrays of a batch that every process holds whole (synthetic data): each process
  contributes a contiguous share of the rows, so which rows land where follows the mesh's
  device order; for data whose row order matters, use the input pipeline."""
  def place(x):
    local = x.shape[0] // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    return jax.make_array_from_process_local_data(sharding, np.asarray(x)[rows])
  return jax.tree.map(place, batch)


def _drop_dim(spec: P, param_shape, leaf_shape) -> P:
  """Spec for an optimizer statistic that drops one dimension of its parameter."""
  entries = tuple(spec) + (None,) * (len(param_shape) - len(spec))
  for k in range(len(param_shape)):
    if tuple(param_shape[:k]) + tuple(param_shape[k + 1:]) == tuple(leaf_shape):
      return P(*(entries[:k] + entries[k + 1:]))
  return P()


def axes_of(entry) -> tuple[str, ...]:
  """A PartitionSpec entry (None, a mesh axis name or several) as a tuple of names."""
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shards(mesh, entry) -> int:
  """How many ways a PartitionSpec entry splits its dimension over `mesh`."""
  return math.prod(mesh.shape[a] for a in axes_of(entry))


def _entry(axes: tuple[str, ...]):
  return None if not axes else axes[0] if len(axes) == 1 else axes


def _blocked_last_dim(spec: P, mesh_shape, param_shape, leaf_shape) -> P | None:
  """Spec for a statistic shaped like its parameter but with the last axis counted in
  blocks (parti_jax/quantized.py's scales: [..., ceil(n / block)]); None if it is not one.

  Each mesh axis of the parameter's last dimension stays there while the blocks still
  split evenly over it (so a block's scale lives with its int8 values); one that does not
  moves to the first leading dimension that splits evenly with it added, so the scales
  still shard as many ways (at the cost of moving them between that layout and the
  values' in each step: XLA may warn of an "involuntary full rematerialization" of these
  small arrays); one that fits nowhere leaves the statistic replicated over it.
  """
  rank = len(param_shape)
  if (rank == 0 or len(leaf_shape) != rank or tuple(leaf_shape[:-1]) != tuple(param_shape[:-1])
      or not 0 < leaf_shape[-1] <= param_shape[-1]):
    return None
  axes = [axes_of(e) for e in tuple(spec) + (None,) * (rank - len(spec))]
  ways = lambda names: math.prod(mesh_shape[a] for a in names)
  last, axes[-1] = axes[-1], ()
  for a in last:
    if leaf_shape[-1] % ways(axes[-1] + (a,)) == 0:
      axes[-1] += (a,)
      continue
    for k in range(rank - 1):  # each axis is named once in the spec, so never twice here
      if leaf_shape[k] % ways(axes[k] + (a,)) == 0:
        axes[k] += (a,)
        break
  return P(*map(_entry, axes))


def opt_state_shardings(tx: optax.GradientTransformation, abstract_opt_state, abstract_params,
                        param_shardings) -> Any:
  """Shardings for an optimizer state, derived from its parameters' shardings.

  Moments shaped like their parameter take its sharding; the int8 momentum's block scales
  (the last axis counted in blocks) keep it where the blocks split evenly
  (_blocked_last_dim); Adafactor's factored row and column statistics drop one parameter
  dimension and keep the sharding of the others; anything else (step counts,
  placeholders) is replicated. optax.tree_map_params finds which parts of the state
  mirror the parameter tree.
  """
  def leaf(stat, param, sharding):
    if isinstance(stat, optax.MaskedNode):  # a frozen group (optimizer.frozen): no state
      return stat
    if stat.shape == param.shape:
      return sharding
    blocked = _blocked_last_dim(sharding.spec, sharding.mesh.shape, param.shape, stat.shape)
    if blocked is not None:
      return NamedSharding(sharding.mesh, blocked)
    return NamedSharding(sharding.mesh, _drop_dim(sharding.spec, param.shape, stat.shape))

  some_sharding = jax.tree.leaves(param_shardings)[0]
  replicated = NamedSharding(some_sharding.mesh, P())
  return optax.tree_map_params(tx, leaf, abstract_opt_state, abstract_params, param_shardings,
                               transform_non_params=lambda _: replicated,
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def check_divisible(abstract_params, param_shardings) -> None:
  """Refuses (naming the parameters) any dimension that would not split evenly."""
  bad = []
  def visit(path, p, s):
    for dim, axes in zip(p.shape, tuple(s.spec)):
      if dim % shards(s.mesh, axes):
        bad.append(f"{jax.tree_util.keystr(path)} {p.shape} over {s.spec}")
  jax.tree_util.tree_map_with_path(visit, abstract_params, param_shardings)
  if bad:
    raise config_lib.ConfigError(
        "parameters that do not split evenly over the mesh:\n  " + "\n  ".join(bad))


def shard_bytes(shape, dtype, sharding: NamedSharding) -> int:
  """Bytes one device holds of an array of `shape` laid out by `sharding`."""
  shard = sharding.shard_shape(tuple(shape))
  return math.prod(shard) * np.dtype(dtype).itemsize
