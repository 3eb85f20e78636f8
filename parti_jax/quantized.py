"""The optimizer's first moment kept in int8, block-wise, as the Parti paper stored it.

An array is quantised in blocks of `block` consecutive entries along its last axis: each
block keeps int8 values and one float32 scale (its largest magnitude / 127), so a
parameter of N entries costs N bytes plus 4 N / block for the scales, against 2 N in
bfloat16. The values have the parameter's shape and shard like it; the scales have its
shape with the last axis counted in blocks.

Written here because optax keeps moments in float dtypes only (`accumulator_dtype`), and
neither optax nor flax has a block-quantised state.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

INT8_MAX = 127


def num_blocks(shape, block: int) -> int:
  """Blocks along the last axis (a scalar is one block of one; the last block may be short)."""
  n = shape[-1] if shape else 1
  return -(-n // block)


def scale_shape(shape, block: int) -> tuple[int, ...]:
  return tuple(shape[:-1]) + (num_blocks(shape, block),)


def _blocks(x, block: int):
  """x [..., n] -> [..., blocks, block], the last block padded with zeros."""
  x = x.reshape(x.shape or (1,))
  pad = num_blocks(x.shape, block) * block - x.shape[-1]
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
  return x.reshape(*x.shape[:-1], -1, block)


def quantize(x, block: int) -> tuple[jax.Array, jax.Array]:
  """float x -> (int8 values shaped like x, float32 scales [..., blocks]).

  Symmetric and round-to-nearest: a block's largest magnitude maps to +-127, so every
  entry is kept within half a step (scale / 2) of its value. An all-zero block has scale 0.
  """
  b = _blocks(x.astype(jnp.float32), block)
  scales = jnp.max(jnp.abs(b), axis=-1) / INT8_MAX
  safe = jnp.where(scales > 0, scales, 1.0)[..., None]
  q = jnp.clip(jnp.round(b / safe), -INT8_MAX, INT8_MAX).astype(jnp.int8)
  n = x.shape[-1] if x.shape else 1
  values = q.reshape(*q.shape[:-2], -1)[..., :n].reshape(x.shape)
  return values, scales


def dequantize(values, scales, block: int) -> jax.Array:
  """The float32 array that `quantize` returned `values` and `scales` for."""
  b = _blocks(values.astype(jnp.float32), block) * scales[..., None]
  n = values.shape[-1] if values.shape else 1
  return b.reshape(*b.shape[:-2], -1)[..., :n].reshape(values.shape)


class QuantizedEmaState(NamedTuple):
  """An EMA of updates, block-quantised: two trees shaped like the parameters' tree."""
  ema_values: Any  # int8, each shaped like its parameter
  ema_scales: Any  # float32, each shaped like its parameter with the last axis in blocks


def ema(decay: float, block: int) -> optax.GradientTransformation:
  """`optax.ema(decay, debias=False)` with its accumulator kept in int8 blocks of `block`.

  The update is the EMA as computed in float32 from the dequantised previous one (what
  optax.ema with a low-precision accumulator also returns); only what is kept between
  steps is quantised. Each tree of the state mirrors the parameters, so
  `optax.tree_map_params` (parti_jax.sharding.opt_state_shardings) finds them: the values
  take their parameter's sharding; the scales, shaped otherwise, keep it where their
  blocks split evenly (a rule of their own there, `_blocked_last_dim`).
  """
  if block < 1:
    raise ValueError(f"the int8 momentum's block size must be at least 1; got {block}")

  def init(params):
    return QuantizedEmaState(
        ema_values=jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.int8), params),
        ema_scales=jax.tree.map(lambda p: jnp.zeros(scale_shape(jnp.shape(p), block),
                                                    jnp.float32), params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(
        lambda g, v, s: decay * dequantize(v, s, block) + (1 - decay) * g.astype(jnp.float32),
        updates, state.ema_values, state.ema_scales)
    pairs = jax.tree.map(lambda m: quantize(m, block), mu)
    values, scales = jax.tree.transpose(jax.tree.structure(mu), jax.tree.structure((0, 0)), pairs)
    return jax.tree.map(lambda m, g: m.astype(g.dtype), mu, updates), \
        QuantizedEmaState(values, scales)

  return optax.GradientTransformation(init, update)
