"""The output projection and loss: a chunked cross-entropy (model.loss_chunk) and the logits
matmul in the compute dtype (model.logits_matmul) against today's whole float32 logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from helpers import random_batch

from parti_jax import config as config_lib
from parti_jax import sharding
from parti_jax.tasks import parti as parti_task


def tiny(dtype="float32", **model):
  c = load_config("parti_tiny")
  c.model.update(dtype=dtype, dropout_rate=0.1, **model)  # 16 image positions, vocab 128
  return c


def loss_grads_eval(config, params=None, evaluate=True):
  setup = parti_task.Setup(config)
  params = params if params is not None else setup.init_state().params
  batch = sharding.place_global_batch(setup.batch_sharding, random_batch(config, seed=3))
  loss, accuracy, grads = parti_task.jit_loss_and_grads(setup)(
      params, batch, jax.random.key(7))  # with dropout: both paths draw the same masks
  metrics = parti_task.jit_eval_step(setup)(params, batch) if evaluate else None
  return params, jax.device_get((loss, accuracy, grads, metrics))


def assert_close_trees(a, b, rtol):
  """Every leaf within rtol of the other, relative to the leaf's largest magnitude."""
  def close(path, x, y):
    scale = max(float(np.abs(y).max()), 1e-12)
    assert np.abs(x - y).max() <= rtol * scale, (jax.tree_util.keystr(path),
                                                 np.abs(x - y).max() / scale)
  jax.tree_util.tree_map_with_path(close, a, b)


@pytest.mark.parametrize("dtype, rtol", [("float32", 1e-5), ("bfloat16", 1e-5)])
def test_chunked_loss_equals_the_whole_logits_loss(dtype, rtol):
  """Stated tolerance: loss, accuracy, gradients and evaluation metrics within 1e-5 of today's
  (relative; only the order of float32 sums differs), in float32 and bfloat16 models."""
  params, whole = loss_grads_eval(tiny(dtype))
  _, chunked = loss_grads_eval(tiny(dtype, loss_chunk=4), params)
  assert np.isfinite(whole[0]) and whole[0] > 1.0
  np.testing.assert_allclose(chunked[0], whole[0], rtol=rtol)
  assert chunked[1] == whole[1]  # the same argmax at every position
  assert_close_trees(chunked[2], whole[2], rtol)
  assert_close_trees(chunked[3], whole[3], rtol)


def test_logits_matmul_in_bfloat16_stays_close_to_float32():
  """Stated tolerance: with bfloat16 inputs (float32 accumulation) the loss is within 1e-2
  relative of the float32 matmul's, and every gradient within 5% of its largest entry."""
  params, f32 = loss_grads_eval(tiny("bfloat16"), evaluate=False)
  _, bf16 = loss_grads_eval(tiny("bfloat16", logits_matmul="compute", loss_chunk=8), params,
                            evaluate=False)
  np.testing.assert_allclose(bf16[0], f32[0], rtol=1e-2)
  assert_close_trees(bf16[2], f32[2], 5e-2)
  assert bf16[0] != f32[0]  # it did compute in bfloat16


def _lowered_text(config):
  setup = parti_task.Setup(config)
  batch = setup.abstract_batch()
  key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
  return parti_task.jit_loss_and_grads(setup).lower(
      setup.sharded_abstract_params(), batch, key).as_text()


def test_the_chunked_loss_never_holds_the_whole_float32_logits():
  whole = "tensor<8x16x128xf32>"  # [batch, positions, padded vocabulary]
  assert whole in _lowered_text(tiny())
  chunked = _lowered_text(tiny(loss_chunk=4))
  assert whole not in chunked and "tensor<8x4x128xf32>" in chunked


@pytest.mark.parametrize("chunk", [3, -4])
def test_a_chunk_that_does_not_divide_the_positions_is_refused(chunk):
  with pytest.raises(config_lib.ConfigError, match=f"model.loss_chunk={chunk}"):
    config_lib.check(tiny(loss_chunk=chunk), 8)
  with pytest.raises(config_lib.ConfigError, match="model.logits_matmul='float16'"):
    config_lib.check(tiny(logits_matmul="float16"), 8)
