"""The paper's x4 upsampler: 256 px -> 1024 px, 12 wide-activation blocks of 128 channels.

  python -m parti_jax.train --config configs/superres_x4.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS \
      --config.loss.perceptual_weights=vgg16_lpips.npz
  python -m parti_jax.upsample --model DIR --images SAMPLES --out SAMPLES_1024

As configs/superres_x2.py, at scale 4: the paper's ~30M parameters for 1024 px with the same
12 blocks of 128 channels come here from a wider activation, expansion 8 (1,024 channels
inside each block's ReLU): 28,384,304 parameters in the upsampler (and 24.0M in
the discriminator over 256 px crops). Trains on random 256 px
crops (64 px inputs) of images resized to 1024 px and evaluates on whole 1024 px images
from their 256 px versions. Losses, optimizer, batch and steps as the x2 config's: the
tokenizer's, where the paper gives none.
"""

from parti_jax.tasks import superres


def get_config():
  c = superres.base_config()
  c.model.update(scale=4, expansion=8, crop=256)
  c.data.resolution = 1024
  return c
