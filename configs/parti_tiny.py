"""A tiny Parti (d_model 64, 2+2 layers, 16 image tokens) that trains in seconds on a CPU.

  python -m parti_jax.train --config configs/parti_tiny.py --workdir runs/tiny \
      --config.data.train=data/shapes_tokens/train --config.data.eval=data/shapes_tokens/validation
  python benchmarks/train_throughput.py --config configs/parti_tiny.py --steps 20

Used by the tests and as the smoke test of a new install. It has no dropout and uses AdamW at
a high learning rate, so it memorises a fixed batch within ~100 steps. Its 200 steps take
about 25 s on a 2-core CPU and reach a validation token accuracy of 0.67 on 2,000 shapes
images (docs/training.md); the benchmark measures a step at 10.3 ms (BENCHMARKS.md).
"""

from parti_jax import config as common


def get_config():
  return common.tiny_model(common.base())
