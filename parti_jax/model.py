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

Layers of each stack are created with `nnx.vmap` (parameters get a leading "layers"
axis) and run with `nnx.scan`, so compile time does not grow with depth
(`model.scan_unroll` layers per loop iteration: more compiles longer, and runs a tiny
model faster on a CPU). Parameters are float32; matmuls run in `model.dtype`; layer
norms, softmax and the output logits are float32. Every parameter and the main
activations carry logical axis names, which `parti_jax.sharding` maps onto the device
mesh.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from parti_jax import config as config_lib
from parti_jax.sharding import constrain

PAD_ID = 0  # text padding; masked out of attention
# Logical axes of the decoding caches' keys and values [layers, batch, length, heads, kv].
CACHE_AXES = ("layers", "batch", "length", "heads", "kv")

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def flat_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                     out_sharding=None):
  """`lax.dot_general` for dense layers, computed as one 2-D matrix product.

  A layer contracts the trailing dims of [batch, length, ...] with the leading dims of its
  kernel. Flattening to [batch*length, k] @ [k, n] is a free reshape on every backend,
  and it matters on XLA:CPU, where the weight gradient of the unflattened product (two
  contracting dims) is markedly slower (train-step times in BENCHMARKS.md).
  """
  (lhs_contract, rhs_contract), (lhs_batch, _) = dimension_numbers
  n = len(lhs_contract)
  if (lhs_batch or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
      or tuple(rhs_contract) != tuple(range(n))):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)
  lead, k, out = lhs.shape[:-n], math.prod(rhs.shape[:n]), rhs.shape[n:]
  y = jnp.matmul(lhs.reshape(-1, k), rhs.reshape(k, -1), precision=precision,
                 preferred_element_type=preferred_element_type)
  return y.reshape(*lead, *out)


def _dense_init(names):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


def _embed_init(names):
  return nnx.with_partitioning(nnx.initializers.normal(1.0), names)


def _lookup(embed: nnx.Embed, ids):
  """Embedding lookup from the whole table, gathered like an FSDP weight.

  Gathering rows from a table sharded over vocab and embed would force the partitioner
  to replicate it anyway (with a warning); all-gathering it first is the clean version.
  """
  return jnp.take(constrain(embed.embedding[...], None, None), ids, axis=0)


class LayerNorm(nnx.Module):
  """LayerNorm computed in float32, returning the compute dtype."""

  def __init__(self, d_model: int, dtype, rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(
        d_model, dtype=jnp.float32, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), ("embed",)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("embed",)))
    self.dtype = dtype

  def __call__(self, x):
    return self.norm(x.astype(jnp.float32)).astype(self.dtype)


def attention_impl(m: ml_collections.ConfigDict, device=None) -> str:
  """`model.attention_impl` resolved for `device` (default: JAX's first device).

  "auto" picks cuDNN's fused kernel on an NVIDIA GPU where it applies: 16-bit matmuls and
  heads at most 128 wide, in multiples of 8. It neither writes nor keeps the attention
  matrix, which XLA's attention does; everywhere else (CPU, TPU, float32) XLA's attention.
  """
  if m.attention_impl != "auto":
    return m.attention_impl
  device = device or jax.devices()[0]
  dim = config_lib.head_dim(m)
  fits = m.dtype in ("bfloat16", "float16") and dim <= 128 and dim % 8 == 0
  nvidia = device.platform == "gpu" and "nvidia" in device.device_kind.lower()
  return "cudnn" if nvidia and fits else "xla"


class Attention(nnx.Module):
  """Multi-head attention; keys and values come from `context` (self or cross)."""

  def __init__(self, m: ml_collections.ConfigDict, rngs: nnx.Rngs):
    heads, dim, dtype = m.num_heads, config_lib.head_dim(m), jnp.dtype(m.dtype)
    proj = lambda: nnx.LinearGeneral(
        m.d_model, (heads, dim), use_bias=False, dtype=dtype, rngs=rngs,
        dot_general=flat_dot_general,
        kernel_init=_dense_init(("embed", "heads", "kv")))
    self.query, self.key, self.value = proj(), proj(), proj()
    self.out = nnx.LinearGeneral(
        (heads, dim), m.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, rngs=rngs,
        dot_general=flat_dot_general,
        kernel_init=_dense_init(("heads", "kv", "embed")))
    self.impl = attention_impl(m)

  def __call__(self, x, context, mask, rotary=None):
    return self.attend(*self.project(x, context, rotary), mask)

  def project(self, x, context, rotary=None):
    """Queries of x, keys and values of context; queries and keys rotated if `rotary` is
    given (self-attention only: both at the same positions)."""
    q, (k, v) = self.queries(x), self.keys_values(context)
    if rotary is not None:
      q, k = rotate(q, rotary), rotate(k, rotary)
    return q, k, v

  def queries(self, x):
    return constrain(self.query(x), "batch", "length", "heads", "kv")

  def keys_values(self, context):
    k, v = self.key(context), self.value(context)
    return tuple(constrain(t, "batch", "length", "heads", "kv") for t in (k, v))

  def attend(self, q, k, v, mask, impl=None):
    """Queries [B, S, H, D] over keys and values [B, S_kv, H, D] -> [B, S, d_model]."""
    # jax.nn.dot_product_attention: softmax in float32, fused kernels where available.
    impl = impl or self.impl
    if impl == "cudnn" and mask is not None:
      mask = full_length_mask(mask, q.shape[1], k.shape[1])
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    return constrain(self.out(out), "batch", "length", "embed")


def full_length_mask(mask, query_len: int, key_len: int):
  """A mask [B or 1, H or 1, S or 1, S_kv] broadcast to [B or 1, H or 1, S, S_kv].

  cuDNN's fused attention takes the mask as a bias and requires both sequence dimensions
  in full; the key-padding masks here ([B, 1, 1, T]) broadcast over queries, which XLA's
  attention accepts but cuDNN refuses. Batch and heads may stay 1.
  """
  return jnp.broadcast_to(mask, mask.shape[:2] + (query_len, key_len))


def _angles(positions, count: int):
  """[..., count]: positions turned at `count` geometrically spaced frequencies, from 1
  radian per position down towards 1/10000 (the base of 1-D rotary embeddings)."""
  freqs = 10_000.0 ** (-jnp.arange(count, dtype=jnp.float32) / count)
  return positions[..., None] * freqs


def rotary_1d(positions, head_dim: int):
  """cos and sin [..., head_dim // 2] of 1-D rotary embeddings at sequence `positions`.
  Written here, as rotary_2d, because flax has no rotary embedding layer."""
  angles = _angles(positions, head_dim // 2)
  return jnp.cos(angles), jnp.sin(angles)


def rotary_2d(rows, cols, head_dim: int):
  """cos and sin [..., head_dim // 2] of 2-D rotary embeddings at grid positions (rows, cols):
  the first half of the rotated pairs turns with the row, the second with the column."""
  angles = jnp.concatenate([_angles(rows, head_dim // 4), _angles(cols, head_dim // 4)], -1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate(x, rotary):
  """x [B, S, H, D] rotated pairwise (x_i, x_{i + D/2}) by `rotary` = (cos, sin) [.., S, D/2].

  cos and sin are [S, D/2] (every row at the same positions) or [B, S, D/2].
  """
  cos, sin = (t[..., None, :] for t in rotary)  # broadcast over heads
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
  return out.astype(x.dtype)


class MLP(nnx.Module):

  def __init__(self, m: ml_collections.ConfigDict, rngs: nnx.Rngs):
    dtype = jnp.dtype(m.dtype)
    dense = lambda i, o, names: nnx.Linear(
        i, o, use_bias=False, dtype=dtype, dot_general=flat_dot_general, rngs=rngs,
        kernel_init=_dense_init(names))
    self.up = dense(m.d_model, m.mlp_dim, ("embed", "mlp"))
    self.down = dense(m.mlp_dim, m.d_model, ("mlp", "embed"))

  def __call__(self, x):
    h = constrain(jax.nn.gelu(self.up(x)), "batch", "length", "mlp")
    return constrain(self.down(h), "batch", "length", "embed")


class Block(nnx.Module):
  """Pre-LN residual block: self-attention, optional cross-attention, feed-forward."""

  def __init__(self, m: ml_collections.ConfigDict, cross: bool, rngs: nnx.Rngs):
    dtype = jnp.dtype(m.dtype)
    self.self_norm, self.self_attn = LayerNorm(m.d_model, dtype, rngs), Attention(m, rngs)
    if cross:
      self.cross_norm, self.cross_attn = LayerNorm(m.d_model, dtype, rngs), Attention(m, rngs)
    self.cross = cross
    self.mlp_norm, self.mlp = LayerNorm(m.d_model, dtype, rngs), MLP(m, rngs)
    self.dropout = nnx.Dropout(m.dropout_rate)

  def __call__(self, x, self_mask, context, cross_mask, dropout_key, rotary=None):
    keys = jax.random.split(dropout_key, 3) if dropout_key is not None else [None] * 3
    drop = lambda y, key: self.dropout(y, deterministic=key is None, rngs=key)
    h = self.self_norm(x)
    x = x + drop(self.self_attn(h, h, self_mask, rotary), keys[0])
    if self.cross:
      x = x + drop(self.cross_attn(self.cross_norm(x), context, cross_mask), keys[1])
    x = x + drop(self.mlp(self.mlp_norm(x)), keys[2])
    return constrain(x, "batch", "length", "embed")

  def decode_cached(self, x, cache, layer, positions, self_mask, cross_kv, cross_mask,
                    rotary=None):
    """The block for S new decoder inputs per row, at `positions` [B, S], against caches.

    Their keys and values are first written into `cache` = (keys, values), each
    [layers, B, cache_length, H, D], at (`layer`, row, positions); a row's positions are
    consecutive and must fit in the cache (a start past cache_length - S is moved back,
    which only a finished row may see). The queries then
    attend over the whole cache row, `self_mask` [B, 1, S, cache_length] choosing what
    each sees. `cross_kv`: this layer's keys and values of the encoder output; `rotary`:
    the 2-D rotary (cos, sin) [B, S, D/2] of `positions`, if the model uses them (the
    cache holds rotated keys). Returns (x, cache). Dropout is off: this is inference.
    """
    h = self.self_norm(x)
    q, k, v = self.self_attn.project(h, h, rotary)
    cache = tuple(_write_rows(c, new, layer, positions[:, 0]) for c, new in zip(cache, (k, v)))
    # Decoding attends with XLA's kernel: a fused one gains nothing for a few queries.
    x = x + self.self_attn.attend(q, cache[0][layer], cache[1][layer], self_mask, impl="xla")
    q = self.cross_attn.queries(self.cross_norm(x))
    x = x + self.cross_attn.attend(q, *cross_kv, cross_mask, impl="xla")
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, "batch", "length", "embed"), cache


def _write_rows(cache, new, layer, start):
  """cache [layers, B, L, H, D] with row b's `new` [B, S, H, D] at (layer, start[b]).

  One scatter whose batch dimension is declared as such: each device updates its own
  rows in place (a plain scatter would gather every row's values to every device, and a
  vmapped update would transpose, hence copy, the whole cache at every layer). A start
  past L - S is moved back so the slice fits, as in `lax.dynamic_update_slice`.
  """
  b = new.shape[0]
  index = jnp.stack([jnp.full((b,), layer, jnp.int32), start.astype(jnp.int32)], -1)
  numbers = jax.lax.ScatterDimensionNumbers(
      update_window_dims=(1, 2, 3), inserted_window_dims=(0,),
      scatter_dims_to_operand_dims=(0, 2), operand_batching_dims=(1,),
      scatter_indices_batching_dims=(0,))
  return jax.lax.scatter(cache, index, new.astype(cache.dtype), numbers,
                         indices_are_sorted=True, unique_indices=True,
                         mode=jax.lax.GatherScatterMode.CLIP)


class Stack(nnx.Module):
  """`num_layers` Blocks with stacked parameters, run as one scanned (optionally remat) layer."""

  def __init__(self, m: ml_collections.ConfigDict, num_layers: int, cross: bool,
               rngs: nnx.Rngs):
    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(m, cross, rngs)

    self.blocks = make_blocks(rngs)
    self.num_layers = num_layers
    self.remat = m.remat
    self.unroll = m.get("scan_unroll", 1)  # configs saved before the field existed: 1
    self.final_norm = LayerNorm(m.d_model, jnp.dtype(m.dtype), rngs)  # Parti's extra LN

  def __call__(self, x, self_mask, context=None, cross_mask=None, dropout_key=None,
               rotary=None):
    def layer(x, block, key):
      return block(x, self_mask, context, cross_mask, key, rotary)

    if self.remat != "none":
      layer = nnx.remat(layer, policy=_REMAT_POLICIES[self.remat], prevent_cse=False)
    keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
    scan = nnx.scan(layer, in_axes=(nnx.Carry, 0, None if keys is None else 0),
                    out_axes=nnx.Carry, unroll=self.unroll)
    return self.final_norm(scan(x, self.blocks, keys))

  def cross_keys_values(self, context):
    """Every layer's cross-attention keys and values of `context`: two [layers, B, T, H, D]."""
    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def per_layer(block, context):
      return block.cross_attn.keys_values(context)
    return per_layer(self.blocks, context)

  def decode_cached(self, x, cache, positions, self_mask, cross_kv, cross_mask, rotary=None):
    """`Block.decode_cached` through every layer (scanned); returns (x, updated cache)."""
    def layer(carry, block, index, cross_k, cross_v):
      return block.decode_cached(carry[0], carry[1], index, positions, self_mask,
                                 (cross_k, cross_v), cross_mask, rotary)

    # The cache rides in the carry and is updated in place at each layer's index: as a
    # scanned output it would be copied whole at every step.
    scan = nnx.scan(layer, in_axes=(nnx.Carry, 0, 0, 0, 0), out_axes=nnx.Carry,
                    unroll=self.unroll)
    x, cache = scan((x, cache), self.blocks, jnp.arange(self.num_layers), *cross_kv)
    return self.final_norm(x), cache


def _visible(m: ml_collections.ConfigDict, i, j):
  """Whether image position i may attend to position j: causal, and conv-shaped if set.

  The conv shape lets a token see the `conv_kernel_rows` rows ending at its own and the
  `conv_kernel_cols` columns centred on its own (the paper's sparse pattern).
  """
  mask = j <= i
  if m.decoder_attention == "conv":
    rows, cols = i // m.image_grid - j // m.image_grid, i % m.image_grid - j % m.image_grid
    mask &= (rows < m.conv_kernel_rows) & (jnp.abs(cols) <= m.conv_kernel_cols // 2)
  return mask


def decoder_mask(m: ml_collections.ConfigDict) -> jax.Array:
  """[1, 1, N, N] boolean mask over the image raster (see `_visible`).

  It is applied as a dense mask: it changes what is attended, not the compute spent.
  """
  n = m.image_grid ** 2
  return _visible(m, jnp.arange(n)[:, None], jnp.arange(n)[None, :])[None, None]


class Parti(nnx.Module):
  """Text tokens [B, T] and image tokens [B, N] -> float32 logits [B, N, padded codebook].

  Logits at position i predict image token i from the text and image tokens < i; the
  decoder input is the image sequence shifted right behind a BOS token (id codebook_size).
  Logits of padded vocabulary entries are masked to the float32 minimum.
  """

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # Parameters are created without a mesh; the jitted initialiser in
    # parti_jax.train_step lays them out by their logical names (no eager sharding).
    with nnx.use_eager_sharding(False):
      self._build(m, rngs)

  def _build(self, m, rngs):
    self.config = ml_collections.FrozenConfigDict(m)  # hashable: it lives in the graphdef
    self.dtype = jnp.dtype(m.dtype)
    d, grid = m.d_model, m.image_grid
    self.text_embed = nnx.Embed(config_lib.round_up(m.text_vocab_size), d, rngs=rngs,
                                embedding_init=_embed_init(("vocab", "embed")))
    self.image_embed = nnx.Embed(config_lib.round_up(m.codebook_size + 1), d, rngs=rngs,
                                 embedding_init=_embed_init(("vocab", "embed")))
    pos = nnx.with_partitioning(nnx.initializers.normal(0.02), ("length", "embed"))
    self.text_pos = nnx.Param(pos(rngs.params(), (m.text_len, d)))
    self.row_pos = nnx.Param(pos(rngs.params(), (grid, d)))
    self.col_pos = nnx.Param(pos(rngs.params(), (grid, d)))
    self.encoder = Stack(m, m.encoder_layers, cross=False, rngs=rngs)
    self.decoder = Stack(m, m.decoder_layers, cross=True, rngs=rngs)
    if not m.share_image_embedding:
      self.head = nnx.Linear(d, config_lib.round_up(m.codebook_size), use_bias=False, rngs=rngs,
                             kernel_init=_dense_init(("embed", "vocab")))
    self.dropout = nnx.Dropout(m.dropout_rate)

  def encode(self, text_tokens, dropout_key=None):
    """Text tokens [B, T] -> encoder output [B, T, d_model] and key mask [B, 1, 1, T]."""
    x = _lookup(self.text_embed, text_tokens) + self.text_pos[None, : text_tokens.shape[1]]
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
    m, n = self.config, image_inputs.shape[1]
    pos = self._image_positions()[:n]
    x = _lookup(self.image_embed, image_inputs) + pos[None]
    x = self.dropout(x.astype(self.dtype), deterministic=dropout_key is None, rngs=dropout_key)
    x = constrain(x, "batch", "length", "embed")
    x = self.decoder(x, decoder_mask(m)[..., :n, :n], encoded, text_mask,
                     dropout_key=dropout_key, rotary=self._rotary(jnp.arange(n)))
    return self._logits(x)

  def _logits(self, x):
    """Decoder output [B, S, d_model] -> float32 logits, padded entries at the minimum."""
    m = self.config
    x = x.astype(jnp.float32)
    if m.share_image_embedding:
      # Tied output projection, scaled so logits start near unit variance.
      kernel = self.image_embed.embedding[...].T * m.d_model ** -0.5
    else:
      kernel = self.head.kernel[...]
    logits = flat_dot_general(x, kernel.astype(jnp.float32), (((2,), (0,)), ((), ())))
    logits = constrain(logits, "batch", "length", "vocab")
    valid = jnp.arange(logits.shape[-1]) < m.codebook_size
    return jnp.where(valid, logits, jnp.finfo(jnp.float32).min)

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

  def decode_cached(self, inputs, start, cache: dict):
    """Decoder inputs [B, S] at positions start[b] .. start[b] + S - 1 of each row.

    Returns float32 logits [B, S, V] (what `decode` gives at those positions) and the
    cache with the inputs' keys and values added. Each row has its own `start` [B], so
    rows may advance at different speeds. Positions past the image (up to the cache
    length) are allowed and their logits meaningless: they let a window run off the end.
    """
    m, s = self.config, inputs.shape[1]
    n, cache_length = m.image_grid ** 2, cache["self_k"].shape[2]
    positions = start[:, None] + jnp.arange(s)[None, :]
    table = constrain(self._image_positions(), None, None)  # gathered whole, as in _lookup
    pos = jnp.take(table, jnp.minimum(positions, n - 1), axis=0)
    rotary = self._rotary(jnp.minimum(positions, n - 1))
    x = constrain((_lookup(self.image_embed, inputs) + pos).astype(self.dtype),
                  "batch", "length", "embed")
    mask = _visible(m, positions[:, :, None], jnp.arange(cache_length)[None, None, :])
    x, (self_k, self_v) = self.decoder.decode_cached(
        x, (cache["self_k"], cache["self_v"]), positions, mask[:, None],
        (cache["cross_k"], cache["cross_v"]), cache["text_mask"], rotary)
    cache = dict(cache, self_k=constrain(self_k, *CACHE_AXES),
                 self_v=constrain(self_v, *CACHE_AXES))
    return self._logits(x), cache

  def __call__(self, text_tokens, image_tokens, dropout_key=None):
    """Teacher-forced logits for `image_tokens` given the text; dropout iff a key is given."""
    enc_key = dec_key = None
    if dropout_key is not None:
      enc_key, dec_key = jax.random.split(dropout_key)
    encoded, text_mask = self.encode(text_tokens, enc_key)
    bos = jnp.full_like(image_tokens[:, :1], self.config.codebook_size)
    inputs = jnp.concatenate([bos, image_tokens[:, :-1]], axis=1)
    return self.decode(inputs, encoded, text_mask, dec_key)
