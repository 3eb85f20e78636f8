"""Where a scene's objects stand: random non-overlapping positions, relations that clearly
hold, and the reading order of a binding caption.

Positions are in pixels of the scene's resolution: each object gets a `center` (x, y) and a
`bbox` (x0, y0, x1, y1), rounded to 3 decimals. Objects stand anywhere inside a border, or
(`lattice` N > 0) with the corner of their square on multiples of N pixels.
"""

from parti_jax.shapes.vocabulary import EXTENTS, SIZES

BORDER = 0.03  # free margin between objects and the image edge, fraction of the side
GAP = 0.04  # free space between objects' boxes, fraction of the side
DOMINANCE = 2.0  # a relation's axis separation is at least this times the other axis'
READING_ROW = 0.1  # objects whose tops lie within this fraction of the side share a row


def choice(rng, seq):
  """A uniform element of `seq` (its order fixes which draw picks which element)."""
  seq = list(seq)
  return seq[int(rng.integers(len(seq)))]


def uniform(rng, lo: float, hi: float) -> float:
  return lo + (hi - lo) * float(rng.random())


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


def two_large_fit(resolution: int, lattice: int) -> bool:
  """Whether some lattice step puts two large objects apart inside the image."""
  side, gap = SIZES["large"] * resolution, GAP * resolution
  return any(side + gap <= k * lattice <= resolution - side
             for k in range(1, resolution // lattice + 1))


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


def scatter_on_lattice(rng, objs: list[dict], resolution: int, lattice: int) -> list[dict]:
  """Random non-overlapping lattice positions: each object uniform among the free ones."""
  gap = GAP * resolution
  for _ in range(100):
    boxes = []
    for obj in objs:
      free = [c for c in _lattice_centers(obj, resolution, lattice)
              if all(_apart(_box(obj, c, resolution), b, gap) for b in boxes)]
      if not free:
        break  # crowded: start the scene over
      boxes.append(_box(obj, choice(rng, free), resolution))
    if len(boxes) == len(objs):
      return [_place(o, (x0 + x1) / 2, (y0 + y1) / 2, resolution)
              for o, (x0, y0, x1, y1) in zip(objs, boxes)]
  raise RuntimeError(f"could not place {len(objs)} objects on a {lattice} px lattice")


def arrange_on_lattice(rng, first: dict, second: dict, relation: str, resolution: int,
                       lattice: int) -> list[dict]:
  """A pair of lattice positions, uniform among those where the relation clearly holds
  (rejection sampling: a fair share of random pairs qualifies)."""
  gap = GAP * resolution
  firsts = _lattice_centers(first, resolution, lattice)
  seconds = _lattice_centers(second, resolution, lattice)
  for _ in range(10_000):
    a = _place(first, *choice(rng, firsts), resolution)
    b = _place(second, *choice(rng, seconds), resolution)
    if relation_holds(a, b, relation, resolution) and _apart(a["bbox"], b["bbox"], gap):
      return [a, b]
  raise RuntimeError(f"a {relation} relation does not fit on a {lattice} px lattice at "
                     f"{resolution} px")


def scatter(rng, objs: list[dict], resolution: int) -> list[dict]:
  """Random non-overlapping positions inside the image, by rejection sampling."""
  border, gap = BORDER * resolution, GAP * resolution
  for _ in range(100):
    boxes = []
    for obj in objs:
      hw, hh = _half(obj, resolution)
      for _ in range(100):
        x = uniform(rng, hw + border, resolution - hw - border)
        y = uniform(rng, hh + border, resolution - hh - border)
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


def arrange(rng, first: dict, second: dict, relation: str, resolution: int) -> list[dict]:
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
    p = uniform(rng, lo_l, min(hi_l, hi_t - min_dist))
    q = uniform(rng, max(lo_t, p + min_dist), hi_t)
    p_across = uniform(rng, *span(hl, False))
    lo, hi = span(ht, False)
    reach = (q - p) / DOMINANCE
    lo, hi = max(lo, p_across - reach), min(hi, p_across + reach)
    if lo > hi:
      continue  # the lead hugs an edge the other object cannot reach: draw again
    a = _place(lead, *xy(p, p_across), resolution)
    b = _place(trail, *xy(q, uniform(rng, lo, hi)), resolution)
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
