"""The layers both Transformers share: layer norm, attention (with rotary embeddings and
a KV cache), MLP, the pre-LN block and the scanned stack of blocks.

Layers of a stack are created with `nnx.vmap` (parameters get a leading "layers" axis) and
run with `nnx.scan`, so compile time does not grow with depth (`model.scan_unroll` layers
per loop iteration: more compiles longer, and runs a tiny model faster on a CPU).
Parameters are float32; matmuls run in `model.dtype`; layer norms and softmax are float32.
Every parameter and the main activations carry logical axis names, which
`parti_jax.sharding` maps onto the device mesh.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from parti_jax import config as config_lib
from parti_jax.models import splash
from parti_jax.sharding import compile_device, constrain

CACHE_AXES = ("layers", "batch", "length", "heads", "kv")

# Tokens as the attention and MLP projections take them: whole on every tensor shard.
TOKENS = ("batch", "length", "embed")
# The residual stream between sublayers, which the scan keeps for the backward pass at
# every layer. Under model.sequence_parallel (configs without the field: on) its length is
# split over the "residual_length" rule's axes, tensor by default: each block gathers its
# normalised input before the projections and reduce-scatters their outputs (the same bytes
# as the all-reduce it replaces), and what it keeps per token is d_model / tensor.
RESIDUAL = ("batch", "residual_length", "embed")


def residual_axes(m: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The logical axes of the residual stream: RESIDUAL, or TOKENS without sequence parallelism."""
  return RESIDUAL if m.get("sequence_parallel", True) else TOKENS


# Names of the activations the "qkv_up" policy keeps (jax.ad_checkpoint.checkpoint_name).
QKV, ATTENTION, MLP_UP = "qkv", "attention", "mlp_up"

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Keep queries, keys, values, attention outputs (and their kernel's residuals) and the
    # MLP's hidden layer, all split over the heads or mlp mesh axes; recompute the out and
    # down projections, which are cheap to redo and, without sequence parallelism
    # (model.sequence_parallel=False), whole on every tensor shard.
    "qkv_up": jax.checkpoint_policies.save_only_these_names(QKV, ATTENTION, MLP_UP),
}


def resolve_remat(remat: str, device=None) -> str:
  """`model.remat` resolved for `device` (default: the one the step being traced is compiled
  for, `parti_jax.sharding.compile_device`).

  "auto" is "dots" on GPUs: there, recomputing the elementwise work inside the backward
  pass's kernels costs less than writing it out in the forward pass and reading it back
  (350M on an H200 at batch 64: MFU 0.342 with dots against 0.284 with nothing
  recomputed; BENCHMARKS.md, 2026-12-04). Elsewhere "none": a TPU plan picks its policy
  per slice to fit its memory (docs/scaling.md), and on a CPU the small configs set theirs.
  """
  if remat != "auto":
    return remat
  device = device or compile_device()
  return "dots" if device.platform == "gpu" else "none"


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


def dense_init(names):
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), names)


def embed_init(names):
  return nnx.with_partitioning(nnx.initializers.normal(1.0), names)


def embedding_lookup(embed: nnx.Embed, ids):
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
  """`model.attention_impl` resolved for `device` (default: the one the step being traced
  is compiled for, `parti_jax.sharding.compile_device`).

  "auto" picks a fused kernel, one that neither writes nor keeps the attention matrix as
  XLA's attention does: on a TPU the Pallas splash kernel (parti_jax/models/splash.py); on
  an NVIDIA GPU cuDNN's, where it applies (16-bit matmuls, heads at most 128 wide in
  multiples of 8). Everywhere else (CPU, other GPUs, float32 on a GPU) XLA's attention.
  """
  return resolve_attention(m.attention_impl, m.dtype, config_lib.head_dim(m), device)


def resolve_attention(impl: str, dtype: str, head_dim: int, device=None) -> str:
  """`attention_impl` of the three fields it reads."""
  if impl != "auto":
    return impl
  device = device or compile_device()
  if device.platform == "tpu":
    return "splash"
  fits = dtype in ("bfloat16", "float16") and head_dim <= 128 and head_dim % 8 == 0
  nvidia = device.platform == "gpu" and "nvidia" in device.device_kind.lower()
  return "cudnn" if nvidia and fits else "xla"


class Attention(nnx.Module):
  """Multi-head attention; keys and values come from `context` (self or cross)."""

  def __init__(self, m: ml_collections.ConfigDict, rngs: nnx.Rngs):
    heads, dim, dtype = m.num_heads, config_lib.head_dim(m), jnp.dtype(m.dtype)
    proj = lambda: nnx.LinearGeneral(
        m.d_model, (heads, dim), use_bias=False, dtype=dtype, rngs=rngs,
        dot_general=flat_dot_general,
        kernel_init=dense_init(("embed", "heads", "kv")))
    self.query, self.key, self.value = proj(), proj(), proj()
    self.out = nnx.LinearGeneral(
        (heads, dim), m.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, rngs=rngs,
        dot_general=flat_dot_general,
        kernel_init=dense_init(("heads", "kv", "embed")))
    # Resolved when traced (`attend`): only then is the mesh, hence the device, known.
    self.impl, self.dtype_name, self.head_dim = m.attention_impl, m.dtype, dim

  def __call__(self, x, context, mask, rotary=None, out_axes=TOKENS):
    return self.attend(*self.project(x, context, rotary), mask, out_axes=out_axes)

  def project(self, x, context, rotary=None):
    """Queries of x, keys and values of context; queries and keys rotated if `rotary` is
    given (self-attention only: both at the same positions)."""
    q, (k, v) = self.queries(x), self.keys_values(context)
    if rotary is not None:
      q, k = rotate(q, rotary), rotate(k, rotary)
    return q, k, v

  def queries(self, x):
    return keep_per_head(constrain(self.query(x), "batch", "length", "heads", "kv"), QKV)

  def keys_values(self, context):
    k, v = self.key(context), self.value(context)
    return tuple(keep_per_head(constrain(t, "batch", "length", "heads", "kv"), QKV)
                 for t in (k, v))

  def attend(self, q, k, v, mask, impl=None, out_axes=TOKENS):
    """Queries [B, S, H, D] over keys and values [B, S_kv, H, D] -> [B, S, d_model],
    laid out by the logical `out_axes` (the residual stream's, or TOKENS when decoding)."""
    # jax.nn.dot_product_attention: softmax in float32, fused kernels where available.
    impl = impl or resolve_attention(self.impl, self.dtype_name, self.head_dim)
    if impl == "splash" and self.head_dim % splash.LANES == 0:
      # The kernel's own residuals (output, log-sum-exp), named for the remat policy: kept,
      # they spare its backward pass running it again.
      out = splash.attention(q, k, v, mask, residual_name=ATTENTION)
    elif impl == "splash":
      # Heads narrower than a TPU's 128 lanes: the kernel's output [B, H, S, D] would be
      # kept padded to 128 (twice its bytes for heads of 64). Keep it in this layer's
      # layout, as with XLA's attention, and let the backward pass run the kernel again
      # (20B on v4-512 at 16 micro-batches: 2.2 GiB less per chip; by count, 20B's attention
      # is about 2% of a forward pass's FLOPs).
      out = keep_per_head(splash.attention(q, k, v, mask), ATTENTION)
    else:
      causal = is_causal_mask(mask)
      if causal:
        mask = None  # the kernel builds it, and cuDNN skips the blocks above the diagonal
      if impl == "cudnn" and mask is not None:
        mask = full_length_mask(mask, q.shape[1], k.shape[1])
      out = keep_per_head(
          jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                       implementation=impl), ATTENTION)
    return constrain(self.out(out), *out_axes)


def keep_per_head(x, name: str):
  """`checkpoint_name(x, name)` for a per-head activation [B, S, H, D], named (so kept, by
  the qkv_up policy) with heads merged, [B, S, H x D].

  Why: a TPU tiles an array's minor dimension by 128 lanes, and where the splash kernel's
  layout ([B, H, S, D], D minor) reaches back to what the scan keeps, heads of 64 are kept
  at twice their bytes. Merged, the minor dimension is H x D, d_model for the paper's
  sizes (a multiple of 128). 20B on v4-512, mesh (4, 8, 8), 16 micro-batches: 25.3 GiB per
  chip with splash before, 20.9 after (BENCHMARKS.md). Elsewhere the reshapes are free.
  """
  b, s, heads, dim = x.shape
  return checkpoint_name(x.reshape(b, s, heads * dim), name).reshape(b, s, heads, dim)


def is_causal_mask(mask) -> bool:
  """Whether `mask` is a static (numpy) [1, 1, S, S] lower-triangular mask, the Parti
  decoder's dense causal one: passed as `is_causal` rather than as an array, cuDNN's fused
  attention computes only the blocks on and below the diagonal and reads no bias (a
  350M train step on an H200 spent 62 ms of 335 in attention with the mask as a bias,
  BENCHMARKS.md). Masks built while tracing (decoding, padding) stay arrays."""
  if not isinstance(mask, np.ndarray) or mask.ndim != 4 or mask.shape[:2] != (1, 1):
    return False
  n = mask.shape[-1]
  return mask.shape[-2] == n and np.array_equal(mask[0, 0], np.tril(np.ones((n, n), bool)))


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
        kernel_init=dense_init(names))
    self.up = dense(m.d_model, m.mlp_dim, ("embed", "mlp"))
    self.down = dense(m.mlp_dim, m.d_model, ("mlp", "embed"))

  def __call__(self, x, out_axes=TOKENS):
    h = constrain(jax.nn.gelu(checkpoint_name(self.up(x), MLP_UP)), "batch", "length", "mlp")
    return constrain(self.down(h), *out_axes)


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
    self.residual = residual_axes(m)

  def __call__(self, x, self_mask, context, cross_mask, dropout_key, rotary=None):
    keys = jax.random.split(dropout_key, 3) if dropout_key is not None else [None] * 3
    drop = lambda y, key: self.dropout(y, deterministic=key is None, rngs=key)
    # x is the residual stream; each sublayer gathers its normalised input whole (TOKENS).
    norm = lambda layer_norm, y: constrain(layer_norm(y), *TOKENS)
    h, out = norm(self.self_norm, x), self.residual
    x = x + drop(self.self_attn(h, h, self_mask, rotary, out_axes=out), keys[0])
    if self.cross:
      x = x + drop(self.cross_attn(norm(self.cross_norm, x), context, cross_mask, out_axes=out),
                   keys[1])
    x = x + drop(self.mlp(norm(self.mlp_norm, x), out_axes=out), keys[2])
    return constrain(x, *out)

  def decode_cached(self, x, cache, layer, positions, self_mask, cross_kv, cross_mask,
                    rotary=None):
    """The block for S new decoder inputs per row, at `positions` [B, S], against caches.

    Their keys and values are first written into `cache` = (keys, values), each
    [layers, B, cache_length, H, D], at (`layer`, row, positions); a row's positions are
    consecutive and must fit in the cache (a start past cache_length - S is moved back,
    which only a finished row may see). The queries then attend over the first
    A = `self_mask.shape[-1]` positions of the cache row (at most cache_length), the mask
    [B, 1, S, A] choosing what each sees: positions past A are not read. `cross_kv`: this
    layer's keys and values of the encoder output; `rotary`: the 2-D rotary (cos, sin)
    [B, S, D/2] of `positions`, if the model uses them (the cache holds rotated keys). Returns (x, cache). Dropout is off: this is inference.
    """
    h = self.self_norm(x)
    q, k, v = self.self_attn.project(h, h, rotary)
    cache = tuple(_write_rows(c, new, layer, positions[:, 0]) for c, new in zip(cache, (k, v)))
    # Decoding attends with XLA's kernels, which read this layer's slice of the stacked
    # cache where it lies. cuDNN's fused kernel would take it as a buffer of its own: the
    # GPU compiler then copies both slices at every layer and step (350M, batch 64 guided:
    # 24.0 GB a step instead of 10.0; BENCHMARKS.md). The few new tokens per row stay
    # whole on every tensor shard (TOKENS): too short to split.
    attend = self_mask.shape[-1]
    keys, values = (c[layer][:, :attend] for c in cache)
    x = x + self.self_attn.attend(q, keys, values, self_mask, impl="xla")
    q = self.cross_attn.queries(self.cross_norm(x))
    x = x + self.cross_attn.attend(q, *cross_kv, cross_mask, impl="xla")
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, *TOKENS), cache


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
    self.residual = residual_axes(m)
    self.final_norm = LayerNorm(m.d_model, jnp.dtype(m.dtype), rngs)  # Parti's extra LN

  def __call__(self, x, self_mask, context=None, cross_mask=None, dropout_key=None,
               rotary=None):
    def layer(x, block, key):
      return block(x, self_mask, context, cross_mask, key, rotary)

    remat = resolve_remat(self.remat)
    if remat != "none":
      # Inside a loop the forward and backward passes are separate loops, so XLA cannot
      # merge the recomputed forward into the first one and no barrier is needed. With every
      # layer unrolled the loops are gone: without the barrier XLA's common-subexpression
      # pass would drop the recomputation and keep the whole forward, as without remat.
      layer = nnx.remat(layer, policy=_REMAT_POLICIES[remat],
                        prevent_cse=self.unroll >= self.num_layers)
    keys = None if dropout_key is None else jax.random.split(dropout_key, self.num_layers)
    x = constrain(x, *self.residual)
    if context is not None:  # the encoder output: gathered once here, not in every layer
      context = constrain(context, *TOKENS)
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
