"""The Parti encoder-decoder: text tokens in, logits over image codebook tokens out.

Encoder: bidirectional self-attention over the text (padding masked). Decoder: causal
self-attention over the raster of image tokens plus cross-attention to the encoder.
Pre-LayerNorm blocks, with the extra final LayerNorm at the output of both stacks.

Positions are learned absolute embeddings: one table for the text sequence, and for the
image grid a row table plus a column table (factorised 2-D), so the decoder knows where
in the image each token lies without paying for a full grid table. With `model.image_rope`
the decoder's self-attention also rotates queries and keys by their row and column (2-D
rotary embeddings): attention then sees the offset between two tokens directly, so what
the model learns about one place in the image (the patch above belongs to the same
object) holds at every place. With `model.text_rope` the encoder's self-attention rotates
by text position (1-D rotary embeddings): "red circle and blue square" and "red square and
blue circle" hold the same words, and only their order binds a color to its shape, which
attention then sees as an offset, the same wherever the phrase starts.

The layers (attention, MLP, the scanned stacks) are `parti_jax.models.layers`'; the output
logits are float32. Their matmul takes float32 inputs, or with `model.logits_matmul="compute"`
the compute dtype's, accumulated in float32 (half the bytes read, a faster matmul on GPUs and
TPUs).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from parti_jax import config as config_lib
from parti_jax.models.layers import (CACHE_AXES, Stack, dense_init, embed_init, embedding_lookup,
                                     flat_dot_general, rotary_1d, rotary_2d)
from parti_jax.sharding import constrain
from parti_jax.text import PAD_ID


def _visible(m: ml_collections.ConfigDict, i, j):
  """Whether image position i may attend to position j: causal, and conv-shaped if set.

  The conv shape lets a token see the `conv_kernel_rows` rows ending at its own and the
  `conv_kernel_cols` columns centred on its own (the paper's sparse pattern).
  """
  mask = j <= i
  if m.decoder_attention == "conv":
    rows, cols = i // m.image_grid - j // m.image_grid, i % m.image_grid - j % m.image_grid
    mask &= (rows < m.conv_kernel_rows) & (abs(cols) <= m.conv_kernel_cols // 2)
  return mask


def decoder_mask(m: ml_collections.ConfigDict) -> np.ndarray:
  """[1, 1, N, N] boolean mask over the image raster (see `_visible`).

  A numpy array, known while tracing: XLA's attention applies it densely (it changes what
  is attended, not the compute spent); the splash kernel skips the blocks it hides.
  """
  n = m.image_grid ** 2
  return _visible(m, np.arange(n)[:, None], np.arange(n)[None, :])[None, None]


class Parti(nnx.Module):
  """Text tokens [B, T] and image tokens [B, N] -> float32 logits [B, N, padded codebook].

  Logits at position i predict image token i from the text and image tokens < i; the
  decoder input is the image sequence shifted right behind a BOS token (id codebook_size).
  Logits of padded vocabulary entries are masked to the float32 minimum.
  """

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # Parameters are created without a mesh; the jitted initialiser in
    # parti_jax.tasks.base.Setup lays them out by their logical names (no eager sharding).
    with nnx.use_eager_sharding(False):
      self._build(m, rngs)

  def _build(self, m, rngs):
    self.config = ml_collections.FrozenConfigDict(m)  # hashable: it lives in the graphdef
    self.dtype = jnp.dtype(m.dtype)
    d, grid = m.d_model, m.image_grid
    self.text_embed = nnx.Embed(config_lib.round_up(m.text_vocab_size), d, rngs=rngs,
                                embedding_init=embed_init(("vocab", "embed")))
    self.image_embed = nnx.Embed(config_lib.round_up(m.codebook_size + 1), d, rngs=rngs,
                                 embedding_init=embed_init(("vocab", "embed")))
    pos = nnx.with_partitioning(nnx.initializers.normal(0.02), ("length", "embed"))
    self.text_pos = nnx.Param(pos(rngs.params(), (m.text_len, d)))
    self.row_pos = nnx.Param(pos(rngs.params(), (grid, d)))
    self.col_pos = nnx.Param(pos(rngs.params(), (grid, d)))
    self.encoder = Stack(m, m.encoder_layers, cross=False, rngs=rngs)
    self.decoder = Stack(m, m.decoder_layers, cross=True, rngs=rngs)
    if not m.share_image_embedding:
      self.head = nnx.Linear(d, config_lib.round_up(m.codebook_size), use_bias=False, rngs=rngs,
                             kernel_init=dense_init(("embed", "vocab")))
    self.dropout = nnx.Dropout(m.dropout_rate)

  def encode(self, text_tokens, dropout_key=None):
    """Text tokens [B, T] -> encoder output [B, T, d_model] and key mask [B, 1, 1, T]."""
    x = embedding_lookup(self.text_embed, text_tokens) + self.text_pos[None, : text_tokens.shape[1]]
    x = self.dropout(x.astype(self.dtype), deterministic=dropout_key is None, rngs=dropout_key)
    x = constrain(x, "batch", "length", "embed")
    mask = (text_tokens != PAD_ID)[:, None, None, :]
    rotary = None
    if self.config.get("text_rope", False):  # runs saved before the field existed have none
      rotary = rotary_1d(jnp.arange(text_tokens.shape[1]), config_lib.head_dim(self.config))
    return self.encoder(x, mask, dropout_key=dropout_key, rotary=rotary), mask

  def _image_positions(self):
    """[N, d_model]: the row plus column embedding of each raster position."""
    d = self.config.d_model
    return (self.row_pos[:, None] + self.col_pos[None, :]).reshape(-1, d)

  def _rotary(self, positions):
    """The decoder's 2-D rotary (cos, sin) at raster `positions`; None if the model has none."""
    m = self.config
    if not m.get("image_rope", False):  # runs saved before the field existed have none
      return None
    return rotary_2d(positions // m.image_grid, positions % m.image_grid, config_lib.head_dim(m))

  def decode(self, image_inputs, encoded, text_mask, dropout_key=None):
    """Decoder input tokens [B, N] (BOS-shifted) -> float32 logits [B, N, V]."""
    return self._logits(self.decode_features(image_inputs, encoded, text_mask, dropout_key))

  def decode_features(self, image_inputs, encoded, text_mask, dropout_key=None):
    """`decode` up to the output projection: the decoder's output [B, N, d_model]."""
    m, n = self.config, image_inputs.shape[1]
    pos = self._image_positions()[:n]
    x = embedding_lookup(self.image_embed, image_inputs) + pos[None]
    x = self.dropout(x.astype(self.dtype), deterministic=dropout_key is None, rngs=dropout_key)
    x = constrain(x, "batch", "length", "embed")
    return self.decoder(x, decoder_mask(m)[..., :n, :n], encoded, text_mask,
                        dropout_key=dropout_key, rotary=self._rotary(jnp.arange(n)))

  def output_kernel(self):
    """The output projection [d_model, V] (tied: the scaled image embedding)."""
    m = self.config
    if m.share_image_embedding:
      # Tied output projection, scaled so logits start near unit variance.
      return self.image_embed.embedding[...].T * m.d_model ** -0.5
    return self.head.kernel[...]

  def _logits(self, x):
    return logits(self.config, x, self.output_kernel())

  # ----------------------------------------------------------- cached decoding (sampling)

  def init_cache(self, encoded, text_mask, cache_length: int) -> dict:
    """The decoding cache of a batch of encoded texts (`encode`'s outputs).

    Cross-attention keys and values are computed here, once; self-attention keys and
    values start empty in a fixed-size buffer of `cache_length` positions (at least the
    image length; more leaves room for a window of positions past the last token).
    """
    m, b = self.config, encoded.shape[0]
    shape = (m.decoder_layers, b, cache_length, m.num_heads, config_lib.head_dim(m))
    empty = constrain(jnp.zeros(shape, self.dtype), *CACHE_AXES)
    cross_k, cross_v = self.decoder.cross_keys_values(encoded)
    return dict(self_k=empty, self_v=empty, cross_k=constrain(cross_k, *CACHE_AXES),
                cross_v=constrain(cross_v, *CACHE_AXES), text_mask=text_mask)

  def decode_cached(self, inputs, start, cache: dict, attend_length: int | None = None):
    """Decoder inputs [B, S] at positions start[b] .. start[b] + S - 1 of each row.

    Returns float32 logits [B, S, V] (what `decode` gives at those positions) and the
    cache with the inputs' keys and values added. Each row has its own `start` [B], so
    rows may advance at different speeds. Positions past the image (up to the cache
    length) are allowed and their logits meaningless: they let a window run off the end.
    `attend_length` (static; default the whole cache): the self-attention reads only the
    cache's first positions, which must hold every position an active row can see
    (start[b] + S <= attend_length); a shorter one reads fewer bytes (the sampler's
    segments, `parti_jax.decoding`).
    """
    m, s = self.config, inputs.shape[1]
    n, cache_length = m.image_grid ** 2, cache["self_k"].shape[2]
    attend_length = cache_length if attend_length is None else attend_length
    if not 0 < attend_length <= cache_length:
      raise ValueError(f"attend_length={attend_length} is outside the cache's "
                       f"1..{cache_length} positions")
    positions = start[:, None] + jnp.arange(s)[None, :]
    table = constrain(self._image_positions(), None, None)  # gathered whole, as in _lookup
    pos = jnp.take(table, jnp.minimum(positions, n - 1), axis=0)
    rotary = self._rotary(jnp.minimum(positions, n - 1))
    x = constrain((embedding_lookup(self.image_embed, inputs) + pos).astype(self.dtype),
                  "batch", "length", "embed")
    mask = _visible(m, positions[:, :, None], jnp.arange(attend_length)[None, None, :])
    x, (self_k, self_v) = self.decoder.decode_cached(
        x, (cache["self_k"], cache["self_v"]), positions, mask[:, None],
        (cache["cross_k"], cache["cross_v"]), cache["text_mask"], rotary)
    cache = dict(cache, self_k=constrain(self_k, *CACHE_AXES),
                 self_v=constrain(self_v, *CACHE_AXES))
    return self._logits(x), cache

  def __call__(self, text_tokens, image_tokens, dropout_key=None):
    """Teacher-forced logits for `image_tokens` given the text; dropout iff a key is given."""
    return self._logits(self.features(text_tokens, image_tokens, dropout_key))

  def features(self, text_tokens, image_tokens, dropout_key=None):
    """`__call__` up to the output projection: the decoder's output [B, N, d_model], for a
    loss that projects it a chunk of positions at a time (parti_jax.tasks.parti)."""
    enc_key = dec_key = None
    if dropout_key is not None:
      enc_key, dec_key = jax.random.split(dropout_key)
    encoded, text_mask = self.encode(text_tokens, enc_key)
    bos = jnp.full_like(image_tokens[:, :1], self.config.codebook_size)
    inputs = jnp.concatenate([bos, image_tokens[:, :-1]], axis=1)
    return self.decode_features(inputs, encoded, text_mask, dec_key)


def logits(m: ml_collections.ConfigDict, x, kernel):
  """Decoder output [B, S, d_model] and the output kernel -> float32 logits [B, S, V], the
  padded vocabulary entries at the float32 minimum.

  `model.logits_matmul`: "float32" (inputs cast up) or "compute" (inputs in model.dtype,
  products accumulated in float32 by the matmul itself).
  """
  dtype = jnp.float32
  if m.get("logits_matmul", "float32") == "compute":  # runs saved before the field: float32
    dtype = jnp.dtype(m.dtype)
  out = flat_dot_general(x.astype(dtype), kernel.astype(dtype), (((2,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
  out = constrain(out, "batch", "length", "vocab")
  valid = jnp.arange(out.shape[-1]) < m.codebook_size
  return jnp.where(valid, out, jnp.finfo(jnp.float32).min)
