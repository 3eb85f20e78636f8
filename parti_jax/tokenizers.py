"""Image tokenizers by name: the one parser of `--tokenizer` specs and their encode/decode.

  color[:patch=8,levels=4]  built in: each PATCHxPATCH patch becomes its mean colour
                            quantized to LEVELS per channel (codebook LEVELS**3). It needs
                            no training, so token shards and Parti runs can be made and
                            tested before an image tokenizer has been trained.
  vitvqgan:RUN_DIR          a ViT-VQGAN trained with `python -m parti_jax.train` (its latest
                            checkpoint, at its own resolution)
  MODULE:FUNCTION           FUNCTION(resolution=R) returning an `ImageTokenizer`

Token shards record the spec they were made with (metadata.json), so the sampler finds the
decoder of a Parti run's codes by name. `parti_jax.data.encode`, `parti_jax.sample`,
`parti_jax.eval.fid` and `parti_jax.eval.shapes` all load tokenizers here.
"""

import dataclasses
import functools
import importlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from parti_jax.data import images as image_lib


class TokenizerError(ValueError):
  """A tokenizer spec that cannot be loaded; the message names the spec."""


@dataclasses.dataclass(frozen=True)
class ImageTokenizer:
  """`encode(params, images [B, R, R, 3] in value_range) -> codes int32 [B, grid * grid]` and
  `decode(params, codes) -> images in value_range` (None: the tokenizer cannot decode).

  `params` (None for the colour tokenizer) are passed to the jitted functions as an
  argument, so a large model's weights stay sharded arrays, not compiled-in constants.
  """
  encode: Callable[[Any, jax.Array], jax.Array]
  resolution: int
  grid: int
  codebook_size: int
  name: str
  params: Any = None
  decode: Callable[[Any, jax.Array], jax.Array] | None = None
  value_range: tuple[float, float] = (-1.0, 1.0)
  batch_sharding: Any = None  # how a batch of images lies on the parameters' mesh (None: any)

  # Host-side conveniences, each compiled once: uint8 pixels in and out.
  @functools.cached_property
  def _round_trip(self):
    return jax.jit(lambda p, x: self.decode(p, self.encode(p, x)))

  @functools.cached_property
  def _decode(self):
    return jax.jit(self.decode)

  def decode_codes(self, codes) -> np.ndarray:
    """int codes [B, grid * grid] -> uint8 images [B, R, R, 3]."""
    self._need_decoder()
    return image_lib.to_uint8(self._decode(self.params, np.asarray(codes, np.int32)),
                              *self.value_range)

  def reconstruct(self, pixels: np.ndarray) -> np.ndarray:
    """uint8 images -> their round trip through the codes, as uint8 (as the sampler saves)."""
    self._need_decoder()
    images = image_lib.to_model_range(np.asarray(pixels), *self.value_range)
    return image_lib.to_uint8(self._round_trip(self.params, images), *self.value_range)

  def _need_decoder(self):
    if self.decode is None:
      raise TokenizerError(f"image tokenizer {self.name}: it has no decoder")


def color(resolution: int, patch: int = 8, levels: int = 4) -> ImageTokenizer:
  if resolution % patch:
    raise TokenizerError(f"color: resolution {resolution} is not a multiple of the patch "
                         f"size {patch}")
  grid = resolution // patch

  def encode(params, images):
    del params
    b = images.shape[0]
    patches = images.reshape(b, grid, patch, grid, patch, 3).mean(axis=(2, 4))
    q = jnp.clip(jnp.round((patches + 1) / 2 * (levels - 1)), 0, levels - 1).astype(jnp.int32)
    return (q[..., 0] * levels * levels + q[..., 1] * levels + q[..., 2]).reshape(b, grid * grid)

  def decode(params, codes):  # each code becomes its patch's flat colour
    del params
    codes = codes.reshape(-1, grid, grid)
    rgb = jnp.stack([codes // (levels * levels), codes // levels % levels, codes % levels], -1)
    flat = rgb.astype(jnp.float32) * (2.0 / (levels - 1)) - 1.0
    return flat.repeat(patch, axis=1).repeat(patch, axis=2)

  return ImageTokenizer(encode, resolution, grid, levels ** 3,
                        f"color:patch={patch},levels={levels}", decode=decode)


def vitvqgan(workdir, mesh=None) -> ImageTokenizer:
  """The ViT-VQGAN trained in `workdir` (its config.json and latest checkpoint), its
  parameters on `mesh` (default: all devices over fsdp)."""
  from parti_jax import runs  # the model only when it is asked for
  try:
    run, params = runs.load(workdir, task="vitvqgan", mesh=mesh)
  except (runs.RunError, FileNotFoundError) as e:
    raise TokenizerError(f"vitvqgan:{workdir}: {e}") from None
  return vitvqgan_of(run.setup, params, f"vitvqgan:{workdir}")


def vitvqgan_of(setup, params, name: str) -> ImageTokenizer:
  """A ViT-VQGAN from its inference Setup and parameters (a run's, a model folder's)."""
  config, m = setup.config, setup.config.model
  return ImageTokenizer(lambda p, images: setup.model(p).encode(images), m.resolution,
                        m.resolution // m.patch_size, m.codebook_size, name,
                        params, decode=lambda p, codes: setup.model(p).decode(codes),
                        value_range=tuple(config.data.value_range),
                        batch_sharding=setup.batch_sharding)


def load(spec: str, resolution: int | None = None, mesh=None,
         grid: int | None = None) -> ImageTokenizer:
  """The tokenizer a spec names. `resolution`: the colour or a MODULE:FUNCTION tokenizer's
  (a ViT-VQGAN has its own); without it, a colour tokenizer makes `grid` codes a side.
  `mesh`: where a ViT-VQGAN's parameters go."""
  name, _, args = spec.partition(":")
  if name == "vitvqgan":
    if not args:
      raise TokenizerError(f"{spec!r}: expected vitvqgan:RUN_DIR")
    return vitvqgan(args, mesh)
  if name == "color":
    try:
      kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.split(",") if kv)}
      if resolution is None and grid:
        resolution = grid * kwargs.get("patch", 8)
      return color(resolution, **kwargs)
    except (ValueError, TypeError) as e:
      raise TokenizerError(f"{spec!r}: expected color[:patch=P,levels=L] ({e})") from None
  try:
    factory = getattr(importlib.import_module(name), args)
  except (ImportError, AttributeError, ValueError) as e:
    raise TokenizerError(f"{spec!r}: not color, vitvqgan:RUN_DIR or MODULE:FUNCTION "
                         f"(cannot load {args!r} from module {name!r}: {e})") from None
  return factory(resolution=resolution)
