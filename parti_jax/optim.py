"""Optimizers and learning-rate schedules from the config (optax throughout)."""

import jax
import jax.numpy as jnp
import ml_collections
import optax

from parti_jax import quantized


def schedule(config: ml_collections.ConfigDict, peak: float | None = None) -> optax.Schedule:
  """Linear warm-up to the peak (`optimizer.learning_rate` unless given), then the decay."""
  s, total = config.schedule, config.num_train_steps
  peak = config.optimizer.learning_rate if peak is None else peak
  warmup = optax.linear_schedule(0.0, peak, max(s.warmup_steps, 1))
  after = total - s.warmup_steps
  if s.name == "warmup_exponential":
    # Constant until decay_start, then exponential decay reaching final_ratio * peak at
    # num_train_steps (the paper: decay from step 85k to 0.025x at 450k).
    decay = optax.exponential_decay(
        peak, transition_steps=max(total - s.decay_start, 1), decay_rate=s.final_ratio,
        transition_begin=max(s.decay_start - s.warmup_steps, 0),
        end_value=peak * s.final_ratio)
  elif s.name == "warmup_cosine":
    decay = optax.cosine_decay_schedule(peak, max(after, 1), alpha=s.final_ratio)
  elif s.name == "warmup_rsqrt":
    decay = lambda step: peak * jnp.sqrt(max(s.warmup_steps, 1) / (step + max(s.warmup_steps, 1)))
  else:  # warmup_constant
    decay = optax.constant_schedule(peak)
  return optax.join_schedules([warmup, decay], [s.warmup_steps])


def _decay_mask(params):
  """Weight decay on matrices and embeddings, not on LayerNorm scales and biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], "key", None) not in ("scale", "bias"), params)


def _optimizer(o: ml_collections.ConfigDict, lr) -> optax.GradientTransformation:
  """One optimizer section (`optimizer` or `discriminator_optimizer`) with its clipping."""
  momentum_dtype = o.get("momentum_dtype", "float32")
  if o.name == "adafactor":
    if momentum_dtype == "int8":
      # The paper's int8 first moment: block-wise int8 values and float32 scales.
      momentum = quantized.ema(o.b1, o.get("momentum_block", MOMENTUM_BLOCK))
    else:
      momentum = optax.ema(o.b1, debias=False, accumulator_dtype=jnp.dtype(momentum_dtype))
    # Assembled from optax's parts rather than optax.adafactor because the paper's beta2
    # is a constant decay (optax.adafactor only offers step**-decay_rate), and its
    # decoupled weight decay is scaled by the learning rate.
    tx = optax.chain(
        optax.scale_by_factored_rms(decay_rate=o.b2, decay_rate_fn=lambda _, rate: rate),
        optax.clip_by_block_rms(1.0),
        momentum,
        optax.add_decayed_weights(o.weight_decay, mask=_decay_mask),
        optax.scale_by_learning_rate(lr))
  elif momentum_dtype == "int8":
    raise ValueError(f"optimizer.momentum_dtype='int8' is Adafactor's (the paper's); "
                     f"optimizer.name={o.name!r} keeps its first moment in a float dtype")
  else:
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                     mu_dtype=jnp.dtype(momentum_dtype), mask=_decay_mask)
  return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)


def make(config: ml_collections.ConfigDict, params=None) -> optax.GradientTransformation:
  """The configured optimizer, with global-norm clipping in front.

  `params` (any tree shaped like the parameters) is needed for `optimizer.frozen` and for a
  `discriminator` parameter group, which gets its own optimizer (`discriminator_optimizer`,
  same schedule shape, its own peak): its own state, updated only by its own gradients.
  """
  tx = _optimizer(config.optimizer, schedule(config))
  frozen = tuple(config.optimizer.get("frozen", ()))
  has_discriminator = params is not None and "discriminator" in params
  if frozen or has_discriminator:
    # Top-level parameter groups that keep their values (e.g. a fine-tuned tokenizer's
    # encoder and codebook) get zero updates and hold no optimizer state. The labels are a
    # concrete tree (not a function of the parameters) so that optax.tree_map_params can
    # lay out the optimizer state from them.
    if params is None:
      raise ValueError("optimizer.frozen needs the parameter tree: optim.make(config, params)")
    unknown = sorted(set(frozen) - set(params))
    if unknown:
      raise ValueError(f"optimizer.frozen names {unknown}, which are not parameter groups; "
                       f"the groups are {sorted(params)}")
    label = lambda k: "frozen" if k in frozen else "discriminator" if k == "discriminator" \
        else "train"
    labels = {k: jax.tree.map(lambda _, k=k: label(k), v) for k, v in params.items()}
    transforms = {"train": tx, "frozen": optax.set_to_zero()}
    if has_discriminator:
      d = config.discriminator_optimizer
      transforms["discriminator"] = _optimizer(d, schedule(config, peak=d.learning_rate))
    tx = optax.multi_transform(transforms, labels)
  # A step whose gradients are not finite leaves parameters and optimizer state as they
  # were; optax counts such steps in the state (notfinite_count, total_notfinite). The
  # trainer stops the run after `train.max_consecutive_skips` of them in a row, so
  # optax's own limit, after which it would apply non-finite updates, is never reached.
  return optax.apply_if_finite(tx, max_consecutive_errors=NEVER)


NEVER = 2 ** 31 - 1
MOMENTUM_BLOCK = 128  # config.optimizer.momentum_block of configs saved before the field


def momentum_leaves(opt_state) -> list:
  """The leaves of an optimizer state that hold the first moment (to count its bytes):
  optax.ema's `ema`, Adam's `mu`, and the int8 momentum's values and scales."""
  names = {"ema", "mu", "ema_values", "ema_scales"}
  return [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(opt_state)
          if any(getattr(k, "name", None) in names for k in path)]
