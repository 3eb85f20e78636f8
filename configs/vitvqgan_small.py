"""ViT-VQGAN Small-Small: 256 px images -> 32x32 codes from 8192 (the paper's size).

  python -m parti_jax.train --config configs/vitvqgan_small.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS \
      --config.loss.perceptual_weights=vgg16_lpips.npz

27.9M parameters per side here (32M in the paper). Trains with the paper's losses
(docs/tokenizer.md): L2, logit-laplace, codebook and commitment, the perceptual distance
(off, with a warning, without the VGG-16 weights of `python -m parti_jax.convert.vgg16`)
and the adversarial loss from step 50,000 on.
On an H200 at batch 64 it encodes 2,477 and decodes 2,573 images/s, and a train step before
the adversary starts takes 0.393 s (BENCHMARKS.md).
"""

from parti_jax import config as common


def get_config():
  return common.vitvqgan("small", "small")
