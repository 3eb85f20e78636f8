"""ViT-VQGAN Base-Base: 256 px images -> 32x32 codes from 8192 (the paper's size).

  python -m parti_jax.train --config configs/vitvqgan_base.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS \
      --config.loss.perceptual_weights=vgg16_lpips.npz

90.7M parameters per side here (91M in the paper). Trains with the paper's losses
(docs/tokenizer.md): L2, logit-laplace, codebook and commitment, the perceptual distance
(off, with a warning, without the VGG-16 weights of `python -m parti_jax.convert.vgg16`)
and the adversarial loss from step 50,000 on.
"""

from parti_jax import config as common


def get_config():
  return common.vitvqgan("base", "base")
