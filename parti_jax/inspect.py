"""Prints a config's parameter count and how every parameter is laid out on the mesh.

  python -m parti_jax.inspect --config configs/parti_20b.py [--num_devices 256] [--json]

Shapes only: nothing is allocated, so the 20B config inspects in seconds on a laptop.
`--num_devices` plans for a device count other than this machine's (an abstract mesh).
"""

import json
import math
import sys

import jax

from parti_jax import cli, optim, sharding, tasks
from parti_jax import config as config_lib


def plan(config, num_devices: int) -> dict:
  """Parameter table and per-device bytes of `config` on an abstract mesh of `num_devices`."""
  task = tasks.of(config)
  setup = task.Setup(config, sharding.abstract_mesh(config, num_devices))
  state = setup.abstract_state()
  rows = []
  for (path, p), (_, logical), (_, s) in zip(
      jax.tree_util.tree_leaves_with_path(setup.abstract_params),
      jax.tree_util.tree_leaves_with_path(setup.logical_specs),
      jax.tree_util.tree_leaves_with_path(setup.param_shardings)):
    rows.append(dict(name=jax.tree_util.keystr(path, simple=True, separator="/"),
                     shape=list(p.shape), logical=list(logical), spec=[_axes(a) for a in s.spec],
                     bytes_per_device=sharding.shard_bytes(p.shape, p.dtype, s)))
  per_device = lambda tree: sum(
      sharding.shard_bytes(x.shape, x.dtype, x.sharding) for x in jax.tree.leaves(tree))
  return dict(
      num_params=int(sum(math.prod(p.shape) for p in jax.tree.leaves(setup.abstract_params))),
      mesh=dict(setup.mesh.shape),
      param_bytes_per_device=per_device(state.params),
      opt_state_bytes_per_device=per_device(state.opt_state),
      # The first moment alone (optimizer.momentum_dtype: float32, bfloat16 or int8 blocks).
      momentum_bytes_per_device=per_device(optim.momentum_leaves(state.opt_state)),
      train_step_tflops=task.train_step_flops(config) / 1e12,
      params=rows)


def _axes(a):
  return list(a) if isinstance(a, tuple) else a


def _print_table(p: dict) -> None:
  width = max(len(r["name"]) for r in p["params"])
  print(f"{'parameter':<{width}}  {'shape':<24} {'partition spec':<40} {'MiB/device':>10}")
  for r in p["params"]:
    print(f"{r['name']:<{width}}  {str(tuple(r['shape'])):<24} {str(tuple(r['spec'])):<40} "
          f"{r['bytes_per_device'] / 2**20:>10.2f}")
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  print(f"\nparameters: {p['num_params']:,} ({p['num_params'] / 1e9:.3f} B)")
  print(f"mesh: {p['mesh']}")
  print(f"per device: params {gib(p['param_bytes_per_device'])}, "
        f"optimizer state {gib(p['opt_state_bytes_per_device'])}, of which momentum "
        f"{gib(p['momentum_bytes_per_device'])}")
  print(f"train step: {p['train_step_tflops']:.1f} TFLOP at the global batch")


FLAGS = cli.Flags(__doc__)
FLAGS.config(lock_config=True)
FLAGS.integer("num_devices", None, "Plan for this many devices.")
FLAGS.bool("json", False, "Print one JSON object instead of a table.")


def main(argv=None):
  a = FLAGS.parse(argv)
  if a.config is None:
    sys.exit("--config is required, e.g. --config configs/parti_350m.py")
  try:
    p = plan(a.config, a.num_devices or jax.device_count())
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  if a.json:
    print(json.dumps(p))
  else:
    _print_table(p)


if __name__ == "__main__":
  cli.run(main)
