"""The built-in compositional "shapes" dataset: colored shapes with grammar captions.

  python -m parti_jax.data.shapes --out DIR --num N [--resolution 32] [--num_validation V]
      [--num_heldout H] [--seed S] [--num_shards K] [--heldout_pairs red:star,blue:heart]
      [--heldout_triples circle:above:triangle] [--lattice L]
      [--train_kinds single:1,count:1,binding:1,relation:1]

writes three shard sets, DIR/train, DIR/validation and DIR/heldout (DIR may be in a bucket,
gs://...), of PNG images with one caption each. Scenes hold 1 to 4 non-overlapping objects
(6 shapes, 8 colors, 2 sizes) on a grey background, anywhere or (`--lattice N`) with each
object's square on multiples of N pixels; captions come from a fixed grammar of four kinds:

  single    "a red circle", "a large blue square"
  count     "three yellow stars"            (2 to 4 objects of one color and shape)
  binding   "a red circle and a blue square"
  relation  "a red circle to the left of a blue square"   (also right of, above, below)

A binding caption names its objects in reading order (`reading_order`). Train draws the
four kinds with the weights of `--train_kinds` (equally by default); validation and heldout
always draw them equally, so their scores by kind compare across train mixes.

Some compositions are held out of train and validation: (color, shape) pairs on any
object, and (object, relation, object) triples in relation scenes, where an object is a
shape ("circle") or a colored shape ("red circle"). The converse of a held-out triple
("a triangle below a circle" for "circle above triangle") shows the same picture, so it
is held out too. The heldout split holds only scenes built around one of them, so a model
trained on train can be scored on compositions it never saw.

Every caption parses back (`parse_caption`) into the fields stored with its scene, and
`caption_matches_scene` checks a caption against a scene's objects and geometry
(`caption_matches` against any objects, such as those a detector finds).
"""

import argparse
import concurrent.futures
import dataclasses
import functools
import math
import multiprocessing
import os
import sys
import time

import numpy as np
import tqdm
from etils import epath
from PIL import Image, ImageDraw

from parti_jax.data import buckets, images, records

BACKGROUND = (128, 128, 128)
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "purple": (140, 50, 180),
    "orange": (245, 140, 20),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
PLURALS = {s: s + "s" for s in SHAPES}
# Largest side of an object as a fraction of the image side: far enough apart to tell
# apart at a glance, and as large as fits. At 32 px a small object is nearly 11 px, so a
# tokenizer's codes keep a star's points and a circle's roundness (with 4 px patches on a
# 4 px lattice its reconstructions kept three quarters of the validation scenes right with
# 0.27 and 0.42, 86% with 0.34 and 0.46; BENCHMARKS.md). Large stays at 0.44 so that two
# large objects fit side by side with the borders and gap between them when placed anywhere
# (0.46 fits only on a lattice); on an 8 px lattice both sizes fit in two 8 px patches.
SIZES = {"small": 0.34, "large": 0.44}
KINDS = ("single", "count", "binding", "relation")
RELATIONS = {"left": "to the left of", "right": "to the right of", "above": "above",
             "below": "below"}
CONVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
NUMBERS = {2: "two", 3: "three", 4: "four"}
SPLITS = ("train", "validation", "heldout")

SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact flat colors
RENDER_CHUNK = 256  # records a rendering worker takes at a time (smaller splits: in process)
BORDER = 0.03  # free margin between objects and the image edge, fraction of the side
GAP = 0.04  # free space between objects' boxes, fraction of the side
DOMINANCE = 2.0  # a relation's axis separation is at least this times the other axis'
SIZE_WORD_PROB = 0.4  # how often a caption names an object's size
READING_ROW = 0.1  # objects whose tops lie within this fraction of the side share a row
MIN_RESOLUTION = 16
FIELDS = ("id", "image", "captions", "extra")


def _normalized(points) -> np.ndarray:
  """Outline centred on its bounding box, longest side 1: objects fill their box."""
  p = np.asarray(points, np.float64)
  lo, hi = p.min(0), p.max(0)
  return (p - (lo + hi) / 2) / (hi - lo).max()


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
  # A fat inner radius keeps the arms distinct from a blob when a small star is 7 px wide.
  angles = -math.pi / 2 + np.arange(2 * points) * math.pi / points
  radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
  return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)


def _heart(n: int = 64) -> np.ndarray:
  t = np.linspace(0, 2 * math.pi, n, endpoint=False)
  x = 16 * np.sin(t) ** 3
  y = 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
  return np.stack([x, -y], 1)  # image y points down


# Outlines in a unit box (circle is drawn as an ellipse); each shape's centre lies inside it,
# so the pixel at an object's centre has the object's color.
OUTLINES = {
    "square": _normalized([(-1, -1), (1, -1), (1, 1), (-1, 1)]),
    "triangle": _normalized([(0, -1), (1, 1), (-1, 1)]),
    "star": _normalized(_star()),
    "heart": _normalized(_heart()),
    "diamond": _normalized([(0, -1), (0.8, 0), (0, 1), (-0.8, 0)]),
}
# (width, height) of each shape as a fraction of its size.
EXTENTS = {"circle": (1.0, 1.0),
           **{s: tuple(float(v) for v in np.ptp(p, 0)) for s, p in OUTLINES.items()}}


def _pair(item) -> tuple[str, str]:
  color, shape = item
  if color not in COLORS or shape not in SHAPES:
    raise ValueError(f"held-out pair {item!r}: color must be one of {list(COLORS)} and "
                     f"shape one of {list(SHAPES)}")
  return color, shape


def _triple(item) -> tuple[str, str, str]:
  first, relation, second = item
  if relation not in RELATIONS:
    raise ValueError(f"held-out triple {item!r}: relation must be one of {list(RELATIONS)}")
  for obj in (first, second):
    words = obj.split()
    if not (len(words) in (1, 2) and words[-1] in SHAPES
            and (len(words) == 1 or words[0] in COLORS)):
      raise ValueError(f"held-out triple {item!r}: {obj!r} is not a shape ('circle') or a "
                       "color and a shape ('red circle')")
  return " ".join(first.split()), relation, " ".join(second.split())


def _kind_weights(items) -> tuple:
  """((kind, weight), ...) for every kind, in KINDS order; kinds not named weigh 0."""
  weights = {}
  for item in items:
    kind, weight = item
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      weight = math.nan  # refused just below, with the item named
    if kind not in KINDS or kind in weights or not 0 <= weight < math.inf:
      raise ValueError(f"train kind {item!r}: needs a kind of {list(KINDS)}, named once, and "
                       "a finite weight >= 0")
    weights[kind] = weight
  if not sum(weights.values()) > 0:
    raise ValueError(f"train kinds {list(items)!r}: some kind needs a weight > 0")
  return tuple((k, weights.get(k, 0.0)) for k in KINDS)


def _two_large_fit(resolution: int, lattice: int) -> bool:
  """Whether some lattice step puts two large objects apart inside the image."""
  side, gap = SIZES["large"] * resolution, GAP * resolution
  return any(side + gap <= k * lattice <= resolution - side
             for k in range(1, resolution // lattice + 1))


@dataclasses.dataclass(frozen=True)
class Spec:
  """What a shapes dataset draws, and which compositions only the heldout split shows."""
  resolution: int = 32
  heldout_pairs: tuple = (("red", "star"), ("blue", "heart"))
  heldout_triples: tuple = (("circle", "above", "triangle"),)
  # 0: objects anywhere. N > 0: each object's square (side x side around its centre) has its
  # corner on multiples of N pixels (and may touch the image edge), so with N the image
  # tokenizer's patch size an object shows the same patches wherever it stands.
  lattice: int = 0
  # How often the train split draws each kind of caption. Two-object kinds are the hard
  # ones; the demo draws them more often (configured in parti_jax/demo.py).
  train_kinds: tuple = tuple((k, 1.0) for k in KINDS)

  def __post_init__(self):
    if self.resolution < MIN_RESOLUTION:
      raise ValueError(f"resolution {self.resolution} < {MIN_RESOLUTION}: small shapes "
                       "would be unrecognizable")
    if self.lattice < 0 or self.lattice and not _two_large_fit(self.resolution, self.lattice):
      raise ValueError(f"lattice {self.lattice}: two large objects do not fit side by side "
                       f"on it at {self.resolution} px; use 0 (anywhere) or a smaller step")
    # Lists (from JSON or a CLI) become tuples, so specs stay hashable and comparable.
    object.__setattr__(self, "heldout_pairs", tuple(_pair(p) for p in self.heldout_pairs))
    object.__setattr__(self, "heldout_triples",
                       tuple(_triple(t) for t in self.heldout_triples))
    object.__setattr__(self, "train_kinds", _kind_weights(self.train_kinds))

  def kind_probabilities(self, split: str) -> np.ndarray:
    """P(kind) in KINDS order: train's weights for train, equal for the other splits."""
    weights = np.array([w for _, w in self.train_kinds]) if split == "train" else np.ones(
        len(KINDS))
    return weights / weights.sum()


# --- captions ----------------------------------------------------------------------------

def _phrase(obj: dict, article: bool = True) -> str:
  words = ([obj["size"]] if "size" in obj else []) + [obj["color"], obj["shape"]]
  if article:
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
  return " ".join(words)


def format_caption(fields: dict) -> str:
  """The caption of `fields` (a scene's "caption_fields"); `parse_caption` inverts it."""
  kind, objs = fields["kind"], fields["objects"]
  if kind == "single":
    return _phrase(objs[0])
  if kind == "count":
    *head, shape = _phrase(objs[0], article=False).split()
    return " ".join([NUMBERS[fields["count"]], *head, PLURALS[shape]])
  if kind == "binding":
    return f"{_phrase(objs[0])} and {_phrase(objs[1])}"
  if kind == "relation":
    return f"{_phrase(objs[0])} {RELATIONS[fields['relation']]} {_phrase(objs[1])}"
  raise ValueError(f"unknown caption kind {kind!r}")


def _parse_object(words: list[str], i: int, nouns) -> tuple[dict, int]:
  """One `[size] color shape` at words[i:]; returns (object, index after it)."""
  obj = {}
  if i < len(words) and words[i] in SIZES:
    obj["size"] = words[i]
    i += 1
  if i + 1 >= len(words):
    raise ValueError("caption ends inside an object")
  if words[i] not in COLORS or words[i + 1] not in nouns:
    raise ValueError(f"expected a color and a shape at {' '.join(words[i:i + 2])!r}")
  obj["color"], obj["shape"] = words[i], nouns[words[i + 1]]
  # Keys in caption order; dicts compare equal regardless, this only keeps printouts tidy.
  return {k: obj[k] for k in ("size", "color", "shape") if k in obj}, i + 2


def parse_caption(caption: str) -> dict:
  """A caption of the shapes grammar -> its fields; raises ValueError for anything else.

  Fields: kind; objects, a list of {"color", "shape"[, "size"]} ("size" only where the
  caption names it; one object for a count); "count" for counts; "relation" for relations.
  """
  words = caption.split()
  singular = {s: s for s in SHAPES}
  try:
    if words and words[0] in NUMBERS.values():
      count = next(n for n, w in NUMBERS.items() if w == words[0])
      obj, i = _parse_object(words, 1, {p: s for s, p in PLURALS.items()})
      fields = {"kind": "count", "count": count, "objects": [obj]}
    else:
      if not words or words[0] not in ("a", "an"):
        raise ValueError("expected 'a' or 'an' or a number word")
      first, i = _parse_object(words, 1, singular)
      fields = {"kind": "single", "objects": [first]}
      if i < len(words):
        fields, i = _parse_second(words, i, first, singular)
    if i != len(words):
      raise ValueError(f"unexpected words {' '.join(words[i:])!r}")
  except IndexError:
    raise ValueError(f"caption {caption!r} ends early") from None
  except ValueError as e:
    raise ValueError(f"caption {caption!r} is not in the shapes grammar: {e}") from None
  return fields


def _parse_second(words, i, first, singular) -> tuple[dict, int]:
  """The rest of a binding ("and a ...") or relation ("above a ...") caption."""
  if words[i] == "and":
    kind, relation, i = "binding", None, i + 1
  else:
    kind = "relation"
    relation = next((r for r, phrase in RELATIONS.items()
                     if words[i:i + len(phrase.split())] == phrase.split()), None)
    if relation is None:
      raise ValueError(f"expected 'and' or a relation at {words[i]!r}")
    i += len(RELATIONS[relation].split())
  if words[i] not in ("a", "an"):
    raise ValueError(f"expected 'a' or 'an' at {words[i]!r}")
  second, i = _parse_object(words, i + 1, singular)
  fields = {"kind": kind, "objects": [first, second]}
  if relation:
    fields["relation"] = relation
  return fields, i


def _describes(desc: dict, obj: dict) -> bool:
  return all(obj[k] == v for k, v in desc.items())


def relation_holds(first: dict, second: dict, relation: str, resolution: int) -> bool:
  """Whether `first` is clearly `relation` `second` (objects in pixels of `resolution`).

  Clearly: along the relation's axis their boxes are apart by at least half the gap the
  sampler leaves, and the centres' separation along that axis is DOMINANCE times the one
  across it, so no pair is both "left of" and "above".
  """
  axis = 0 if relation in ("left", "right") else 1
  a, b = (first, second) if relation in ("left", "above") else (second, first)
  along = b["center"][axis] - a["center"][axis]
  across = abs(b["center"][1 - axis] - a["center"][1 - axis])
  margin = GAP * resolution / 2
  return a["bbox"][axis + 2] + margin <= b["bbox"][axis] and along >= DOMINANCE * across


def caption_matches(fields: dict, objects: list[dict], relation_test) -> bool:
  """Whether `objects` are exactly what parsed caption `fields` asks for: no object missing
  or extra, each as described, and `relation_test(a, b, relation)` for a relation."""
  descs = fields["objects"]
  if fields["kind"] == "single":
    return len(objects) == 1 and _describes(descs[0], objects[0])
  if fields["kind"] == "count":
    return len(objects) == fields["count"] and all(_describes(descs[0], o) for o in objects)
  if len(objects) != 2:
    return False
  return any(_describes(descs[0], a) and _describes(descs[1], b) and (
      fields["kind"] == "binding" or relation_test(a, b, fields["relation"]))
      for a, b in (objects, objects[::-1]))


def caption_matches_scene(caption: str, scene: dict) -> bool:
  """Whether the caption truly describes the scene: objects, count, sizes, geometry."""
  try:
    fields = parse_caption(caption)
  except ValueError:
    return False
  return caption_matches(fields, scene["objects"], lambda a, b, relation: relation_holds(
      a, b, relation, scene["resolution"]))


# --- held-out compositions ---------------------------------------------------------------

def _names(obj: dict, name: str) -> bool:
  """Whether a triple's object name ("circle" or "red circle") names `obj`."""
  words = name.split()
  return words[-1] == obj["shape"] and (len(words) == 1 or words[0] == obj["color"])


def composition_is_heldout(fields: dict, spec: Spec) -> bool:
  """Whether caption fields (kind, objects, relation) name a held-out pair on any object or
  a held-out triple (or its converse)."""
  pairs = set(spec.heldout_pairs)
  if any((o["color"], o["shape"]) in pairs for o in fields["objects"]):
    return True
  if fields["kind"] != "relation":
    return False
  a, b = fields["objects"]
  relation = fields["relation"]
  return any((_names(a, x) and r == relation and _names(b, y))
             or (_names(b, x) and r == CONVERSE[relation] and _names(a, y))
             for x, r, y in spec.heldout_triples)


def is_heldout(scene: dict, spec: Spec) -> bool:
  """Whether the scene shows a held-out pair on any object, or a held-out triple."""
  return composition_is_heldout(
      dict(scene["caption_fields"], kind=scene["kind"], objects=scene["objects"]), spec)


# --- sampling ----------------------------------------------------------------------------

def _choice(rng, seq):
  seq = list(seq)
  return seq[int(rng.integers(len(seq)))]


def _uniform(rng, lo: float, hi: float) -> float:
  return lo + (hi - lo) * float(rng.random())


def _random_object(rng) -> dict:
  return {"color": _choice(rng, COLORS), "shape": _choice(rng, SHAPES),
          "size": _choice(rng, SIZES)}


def _other_object(rng, obj: dict) -> dict:
  """A random object with a different color or shape, so two-object captions are unique."""
  while True:
    other = _random_object(rng)
    if (other["color"], other["shape"]) != (obj["color"], obj["shape"]):
      return other


def _half(obj: dict, resolution: int) -> tuple[float, float]:
  w, h = EXTENTS[obj["shape"]]
  side = SIZES[obj["size"]] * resolution
  return w * side / 2, h * side / 2


def _round(values) -> list[float]:
  return [round(float(v), 3) for v in values]  # short floats in msgpack and JSON dumps


def _box(obj: dict, center, resolution: int) -> tuple:
  """The object's bounding box (x0, y0, x1, y1) around `center`."""
  hw, hh = _half(obj, resolution)
  return (center[0] - hw, center[1] - hh, center[0] + hw, center[1] + hh)


def _place(obj: dict, x: float, y: float, resolution: int) -> dict:
  return dict(obj, center=_round([x, y]), bbox=_round(_box(obj, (x, y), resolution)))


def _apart(a, b, gap: float) -> bool:
  """Whether boxes (x0, y0, x1, y1) are at least `gap` apart along some axis."""
  ax0, ay0, ax1, ay1 = a
  bx0, by0, bx1, by1 = b
  return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _lattice_centers(obj: dict, resolution: int, lattice: int) -> list[tuple[float, float]]:
  """Every centre that puts the object's square corner on the lattice, inside the image."""
  side = SIZES[obj["size"]] * resolution
  axis = [c + side / 2 for c in range(0, int(resolution - side) + 1, lattice)]
  return [(x, y) for x in axis for y in axis]


def _scatter_on_lattice(rng, objs: list[dict], resolution: int, lattice: int) -> list[dict]:
  """Random non-overlapping lattice positions: each object uniform among the free ones."""
  gap = GAP * resolution
  for _ in range(100):
    boxes = []
    for obj in objs:
      free = [c for c in _lattice_centers(obj, resolution, lattice)
              if all(_apart(_box(obj, c, resolution), b, gap) for b in boxes)]
      if not free:
        break  # crowded: start the scene over
      boxes.append(_box(obj, _choice(rng, free), resolution))
    if len(boxes) == len(objs):
      return [_place(o, (x0 + x1) / 2, (y0 + y1) / 2, resolution)
              for o, (x0, y0, x1, y1) in zip(objs, boxes)]
  raise RuntimeError(f"could not place {len(objs)} objects on a {lattice} px lattice")


def _arrange_on_lattice(rng, first: dict, second: dict, relation: str, resolution: int,
                        lattice: int) -> list[dict]:
  """A pair of lattice positions, uniform among those where the relation clearly holds
  (rejection sampling: a fair share of random pairs qualifies)."""
  gap = GAP * resolution
  firsts = _lattice_centers(first, resolution, lattice)
  seconds = _lattice_centers(second, resolution, lattice)
  for _ in range(10_000):
    a = _place(first, *_choice(rng, firsts), resolution)
    b = _place(second, *_choice(rng, seconds), resolution)
    if relation_holds(a, b, relation, resolution) and _apart(a["bbox"], b["bbox"], gap):
      return [a, b]
  raise RuntimeError(f"a {relation} relation does not fit on a {lattice} px lattice at "
                     f"{resolution} px")


def _scatter(rng, objs: list[dict], resolution: int) -> list[dict]:
  """Random non-overlapping positions inside the image, by rejection sampling."""
  border, gap = BORDER * resolution, GAP * resolution
  for _ in range(100):
    boxes = []
    for obj in objs:
      hw, hh = _half(obj, resolution)
      for _ in range(100):
        x = _uniform(rng, hw + border, resolution - hw - border)
        y = _uniform(rng, hh + border, resolution - hh - border)
        box = (x - hw, y - hh, x + hw, y + hh)
        if all(_apart(box, b, gap) for b in boxes):
          boxes.append(box)
          break
      else:
        break  # crowded: start the scene over
    if len(boxes) == len(objs):
      # Rounding moves a box by at most 0.0005 px, far less than the gap.
      return [_place(o, (x0 + x1) / 2, (y0 + y1) / 2, resolution)
              for o, (x0, y0, x1, y1) in zip(objs, boxes)]
  raise RuntimeError(f"could not place {len(objs)} objects without overlap")


def _arrange(rng, first: dict, second: dict, relation: str, resolution: int) -> list[dict]:
  """Positions with `first` clearly `relation` `second`, drawn directly, not rejected.

  The object leading along the axis (the left or top one) goes at p, the other at q, at
  least both half-extents plus the gap further along; across the axis the second is at
  most 1/DOMINANCE of that distance away from the first.
  """
  axis = 0 if relation in ("left", "right") else 1
  lead, trail = (first, second) if relation in ("left", "above") else (second, first)
  border, gap = BORDER * resolution, GAP * resolution
  hl, ht = _half(lead, resolution), _half(trail, resolution)

  def span(half, along):  # centre range keeping an object inside the image
    h = half[axis if along else 1 - axis]
    return h + border, resolution - h - border

  def xy(along, across):
    return (along, across) if axis == 0 else (across, along)

  min_dist = hl[axis] + ht[axis] + gap
  (lo_l, hi_l), (lo_t, hi_t) = span(hl, True), span(ht, True)
  if lo_l > min(hi_l, hi_t - min_dist):
    raise RuntimeError(f"a {relation} relation does not fit at {resolution} px")
  for _ in range(100):
    p = _uniform(rng, lo_l, min(hi_l, hi_t - min_dist))
    q = _uniform(rng, max(lo_t, p + min_dist), hi_t)
    p_across = _uniform(rng, *span(hl, False))
    lo, hi = span(ht, False)
    reach = (q - p) / DOMINANCE
    lo, hi = max(lo, p_across - reach), min(hi, p_across + reach)
    if lo > hi:
      continue  # the lead hugs an edge the other object cannot reach: draw again
    a = _place(lead, *xy(p, p_across), resolution)
    b = _place(trail, *xy(q, _uniform(rng, lo, hi)), resolution)
    a, b = (a, b) if lead is first else (b, a)
    # Rounding to 3 decimals can nudge a boundary case; the stored values must hold.
    if relation_holds(a, b, relation, resolution) and _apart(a["bbox"], b["bbox"], gap * 0.99):
      return [a, b]
  raise RuntimeError(f"could not arrange a {relation} relation at {resolution} px")


def reading_order(objs: list[dict], resolution: int) -> list[dict]:
  """Objects top to bottom, and left to right within a row (tops within READING_ROW).

  A binding caption names its objects in this order, the order in which a raster-order
  decoder starts drawing them (exactly so on an 8 px lattice with 8 px patches, where a
  row's tops differ by under 1 px and rows by over 7). In a random order the first object
  drawn could be either one named, and the demo's small model paired colors with their
  shapes less often (binding 35% against 40% after one short run; BENCHMARKS.md).
  Relations keep the order their words give.
  """
  row = READING_ROW * resolution
  top = lambda o: o["bbox"][1]
  out = []
  for obj in sorted(objs, key=top):
    # A row is led by its topmost object; later objects within `row` of it join it.
    if out and top(obj) - top(out[-1][0]) <= row:
      out[-1].append(obj)
    else:
      out.append([obj])
  return [o for r in out for o in sorted(r, key=lambda o: o["bbox"][0])]


def _caption_object(rng, obj: dict) -> dict:
  desc = {"color": obj["color"], "shape": obj["shape"]}
  if rng.random() < SIZE_WORD_PROB:
    desc = dict(size=obj["size"], **desc)
  return desc


def _build(rng, kind: str, objs: list[dict], spec: Spec, relation: str | None = None):
  """Positions, caption fields and caption for objects already chosen."""
  resolution, lattice = spec.resolution, spec.lattice
  if kind == "relation" and lattice:
    placed = _arrange_on_lattice(rng, objs[0], objs[1], relation, resolution, lattice)
  elif kind == "relation":
    placed = _arrange(rng, objs[0], objs[1], relation, resolution)
  elif lattice:
    placed = _scatter_on_lattice(rng, objs, resolution, lattice)
  else:
    placed = _scatter(rng, objs, resolution)
  if kind == "binding":
    placed = objs = reading_order(placed, resolution)
  if kind == "count":
    # One size word for the group: counted objects always share their size.
    fields = {"kind": kind, "count": len(objs), "objects": [_caption_object(rng, objs[0])]}
  else:
    fields = {"kind": kind, "objects": [_caption_object(rng, o) for o in objs]}
  if relation:
    fields["relation"] = relation
  scene = {"kind": kind, "resolution": resolution, "caption_fields": fields, "objects": placed}
  return scene, format_caption(fields)


def _group(rng, color: str, shape: str) -> list[dict]:
  n = int(rng.integers(2, 5))
  # Three or four large objects rarely fit without overlap; two can be either size.
  size = _choice(rng, SIZES) if n == 2 else "small"
  return [{"color": color, "shape": shape, "size": size} for _ in range(n)]


def _sample_any(rng, spec: Spec, kinds: np.ndarray):
  kind = KINDS[int(rng.choice(len(KINDS), p=kinds))]
  first = _random_object(rng)
  if kind == "single":
    return _build(rng, kind, [first], spec)
  if kind == "count":
    return _build(rng, kind, _group(rng, first["color"], first["shape"]), spec)
  relation = _choice(rng, RELATIONS) if kind == "relation" else None
  return _build(rng, kind, [first, _other_object(rng, first)], spec, relation)


def _sample_pair(rng, pair: tuple[str, str], spec: Spec):
  """A scene of a random kind with the held-out (color, shape) on one object."""
  kind = _choice(rng, KINDS)
  forced = {"color": pair[0], "shape": pair[1], "size": _choice(rng, SIZES)}
  if kind == "single":
    return _build(rng, kind, [forced], spec)
  if kind == "count":
    return _build(rng, kind, _group(rng, *pair), spec)
  objs = [forced, _other_object(rng, forced)]
  if rng.random() < 0.5:
    objs.reverse()
  relation = _choice(rng, RELATIONS) if kind == "relation" else None
  return _build(rng, kind, objs, spec, relation)


def _sample_triple(rng, triple: tuple[str, str, str], spec: Spec):
  """A relation scene showing the held-out triple, with random colors where unnamed."""
  first_name, relation, second_name = triple

  def named(name):
    words = name.split()
    color = words[0] if len(words) == 2 else _choice(rng, COLORS)
    return {"color": color, "shape": words[-1], "size": _choice(rng, SIZES)}

  first = named(first_name)
  for _ in range(100):
    second = named(second_name)
    if (second["color"], second["shape"]) != (first["color"], first["shape"]):
      break  # a triple naming one colored shape twice keeps its (only) identical pair
  return _build(rng, "relation", [first, second], spec, relation)


def sample_scene(rng: np.random.Generator, spec: Spec, split: str) -> tuple[dict, str]:
  """One (scene, caption) of `split`: train and validation never show a held-out
  composition; heldout always shows one, chosen uniformly among pairs and triples."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r} is not one of {SPLITS}")
  if split == "heldout":
    targets = ([("pair", p) for p in spec.heldout_pairs]
               + [("triple", t) for t in spec.heldout_triples])
    if not targets:
      raise ValueError("the heldout split needs held-out pairs or triples in the spec")
    what, target = targets[int(rng.integers(len(targets)))]
    sample = _sample_pair if what == "pair" else _sample_triple
    scene, caption = sample(rng, target, spec)
    assert is_heldout(scene, spec), scene
    return scene, caption
  kinds = spec.kind_probabilities(split)
  for _ in range(1000):
    scene, caption = _sample_any(rng, spec, kinds)
    if not is_heldout(scene, spec):
      return scene, caption
  raise RuntimeError("the held-out compositions leave almost nothing to train on")


# --- rendering ---------------------------------------------------------------------------

def render_scene(scene: dict, resolution: int | None = None) -> np.ndarray:
  """The scene as uint8 [R, R, 3]; coordinates are rescaled if R differs from the scene's."""
  resolution = resolution or scene["resolution"]
  side = resolution * SUPERSAMPLE
  scale = side / scene["resolution"]
  canvas = Image.new("RGB", (side, side), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for obj in scene["objects"]:
    fill = COLORS[obj["color"]]
    x0, y0, x1, y1 = (v * scale for v in obj["bbox"])
    # PIL truncates coordinates and fills pixels on both ends of a span, so a span
    # [x0, x1) in pixel edges, rounded, is passed as round(x0) .. round(x1) - 1.
    if obj["shape"] == "circle":
      draw.ellipse((round(x0), round(y0), round(x1) - 1, round(y1) - 1), fill=fill)
    else:
      # Unrounded vertices truncate to a span half a pixel too wide on each side on
      # average; drawing the outline one pixel smaller corrects that without a bias.
      cx, cy = (v * scale for v in obj["center"])
      pts = OUTLINES[obj["shape"]] * (max(x1 - x0, y1 - y0) - 1) + (cx, cy)
      draw.polygon([tuple(p) for p in pts.tolist()], fill=fill)
  # reduce() averages each SUPERSAMPLE x SUPERSAMPLE block: a box filter, no ringing.
  return np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.uint8)


def make_record(spec: Spec, split: str, seed: int, index: int) -> dict:
  """Record `index` of a split; its own random stream, so any prefix of a split is stable."""
  rng = np.random.default_rng((seed, SPLITS.index(split), index))
  scene, caption = sample_scene(rng, spec, split)
  return {"id": f"shapes-{split}-{index:07d}",
          "image": images.encode_png(render_scene(scene, spec.resolution)),
          "captions": [caption], "extra": {"scene": scene}}


def available_cpus() -> int:
  """CPUs this process may run on (a container's or a job's share, where the OS tells)."""
  if hasattr(os, "sched_getaffinity"):  # Linux; macOS has only the machine's count
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def make_split(spec: Spec, split: str, num: int, seed: int = 0, progress: bool = False,
               workers: int = 1) -> list[dict]:
  """`num` records of `split`, the same bytes for the same arguments (any `workers`).

  With `workers` > 1 the records are rendered in that many processes: each record has its
  own random stream, so who renders it does not change its bytes.
  """
  bar = functools.partial(tqdm.tqdm, total=num, desc=f"rendering {split}", unit="img",
                          disable=not progress)
  one = functools.partial(make_record, spec, split, seed)
  if workers <= 1 or num < 2 * RENDER_CHUNK:
    return [one(i) for i in bar(range(num))]
  # "spawn": a fresh interpreter per worker, safe even where the caller has started JAX's
  # threads (fork would copy them); the module imports in well under a second.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    return list(bar(pool.map(one, range(num), chunksize=RENDER_CHUNK)))


def write(out_dir, spec: Spec, num: int, num_validation: int | None = None,
          num_heldout: int | None = None, seed: int = 0, num_shards: int = 1,
          progress: bool = True, workers: int = 1) -> dict:
  """Writes OUT/train, OUT/validation and OUT/heldout; returns counts and render speed."""
  out_dir = epath.Path(out_dir)
  buckets.check_bucket(out_dir)  # before rendering anything
  default = max(num // 10, 1)
  has_heldout = bool(spec.heldout_pairs or spec.heldout_triples)
  if num_heldout is None:
    num_heldout = default if has_heldout else 0
  counts = {"train": num,
            "validation": default if num_validation is None else num_validation,
            "heldout": num_heldout}
  seconds, shards = 0.0, {}
  for split, count in counts.items():
    start = time.perf_counter()
    recs = make_split(spec, split, count, seed, progress, workers)
    seconds += time.perf_counter() - start
    # Never an empty shard: a split smaller than num_shards gets one shard per record.
    shards[split] = max(1, min(num_shards, count))
    with buckets.reported(out_dir / split):  # a bucket's errors as one line
      records.write_shard_set(out_dir / split, f"shapes-{split}", "images", recs,
                              shards[split], **_set_metadata(spec, split, num, seed))
  total = sum(counts.values())
  return {"counts": counts, "shards": shards, "seconds": seconds,
          "images_per_second": total / seconds if seconds else float("nan")}


def _set_metadata(spec: Spec, split: str, num: int, seed: int) -> dict:
  """What a split's metadata.json says of how it was made (the scorers read it back)."""
  return dict(
      made_by={"tool": "parti_jax.data.shapes", "num": num, "seed": seed}, fields=FIELDS,
      split=split, resolution=spec.resolution, seed=seed, background=list(BACKGROUND),
      colors={k: list(v) for k, v in COLORS.items()}, shapes=list(SHAPES),
      sizes=dict(SIZES), relations=list(RELATIONS),
      heldout_pairs=[list(p) for p in spec.heldout_pairs],
      heldout_triples=[list(t) for t in spec.heldout_triples], lattice=spec.lattice,
      train_kinds=dict(spec.train_kinds))


def _split_list(text: str, parts: int, what: str) -> tuple:
  """"a:b,c:d" -> (("a", "b"), ("c", "d")); underscores stand for spaces ("red_circle")."""
  items = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    fields = tuple(f.strip().replace("_", " ") for f in item.split(":"))
    if len(fields) != parts:
      raise argparse.ArgumentTypeError(f"{what} {item!r} needs {parts} ':'-separated parts")
    items.append(fields)
  return tuple(items)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out", required=True, help="writes OUT/train, OUT/validation, OUT/heldout")
  p.add_argument("--num", type=int, required=True, help="training records")
  p.add_argument("--resolution", type=int, default=32)
  p.add_argument("--num_validation", type=int, default=None, help="default max(num // 10, 1)")
  p.add_argument("--num_heldout", type=int, default=None, help="default max(num // 10, 1)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--num_shards", type=int, default=1, help="shards per split")
  p.add_argument("--workers", type=int, default=available_cpus(),
                 help="rendering processes (default: one per CPU); the bytes do not depend on it")
  p.add_argument("--heldout_pairs", default="red:star,blue:heart",
                 type=lambda s: _split_list(s, 2, "held-out pair"),
                 help="color:shape,... never seen in train ('' for none)")
  p.add_argument("--heldout_triples", default="circle:above:triangle",
                 type=lambda s: _split_list(s, 3, "held-out triple"),
                 help="object:relation:object,... with object 'circle' or 'red_circle'; "
                      f"relations {', '.join(RELATIONS)} ('' for none)")
  p.add_argument("--lattice", type=int, default=0,
                 help="put objects on multiples of this many pixels (0: anywhere)")
  p.add_argument("--train_kinds", default=",".join(f"{k}:1" for k in KINDS),
                 type=lambda s: _split_list(s, 2, "train kind"),
                 help="kind:weight,... how often train draws each kind (unnamed: never); "
                      "validation and heldout draw all equally")
  a = p.parse_args(argv)
  try:
    spec = Spec(a.resolution, a.heldout_pairs, a.heldout_triples, a.lattice, a.train_kinds)
  except ValueError as e:
    p.error(str(e))
  if a.num_heldout and not (spec.heldout_pairs or spec.heldout_triples):
    p.error("--num_heldout > 0 needs --heldout_pairs or --heldout_triples")
  if a.workers < 1:
    p.error(f"--workers={a.workers}: needs at least 1")
  try:
    result = write(a.out, spec, a.num, a.num_validation, a.num_heldout, a.seed, a.num_shards,
                   workers=a.workers)
  except records.DataError as e:  # a bucket that is missing or cannot be written
    sys.exit(f"error: {e}")
  for split, count in result["counts"].items():
    print(f"{epath.Path(a.out) / split}: {count} records in {result['shards'][split]} "
          "shard(s)")
  total = sum(result["counts"].values())
  print(f"rendered {total} images at {spec.resolution}x{spec.resolution} in "
        f"{result['seconds']:.2f} s: {result['images_per_second']:.0f} images/s")


if __name__ == "__main__":
  main()
