"""Scenes of the shapes domain: what a dataset draws (`Spec`), held-out compositions, and
the sampler of (scene, caption) pairs.

A scene holds 1 to 4 non-overlapping objects (`layout`) and a caption of one of four kinds
(`grammar`); a binding caption names its objects in reading order. Train draws the kinds
with the spec's `train_kinds` weights (equally by default); validation and heldout always
draw them equally, so their scores by kind compare across train mixes.

Some compositions are held out of train and validation: (color, shape) pairs on any
object, and (object, relation, object) triples in relation scenes, where an object is a
shape ("circle") or a colored shape ("red circle"). The converse of a held-out triple
("a triangle below a circle" for "circle above triangle") shows the same picture, so it
is held out too. The heldout split holds only scenes built around one of them, so a model
trained on train can be scored on compositions it never saw.

Every caption parses back (`grammar.parse_caption`) into the fields stored with its scene,
and `caption_matches_scene` checks a caption against a scene's objects and geometry.
"""

import dataclasses
import math

import numpy as np

from parti_jax.shapes import grammar, layout
from parti_jax.shapes.vocabulary import COLORS, CONVERSE, KINDS, RELATIONS, SHAPES, SIZES

SPLITS = ("train", "validation", "heldout")
MIN_RESOLUTION = 16
SIZE_WORD_PROB = 0.4  # how often a caption names an object's size


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
    if self.lattice < 0 or (self.lattice
                            and not layout.two_large_fit(self.resolution, self.lattice)):
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


def caption_matches_scene(caption: str, scene: dict) -> bool:
  """Whether the caption truly describes the scene: objects, count, sizes, geometry."""
  try:
    fields = grammar.parse_caption(caption)
  except ValueError:
    return False
  return grammar.caption_matches(fields, scene["objects"], lambda a, b, relation: (
      layout.relation_holds(a, b, relation, scene["resolution"])))


# --- sampling ----------------------------------------------------------------------------

def _random_object(rng) -> dict:
  return {"color": layout.choice(rng, COLORS), "shape": layout.choice(rng, SHAPES),
          "size": layout.choice(rng, SIZES)}


def _other_object(rng, obj: dict) -> dict:
  """A random object with a different color or shape, so two-object captions are unique."""
  while True:
    other = _random_object(rng)
    if (other["color"], other["shape"]) != (obj["color"], obj["shape"]):
      return other


def _caption_object(rng, obj: dict) -> dict:
  desc = {"color": obj["color"], "shape": obj["shape"]}
  if rng.random() < SIZE_WORD_PROB:
    desc = dict(size=obj["size"], **desc)
  return desc


def _build(rng, kind: str, objs: list[dict], spec: Spec, relation: str | None = None):
  """Positions, caption fields and caption for objects already chosen."""
  resolution, lattice = spec.resolution, spec.lattice
  if kind == "relation" and lattice:
    placed = layout.arrange_on_lattice(rng, objs[0], objs[1], relation, resolution, lattice)
  elif kind == "relation":
    placed = layout.arrange(rng, objs[0], objs[1], relation, resolution)
  elif lattice:
    placed = layout.scatter_on_lattice(rng, objs, resolution, lattice)
  else:
    placed = layout.scatter(rng, objs, resolution)
  if kind == "binding":
    placed = objs = layout.reading_order(placed, resolution)
  if kind == "count":
    # One size word for the group: counted objects always share their size.
    fields = {"kind": kind, "count": len(objs), "objects": [_caption_object(rng, objs[0])]}
  else:
    fields = {"kind": kind, "objects": [_caption_object(rng, o) for o in objs]}
  if relation:
    fields["relation"] = relation
  scene = {"kind": kind, "resolution": resolution, "caption_fields": fields, "objects": placed}
  return scene, grammar.format_caption(fields)


def _group(rng, color: str, shape: str) -> list[dict]:
  n = int(rng.integers(2, 5))
  # Three or four large objects rarely fit without overlap; two can be either size.
  size = layout.choice(rng, SIZES) if n == 2 else "small"
  return [{"color": color, "shape": shape, "size": size} for _ in range(n)]


def _sample_any(rng, spec: Spec, kinds: np.ndarray):
  kind = KINDS[int(rng.choice(len(KINDS), p=kinds))]
  first = _random_object(rng)
  if kind == "single":
    return _build(rng, kind, [first], spec)
  if kind == "count":
    return _build(rng, kind, _group(rng, first["color"], first["shape"]), spec)
  relation = layout.choice(rng, RELATIONS) if kind == "relation" else None
  return _build(rng, kind, [first, _other_object(rng, first)], spec, relation)


def _sample_pair(rng, pair: tuple[str, str], spec: Spec):
  """A scene of a random kind with the held-out (color, shape) on one object."""
  kind = layout.choice(rng, KINDS)
  forced = {"color": pair[0], "shape": pair[1], "size": layout.choice(rng, SIZES)}
  if kind == "single":
    return _build(rng, kind, [forced], spec)
  if kind == "count":
    return _build(rng, kind, _group(rng, *pair), spec)
  objs = [forced, _other_object(rng, forced)]
  if rng.random() < 0.5:
    objs.reverse()
  relation = layout.choice(rng, RELATIONS) if kind == "relation" else None
  return _build(rng, kind, objs, spec, relation)


def _sample_triple(rng, triple: tuple[str, str, str], spec: Spec):
  """A relation scene showing the held-out triple, with random colors where unnamed."""
  first_name, relation, second_name = triple

  def named(name):
    words = name.split()
    color = words[0] if len(words) == 2 else layout.choice(rng, COLORS)
    return {"color": color, "shape": words[-1], "size": layout.choice(rng, SIZES)}

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
