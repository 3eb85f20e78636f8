"""What every task shares: the training state created sharded, the jitted steps, and the
record the trainer loop reads. Nothing here knows a model.

A task module (parti_jax/tasks/parti.py, vitvqgan.py) subclasses `Setup` with its model
class and batch shapes, writes its `train_step(setup, state, batch)` and
`eval_step(setup, params, batch)`, and returns a `Task` from `build(config, mesh)`.
"""

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from parti_jax import config as config_lib
from parti_jax import optim, sharding


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
  With `training=False` (inference: sampling, encoding) there is no optimizer, and the
  config is held to what the model needs, not to a batch size or loss weights.
  """

  model_class: type  # a task's subclass names its network

  def __init__(self, config: ml_collections.ConfigDict, mesh: Mesh | None = None,
               training: bool = True):
    self.config, self.training = config, training
    if mesh is None:
      mesh = sharding.make_mesh(config, training=training)  # checks the config
    elif config_lib.mesh_shape(config, mesh.size) != tuple(mesh.shape.values()):
      raise config_lib.ConfigError(
          f"the mesh {dict(mesh.shape)} does not match the config's mesh {dict(config.mesh)}")
    self.mesh = mesh
    self.rules = sharding.rules_of(config)
    abstract_model = nnx.eval_shape(lambda: self.model_class(config.model, rngs=nnx.Rngs(0)))
    self.graphdef, abstract_params = nnx.split(abstract_model, nnx.Param)
    self.logical_specs = nnx.to_pure_dict(nnx.get_partition_spec(abstract_params))
    self.abstract_params = nnx.to_pure_dict(abstract_params)
    self.param_shardings = sharding.named(self.mesh, self.logical_specs, self.rules)
    sharding.check_divisible(self.abstract_params, self.param_shardings)
    self.batch_sharding = sharding.batch_sharding(self.mesh, self.rules)
    if not training:
      return
    self.tx = optim.make(config, self.abstract_params)
    self.schedule = optim.schedule(config)
    abstract_opt = jax.eval_shape(self.tx.init, self.abstract_params)
    replicated = NamedSharding(self.mesh, P())
    self.state_shardings = TrainState(
        step=replicated, params=self.param_shardings,
        opt_state=sharding.opt_state_shardings(self.tx, abstract_opt, self.abstract_params,
                                               self.param_shardings),
        rng=replicated)

  def model(self, params):
    return nnx.merge(self.graphdef, params)

  def sharded_abstract_params(self) -> dict:
    """The parameters as ShapeDtypeStructs carrying their shardings (to load a checkpoint)."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        self.abstract_params, self.param_shardings)

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
                      opt_state=self.tx.init(params), rng=self._state_rng(rng))

  def _state_rng(self, rng):
    """The state's rng (dropout, random crops) in the key implementation of
    `train.prng_impl`: threefry (JAX's default) is `rng` itself; "rbg" and "unsafe_rbg"
    (faster random bits on GPUs and TPUs) are seeded from it. Parameters are drawn with
    threefry whatever the choice, so a seed gives the same initial model."""
    impl = self.config.get("train", {}).get("prng_impl", "threefry")
    if impl == "threefry":
      return rng
    return jax.random.key(jax.random.bits(rng, dtype=jnp.uint32), impl=impl)

  def init_state(self) -> TrainState:
    """Parameters and optimizer state, each created on the devices that own its shards."""
    init = jax.jit(self._init, out_shardings=self.state_shardings)
    return init(jax.random.key(self.config.seed))

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    raise NotImplementedError  # a task's batch fields and shapes


@dataclasses.dataclass
class Task:
  """What the trainer loop needs from a task.

  `inputs`: the batch fields the steps take. `train_step(state, batch) -> (state, metrics)`
  and `eval_step(params, batch) -> metrics` (weighted by `weight`) are jitted on the mesh.
  A train step's metrics hold `loss` and those of `apply_gradients`, which the trainer
  reads to report and to stop on non-finite updates.
  """
  setup: Setup
  inputs: tuple[str, ...]
  train_step: Callable
  eval_step: Callable
  step_flops: float  # model FLOPs of one train step (the numerator of MFU)
  tokens_per_example: int  # image tokens per example (throughput is reported in them)
  # (params, eval batch) -> uint8 [H, W, 3], a picture written at each evaluation
  picture: Callable | None = None


def apply_gradients(setup: Setup, state: TrainState, grads) -> tuple[dict, Any, dict]:
  """(params, optimizer state, metrics) after one optimizer update.

  Non-finite gradients skip the update (optax.apply_if_finite in `optim.make`): parameters
  and optimizer state stay as they were, so a NaN never reaches a checkpoint.
  """
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(grad_norm=optax.tree.norm(grads), learning_rate=setup.schedule(state.step),
                 update_skipped=1 - opt_state.last_finite.astype(jnp.int32),
                 consecutive_skips=opt_state.notfinite_count)
  return params, opt_state, metrics


def mean_over_micro_batches(setup: Setup, grad_fn: Callable, params, batch, dropout_key,
                            aux_zeros):
  """`grad_fn(params, batch, key) -> (aux, grads)` averaged over `grad_accum_steps`
  micro-batches of `batch`. `aux` is a tree of scalars (e.g. loss and accuracy) shaped like
  `aux_zeros`."""
  n = setup.config.grad_accum_steps
  if n == 1:
    return grad_fn(params, batch, dropout_key)

  # Micro-batch j takes rows j, j+n, j+2n, ...: each device keeps its own rows (no data
  # moves between devices), and the batch axis of every micro-batch stays sharded.
  def split(x):
    x = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
    return sharding.constrain(x, None, "batch", *[None] * (x.ndim - 2))

  micro = jax.tree.map(split, batch)

  # The running gradient sum is laid out like the parameters: left to propagation, the
  # zeros it starts from could come out replicated, a full model copy on every device.
  pin = lambda grads: jax.lax.with_sharding_constraint(grads, setup.param_shardings)

  def accumulate(carry, xs):
    micro_batch, j = xs
    key = None if dropout_key is None else jax.random.fold_in(dropout_key, j)
    aux, grads = grad_fn(params, micro_batch, key)
    aux_sum, grad_sum = carry
    return (jax.tree.map(jnp.add, aux_sum, aux), pin(jax.tree.map(jnp.add, grad_sum, grads))), \
        None

  zeros = (aux_zeros, pin(jax.tree.map(jnp.zeros_like, params)))
  total, _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(n)))
  return jax.tree.map(lambda x: x / n, total)


def with_activation_mesh(setup: Setup, fn: Callable) -> Callable:
  """`fn(setup, *args)` as `(*args)`, traced with the setup's mesh and logical rules active, so
  that activation constraints inside the model resolve (for any step to `jax.jit`)."""

  def wrapped(*args):
    with sharding.activation_mesh(setup.mesh, setup.rules):
      return fn(setup, *args)
  return wrapped


def jit_train_step(setup: Setup, step_fn: Callable, *frozen):
  """`(state, batch) -> (state, metrics)`, jitted with explicit shardings; state is donated.

  `frozen`: arrays the loss needs but does not train (the tokenizer's perceptual VGG-16),
  passed replicated as trailing arguments: closed over, their values would be compiled into
  the program as constants.
  """
  replicated = NamedSharding(setup.mesh, P())
  frozen = jax.device_put(frozen, replicated)
  jitted = jax.jit(with_activation_mesh(setup, step_fn),
                   in_shardings=(setup.state_shardings, setup.batch_sharding,
                                 *[replicated] * len(frozen)),
                   out_shardings=(setup.state_shardings, replicated),
                   donate_argnums=0)
  return BoundStep(jitted, *frozen) if frozen else jitted


def jit_eval_step(setup: Setup, eval_fn: Callable):
  """`(params, batch) -> metrics`, jitted with explicit shardings."""
  replicated = NamedSharding(setup.mesh, P())
  return jax.jit(with_activation_mesh(setup, eval_fn),
                 in_shardings=(setup.param_shardings, setup.batch_sharding),
                 out_shardings=replicated)


class BoundStep:
  """A jitted step with trailing arguments bound, callable, traceable and lowerable as
  `(state, batch)` like the others."""

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
