"""Lowers the train step of a config with abstract inputs and times it against depth.

  python benchmarks/lowering_time.py --config configs/parti_20b.py --num_devices 256

Nothing is allocated: state and batch are ShapeDtypeStructs on an abstract mesh of
`--num_devices` devices, lowered for `--platform` (TPU by default; no TPU is needed to
lower, only to compile). Layers are scanned, so lowering time (and program size in lines) should
stay flat as the decoder gets deeper; the JSON line lists both for each depth tried.
"""

import json
import sys
import time

from parti_jax import cli, sharding, tasks
from parti_jax import config as config_lib

FLAGS = cli.Flags(__doc__)
FLAGS.config()
FLAGS.integer("num_devices", 256, "Size of the abstract mesh.")
FLAGS.string("platform", "tpu", "Platform to lower for (no device needed).")
FLAGS.strings("decoder_layers", [], "Decoder depths to compare with the config's "
              "(comma-separated or repeated)")


def lower(config, num_devices: int, platform: str) -> dict:
  mesh = sharding.abstract_mesh(config, num_devices)
  start = time.perf_counter()
  task = tasks.build(config, mesh)
  state, batch = task.setup.abstract_state(), task.setup.abstract_batch()
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  traced = task.train_step.trace(state, batch)
  trace_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered = traced.lower(lowering_platforms=(platform,))
  lower_s = time.perf_counter() - start
  return dict(encoder_layers=config.model.encoder_layers,
              decoder_layers=config.model.decoder_layers, setup_s=setup_s, trace_s=trace_s,
              lower_s=lower_s, program_lines=len(lowered.as_text().splitlines()))


def main(argv=None):
  a = FLAGS.parse(argv)
  config = a.config
  if config is None:
    sys.exit("--config is required")
  if config.get("task", "parti") != "parti":  # the depths compared are Parti's decoder's
    sys.exit(f"error: {a.config_file} is not a Parti config")
  # cli's repeated flag keeps "3,32" whole: split it here.
  depths = [int(d) for v in a.decoder_layers for d in v.split(",") if d]
  depths = depths or [config.model.decoder_layers // 8]
  results = []
  for depth in depths + [config.model.decoder_layers]:
    c = config.copy_and_resolve_references()
    c.model.decoder_layers = depth
    try:
      results.append(lower(c, a.num_devices, a.platform))
    except config_lib.ConfigError as e:
      sys.exit(f"error: {e}")
    print(results[-1], file=sys.stderr)
  print(json.dumps(dict(num_devices=a.num_devices, d_model=config.model.d_model,
                        runs=results)))


if __name__ == "__main__":
  cli.run(main)
