"""Model behaviour: causality, masks, padded vocabulary, depth-independent lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from flax import nnx
from helpers import random_batch, setup_on

from parti_jax import model as model_lib
from parti_jax import train_step as ts

_forward = nnx.jit(lambda model, text, image: model(text, image))


@pytest.fixture(scope="module")
def tiny():
  c = load_config("parti_tiny")
  return c, model_lib.Parti(c.model, rngs=nnx.Rngs(0))


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


def test_conv_mask_is_causal_and_local():
  c = load_config("parti_tiny").model
  c.image_grid, c.decoder_attention, c.conv_kernel_rows, c.conv_kernel_cols = 5, "conv", 2, 3
  mask = np.asarray(model_lib.decoder_mask(c))[0, 0]
  q = 2 * 5 + 2  # row 2, column 2
  allowed = {int(k) for k in np.flatnonzero(mask[q])}
  # Row 1 columns 1..3 and row 2 columns 1..2 (causal: not column 3 of its own row).
  assert allowed == {6, 7, 8, 11, 12}
  c.decoder_attention = "dense"
  np.testing.assert_array_equal(np.asarray(model_lib.decoder_mask(c))[0, 0],
                                np.tril(np.ones((25, 25), bool)))


def test_lowered_train_step_does_not_grow_with_depth():
  sizes = []
  for layers in (2, 8):
    c = load_config("parti_tiny")
    c.model.encoder_layers = c.model.decoder_layers = layers
    setup = setup_on(c, (1, 8, 1), 8)
    lowered = ts.jit_train_step(setup).lower(setup.abstract_state(), setup.abstract_batch())
    sizes.append(len(lowered.as_text().splitlines()))
  # Scanned layers: one copy of the block in the program, whatever the depth.
  assert sizes[0] == sizes[1], sizes
