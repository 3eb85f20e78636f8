"""Scenes to pixels: flat colors on grey, anti-aliased by drawing large and box-filtering."""

import numpy as np
from PIL import Image, ImageDraw

from parti_jax.shapes.vocabulary import BACKGROUND, COLORS, OUTLINES

SUPERSAMPLE = 4  # draw at 4x and box-filter down: anti-aliased edges, exact flat colors


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
