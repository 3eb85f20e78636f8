"""The reranker: how well images match their prompts, by a contrastive run (task `contrastive`).

Parti draws many images per prompt and keeps those its contrastive image-text model scores
best. The sampler (`python -m parti_jax.sample --rerank RUN --keep K`), the web server
(`python -m parti_jax.serve --rerank RUN`) and the alignment score
(`python -m parti_jax.eval.alignment`) use this API:

  scorer = Scorer.load(RUN, step=None)   # a run of another task is refused, naming it
  scores = scorer.scores(images, prompts)  # uint8 [N, H, W, 3], N prompts -> float32 [N]
  order = rank(scores)                    # indices, best first

A score is the cosine similarity of the image's and the prompt's embeddings (in [-1, 1];
higher matches better). Images of any size are centre-cropped to a square and resized to
the model's resolution with PIL's box filter (each output pixel the mean of the input
pixels it covers), as the input pipeline crops its training images. Each distinct prompt is
embedded once. Batches are split over the devices (rows padded to whole batches); each
batch shape compiles once, and fewer rows than a batch are padded to a power of two.
"""

import jax
import numpy as np
from PIL import Image

from parti_jax import runs
from parti_jax.data import images as image_lib
from parti_jax.data import records, spm
from parti_jax.tasks import base

TASK = "contrastive"
DEFAULT_BATCH = 64


class RerankError(ValueError):
  """A reranker run, SentencePiece model or input the scorer cannot use; says which."""


class Scorer:
  """A contrastive run's dual encoder on the local devices: `scores(images, prompts)`."""

  def __init__(self, run: runs.Run, params, tokenizer: spm.Tokenizer,
               batch_size: int = DEFAULT_BATCH):
    self.name, self.step = run.workdir, run.step
    self.tokenizer = tokenizer
    m = run.config.model
    self.resolution = int(m.resolution)
    self.value_range = tuple(run.config.data.get("value_range", (-1.0, 1.0)))
    setup = run.setup
    self._ways = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
    self.batch_size = _round_up(max(batch_size, 1), self._ways)
    self._params = params
    # Two programs, so that a prompt shared by many images is embedded once.
    embed = lambda method: jax.jit(
        base.with_activation_mesh(
            setup, lambda s, p, x: getattr(s.model(p), method)(x)),
        in_shardings=(setup.param_shardings, setup.batch_sharding))
    self._embed_images, self._embed_text = embed("embed_images"), embed("embed_text")

  @classmethod
  def load(cls, path, step: int | str | None = None, spm_model: str | None = None,
           devices=None) -> "Scorer":
    """The run at `path` (checkpoint `step`: None the latest, a number, or "best"), with
    the SentencePiece model it trained on (its `data.spm_model`) unless `spm_model` is given.
    `devices`: where the model runs (default: all local ones)."""
    try:
      run = runs.prepare(path, step, task=TASK, devices=devices)
    except runs.RunError as e:
      raise RerankError(f"reranker: {e}") from None
    m = run.config.model
    spm_model = spm_model or run.config.data.get("spm_model", "")
    if not spm_model:
      raise RerankError(f"reranker {path}: its config names no data.spm_model; give the "
                        "SentencePiece model it trained with")
    try:
      tokenizer = spm.Tokenizer(spm_model, m.text_len)
    except (OSError, ValueError, records.DataError) as e:
      raise RerankError(f"reranker {path}: cannot use the SentencePiece model {spm_model}: "
                        f"{e}") from None
    if tokenizer.vocab_size > m.text_vocab_size:
      raise RerankError(
          f"the SentencePiece model {spm_model} has {tokenizer.vocab_size} pieces, more than "
          f"the reranker {path} knows (model.text_vocab_size={m.text_vocab_size}): it is not "
          "the model the reranker trained with")
    return cls(run, run.load_params(), tokenizer)

  def scores(self, images, prompts: list[str]) -> np.ndarray:
    """float32 [N]: the cosine similarity of each image with its prompt.

    `images`: uint8 [N, H, W, 3], or a sequence of N uint8 [H, W, 3] arrays of any sizes;
    `prompts`: N strings, one per image.
    """
    pixels, prompts = self._check(images, prompts)
    if not prompts:
      return np.zeros(0, np.float32)
    unique = sorted(set(prompts))
    text = np.stack([self.tokenizer.encode(p) for p in unique])
    text_emb = self._batched(self._embed_text, text)
    image_emb = self._batched(self._embed_images, pixels,
                              lambda x: image_lib.to_model_range(x, *self.value_range))
    row = {p: i for i, p in enumerate(unique)}
    which = np.asarray([row[p] for p in prompts])
    return np.sum(image_emb * text_emb[which], axis=-1).astype(np.float32)

  def _check(self, images, prompts) -> tuple[np.ndarray, list[str]]:
    """Images as uint8 [N, R, R, 3] at the model's resolution, prompts as a list."""
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
      raise RerankError("prompts must be a list of strings, one per image")
    prompts = list(prompts)
    if isinstance(images, np.ndarray) and images.ndim == 4:
      images = list(images)
    elif isinstance(images, np.ndarray):
      raise RerankError(f"images must be uint8 [N, H, W, 3]; got an array of shape "
                        f"{images.shape}")
    if len(images) != len(prompts):
      raise RerankError(f"{len(images)} images but {len(prompts)} prompts: give one prompt "
                        "per image")
    out = []
    for i, image in enumerate(images):
      image = np.asarray(image)
      if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3 \
          or min(image.shape[:2]) < 1:
        raise RerankError(f"image {i} is {image.dtype} {image.shape}; images must be uint8 "
                          "[H, W, 3]")
      out.append(self._resized(image))
    empty = np.zeros((0, self.resolution, self.resolution, 3), np.uint8)
    return (np.stack(out) if out else empty), prompts

  def _resized(self, image: np.ndarray) -> np.ndarray:
    r = self.resolution
    if image.shape[:2] == (r, r):
      return image
    h, w = image.shape[:2]
    box = image_lib.crop_box(w, h, None)  # the centred square, as the pipeline's eval crop
    return np.asarray(Image.fromarray(image).resize((r, r), Image.Resampling.BOX, box=box))

  def _batched(self, fn, rows: np.ndarray, prepare=None) -> np.ndarray:
    """fn over `rows` in batches of at most `batch_size` (the last padded with copies of
    its first row to a multiple of the devices), each batch through `prepare` first (so
    that only one batch at a time is float); float32 [len(rows), embed_dim]."""
    # Batches of fewer rows take the next power of two: a server's requests of any size
    # then compile a handful of shapes, not one per size.
    size = min(self.batch_size, _round_up(1 << (len(rows) - 1).bit_length(), self._ways))
    out = []
    for start in range(0, len(rows), size):
      chunk = rows[start:start + size]
      padded = np.concatenate([chunk, np.repeat(chunk[:1], size - len(chunk), 0)])
      padded = padded if prepare is None else prepare(padded)
      out.append(np.asarray(jax.device_get(fn(self._params, padded)))[:len(chunk)])
    return np.concatenate(out).astype(np.float32)


def rank(scores) -> np.ndarray:
  """Indices of `scores`, best (highest) first; ties keep their order."""
  return np.argsort(-np.asarray(scores, np.float64), kind="stable")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple
