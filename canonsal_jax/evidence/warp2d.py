"""The 2-D baseline of canonicalisation: a piecewise-affine warp of a heatmap onto a landmark template.

Before a 3DMM, faces were brought into one frame by warping them onto a template of landmarks (AAMs, the
"shape-free" patches of Cootes et al.). The canonicalisation check (`canonicalisation`) asks whether the 3-D path
(`canonical.to_texture`) lines up saliency across poses better than that, so this module does the 2-D way:

1. `make_template`: 68 landmarks (e.g. a frontal face's) placed in a square frame and Delaunay-triangulated;
   every template pixel inside their hull gets its triangle and barycentrics (`raster.rasterize`).
2. `template_to_image`: a face's own 68 landmarks, combined with those barycentrics, say where each template
   pixel lies in that face's image: inside each triangle the map is the affine taking the template triangle
   onto the face's.
3. `warp_to_template`: a map on the model crop (a heatmap) is sampled there, through the crop transform,
   bilinearly over its valid pixels; pixels outside the crop get weight 0 ("no data").

A turned head folds this warp: landmarks of the far cheek crowd together and the jaw contour slides over the
face, so the same template pixel looks at different skin in different views. The 3-D path has no such folds.

Example:
  Lines marked +SKIP are not run as doctests: it needs detected faces and a heatmap.
  >>> template = make_template(frontal.landmarks_xy, 128)  # doctest: +SKIP
  >>> values, weight = warp_to_template(heatmap, face.landmarks_xy, template, crop_from_image=affine)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.spatial

from canonsal_jax import faces, raster

__all__ = [
  "DEFAULT_MARGIN",
  "Template",
  "make_template",
  "template_to_image",
  "warp_to_template",
]

# Share of the template's side left free around the landmarks' bounding box on each side.
DEFAULT_MARGIN = 0.05


class Template(NamedTuple):
  """A triangulated landmark template in a size x size frame.

  Attributes:
    landmarks_xy: [N, 2] float64 the template's landmarks in template pixel xy (centres at integers).
    triangles: [K, 3] int32 Delaunay triangles over the landmarks.
    tri_id: [S, S] int32 the triangle holding each template pixel centre, -1 outside the landmarks' hull.
    bary: [S, S, 3] float64 barycentrics of the pixel centre in that triangle (zeros outside).
  """

  landmarks_xy: np.ndarray
  triangles: np.ndarray
  tri_id: np.ndarray
  bary: np.ndarray

  @property
  def size(self) -> int:
    return self.tri_id.shape[0]

  @property
  def inside(self) -> np.ndarray:
    """[S, S] bool, template pixels inside the landmarks' hull."""
    return self.tri_id >= 0


def make_template(
  landmarks_xy: np.ndarray,
  size: int,
  *,
  margin: float = DEFAULT_MARGIN,
  triangles: np.ndarray | None = None,
) -> Template:
  """Places landmarks in a size x size frame (a similarity: centred, larger extent filling it) and triangulates.

  Args:
    landmarks_xy: [N, 2] landmarks in any xy frame (a frontal face's 68, or a mean shape).
    size: template side S in pixels.
    margin: share of S left free on each side.
    triangles: [K, 3] a triangulation to use instead of the Delaunay one.

  Returns:
    The `Template`.

  Raises:
    ValueError: fewer than 3 finite landmarks, or a degenerate (collinear) set.
  """
  points = np.asarray(landmarks_xy, np.float64)
  if points.ndim != 2 or points.shape[-1] != 2 or len(points) < 3 or not np.all(np.isfinite(points)):
    raise ValueError(f"need [N >= 3, 2] finite landmarks, got shape {points.shape}")
  lo, hi = points.min(0), points.max(0)
  extent = float((hi - lo).max())
  if not extent > 0:
    raise ValueError("landmarks are all at one point")
  scale = size * (1.0 - 2.0 * margin) / extent
  template_xy = (points - (lo + hi) / 2) * scale + (size - 1) / 2
  if triangles is None:
    triangles = scipy.spatial.Delaunay(template_xy).simplices
  triangles = np.asarray(triangles, np.int32)
  xyd = np.concatenate([template_xy, np.zeros((len(template_xy), 1))], axis=1).astype(np.float32)
  box = raster.required_box(xyd[:, :2], triangles, size, size)
  frags = raster.check_complete(raster.rasterize(xyd, triangles, size, size, max_box=box))
  tri_id = np.asarray(frags.tri_id)
  # Barycentrics in float64 from the template's own coordinates (the rasteriser's are float32).
  rows, cols = np.indices((size, size))
  corners = template_xy[triangles[np.maximum(tri_id, 0)]]  # [S, S, 3, 2]
  bary = _barycentrics(np.stack([cols, rows], axis=-1).astype(np.float64), corners)
  bary = np.where((tri_id >= 0)[..., None], bary, 0.0)
  return Template(landmarks_xy=template_xy, triangles=triangles, tri_id=tri_id, bary=bary)


def _barycentrics(p: np.ndarray, corners: np.ndarray) -> np.ndarray:
  """Barycentrics [..., 3] of points p [..., 2] in triangles corners [..., 3, 2] (NaN-free: degenerate -> 0)."""
  a, b, c = corners[..., 0, :], corners[..., 1, :], corners[..., 2, :]
  v0, v1, v2 = b - a, c - a, p - a
  den = v0[..., 0] * v1[..., 1] - v1[..., 0] * v0[..., 1]
  safe = np.where(den == 0, 1.0, den)
  w1 = (v2[..., 0] * v1[..., 1] - v1[..., 0] * v2[..., 1]) / safe
  w2 = (v0[..., 0] * v2[..., 1] - v2[..., 0] * v0[..., 1]) / safe
  bary = np.stack([1.0 - w1 - w2, w1, w2], axis=-1)
  return np.where((den == 0)[..., None], 0.0, bary)


def template_to_image(template: Template, landmarks_xy: np.ndarray) -> np.ndarray:
  """Where each template pixel lies in a face's image: [S, S, 2] xy, NaN outside the template's hull.

  Args:
    template: the `Template`.
    landmarks_xy: [N, 2] the face's landmarks in image xy, in the template's landmark order.
  """
  points = np.asarray(landmarks_xy, np.float64)
  if points.shape != template.landmarks_xy.shape:
    raise ValueError(f"need landmarks of shape {template.landmarks_xy.shape}, got {points.shape}")
  corners = points[template.triangles[np.maximum(template.tri_id, 0)]]  # [S, S, 3, 2]
  xy = np.einsum("...k,...kc->...c", template.bary, corners)
  return np.where(template.inside[..., None], xy, np.nan)


def _bilinear(values: np.ndarray, valid: np.ndarray, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Bilinear sample of [h, w] `values` at xy over `valid` pixels, renormalised; (value, coverage in [0, 1]).

  Points whose xy falls outside the map's pixel area [-0.5, w - 0.5] x [-0.5, h - 0.5] (or is NaN) get
  coverage 0; inside, coordinates clamp to the edge pixel centres, as `faces.warp_to_image` does.
  """
  h, w = values.shape
  inside = (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)
  x = np.clip(np.nan_to_num(x), 0.0, w - 1.0)
  y = np.clip(np.nan_to_num(y), 0.0, h - 1.0)
  x0, y0 = np.floor(x).astype(np.int64), np.floor(y).astype(np.int64)
  fx, fy = x - x0, y - y0
  total = np.zeros_like(x)
  coverage = np.zeros_like(x)
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      i, j = np.minimum(y0 + dy, h - 1), np.minimum(x0 + dx, w - 1)
      tap = wx * wy * valid[i, j]
      total += tap * values[i, j]
      coverage += tap
  coverage = np.where(inside, np.clip(coverage, 0.0, 1.0), 0.0)
  value = np.where(coverage > 0, total / np.where(coverage > 0, coverage, 1.0), 0.0)
  return value, coverage


def warp_to_template(
  crop_map: np.ndarray,
  landmarks_xy: np.ndarray,
  template: Template,
  *,
  crop_from_image: np.ndarray | None = None,
  valid: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Piecewise-affine warp of a map on a face's crop onto the template.

  Each template pixel inside the hull is mapped into the face's image by its triangle's affine (template
  landmarks -> the face's `landmarks_xy`), then into the crop by `crop_from_image`, and the map is sampled
  there bilinearly over `valid` pixels.

  Args:
    crop_map: [h, w] values on the crop (a heatmap), or on the image itself when `crop_from_image` is None.
    landmarks_xy: [N, 2] the face's landmarks in image xy.
    template: the `Template`.
    crop_from_image: [2, 3] image xy -> crop xy; None: identity (the map lives on the image).
    valid: [h, w] bool pixels of the map with data (e.g. patch count > 0); None: all.

  Returns:
    (values [S, S] float64, weight [S, S] float64 in [0, 1]); 0 and 0 outside the hull, outside the crop or on
    invalid pixels.
  """
  values = np.asarray(crop_map, np.float64)
  if values.ndim != 2:
    raise ValueError(f"need a [h, w] map, got shape {values.shape}")
  valid = np.ones(values.shape, bool) if valid is None else np.asarray(valid, bool)
  xy = template_to_image(template, landmarks_xy)
  if crop_from_image is not None:
    xy = faces.apply_affine(crop_from_image, xy)
  value, weight = _bilinear(values, valid.astype(np.float64), xy[..., 0], xy[..., 1])
  weight = np.where(template.inside, weight, 0.0)
  return np.where(weight > 0, value, 0.0), weight
