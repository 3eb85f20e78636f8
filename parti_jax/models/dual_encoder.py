"""The reranker's dual encoder: a text tower and an image tower into one embedding space.

Parti draws many images per prompt and keeps those a contrastive image-text model scores
best (CoCa in the paper). This is the contrastive half of such a model:

Text tower: SentencePiece ids -> token embeddings plus learned positions -> the Parti
encoder blocks (`layers.Stack`: bidirectional, padding masked) -> mean over the non-padding
tokens -> a linear projection to `model.embed_dim`. Mean, not the first token: the ids
have no [CLS] token to reserve for pooling, and the mean gives every token a direct path to
the loss; the first token would be the caption's first word ("a", "two"), a summary only
as far as attention made it one.

Image tower: non-overlapping PxP patches -> a linear patch embedding plus learned positions
-> the same blocks (no mask) -> mean over patches -> a linear projection. As in ViTs trained
contrastively (CLIP's, SigLIP's mean-pooled "MAP-less" variant), no class token.

Both embeddings are l2-normalized (float32), so their dot product is a cosine similarity.
Two learned scalars (`Logits`) turn similarities into logits: the scale, kept as its
logarithm (it stays positive, and Adam's steps on it are relative), clipped at
`model.max_logit_scale` as CLIP does so that the softmax cannot grow arbitrarily sharp; and
a bias, which only the pairwise sigmoid loss uses (SigLIP: it starts every pair far on the
"not a pair" side, where nearly all pairs of a batch are). Both exist whatever the loss, so
a checkpoint's structure does not depend on it. The temperature of the softmax is 1/scale.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from parti_jax import config as config_lib
from parti_jax.models.layers import Stack, dense_init, embed_init, embedding_lookup, \
    flat_dot_general
from parti_jax.models.vitvqgan import patchify, side_config
from parti_jax.sharding import constrain
from parti_jax.text import PAD_ID


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, -1, keepdims=True), eps))


class Logits(nnx.Module):
  """The learned scale and bias of image-text logits: scale * cosine + bias.

  The parameters are named `scale` and `bias` so that the optimizer's weight-decay mask
  (parti_jax/optim.py) leaves them alone, as CLIP exempts its logit scale: decay would pull
  the log-scale towards 0, a scale of 1. `scale` holds the scale's logarithm.
  """

  def __init__(self, m: ml_collections.ConfigDict):
    scalar = lambda value: nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=())
    self.scale = scalar(math.log(m.logit_scale_init))
    self.bias = scalar(m.logit_bias_init)
    self.max_log_scale = math.log(m.max_logit_scale)

  def logit_scale(self):
    """exp(log scale), clipped to [1, model.max_logit_scale] (CLIP clips at 100)."""
    return jnp.exp(jnp.clip(self.scale[...], 0.0, self.max_log_scale))

  def __call__(self, similarity, with_bias: bool):
    logits = self.logit_scale() * similarity
    return logits + self.bias[...] if with_bias else logits


class DualEncoder(nnx.Module):
  """Images [B, R, R, 3] and text ids [B, T] -> unit embeddings [B, embed_dim] each."""

  def __init__(self, m: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    # As for Parti: created without a mesh; parti_jax.tasks.base.Setup lays the parameters
    # out by their logical names.
    with nnx.use_eager_sharding(False):
      self._build(m, rngs)

  def _build(self, m, rngs):
    if m.resolution % m.patch_size:
      raise ValueError(f"model.resolution={m.resolution} is not a multiple of "
                       f"model.patch_size={m.patch_size}")
    self.config = ml_collections.FrozenConfigDict(m)  # hashable: it lives in the graphdef
    self.dtype = jnp.dtype(m.dtype)
    text, image = side_config(m, "text"), side_config(m, "image")
    pos = nnx.with_partitioning(nnx.initializers.normal(0.02), ("length", "embed"))
    linear = lambda i, o, names: nnx.Linear(
        i, o, use_bias=False, dtype=self.dtype, dot_general=flat_dot_general, rngs=rngs,
        kernel_init=dense_init(names))

    self.text_embed = nnx.Embed(config_lib.round_up(m.text_vocab_size), text.d_model,
                                rngs=rngs, embedding_init=embed_init(("vocab", "embed")))
    self.text_pos = nnx.Param(pos(rngs.params(), (m.text_len, text.d_model)))
    self.text_tower = Stack(text, m.text.layers, cross=False, rngs=rngs)
    self.text_proj = linear(text.d_model, m.embed_dim, ("embed", "joint"))

    grid = m.resolution // m.patch_size
    self.patch_embed = linear(m.patch_size ** 2 * 3, image.d_model, ("patch", "embed"))
    self.image_pos = nnx.Param(pos(rngs.params(), (grid * grid, image.d_model)))
    self.image_tower = Stack(image, m.image.layers, cross=False, rngs=rngs)
    self.image_proj = linear(image.d_model, m.embed_dim, ("embed", "joint"))

    self.logits = Logits(m)
    self.dropout = nnx.Dropout(m.dropout_rate)

  def embed_text(self, text_tokens, dropout_key=None):
    """Ids [B, T] (PAD_ID padding) -> unit embeddings [B, embed_dim], float32."""
    x = embedding_lookup(self.text_embed, text_tokens) + self.text_pos[None, :text_tokens.shape[1]]
    x = self.dropout(x.astype(self.dtype), deterministic=dropout_key is None, rngs=dropout_key)
    keep = text_tokens != PAD_ID
    x = self.text_tower(constrain(x, "batch", "length", "embed"), keep[:, None, None, :],
                        dropout_key=dropout_key)
    # Mean over real tokens; an all-padding row (never made by the tokenizer, which always
    # ends a caption with END) would divide by 1, not 0.
    weights = keep.astype(jnp.float32)[..., None]
    pooled = (x.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
    return self._project(self.text_proj, pooled)

  def embed_images(self, images, dropout_key=None):
    """Pixels [B, R, R, 3] in the data's value range -> unit embeddings [B, embed_dim]."""
    x = self.patch_embed(patchify(images.astype(self.dtype), self.config.patch_size))
    x = x + self.image_pos[...].astype(self.dtype)
    x = self.dropout(x, deterministic=dropout_key is None, rngs=dropout_key)
    x = self.image_tower(constrain(x, "batch", "length", "embed"), None,
                         dropout_key=dropout_key)
    return self._project(self.image_proj, x.astype(jnp.float32).mean(1))

  def _project(self, proj, pooled):
    out = proj(constrain(pooled.astype(self.dtype), "batch", "embed"))
    return constrain(l2_normalize(out), "batch", "joint")

  def __call__(self, images, text_tokens, dropout_key=None):
    """(image embeddings, text embeddings), each float32 [B, embed_dim] of unit length."""
    image_key = text_key = None
    if dropout_key is not None:
      image_key, text_key = jax.random.split(dropout_key)
    return self.embed_images(images, image_key), self.embed_text(text_tokens, text_key)
