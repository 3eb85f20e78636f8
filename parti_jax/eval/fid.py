"""Frechet Inception Distance (FID) between two image sets, and the rFID of a ViT-VQGAN.

  python -m parti_jax.eval.fid --weights inception_fid.npz A B
  python -m parti_jax.eval.fid --weights inception_fid.npz --tokenizer vitvqgan:RUN_DIR DATA

A and B are each a folder of images (.png, .jpg, .jpeg files of any size and mode, made RGB)
or an image shard set directory (metadata.json inside, as `parti_jax.data.ingest` and
`parti_jax.data.shapes` write), local or in a bucket (gs://...). Every image is
centre-cropped square and resized to `--resolution` (default 299) as the data pipeline does
it (`images.square`); the network then resizes that bilinearly to 299x299, which does
nothing at 299. To compare with numbers pytorch-fid gives on a folder of equal-size square
images, pass their size, so that its bilinear resize is the only one. Images that cannot be
decoded are skipped and counted.

rFID (`--tokenizer vitvqgan:RUN_DIR`): every image of DATA is encoded to codes and decoded
again by the ViT-VQGAN trained in RUN_DIR (its latest checkpoint), and the reconstructions,
rounded to 8 bits as a saved picture would be, are compared with the originals, both at the
tokenizer's resolution.

FID fits a Gaussian to each set's 2048-d Inception features (mean mu, covariance S) and is
  |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)).
It is biased upwards, the more so the fewer the images: compare values at equal counts
only, and with published ones (usually over 10k-50k images) only at theirs. Below 2048
images the covariances are also singular. The 2048x2048 matrix square root takes from
seconds to a minute of CPU time.

Prints one JSON line: the FID, the images used and skipped per set, the seconds taken.
The Inception weights are pytorch-fid's, converted by `python -m parti_jax.convert.inception`.
"""

import collections
import json
import sys
import time
import warnings
from concurrent import futures

import grain
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from parti_jax import cli, tokenizers
from parti_jax.data import buckets, records
from parti_jax.data import images as image_lib
from parti_jax.eval import inception

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEFAULT_RESOLUTION = inception.INPUT_SIZE
# Batches decoded ahead of the one on the device.
_DECODE_AHEAD = 2


class FidError(ValueError):
  """An input that cannot be measured; the message names it."""


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """The Frechet distance between the Gaussians N(mu1, sigma1) and N(mu2, sigma2), in float64.

  Tr((sigma1 sigma2)^(1/2)) comes from scipy's matrix square root. A product too close to
  singular for it (inf or NaN entries) is retried with `eps` added to both diagonals, the
  usual remedy. The root of a product of covariances has real eigenvalues; rounding leaves
  a small imaginary part, which is dropped, while a large one means the inputs were not
  covariance matrices and is an error.
  """
  mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
  sigma1, sigma2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"shapes do not fit: mu {mu1.shape} and {mu2.shape}, "
                     f"sigma {sigma1.shape} and {sigma2.shape}")
  root = _sqrtm(sigma1 @ sigma2)
  if not np.isfinite(root).all():
    offset = np.eye(d) * eps
    root = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(root):
    imaginary = float(np.abs(np.diagonal(root).imag).max())
    if imaginary > 1e-3:
      raise ValueError(f"the square root of sigma1 @ sigma2 has an imaginary part of "
                       f"{imaginary:.3g}; are both sigmas covariance matrices?")
    root = root.real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root))


def _sqrtm(a: np.ndarray) -> np.ndarray:
  with warnings.catch_warnings():
    # scipy warns on singular input; the caller judges the result itself.
    warnings.simplefilter("ignore", RuntimeWarning)
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    return scipy.linalg.sqrtm(a)


class Statistics:
  """Mean and covariance of feature vectors, accumulated batch by batch in float64.

  Keeps the count, the sum and the sum of outer products, so any number of images takes
  the memory of one [dims, dims] matrix.
  """

  def __init__(self, dims: int = inception.FEATURES):
    self.count = 0
    self._sum = np.zeros(dims, np.float64)
    self._outer = np.zeros((dims, dims), np.float64)

  def add(self, features) -> None:
    """Adds feature vectors [N, dims]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[1] != self._sum.shape[0]:
      raise ValueError(f"features of shape {f.shape}, expected [N, {self._sum.shape[0]}]")
    self.count += f.shape[0]
    self._sum += f.sum(axis=0)
    self._outer += f.T @ f

  def result(self) -> tuple[np.ndarray, np.ndarray, int]:
    """(mu, sigma, count); sigma is the sample covariance (ddof 1, as `np.cov`)."""
    if self.count < 2:
      raise ValueError(f"{self.count} feature vector(s): a covariance needs at least 2")
    mu = self._sum / self.count
    sigma = (self._outer - self.count * np.outer(mu, mu)) / (self.count - 1)
    return mu, sigma, self.count


class ImageSet:
  """The images of a folder or of an image shard set, read by index (from several threads)."""

  def __init__(self, path):
    self.path = epath.Path(path)
    if not buckets.exists(self.path):  # a missing or unreachable bucket: AccessError
      raise FidError(f"{self.path}: no such directory")
    if not self.path.is_dir():
      raise FidError(f"{self.path} is not a directory; give an image folder or an image "
                     "shard set")
    if records.exists(self.path / records.METADATA):
      shard_set = records.ShardSet.open(self.path)
      if shard_set.kind != "images":
        raise FidError(f"{self.path} is a shard set of {shard_set.kind}, not images")
      shard_set.verify_counts()
      source = grain.sources.ArrayRecordDataSource(
          [records.readable_path(p) for p in shard_set.paths])
      self._size = len(source)
      self._encoded = lambda i: records.unpack(source[i]).get("image")
    else:
      files = _image_files(self.path)
      self._size = len(files)
      self._encoded = lambda i: _image_file(files[i])
    if not self._size:
      raise FidError(f"{self.path}: no images (neither {'/'.join(IMAGE_SUFFIXES)} files nor "
                     f"an image shard set's {records.METADATA})")

  def __len__(self) -> int:
    return self._size

  def pixels(self, index: int, resolution: int) -> np.ndarray | None:
    """Image `index` as uint8 [R, R, 3], or None when it cannot be decoded."""
    try:
      img = image_lib.open_image(self._encoded(index), resolution)
    except records.BadRecord:
      return None
    return image_lib.square(img, resolution)


def _image_file(path: epath.Path) -> bytes:
  """An image file's bytes; one larger than any image is skipped unread (docs/trust.md)."""
  try:
    return records.read_limited(path, records.MAX_IMAGE_BYTES, "an image file")
  except records.TooLarge as e:
    raise records.BadRecord("image_too_large", str(e)) from None


def _image_files(directory: epath.Path) -> list[epath.Path]:
  """The image files of a folder, by name; in a bucket, where a stat is a round trip per
  image, the names alone decide."""
  with buckets.reported(directory):
    named = sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
  return named if records.is_bucket(directory) else [p for p in named if p.is_file()]


def _decoded_batches(image_set: ImageSet, count: int, resolution: int, batch_size: int,
                     pool: futures.Executor):
  """Yields (uint8 [n, R, R, 3] of the decodable images, skipped) per run of `batch_size`
  indices, decoding up to `_DECODE_AHEAD` batches ahead in `pool`."""
  ahead = collections.deque()

  def collect(pending):
    decoded = [f.result() for f in pending]
    good = [p for p in decoded if p is not None]
    pixels = np.stack(good) if good else np.zeros((0, resolution, resolution, 3), np.uint8)
    return pixels, len(decoded) - len(good)

  for start in range(0, count, batch_size):
    ahead.append([pool.submit(image_set.pixels, i, resolution)
                  for i in range(start, min(start + batch_size, count))])
    if len(ahead) > _DECODE_AHEAD:
      yield collect(ahead.popleft())
  while ahead:
    yield collect(ahead.popleft())


def accumulate(image_set: ImageSet, run, num_outputs: int, resolution: int, batch_size: int,
               max_images: int | None = None, num_threads: int = 8):
  """Feature statistics of a set: ([Statistics] per output of `run`, images skipped).

  `run(pixels uint8 [batch_size, R, R, 3])` returns `num_outputs` feature arrays; the last
  batch is padded with zeros to `batch_size`, so `run` compiles once, and the padding rows
  are dropped from what it returns.
  """
  count = len(image_set) if max_images is None else min(max_images, len(image_set))
  stats = [Statistics() for _ in range(num_outputs)]
  skipped = 0
  with futures.ThreadPoolExecutor(num_threads) as pool:
    batches = _decoded_batches(image_set, count, resolution, batch_size, pool)
    for pixels, bad in tqdm(batches, total=-(-count // batch_size), desc=str(image_set.path),
                            unit="batch"):
      skipped += bad
      n = pixels.shape[0]
      if not n:
        continue
      padded = np.zeros((batch_size, *pixels.shape[1:]), np.uint8)
      padded[:n] = pixels
      for s, f in zip(stats, run(padded)):
        s.add(np.asarray(f)[:n])
  return stats, skipped


def _moments(stats: Statistics, name: str, skipped: int):
  if stats.count < 2:
    raise FidError(f"{name}: {stats.count} usable image(s) ({skipped} skipped); FID needs at "
                   "least 2")
  if stats.count < inception.FEATURES:
    print(f"note: {name} has {stats.count} images, fewer than {inception.FEATURES}: its "
          "covariance is singular and FID is biased high", file=sys.stderr)
  return stats.result()


def _image_set(x) -> ImageSet:
  return x if isinstance(x, ImageSet) else ImageSet(x)


def load_tokenizer(spec: str) -> tokenizers.ImageTokenizer:
  """The image tokenizer of an rFID (any spec `parti_jax.tokenizers` reads that decodes)."""
  try:
    tokenizer = tokenizers.load(spec)
  except tokenizers.TokenizerError as e:
    raise FidError(f"--tokenizer={spec}: {e}") from None
  if tokenizer.decode is None:
    raise FidError(f"--tokenizer={spec}: it has no decoder")
  return tokenizer


def reconstruction_features(tokenizer: tokenizers.ImageTokenizer):
  """`(params, weights, pixels uint8) -> (features of pixels, of their reconstructions)`."""
  low, high = tokenizer.value_range

  def step(params, weights, pixels):
    images = pixels.astype(jnp.float32) * ((high - low) / 255.0) + low
    out = tokenizer.decode(params, tokenizer.encode(params, images)).astype(jnp.float32)
    # As `images.to_uint8` would save it: clipped and rounded to 8 bits.
    out = jnp.clip(jnp.floor((out - low) * (255.0 / (high - low)) + 0.5), 0, 255)
    return inception.features(weights, pixels), inception.features(weights, out.astype(jnp.uint8))

  return jax.jit(step)


def fid(weights, a, b, resolution: int = DEFAULT_RESOLUTION, batch_size: int = 64,
        max_images: int | None = None, num_threads: int = 8) -> dict:
  """FID between image sets `a` and `b` (ImageSets, or paths of folders or shard sets)."""
  sets = _image_set(a), _image_set(b)
  features = jax.jit(inception.features)
  weights = jax.device_put(weights)  # once, not with every batch
  run = lambda pixels: (features(weights, pixels),)
  result, moments = {}, []
  for key, image_set in zip("ab", sets):
    (stats,), skipped = accumulate(image_set, run, 1, resolution, batch_size, max_images,
                                   num_threads)
    moments.append(_moments(stats, str(image_set.path), skipped))
    result.update({key: str(image_set.path), f"images_{key}": stats.count,
                   f"skipped_{key}": skipped})
  (mu_a, sigma_a, _), (mu_b, sigma_b, _) = moments
  return dict(mode="fid", fid=frechet_distance(mu_a, sigma_a, mu_b, sigma_b), **result,
              resolution=resolution)


def rfid(weights, tokenizer: str, data, batch_size: int = 64, max_images: int | None = None,
         num_threads: int = 8) -> dict:
  """FID between the images of `data` and their reconstructions by an image tokenizer."""
  image_set = _image_set(data)
  spec, tokenizer = tokenizer, load_tokenizer(tokenizer)
  rows = tokenizer.batch_sharding  # the images' batch on the tokenizer's mesh (or None)
  if rows is not None:
    batch_size = -(-batch_size // rows.mesh.size) * rows.mesh.size  # whole rows on every device
    weights = jax.device_put(weights, NamedSharding(rows.mesh, P()))
  else:
    weights = jax.device_put(weights)  # once, not with every batch
  step = reconstruction_features(tokenizer)
  run = lambda pixels: step(tokenizer.params, weights, jax.device_put(pixels, rows))
  resolution = tokenizer.resolution
  (originals, reconstructions), skipped = accumulate(
      image_set, run, 2, resolution, batch_size, max_images, num_threads)
  mu_a, sigma_a, _ = _moments(originals, str(image_set.path), skipped)
  mu_b, sigma_b, _ = reconstructions.result()
  return dict(mode="rfid", fid=frechet_distance(mu_a, sigma_a, mu_b, sigma_b),
              data=str(image_set.path), tokenizer=spec, images=originals.count,
              skipped=skipped, resolution=resolution)


FLAGS = cli.Flags(__doc__)
FLAGS.string("weights", None, "Inception .npz from `python -m parti_jax.convert.inception`.",
             required=True)
FLAGS.string("tokenizer", None, "An image tokenizer (vitvqgan:RUN_DIR): rFID of its "
             "reconstructions of the one set given.")
FLAGS.integer("resolution", None, f"Square size images are brought to (default "
              f"{DEFAULT_RESOLUTION}; with --tokenizer, the tokenizer's).")
FLAGS.integer("batch_size", 64, "Images per batch.")
FLAGS.integer("max_images", None, "Use at most this many images of each set.")
FLAGS.integer("num_threads", 8, "Image decoding threads.")


def main(argv=None) -> dict:
  a = FLAGS.parse(argv)
  sets = a.args  # two image folders or image shard sets (one with --tokenizer)
  if a.tokenizer and len(sets) != 1:
    raise SystemExit(f"error: --tokenizer takes one set (the originals), got {len(sets)}")
  if not a.tokenizer and len(sets) != 2:
    raise SystemExit(f"error: FID compares two sets, got {len(sets)}")
  if a.tokenizer and a.resolution:
    raise SystemExit("error: --resolution is the tokenizer's with --tokenizer")
  if a.batch_size < 1 or (a.resolution is not None and a.resolution < 1):
    raise SystemExit("error: --batch_size and --resolution must be positive")
  start = time.perf_counter()
  sets = [ImageSet(path) for path in sets]  # a wrong path fails before anything slow
  weights = inception.load_weights(a.weights)
  kwargs = dict(batch_size=a.batch_size, max_images=a.max_images, num_threads=a.num_threads)
  if a.tokenizer:
    result = rfid(weights, a.tokenizer, sets[0], **kwargs)
  else:
    result = fid(weights, *sets, resolution=a.resolution or DEFAULT_RESOLUTION, **kwargs)
  result["seconds"] = round(time.perf_counter() - start, 2)
  print(json.dumps(result))
  return result


if __name__ == "__main__":
  try:
    cli.run(main)
  except (FidError, inception.InceptionWeightsError, records.DataError) as e:
    sys.exit(f"error: {e}")
