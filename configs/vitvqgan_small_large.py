"""Parti's tokenizer: the Small encoder and codebook of a trained Small-Small, frozen, with a
Large decoder (32 blocks, width 1280) fine-tuned on them.

  python -m parti_jax.train --config configs/vitvqgan_small_large.py --workdir DIR \
      --config.init_from=SMALL_SMALL_RUN --config.data.train=IMAGE_SHARDS

Only the encoder-side groups (patch embedding, encoder, code projection, codebook) are read
from init_from and they are not trained, so the codes stay those of the Small-Small run.
Parti also dropped the logit-laplace loss here (it caused pixelation).
"""

from parti_jax import config as common

ENCODER_SIDE = ("patch_in", "encoder", "to_code", "codebook")


def get_config():
  c = common.vitvqgan("small", "large")
  c.model.logit_laplace = False
  c.loss.logit_laplace = 0.0
  c.init_from_groups = ENCODER_SIDE
  c.optimizer.frozen = ENCODER_SIDE
  return c
