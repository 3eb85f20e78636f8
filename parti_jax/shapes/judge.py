"""Does an image show what its prompt says? A detector of shapes, and the verdicts.

A deterministic detector finds the objects in an image: each pixel takes the nearest palette
color (or none, when it is far from all of them), same-colored pixels form connected
components, and each component large enough to be an object gets a size (from its longest
side) and a shape (the shape whose rendering at that place and size overlaps it best). The
prompt is parsed with the domain's grammar (`grammar.parse_caption`) and checked against
the detected objects: kinds, colors, shapes, sizes the prompt names, counts and relations.
`evaluate` reports accuracy overall and per kind (single object, counting, color binding,
spatial relation), separately for seen and held-out compositions.
"""

import collections
import functools

import numpy as np
import scipy.ndimage
import tqdm

from parti_jax.shapes import grammar, render, scenes
from parti_jax.shapes.vocabulary import BACKGROUND, COLORS, EXTENTS, SHAPES, SIZES

PALETTE = np.array([BACKGROUND, *COLORS.values()], np.float32)
COLOR_NAMES = ("background", *COLORS)
# A pixel farther than this (RGB distance) from every palette color is nobody's: blended
# edges and generation noise do not form objects of a third color.
MAX_COLOR_DISTANCE = 60.0
MIN_AREA_FRACTION = 0.3  # of the smallest object's area at the image's resolution


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
  w, h = EXTENTS[shape]
  cx, cy = center
  return [cx - w * side / 2, cy - h * side / 2, cx + w * side / 2, cy + h * side / 2]


def _coverage_of(shape: str, center, side: float, resolution: int) -> np.ndarray:
  """Fraction of each pixel the dataset's renderer covers with `shape` (box centre, side)."""
  obj = {"color": "white", "shape": shape, "center": list(center),
         "bbox": _box(shape, center, side)}
  white = render.render_scene({"resolution": resolution, "objects": [obj]})[..., 0]
  background, full = BACKGROUND[0], COLORS["white"][0]
  return np.clip((white.astype(np.float32) - background) / (full - background), 0, 1)


def coverage(image: np.ndarray, color: str) -> np.ndarray:
  """How much of each pixel `color` covers, reading the pixel as a blend with the background."""
  bg = np.asarray(BACKGROUND, np.float32)
  direction = np.asarray(COLORS[color], np.float32) - bg
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
  for shape in SHAPES:
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
  smallest = (SIZES["small"] * resolution) ** 2 * 0.4  # about a small star's area
  threshold = (SIZES["small"] + SIZES["large"]) / 2 * resolution
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
  """`a` is `relation` `b`: apart along the axis and mostly along it (pixel boxes).

  Looser than the sampler's `layout.relation_holds` (no margin, no dominance): a fitted box
  may be off by a fraction of a pixel, and any image that reads as the relation passes.
  """
  axis = 0 if relation in ("left", "right") else 1
  first, second = (a, b) if relation in ("left", "above") else (b, a)
  along = second["center"][axis] - first["center"][axis]
  across = abs(second["center"][1 - axis] - first["center"][1 - axis])
  return first["bbox"][axis + 2] <= second["bbox"][axis] + 0.5 and along > across


def judge(prompt: str, objects: list[dict]) -> bool:
  """Whether detected `objects` satisfy the prompt exactly (no missing or extra objects)."""
  return grammar.caption_matches(grammar.parse_caption(prompt), objects, _relation_holds)


def prompt_is_heldout(prompt: str, spec: scenes.Spec) -> bool:
  """Whether the prompt asks for a held-out (color, shape) pair or relation triple."""
  return scenes.composition_is_heldout(grammar.parse_caption(prompt), spec)


def evaluate(items, spec: scenes.Spec, progress: bool = True) -> dict:
  """items: (prompt, uint8 image) pairs -> accuracy overall, per kind, seen and held out."""
  tallies = collections.defaultdict(lambda: [0, 0])  # group -> [correct, total]
  rows = []
  for prompt, image in tqdm.tqdm(items, desc="judging", unit="img", disable=not progress):
    fields = grammar.parse_caption(prompt)
    ok = judge(prompt, detect(image))
    split = "heldout" if prompt_is_heldout(prompt, spec) else "seen"
    for group in ("all", split, f"{split}/{fields['kind']}", f"all/{fields['kind']}"):
      tallies[group][0] += ok
      tallies[group][1] += 1
    rows.append(dict(prompt=prompt, correct=bool(ok), split=split, kind=fields["kind"]))
  accuracy = {g: c / n for g, (c, n) in sorted(tallies.items())}
  counts = {g: n for g, (_, n) in sorted(tallies.items())}
  return dict(accuracy=accuracy, counts=counts, judged=rows)
