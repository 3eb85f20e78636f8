"""The contrastive task: the reranker's dual encoder, images and their captions matched.

  python -m parti_jax.train --config configs/contrastive_tiny.py --workdir DIR \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS \
      --config.data.spm_model=spm.model

A batch is a dict of global arrays sharded over the batch mesh axes (`data.kind="images"`
with a SentencePiece model):
  images       float32 [B, R, R, 3] (the data's value range)
  text_tokens  int32 [B, text_len]  (0 = padding)

Losses (`loss.name`) over the similarity matrix of every image with every caption of the
GLOBAL batch: "softmax" (CLIP: symmetric cross-entropy of each image over the captions and
each caption over the images, logits scaled by the learned 1/temperature) and "sigmoid"
(SigLIP: an independent binary loss per pair, with the learned bias).

Captions with the same ids are one caption: their pairs are positives, not negatives, in
both losses, the accuracy and the recalls (the shapes data repeats "a red circle" many
times in a batch; calling its other images negatives would teach the model to tell apart
what its text cannot say).

Evaluation (`eval_step`) reports text-to-image and image-to-text recall@1 and @5 and the
loss, each within one evaluation batch: the gallery a query is ranked against is the other
rows of its eval batch (`train.eval_batch_size`, or `global_batch_size` when 0; the last
batch holds what is left), padding rows excluded. Recalls are comparable between runs only
at the same eval batch size.

Gradient accumulation is refused: a micro-batch would see 1/n of the negatives, and the
softmax loss of the global batch is not the mean of its micro-batches' losses.
"""

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from parti_jax import config as config_lib
from parti_jax.models.dual_encoder import DualEncoder
from parti_jax.sharding import constrain
from parti_jax.tasks import base

INPUTS = ("images", "text_tokens")
LOSSES = ("softmax", "sigmoid")
RECALL_AT = (1, 5)
EVAL_METRICS = ("loss",) + tuple(f"recall@{k}_{d}" for k in RECALL_AT
                                 for d in ("text_to_image", "image_to_text"))
SIDES = ("text", "image")


class Setup(base.Setup):
  model_class = DualEncoder

  def abstract_batch(self, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    m, b = self.config.model, batch_size or self.config.global_batch_size
    return dict(
        images=jax.ShapeDtypeStruct((b, m.resolution, m.resolution, 3), jnp.float32,
                                    sharding=self.batch_sharding),
        text_tokens=jax.ShapeDtypeStruct((b, m.text_len), jnp.int32,
                                         sharding=self.batch_sharding))


def config_problems(config: ml_collections.ConfigDict, sizes: dict, training: bool) -> list[str]:
  """What in `config` cannot run on a mesh of `sizes` (`config.check` raises them)."""
  m, problems = config.model, config_lib.layer_problems(config.model)

  def need(ok, msg):
    if not ok:
      problems.append(msg)

  need(m.dtype in ("float32", "bfloat16", "float16"),
       f"model.dtype={m.dtype!r} is not float32, bfloat16 or float16")
  need(m.remat in config_lib.REMAT_POLICIES,
       f"model.remat={m.remat!r} is not one of {config_lib.REMAT_POLICIES}")
  need(m.patch_size > 0 and m.resolution % m.patch_size == 0,
       f"model.resolution={m.resolution} is not a multiple of model.patch_size={m.patch_size}")
  need(1.0 <= m.logit_scale_init <= m.max_logit_scale,
       f"model.logit_scale_init={m.logit_scale_init} is not in [1, model.max_logit_scale="
       f"{m.max_logit_scale}]")
  for side in SIDES:
    s = m[side]
    need(s.layers >= 1, f"model.{side}.layers={s.layers} must be at least 1")
    need(s.get("head_dim", -1) > 0 or s.d_model % s.num_heads == 0,
         f"model.{side}.d_model={s.d_model} is not divisible by model.{side}.num_heads="
         f"{s.num_heads} (or set model.{side}.head_dim)")
    for field, logical in (("num_heads", "heads"), ("mlp_dim", "mlp"), ("d_model", "embed")):
      n, desc = config_lib.ways(config, sizes, logical)
      need(s[field] % n == 0, f"model.{side}.{field}={s[field]} is not divisible by {desc} "
           f"(logical axis '{logical}')")
  n, desc = config_lib.ways(config, sizes, "vocab")
  need(config_lib.round_up(m.text_vocab_size) % n == 0,
       f"model.text_vocab_size (padded)={config_lib.round_up(m.text_vocab_size)} is not "
       f"divisible by {desc} (logical axis 'vocab')")
  if not training:
    return problems
  d = config.data
  need(config.loss.name in LOSSES, f"loss.name={config.loss.name!r} is not one of {LOSSES}")
  need(d.kind == "images", f"data.kind={d.kind!r}: the contrastive task reads image shards "
       "with their captions (data.kind='images')")
  # Without data (planning with inspect or aot) there are no captions to tokenize yet.
  need(bool(d.spm_model) or not d.train, "data.spm_model is empty: the contrastive task needs "
       "the captions' ids (a SentencePiece model from python -m parti_jax.data.spm)")
  need(d.caption_dropout == 0, f"data.caption_dropout={d.caption_dropout}: a dropped caption "
       "is no caption for its image to match; set it to 0")
  need(d.resolution == m.resolution, f"data.resolution={d.resolution} is not "
       f"model.resolution={m.resolution}")
  need(config.grad_accum_steps == 1,
       f"grad_accum_steps={config.grad_accum_steps}: the contrastive losses take their "
       "negatives from the whole global batch, which micro-batches would split; use 1")
  need(config.optimizer.name in ("adafactor", "adamw"),
       f"optimizer.name={config.optimizer.name!r} is not 'adafactor' or 'adamw'")
  need(config.schedule.name in config_lib.SCHEDULES,
       f"schedule.name={config.schedule.name!r} is not one of {config_lib.SCHEDULES}")
  n, desc = config_lib.ways(config, sizes, "batch")
  need(config.global_batch_size % n == 0 and config.global_batch_size >= 2,
       f"global_batch_size={config.global_batch_size} is not divisible by the batch shards "
       f"({desc or 'none'}), or below 2 (a batch of one has no negatives)")
  return problems


def base_config() -> ml_collections.ConfigDict:
  """The contrastive configs' defaults: `config.base()` (trainer, data, optimizer, mesh) with
  this task's `model` and `loss`. The model is CoCa-Base's dual encoder in size (ViT-B/16
  at 256 px, a 12-layer 768-wide text tower, 16k pieces, 128 tokens); configs/ shrink it.

  Kept beside the task rather than in parti_jax/config.py so the task is one module plus
  its configs (docs/architecture.md); `config.base()`'s Parti model fields are replaced.
  """
  c = config_lib.base()
  c.task = "contrastive"
  tower = lambda: ml_collections.ConfigDict(dict(d_model=768, num_heads=12, head_dim=-1,
                                                 mlp_dim=3072, layers=12))
  c.model = ml_collections.ConfigDict(dict(
      text_vocab_size=16_000, text_len=128,  # as Parti's text encoder
      resolution=256, patch_size=16,
      text=tower(), image=tower(),
      embed_dim=768,  # the shared embedding space
      logit_scale_init=1 / 0.07,  # CLIP's initial temperature 0.07 (SigLIP starts at 10)
      max_logit_scale=100.0,  # CLIP's clip
      logit_bias_init=-10.0,  # SigLIP's (the softmax loss ignores the bias)
      dropout_rate=0.0, dtype="bfloat16", remat="none", scan_unroll=1,
      attention_impl="auto"))
  c.loss = ml_collections.ConfigDict(dict(name="softmax"))  # or "sigmoid"
  # Patch pixels and the shared embedding are small: replicated.
  c.sharding_rules = config_lib.DEFAULT_RULES + (("patch", None), ("joint", None))
  c.data.kind = "images"
  c.data.caption_dropout = 0.0  # every image keeps its caption to be matched with
  c.data.resolution = c.model.resolution  # must stay equal: a config changing one sets both
  # CLIP's AdamW (beta2 0.98, weight decay 0.2), warm-up then cosine.
  c.optimizer.update(name="adamw", learning_rate=5e-4, b1=0.9, b2=0.98, weight_decay=0.2,
                     grad_clip_norm=1.0, momentum_dtype="float32")
  c.schedule.update(name="warmup_cosine", warmup_steps=2000, final_ratio=0.0)
  c.global_batch_size = 4096
  c.num_train_steps = 100_000
  c.train.best_metric = "eval/recall@1_text_to_image"
  c.train.best_mode = "max"
  return c


# ------------------------------------------------------------------------- the losses

NEG = -1e30  # a logit that takes no part: finite, so that no inf - inf is ever made


def positives(text_tokens) -> jax.Array:
  """bool [B, B]: whether captions i and j have the same ids (so a pair of each other's)."""
  # [B, B, T] compared and reduced in one fusion (never materialised); rows sharded.
  same = jnp.all(text_tokens[:, None, :] == text_tokens[None, :, :], axis=-1)
  return constrain(same, "batch", None)


def similarities(queries, keys) -> jax.Array:
  """float32 [B, B] cosines of every query row with every key row (unit embeddings).

  This is where negatives come from the whole global batch: under jit the embeddings are
  global arrays sharded over the batch axes, and for each device's rows of the result XLA
  all-gathers the keys ([B, embed_dim]: small next to the towers' activations); their
  gradients flow back through the gather as a reduce-scatter. Rows stay sharded.
  """
  keys = constrain(keys, None, None)  # gathered: every device holds all B keys
  return constrain(jnp.einsum("id,jd->ij", queries, keys), "batch", None)


def _masked_logsumexp(logits, where):
  return jax.nn.logsumexp(jnp.where(where, logits, NEG), axis=-1)


def softmax_rows(logits, same, valid) -> jax.Array:
  """float32 [B]: each query row's cross-entropy against its keys, the positives one class:
  -log(sum of the softmax over its positives) = logsumexp(all) - logsumexp(positives).
  A perfectly aligned row (positives far above the rest) costs 0. `valid` [B] bool marks
  real rows; padding keys take no part."""
  keys = valid[None, :]
  return _masked_logsumexp(logits, keys) - _masked_logsumexp(logits, same & keys)


def softmax_loss(image_emb, text_emb, same, valid, logits_fn) -> jax.Array:
  """CLIP's symmetric loss: the mean over real rows of image->text and text->image CE."""
  i2t = softmax_rows(logits_fn(similarities(image_emb, text_emb), False), same, valid)
  t2i = softmax_rows(logits_fn(similarities(text_emb, image_emb), False), same.T, valid)
  return _row_mean((i2t + t2i) / 2, valid)


def sigmoid_loss(image_emb, text_emb, same, valid, logits_fn) -> jax.Array:
  """SigLIP: -log sigmoid(z * (scale * cos + bias)) summed over pairs of real rows (z = +1
  for a positive pair, -1 otherwise), divided by the number of real rows."""
  logits = logits_fn(similarities(image_emb, text_emb), True)
  z = jnp.where(same, 1.0, -1.0)
  pairs = (valid[:, None] & valid[None, :]).astype(jnp.float32)
  total = jnp.sum(-jax.nn.log_sigmoid(z * logits) * pairs)
  return total / jnp.maximum(valid.sum(), 1)


def _row_mean(per_row, valid):
  v = valid.astype(jnp.float32)
  return jnp.sum(per_row * v) / jnp.maximum(v.sum(), 1.0)


def loss_of(name: str):
  return dict(softmax=softmax_loss, sigmoid=sigmoid_loss)[name]


def hits_at(similarity, same, valid, k: int) -> jax.Array:
  """bool [B]: whether a positive is among each query row's top `k` keys.

  Counted as: fewer than k negatives score at least as high as the row's best positive.
  Ties count against the query, so a model that scores everything alike recalls nothing
  (not everything). Padding keys are neither positives nor negatives.
  """
  keys = valid[None, :]
  best = jnp.max(jnp.where(same & keys, similarity, NEG), axis=-1, keepdims=True)
  ahead = jnp.sum(~same & keys & (similarity >= best), axis=-1)
  return ahead < k


# -------------------------------------------------------------------------- the steps

def _forward(setup: Setup, params, batch, dropout_key, valid):
  """(loss, image embeddings, text embeddings, positives, model) of a batch."""
  model = setup.model(params)
  image_emb, text_emb = model(batch["images"], batch["text_tokens"], dropout_key)
  same = positives(batch["text_tokens"])
  loss = loss_of(setup.config.loss.name)(image_emb, text_emb, same, valid, model.logits)
  return loss, (image_emb, text_emb, same, model)


def loss_and_grads(setup: Setup, params, batch, dropout_key):
  """(loss, image->text top-1 accuracy), gradients: over the whole global batch."""
  valid = jnp.ones(batch["text_tokens"].shape[:1], bool)

  def loss_fn(p):
    loss, (image_emb, text_emb, same, _) = _forward(setup, p, batch, dropout_key, valid)
    accuracy = _row_mean(hits_at(similarities(image_emb, text_emb), same, valid, 1), valid)
    return loss, accuracy

  (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, accuracy, grads


def train_step(setup: Setup, state: base.TrainState, batch) -> tuple[base.TrainState, dict]:
  """One update (skipped, and counted, when the gradients are not finite)."""
  dropout_key = jax.random.fold_in(state.rng, state.step)
  if setup.config.model.dropout_rate == 0:
    dropout_key = None
  loss, accuracy, grads = loss_and_grads(setup, state.params, batch, dropout_key)
  logits = setup.model(state.params).logits
  params, opt_state, metrics = base.apply_gradients(setup, state, grads)
  metrics = dict(loss=loss, accuracy=accuracy, temperature=1.0 / logits.logit_scale(),
                 **metrics)
  if setup.config.loss.name == "sigmoid":
    metrics["logit_bias"] = logits.bias[...]
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(setup: Setup, params, batch) -> dict:
  """The loss and recall@1/@5 both ways within this batch, over the rows whose `mask` is 1
  (all without a mask); `weight` is the number of rows counted."""
  mask = batch.get("mask", jnp.ones(batch["text_tokens"].shape[:1], jnp.int32))
  valid = mask > 0
  loss, (image_emb, text_emb, same, _) = _forward(setup, params, batch, None, valid)
  t2i, i2t = similarities(text_emb, image_emb), similarities(image_emb, text_emb)
  out = dict(loss=loss, weight=valid.sum().astype(jnp.float32))
  for k in RECALL_AT:
    out[f"recall@{k}_text_to_image"] = _row_mean(hits_at(t2i, same.T, valid, k), valid)
    out[f"recall@{k}_image_to_text"] = _row_mean(hits_at(i2t, same, valid, k), valid)
  return out


def jit_loss_and_grads(setup: Setup):
  """`(params, batch) -> (loss, accuracy, grads)`, jitted on the setup's mesh."""
  replicated = NamedSharding(setup.mesh, P())
  fn = lambda s, params, batch: loss_and_grads(s, params, batch, None)
  return jax.jit(base.with_activation_mesh(setup, fn),
                 in_shardings=(setup.param_shardings, setup.batch_sharding),
                 out_shardings=(replicated, replicated, setup.param_shardings))


def embed_fn(setup: Setup):
  """`(params, images, text_tokens) -> (image embeddings, text embeddings)`, jitted on the
  setup's mesh (inference: no dropout). Rows must split over the batch axes."""
  replicated = NamedSharding(setup.mesh, P())
  fn = lambda s, params, images, text: s.model(params)(images, text)
  return jax.jit(base.with_activation_mesh(setup, fn),
                 in_shardings=(setup.param_shardings, setup.batch_sharding,
                               setup.batch_sharding),
                 out_shardings=(replicated, replicated))


# ------------------------------------------------------------------- FLOPs and build

def _tower_flops(s, length: int) -> float:
  """Matmul FLOPs of one sequence through one tower's blocks (2*m*n*k per product)."""
  h = s.num_heads * (s.get("head_dim", -1) if s.get("head_dim", -1) > 0
                     else s.d_model // s.num_heads)
  per_layer = 2 * length * s.d_model * h * 4 + 4 * length * length * h \
      + 2 * length * s.d_model * s.mlp_dim * 2
  return s.layers * per_layer


def forward_flops_per_example(m: ml_collections.ConfigDict) -> float:
  """One image and one caption through both towers, patch embedding and projections."""
  n = (m.resolution // m.patch_size) ** 2
  image = _tower_flops(m.image, n) + 2 * n * m.patch_size ** 2 * 3 * m.image.d_model \
      + 2 * m.image.d_model * m.embed_dim
  text = _tower_flops(m.text, m.text_len) + 2 * m.text.d_model * m.embed_dim
  return image + text


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one step over the global batch (forward + backward: 3x forward), plus the two
  B x B similarity products."""
  b, m = config.global_batch_size, config.model
  return 3 * (forward_flops_per_example(m) * b + 2 * 2 * b * b * m.embed_dim)


def tokens_per_example(config: ml_collections.ConfigDict) -> int:
  """Throughput is counted in image patches (the image tokens of this task)."""
  return (config.model.resolution // config.model.patch_size) ** 2


def build(config: ml_collections.ConfigDict, mesh) -> base.Task:
  setup = Setup(config, mesh)
  return base.Task(setup, INPUTS, base.jit_train_step(setup, train_step),
                   base.jit_eval_step(setup, eval_step), train_step_flops(config),
                   tokens_per_example(config))
