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
from parti_jax.models.parti import Parti
from parti_jax.tasks import base

INPUTS = ("text_tokens", "image_tokens")


class Setup(base.Setup):
  model_class = Parti

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    m, b = self.config.model, batch_size or self.config.global_batch_size
    shape = lambda n: jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=self.batch_sharding)
    return dict(text_tokens=shape(m.text_len), image_tokens=shape(m.image_grid ** 2))


def loss_and_accuracy(logits, targets):
  """Mean softmax cross-entropy over all image tokens, and token accuracy."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  accuracy = (jnp.argmax(logits, -1) == targets).mean()
  return loss, accuracy


def _forward_loss(setup: Setup, params, batch, dropout_key):
  logits = setup.model(params)(batch["text_tokens"], batch["image_tokens"], dropout_key)
  return loss_and_accuracy(logits, batch["image_tokens"])


def loss_and_grads(setup: Setup, params, batch, dropout_key):
  """Loss, accuracy and gradients, averaged over `grad_accum_steps` micro-batches."""
  grad_fn = jax.value_and_grad(lambda p, b, k: _forward_loss(setup, p, b, k), has_aux=True)
  (loss, accuracy), grads = base.mean_over_micro_batches(
      setup, grad_fn, params, batch, dropout_key, aux_zeros=(jnp.zeros(()), jnp.zeros(())))
  return loss, accuracy, grads


def train_step(setup: Setup, state: base.TrainState, batch) -> tuple[base.TrainState, dict]:
  """One update. Non-finite gradients skip it (optax.apply_if_finite in `optim.make`):
  parameters and optimizer state stay as they were, so a NaN never reaches a checkpoint."""
  dropout_key = jax.random.fold_in(state.rng, state.step)
  if setup.config.model.dropout_rate == 0:
    dropout_key = None
  loss, accuracy, grads = loss_and_grads(setup, state.params, batch, dropout_key)
  injected = setup.config.train.inject_nan_steps
  if injected:  # fault injection, for the tests of the guard
    poison = jnp.where(jnp.isin(state.step, jnp.asarray(injected)), jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=loss, accuracy=accuracy, grad_norm=optax.tree.norm(grads),
                 learning_rate=setup.schedule(state.step),
                 update_skipped=1 - opt_state.last_finite.astype(jnp.int32),
                 consecutive_skips=opt_state.notfinite_count)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(setup: Setup, params, batch) -> dict:
  """Loss and accuracy over the rows whose `mask` is 1 (all rows without a mask).

  `weight` is the number of rows counted, so that batches combine into a weighted mean.
  """
  logits = setup.model(params)(batch["text_tokens"], batch["image_tokens"], None)
  targets = batch["image_tokens"]
  mask = batch.get("mask", jnp.ones(targets.shape[:1], jnp.int32)).astype(jnp.float32)
  per_row_loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean(-1)
  per_row_acc = (jnp.argmax(logits, -1) == targets).mean(-1)
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
