"""Splash attention: the Pallas flash-attention kernel for TPUs, over the device mesh.

XLA's attention on a TPU writes every head's full score matrix to memory (1024 x 1024 per
head for Parti's decoder) and keeps it for the backward pass. The splash kernel
(`jax.experimental.pallas.ops.tpu.splash_attention`) works through query and key blocks
in on-chip memory, never writing that matrix, and skips blocks its mask hides entirely
(the upper half of causal attention, most of the conv-shaped decoder mask).

What is written here, and why the library does not do it for us:
- Mosaic kernels are not partitioned by the compiler, so the kernel runs inside
  `shard_map`: each device attends its own rows (batch over the batch mesh axes) and its
  own heads (over the heads mesh axes), whatever the logical axis rules say.
- The kernel takes lengths in whole blocks of 128 (TPU lanes). Queries and keys are padded
  up to that; padded keys are hidden from every query, and padded query rows see the real
  keys (a row that sees nothing would come out undefined) and are cut off again.
- Masks come as the attention layer's: a static boolean array (the decoder's causal or
  conv-shaped raster mask, a numpy array known while tracing), which becomes the kernel's
  block-sparse mask, or a key-padding mask [B, 1, 1, T] (text padding), which becomes the
  kernel's segment ids (real queries in segment 1 see keys in segment 1, the valid ones).
- The kernel does not scale the logits: queries are scaled by 1/sqrt(head_dim) first.

On a TPU it is compiled by Mosaic; elsewhere (tests on a CPU) it runs in Pallas' interpreter,
the same kernel code, slowly.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import spmd
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib
from jax.sharding import PartitionSpec as P

from parti_jax import sharding

LANES = 128  # the kernel's lengths come in multiples of this
MAX_BLOCK = 512  # query and key block length where the sequence allows (as MaxText's default)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(length: int) -> int:
  """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
  return next(b for b in (MAX_BLOCK, MAX_BLOCK // 2, LANES) if length % b == 0)


def padded_mask(static, q_len: int, kv_len: int) -> np.ndarray:
  """The [Sp, Tp] boolean mask the kernel sees: `static` ([S, T], or None: all visible) in
  the top-left corner, padded keys hidden from every row, padded query rows seeing the real
  keys."""
  sp, tp = _round_up(q_len, LANES), _round_up(kv_len, LANES)
  mask = np.zeros((sp, tp), bool)
  mask[:, :kv_len] = True
  if static is not None:
    mask[:q_len, :kv_len] = np.asarray(static, bool)
  return mask


def _kernel(mask: np.ndarray, heads: int, interpret: bool, residual_name: str | None):
  sp, tp = mask.shape
  bq, bkv = _block(sp), _block(tp)
  blocks = kernel_lib.BlockSizes(
      block_q=bq, block_kv=bkv, block_kv_compute=bkv,
      block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
      block_q_dq=bq, block_kv_dq=bkv)
  heads_mask = mask_lib.MultiHeadMask([mask_lib.NumpyMask(mask)] * heads)
  return kernel_lib.make_splash_mha(heads_mask, block_sizes=blocks, head_shards=1,
                                    q_seq_shards=1, interpret=interpret,
                                    residual_checkpoint_name=residual_name)


def attention(q, k, v, mask=None, residual_name: str | None = None):
  """Splash attention of queries [B, S, H, D] over keys and values [B, T, H, D] -> [B, S, H, D].

  `mask`: None, a static boolean array broadcastable to [1, 1, S, T] (numpy: known while
  tracing), or a key-padding mask [B, 1, 1, T] (traced, or numpy with a row per example). `residual_name`: the
  `checkpoint_name` of the kernel's residuals (its output and log-sum-exp), so that a remat
  policy can keep them instead of running the kernel again. Runs over the mesh
  `parti_jax.sharding.activation_mesh` set, if any, else as one device.
  """
  b, s, heads, dim = q.shape
  t = k.shape[1]
  static, key_valid = None, None
  if isinstance(mask, np.ndarray) and mask.shape[0] == 1:  # the same for every row
    static = np.broadcast_to(mask, (1, 1, s, t))[0, 0]
  elif mask is not None:
    if mask.shape != (b, 1, 1, t):
      raise ValueError(f"splash attention takes a static mask or a key-padding mask "
                       f"[{b}, 1, 1, {t}]; got a mask of shape {mask.shape}")
    key_valid = mask[:, 0, 0, :]
  kernel_mask = padded_mask(static, s, t)
  sp, tp = kernel_mask.shape
  q = q * jnp.asarray(1.0 / math.sqrt(dim), q.dtype)
  # The kernel's layout: [B, H, length, D], lengths padded to whole blocks.
  to_kernel = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, 0))
                                   ).transpose(0, 2, 1, 3)
  q, k, v = to_kernel(q, sp), to_kernel(k, tp), to_kernel(v, tp)
  segments = None
  if key_valid is not None:
    segments = (jnp.ones((b, sp), jnp.int32),
                jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, tp - t))))
  interpret = sharding.compile_device().platform != "tpu"

  def local(q, k, v, segments):  # one device's rows and heads
    run = _kernel(kernel_mask, q.shape[1], interpret, residual_name)
    if segments is None:
      return jax.vmap(run)(q, k, v)
    ids = kernel_lib.SegmentIds(*segments)
    return jax.vmap(lambda q, k, v, ids: run(q, k, v, segment_ids=ids))(q, k, v, ids)

  mesh = sharding.current_activation_mesh()
  if mesh is not None:
    rows, heads_axes = _split(mesh, "batch", b), _split(mesh, "heads", heads)
    qkv_spec, ids_spec = P(rows, heads_axes, None, None), P(rows, None)
    local = jax.shard_map(
        local, mesh=mesh, check_vma=False,
        in_specs=(qkv_spec,) * 3 + (None if segments is None else (ids_spec, ids_spec),),
        out_specs=qkv_spec)
  out = local(q, k, v, segments)
  return out.transpose(0, 2, 1, 3)[:, :s]


def _split(mesh, logical: str, size: int):
  """The mesh axes the current logical axis rules give `logical`, if they split `size`
  evenly (shard_map needs even shards); else None: every device takes the whole axis (a
  sampler's few prompts on a large mesh, say)."""
  axes = sharding.logical_to_mesh((logical,), spmd.get_logical_axis_rules())[0]
  return axes if size % sharding.shards(mesh, axes) == 0 else None
