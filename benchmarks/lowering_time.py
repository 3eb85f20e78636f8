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

from absl import app, flags
from ml_collections import config_flags

from parti_jax import config as config_lib
from parti_jax import sharding
from parti_jax import train_step as ts

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 256, "Size of the abstract mesh.")
_PLATFORM = flags.DEFINE_string("platform", "tpu", "Platform to lower for (no device needed).")
_DEPTHS = flags.DEFINE_list("decoder_layers", [], "Decoder depths to compare with the config's.")


def lower(config, num_devices: int) -> dict:
  mesh = sharding.abstract_mesh(config, num_devices)
  start = time.perf_counter()
  setup = ts.Setup(config, mesh)
  state, batch = setup.abstract_state(), setup.abstract_batch()
  setup_s = time.perf_counter() - start
  start = time.perf_counter()
  traced = ts.jit_train_step(setup).trace(state, batch)
  trace_s = time.perf_counter() - start
  start = time.perf_counter()
  lowered = traced.lower(lowering_platforms=(_PLATFORM.value,))
  lower_s = time.perf_counter() - start
  return dict(encoder_layers=config.model.encoder_layers,
              decoder_layers=config.model.decoder_layers, setup_s=setup_s, trace_s=trace_s,
              lower_s=lower_s, program_lines=len(lowered.as_text().splitlines()))


def main(argv):
  del argv
  config = _CONFIG.value
  if config is None:
    sys.exit("--config is required")
  depths = [int(d) for d in _DEPTHS.value] or [config.model.decoder_layers // 8]
  results = []
  for depth in depths + [config.model.decoder_layers]:
    c = config.copy_and_resolve_references()
    c.model.decoder_layers = depth
    try:
      results.append(lower(c, _NUM_DEVICES.value))
    except config_lib.ConfigError as e:
      sys.exit(f"error: {e}")
    print(results[-1], file=sys.stderr)
  print(json.dumps(dict(num_devices=_NUM_DEVICES.value, d_model=config.model.d_model,
                        runs=results)))


if __name__ == "__main__":
  app.run(main)
