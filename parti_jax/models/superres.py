"""The super-resolution upsampler: a WDSR-style convolutional network, low-res -> s x larger.

Parti upsamples its 256 px images to 512 or 1024 px with such a network (not conditioned
on text). Image [B, h, w, 3] in [-1, 1] -> image [B, s*h, s*w, 3], for any h and w (the
network is fully convolutional):

  body:  a 3x3 head convolution to `model.channels`, then `model.blocks` wide-activation
         residual blocks, each x + residual_scale * reduce(relu(expand(x))): a 3x3
         convolution expanding to `model.expansion` times the channels, ReLU, and a 3x3
         convolution reducing back (WDSR-A's block). The blocks' output plus the head's
         (EDSR's long skip) goes through a 3x3 tail convolution to 3*s*s channels,
         rearranged into an s-times larger image (pixel shuffle, depth-to-space).
  skip:  the input upsampled bicubically (`jax.image.resize`), to which the body adds.

Why these choices:
  - WDSR-A's block (two 3x3 convolutions around the wide ReLU) rather than WDSR-B's
    (1x1 expand, 1x1 low-rank reduce, 3x3): with the paper's 12 blocks of 128 channels only
    WDSR-A's widths reach its ~15M parameters (expansion 4) and ~30M (expansion 8); WDSR-B's
    would stay near 3.5M.
  - A bicubic skip path, and a tail that starts at zero: the untrained network is exactly
    bicubic upsampling, and training learns only the detail bicubic misses. Evaluation
    compares against the same bicubic, so "above bicubic" is a gain the body made.
  - No weight normalization (WDSR uses it to train without batch norm at a high learning
    rate): with Adam's per-parameter steps, the residual scale (0.1, as in EDSR) and the
    zero tail, the stack trains stably without it, and plain kernels keep the parameters
    what every other module's are (checkpoints, sharding rules, model folders).

Parameters carry logical channel names ("channels_in", "channels"), as the discriminator's
do; the default rules replicate them (the network is small next to its activations).
Activations are constrained to shard their batch. The optional `discriminator` (a
StyleGAN-style one, parti_jax/models/discriminator.py, over `model.crop` pixel crops) lives
in the parameters so that parti_jax/optim.py gives it its own optimizer and it is sharded,
checkpointed and resumed with the rest.
"""

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from parti_jax.models.discriminator import Discriminator
from parti_jax.sharding import constrain


def _conv(i: int, o: int, dtype, rngs: nnx.Rngs, init=None):
  return nnx.Conv(i, o, (3, 3), padding="SAME", dtype=dtype, rngs=rngs,
                  kernel_init=nnx.with_partitioning(init or nnx.initializers.he_normal(),
                                                    (None, None, "channels_in", "channels")),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("channels",)))


class WideBlock(nnx.Module):
  """x + scale * reduce(relu(expand(x))): the ReLU sees `expansion` times the channels."""

  def __init__(self, channels: int, expansion: int, scale: float, dtype, rngs: nnx.Rngs):
    self.expand = _conv(channels, channels * expansion, dtype, rngs)
    self.reduce = _conv(channels * expansion, channels, dtype, rngs)
    self.scale = scale

  def __call__(self, x):
    return x + self.scale * self.reduce(jax.nn.relu(self.expand(x)))


def pixel_shuffle(x, s: int):
  """[B, h, w, s*s*C] -> [B, s*h, s*w, C]: channel (i*s + j)*C + c goes to sub-pixel (i, j)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, s, s, c // (s * s)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * s, w * s, c // (s * s))


def bicubic(images, s: int):
  """Images [B, h, w, C] upsampled s times by bicubic interpolation (float32)."""
  b, h, w, c = images.shape
  return jax.image.resize(images.astype(jnp.float32), (b, h * s, w * s, c), "bicubic")


def area_downsample(images, s: int):
  """Images [B, H, W, C] (H, W multiples of s) -> [B, H/s, W/s, C]: each output pixel the
  mean of its s x s block (what a camera's larger pixel would have collected)."""
  b, h, w, c = images.shape
  return images.reshape(b, h // s, s, w // s, s, c).mean(axis=(2, 4))


def discriminator_view(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The fields `Discriminator` reads, its resolution the high-resolution crop's."""
  return ml_collections.ConfigDict(dict(resolution=m.crop, discriminator=m.discriminator,
                                        dtype=m.dtype))


class SuperRes(nnx.Module):

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # As for the other models: created without a mesh, laid out later by the logical names.
    with nnx.use_eager_sharding(False):
      self._build(m, rngs)

  def _build(self, m, rngs):
    if m.scale < 2:
      raise ValueError(f"model.scale={m.scale} must be at least 2")
    self.scale, self.dtype = m.scale, jnp.dtype(m.dtype)
    c = m.channels
    self.head = _conv(3, c, self.dtype, rngs)
    self.blocks = nnx.List([WideBlock(c, m.expansion, m.residual_scale, self.dtype, rngs)
                            for _ in range(m.blocks)])
    self.tail = _conv(c, 3 * m.scale ** 2, self.dtype, rngs, nnx.initializers.zeros_init())
    if m.get("discriminator", {}).get("channels", 0):
      self.discriminator = Discriminator(discriminator_view(m), rngs)

  def __call__(self, images) -> jax.Array:
    """Low-resolution images [B, h, w, 3] in [-1, 1] -> [B, s*h, s*w, 3] float32."""
    x = constrain(images.astype(self.dtype), "batch", None, None, None)
    x = self.head(x)
    skip = x
    for block in self.blocks:
      x = constrain(block(x), "batch", None, None, None)
    detail = pixel_shuffle(self.tail(x + skip), self.scale).astype(jnp.float32)
    return bicubic(images, self.scale) + detail
