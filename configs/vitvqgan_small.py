"""ViT-VQGAN, Small encoder and Small decoder: 256 px images -> 32x32 codes from 8192.

  python -m parti_jax.train --config configs/vitvqgan_small.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS

The paper's Small-Small tokenizer (FACTS.md): 8x8 patches, factorized codes of
dimension 32, l2-normalized lookup, commitment 0.25. Parameters per side (encoder or
decoder) with this code: small 27.9M, base 90.7M, large 644M (the paper lists 32M, 91M,
599M). Trains with L2, logit-laplace, codebook and commitment losses; the perceptual
and adversarial terms are not implemented yet (see parti_jax/vqgan_train.py).
"""

from parti_jax import config as common


def get_config():
  c = common.vitvqgan_base()
  c.model.encoder.update(common.vit_size("small"))
  c.model.decoder.update(common.vit_size("small"))
  return c
