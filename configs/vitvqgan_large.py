"""ViT-VQGAN, Large encoder and Large decoder: 256 px images -> 32x32 codes from 8192.

  python -m parti_jax.inspect ...   (Parti configs only for now)

The paper's Large-Large tokenizer (FACTS.md): 8x8 patches, factorized codes of
dimension 32, l2-normalized lookup, commitment 0.25. Parameters per side (encoder or
decoder) with this code: small 27.9M, base 90.7M, large 644M (the paper lists 32M, 91M,
599M). This issue's first part is the model; its training task lands next.
"""

from parti_jax import config as common


def get_config():
  c = common.vitvqgan_base()
  c.model.encoder.update(common.vit_size("large"))
  c.model.decoder.update(common.vit_size("large"))
  return c
