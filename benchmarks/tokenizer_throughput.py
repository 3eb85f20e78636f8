"""Times the ViT-VQGAN: encode and decode images/s, and its train step.

  python benchmarks/tokenizer_throughput.py --config configs/vitvqgan_tiny.py --steps 5
  python benchmarks/tokenizer_throughput.py --config configs/vitvqgan_small.py \
      --config.global_batch_size=64 --steps 10                    # on a GPU, 256 px

The last line printed is one JSON object: encode and decode images/s at the configured
resolution and global batch (jitted, sharded over the batch axes, randomly initialized
weights: speed does not depend on training), and the median train step time with the
losses the config turns on. The perceptual term runs on random VGG-16 weights when the config
has it on but names no weights file, so its cost is counted. Times are medians after one
warm-up call.
"""

import json
import sys
import time

import jax
import numpy as np
import tqdm

from parti_jax import cli, distributed, sharding, tasks
from parti_jax import config as config_lib

FLAGS = cli.Flags(__doc__)
FLAGS.config()
FLAGS.integer("steps", 10, "Timed calls of each function (after a warm-up).")


def timed(fn, *args, steps: int, desc: str):
  """Median seconds per call of `fn(*args)`; a `fn` returning (state, ...) is fed its state."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in tqdm.trange(steps, desc=desc, file=sys.stderr, disable=None):
    start = time.perf_counter()
    out = fn(*args)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  return float(np.median(times)), out


def synthetic_images(setup, batch_size: int):
  r, rng = setup.config.model.resolution, np.random.default_rng(0)
  images = rng.uniform(-1, 1, (batch_size, r, r, 3)).astype(np.float32)
  return sharding.place_global_batch(setup.batch_sharding, images)


def main(argv=None):
  a = FLAGS.parse(argv)
  distributed.initialize()
  config = a.config
  if config is None:
    sys.exit("--config is required")
  if config.get("task", "parti") != "vitvqgan":  # encode and decode are the tokenizer's
    sys.exit(f"error: {a.config_file} is not an image tokenizer's config (task=vitvqgan)")
  if config.loss.get("perceptual", 0) and not config.loss.get("perceptual_weights", ""):
    config.loss.perceptual_weights = "random:0"
  try:
    config_lib.check(config)
  except config_lib.ConfigError as e:
    sys.exit(f"error: {e}")
  task = tasks.build(config, sharding.make_mesh(config))
  setup = task.setup
  state = setup.init_state()
  images = synthetic_images(setup, config.global_batch_size)
  b, steps = config.global_batch_size, a.steps

  encode = jax.jit(lambda p, x: setup.model(p).encode(x), out_shardings=setup.batch_sharding)
  decode = jax.jit(lambda p, c: setup.model(p).decode(c), out_shardings=setup.batch_sharding)
  encode_s, codes = timed(encode, state.params, images, steps=steps, desc="encode")
  decode_s, _ = timed(decode, state.params, codes, steps=steps, desc="decode")

  step = task.train_step
  state, metrics = step(state, {"images": images})  # compile and warm up
  jax.block_until_ready(metrics)
  times = []
  for _ in tqdm.trange(steps, desc="train steps", file=sys.stderr, disable=None):
    start = time.perf_counter()
    state, metrics = step(state, {"images": images})
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    sys.exit(f"the train step produced a non-finite loss ({loss}); the timing is meaningless")
  if jax.process_index() != 0:
    return
  m = config.model
  step_s = float(np.median(times))
  print(json.dumps(dict(
      encode_images_per_s=b / encode_s, decode_images_per_s=b / decode_s,
      train_step_s=step_s, train_images_per_s=b / step_s, encode_s=encode_s, decode_s=decode_s,
      global_batch=b, resolution=m.resolution, patch_size=m.patch_size,
      grid=m.resolution // m.patch_size, codebook_size=m.codebook_size,
      encoder=dict(m.encoder), decoder=dict(m.decoder), dtype=m.dtype,
      losses=sorted(k for k in metrics if k in (
          "l2", "logit_laplace", "perceptual", "generator_adversarial", "r1")),
      adversarial_on=bool(metrics.get("adversarial_on", 0)),
      device_kind=jax.devices()[0].device_kind, num_devices=jax.device_count())))


if __name__ == "__main__":
  cli.run(main)
