"""The paper's x2 upsampler: 256 px -> 512 px, 12 wide-activation blocks of 128 channels.

  python -m parti_jax.train --config configs/superres_x2.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS \
      --config.loss.perceptual_weights=vgg16_lpips.npz
  python -m parti_jax.upsample --model DIR --images SAMPLES --out SAMPLES_512

The paper (FACTS.md) gives the network's shape (WDSR-style, 12 residual blocks, 128
channels, ~15M parameters for 512 px) and its losses (L2, perceptual, StyleGAN
adversarial). Here: expansion 4 (a block's ReLU sees 512 channels), 14,180,876 parameters
in the upsampler (`python -m parti_jax.inspect` counts 19.0M more: the discriminator over the
128 px crops, as the tokenizer's, 64 channels doubling to 512). What the
paper does not give is the tokenizer's (configs/vitvqgan_small.py, `config.vitvqgan_base()`):
the loss weights (L2 1.0, perceptual 0.1, adversarial 0.1 from step 50,000), Adam
(0.9, 0.99) at 1e-4 with 50k warm-up steps and a cosine to 5e-5, batch 256, 500k steps.
Trains on random 128 px crops (64 px inputs) of images resized to 512 px (give images at
least that large: smaller ones would be enlarged into blurred targets); evaluates on the
whole 512 px images from their 256 px versions. Parameters float32, convolutions bfloat16.
"""

from parti_jax.tasks import superres


def get_config():
  return superres.base_config()
