"""The words of the shapes domain and what each looks like: palette, outlines, sizes.

Captions use only these words (`grammar`), scenes only these objects (`scenes`), and the
renderer and the detector share the palette and the outlines (`render`, `judge`).
"""

import math

import numpy as np

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
