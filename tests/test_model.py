"""Model behaviour: causality, masks, padded vocabulary, depth-independent lowering."""

import collections
import os
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config
from flax import nnx
from helpers import random_batch, saved_for_backward, setup_on

from parti_jax import config as config_lib
from parti_jax.models import layers as layers_lib
from parti_jax.models import parti as parti_model
from parti_jax.tasks import parti as parti_task

_forward = nnx.jit(lambda model, text, image: model(text, image))


@pytest.fixture(scope="module")
def tiny():
  c = load_config("parti_tiny")
  return c, parti_model.Parti(c.model, rngs=nnx.Rngs(0))


def test_logits_are_causal_in_the_image_tokens(tiny):
  c, model = tiny
  b = random_batch(c, batch_size=2)
  forward = lambda t, i: _forward(model, t, i)
  base = forward(b["text_tokens"], b["image_tokens"])
  changed = b["image_tokens"].copy()
  j = 7
  changed[:, j] = (changed[:, j] + 1) % c.model.codebook_size
  out = forward(b["text_tokens"], changed)
  # Logits at positions <= j predict tokens <= j from tokens < j: unaffected by token j.
  np.testing.assert_array_equal(out[:, : j + 1], base[:, : j + 1])
  assert not np.allclose(out[:, j + 1:], base[:, j + 1:])


def test_text_padding_is_ignored(tiny):
  c, model = tiny
  b = random_batch(c, batch_size=2)
  text = b["text_tokens"].copy()
  text[:, 5:] = 0
  forward = lambda t, i: _forward(model, t, i)
  base = forward(text, b["image_tokens"])
  # Make the padding embedding different: outputs must not move.
  model2 = nnx.clone(model)
  model2.text_embed.embedding[...] = model2.text_embed.embedding[...].at[0].add(3.0)
  other = _forward(model2, text, b["image_tokens"])
  np.testing.assert_allclose(other, base, rtol=1e-5, atol=1e-5)
  text[:, 3] = 0  # but a real token does matter
  assert not np.allclose(forward(text, b["image_tokens"]), base)


def test_padded_vocabulary_gets_no_probability(tiny):
  c, model = tiny
  b = random_batch(c, batch_size=2)
  logits = model(b["text_tokens"], b["image_tokens"])
  assert logits.dtype == jnp.float32
  assert logits.shape[-1] % 128 == 0 and logits.shape[-1] > c.model.codebook_size
  probs = jax.nn.softmax(logits, -1)
  assert float(probs[..., c.model.codebook_size:].max()) == 0.0


def test_rotary_attention_scores_depend_only_on_the_2d_offset():
  rng = np.random.default_rng(0)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32) for _ in range(2))

  def score(q_at, k_at):
    rotated = [layers_lib.rotate(x, layers_lib.rotary_2d(jnp.array([r]), jnp.array([c]), 16))
               for x, (r, c) in ((q, q_at), (k, k_at))]
    return np.asarray(jnp.sum(rotated[0] * rotated[1], -1))

  base = score((3, 5), (1, 4))
  np.testing.assert_allclose(score((6, 2), (4, 1)), base, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(score((3, 5), (1, 4)), score((1, 4), (-1, 3)), rtol=1e-5,
                             atol=1e-5)
  # Rows and columns are told apart: swapping the offset's axes changes the score.
  assert not np.allclose(score((3, 5), (2, 3)), score((3, 5), (1, 4)), atol=1e-3)
  # And the rotation keeps each vector's length.
  rotated = layers_lib.rotate(q, layers_lib.rotary_2d(jnp.array([7]), jnp.array([2]), 16))
  np.testing.assert_allclose(jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q, axis=-1),
                             rtol=1e-5)


def test_image_rope_changes_the_decoder_and_needs_head_dim_divisible_by_4(tiny):
  c, model = tiny
  b = random_batch(c, batch_size=2)
  rope = c.model.copy_and_resolve_references()
  rope.image_rope = True
  with_rope = parti_model.Parti(rope, rngs=nnx.Rngs(0))  # same seed: same parameters
  assert not np.allclose(_forward(with_rope, b["text_tokens"], b["image_tokens"]),
                         _forward(model, b["text_tokens"], b["image_tokens"]), atol=1e-4)
  bad = load_config("parti_tiny")
  bad.model.update(image_rope=True, d_model=72, num_heads=4)  # head dim 18
  with pytest.raises(config_lib.ConfigError, match="model.image_rope needs a head dimension"):
    config_lib.check(bad, 1)


def test_text_rope_makes_the_encoder_see_word_order(tiny):
  c, _ = tiny
  rope = c.model.copy_and_resolve_references()
  rope.text_rope = True
  encode = nnx.jit(lambda model, text: model.encode(text)[0])
  text = (jnp.arange(c.model.text_len) % (c.model.text_vocab_size - 1) + 1)[None]  # no pads
  swapped = text.at[:, 2].set(text[:, 4]).at[:, 4].set(text[:, 2])
  outputs = {}
  for name, m in (("plain", c.model), ("rope", rope)):
    model = parti_model.Parti(m, rngs=nnx.Rngs(0))
    # Without learned positions, attention alone is blind to order: two words swapped
    # leave the encoding of every other word as it was. Rotations by position are not.
    model.text_pos[...] = jnp.zeros_like(model.text_pos[...])
    outputs[name] = encode(model, text), encode(model, swapped)
  plain, rotated = outputs["plain"], outputs["rope"]
  np.testing.assert_allclose(plain[0][:, 0], plain[1][:, 0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(plain[0][:, 2], plain[1][:, 4], rtol=1e-5, atol=1e-5)
  assert not np.allclose(rotated[0][:, 0], rotated[1][:, 0], atol=1e-4)
  # 1-D rotations: a query-key score depends on the offset between positions only.
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 2, 16)), jnp.float32) for _ in range(2))
  score = lambda i, j: np.asarray(jnp.sum(
      layers_lib.rotate(q, layers_lib.rotary_1d(jnp.array([i]), 16))
      * layers_lib.rotate(k, layers_lib.rotary_1d(jnp.array([j]), 16)), -1))
  np.testing.assert_allclose(score(5, 2), score(9, 6), rtol=1e-5, atol=1e-5)
  assert not np.allclose(score(5, 2), score(5, 3), atol=1e-3)
  bad = load_config("parti_tiny")
  bad.model.update(text_rope=True, d_model=60, num_heads=4)  # head dim 15
  with pytest.raises(config_lib.ConfigError, match="model.text_rope needs an even head"):
    config_lib.check(bad, 1)


def test_unrolled_layers_compute_what_the_scanned_loop_does(tiny):
  c, model = tiny
  b = random_batch(c, batch_size=2)
  unrolled = c.model.copy_and_resolve_references()
  unrolled.scan_unroll = c.model.decoder_layers
  other = parti_model.Parti(unrolled, rngs=nnx.Rngs(0))  # same seed: same parameters
  scanned = _forward(model, b["text_tokens"], b["image_tokens"])
  np.testing.assert_allclose(_forward(other, b["text_tokens"], b["image_tokens"]), scanned,
                             rtol=1e-5, atol=1e-5)
  # The loop really is unrolled: one `while` fewer in the lowered program per stack.
  count = lambda m: nnx.jit(lambda m, t, i: m(t, i)).lower(
      m, b["text_tokens"], b["image_tokens"]).as_text().count("stablehlo.while")
  assert count(other) < count(model)
  bad = load_config("parti_tiny")
  bad.model.scan_unroll = 0
  with pytest.raises(config_lib.ConfigError, match="model.scan_unroll=0"):
    config_lib.check(bad, 1)


def test_conv_mask_is_causal_and_local():
  c = load_config("parti_tiny").model
  c.image_grid, c.decoder_attention, c.conv_kernel_rows, c.conv_kernel_cols = 5, "conv", 2, 3
  mask = np.asarray(parti_model.decoder_mask(c))[0, 0]
  q = 2 * 5 + 2  # row 2, column 2
  allowed = {int(k) for k in np.flatnonzero(mask[q])}
  # Row 1 columns 1..3 and row 2 columns 1..2 (causal: not column 3 of its own row).
  assert allowed == {6, 7, 8, 11, 12}
  c.decoder_attention = "dense"
  np.testing.assert_array_equal(np.asarray(parti_model.decoder_mask(c))[0, 0],
                                np.tril(np.ones((25, 25), bool)))


def test_the_dense_causal_mask_runs_as_the_causal_flag_and_computes_the_same(tiny, monkeypatch):
  """The decoder's static lower-triangular mask goes to the attention kernel as `is_causal`
  (cuDNN then skips the blocks above the diagonal); the logits are those of the mask."""
  c, model = tiny
  m = c.model.copy_and_resolve_references()
  assert m.decoder_attention == "dense"
  assert layers_lib.is_causal_mask(parti_model.decoder_mask(m))
  conv = m.copy_and_resolve_references()
  conv.decoder_attention, conv.conv_kernel_rows, conv.conv_kernel_cols = "conv", 2, 3
  assert not layers_lib.is_causal_mask(parti_model.decoder_mask(conv))
  tril = np.tril(np.ones((4, 4), bool))[None, None]
  assert not layers_lib.is_causal_mask(jnp.asarray(tril))  # built while tracing: an array
  assert not layers_lib.is_causal_mask(np.ones((1, 1, 4, 4), bool))
  assert not layers_lib.is_causal_mask(np.tril(np.ones((2, 1, 4, 4), bool)))  # per row

  calls = []
  real = jax.nn.dot_product_attention
  monkeypatch.setattr(jax.nn, "dot_product_attention",
                      lambda *a, **k: calls.append(k.get("is_causal")) or real(*a, **k))
  b = random_batch(c, batch_size=2)
  forward = lambda: nnx.jit(lambda m, t, i: m(t, i))(model, b["text_tokens"], b["image_tokens"])
  flagged = forward()
  assert True in calls  # the decoder's self-attention
  monkeypatch.setattr(layers_lib, "is_causal_mask", lambda mask: False)
  calls.clear()
  masked = forward()
  assert True not in calls
  np.testing.assert_allclose(flagged, masked, rtol=1e-5, atol=1e-5)


def test_lowered_train_step_does_not_grow_with_depth():
  sizes = []
  for layers in (2, 8):
    c = load_config("parti_tiny")
    c.model.encoder_layers = c.model.decoder_layers = layers
    setup = setup_on(c, (1, 8, 1), 8)
    lowered = parti_task.jit_train_step(setup).lower(setup.abstract_state(), setup.abstract_batch())
    sizes.append(len(lowered.as_text().splitlines()))
  # Scanned layers: one copy of the block in the program, whatever the depth.
  assert sizes[0] == sizes[1], sizes


def test_full_length_mask_attends_as_the_broadcast_mask_does():
  """The key-padding mask cuDNN gets (queries in full) must mean what the short one means."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32) for _ in range(3))
  keys = jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)[:, None, None, :]  # [B, 1, 1, S]
  full = layers_lib.full_length_mask(keys, 5, 5)
  assert full.shape == (2, 1, 5, 5)
  short_out = jax.nn.dot_product_attention(q, k, v, mask=keys)
  np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, v, mask=full), short_out,
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(jax.nn.dot_product_attention(q, k, v), short_out)  # the mask matters


def test_auto_attention_is_cudnn_on_nvidia_gpus_with_16_bit_heads_that_fit_splash_on_tpus():
  device = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)
  h100, cpu = device("gpu", "NVIDIA H100 80GB HBM3"), device("cpu", "cpu")
  m = load_config("parti_350m").model  # bf16, 16 heads of 64
  assert m.attention_impl == "auto"
  assert layers_lib.attention_impl(m, h100) == "cudnn"
  assert layers_lib.attention_impl(m, cpu) == "xla"
  assert layers_lib.attention_impl(m, device("tpu", "TPU v5 lite")) == "splash"
  assert layers_lib.attention_impl(m, device("gpu", "AMD Instinct MI300X")) == "xla"
  for change in (dict(dtype="float32"), dict(head_dim=256), dict(head_dim=60)):
    assert layers_lib.attention_impl(_changed(m, change), h100) == "xla", change
  assert layers_lib.attention_impl(_changed(m, dict(attention_impl="xla")), h100) == "xla"
  assert layers_lib.attention_impl(_changed(m, dict(attention_impl="cudnn")), cpu) == "cudnn"


def test_auto_remat_is_dots_on_gpus_and_none_elsewhere():
  device = lambda platform, kind: types.SimpleNamespace(platform=platform, device_kind=kind)
  assert load_config("parti_350m").model.remat == "auto"
  assert layers_lib.resolve_remat("auto", device("gpu", "NVIDIA H200")) == "dots"
  for other in (device("cpu", "cpu"), device("tpu", "TPU v5 lite")):
    assert layers_lib.resolve_remat("auto", other) == "none"
  for policy in ("none", "full", "dots", "qkv_up"):  # a policy named is the one used
    assert layers_lib.resolve_remat(policy, device("gpu", "NVIDIA H200")) == policy
  # On this CPU `auto` compiles the program `none` does (tests/test_gpu_plan.py: on a GPU,
  # the planner's step is the one with dots).
  lowered = []
  for policy in ("auto", "none"):
    c = load_config("parti_tiny")
    c.model.remat = policy
    setup = setup_on(c, (1, 8, 1), 8)
    lowered.append(parti_task.jit_train_step(setup).lower(
        setup.abstract_state(), setup.abstract_batch()).as_text(debug_info=False))
  assert lowered[0] == lowered[1]


def _changed(m, change):
  m = m.copy_and_resolve_references()
  m.update(change)
  return m


@pytest.mark.parametrize("name", ["parti_tiny", "vitvqgan_tiny"])
def test_an_attention_implementation_that_cannot_run_is_refused(name):
  bad = load_config(name)
  bad.model.attention_impl = "flash"
  with pytest.raises(config_lib.ConfigError, match="model.attention_impl='flash' is not one of"):
    config_lib.check(bad, 1)
  bad.model.update(attention_impl="cudnn", dtype="float32")
  with pytest.raises(config_lib.ConfigError, match="'cudnn' needs model.dtype bfloat16"):
    config_lib.check(bad, 1)
  bad.model.dtype = "bfloat16"
  config_lib.check(bad, 1)  # cuDNN with 16-bit matmuls is a valid request


# Runs in its own process: the suite's processes see only the 8 simulated CPU devices.
_CUDNN_AGAINST_XLA = """
import importlib.util, sys
import jax, jax.numpy as jnp, numpy as np, optax
from flax import nnx
sys.path.insert(0, "tests")
from helpers import random_batch  # not conftest: it would pin JAX to the CPU
from parti_jax.models import layers as layers_lib
from parti_jax.models import parti as parti_model

def tiny_config():
  spec = importlib.util.spec_from_file_location("parti_tiny", "configs/parti_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()

def loss_and_grad_norm(impl):
  c = tiny_config()
  c.model.update(dtype="bfloat16", attention_impl=impl)
  model = parti_model.Parti(c.model, rngs=nnx.Rngs(0))
  b = random_batch(c, batch_size=4)  # text padded to different lengths
  def loss(model):
    logits = model(b["text_tokens"], b["image_tokens"])
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), b["image_tokens"][..., None], -1)
    return -picked.mean()
  value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
  return float(value), float(optax.global_norm(grads))

if jax.default_backend() != "gpu":
  sys.exit(77)  # an NVIDIA card, but this JAX has no GPU backend
(xla_loss, xla_norm), (cudnn_loss, cudnn_norm) = map(loss_and_grad_norm, ("xla", "cudnn"))
print(xla_loss, cudnn_loss, xla_norm, cudnn_norm)
np.testing.assert_allclose(cudnn_loss, xla_loss, rtol=1e-2)
np.testing.assert_allclose(cudnn_norm, xla_norm, rtol=3e-2)
"""


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU")
def test_cudnn_attention_computes_what_xla_attention_does_on_a_gpu():
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  done = subprocess.run([sys.executable, "-c", _CUDNN_AGAINST_XLA], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if done.returncode == 77:
    pytest.skip("JAX has no GPU backend here")
  assert done.returncode == 0, done.stderr[-3000:]


def test_qkv_up_remat_keeps_the_per_head_and_mlp_activations_only(capsys):
  """`model.remat=qkv_up` keeps, of every layer, queries, keys, values and attention outputs
  (per head: split over the tensor axis on a mesh), the MLP's hidden layer and the layer's
  input, and recomputes the out and down projections, whose outputs "dots" keeps."""
  def scanned(lines):  # the scanned layers' residuals: [layers, ...] by shape
    return collections.Counter(l.split(" ", 1)[0] for l in lines if "output of scan" in l)
  kept, dots = (scanned(saved_for_backward(capsys, remat=remat, head_dim=32))
                for remat in ("qkv_up", "dots"))
  # Tiny: 2 layers per stack, batch 2, 16 text and 16 image tokens, d_model 64, here 4 heads
  # of 32, MLP 256. Encoder: q, k, v, attention; decoder: the same for self- and
  # cross-attention, each kept with its heads merged ([layers, B, S, 4 x 32]: on a TPU, heads
  # of 64 kept as [.., H, 64] would be padded to 128 lanes); the layer's input [.., 64].
  assert kept == {"f32[2,2,16,128]": 4 + 8, "f32[2,2,16,256]": 2, "f32[2,2,16,64]": 2}
  # "dots" keeps the matmul outputs (flattened to [layers, B x S, width]), the out and down
  # projections' among them: whole on every tensor shard. The planner's memory per chip with
  # each policy is in docs/scaling.md.
  assert dots["f32[2,32,64]"] >= 3 and "f32[2,32,64]" not in kept
