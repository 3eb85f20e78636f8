"""Sampling image tokens from Parti: cached decoding, guidance, filters, seeds, SJD.

  sampler = decoding.Sampler(setup, decoding.Settings(top_k=256), batch_size=16)
  out = sampler(params, text_tokens, decoding.row_keys(seed, prompt_ids, sample_indices))
  out.tokens  # int32 [B, image_grid**2]

The encoder runs once per prompt (`prefill`), which also computes every decoder layer's
cross-attention keys and values; self-attention keys and values go into a fixed-size cache.
`step` extends every row by one token (or, with speculative Jacobi decoding, by however
many of its window it accepts), and `generate` is prefill then `lax.while_loop`s of
steps, one jitted program. The loop runs in segments of `CACHE_BLOCK` cache positions
(`Sampler`'s `cache_block`): while every active row's window ends within the first E
positions, a step's self-attention reads only those E (`Parti.decode_cached`'s
`attend_length`), not the whole fixed-size cache (1,024 image tokens: 56% of the cache
bytes of whole-cache steps; the program holds one step per segment).
Rows are sharded over the batch mesh axes and heads over `tensor`, by the model's logical
axis names.

Classifier-free guidance doubles the rows: row 2i holds prompt i, row 2i+1 the
unconditional input that caption dropout trained (`[END, PAD, ...]`), so the two halves
of a guided pair sit on the same device and combine without communication:
logits = u + s (c - u). Temperature, top-k and top-p then shape the distribution.

Every row's randomness comes from its own key (`row_keys`: the seed, the prompt and the
sample index), never from its place in the batch, so a prompt and seed give the same
image in any batch.

Speculative Jacobi decoding (`Settings.sjd_window` = W): each row keeps W draft tokens
for the positions after its last accepted one. One forward over [last token, drafts]
gives the guided, filtered distribution p at each of the W positions; drafts are checked
left to right, draft x accepted if u < p(x) / q(x), q being the distribution it was
drawn from (one-hot for a fresh draft), and the first rejected position is resampled from
normalize(max(0, p - q)). That is speculative sampling's rule, so tokens follow the same
distribution as token-by-token decoding. Samples of p at the positions after the new
ones become the next drafts (with q = p); copies of the last of them (one-hot q) fill the
rest of the window. Each row advances by its own accepted length (its own cache
position); a batch ends when its last row does.

Two choices of ours, neither of which changes the distribution: a position's draft is
drawn with that position's own noise at every forward (the noise token-by-token decoding
uses there), so a draft whose distribution barely moved stays the same token and is then
accepted; and fresh drafts repeat the last draft rather than a random code, which a
large codebook would almost always reject. On the tiny trained model the first cuts the
forwards a batch of 8 needs by a sixth to a fifth.
"""

import dataclasses
import functools
import zlib
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from parti_jax import config as config_lib
from parti_jax import sharding
from parti_jax import text as text_lib
from parti_jax.models.layers import CACHE_AXES


@dataclasses.dataclass(frozen=True)
class Settings:
  """How tokens are drawn. Static: a change recompiles the sampler.

  The defaults are the project's one set, which the sample command, the notebook, the demo
  and the planner take from here: guidance 1.5 and temperature 0.2 drew the most prompts
  right on the demo's model (91.9% of 2,000; 1.5 / 0.5: 89.0%, 2.5 / 0.5: 67.5%;
  BENCHMARKS.md). Models trained on other data may want other values.
  """
  guidance: float = 1.5  # classifier-free guidance scale s; 1 turns guidance (and doubling) off
  temperature: float = 0.2  # 0: greedy (argmax)
  top_k: int = 0  # keep the k most likely codes (0: all)
  top_p: float = 1.0  # keep the smallest set of codes whose probability reaches p (1: all)
  sjd_window: int = 0  # speculative Jacobi decoding with this many drafts (0: token by token)
  num_codes: int = 0  # sample only codes below this, e.g. a smaller tokenizer's (0: all)

  @property
  def guided(self) -> bool:
    return self.guidance != 1.0


@flax.struct.dataclass
class DecodeState:
  """Everything the decode loop carries; rows of prompts B, rows of the model R (2B guided)."""
  cache: dict  # the model's decoding cache (`Parti.init_cache`), R rows
  tokens: jax.Array  # int32 [B, N + W]: the image tokens, and room for a window past the end
  pos: jax.Array  # int32 [B]: tokens accepted so far (the next position to fill)
  keys: jax.Array  # uint32 [B, ...]: each row's key data
  forwards: jax.Array  # int32 []: decoder forward passes so far
  done_at: jax.Array  # int32 [B]: the forward pass that completed each row
  drafts: Any = None  # SJD: int32 [B, W], guesses for positions pos .. pos + W - 1
  proposals: Any = None  # SJD: float32 [B, W, V], the distribution each draft came from


@flax.struct.dataclass
class Output:
  tokens: jax.Array  # int32 [B, N]
  forwards: jax.Array  # int32 []: decoder forward passes the batch took
  done_at: jax.Array  # int32 [B]: forward passes each row needed


def prompt_id(prompt: str) -> int:
  """A stable 31-bit number of a prompt's text (not Python's salted `hash`)."""
  return zlib.crc32(prompt.encode("utf-8")) & 0x7FFFFFFF


@jax.jit
def _row_keys(seed, prompt_ids, samples):
  base = jax.random.key(seed)
  keys = jax.vmap(lambda p, s: jax.random.fold_in(jax.random.fold_in(base, p), s))(
      prompt_ids, samples)
  return jax.random.key_data(keys)


def row_keys(seed: int, prompt_ids, sample_indices) -> np.ndarray:
  """Key data [B, ...] of each row from (seed, prompt id, sample index) alone."""
  ids = np.asarray(prompt_ids, np.uint32)
  return np.asarray(_row_keys(np.uint32(seed), ids, np.asarray(sample_indices, np.uint32)))


def guide(logits, scale: float):
  """Interleaved (conditional, unconditional) rows [2B, ...] -> guided logits [B, ...]."""
  pairs = logits.reshape(-1, 2, *logits.shape[1:])
  cond, uncond = pairs[:, 0], pairs[:, 1]
  return uncond + scale * (cond - uncond)


def log_probs(logits, s: Settings, num_codes: int):
  """Guided float32 logits [..., V] -> log-probabilities of the distribution sampled from.

  Codes at or past `num_codes` (the padded vocabulary, codes a tokenizer lacks) get none.
  """
  valid = jnp.arange(logits.shape[-1]) < num_codes
  x = jnp.where(valid, logits, -jnp.inf)
  if s.temperature == 0:
    return jnp.where(jax.nn.one_hot(jnp.argmax(x, -1), x.shape[-1], dtype=bool), 0.0, -jnp.inf)
  x = x / s.temperature
  if s.top_k:
    kth = jax.lax.top_k(x, s.top_k)[0][..., -1:]
    x = jnp.where(x >= kth, x, -jnp.inf)
  if s.top_p < 1:
    ordered = -jnp.sort(-x, axis=-1)
    probs = jax.nn.softmax(ordered, -1)
    # Keep a code while the mass of the codes before it is below p (the first always).
    kept = jnp.sum(jnp.cumsum(probs, -1) - probs < s.top_p, -1, keepdims=True)
    x = jnp.where(x >= jnp.take_along_axis(ordered, kept - 1, -1), x, -jnp.inf)
  return jax.nn.log_softmax(x, -1)


# Streams of a row's randomness: the token at each position (the same in token-by-token
# and speculative decoding), each SJD forward's verification and resampling, first drafts.
_TOKENS, _SJD, _FIRST_DRAFTS = 0, 1, 2

# Cache positions per segment of the generation loop. Each segment compiles the step again,
# so shorter ones read fewer bytes but compile longer: 350M's 1,024 image tokens take 8
# segments, which read 56% of the cache a whole-cache step reads; a cache of at most 128
# positions (the tests', the demo's) keeps one segment.
CACHE_BLOCK = 128


def _stream(keys, stream: int, index):
  """Key of each row [B] for (stream, index [B]) from its key data [B, ...]."""
  return jax.vmap(lambda k, i: jax.random.fold_in(
      jax.random.fold_in(jax.random.wrap_key_data(k), stream), i))(keys, index)


def _categorical(keys, logp):
  """One draw per row from log-probabilities [B, ..., V] with each row's own key."""
  return jax.vmap(lambda k, lp: jax.random.categorical(k, lp))(keys, logp)


def _at(x, index):
  """x[b, index[b]] for x [B, L, ...] and index [B]."""
  return jnp.take_along_axis(x, index.reshape(-1, 1, *[1] * (x.ndim - 2)), 1)[:, 0]


class Sampler:
  """Jitted prefill, decode step and whole generation for one batch size and settings.

  `prefill(params, text_tokens [B, T], keys [B, ...]) -> DecodeState`,
  `step(params, state) -> state` (the state is donated), and
  `generate(params, text_tokens, keys) -> Output`. Calling the sampler runs `generate`.
  B must be a multiple of the batch shards (data x fsdp); pad the rows otherwise.
  """

  def __init__(self, setup, settings: Settings, batch_size: int,
               cache_block: int = CACHE_BLOCK):
    m = setup.config.model
    self.setup, self.settings, self.batch_size = setup, settings, batch_size
    if cache_block < 1:
      raise ValueError(f"cache_block={cache_block}: a segment needs at least one position")
    self.cache_block = cache_block
    self.image_len = m.image_grid ** 2
    self.window = min(settings.sjd_window, self.image_len)
    # A window may run up to W - 1 positions past the last token.
    self.cache_length = self.image_len + max(self.window - 1, 0)
    self.num_codes = settings.num_codes or m.codebook_size
    if self.num_codes > m.codebook_size:
      raise ValueError(f"num_codes={self.num_codes} exceeds the model's codebook "
                       f"({m.codebook_size})")
    mesh, rules = setup.mesh, setup.rules
    batch = sharding.batch_sharding(mesh, rules)
    ways = _batch_ways(batch)
    if batch_size % ways:
      raise ValueError(f"batch size {batch_size} is not a multiple of the batch shards ({ways})")
    self._batch = batch
    self._replicated = NamedSharding(mesh, P())
    cache = NamedSharding(mesh, sharding.logical_to_mesh(CACHE_AXES, rules))
    sjd = batch if self.window else None
    self.state_shardings = DecodeState(
        cache=dict(self_k=cache, self_v=cache, cross_k=cache, cross_v=cache, text_mask=batch),
        tokens=batch, pos=batch, keys=batch, forwards=self._replicated, done_at=batch,
        drafts=sjd, proposals=sjd)
    params = setup.param_shardings
    self.prefill = jax.jit(self._traced(self._prefill), in_shardings=(params, batch, batch),
                           out_shardings=self.state_shardings)
    self.step = self.jit_step()
    self.generate = jax.jit(self._traced(self._generate), in_shardings=(params, batch, batch),
                            out_shardings=Output(batch, self._replicated, batch))

  def __call__(self, params, text_tokens, keys) -> Output:
    return jax.device_get(self.generate(params, text_tokens, keys))

  def jit_step(self, attend_length: int | None = None):
    """`step`, jitted, its self-attention reading the cache's first `attend_length`
    positions (default all), as the generation's segment that ends there does."""
    if attend_length is not None and not 0 < attend_length <= self.cache_length:
      raise ValueError(f"attend_length={attend_length} is outside the cache's "
                       f"1..{self.cache_length} positions")
    step = functools.partial(self._step, attend_length=attend_length)
    return jax.jit(self._traced(step), in_shardings=(self.setup.param_shardings,
                                                     self.state_shardings),
                   out_shardings=self.state_shardings, donate_argnums=1)

  # --------------------------------------------------------------- abstract arguments

  def abstract_inputs(self):
    """(params, text_tokens, keys) as ShapeDtypeStructs with their shardings."""
    s = self.setup
    params = s.sharded_abstract_params()
    key_data = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))
    text = jax.ShapeDtypeStruct((self.batch_size, s.config.model.text_len), jnp.int32,
                                sharding=self._batch)
    keys = jax.ShapeDtypeStruct((self.batch_size, *key_data.shape), key_data.dtype,
                                sharding=self._batch)
    return params, text, keys

  def abstract_step_args(self):
    """(params, state) of `step` as ShapeDtypeStructs with their shardings (for AOT), the
    weights in the model's dtype as the sampler holds them (`sampling.load_run`)."""
    params, text, keys = self.abstract_inputs()
    params = cast_params(params, self.setup.config.model.dtype)
    state = jax.eval_shape(self.prefill, params, text, keys)
    state = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                         state, self.state_shardings)
    return params, state

  # ------------------------------------------------------------------- traced bodies

  def _traced(self, fn):
    def wrapped(params, *args):
      with sharding.activation_mesh(self.setup.mesh, self.setup.rules):
        return fn(params, *args)
    return wrapped

  def _rows(self, x):
    """Per-prompt rows -> the model's rows (each twice when guided)."""
    return jnp.repeat(x, 2, axis=0) if self.settings.guided else x

  def _log_probs(self, logits):
    if self.settings.guided:
      logits = guide(logits, self.settings.guidance)
    return log_probs(logits, self.settings, self.num_codes)

  def _prefill(self, params, text_tokens, keys):
    model, b, w = self.setup.model(params), text_tokens.shape[0], self.window
    if self.settings.guided:
      uncond = jnp.broadcast_to(text_lib.unconditional(text_tokens.shape[1]), text_tokens.shape)
      text_tokens = jnp.stack([text_tokens, uncond], 1).reshape(2 * b, -1)
    encoded, text_mask = model.encode(text_tokens)
    cache = model.init_cache(encoded, text_mask, self.cache_length)
    state = DecodeState(
        cache=cache, tokens=jnp.zeros((b, self.image_len + max(w, 1)), jnp.int32),
        pos=jnp.zeros(b, jnp.int32), keys=keys, forwards=jnp.zeros((), jnp.int32),
        done_at=jnp.zeros(b, jnp.int32))
    if w:
      # Nothing is known yet: the first drafts are one random code, repeated.
      first = jax.vmap(lambda k: jax.random.randint(k, (), 0, self.num_codes))(
          _stream(keys, _FIRST_DRAFTS, jnp.zeros(b, jnp.int32)))
      drafts = jnp.broadcast_to(first[:, None], (b, w))
      state = state.replace(drafts=drafts,
                            proposals=jax.nn.one_hot(drafts, _vocab(self.setup.config.model)))
    return state

  def _last_tokens(self, state):
    """Each row's decoder input at its position: the token before it (BOS at 0)."""
    bos = self.setup.config.model.codebook_size
    last = _at(state.tokens, jnp.maximum(state.pos - 1, 0))
    return jnp.where(state.pos == 0, bos, last)[:, None]

  def _step(self, params, state, attend_length=None):
    """One step; self-attention reads the cache's first `attend_length` positions (static;
    default all), which must hold every active row's window."""
    # The model is merged here, inside whatever loop runs the step: NNX modules may not
    # cross into a lax loop from the trace outside it.
    model = self.setup.model(params)
    step = self._sjd_step if self.window else self._token_step
    return step(model, state, attend_length)

  def _token_step(self, model, state, attend_length):
    active = state.pos < self.image_len
    logits, cache = model.decode_cached(self._rows(self._last_tokens(state)),
                                        self._rows(state.pos), state.cache, attend_length)
    token = _categorical(_stream(state.keys, _TOKENS, state.pos),
                         self._log_probs(logits[:, 0]))
    rows = jnp.arange(token.shape[0])
    token = jnp.where(active, token, state.tokens[rows, state.pos])
    return self._advance(state, cache, state.tokens.at[rows, state.pos].set(token),
                         active.astype(jnp.int32), active)

  def _advance(self, state, cache, tokens, count, active):
    forwards = state.forwards + 1
    pos = state.pos + count
    done_at = jnp.where(active & (pos >= self.image_len), forwards, state.done_at)
    return state.replace(cache=cache, tokens=tokens, pos=jnp.minimum(pos, self.image_len),
                         forwards=forwards, done_at=done_at)

  def _sjd_step(self, model, state, attend_length):
    w, active = self.window, state.pos < self.image_len
    inputs = jnp.concatenate([self._last_tokens(state), state.drafts[:, :w - 1]], 1)
    logits, cache = model.decode_cached(self._rows(inputs), self._rows(state.pos), state.cache,
                                        attend_length)
    logp = self._log_probs(logits)  # [B, W, V]
    p, q, drafts = jnp.exp(logp), state.proposals, state.drafts

    forward = jnp.full(active.shape, state.forwards)
    verify_key, resample_key = jax.vmap(jax.random.split)(
        _stream(state.keys, _SJD, forward)).swapaxes(0, 1)

    # Accept draft i with probability min(1, p(x) / q(x)), left to right.
    u = jax.vmap(lambda k: jax.random.uniform(k, (w,)))(verify_key)
    p_x = jnp.take_along_axis(p, drafts[..., None], -1)[..., 0]
    q_x = jnp.take_along_axis(q, drafts[..., None], -1)[..., 0]
    accepted = jnp.sum(jnp.cumprod(u * q_x < p_x, axis=1), axis=1)  # [B]
    # The first rejected position is drawn from the residual max(0, p - q), renormalized.
    first = jnp.minimum(accepted, w - 1)
    residual = jnp.maximum(_at(p, first) - _at(q, first), 0.0)
    residual = jnp.where(residual.sum(-1, keepdims=True) > 0, residual, _at(p, first))
    resampled = _categorical(resample_key, jnp.log(residual))

    slot = jnp.arange(w)[None, :]
    new = jnp.where(slot < accepted[:, None], drafts, resampled[:, None])
    count = jnp.where(active, jnp.minimum(accepted + 1, w), 0)
    rows = jnp.arange(new.shape[0])[:, None]
    at = state.pos[:, None] + slot
    tokens = state.tokens.at[rows, at].set(jnp.where(slot < count[:, None], new,
                                                     state.tokens[rows, at]))

    # Next window: the samples of p past the new position, then copies of the last one.
    # Each position's sample uses that position's own noise (the token stream), at every
    # forward: where p barely changed, neither does the draft, and it is then accepted.
    at_keys = jax.vmap(lambda a: _stream(state.keys, _TOKENS, a), 1, 1)(at)
    sampled = jax.vmap(_categorical, 1, 1)(at_keys, logp)  # [B, W]
    source = count[:, None] + slot
    from_sample = source < w
    source = jnp.minimum(source, w - 1)
    last = jnp.where(count < w, sampled[:, w - 1], new[:, w - 1])
    next_drafts = jnp.where(from_sample, jnp.take_along_axis(sampled, source, 1), last[:, None])
    next_q = jnp.where(from_sample[..., None], jnp.take_along_axis(p, source[..., None], 1),
                       jax.nn.one_hot(next_drafts, p.shape[-1]))
    state = state.replace(drafts=jnp.where(active[:, None], next_drafts, drafts),
                          proposals=jnp.where(active[:, None, None], next_q, q))
    return self._advance(state, cache, tokens, count, active)

  def segment_ends(self) -> list[int]:
    """The cache positions each segment of the generation loop attends: multiples of
    `cache_block`, then the whole cache."""
    return [*range(self.cache_block, self.cache_length, self.cache_block), self.cache_length]

  def _generate(self, params, text_tokens, keys):
    state = self._prefill(params, text_tokens, keys)
    span = max(self.window, 1)  # the positions a step writes from a row's `pos`
    for end in self.segment_ends():
      def more(s, end=end):  # some row is active, and every active row's window fits
        active = s.pos < self.image_len
        return jnp.any(active) & (jnp.max(jnp.where(active, s.pos, 0)) + span <= end)
      state = jax.lax.while_loop(more, lambda s, end=end: self._step(params, s, end), state)
    return Output(state.tokens[:, :self.image_len], state.forwards, state.done_at)


def _vocab(m) -> int:
  """The width of the model's logits (the padded codebook, with BOS when tied)."""
  return config_lib.round_up(m.codebook_size + (1 if m.share_image_embedding else 0))


def _batch_ways(batch_sharding: NamedSharding) -> int:
  """How many ways a batch sharding splits the leading axis."""
  axes = batch_sharding.spec[0] if len(batch_sharding.spec) else None
  return sharding.shards(batch_sharding.mesh, axes)


def decode_step_and_args(config, mesh, batch_size: int, settings: Settings = Settings(),
                         attend_length: int | None = None):
  """The jitted decode step of `config` on `mesh` and its abstract (params, state); its
  self-attention reads the cache's first `attend_length` positions (default all).

  For ahead-of-time compilation: `step.lower(*args).compile()` with a mesh of abstract
  devices (e.g. a TPU topology) gives the real compiler's memory and cost analyses.
  """
  from parti_jax.tasks import parti  # the task's Setup, for inference
  sampler = Sampler(parti.Setup(config, mesh, training=False), settings, batch_size)
  return sampler.jit_step(attend_length), sampler.abstract_step_args()


def cast_params(params, dtype):
  """Matrices and tables in `dtype` (e.g. bfloat16 for inference), vectors kept.

  The model computes its matmuls in its dtype anyway; weights stored in it halve what
  each decode step reads. Vectors (the final layer norms') stay float32; the scanned
  layers' stacked norm parameters are matrices and are cast, though their arithmetic stays
  float32 (`layers.LayerNorm`).
  """
  dtype = jnp.dtype(dtype)

  def cast(x):
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
      return x
    if isinstance(x, jax.ShapeDtypeStruct):  # abstract weights, for compiling ahead of time
      return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
    return x.astype(dtype)
  return jax.tree.map(cast, params)
