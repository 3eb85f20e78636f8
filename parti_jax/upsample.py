"""Upsamples a folder of images with a trained super-resolution run (task `superres`).

  python -m parti_jax.upsample --model RUN [--step N|best] --images DIR --out OUT \\
      [--batch_size 8] [--max_pixels 1048576]

Every PNG and JPEG file in DIR (not its subfolders) is upsampled by the run's scale and
written to OUT as a PNG of the same name (`photo.jpg` -> `photo.png`). Files are data
(docs/trust.md): an image file over records.MAX_IMAGE_BYTES, or with more than
`--max_pixels` pixels by its header, is skipped unread; one that does not decode is
skipped; other files are skipped too; each is counted by reason in the summary line. RUN,
DIR and OUT may be in buckets (gs://...).

The library API, which the sampler (`sample --upsample RUN`) and the server use:

  upsampler = Upsampler.load(RUN, step=None)   # a run of another task is refused
  big = upsampler(images)  # uint8 [N, h, w, 3] -> uint8 [N, s*h, s*w, 3], any h and w

The network is fully convolutional: each input shape (and batch) compiles once; batches
are split over the local devices.
"""

import collections
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from parti_jax import cli, runs
from parti_jax.data import buckets, images as image_lib, records

EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_BATCH = 8
# Input pixels per image: a megapixel is 4 megapixels out at x2, and a network of 128
# channels widened 4 times holds ~2 GB of float32 activations per layer for it.
DEFAULT_MAX_PIXELS = 1 << 20


class UpsampleError(ValueError):
  """A run, an image array or a folder the upsampler cannot use; the message says which."""


class Upsampler:
  """A super-resolution run's network on the local devices: `upsampler(images)`."""

  def __init__(self, run: runs.Run, params, batch_size: int = DEFAULT_BATCH):
    self.name, self.step = run.workdir, run.step
    self.scale = int(run.config.model.scale)
    self.value_range = tuple(run.config.data.get("value_range", (-1.0, 1.0)))
    setup = run.setup
    mesh = setup.mesh
    self._ways = mesh.shape["data"] * mesh.shape["fsdp"]
    self.batch_size = -(-max(batch_size, 1) // self._ways) * self._ways
    self._params, self._in = params, setup.batch_sharding
    low, high = self.value_range

    def upsample(p, pixels):
      x = pixels.astype(jnp.float32) * ((high - low) / 255.0) + low
      y = setup.model(p)(x)
      y = (y - low) * (255.0 / (high - low)) + 0.5  # as image_lib.to_uint8 rounds
      return jnp.clip(jnp.floor(y), 0, 255).astype(jnp.uint8)

    # jit compiles once per input shape; the parameters stay where the run laid them out.
    self._fn = jax.jit(upsample, in_shardings=(setup.param_shardings, self._in),
                       out_shardings=NamedSharding(mesh, P()))

  @classmethod
  def load(cls, path, step: int | str | None = None, devices=None,
           batch_size: int = DEFAULT_BATCH) -> "Upsampler":
    """The run at `path` at `step` (default: the latest; `best`: its best evaluation's) on
    `devices` (default: the local ones), batches split over them."""
    try:
      run = runs.prepare(path, step, task="superres",
                         mesh_axes=dict(data=-1, fsdp=1, tensor=1),
                         devices=devices or jax.local_devices())
      return cls(run, run.load_params(), batch_size)
    except (runs.RunError, records.DataError) as e:
      raise UpsampleError(str(e)) from None

  def __call__(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, h, w, 3] -> uint8 [N, s*h, s*w, 3]."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
      raise UpsampleError(f"images must be uint8 [N, h, w, 3], not {images.dtype}"
                          f"{list(images.shape)}")
    n, h, w, _ = images.shape
    if not h or not w:
      raise UpsampleError(f"images of {h}x{w} pixels have nothing to upsample")
    s, out = self.scale, []
    batch = min(self.batch_size, -(-max(n, 1) // self._ways) * self._ways)
    for start in range(0, n, batch):
      chunk = images[start:start + batch]
      # The last chunk is padded with copies of its last image: one shape per compile.
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), axis=0)])
      out.append(np.asarray(self._fn(self._params, jax.device_put(padded, self._in)))
                 [:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, s * h, s * w, 3), np.uint8)


def read_image(path: epath.Path, max_pixels: int) -> np.ndarray:
  """An image file as uint8 [h, w, 3], upright RGB; BadRecord (with its skip reason) for
  one too large to read or decode, or that does not decode."""
  try:
    data = records.read_limited(path, records.MAX_IMAGE_BYTES, "an image file")
  except records.TooLarge as e:
    raise records.BadRecord("image_too_large", str(e)) from None
  return np.asarray(image_lib.open_image(data, max_pixels=max_pixels), np.uint8)


def output_names(files: list[epath.Path]) -> dict[str, str]:
  """Input file name -> output PNG name: the same stem (`a.jpg` -> `a.png`), or the whole
  name where two inputs share a stem (`a.jpg` and `a.png` -> `a.jpg.png`, `a.png`)."""
  stems = collections.Counter(os.path.splitext(f.name)[0] for f in files)
  names = {}
  for f in files:
    stem, ext = os.path.splitext(f.name)
    names[f.name] = f"{stem}.png" if stems[stem] == 1 or ext.lower() == ".png" else \
        f"{f.name}.png"
  return names


def upsample_folder(upsampler: Upsampler, images_dir, out_dir, max_pixels: int,
                    progress: bool = True) -> dict:
  """Upsamples every PNG/JPEG in `images_dir` into `out_dir`. Returns counts: `upsampled`,
  `skipped` (reason -> count), `seconds`."""
  images_dir, out_dir = epath.Path(images_dir), epath.Path(out_dir)
  with buckets.reported(images_dir):
    if not images_dir.is_dir():
      raise UpsampleError(f"--images {images_dir}: no such folder")
    entries = sorted((p for p in images_dir.iterdir() if not p.is_dir()), key=lambda p: p.name)
  files = [p for p in entries if p.suffix.lower() in EXTENSIONS]
  skipped = collections.Counter(not_png_or_jpeg=len(entries) - len(files))
  names = output_names(files)
  with buckets.reported(out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
  start, done = time.perf_counter(), 0
  # Images wait in groups of one shape (one compile each) until a group fills a batch;
  # at most a few batches wait, so a folder of many sizes does not pile up in memory.
  pending: dict[tuple, list] = collections.defaultdict(list)

  def flush(shape):
    nonlocal done
    group = pending.pop(shape)
    for (name, _), big in zip(group, upsampler(np.stack([x for _, x in group]))):
      with buckets.reported(out_dir), records.atomic_output(out_dir / names[name]) as f:
        Image.fromarray(big).save(f, format="PNG")
    done += len(group)
    bar.update(len(group))

  bar = tqdm(total=len(files), unit="image", disable=not progress, file=sys.stderr)
  for path in files:
    try:
      with buckets.reported(path):
        pixels = read_image(path, max_pixels)
    except records.BadRecord as e:
      skipped[e.reason] += 1
      bar.update(1)
      continue
    pending[pixels.shape].append((path.name, pixels))
    if len(pending[pixels.shape]) == upsampler.batch_size:
      flush(pixels.shape)
    elif sum(len(g) for g in pending.values()) >= 4 * upsampler.batch_size:
      flush(max(pending, key=lambda k: len(pending[k])))
  for shape in list(pending):
    flush(shape)
  bar.close()
  return dict(upsampled=done, skipped={k: v for k, v in sorted(skipped.items()) if v},
              seconds=time.perf_counter() - start)


FLAGS = cli.Flags(__doc__)
FLAGS.string("model", None, "Super-resolution run directory (task 'superres').", required=True)
FLAGS.string("step", None, "Checkpoint step of --model: a number or 'best' (default: the "
             "latest).")
FLAGS.string("images", None, "Folder of PNG and JPEG images to upsample.", required=True)
FLAGS.string("out", None, "Folder for the upsampled PNGs.", required=True)
FLAGS.integer("batch_size", DEFAULT_BATCH, "Images per forward, rounded up to the devices.")
FLAGS.integer("max_pixels", DEFAULT_MAX_PIXELS, "Larger inputs are skipped as "
              "image_too_large.")
FLAGS.bool("progress", True, "Show a progress bar.")


def main(argv=None):
  a = FLAGS.parse(argv)
  try:
    if a.batch_size < 1 or a.max_pixels < 1:
      raise UpsampleError("--batch_size and --max_pixels must be positive")
    images_dir, out_dir = epath.Path(a.images), epath.Path(a.out)
    with buckets.reported(images_dir):
      if not images_dir.is_dir():
        raise UpsampleError(f"--images {a.images}: no such folder")
    if not records.is_bucket(a.out) and not records.is_bucket(a.images) and \
        os.path.realpath(a.out) == os.path.realpath(a.images):
      raise UpsampleError(f"--out {a.out} is the --images folder: its PNGs would be "
                          "overwritten; give another")
    try:
      upsampler = Upsampler.load(a.model, runs.parse_step(a.step), batch_size=a.batch_size)
    except (UpsampleError, runs.RunError) as e:
      raise UpsampleError(f"--model {a.model}: {e}") from None
    report = upsample_folder(upsampler, images_dir, out_dir, a.max_pixels, a.progress)
  except (UpsampleError, records.DataError) as e:
    sys.exit(f"error: {e}")
  skipped = report["skipped"]
  said = (f"; skipped {sum(skipped.values())} ("
          + ", ".join(f"{k} {v}" for k, v in skipped.items()) + ")") if skipped else ""
  print(f"upsampled {report['upsampled']} images x{upsampler.scale} from {a.images} to "
        f"{a.out} in {report['seconds']:.1f} s "
        f"({report['upsampled'] / max(report['seconds'], 1e-9):.2f} images/s){said}")


if __name__ == "__main__":
  cli.run(main)
