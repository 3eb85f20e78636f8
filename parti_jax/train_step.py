"""Training state built sharded on the mesh, the loss, and the jitted train and eval steps.

A batch is a dict of global arrays sharded over the batch mesh axes:
  text_tokens  int32 [B, text_len]  (0 = padding)
  image_tokens int32 [B, image_grid**2] (codebook ids)
"""

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parti_jax import config as config_lib
from parti_jax import optim, sharding
from parti_jax.model import Parti


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any  # nested dict of float32 arrays, the model's nnx.Param state
  opt_state: Any
  rng: jax.Array  # base key; the step's dropout key is fold_in(rng, step)


class Setup:
  """Everything static about a run: config, mesh, model structure, optimizer, shardings.

  Built from shapes only (`nnx.eval_shape`), so constructing it for a 20B model on a
  laptop allocates nothing. `init_state()` then creates the state directly sharded.
  """

  model_class = Parti  # a subclass sets another model (the image tokenizer's setup)

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None):
    self.config = config
    if mesh is None:
      mesh = sharding.make_mesh(config)
    elif config_lib.check(config, mesh.size) != tuple(mesh.shape.values()):
      raise config_lib.ConfigError(
          f"the mesh {dict(mesh.shape)} does not match the config's mesh {dict(config.mesh)}")
    self.mesh = mesh
    self.rules = sharding.rules_of(config)
    abstract_model = nnx.eval_shape(lambda: self.model_class(config.model, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    self.logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    self.abstract_params = nnx.to_pure_dict(abstract_params)
    self.tx = optim.make(config, self.abstract_params)
    self.schedule = optim.schedule(config)

    param_shardings = sharding.named(self.mesh, self.logical_specs, self.rules)
    sharding.check_divisible(self.abstract_params, param_shardings)
    abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    replicated = NamedSharding(self.mesh, P())
    self.state_shardings = TrainState(
        step=replicated, params=param_shardings,
        opt_state=sharding.opt_state_shardings(self.tx, abstract_opt, self.abstract_params,
                                               param_shardings),
        rng=replicated)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)

  def model(self, params):
    return nnx.merge(self.graphdef, params)

  def abstract_state(self) -> TrainState:
    """The state as ShapeDtypeStructs carrying their shardings (for AOT lowering)."""
    shapes = jax.eval_shape(self._init, jax.random.key(0))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def _init(self, key) -> TrainState:
    params_key, rng = jax.random.split(key)
    model = self.model_class(self.config.model, rngs=nnx.Rngs(params=params_key))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=self.tx.init(params), rng=rng)

  def init_state(self) -> TrainState:
    """Parameters and optimizer state, each created on the devices that own its shards."""
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(jax.random.key(self.config.seed))

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
  n = setup.config.grad_accum_steps
  if n == 1:
    (loss, acc), grads = grad_fn(params, batch, dropout_key)
    return loss, acc, grads

  # Micro-batch j takes rows j, j+n, j+2n, ...: each device keeps its own rows (no data
  # moves between devices), and the batch axis of every micro-batch stays sharded.
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, None, "batch", *[None] * (x.ndim - 2))

  micro = jax.tree.map(split, batch)

  # The running gradient sum is laid out like the parameters: left to propagation, the
  # zeros it starts from could come out replicated, a full model copy on every device.
  pin = lambda grads: jax.lax.with_sharding_constraint(grads, setup.state_shardings.params)

  def accumulate(carry, xs):
    micro_batch, j = xs
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, j)
    (loss, acc), grads = grad_fn(params, micro_batch, key)
    loss_sum, acc_sum, grad_sum = carry
    return (loss_sum + loss, acc_sum + acc, pin(jax.tree.map(jnp.add, grad_sum, grads))), None

  zeros = (jnp.zeros(()), jnp.zeros(()), pin(jax.tree.map(jnp.zeros_like, params)))
  total, _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n)))
  return jax.tree.map(lambda x: x / n, total)


def train_step(setup: Setup, state: TrainState, batch) -> tuple[TrainState, dict]:
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


def with_activation_mesh(setup: Setup, fn: Callable) -> Callable:
  """`fn(setup, *args)` as `(*args)`, traced with the setup's mesh and logical rules active, so
  that activation constraints inside the model resolve (for any step to `jax.jit`)."""

  def wrapped(*args):
    with sharding.activation_mesh(setup.mesh, setup.rules):
      return fn(setup, *args)
  return wrapped


def jit_train_step(setup: Setup, step_fn: Callable = train_step):
  """`(state, batch) -> (state, metrics)`, jitted with explicit shardings; state is donated."""
  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(with_activation_mesh(setup, step_fn),
                 in_shardings=(setup.state_shardings, setup.batch_sharding),
                 out_shardings=(setup.state_shardings, replicated),
                 donate_argnums=0)


class BoundStep:
  """A jitted step with trailing arguments bound, callable, traceable and lowerable as
  `(state, batch)` like the others.

  Frozen networks a loss needs (the tokenizer's perceptual VGG-16) travel as arguments:
  closed over, their weights would be compiled into the program as constants.
  """

  def __init__(self, jitted, *bound):
    self.jitted, self.bound = jitted, bound

  def __call__(self, *args):
    return self.jitted(*args, *self.bound)

  def trace(self, *args):
    return _Bound(self.jitted.trace(*args, *self.bound), self.bound)

  def lower(self, *args, **kwargs):
    return _Bound(self.jitted.lower(*args, *self.bound, **kwargs), self.bound)


class _Bound:
  """A traced or lowered stage of a BoundStep: `lower()` and `compile()` stay bound, and
  everything else (cost_analysis, memory_analysis, as_text, ...) is the stage's own."""

  def __init__(self, stage, bound):
    self._stage, self._bound = stage, bound

  def lower(self, *args, **kwargs):
    return _Bound(self._stage.lower(*args, **kwargs), self._bound)

  def compile(self, *args, **kwargs):
    return BoundStep(self._stage.compile(*args, **kwargs), *self._bound)

  def __getattr__(self, name):
    return getattr(self._stage, name)


def jit_loss_and_grads(setup: Setup):
  """`(params, batch, dropout_key) -> (loss, accuracy, grads)`, jitted on the mesh."""
  replicated = NamedSharding(setup.mesh, P())
  params = setup.state_shardings.params
  return jax.jit(with_activation_mesh(setup, loss_and_grads),
                 in_shardings=(params, setup.batch_sharding, replicated),
                 out_shardings=(replicated, replicated, params))


def jit_eval_step(setup: Setup, eval_fn: Callable = eval_step):
  """`(params, batch) -> metrics`, jitted with explicit shardings."""
  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(with_activation_mesh(setup, eval_fn),
                 in_shardings=(setup.state_shardings.params, setup.batch_sharding),
                 out_shardings=replicated)
