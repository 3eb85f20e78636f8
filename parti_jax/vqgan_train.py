"""Training the ViT-VQGAN (stage 1) with the same trainer: its setup, losses and steps.

  python -m parti_jax.train --config configs/vitvqgan_tiny.py --workdir DIR \
      --config.data.train=data/shapes/train --config.data.eval=data/shapes/validation

The state, sharding, optimizer, checkpoints, resume and metrics are the Parti trainer's
(`parti_jax.train_step.Setup` with this model). Losses so far: L2 (`loss.l2`), the
logit-laplace likelihood (`loss.logit_laplace`, with `model.logit_laplace`), the codebook
loss and the commitment loss (`model.commitment`). The perceptual and adversarial terms
of the paper are not implemented yet. Evaluation reports PSNR, L2 and codebook usage.

Known limitation: on the shapes data the tiny config's codebook collapses to one or two
codes within ~100 steps (usage ~1.6%, PSNR ~20 dB: the decoder draws the background), at
learning rates 1e-3, 3e-4 and 1e-4 and with or without the logit-laplace term. Restarting
dead codes from recent encoder outputs and the adversarial term are the next steps.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from parti_jax import train_step as ts
from parti_jax import vqgan
from parti_jax.data import images as image_lib


class Setup(ts.Setup):
  model_class = vqgan.ViTVQGAN

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    r, b = self.config.model.resolution, batch_size or self.config.global_batch_size
    return dict(images=jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32,
                                            sharding=self.batch_sharding))


def losses(config: ml_collections.ConfigDict, out: dict, images) -> dict:
  """Every loss term (unweighted) and the weighted total, `loss`."""
  w, m = config.loss, config.model
  terms = dict(l2=jnp.mean((out["reconstruction"] - images) ** 2),
               codebook=out["codebook_loss"], commitment=out["commitment_loss"])
  total = w.l2 * terms["l2"] + terms["codebook"] + m.commitment * terms["commitment"]
  if m.logit_laplace:
    terms["logit_laplace"] = vqgan.logit_laplace_nll(out["output"], images)
    total = total + w.logit_laplace * terms["logit_laplace"]
  return dict(terms, loss=total)


def train_step(setup: Setup, state: ts.TrainState, batch) -> tuple[ts.TrainState, dict]:
  config = setup.config
  key = jax.random.fold_in(state.rng, state.step) if config.model.dropout_rate else None

  def loss_fn(params):
    out = setup.model(params)(batch["images"], key)
    terms = losses(config, out, batch["images"])
    return terms["loss"], (terms, out)

  (_, (terms, out)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  usage, perplexity = vqgan.codebook_usage(out["codes"], config.model.codebook_size)
  metrics = dict(terms, psnr=jnp.mean(vqgan.psnr(out["reconstruction"], batch["images"])),
                 codebook_usage=usage, codebook_perplexity=perplexity,
                 grad_norm=optax.tree.norm(grads), learning_rate=setup.schedule(state.step),
                 update_skipped=1 - opt_state.last_finite.astype(jnp.int32),
                 consecutive_skips=opt_state.notfinite_count)
  params = optax.apply_updates(state.params, updates)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(setup: Setup, params, batch) -> dict:
  """PSNR, L2 and codebook usage over the rows whose `mask` is 1."""
  out = setup.model(params)(batch["images"], None)
  mask = batch["mask"].astype(jnp.float32)
  weight = jnp.maximum(mask.sum(), 1.0)
  per_row_l2 = jnp.mean((out["reconstruction"] - batch["images"]) ** 2, axis=(1, 2, 3))
  usage, _ = vqgan.codebook_usage(out["codes"], setup.config.model.codebook_size, mask)
  return dict(psnr=jnp.sum(vqgan.psnr(out["reconstruction"], batch["images"]) * mask) / weight,
              l2=jnp.sum(per_row_l2 * mask) / weight, codebook_usage=usage, weight=mask.sum())


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
  return 3 * forward_flops_per_example(config.model) * config.global_batch_size


def reconstruct_fn(setup: Setup):
  """`(params, images) -> images` through the codes, jitted once."""
  return jax.jit(lambda p, x: setup.model(p).decode(setup.model(p).encode(x)))


def reconstruction_grid(reconstruct, params, images, count: int = 8) -> np.ndarray:
  """uint8 [2R, count*R, 3]: `count` images above their reconstructions."""
  images = images[:count]
  recon = reconstruct(params, images)
  rows = [np.concatenate(list(np.asarray(jax.device_get(x))), axis=1) for x in (images, recon)]
  return image_lib.to_uint8(np.concatenate(rows, axis=0), -1.0, 1.0)
