"""A tiny Parti (d_model 64, 2+2 layers, 16 image tokens) that trains in seconds on a CPU.

  python benchmarks/train_throughput.py --config configs/parti_tiny.py --steps 20
Used by the tests and as the smoke test of a new install. It has no dropout and uses
AdamW at a high learning rate, so it memorises a fixed batch within ~100 steps.
"""

from parti_jax import config as common


def get_config():
  return common.tiny_model(common.base())
