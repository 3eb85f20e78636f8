"""The ViT-VQGAN image tokenizer: images -> a grid of codes -> images.

Encoder: non-overlapping PxP patches, a linear patch embedding plus learned positions,
pre-LN Transformer blocks (the Parti blocks of `parti_jax.models.layers`, scanned), the final
LayerNorm, then the paper's two-layer feed-forward with tanh in the middle. Decoder: the
same in reverse, ending in a linear map from each token to its patch's pixels.

Quantizer (factorized codes): the encoder output is projected to a low-dimensional
lookup space (`model.code_dim`, 32), latents and codebook entries are l2-normalized, and
each latent takes its nearest entry (largest cosine). The straight-through estimator
passes gradients from the decoder to the encoder; the codebook loss pulls entries toward
latents and the commitment loss (weight `model.commitment`, 0.25) latents toward entries.

Quantizing late (`model.quantize_start`, 0 by default): for its first steps the decoder sees
the continuous latents, so encoder and decoder first learn an autoencoder whose latents carry
each patch's detail, while the codebook loss (and any dead-code restarts) moves the entries
onto those latents, an online k-means. Quantized from the first step, a small tokenizer on
the shapes data settles on codes that name little more than a patch's mean color.

With `model.logit_laplace` the decoder predicts, for each pixel, a location and a
log-scale, and the logit-laplace likelihood is one more loss term; the image is the
location either way. Pixels are in [-1, 1].
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from parti_jax.models.discriminator import Discriminator
from parti_jax.models.layers import Stack, dense_init, flat_dot_general
from parti_jax.sharding import constrain


def side_config(m: ml_collections.ConfigDict, side: str) -> ml_collections.ConfigDict:
  """The Parti-block fields of the encoder or decoder (`model.encoder` / `model.decoder`)."""
  s = m[side]
  return ml_collections.ConfigDict(dict(
      d_model=s.d_model, num_heads=s.num_heads, head_dim=s.get("head_dim", -1),
      mlp_dim=s.mlp_dim, dtype=m.dtype, dropout_rate=m.dropout_rate, remat=m.remat,
      scan_unroll=m.get("scan_unroll", 1), attention_impl=m.attention_impl))


def _linear(i, o, names, dtype, rngs, use_bias=True):
  return nnx.Linear(i, o, use_bias=use_bias, dtype=dtype, dot_general=flat_dot_general,
                    rngs=rngs, kernel_init=dense_init(names),
                    bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)))


class ViT(nnx.Module):
  """Tokens in, tokens out: positions, scanned blocks, final LN, the tanh feed-forward."""

  def __init__(self, s: ml_collections.ConfigDict, num_layers: int, num_tokens: int,
               rngs: nnx.Rngs):
    dtype = jnp.dtype(s.dtype)
    self.positions = nnx.Param(
        nnx.initializers.normal(0.02)(rngs.params(), (num_tokens, s.d_model)),
        out_sharding=("length", "embed"))
    self.stack = Stack(s, num_layers, cross=False, rngs=rngs)
    self.ff_in = _linear(s.d_model, s.mlp_dim, ("embed", "mlp"), dtype, rngs)
    self.ff_out = _linear(s.mlp_dim, s.d_model, ("mlp", "embed"), dtype, rngs)
    self.dtype = dtype

  def __call__(self, x, dropout_key=None):
    x = x + self.positions[...].astype(self.dtype)
    x = self.stack(constrain(x, "batch", "length", "embed"), None, dropout_key=dropout_key)
    return self.ff_out(jnp.tanh(self.ff_in(x)))


def patchify(images, patch: int):
  """[B, H, W, C] -> [B, (H/P)*(W/P), P*P*C], patches in raster order."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens, patch: int, grid: int, channels: int):
  b = tokens.shape[0]
  x = tokens.reshape(b, grid, grid, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * patch, grid * patch, channels)


def _l2_normalize(x, eps=1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


class ViTVQGAN(nnx.Module):

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # As for Parti: created without a mesh, laid out later by the logical names.
    with nnx.use_eager_sharding(False):
      self._build(m, rngs)

  def _build(self, m, rngs):
    if m.resolution % m.patch_size:
      raise ValueError(f"model.resolution={m.resolution} is not a multiple of "
                       f"model.patch_size={m.patch_size}")
    self.m = ml_collections.FrozenConfigDict(m)
    self.grid = m.resolution // m.patch_size
    n, pixels = self.grid ** 2, m.patch_size ** 2 * 3
    enc, dec = side_config(m, "encoder"), side_config(m, "decoder")
    dtype = jnp.dtype(m.dtype)
    self.patch_in = _linear(pixels, enc.d_model, ("patch", "embed"), dtype, rngs)
    self.encoder = ViT(enc, m.encoder.layers, n, rngs)
    self.to_code = _linear(enc.d_model, m.code_dim, ("embed", "code"), jnp.float32, rngs)
    # Entries start near unit length, the length of the latents they are compared with, so
    # that Adam's steps turn their directions as fast as the latents' (with std 1 entries
    # are ~sqrt(code_dim) long and turn that many times slower).
    self.codebook = nnx.Param(
        nnx.initializers.normal(m.code_dim ** -0.5)(rngs.params(), (m.codebook_size, m.code_dim)),
        out_sharding=("codes", "code"))
    self.from_code = _linear(m.code_dim, dec.d_model, ("code", "embed"), dtype, rngs)
    self.decoder = ViT(dec, m.decoder.layers, n, rngs)
    self.out_channels = 6 if m.logit_laplace else 3  # location (and log-scale) per pixel
    self.to_pixels = _linear(dec.d_model, m.patch_size ** 2 * self.out_channels,
                             ("embed", "patch"), jnp.float32, rngs)
    # The adversary trains beside the tokenizer (its own optimizer, parti_jax/optim.py) and
    # lives in its parameters so that it is sharded, checkpointed and resumed with them.
    if m.get("discriminator", {}).get("channels", 0):
      self.discriminator = Discriminator(m, rngs)

  def latents(self, images, dropout_key=None):
    """l2-normalized latents [B, N, code_dim] (float32)."""
    x = self.patch_in(patchify(images.astype(jnp.dtype(self.m.dtype)), self.m.patch_size))
    return _l2_normalize(self.to_code(self.encoder(x, dropout_key)))

  def normalized_codebook(self):
    return _l2_normalize(self.codebook[...])

  def quantize(self, z):
    """Nearest entries: (codes [B, N] int32, quantized [B, N, code_dim], distances)."""
    book = self.normalized_codebook()
    similarity = jnp.einsum("bnd,kd->bnk", z, book)  # unit vectors: nearest = most similar
    codes = jnp.argmax(similarity, -1).astype(jnp.int32)
    return codes, jnp.take(book, codes, axis=0)

  def decode_quantized(self, zq, dropout_key=None):
    """Decoder output [B, H, W, out_channels] in float32."""
    x = self.decoder(self.from_code(zq.astype(jnp.dtype(self.m.dtype))), dropout_key)
    out = self.to_pixels(x.astype(jnp.float32))
    return unpatchify(out, self.m.patch_size, self.grid, self.out_channels)

  def encode(self, images):
    """Images [B, R, R, 3] in [-1, 1] -> codes [B, grid*grid] int32."""
    return self.quantize(self.latents(images))[0]

  def decode(self, codes):
    """Codes [B, grid*grid] -> images [B, R, R, 3] (the predicted locations)."""
    zq = jnp.take(self.normalized_codebook(), codes, axis=0)
    return self.decode_quantized(zq)[..., :3]

  def __call__(self, images, dropout_key=None, quantized=True) -> dict:
    """Reconstruction and everything the losses and metrics need.

    `quantized` (a bool, possibly traced) False: the decoder sees the continuous latents
    (`model.quantize_start`); the codebook and commitment losses are computed either way.
    """
    keys = (None, None) if dropout_key is None else jax.random.split(dropout_key)
    z = self.latents(images, keys[0])
    codes, zq = self.quantize(z)
    # Straight-through: the decoder sees the entries, gradients flow to the latents.
    decoder_input = jnp.where(quantized, z + jax.lax.stop_gradient(zq - z), z)
    out = self.decode_quantized(decoder_input, keys[1])
    codebook_loss = jnp.mean(jnp.sum((jax.lax.stop_gradient(z) - zq) ** 2, -1))
    commitment_loss = jnp.mean(jnp.sum((z - jax.lax.stop_gradient(zq)) ** 2, -1))
    return dict(reconstruction=out[..., :3], output=out, codes=codes, latents=z,
                codebook_loss=codebook_loss, commitment_loss=commitment_loss)


def logit_laplace_nll(output, images, eps: float = 0.1):
  """Mean negative log-likelihood of `images` under the per-pixel logit-laplace output.

  Pixels in [-1, 1] are mapped into (eps', 1 - eps') with eps' = eps/2 so the logit stays
  finite; the location is the output's first 3 channels (in the model's pixel range,
  mapped the same way), the log-scale the last 3.
  """
  squash = lambda v: (1 - 2 * eps / 2) * (v + 1) / 2 + eps / 2
  x = jnp.clip(squash(images.astype(jnp.float32)), eps / 2, 1 - eps / 2)
  mu = jax.scipy.special.logit(jnp.clip(squash(output[..., :3]), 1e-4, 1 - 1e-4))
  log_b = output[..., 3:6]
  logit_x = jax.scipy.special.logit(x)
  nll = (jnp.abs(logit_x - mu) * jnp.exp(-log_b) + log_b + math.log(2.0)
         + jnp.log(x * (1 - x)))
  return jnp.mean(nll)


def psnr(reconstruction, images, data_range: float = 2.0):
  """Peak signal-to-noise ratio per image (dB) for pixels in a range of `data_range`."""
  mse = jnp.mean((reconstruction.astype(jnp.float32) - images.astype(jnp.float32)) ** 2,
                 axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-10))


def codebook_usage(codes, codebook_size: int, row_mask=None):
  """(fraction of entries used, perplexity) of a batch of codes [B, N].

  Rows whose `row_mask` is 0 (evaluation padding) are not counted.
  """
  weights = jnp.ones(codes.shape, jnp.float32)
  if row_mask is not None:
    weights = weights * row_mask.astype(jnp.float32)[:, None]
  counts = jnp.zeros(codebook_size, jnp.float32).at[codes.reshape(-1)].add(weights.reshape(-1))
  p = counts / counts.sum()
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return jnp.mean(counts > 0), jnp.exp(entropy)
