"""ViT-VQGAN Small-Small: 256 px images -> 32x32 codes from 8192 (FACTS.md).

  python -m parti_jax.train --config configs/vitvqgan_small.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS

27.9M parameters per side here (32M in the paper). Trains with the losses that exist so far
(parti_jax/vqgan_train.py: no perceptual or adversarial term yet).
"""

from parti_jax import config as common


def get_config():
  return common.vitvqgan("small", "small")
