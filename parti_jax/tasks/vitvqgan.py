"""The ViT-VQGAN task (stage 1, the image tokenizer): its setup, losses and steps.

  python -m parti_jax.train --config configs/vitvqgan_tiny.py --workdir DIR \
      --config.data.train=data/shapes/train --config.data.eval=data/shapes/validation

The state, sharding, optimizer, checkpoints, resume and metrics are the trainer's
(`parti_jax.tasks.base.Setup` with this model). Loss terms, each weighted in `loss`:
  L2 (`loss.l2`); logit-laplace likelihood (`loss.logit_laplace`, with `model.logit_laplace`);
  codebook and commitment (`model.commitment`); LPIPS-style VGG-16 perceptual distance
  (`loss.perceptual`, weights from `loss.perceptual_weights`; off with a warning without);
  non-saturating adversarial loss against a StyleGAN-style discriminator
  (`loss.adversarial` from step `loss.adversarial_start`, R1 penalty `loss.r1`).
The discriminator is a parameter group with its own optimizer (`discriminator_optimizer`).
Evaluation reports PSNR, L2 and codebook usage on the held-out split.

Codebook collapse: without help the tiny config's codebook falls to a few codes within ~100
steps on the shapes data. `model.dead_code_restart_every` restarts unused entries at the
batch's worst-fitted latents (the tiny config does; the paper's configs leave it off), and
`model.quantize_start` lets the decoder see the continuous latents first (parti_jax/models/vitvqgan.py).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

from parti_jax import config as config_lib
from parti_jax.data import images as image_lib
from parti_jax.models import discriminator, perceptual
from parti_jax.models import vitvqgan as vqgan
from parti_jax.tasks import base

INPUTS = ("images",)
EVAL_METRICS = ("psnr", "l2", "codebook_usage")  # what eval_step reports (as "eval/...")


class Setup(base.Setup):
  model_class = vqgan.ViTVQGAN

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    r, b = self.config.model.resolution, batch_size or self.config.global_batch_size
    return dict(images=jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32,
                                            sharding=self.batch_sharding))


def config_problems(config: ml_collections.ConfigDict, sizes: dict, training: bool) -> list[str]:
  """What in `config` cannot run on a mesh of `sizes` (`config.check` raises them)."""
  m, problems = config.model, config_lib.layer_problems(config.model)
  if m.resolution % m.patch_size:
    problems.append(f"model.resolution={m.resolution} is not a multiple of "
                    f"model.patch_size={m.patch_size}")
  for side in ("encoder", "decoder"):
    s = m[side]
    if s.d_model % s.num_heads:
      problems.append(f"model.{side}.d_model={s.d_model} is not divisible by "
                      f"model.{side}.num_heads={s.num_heads}")
    if s.num_heads % sizes["tensor"] or s.mlp_dim % sizes["tensor"]:
      problems.append(f"model.{side}.num_heads={s.num_heads} and mlp_dim={s.mlp_dim} must be "
                      f"divisible by mesh.tensor={sizes['tensor']}")
  if not training:
    return problems
  w = config.loss
  if w.get("adversarial", 0) and not m.get("discriminator", {}).get("channels", 0):
    problems.append(f"loss.adversarial={w.adversarial} needs a discriminator: "
                    "model.discriminator.channels is 0")
  if w.get("adversarial", 0) and m.resolution & (m.resolution - 1):
    problems.append(f"loss.adversarial={w.adversarial}: the discriminator needs a power-of-two "
                    f"model.resolution, not {m.resolution}")
  weights = w.get("perceptual_weights", "")
  if w.get("perceptual", 0) and weights and not weights.startswith("random:") \
      and not epath.Path(weights).exists():
    problems.append(f"loss.perceptual_weights={weights!r} does not exist (convert VGG-16 "
                    "weights with python -m parti_jax.convert.vgg16)")
  batch_shards = sizes["data"] * sizes["fsdp"]
  if config.global_batch_size % batch_shards:
    problems.append(f"global_batch_size={config.global_batch_size} is not divisible by the "
                    f"batch shards (mesh.data x mesh.fsdp = {batch_shards})")
  return problems


def losses(config: ml_collections.ConfigDict, out: dict, images, perceptual_weights) -> dict:
  """Every reconstruction loss term (unweighted) and their weighted total, `loss`."""
  w, m = config.loss, config.model
  terms = dict(l2=jnp.mean((out["reconstruction"] - images) ** 2),
               codebook=out["codebook_loss"], commitment=out["commitment_loss"])
  total = w.l2 * terms["l2"] + terms["codebook"] + m.commitment * terms["commitment"]
  if m.logit_laplace:
    terms["logit_laplace"] = vqgan.logit_laplace_nll(out["output"], images)
    total = total + w.logit_laplace * terms["logit_laplace"]
  if perceptual_weights:
    terms["perceptual"] = jnp.mean(perceptual.distance(
        perceptual_weights, out["reconstruction"], images, jnp.dtype(m.dtype)))
    total = total + w.perceptual * terms["perceptual"]
  return dict(terms, loss=total)


def adversarial_on(config, step) -> jax.Array:
  w = config.loss  # runs made before these fields existed have neither
  return (step >= w.get("adversarial_start", 0)) & (w.get("adversarial", 0.0) > 0)


def discriminator_grads(config, model, disc_params, images, fake, on) -> tuple[dict, dict]:
  """Gradients of the discriminator's loss (zero before `loss.adversarial_start`), metrics."""
  graphdef = nnx.graphdef(model.discriminator)

  def loss_fn(p):
    d = nnx.merge(graphdef, p)
    real_logits, fake_logits = d(images), d(fake)
    terms = dict(discriminator=discriminator.discriminator_loss(real_logits, fake_logits),
                 real_logit=jnp.mean(real_logits), fake_logit=jnp.mean(fake_logits))
    total = terms["discriminator"]
    if config.loss.r1:
      terms["r1"] = discriminator.r1_penalty(d, images)
      total = total + config.loss.r1 / 2 * terms["r1"]
    return total, terms

  def train(p):
    return jax.grad(loss_fn, has_aux=True)(p)

  def wait(p):  # before the start: no discriminator work at all
    zeros = dict(discriminator=0.0, real_logit=0.0, fake_logit=0.0)
    if config.loss.r1:
      zeros["r1"] = 0.0
    return jax.tree.map(jnp.zeros_like, p), jax.tree.map(jnp.float32, zeros)

  return jax.lax.cond(on, train, wait, disc_params)


def train_step(setup: Setup, state: base.TrainState, batch,
               perceptual_weights=None) -> tuple[base.TrainState, dict]:
  """One generator update and one discriminator update, each by its own optimizer.

  The generator's loss sees the discriminator as it was before this step; the
  discriminator's loss sees this step's reconstructions (detached) against the real images.
  Both updates come from one `tx.update`: the optimizer (parti_jax/optim.py) gives the
  `discriminator` group its own Adam, which only its own loss's gradients reach.
  """
  config, images = setup.config, batch["images"]
  key = jax.random.fold_in(state.rng, state.step) if config.model.dropout_rate else None
  with_discriminator = "discriminator" in state.params
  on = adversarial_on(config, state.step)

  quantized = state.step >= config.model.get("quantize_start", 0)

  def loss_fn(params):
    model = setup.model(params)
    out = model(images, key, quantized)
    terms = losses(config, out, images, perceptual_weights)
    if with_discriminator and config.loss.adversarial:
      recon = out["reconstruction"]
      g_adv = jax.lax.cond(
          on, lambda: discriminator.generator_loss(model.discriminator(recon)),
          lambda: jnp.zeros((), jnp.float32))
      terms["generator_adversarial"] = g_adv
      terms["loss"] = terms["loss"] + config.loss.adversarial * g_adv
    return terms["loss"], (terms, out)

  (_, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if with_discriminator:
    d_grads, d_terms = discriminator_grads(
        config, setup.model(state.params), state.params["discriminator"], images,
        jax.lax.stop_gradient(out["reconstruction"]), on)
    grads = dict(grads, discriminator=d_grads)
    terms.update(d_terms, adversarial_on=on.astype(jnp.float32))
  params, opt_state, update_metrics = base.apply_gradients(setup, state, grads)
  usage, perplexity = vqgan.codebook_usage(out["codes"], config.model.codebook_size)
  metrics = dict(terms, psnr=jnp.mean(vqgan.psnr(out["reconstruction"], images)),
                 codebook_usage=usage, codebook_perplexity=perplexity,
                 quantized=quantized.astype(jnp.float32), **update_metrics)
  if config.model.dead_code_restart_every:
    params, metrics["codes_restarted"] = restart_dead_codes(config, state, params, out)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def restart_dead_codes(config, state: base.TrainState, params, out) -> tuple[dict, jax.Array]:
  """Every `model.dead_code_restart_every` steps, entries no latent of this global batch
  chose are replaced by the batch's latents that their nearest entries fit worst.

  A dead entry gets no gradient from the codebook loss, so it stays dead; restarting it on
  the data brings it back into use. "Unused in one global batch" needs no usage statistics
  in the state, and with a batch of many more latents than entries it only catches entries
  that are rare, not merely unlucky. Restarting at the worst-fitted latents, not at random
  ones, puts new entries where the codebook is short: on the shapes data most patches are
  plain background, so random latents would mostly restart entries there. The new entry is
  a unit latent, the scale the codebook is initialized at. Worst-fitted latents can be near
  copies of one rare patch, and with more dead entries than badly fitted latents some restart
  on well-fitted ones; entries that then go unused restart again. A restarted entry takes
  over the latents nearest to it, which the decoder has to learn anew:
  `model.dead_code_restart_until` (a step; -1: never) stops restarts so that the run ends on
  a settled codebook.
  """
  m = config.model
  counts = jnp.zeros(m.codebook_size, jnp.int32).at[out["codes"].reshape(-1)].add(1)
  due = (state.step + 1) % m.dead_code_restart_every == 0
  if m.get("dead_code_restart_until", -1) >= 0:
    due = due & (state.step < m.dead_code_restart_until)
  dead = (counts == 0) & due

  def restart():
    latents = out["latents"].reshape(-1, m.code_dim)  # unit vectors
    book = params["codebook"] / jnp.linalg.norm(params["codebook"], axis=-1, keepdims=True)
    misfit = 1 - jnp.max(latents @ book.T, axis=-1)
    # The i-th dead entry takes the i-th worst-fitted latent of the batch.
    _, worst = jax.lax.top_k(misfit, min(m.codebook_size, latents.shape[0]))
    rank = jnp.clip(jnp.cumsum(dead) - 1, 0, worst.shape[0] - 1)
    fresh = latents[worst[rank]]
    return jnp.where(dead[:, None], jax.lax.stop_gradient(fresh), params["codebook"])

  # Only on restart steps: the similarity matrix and top-k cost a large codebook a lot.
  codebook = jax.lax.cond(jnp.any(dead), restart, lambda: params["codebook"])
  return dict(params, codebook=codebook), dead.sum()


def eval_step(setup: Setup, params, batch) -> dict:
  """PSNR, L2 and codebook usage over the rows whose `mask` is 1."""
  out = setup.model(params)(batch["images"], None)
  mask = batch["mask"].astype(jnp.float32)
  weight = jnp.maximum(mask.sum(), 1.0)
  per_row_l2 = jnp.mean((out["reconstruction"] - batch["images"]) ** 2, axis=(1, 2, 3))
  usage, _ = vqgan.codebook_usage(out["codes"], setup.config.model.codebook_size, mask)
  return dict(psnr=jnp.sum(vqgan.psnr(out["reconstruction"], batch["images"]) * mask) / weight,
              l2=jnp.sum(per_row_l2 * mask) / weight, codebook_usage=usage, weight=mask.sum())


def load_perceptual_weights(config) -> dict:
  """The VGG-16 weights of the perceptual loss as host arrays, or {} when the term is off."""
  w = config.loss
  if not w.get("perceptual", 0):
    return {}
  path = w.get("perceptual_weights", "")
  if not path:
    logging.warning(
        "loss.perceptual=%s but loss.perceptual_weights is empty: the perceptual loss is OFF. "
        "Convert VGG-16 weights you have with `python -m parti_jax.convert.vgg16 --vgg16 "
        "vgg16-397923af.pth [--lpips vgg.pth] --out vgg16_lpips.npz` and pass "
        "--config.loss.perceptual_weights=vgg16_lpips.npz.", w.perceptual)
    return {}
  if path.startswith("random:"):  # for tests: the network's shape without real features
    logging.warning("loss.perceptual_weights=%s: random VGG-16 weights (tests only)", path)
    return perceptual.random_weights(int(path.split(":", 1)[1]))
  return perceptual.load_weights(path)


def jit_train_step(setup: Setup):
  """`(state, batch) -> (state, metrics)`, the perceptual network's frozen weights bound as a
  third, replicated argument."""
  return base.jit_train_step(setup, train_step, load_perceptual_weights(setup.config))


def jit_eval_step(setup: Setup):
  return base.jit_eval_step(setup, eval_step)


def forward_flops_per_example(m: ml_collections.ConfigDict) -> float:
  """Matmul FLOPs of one image through encoder and decoder (2*m*n*k per product)."""
  n, pixels = (m.resolution // m.patch_size) ** 2, m.patch_size ** 2 * 3

  def side(s):
    per_layer = 2 * n * s.d_model * s.d_model * 4 + 4 * n * n * s.d_model \
        + 2 * n * s.d_model * s.mlp_dim * 2
    return s.layers * per_layer + 2 * n * s.d_model * s.mlp_dim * 2  # + the tanh FF

  lookup = 2 * n * m.code_dim * m.codebook_size
  ends = 2 * n * pixels * m.encoder.d_model + 2 * n * m.decoder.d_model * pixels * 2 \
      + 2 * n * m.code_dim * (m.encoder.d_model + m.decoder.d_model)
  return side(m.encoder) + side(m.decoder) + lookup + ends


def train_step_flops(config) -> float:
  """FLOPs of one generator step over the global batch (forward + backward: 3x forward)."""
  return 3 * forward_flops_per_example(config.model) * config.global_batch_size


def tokens_per_example(config) -> int:
  return (config.model.resolution // config.model.patch_size) ** 2


def reconstruct_fn(setup: Setup):
  """`(params, images) -> images` through the codes, jitted once."""
  return jax.jit(lambda p, x: setup.model(p).decode(setup.model(p).encode(x)))


def reconstruction_grid(reconstruct, params, images, count: int = 8) -> np.ndarray:
  """uint8 [2R, count*R, 3]: `count` images above their reconstructions."""
  images = images[:count]
  recon = reconstruct(params, images)
  rows = [np.concatenate(list(np.asarray(jax.device_get(x))), axis=1) for x in (images, recon)]
  return image_lib.to_uint8(np.concatenate(rows, axis=0), -1.0, 1.0)


def build(config: ml_collections.ConfigDict, mesh) -> base.Task:
  setup = Setup(config, mesh)
  reconstruct = reconstruct_fn(setup)
  return base.Task(setup, INPUTS, jit_train_step(setup), jit_eval_step(setup),
                   train_step_flops(config), tokens_per_example(config),
                   picture=lambda params, batch: reconstruction_grid(
                       reconstruct, params, batch["images"]))
