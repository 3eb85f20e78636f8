"""The super-resolution task: low-resolution images in, s times larger images out.

  python -m parti_jax.train --config configs/superres_tiny.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS

A batch holds `images` [B, R, R, 3] in [-1, 1] at `data.resolution` (any image shard set,
`data.kind="images"`; captions are not read: the upsampler is not text-conditioned). Each
train step cuts one random `model.crop`-pixel square from every image (the key is the
state's rng folded with the step, so a resumed run cuts the same crops), makes its
low-resolution input by area downsampling (the mean of each s x s block), and minimizes
  loss.l2 * L2 + loss.perceptual * the tokenizer's VGG-16 perceptual distance
  + loss.adversarial * the non-saturating GAN loss (from step loss.adversarial_start)
against the StyleGAN-style discriminator, which trains beside it with its own optimizer
(`discriminator_optimizer`), exactly as the tokenizer's does (parti_jax/tasks/vitvqgan.py:
its perceptual weights, its discriminator update and the GAN losses are reused here).

Evaluation upsamples the whole `data.eval` images from their area-downsampled versions and
reports the PSNR of the model, of bicubic upsampling from the same input, and their
difference (`eval/psnr_gain`: above 0 is better than bicubic); the picture shows, for a few
images, the input (nearest-neighbour enlarged), bicubic, the model's output and the target.
`python -m parti_jax.upsample --model RUN --images DIR --out DIR` uses a trained run.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from parti_jax import config as config_lib
from parti_jax.data import images as image_lib
from parti_jax.models import discriminator, perceptual
from parti_jax.models import superres as sr
from parti_jax.models import vitvqgan as vqgan
from parti_jax.tasks import base
from parti_jax.tasks import vitvqgan as vqgan_task

INPUTS = ("images",)
EVAL_METRICS = ("psnr", "psnr_bicubic", "psnr_gain", "l2")  # what eval_step reports
PICTURE_IMAGES = 4  # eval images in the picture


def base_config() -> ml_collections.ConfigDict:
  """Defaults of the upsampler, the paper's x2 (256 -> 512 px): the tokenizer's config
  (`config.vitvqgan_base()`: optimizer, schedule, discriminator optimizer, batch, steps,
  sharding rules, data) with this task's model and loss sections."""
  c = config_lib.vitvqgan_base()
  c.task = "superres"
  m = c.model = ml_collections.ConfigDict()
  m.scale = 2  # output side / input side
  m.channels = 128  # the paper's 12 blocks of 128 channels
  m.blocks = 12
  m.expansion = 4  # channels inside a block's ReLU: expansion x channels (~15M parameters)
  m.residual_scale = 0.1  # each block adds 0.1 x its output (EDSR's scale: deep stacks stay stable)
  m.crop = 128  # side of the high-resolution training crops (64 px inputs at x2)
  m.dtype = "bfloat16"  # compute dtype of the convolutions; parameters are float32
  # The adversary over the crops (parti_jax/models/discriminator.py); channels=0: none.
  m.discriminator = ml_collections.ConfigDict(dict(channels=64, max_channels=512))
  c.loss = ml_collections.ConfigDict(dict(
      l2=1.0, perceptual=0.1, perceptual_weights="", adversarial=0.1,
      adversarial_start=50_000, r1=0.0))
  c.data.resolution = 512  # the high-resolution images; evaluation upsamples them whole
  c.train.update(best_metric="eval/psnr", best_mode="max")
  return c


class Setup(base.Setup):
  model_class = sr.SuperRes

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    r, b = self.config.data.resolution, batch_size or self.config.global_batch_size
    return dict(images=jax.ShapeDtypeStruct((b, r, r, 3), jnp.float32,
                                            sharding=self.batch_sharding))


def config_problems(config: ml_collections.ConfigDict, sizes: dict, training: bool) -> list[str]:
  """What in `config` cannot run on a mesh of `sizes` (`config.check` raises them)."""
  m, problems = config.model, []
  for field in ("scale", "channels", "blocks", "expansion", "crop"):
    if field not in m:
      problems.append(f"model.{field} is missing: a superres config starts from "
                      "parti_jax.tasks.superres.base_config()")
  if problems:
    return problems
  if m.scale < 2:
    problems.append(f"model.scale={m.scale} must be at least 2")
  for field in ("channels", "blocks", "expansion"):
    if m[field] < 1:
      problems.append(f"model.{field}={m[field]} must be at least 1")
  if m.scale >= 2 and m.crop % m.scale:
    problems.append(f"model.crop={m.crop} is not divisible by model.scale={m.scale}: the "
                    "low-resolution input would not tile the crop")
  d = m.get("discriminator", {}).get("channels", 0)
  if d and (m.crop < 4 or m.crop & (m.crop - 1)):
    problems.append(f"model.discriminator.channels={d}: the discriminator needs a power-of-two "
                    f"model.crop of at least 4, not {m.crop} (or set channels=0)")
  if not training:
    return problems
  data, w = config.data, config.loss
  if data.kind != "images":
    problems.append(f"data.kind={data.kind!r}: the upsampler trains on image shards ('images')")
  if data.get("spm_model", ""):
    problems.append(f"data.spm_model={data.spm_model!r}: the upsampler is not text-conditioned; "
                    "leave it empty (captions are not read)")
  if m.crop > data.resolution:
    problems.append(f"model.crop={m.crop} is larger than data.resolution={data.resolution}, "
                    "the images it is cut from")
  if data.resolution % m.scale:
    problems.append(f"data.resolution={data.resolution} is not divisible by "
                    f"model.scale={m.scale}: evaluation downsamples the whole images")
  if config.get("grad_accum_steps", 1) != 1:
    problems.append(f"grad_accum_steps={config.grad_accum_steps}: the superres task takes "
                    "whole batches (set 1)")
  if w.adversarial and not d:
    problems.append(f"loss.adversarial={w.adversarial} needs a discriminator: "
                    "model.discriminator.channels is 0")
  weights = w.get("perceptual_weights", "")
  if w.perceptual and weights and not weights.startswith("random:") \
      and not epath.Path(weights).exists():
    problems.append(f"loss.perceptual_weights={weights!r} does not exist (convert VGG-16 "
                    "weights with python -m parti_jax.convert.vgg16)")
  batch_shards = sizes["data"] * sizes["fsdp"]
  if config.global_batch_size % batch_shards:
    problems.append(f"global_batch_size={config.global_batch_size} is not divisible by the "
                    f"batch shards (mesh.data x mesh.fsdp = {batch_shards})")
  return problems


def random_crops(images, size: int, key):
  """One `size` x `size` square per image [B, H, W, C], placed uniformly at random."""
  b, h, w, c = images.shape
  corners = jax.random.randint(key, (b, 2), 0, jnp.array([h - size + 1, w - size + 1]))
  cut = lambda x, at: jax.lax.dynamic_slice(x, (at[0], at[1], 0), (size, size, c))
  return jax.vmap(cut)(images, corners)


def losses(config: ml_collections.ConfigDict, output, target, perceptual_weights) -> dict:
  """The reconstruction terms (unweighted) and their weighted total, `loss`."""
  w = config.loss
  terms = dict(l2=jnp.mean((output - target) ** 2))
  total = w.l2 * terms["l2"]
  if perceptual_weights:
    terms["perceptual"] = jnp.mean(perceptual.distance(
        perceptual_weights, output, target, jnp.dtype(config.model.dtype)))
    total = total + w.perceptual * terms["perceptual"]
  return dict(terms, loss=total)


def train_step(setup: Setup, state: base.TrainState, batch,
               perceptual_weights=None) -> tuple[base.TrainState, dict]:
  """One upsampler update and one discriminator update, each by its own optimizer (as the
  tokenizer's step: the discriminator sees this step's outputs, detached)."""
  config, m = setup.config, setup.config.model
  target = random_crops(batch["images"], m.crop, jax.random.fold_in(state.rng, state.step))
  lowres = sr.area_downsample(target, m.scale)
  with_discriminator = "discriminator" in state.params
  on = vqgan_task.adversarial_on(config, state.step)

  def loss_fn(params):
    model = setup.model(params)
    output = model(lowres)
    terms = losses(config, output, target, perceptual_weights)
    if with_discriminator and config.loss.adversarial:
      g_adv = jax.lax.cond(
          on, lambda: discriminator.generator_loss(model.discriminator(output)),
          lambda: jnp.zeros((), jnp.float32))
      terms["generator_adversarial"] = g_adv
      terms["loss"] = terms["loss"] + config.loss.adversarial * g_adv
    return terms["loss"], (terms, output)

  (_, (terms, output)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  if with_discriminator:
    d_grads, d_terms = vqgan_task.discriminator_grads(
        config, setup.model(state.params), state.params["discriminator"], target,
        jax.lax.stop_gradient(output), on)
    grads = dict(grads, discriminator=d_grads)
    terms.update(d_terms, adversarial_on=on.astype(jnp.float32))
  params, opt_state, update_metrics = base.apply_gradients(setup, state, grads)
  # PSNR of the whole batch's mean squared error: a flat crop (plain background) has almost
  # none, and its own PSNR, unbounded, would swamp a mean of per-crop PSNRs.
  whole = lambda x: x.reshape(1, -1, *x.shape[2:])  # the batch as one image
  batch_psnr = lambda x: vqgan.psnr(whole(jnp.clip(x, -1, 1)), whole(target))[0]
  psnr, psnr_bicubic = batch_psnr(output), batch_psnr(sr.bicubic(lowres, m.scale))
  metrics = dict(terms, psnr=psnr, psnr_bicubic=psnr_bicubic, psnr_gain=psnr - psnr_bicubic,
                 **update_metrics)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def upsampled(setup: Setup, params, images) -> dict:
  """For whole images [B, R, R, 3]: their low-resolution input and its upsamplings, each
  clipped to [-1, 1] (as a picture would be): `lowres`, `bicubic`, `output`."""
  s = setup.config.model.scale
  lowres = sr.area_downsample(images, s)
  clip = lambda x: jnp.clip(x, -1.0, 1.0)
  return dict(lowres=lowres, bicubic=clip(sr.bicubic(lowres, s)),
              output=clip(setup.model(params)(lowres)))


def eval_step(setup: Setup, params, batch) -> dict:
  """PSNR of the model and of bicubic upsampling, their difference and the model's L2, over
  the rows whose `mask` is 1."""
  images = batch["images"]
  out = upsampled(setup, params, images)
  mask = batch["mask"].astype(jnp.float32)
  weight = jnp.maximum(mask.sum(), 1.0)
  mean = lambda per_row: jnp.sum(per_row * mask) / weight
  psnr, psnr_bicubic = vqgan.psnr(out["output"], images), vqgan.psnr(out["bicubic"], images)
  return dict(psnr=mean(psnr), psnr_bicubic=mean(psnr_bicubic),
              psnr_gain=mean(psnr - psnr_bicubic),
              l2=mean(jnp.mean((out["output"] - images) ** 2, axis=(1, 2, 3))),
              weight=mask.sum())


def picture_fn(setup: Setup):
  """`(params, eval batch) -> uint8 [4R, n*R, 3]`: for the first n eval images, rows of the
  input (nearest-neighbour enlarged), bicubic, the model's output and the target."""
  s = setup.config.model.scale
  rows = jax.jit(lambda p, x: upsampled(setup, p, x))

  def picture(params, batch):
    images = batch["images"][:PICTURE_IMAGES]
    out = jax.device_get(rows(params, images))
    nearest = np.repeat(np.repeat(out["lowres"], s, axis=1), s, axis=2)
    grid = [np.concatenate(list(x), axis=1)
            for x in (nearest, out["bicubic"], out["output"], jax.device_get(images))]
    return image_lib.to_uint8(np.concatenate(grid, axis=0), -1.0, 1.0)
  return picture


def forward_flops_per_example(m: ml_collections.ConfigDict) -> float:
  """Convolution FLOPs of one crop through the upsampler (2 * 9 * in * out per input pixel
  and 3x3 convolution); the bicubic skip and the discriminator are not counted."""
  pixels = (m.crop // m.scale) ** 2
  c, wide = m.channels, m.channels * m.expansion
  per_pixel = 2 * 9 * (3 * c + m.blocks * 2 * c * wide + c * 3 * m.scale ** 2)
  return pixels * per_pixel


def train_step_flops(config) -> float:
  """FLOPs of one upsampler step over the global batch (forward + backward: 3x forward)."""
  return 3 * forward_flops_per_example(config.model) * config.global_batch_size


def tokens_per_example(config) -> int:
  """Throughput is counted in crops: the trainer's image_tokens_per_s reads as crops/s."""
  del config
  return 1


def build(config: ml_collections.ConfigDict, mesh) -> base.Task:
  setup = Setup(config, mesh)
  train = base.jit_train_step(setup, train_step, vqgan_task.load_perceptual_weights(config))
  return base.Task(setup, INPUTS, train, base.jit_eval_step(setup, eval_step),
                   train_step_flops(config), tokens_per_example(config),
                   picture=picture_fn(setup))
