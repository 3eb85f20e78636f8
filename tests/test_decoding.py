"""Cached decoding, guidance, filters, per-prompt seeds and speculative Jacobi decoding."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import load_config
from flax import nnx
from jax.sharding import PartitionSpec as P
from helpers import whole_cache_copies
from sampling_helpers import tiny_run
from scipy import stats

from parti_jax import decoding, sampling, sharding
from parti_jax import text as text_lib
from parti_jax.models import layers as layers_lib
from parti_jax.models import parti as parti_model

# Every filter at once, so the distribution test covers each of them.
FILTERED = decoding.Settings(guidance=2.0, temperature=1.2, top_k=16, top_p=0.95)
GREEDY = decoding.Settings(guidance=3.0, temperature=0)
N = 1024  # images per distribution; rows of the large batches
PROMPTS = ["a red circle", "two blue squares", "a large yellow star", "a green heart",
           "a purple diamond", "three white circles", "a black triangle", "a red square"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return sampling.load_run(tiny_run(tmp_path_factory))


@pytest.fixture(scope="module")
def samplers(run):
  """Samplers built once for the module (each compiles once), by (settings, batch size)."""
  made = {}

  def get(settings, batch_size):
    if (settings, batch_size) not in made:
      made[settings, batch_size] = decoding.Sampler(run.setup, settings, batch_size)
    return made[settings, batch_size]
  return get


def sjd(settings, window=16):
  return dataclasses.replace(settings, sjd_window=window)


def text_of(run, prompts):
  return np.stack([run.text_tokenizer.encode(p) for p in prompts])


def keys_of(seed, prompts, samples):
  return decoding.row_keys(seed, [decoding.prompt_id(p) for p in prompts], samples)


@pytest.mark.parametrize("image_rope,text_rope,unroll,prefix",
                         [(False, False, 1, False), (True, True, 2, True)])
def test_cached_logits_equal_the_full_forward_with_rows_at_their_own_positions(
    image_rope, text_rope, unroll, prefix):
  """Rows advance by different amounts per forward, with garbage past what they accept
  (as rejected drafts leave), under the conv-shaped mask (the dense one is the trained
  model's, checked by the greedy test), with and without rotary embeddings (the cache
  holds rotated keys) and with the layer loop scanned or unrolled. With `prefix`, forwards
  whose active rows' windows end within the first 8 positions attend only those (as the
  sampler's segments do)."""
  c = load_config("parti_tiny").model
  c.decoder_attention, c.conv_kernel_rows, c.conv_kernel_cols = "conv", 2, 3
  c.image_rope, c.text_rope, c.scan_unroll = image_rope, text_rope, unroll
  model = parti_model.Parti(c, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  text = rng.integers(3, c.text_vocab_size, (3, c.text_len)).astype(np.int32)
  text[:, 9:] = 0
  image = rng.integers(0, c.codebook_size, (3, 16)).astype(np.int32)
  full = np.asarray(nnx.jit(lambda m, t, i: m(t, i))(model, text, image))
  inputs = np.concatenate([np.full((3, 1), c.codebook_size), image[:, :-1]], 1)
  window, advance = 4, np.array([1, 2, 4])  # rows accept 1, 2 and 4 tokens a forward
  cache = nnx.jit(lambda m, t: m.init_cache(*m.encode(t), 16 + window - 1))(model, text)
  decode = nnx.jit(lambda m, chunk, start, cache, attend: m.decode_cached(
      chunk, start, cache, attend), static_argnums=4)
  start = np.zeros(3, np.int32)
  attended = set()
  while (start < 16).any():
    # Past each row's accepted part the window holds garbage, as rejected drafts would.
    chunk = rng.integers(0, c.codebook_size, (3, window)).astype(np.int32)
    for r in range(3):
      real = inputs[r, start[r]:start[r] + advance[r]]
      chunk[r, :len(real)] = real
    fits = (np.where(start < 16, start, 0) + window <= 8).all()
    attend = 8 if prefix and fits else None
    attended.add(attend)
    logits, cache = decode(model, chunk, jnp.asarray(start), cache, attend)
    for r in range(3):
      for s in range(min(advance[r], 16 - start[r])):
        # Equal up to float rounding: XLA may sum in another order for another shape
        # (bitwise equal on one CPU, 1e-6 apart on another).
        np.testing.assert_allclose(logits[r, s], full[r, start[r] + s], rtol=1e-5, atol=1e-5)
    start = np.minimum(start + advance, 16)
  assert attended == ({8, None} if prefix else {None})


@pytest.mark.parametrize("weights", ["trained", "perturbed"])
def test_cached_greedy_decoding_picks_the_uncached_argmax_tokens(run, samplers, weights):
  setup = run.setup
  params = run.params
  if weights == "perturbed":  # less confident weights, whose argmax varies more
    rng = np.random.default_rng(0)
    params = jax.device_put(
        jax.tree.map(lambda x: x + rng.normal(0, 0.3, x.shape).astype(x.dtype), params),
        setup.param_shardings)
  text, keys = text_of(run, PROMPTS), keys_of(0, PROMPTS, np.zeros(8))
  forward = jax.jit(lambda p, t, i: setup.model(p)(t, i))
  uncond = np.tile(text_lib.pad([], setup.config.model.text_len), (8, 1))
  expected = np.zeros((8, 16), np.int32)
  for i in range(16):  # every position: the full forward over the tokens so far
    c, u = (np.asarray(forward(params, t, expected))[:, i] for t in (text, uncond))
    expected[:, i] = np.argmax(u + GREEDY.guidance * (c - u), -1)
  cached = samplers(GREEDY, 8)(params, text, keys)
  np.testing.assert_array_equal(cached.tokens, expected)
  assert int(cached.forwards) == 16
  # Greedy speculative Jacobi decoding accepts exactly the argmax tokens, in fewer forwards.
  jacobi = samplers(sjd(GREEDY), 8)(params, text, keys)
  np.testing.assert_array_equal(jacobi.tokens, expected)
  assert int(jacobi.forwards) <= 16 and (jacobi.done_at <= jacobi.forwards).all()


@pytest.mark.parametrize("settings", [GREEDY, FILTERED, sjd(GREEDY), sjd(FILTERED, 4)],
                         ids=["greedy", "filtered", "sjd_greedy", "sjd_filtered"])
def test_segments_attending_part_of_the_cache_draw_the_same_tokens(run, samplers, settings):
  """A generation in segments of 4 cache positions (each step's self-attention reads only
  its segment's first positions) draws the tokens of one whole-cache segment, with the same
  forwards: the positions it leaves unread are those the mask hides."""
  text, keys = text_of(run, PROMPTS), keys_of(1, PROMPTS, np.arange(8))
  segmented = decoding.Sampler(run.setup, settings, 8, cache_block=4)
  assert segmented.segment_ends()[:4] == [4, 8, 12, 16]
  whole = samplers(settings, 8)
  assert whole.segment_ends() == [whole.cache_length]  # CACHE_BLOCK > the tiny 16 tokens
  got, expected = segmented(run.params, text, keys), whole(run.params, text, keys)
  np.testing.assert_array_equal(got.tokens, expected.tokens)
  assert int(got.forwards) == int(expected.forwards)
  np.testing.assert_array_equal(got.done_at, expected.done_at)


def test_a_step_attending_outside_the_cache_is_refused(run):
  sampler = decoding.Sampler(run.setup, GREEDY, 8)
  for bad in (0, sampler.cache_length + 1):
    with pytest.raises(ValueError, match=f"attend_length={bad} is outside the cache"):
      sampler.jit_step(bad)
  with pytest.raises(ValueError, match="cache_block=0"):
    decoding.Sampler(run.setup, GREEDY, 8, cache_block=0)


def homogeneity_p(a, b) -> float:
  """Chi-square p-value that two samples of a categorical come from one distribution.

  Categories seen fewer than 10 times in both samples together are pooled.
  """
  cats = np.union1d(a, b)
  table = np.array([[np.sum(x == c) for c in cats] for x in (a, b)])
  rare = table.sum(0) < 10
  table = np.concatenate([table[:, ~rare], table[:, rare].sum(1, keepdims=True)], 1)
  table = table[:, table.sum(0) > 0]
  return 1.0 if table.shape[1] < 2 else float(stats.chi2_contingency(table).pvalue)


def min_p(a, b) -> float:
  """The smallest p-value over each position's token histogram and the histogram of
  distinct codes per image (which sees how positions go together)."""
  distinct = lambda t: np.array([len(set(row)) for row in t])
  return min([homogeneity_p(a[:, j], b[:, j]) for j in range(a.shape[1])]
             + [homogeneity_p(distinct(a), distinct(b))])


def test_sjd_samples_the_distribution_of_token_by_token_decoding(run, samplers):
  n, prompt, other = N, "a red circle to the left of a blue square", "a green heart"
  text = text_of(run, [prompt] * n)
  samples = np.arange(n)
  # Independent draws (different seeds): the same seed would share noise between the two.
  plain = samplers(FILTERED, n)(run.params, text, keys_of(0, [prompt] * n, samples))
  jacobi = samplers(sjd(FILTERED), n)(run.params, text, keys_of(1, [prompt] * n, samples))
  # 17 tests at 1e-4: a false alarm rate under 0.2% (and fixed by the seeds). Resampling a
  # rejected draft from p instead of the residual gives p-values near 1e-8 here.
  assert min_p(plain.tokens, jacobi.tokens) > 1e-4
  # The test has the power to see a different distribution: another prompt's.
  different = samplers(FILTERED, n)(run.params, text_of(run, [other] * n),
                                    keys_of(2, [other] * n, samples))
  assert min_p(plain.tokens, different.tokens) < 1e-6
  # Forward passes: token by token one per token; SJD far fewer for most images.
  assert int(plain.forwards) == 16 and (plain.done_at == 16).all()
  assert int(jacobi.forwards) <= 16 and jacobi.done_at.max() == int(jacobi.forwards)
  assert 16 / jacobi.done_at.mean() > 2.5, np.bincount(jacobi.done_at)


@pytest.mark.parametrize("window", [0, 16])
def test_a_prompt_and_seed_give_the_same_image_in_any_batch(run, samplers, window):
  """A row's image depends on its prompt and sample index, not on its place in the batch
  or on the rows beside it (which, with SJD, advance at their own speeds)."""
  settings = sjd(FILTERED, window) if window else FILTERED
  n, prompt, other = N, "a red circle to the left of a blue square", "a green heart"
  rng = np.random.default_rng(0)
  prompts = [prompt] * n
  first = samplers(settings, n)(run.params, text_of(run, prompts),
                                keys_of(0, prompts, np.arange(n)))
  # The same rows shuffled, a quarter of them replaced by another prompt's.
  order = rng.permutation(n)
  mixed = [other if i % 4 == 0 else prompt for i in range(n)]
  second = samplers(settings, n)(run.params, text_of(run, mixed), keys_of(0, mixed, order))
  same = np.array([p == prompt for p in mixed])
  np.testing.assert_array_equal(second.tokens[same], first.tokens[order[same]])
  if not window:  # another batch size: another program, the same images
    rows = [5, 400, 3, N - 1, 0, 17, 64, 2]
    small = samplers(settings, 8)(run.params, text_of(run, [prompt] * 8),
                                  keys_of(0, [prompt] * 8, rows))
    np.testing.assert_array_equal(small.tokens, first.tokens[rows])


def test_filters_shape_the_distribution():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05, 0.0]]) + 1e-30)
  probs = lambda **kw: np.exp(decoding.log_probs(logits, decoding.Settings(**{'temperature': 1.0, **kw}), 4))[0]
  np.testing.assert_allclose(probs(), [0.5, 0.3, 0.15, 0.05, 0], atol=1e-6)
  np.testing.assert_allclose(probs(top_k=2), [0.625, 0.375, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(probs(top_p=0.8), [0.625, 0.375, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(probs(top_p=0.81), [0.5, 0.3, 0.15, 0, 0] / np.float32(0.95),
                             atol=1e-6)
  np.testing.assert_array_equal(probs(temperature=0), [1, 0, 0, 0, 0])
  hot = probs(temperature=2.0)
  assert hot[3] > 0.05 and hot[0] < 0.5  # flatter
  # Codes past num_codes (a tokenizer's smaller codebook) get nothing.
  narrow = np.exp(decoding.log_probs(logits, decoding.Settings(temperature=1.0), 2))[0]
  np.testing.assert_allclose(narrow, [0.625, 0.375, 0, 0, 0], atol=1e-6)
  # Guidance: rows (conditional, unconditional) pairs -> u + s (c - u).
  pairs = jnp.array([[1.0, 2.0], [0.5, 0.0]])
  np.testing.assert_allclose(decoding.guide(pairs, 3.0), [[2.0, 6.0]])


def test_the_decode_step_lowers_sharded_for_a_mesh():
  config = load_config("parti_tiny")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config, jax.devices())
  step, (params, state) = decoding.decode_step_and_args(config, mesh, 8, sjd(GREEDY, 4))
  # Rows over the batch axes, heads over tensor; the cache is laid out the same each step.
  assert state.cache["self_k"].sharding.spec == P(None, ("data", "fsdp"), None, "tensor", None)
  assert state.cache["self_k"].shape == (2, 16, 16 + 3, 4, 16)  # guided rows; window room
  assert state.proposals.shape == (8, 4, 128)
  compiled = step.lower(params, state).compile()
  assert compiled.output_shardings.cache["self_k"].spec == state.cache["self_k"].sharding.spec


def test_the_planned_decode_step_reads_weights_in_the_dtype_the_sampler_holds():
  """The planner's decode step (`python -m parti_jax.aot --mode sample`) takes the weights as
  `sampling.load_run` casts them: matrices in the model's dtype, vectors float32. Planned
  with float32 weights, it would count twice their bytes and convert them every step."""
  config = load_config("parti_tiny")
  config.model.dtype = "bfloat16"
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config, jax.devices())
  _, (params, _) = decoding.decode_step_and_args(config, mesh, 8)
  leaves = jax.tree.leaves(params)
  assert {x.dtype for x in leaves if x.ndim >= 2} == {jnp.dtype(jnp.bfloat16)}
  assert {x.dtype for x in leaves if x.ndim < 2} == {jnp.dtype(jnp.float32)}  # final norms
  # Shardings kept: the cast weights are laid out as the sampler's.
  assert all(x.sharding is not None for x in leaves)


def test_the_compiled_decode_step_updates_the_kv_cache_in_place():
  """Read from the compiled step: the self-attention caches are donated (their buffers are
  the outputs') and no instruction copies a whole cache: each step writes its new keys and
  values into the cache where it lies. (tests/test_gpu_plan.py: the same on a GPU's
  compiler.)"""
  config = load_config("parti_tiny")
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mesh = sharding.make_mesh(config, jax.devices())
  copies, aliased, cache_bytes = whole_cache_copies(config, mesh, 8)
  assert aliased >= cache_bytes
  assert copies == [], copies[:3]
