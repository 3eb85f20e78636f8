"""Compositional evaluation on the shapes domain: does each image show what its prompt says?

  python -m parti_jax.eval.shapes --images SAMPLES_DIR [--out report.json]
  python -m parti_jax.eval.shapes --shards data/shapes/validation      # the detector on renders
  python -m parti_jax.eval.shapes --shards data/shapes/validation --reconstruct vitvqgan:RUN

A deterministic detector finds the objects in an image: each pixel takes the nearest palette
color (or none, when it is far from all of them), same-colored pixels form connected
components, and each component large enough to be an object gets a size (from its longest
side) and a shape (the shape whose rendering at that place and size overlaps it best). The
prompt is parsed with the dataset's grammar (`parti_jax.data.shapes.parse_caption`) and
checked against the detected objects: kinds, colors, shapes, sizes the prompt names, counts
and relations. Accuracy is reported overall and per kind (single object, counting, color
binding, spatial relation), separately for seen and held-out compositions.

Input: a sampler output directory (its `samples.json` lists each prompt with its PNGs), or
`--shards` with an image shard set of the shapes dataset (ground truth: the detector's own
check); either, and `--out`, may be in a bucket (gs://...). Images are judged at their own
resolution. With `--reconstruct vitvqgan:RUN_DIR` the renders are first encoded and decoded
by that image tokenizer: the score of its reconstructions is roughly the most a Parti model
that generates its codes can reach.
"""

import argparse
import collections
import concurrent.futures
import functools
import json
import sys

import numpy as np
import scipy.ndimage
import tqdm
from etils import epath

from parti_jax.data import buckets, records
from parti_jax.data import images as image_lib
from parti_jax.data import shapes

PALETTE = np.array([shapes.BACKGROUND, *shapes.COLORS.values()], np.float32)
COLOR_NAMES = ("background", *shapes.COLORS)
# A pixel farther than this (RGB distance) from every palette color is nobody's: blended
# edges and generation noise do not form objects of a third color.
MAX_COLOR_DISTANCE = 60.0
MIN_AREA_FRACTION = 0.3  # of the smallest object's area at the image's resolution
READ_THREADS = 16  # sample PNGs read at once (in a bucket, each is a round trip)


def classify_pixels(image: np.ndarray) -> np.ndarray:
  """[H, W] palette index per pixel (0 background), -1 where no color is near."""
  d = np.linalg.norm(image[:, :, None, :].astype(np.float32) - PALETTE, axis=-1)
  labels = np.argmin(d, -1)
  return np.where(np.min(d, -1) <= MAX_COLOR_DISTANCE, labels, -1)


@functools.cache
def _shape_geometry(shape: str) -> tuple[float, float, float]:
  """(area, centroid x, centroid y) of `shape` with longest side 1, about its box centre."""
  n = 64  # rendered large, so the numbers are exact to a fraction of a percent
  alpha = _coverage_of(shape, (n / 2, n / 2), n * 0.75, n)
  ys, xs = np.mgrid[0:n, 0:n] + 0.5
  area = alpha.sum()
  side = n * 0.75
  return (area / side ** 2, ((alpha * xs).sum() / area - n / 2) / side,
          ((alpha * ys).sum() / area - n / 2) / side)


def _box(shape: str, center, side: float) -> list[float]:
  w, h = shapes.EXTENTS[shape]
  cx, cy = center
  return [cx - w * side / 2, cy - h * side / 2, cx + w * side / 2, cy + h * side / 2]


def _coverage_of(shape: str, center, side: float, resolution: int) -> np.ndarray:
  """Fraction of each pixel the dataset's renderer covers with `shape` (box centre, side)."""
  obj = {"color": "white", "shape": shape, "center": list(center),
         "bbox": _box(shape, center, side)}
  white = shapes.render_scene({"resolution": resolution, "objects": [obj]})[..., 0]
  background, full = shapes.BACKGROUND[0], shapes.COLORS["white"][0]
  return np.clip((white.astype(np.float32) - background) / (full - background), 0, 1)


def coverage(image: np.ndarray, color: str) -> np.ndarray:
  """How much of each pixel `color` covers, reading the pixel as a blend with the background."""
  bg = np.asarray(shapes.BACKGROUND, np.float32)
  direction = np.asarray(shapes.COLORS[color], np.float32) - bg
  alpha = (image.astype(np.float32) - bg) @ direction / (direction @ direction)
  return np.clip(alpha, 0, 1)


def fit_shape(alpha: np.ndarray) -> dict:
  """The shape, centre and side whose rendering best explains one object's coverage.

  For each shape the area gives the side, and the centroid with the shape's known centroid
  offset gives the box centre; the shape whose rendering is closest (sum of squared
  differences) wins. Blended edge pixels count by how much they are covered, which is what
  tells a small circle from a small square or star at 32 px.
  """
  resolution = alpha.shape[0]
  ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
  area = alpha.sum()
  centroid = np.array([(alpha * xs).sum() / area, (alpha * ys).sum() / area])
  best = None
  for shape in shapes.SHAPES:
    unit_area, dx, dy = _shape_geometry(shape)
    side = float(np.sqrt(area / unit_area))
    center = centroid - np.array([dx, dy]) * side
    error = float(np.sum((_coverage_of(shape, center, side, resolution) - alpha) ** 2))
    if best is None or error < best[0]:
      best = (error, shape, side, center)
  _, shape, side, center = best
  return dict(shape=shape, side=side, center=[float(center[0]), float(center[1])],
              bbox=_box(shape, center, side))


def detect(image: np.ndarray) -> list[dict]:
  """Objects in a uint8 [R, R, 3] image: color, shape, size, center and bbox in pixels."""
  resolution = image.shape[0]
  pixels = classify_pixels(image)
  smallest = (shapes.SIZES["small"] * resolution) ** 2 * 0.4  # about a small star's area
  threshold = (shapes.SIZES["small"] + shapes.SIZES["large"]) / 2 * resolution
  found = []
  for index, color in enumerate(COLOR_NAMES[1:], start=1):
    components, count = scipy.ndimage.label(pixels == index)
    for label in range(1, count + 1):
      mask = components == label
      if mask.sum() < MIN_AREA_FRACTION * smallest:
        continue
      # The object's blended edge: one pixel around the component, read as partial cover.
      around = scipy.ndimage.binary_dilation(mask) & ((pixels == 0) | (pixels == -1) | mask)
      fit = fit_shape(np.where(around, coverage(image, color), 0.0))
      found.append(dict(color=color, shape=fit["shape"],
                        size="large" if fit["side"] >= threshold else "small",
                        center=fit["center"], bbox=fit["bbox"]))
  return found


def _relation_holds(a: dict, b: dict, relation: str) -> bool:
  """`a` is `relation` `b`: apart along the axis and mostly along it (pixel boxes)."""
  axis = 0 if relation in ("left", "right") else 1
  first, second = (a, b) if relation in ("left", "above") else (b, a)
  along = second["center"][axis] - first["center"][axis]
  across = abs(second["center"][1 - axis] - first["center"][1 - axis])
  return first["bbox"][axis + 2] <= second["bbox"][axis] + 0.5 and along > across


def judge(prompt: str, objects: list[dict]) -> bool:
  """Whether detected `objects` satisfy the prompt exactly (no missing or extra objects)."""
  return shapes.caption_matches(shapes.parse_caption(prompt), objects, _relation_holds)


def prompt_is_heldout(prompt: str, spec: shapes.Spec) -> bool:
  """Whether the prompt asks for a held-out (color, shape) pair or relation triple."""
  return shapes.composition_is_heldout(shapes.parse_caption(prompt), spec)


def evaluate(items, spec: shapes.Spec, progress: bool = True) -> dict:
  """items: (prompt, uint8 image) pairs -> accuracy overall, per kind, seen and held out."""
  tallies = collections.defaultdict(lambda: [0, 0])  # group -> [correct, total]
  rows = []
  for prompt, image in tqdm.tqdm(items, desc="judging", unit="img", disable=not progress):
    fields = shapes.parse_caption(prompt)
    ok = judge(prompt, detect(image))
    split = "heldout" if prompt_is_heldout(prompt, spec) else "seen"
    for group in ("all", split, f"{split}/{fields['kind']}", f"all/{fields['kind']}"):
      tallies[group][0] += ok
      tallies[group][1] += 1
    rows.append(dict(prompt=prompt, correct=bool(ok), split=split, kind=fields["kind"]))
  accuracy = {g: c / n for g, (c, n) in sorted(tallies.items())}
  counts = {g: n for g, (_, n) in sorted(tallies.items())}
  return dict(accuracy=accuracy, counts=counts, judged=rows)


def samples_of(directory) -> tuple[list, shapes.Spec | None]:
  """(prompt, image) pairs of a sampler output directory (its samples.json)."""
  directory = epath.Path(directory)
  index = directory / "samples.json"
  try:
    meta = json.loads(buckets.read_text(index))
  except FileNotFoundError:
    raise FileNotFoundError(f"{index} not found: --images must be a sampler output "
                            "directory") from None
  files = [(entry["prompt"], directory / name)
           for entry in meta["prompts"] for name in entry["files"]]
  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    pngs = list(pool.map(buckets.read_bytes, [path for _, path in files]))
  items = [(prompt, np.asarray(image_lib.rgb_array(image_lib.open_image(png))))
           for (prompt, _), png in zip(files, pngs)]
  return items, None


def spec_of(shard_set: records.ShardSet) -> shapes.Spec:
  """The held-out compositions a shapes shard set was made with."""
  meta = shard_set.meta
  return shapes.Spec(meta.get("resolution", 32), meta.get("heldout_pairs", ()),
                     meta.get("heldout_triples", ()), meta.get("lattice", 0))


def shard_items(directory) -> tuple[list, shapes.Spec]:
  """(caption, rendered image) pairs of a shapes shard set, and its held-out spec."""
  shard_set = records.ShardSet.open(directory)
  items = [(r["captions"][0], np.asarray(image_lib.rgb_array(image_lib.open_image(r["image"]))))
           for r in shard_set.read_all()]
  return items, spec_of(shard_set)


def reconstruct(items, tokenizer: str, batch_size: int = 50) -> list:
  """The (prompt, image) items with each image replaced by its round trip through the image
  tokenizer `vitvqgan:RUN_DIR` (codes, then pixels, rounded to 8 bits as the sampler saves)."""
  import jax  # JAX and the model only when a tokenizer is asked for: the detector needs neither
  import jax.numpy as jnp

  from parti_jax import vqgan_train
  kind, _, run_dir = tokenizer.partition(":")
  if kind != "vitvqgan" or not run_dir:
    raise ValueError(f"--reconstruct={tokenizer}: expected vitvqgan:RUN_DIR")
  if not items:
    raise ValueError(f"--reconstruct={tokenizer}: no renders to reconstruct")
  try:
    setup, params = vqgan_train.load_run(run_dir)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"--reconstruct={tokenizer}: {e}") from None
  resolution = setup.config.model.resolution
  if items[0][1].shape[0] != resolution:
    raise ValueError(f"--reconstruct={tokenizer}: the tokenizer takes {resolution} px images, "
                     f"the renders are {items[0][1].shape[0]} px")
  low, high = setup.config.data.value_range

  @jax.jit
  def round_trip(p, pixels):
    model = setup.model(p)
    return model.decode(model.encode(pixels.astype(jnp.float32) * ((high - low) / 255) + low))

  pixels = np.stack([image for _, image in items])
  outs = []
  for start in tqdm.trange(0, len(pixels), batch_size, desc="reconstructing", unit="batch"):
    chunk = pixels[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)])  # one compiled shape
    outs.append(image_lib.to_uint8(round_trip(params, padded)[:len(chunk)], low, high))
  return [(prompt, image) for (prompt, _), image in zip(items, np.concatenate(outs))]


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", help="a sampler output directory (with samples.json)")
  source.add_argument("--shards", help="a shapes image shard set (ground-truth renders)")
  p.add_argument("--heldout_from", help="a shapes shard set whose metadata names the held-out "
                 "compositions (default: the dataset's defaults)")
  p.add_argument("--reconstruct", metavar="vitvqgan:RUN_DIR",
                 help="with --shards: judge the renders after a round trip through this image "
                 "tokenizer (what its codes can show at best)")
  p.add_argument("--out", help="also write the report (JSON) here")
  a = p.parse_args(argv)
  if a.reconstruct and not a.shards:
    p.error("--reconstruct needs --shards (renders to reconstruct)")
  try:
    for path in filter(None, (a.shards, a.images, a.heldout_from, a.out)):
      buckets.check_bucket(path)  # before reading or judging anything
    items, spec = shard_items(a.shards) if a.shards else samples_of(a.images)
    if a.reconstruct:
      items = reconstruct(items, a.reconstruct)
    if a.heldout_from:
      spec = spec_of(records.ShardSet.open(a.heldout_from))
  except (FileNotFoundError, ValueError, KeyError, records.DataError) as e:
    sys.exit(f"error: {e}")
  report = evaluate(items, spec or shapes.Spec())
  text = json.dumps({k: v for k, v in report.items() if k != "judged"})
  if a.out:
    try:
      buckets.write_bytes(a.out, json.dumps(report, indent=1).encode())
    except records.DataError as e:  # a bucket's problem, named
      sys.exit(f"error: {e}")
  print(text)




if __name__ == "__main__":
  main()
