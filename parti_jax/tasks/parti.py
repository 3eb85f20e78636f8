"""The Parti task: text tokens -> image tokens, trained by next-token cross-entropy.

A batch is a dict of global arrays sharded over the batch mesh axes:
  text_tokens  int32 [B, text_len]  (0 = padding)
  image_tokens int32 [B, image_grid**2] (codebook ids)
"""

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from parti_jax import config as config_lib
from parti_jax.sharding import constrain
from parti_jax.models import parti as parti_model
from parti_jax.models.parti import Parti
from parti_jax.tasks import base

INPUTS = ("text_tokens", "image_tokens")
EVAL_METRICS = ("loss", "accuracy")  # what eval_step reports (the trainer adds "eval/")


class Setup(base.Setup):
  model_class = Parti

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    m, b = self.config.model, batch_size or self.config.global_batch_size
    shape = lambda n: jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=self.batch_sharding)
    return dict(text_tokens=shape(m.text_len), image_tokens=shape(m.image_grid ** 2))


def config_problems(config: ml_collections.ConfigDict, sizes: dict, training: bool) -> list[str]:
  """What in `config` cannot run on a mesh of `sizes` (`config.check` raises them)."""
  m, problems = config.model, config_lib.layer_problems(config.model)

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  need(m.remat in config_lib.REMAT_POLICIES,
       f"model.remat={m.remat!r} is not one of {config_lib.REMAT_POLICIES}")
  need(m.decoder_attention in ("dense", "conv"),
       f"model.decoder_attention={m.decoder_attention!r} is not 'dense' or 'conv'")
  need(m.dtype in ("float32", "bfloat16", "float16"),
       f"model.dtype={m.dtype!r} is not float32, bfloat16 or float16")
  need(m.head_dim > 0 or m.d_model % m.num_heads == 0,
       f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads} "
       "(or set model.head_dim)")
  need(m.get("logits_matmul", "float32") in ("float32", "compute"),
       f"model.logits_matmul={m.get('logits_matmul')!r} is not 'float32' or 'compute'")
  chunk = m.get("loss_chunk", 0)
  need(chunk >= 0 and (chunk == 0 or (m.image_grid ** 2) % chunk == 0),
       f"model.loss_chunk={chunk} must be 0 (off) or divide the image's "
       f"{m.image_grid ** 2} positions (model.image_grid={m.image_grid} squared)")
  head_dim = config_lib.head_dim(m)
  need(not m.get("image_rope", False) or head_dim % 4 == 0,
       f"model.image_rope needs a head dimension divisible by 4 (half for rows, half for "
       f"columns, in pairs); it is {head_dim}")
  need(not m.get("text_rope", False) or head_dim % 2 == 0,
       f"model.text_rope needs an even head dimension (rotated in pairs); it is {head_dim}")
  # Every sharded dimension must split evenly over the mesh axes the rules give it.
  for field, value, logical in [
      ("model.num_heads", m.num_heads, "heads"),
      ("model.mlp_dim", m.mlp_dim, "mlp"),
      ("model.d_model", m.d_model, "embed"),
      ("model.text_vocab_size (padded)", config_lib.round_up(m.text_vocab_size), "vocab"),
      ("model.codebook_size (padded, with BOS)", config_lib.round_up(m.codebook_size + 1),
       "vocab"),
  ]:
    n, desc = config_lib.ways(config, sizes, logical)
    need(value % n == 0, f"{field}={value} is not divisible by {desc} (logical axis '{logical}')")
  if training:
    need(config.optimizer.name in ("adafactor", "adamw"),
         f"optimizer.name={config.optimizer.name!r} is not 'adafactor' or 'adamw'")
    o = config.optimizer
    need(o.get("momentum_dtype", "float32") in ("float32", "bfloat16", "int8"),
         f"optimizer.momentum_dtype={o.get('momentum_dtype')!r} is not float32, bfloat16 or "
         "int8")
    need(o.get("momentum_dtype") != "int8" or o.name == "adafactor",
         f"optimizer.momentum_dtype='int8' is Adafactor's first moment (the paper's); "
         f"optimizer.name={o.name!r} keeps it in float32 or bfloat16")
    need(o.get("momentum_block", 1) >= 1,
         f"optimizer.momentum_block={o.get('momentum_block')} must be at least 1")
    need(config.schedule.name in config_lib.SCHEDULES,
         f"schedule.name={config.schedule.name!r} is not one of {config_lib.SCHEDULES}")
    need(config.grad_accum_steps >= 1,
         f"grad_accum_steps={config.grad_accum_steps} must be >= 1")
    n, desc = config_lib.ways(config, sizes, "batch")
    per_step = n * config.grad_accum_steps
    need(config.global_batch_size % per_step == 0,
         f"global_batch_size={config.global_batch_size} is not divisible by the batch shards "
         f"({desc or 'none'}) x grad_accum_steps={config.grad_accum_steps} = {per_step}")
  return problems


def loss_and_accuracy(logits, targets):
  """Mean softmax cross-entropy over all image tokens, and token accuracy."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  accuracy = (jnp.argmax(logits, -1) == targets).mean()
  return loss, accuracy


def per_row_loss_and_accuracy(setup: Setup, params, batch, dropout_key):
  """Each row's mean cross-entropy and token accuracy over its image tokens: two [B].

  With `model.loss_chunk` > 0 the float32 logits are made (and, in the backward pass,
  made again) `loss_chunk` positions at a time, never for the whole sequence at once.
  """
  model, targets = setup.model(params), batch["image_tokens"]
  chunk = setup.config.model.get("loss_chunk", 0)  # runs saved before the field: 0
  if not chunk:
    logits = model(batch["text_tokens"], targets, dropout_key)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1),
            (jnp.argmax(logits, -1) == targets).mean(-1))
  features = model.features(batch["text_tokens"], targets, dropout_key)
  return chunked_cross_entropy(setup.config.model, features, model.output_kernel(), targets,
                               chunk)


def chunked_cross_entropy(m: ml_collections.ConfigDict, features, kernel, targets, chunk: int):
  """Per-row mean cross-entropy and accuracy [B] of logits(features @ kernel), `chunk`
  positions at a time.

  A scan over the chunks, each rematerialised: its [B, chunk, V] logits live only inside
  its iteration, forward and backward (XLA would otherwise keep every chunk's logits for
  the backward pass, as big as the whole logits tensor). Written here because optax's
  cross-entropy takes whole logits, and neither it nor flax has a chunked one.
  """
  b, n, d = features.shape
  split = lambda x: x.reshape(b, n // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)
  xs = constrain(split(features), None, "batch", "length", "embed")
  ts = constrain(split(targets), None, "batch", "length")

  @jax.checkpoint
  def sums(x, t, kernel):
    logits = parti_model.logits(m, x, kernel)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, t).sum(-1)
    return loss, (jnp.argmax(logits, -1) == t).sum(-1).astype(jnp.float32)

  def step(totals, xt):
    loss, correct = sums(*xt, kernel)
    return (totals[0] + loss, totals[1] + correct), None

  zeros = jnp.zeros((b,), jnp.float32)
  (loss, correct), _ = jax.lax.scan(step, (zeros, zeros), (xs, ts))
  return loss / n, correct / n


def _forward_loss(setup: Setup, params, batch, dropout_key):
  if not setup.config.model.get("loss_chunk", 0):
    logits = setup.model(params)(batch["text_tokens"], batch["image_tokens"], dropout_key)
    return loss_and_accuracy(logits, batch["image_tokens"])
  loss, accuracy = per_row_loss_and_accuracy(setup, params, batch, dropout_key)
  return loss.mean(), accuracy.mean()


def loss_and_grads(setup: Setup, params, batch, dropout_key):
  """Loss, accuracy and gradients, averaged over `grad_accum_steps` micro-batches."""
  grad_fn = jax.value_and_grad(lambda p, b, k: _forward_loss(setup, p, b, k), has_aux=True)
  (loss, accuracy), grads = base.mean_over_micro_batches(
      setup, grad_fn, params, batch, dropout_key, aux_zeros=(jnp.zeros(()), jnp.zeros(())))
  return loss, accuracy, grads


def train_step(setup: Setup, state: base.TrainState, batch) -> tuple[base.TrainState, dict]:
  """One update (skipped, and counted, when the gradients are not finite)."""
  dropout_key = jax.random.fold_in(state.rng, state.step)
  if setup.config.model.dropout_rate == 0:
    dropout_key = None
  loss, accuracy, grads = loss_and_grads(setup, state.params, batch, dropout_key)
  injected = setup.config.train.inject_nan_steps
  if injected:  # fault injection, for the tests of the guard
    poison = jnp.where(jnp.isin(state.step, jnp.asarray(injected)), jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
  params, opt_state, metrics = base.apply_gradients(setup, state, grads)
  metrics = dict(loss=loss, accuracy=accuracy, **metrics)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(setup: Setup, params, batch) -> dict:
  """Loss and accuracy over the rows whose `mask` is 1 (all rows without a mask).

  `weight` is the number of rows counted, so that batches combine into a weighted mean.
  """
  targets = batch["image_tokens"]
  mask = batch.get("mask", jnp.ones(targets.shape[:1], jnp.int32)).astype(jnp.float32)
  per_row_loss, per_row_acc = per_row_loss_and_accuracy(setup, params, batch, None)
  weight = mask.sum()
  safe = jnp.maximum(weight, 1.0)
  return dict(loss=(per_row_loss * mask).sum() / safe,
              accuracy=(per_row_acc * mask).sum() / safe, weight=weight)


def jit_train_step(setup: Setup):
  return base.jit_train_step(setup, train_step)


def jit_eval_step(setup: Setup):
  return base.jit_eval_step(setup, eval_step)


def jit_loss_and_grads(setup: Setup):
  """`(params, batch, dropout_key) -> (loss, accuracy, grads)`, jitted on the mesh."""
  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(base.with_activation_mesh(setup, loss_and_grads),
                 in_shardings=(setup.param_shardings, setup.batch_sharding, replicated),
                 out_shardings=(replicated, replicated, setup.param_shardings))


def forward_flops_per_example(m: ml_collections.ConfigDict) -> float:
  """Matmul FLOPs of one example's forward pass (2*m*n*k each), attention scores and values
  included; causal self-attention counts half its score/value work, as is customary,
  although the dense mask computes all of it."""
  d, f, t, n = m.d_model, m.mlp_dim, m.text_len, m.image_grid ** 2
  h = m.num_heads * config_lib.head_dim(m)  # width of all heads together
  vocab_out = config_lib.round_up(
      m.codebook_size + 1 if m.share_image_embedding else m.codebook_size)
  mlp = lambda length: 2 * length * 2 * d * f
  encoder = m.encoder_layers * (2 * t * d * h * 4 + 4 * t * t * h + mlp(t))
  decoder_self = 2 * n * d * h * 4 + 4 * n * n * h / 2
  decoder_cross = 2 * n * d * h * 2 + 2 * t * d * h * 2 + 4 * n * t * h
  decoder = m.decoder_layers * (decoder_self + decoder_cross + mlp(n))
  logits = 2 * n * d * vocab_out
  return encoder + decoder + logits


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one optimizer step over the global batch (forward + backward: 3x forward)."""
  return 3 * forward_flops_per_example(config.model) * config.global_batch_size


def tokens_per_example(config: ml_collections.ConfigDict) -> int:
  return config.model.image_grid ** 2


def build(config: ml_collections.ConfigDict, mesh) -> base.Task:
  setup = Setup(config, mesh)
  return base.Task(setup, INPUTS, jit_train_step(setup), jit_eval_step(setup),
                   train_step_flops(config), tokens_per_example(config))
