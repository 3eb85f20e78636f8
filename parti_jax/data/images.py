"""Turning stored image bytes into model input, whatever the file holds.

Every decoder failure becomes a `BadRecord` with a reason, so the caller can skip and
count it. What can be converted is converted: grayscale, palette, CMYK, 16-bit and
float images become 8-bit RGB; transparency is composited over white; EXIF rotation is
applied; images of any size down to 1x1 are cropped square and resized.

An image is data from anywhere (docs/trust.md), so its cost is bounded before decoding: the
pixel count is read from the header and checked against `max_pixels` (a small file that
declares a huge image, a "decompression bomb", is skipped as image_too_large without being
decoded); of an animated or multi-page file (GIF, APNG, WebP, TIFF) only the first frame is
decoded; metadata that Pillow decompresses (PNG text chunks) is capped below.
"""

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin

from parti_jax.data.records import MAX_IMAGE_BYTES, BadRecord

# PIL refuses images over ~179M pixels as "decompression bombs" with its own error type;
# we apply our own, configurable limit instead and report it as a skip reason.
Image.MAX_IMAGE_PIXELS = None
DEFAULT_MAX_PIXELS = 100_000_000
# A PNG's compressed text chunks (zTXt, iTXt, iCCP) are inflated whole: each to at most
# MAX_TEXT_CHUNK, all of a file's together to at most MAX_TEXT_MEMORY, or the file is
# corrupt_image. Set here, not left to Pillow's defaults (1 MB and 64 MB), so that they hold
# whatever else changes them; no picture needs more than a few kilobytes of text.
PngImagePlugin.MAX_TEXT_CHUNK = 1 << 20
PngImagePlugin.MAX_TEXT_MEMORY = 8 << 20


def open_image(data, target: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS):
  """Decodes stored image bytes (or a decoded uint8 array) into an upright RGB PIL image.

  `target` lets JPEG decoding shrink by a power of two while staying at least `target`
  pixels on the short side, which makes large photos cheap to decode.
  """
  if isinstance(data, np.ndarray):  # e.g. a TFDS Tensor feature
    pixels = rgb_array(data)
    if pixels.shape[0] * pixels.shape[1] > max_pixels:
      raise BadRecord("image_too_large", f"{pixels.shape[1]}x{pixels.shape[0]} > {max_pixels}")
    return Image.fromarray(pixels)
  if data is None:
    raise BadRecord("missing_image", "no image")
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise BadRecord("corrupt_image", f"a {type(data).__name__}, not image bytes")
  data = bytes(data)
  if not data:
    raise BadRecord("missing_image", "zero bytes")
  if len(data) > MAX_IMAGE_BYTES:
    raise BadRecord("image_too_large", f"{len(data):,} bytes > {MAX_IMAGE_BYTES:,}")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # PIL warns on odd but readable files; we only count skips
      img = Image.open(io.BytesIO(data))  # reads the header only: size, mode, frame 0's place
      w, h = img.size
      if w * h > max_pixels:
        raise BadRecord("image_too_large", f"{w}x{h} > {max_pixels} pixels")
      if target and img.format == "JPEG" and min(w, h) >= 2 * target:
        scale = min(w, h) / target
        img.draft(img.mode, (int(w / scale), int(h / scale)))
      # Decodes the current frame, the first, only. Nothing here may ask for n_frames or
      # seek: on a GIF that walks every frame.
      img.load()
      return _upright_rgb(img)
  except BadRecord:
    raise
  except Image.DecompressionBombError as e:  # where something set PIL's own limit again
    raise BadRecord("image_too_large", str(e)[:120]) from None
  except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
    raise BadRecord("corrupt_image", f"{type(e).__name__}: {str(e)[:120]}") from None


def _upright_rgb(img: Image.Image) -> Image.Image:
  try:
    img = ImageOps.exif_transpose(img)
  except Exception:  # a broken EXIF block does not make the pixels unusable
    pass
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    # convert("RGB") clips these to 255; rescale the full range to 8 bits instead.
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    if img.mode == "F":
      top = max(float(a.max()), 1e-12)
    img = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
  if img.mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(background, rgba)
  return img.convert("RGB") if img.mode != "RGB" else img


def crop_box(width: int, height: int, offset: float | None) -> tuple[int, int, int, int]:
  """The largest centred (offset None) or offset-placed (0..1) square inside the image."""
  side = min(width, height)
  frac = 0.5 if offset is None else offset
  left = round((width - side) * frac)
  top = round((height - side) * frac)
  return left, top, left + side, top + side


def square(img: Image.Image, resolution: int, offset: float | None = None) -> np.ndarray:
  """Resize-shorter-side-and-crop in one resampling step; returns uint8 [R, R, 3].

  Cropping in source coordinates first (PIL's `box`) is the same as resizing and then
  cropping, but never builds the huge intermediate of a very elongated image.
  """
  box = crop_box(*img.size, offset)
  out = img.resize((resolution, resolution), Image.Resampling.BICUBIC, box=box,
                   reducing_gap=3.0)
  return np.asarray(out, dtype=np.uint8)


def to_model_range(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
  """uint8 [0, 255] -> float32 [low, high]."""
  return pixels.astype(np.float32) * ((high - low) / 255.0) + low


def to_uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
  """float [low, high] -> uint8 [0, 255] (model outputs to pictures)."""
  return np.clip((np.asarray(x, np.float32) - low) * (255.0 / (high - low)) + 0.5, 0,
                 255).astype(np.uint8)


def encode_png(pixels: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def encode_jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
  return buf.getvalue()


def rgb_array(pixels: np.ndarray) -> np.ndarray:
  """A decoded image array ([H, W], [H, W, 1|3|4], uint8) as uint8 [H, W, 3].

  Alpha is composited over white, as `images.open_image` does for files.
  """
  a = np.asarray(pixels)
  if a.dtype != np.uint8 or a.ndim not in (2, 3) or a.size == 0:
    raise BadRecord("corrupt_image", f"array {a.dtype}{list(a.shape)} is not uint8 [H, W, C]")
  if a.ndim == 2:
    a = a[..., None]
  channels = a.shape[-1]
  if channels == 1:
    return np.repeat(a, 3, axis=-1)
  if channels == 4:
    alpha = a[..., 3:].astype(np.float32) / 255.0
    rgb = a[..., :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
  if channels != 3:
    raise BadRecord("corrupt_image", f"array with {channels} channels")
  return a
