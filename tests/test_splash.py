"""Splash attention (parti_jax/models/splash.py): the Pallas TPU kernel, run here in Pallas'
interpreter against XLA's attention, over the 8-device mesh, and compiled for TPU slices by
the real TPU compiler (libtpu)."""

import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from test_loss_chunks import assert_close_trees, loss_grads_eval

from parti_jax import aot
from parti_jax.models import layers as layers_lib
from parti_jax.models import parti as parti_model
from parti_jax.models import splash

needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]')")


def _qkv(seed, batch, q_len, kv_len, heads=2, dim=16):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(batch, q_len, heads, dim))
  k, v = (rng.normal(size=(batch, kv_len, heads, dim)) for _ in range(2))
  return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _both(q, k, v, mask):
  """Outputs and input gradients of XLA's attention and of the splash kernel."""
  def run(attend):
    out, pull = jax.vjp(lambda q, k, v: attend(q, k, v, mask), q, k, v)
    cotangent = jnp.asarray(np.random.default_rng(9).normal(size=out.shape), out.dtype)
    return (out,) + pull(cotangent)
  xla = run(lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask))
  return xla, run(splash.attention)


def _conv_config():
  m = load_config("parti_tiny").model
  m.update(image_grid=6, decoder_attention="conv", conv_kernel_rows=2, conv_kernel_cols=3)
  return m


@pytest.mark.parametrize("kind", ["causal", "conv"])
def test_static_decoder_masks_match_xla_attention(kind):
  """The decoder's raster masks, on a length (36) that is not a whole block: the padded
  queries and keys change nothing."""
  m = load_config("parti_tiny").model if kind == "causal" else _conv_config()
  m.image_grid = 6
  mask = parti_model.decoder_mask(m)  # numpy [1, 1, 36, 36]
  assert isinstance(mask, np.ndarray)
  if kind == "conv":  # the conv shape hides more than the causal one
    assert mask.sum() < np.tril(np.ones((36, 36))).sum()
  xla, ours = _both(*_qkv(0, 2, 36, 36), mask)
  for name, a, b in zip(("out", "dq", "dk", "dv"), ours, xla):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=name)


def test_key_padding_masks_become_segments_in_self_and_cross_attention():
  """Text padding [B, 1, 1, T], as the encoder and the decoder's cross-attention use it:
  rows of different lengths, queries from a longer sequence than the keys."""
  valid = np.arange(10)[None, :] < np.asarray([3, 10])[:, None]  # 3 and 10 real tokens
  padding = jnp.asarray(valid)[:, None, None, :]
  for q_len in (10, 24):  # encoder self-attention; cross-attention from 24 image positions
    xla, ours = _both(*_qkv(q_len, 2, q_len, 10), padding)
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, xla):
      np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5, err_msg=f"{name}, {q_len}")
  # Padded keys get no gradient: nothing attended to them.
  assert not np.any(ours[2][0, 3:]) and not np.any(ours[3][0, 3:])


def test_a_traced_full_mask_is_refused_naming_what_it_takes():
  q, k, v = _qkv(1, 2, 8, 8)
  with pytest.raises(ValueError, match="static mask or a key-padding mask"):
    jax.jit(splash.attention)(q, k, v, jnp.ones((1, 1, 8, 8), bool))


def test_padded_mask_hides_padded_keys_and_lets_padded_queries_see_the_real_ones():
  mask = splash.padded_mask(np.tril(np.ones((3, 3), bool)), 3, 3)
  assert mask.shape == (128, 128)
  np.testing.assert_array_equal(mask[:3, :3], np.tril(np.ones((3, 3), bool)))
  assert not mask[:, 3:].any() and mask[3:, :3].all()
  assert splash._block(1024) == 512 and splash._block(384) == 128 and splash._block(256) == 256


def test_parti_loss_and_gradients_match_xla_attention_on_the_8_device_mesh():
  """The whole tiny Parti, heads split over a tensor axis of 2 and rows over data x fsdp:
  the kernel runs inside shard_map on each device's rows and heads; under the remat policy
  that keeps its residuals (qkv_up) too."""
  def tiny(impl, remat):
    c = load_config("parti_tiny")
    c.model.update(attention_impl=impl, dropout_rate=0.1, remat=remat)
    c.mesh.update(data=2, fsdp=2, tensor=2)
    return c
  params, xla = loss_grads_eval(tiny("xla", "none"), evaluate=False)
  _, ours = loss_grads_eval(tiny("splash", "qkv_up"), params, evaluate=False)
  assert np.isfinite(xla[0]) and xla[0] > 1.0
  np.testing.assert_allclose(ours[0], xla[0], rtol=1e-5)
  assert_close_trees(ours[2], xla[2], 1e-4)


def test_auto_attention_is_splash_on_tpus_and_resolved_by_the_mesh_being_traced():
  device = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)
  m = load_config("parti_350m").model
  for kind in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite"):
    assert layers_lib.attention_impl(m, device("tpu", kind)) == "splash"
  assert layers_lib.attention_impl(m, device("cpu", "cpu")) == "xla"
  assert layers_lib.attention_impl(m) == "xla"  # no mesh: the CPU this runs on


@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
@pytest.mark.parametrize("topology", ["v4-8", "v6e-4"])
def test_the_planner_compiles_the_train_step_with_splash_kernels(topology):
  """On TPU devices `auto` is splash: the compiled step holds Pallas (Mosaic) kernels, forward
  and backward, for the encoder's and the decoder's self- and cross-attention."""
  report = aot.plan(load_config("parti_tiny"), topology)
  assert report["fits"], report["overflow"]
  assert report["attention"] == "splash" and report["mosaic_kernels"] >= 6
  assert report["sequence_parallel"] is True  # the default, named in the report


@needs_libtpu
def test_xla_attention_on_a_tpu_has_no_kernels():
  from parti_jax import sharding, topologies
  config = load_config("parti_tiny")
  config.model.attention_impl = "xla"
  mesh = sharding.make_mesh(config, topologies.get("v4-8").devices())
  program = aot.MODES["train"](config, mesh)
  assert "tpu_custom_call" not in program.fn.lower(*program.args).as_text(dialect="hlo")


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p-8", "v6e-8"])
def test_parti_350m_lowers_with_splash_kernels_for_the_slice(topology):
  """The paper's 350M (1024 image tokens, 16 heads of 64): its train step lowers for the
  slice with the splash kernels in it (Pallas lowers them to Mosaic here, checking blocks
  and shapes). Compiling it takes minutes on this host, so the whole compile is the
  planner's figure instead (docs/scaling.md: 350M on v5e-16 with splash, 12.1 GiB per
  chip), as the tiny config's compiles above are the tests'."""
  from parti_jax import sharding, topologies
  config = load_config("parti_350m")
  config.update(global_batch_size=8, grad_accum_steps=1)
  mesh = sharding.make_mesh(config, topologies.get(topology).devices())
  program = aot.MODES["train"](config, mesh)
  hlo = program.fn.lower(*program.args).as_text(dialect="hlo")
  # Forward and backward of the encoder's, the decoder's self- and cross-attention.
  assert hlo.count('custom_call_target="tpu_custom_call"') >= 6


def test_rows_that_do_not_split_over_the_mesh_are_attended_whole_on_every_device():
  """A sampler's few prompts on a mesh with more batch shards than rows: shard_map needs even
  shards, so such rows (or heads) go whole to every device, with the same result."""
  from parti_jax import sharding
  config = load_config("parti_tiny")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config, jax.devices())
  q, k, v = _qkv(3, 2, 16, 16, heads=3)  # 2 rows over 4 batch shards, 3 heads over 2
  mask = np.tril(np.ones((1, 1, 16, 16), bool))

  @jax.jit
  def on_mesh(q, k, v):
    with sharding.activation_mesh(mesh, sharding.rules_of(config)):
      return splash.attention(q, k, v, mask)
  np.testing.assert_allclose(on_mesh(q, k, v), jax.nn.dot_product_attention(q, k, v, mask=mask),
                             rtol=2e-5, atol=2e-5)


def _kept_by_scan(head_dim: int, capsys) -> set[str]:
  """Shapes of what the tiny Parti's scanned layers keep for the backward pass under
  remat=qkv_up with splash attention (Pallas' interpreter), heads `head_dim` wide."""
  from helpers import saved_for_backward
  lines = saved_for_backward(capsys, attention_impl="splash", remat="qkv_up", head_dim=head_dim)
  return {l.split(" ", 1)[0] for l in lines if "output of scan" in l}


def test_qkv_up_keeps_the_kernels_residuals_only_for_heads_of_whole_lanes(capsys):
  """Tiny: 2 layers per stack, batch 2, 4 heads, 16 tokens padded to one 128-block. Heads
  of 128 keep the kernel's output [B, H, 128, D] and log-sum-exp; heads of 32, which a TPU
  would pad to 128 lanes, keep the output in the layer's layout with heads merged,
  [B, S, H x D], instead. Queries, keys and values are kept merged either way."""
  wide = _kept_by_scan(128, capsys)
  assert {"f32[2,2,4,128,128]", "f32[2,2,4,128]"} <= wide
  assert "f32[2,2,16,512]" in wide  # queries, keys, values
  narrow = _kept_by_scan(32, capsys)
  assert "f32[2,2,16,128]" in narrow  # queries, keys, values and the attention's output
  assert not any(shape.startswith("f32[2,2,4,128") for shape in narrow), narrow
  assert not any(shape.count(",") > 3 for shape in narrow), narrow  # nothing kept per head
