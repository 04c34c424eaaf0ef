"""Colour maps and overlays for saliency maps (numpy and Pillow only; no plotting library needed)."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = ["colorize", "overlay", "panel", "upscale"]

# Sequential map for unsigned saliency: anchor colours of matplotlib's "inferno" (BSD-style licence data,
# 9 evenly spaced samples), interpolated linearly.
_INFERNO = np.array(
  [
    [0, 0, 4],
    [31, 12, 72],
    [85, 15, 109],
    [136, 34, 106],
    [186, 54, 85],
    [227, 89, 51],
    [249, 140, 10],
    [249, 201, 50],
    [252, 255, 164],
  ],
  np.float64,
)
# Diverging map for signed saliency (negative blue, zero white, positive red), as ColorBrewer's RdBu.
_RDBU = np.array(
  [[5, 48, 97], [67, 147, 195], [209, 229, 240], [247, 247, 247], [253, 219, 199], [214, 96, 77], [103, 0, 31]],
  np.float64,
)
_NO_DATA_RGB = (128, 128, 128)


def _interp(stops: np.ndarray, t: np.ndarray) -> np.ndarray:
  pos = np.clip(t, 0.0, 1.0) * (len(stops) - 1)
  lo = np.floor(pos).astype(int)
  hi = np.minimum(lo + 1, len(stops) - 1)
  frac = (pos - lo)[..., None]
  return stops[lo] * (1 - frac) + stops[hi] * frac


def colorize(
  values: np.ndarray, *, valid: np.ndarray | None = None, signed: bool | None = None, vmax: float | None = None
) -> np.ndarray:
  """Maps `[H, W]` values to uint8 RGB `[H, W, 3]` on a shared scale.

  Args:
    values: the map.
    valid: `[H, W]` bool; invalid pixels ("no data", e.g. uncovered) are drawn grey, never as zero.
    signed: diverging colours centred on 0 (default: if any valid value is negative).
    vmax: the scale's end (default: the largest magnitude among valid values), so several maps can share one.
  """
  values = np.asarray(values, np.float64)
  valid = np.isfinite(values) if valid is None else (np.asarray(valid, bool) & np.isfinite(values))
  data = values[valid]
  if signed is None:
    signed = bool(data.size and data.min() < 0)
  if vmax is None:
    vmax = float(np.abs(data).max()) if data.size else 1.0
  vmax = vmax if vmax > 0 else 1.0
  safe = np.where(valid, values, 0.0)
  if signed:
    rgb = _interp(_RDBU, 0.5 + 0.5 * safe / vmax)
  else:
    rgb = _interp(_INFERNO, safe / vmax)
  rgb[~valid] = _NO_DATA_RGB
  return np.rint(rgb).astype(np.uint8)


def upscale(image: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour enlargement, so small model crops (32 px) stay legible and pixel-true."""
  return np.repeat(np.repeat(np.asarray(image), factor, axis=0), factor, axis=1)


def overlay(image_rgb: np.ndarray, heat_rgb: np.ndarray, alpha: np.ndarray | float = 0.55) -> np.ndarray:
  """Blends a colourised map over an image (`alpha` may be `[H, W]`, e.g. 0 where there is no data)."""
  alpha = np.asarray(alpha, np.float64)
  if alpha.ndim == 2:
    alpha = alpha[..., None]
  out = np.asarray(image_rgb, np.float64) * (1 - alpha) + np.asarray(heat_rgb, np.float64) * alpha
  return np.rint(out).astype(np.uint8)


def panel(tiles: list[np.ndarray], title: str, *, height: int = 320, margin: int = 8) -> np.ndarray:
  """Lays tiles side by side at a common height under a one-line title; returns uint8 RGB."""
  resized = []
  for tile in tiles:
    img = Image.fromarray(np.asarray(tile, np.uint8))
    width = max(1, round(img.width * height / img.height))
    resized.append(img.resize((width, height), Image.Resampling.NEAREST if img.height < height else Image.LANCZOS))
  title_h = 24
  total_w = sum(t.width for t in resized) + margin * (len(resized) + 1)
  canvas = Image.new("RGB", (total_w, height + title_h + 2 * margin), (255, 255, 255))
  draw = ImageDraw.Draw(canvas)
  draw.text((margin, margin), title, fill=(0, 0, 0), font=ImageFont.load_default())
  x = margin
  for tile in resized:
    canvas.paste(tile, (x, title_h + margin))
    x += tile.width + margin
  return np.asarray(canvas)
