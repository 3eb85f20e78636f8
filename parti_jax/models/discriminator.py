"""The tokenizer's adversary: a StyleGAN-style residual discriminator, and the GAN losses.

Image [B, R, R, 3] in [-1, 1] -> one logit per image. A 1x1 "from RGB" convolution, then one
residual block per halving of the resolution down to 4x4 (two 3x3 convolutions, 2x2 average
pooling, and a pooled 1x1 skip path, summed with 1/sqrt(2)), then the minibatch standard
deviation feature, a 3x3 convolution and two dense layers. Channels start at
`model.discriminator.channels` at full resolution and double per halving up to
`max_channels`. Standard (He) initialization stands in for StyleGAN's equalized learning rate,
which matters little under Adam.

Losses are the non-saturating ones: the generator minimizes softplus(-D(fake)), the
discriminator softplus(D(fake)) + softplus(-D(real)), plus optionally the R1 penalty
gamma/2 * |grad_x D(real)|^2.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from parti_jax.models.layers import dense_init


def channels_per_block(m: ml_collections.ConfigDict) -> list[int]:
  """Channels at each resolution from `model.resolution` down to 4."""
  d = m.discriminator
  blocks = int(math.log2(m.resolution // 4))
  return [min(d.channels * 2 ** i, d.max_channels) for i in range(blocks + 1)]


def _conv(i, o, k, dtype, rngs):
  # Channel dimensions carry logical names so the rules can shard a large discriminator;
  # the default rules replicate it (it is small next to the tokenizer).
  return nnx.Conv(i, o, (k, k), padding="SAME", dtype=dtype, rngs=rngs,
                  kernel_init=nnx.with_partitioning(nnx.initializers.he_normal(),
                                                    (None, None, "channels_in", "channels")),
                  bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("channels",)))


def _down(x):
  return nnx.avg_pool(x, (2, 2), strides=(2, 2))


class ResBlock(nnx.Module):
  def __init__(self, i: int, o: int, dtype, rngs: nnx.Rngs):
    self.conv1 = _conv(i, i, 3, dtype, rngs)
    self.conv2 = _conv(i, o, 3, dtype, rngs)
    self.skip = _conv(i, o, 1, dtype, rngs)

  def __call__(self, x):
    y = nnx.leaky_relu(self.conv1(x), 0.2)
    y = _down(nnx.leaky_relu(self.conv2(y), 0.2))
    return (y + self.skip(_down(x))) / math.sqrt(2.0)


def minibatch_stddev(x, group: int = 4):
  """Appends one channel: the feature std over groups of images, averaged (StyleGAN).

  It lets the discriminator see variety across a batch, so collapsed outputs are easy to
  tell from real ones. Groups are taken as strided rows (i, i + B/g, ...) so each group
  spans the batch.
  """
  b, h, w, c = x.shape
  g = math.gcd(group, b)
  y = x.astype(jnp.float32).reshape(g, b // g, h, w, c)
  std = jnp.sqrt(jnp.var(y, axis=0) + 1e-8).mean(axis=(1, 2, 3))  # [B/g]
  std = jnp.tile(std, g)[:, None, None, None]
  return jnp.concatenate([x, jnp.broadcast_to(std, (b, h, w, 1)).astype(x.dtype)], -1)


class Discriminator(nnx.Module):

  def __init__(self, m: ml_collections.ConfigDict, rngs: nnx.Rngs):
    ch = channels_per_block(m)
    self.dtype = jnp.dtype(m.dtype)
    d = self.dtype
    self.from_rgb = _conv(3, ch[0], 1, d, rngs)
    self.blocks = nnx.List([ResBlock(a, b, d, rngs) for a, b in zip(ch[:-1], ch[1:])])
    self.final_conv = _conv(ch[-1] + 1, ch[-1], 3, d, rngs)
    self.dense = nnx.Linear(ch[-1] * 16, ch[-1], dtype=d, rngs=rngs,
                            kernel_init=dense_init(("channels_in", "channels")),
                            bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                                            ("channels",)))
    self.logit = nnx.Linear(ch[-1], 1, rngs=rngs, kernel_init=dense_init(("channels", None)))

  def __call__(self, images) -> jax.Array:
    """Logits [B] (float32)."""
    x = nnx.leaky_relu(self.from_rgb(images.astype(self.dtype)), 0.2)
    for block in self.blocks:
      x = block(x)
    x = nnx.leaky_relu(self.final_conv(minibatch_stddev(x)), 0.2)
    x = nnx.leaky_relu(self.dense(x.reshape(x.shape[0], -1)), 0.2)
    return self.logit(x)[:, 0].astype(jnp.float32)


def generator_loss(fake_logits):
  return jnp.mean(jax.nn.softplus(-fake_logits))


def discriminator_loss(real_logits, fake_logits):
  return jnp.mean(jax.nn.softplus(fake_logits)) + jnp.mean(jax.nn.softplus(-real_logits))


def r1_penalty(discriminate, real_images):
  """Mean over images of |grad_x D(x)|^2 at the real images (times gamma/2 by the caller)."""
  grads = jax.grad(lambda x: jnp.sum(discriminate(x)))(real_images)
  return jnp.mean(jnp.sum(jnp.square(grads.astype(jnp.float32)), axis=(1, 2, 3)))
