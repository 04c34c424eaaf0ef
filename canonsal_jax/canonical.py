"""Canonical saliency: heatmaps on a crop pulled into the morphable model's texture, and drawn on the mean face.

A CIS (canonical image saliency, John et al., T-BIOM 2021) is a heatmap on a model crop re-expressed on the
model's UV layout, so maps of different faces, poses and crops line up texel by texel. This module does it by
inverse mapping, as eos's ``extract_texture`` does:

1. `model_uv_raster`: the model's mesh rasterised in UV space once per (model, texture size): every texel gets
   its triangle (-1 outside the UV layout) and barycentrics.
2. `to_texture`: for every texel with a triangle, its 3-D point on the fitted mesh (in crop coordinates, see
   `mesh_to_crop`) is the barycentric combination of that triangle's vertices; its (x, y) is where it projects
   (orthographic) into the crop. The texel takes the heatmap there (bilinear, pixel centres at integers) if the
   point is visible in the crop; otherwise its weight is 0, which means "no data", never "zero saliency".
3. `outside_mesh_share`: the share of the heatmap's mass that falls on crop pixels no triangle covers (hair,
   background, neck), reported with every CIS so saliency off the face is not lost silently.
4. `render_canonical`: the texture drawn on the mean shape, frontal, neutral, orthographic, Lambert-shaded;
   no-data hatched grey (holes in the mesh, the eye sockets, capped as no data), background white.

**Visibility test** (`to_texture`). A texel's point p = (x, y, d) is visible iff all of:

- it projects inside the crop: its nearest pixel (round(x), round(y)) exists;
- its triangle faces the camera: negative signed area in crop xy (model-space counter-clockwise with y up,
  projected with y flipped; see `raster`), i.e. the crop-space normal has n_z < 0;
- the crop's z-buffer does not hold anything nearer at that nearest pixel: either the pixel's visible triangle
  *is* this texel's triangle, or ``zbuffer <= d + tolerance`` with
  ``tolerance = DEPTH_TOLERANCE + min(slope, MAX_SLOPE) * |p_xy - pixel centre|`` where `slope` is the
  triangle's depth gradient in the crop (|∇d|). The z-buffer holds depth at pixel centres while p sits up to
  0.71 px away; on a sloped surface the depth there legitimately differs by slope x distance, so the
  tolerance grows with it (capped, so grazing triangles cannot see through real occluders). A plain depth
  test at the nearest pixel (eos's older affine extraction) fails on every sloped triangle; a tri-id test alone
  fails wherever the nearest pixel centre belongs to a neighbouring triangle of the same surface (most texels
  when triangles are a few pixels wide). eos 1.x instead casts a ray from every vertex and keeps a triangle only
  if all three vertices are unoccluded; the tests compare the two.

**Weights.** A visible texel's weight is the bilinear share of its four heatmap taps that are valid
(`valid_heatmap`, e.g. where the occlusion sweep's patch count > 0), 1 when all are; its value is the bilinear
interpolation renormalised over the valid taps. With ``cosine_weight=True`` the weight is further multiplied by
cos(view angle) = |n_z| of the unit normal in crop space (the triangle's, or the interpolated `normals_in_crop`),
so grazing views count less, as eos's ``compute_view_angle`` alpha did. Texels outside the UV layout, hidden,
outside the crop or on invalid heatmap pixels have weight 0 and value 0.

Example:
  Lines marked +SKIP are not run as doctests: it needs a copy of the Surrey Face Model, a fitted face and a heatmap.
  >>> model = load_sfm("path/to/sfm")  # doctest: +SKIP
  >>> uvr = model_uv_raster(model, default_texture_size(64))  # doctest: +SKIP
  >>> mesh = mesh_to_crop(vertices_xyd, crop_from_image)  # doctest: +SKIP
  >>> frags = raster.rasterize(mesh, model.triangles, 64, 64)  # doctest: +SKIP
  >>> cis, weight = to_texture(heatmap, frags, mesh, uvr, model.triangles)  # doctest: +SKIP
  >>> rgb = render_canonical(model, cis, weight, 256, vmax=1.0)  # doctest: +SKIP
"""

from __future__ import annotations

import collections
import functools
import hashlib
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from canonsal_jax import assets, fileio, raster, viz
from canonsal_jax.morphable.model import REGION_NAMES, MorphableModel

__all__ = [
  "DEPTH_TOLERANCE",
  "MAX_SLOPE",
  "REFERENCE_UV_DENSITY",
  "TEXELS_PER_CROP_PIXEL",
  "CanonicalSample",
  "UVRaster",
  "default_texture_size",
  "from_texture",
  "make_uv_raster",
  "mesh_to_crop",
  "model_uv_raster",
  "outside_mesh_share",
  "region_labels",
  "region_shares",
  "render_canonical",
  "sample_canonical",
  "to_texture",
  "uv_density",
  "vertex_normals",
]

# Depth slack of the visibility test, in crop pixels (depth shares x/y's units): absorbs float32 rounding of
# the z-buffer's plane evaluation. Small against real self-occlusion: on a 64 px crop the face is ~45 px wide
# (~0.3 px/mm), so 0.25 px is under 1 mm, while the nose stands ~20 mm (6 px) proud of the cheeks.
DEPTH_TOLERANCE = 0.25
# Cap on a triangle's depth gradient |∇d| (crop depth per crop pixel) in the slope term of the tolerance: 10 is
# a surface tilted ~84° from the view (cos 0.1). Against eos's ray-cast visibility on the Surrey model (see
# tests/test_canonical.py), a cap of 3 (72°) hid ~6% of the texels eos sees, almost all grazing; 10 leaves ~2%,
# while grazing triangles still get at most 10 * 0.71 px of slack.
MAX_SLOPE = 10.0
# Texture side per crop pixel in `default_texture_size`. Measured on the Surrey Face Model's mean: a frontal
# face whose mesh spans the crop's width gets one texel per crop pixel at T = 1.34 S for the median triangle
# and T = 1.57 S for 90% of them (UV density varies over the layout). 1.6 S, rounded up to a power of two, so
# the texture never holds less than the crop resolves; more would only add texels with interpolated values.
TEXELS_PER_CROP_PIXEL = 1.6
_MIN_TEXTURE, _MAX_TEXTURE = 32, 2048

# Canonical render: margin around the mean face (share of the image side), light direction in model space
# (from the upper left, towards the face), shading mix, colours.
_MARGIN = 0.05
_LIGHT = (-0.35, 0.45, 1.0)
_HEAT_SHADE = (0.75, 0.25)  # colour * (a + b * lambert): the colour scale stays readable
_NO_DATA_SHADE = (0.6, 0.4)
_NO_DATA_GREY = 160.0  # <= 160 everywhere, below the lightest shaded diverging colour near zero (~185)
_HATCH_PERIOD, _HATCH_DARKEN = 4, 0.65
_BACKGROUND = 255


@jax.jit  # host callers get one program, not an eager op per line
def mesh_to_crop(vertices_xyd: jax.typing.ArrayLike, crop_from_image: jax.typing.ArrayLike) -> jax.Array:
  """Maps mesh vertices from image to crop coordinates.

  x, y go through the 2x3 affine; depth is scaled by the affine's scale sqrt(|det A|) so it stays in the same
  units as x and y (the crop's pixels), which the visibility test and cos(view angle) rely on. Jittable and
  vmappable.

  Args:
    vertices_xyd: [..., V, 3] image x, y (pixels, centres at integers) and depth (larger = closer).
    crop_from_image: [..., 2, 3] affine mapping image xy to crop xy.

  Returns:
    [..., V, 3] float32 crop x, y and depth.
  """
  v = jnp.asarray(vertices_xyd, jnp.float32)
  a = jnp.asarray(crop_from_image, jnp.float32)
  linear, offset = a[..., :2], a[..., 2]
  xy = jnp.einsum("...vk,...jk->...vj", v[..., :2], linear) + offset[..., None, :]
  scale = jnp.sqrt(jnp.abs(jnp.linalg.det(linear)))
  return jnp.concatenate([xy, v[..., 2:] * scale[..., None, None]], axis=-1)


def crop_raster_bounds(face_width: float) -> tuple[int, int]:
  """`(max_box, max_oversized)` for rasterising a fitted face mesh in a model crop whose face is `face_width` px.

  A fitted face's triangles span a few crop pixels and scale with the face: measured on the 9 built-in photos with
  the embedded 3DMM, 4-8 px boxes on the gender model's 32 px crops, 8-17 on the 64 px age crops, 18-38 on the
  150 px identity chips, with at most 117 triangles over 0.175 x the face width. Larger triangles go through the
  rasteriser's exact per-triangle fallback (up to `max_oversized`), never dropped silently.
  """
  return max(8, math.ceil(0.175 * face_width)), max(64, math.ceil(2.0 * face_width))


def uv_density(model: MorphableModel) -> float:
  """UV units per model unit over the face (brows, eyes, nose, cheeks, mouth, chin): sqrt(UV area / 3-D area).

  Layouts differ a lot: the Surrey Face Model's UV map is the face alone (0.0044 per mm), MakeHuman's packs the
  whole head into 16% of the square (0.0011 per mm), so the same crop needs a 4x finer texture there.
  """
  tri = np.asarray(model.triangles)
  face_regions = [REGION_NAMES.index(r) for r in ("brows", "eyes", "nose", "cheeks", "mouth", "chin")]
  face = np.isin(np.asarray(model.regions)[tri].min(axis=1), face_regions)
  if not face.any():
    face = np.ones(len(tri), bool)
  uv = np.asarray(model.uv, np.float64)[tri[face]]
  xyz = np.asarray(model.mean, np.float64)[tri[face]]
  uv_area = (
    0.5
    * np.abs(
      (uv[:, 1, 0] - uv[:, 0, 0]) * (uv[:, 2, 1] - uv[:, 0, 1])
      - (uv[:, 2, 0] - uv[:, 0, 0]) * (uv[:, 1, 1] - uv[:, 0, 1])
    ).sum()
  )
  xyz_area = 0.5 * np.linalg.norm(np.cross(xyz[:, 1] - xyz[:, 0], xyz[:, 2] - xyz[:, 0]), axis=1).sum()
  return float(np.sqrt(uv_area / xyz_area))


# `uv_density` of the Surrey Face Model, on which `TEXELS_PER_CROP_PIXEL` was measured.
REFERENCE_UV_DENSITY = 0.004389


def default_texture_size(crop_size: int, model: MorphableModel | None = None) -> int:
  """Texture side T for a crop of `crop_size` pixels: the next power of two >= 1.6 x crop_size, in [32, 2048].

  A 32 or 64 px crop holds a few thousand pixels; a texture far finer than that only fills texels with
  interpolated copies of the same pixels (and makes CMS accumulators larger), while a coarser one throws
  crop detail away. See `TEXELS_PER_CROP_PIXEL` for the measurement behind the factor: 32 -> 64, 64 -> 128,
  112 -> 256, 224 -> 512 on the Surrey Face Model's layout. Given a `model`, the size is scaled by how much
  less of the UV square its face covers (`uv_density`), so texels per crop pixel stay the same: the embedded
  default's MakeHuman layout gets 4x the side.
  """
  if crop_size < 1:
    raise ValueError(f"crop_size must be positive, got {crop_size}")
  want = TEXELS_PER_CROP_PIXEL * crop_size
  if model is not None:
    want *= REFERENCE_UV_DENSITY / uv_density(model)
  return int(min(max(2 ** math.ceil(math.log2(want)), _MIN_TEXTURE), _MAX_TEXTURE))


# ------------------------------------------------------------------------------------------------ UV raster


class UVRaster(NamedTuple):
  """Each texel's triangle and barycentrics in the model's UV layout (a pytree; pass unbatched to vmap).

  Attributes:
    tri_id: [T, T] int32 triangle covering texel (i, j)'s centre, -1 outside the UV layout.
    bary: [T, T, 3] float32 barycentrics of the texel centre in that triangle (zeros outside).
  """

  tri_id: jax.Array
  bary: jax.Array

  @property
  def size(self) -> int:
    return self.tri_id.shape[-1]


def make_uv_raster(uv: jax.typing.ArrayLike, triangles: jax.typing.ArrayLike, size: int) -> UVRaster:
  """Rasterises a mesh's UV layout at size x size texels (host-side: picks `max_box`, checks completeness).

  Args:
    uv: [V, 2] u right, v up in [0, 1].
    triangles: [F, 3] int.
    size: texture side T.

  Returns:
    The `UVRaster`; where UV islands overlap, the smallest triangle id wins (`raster.rasterize_uv`).
  """
  uv = np.asarray(uv, np.float32)
  triangles = np.asarray(triangles, np.int32)
  max_box = raster.required_box(np.asarray(raster.uv_to_texel_xy(uv, size)), triangles, size, size)
  frags = raster.check_complete(raster.rasterize_uv(uv, triangles, size, max_box=max_box, chunk_size=1024))
  return UVRaster(tri_id=frags.tri_id, bary=frags.bary)


_UV_CACHE: collections.OrderedDict[tuple[str, int], UVRaster] = collections.OrderedDict()
_GEOMETRY_CACHE: collections.OrderedDict[tuple[str, int, float], _Geometry] = collections.OrderedDict()
_CACHE_SIZE = 8  # a few models x texture sizes per process


def _content_key(*arrays: jax.typing.ArrayLike) -> str:
  digest = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(np.asarray(a))
    digest.update(f"{a.dtype}{a.shape}".encode())
    digest.update(a.tobytes())
  return digest.hexdigest()


def _cached(cache: collections.OrderedDict, key, build):
  if key in cache:
    cache.move_to_end(key)
    return cache[key]
  value = cache[key] = build()
  while len(cache) > _CACHE_SIZE:
    cache.popitem(last=False)
  return value


# The version of what `make_uv_raster` and `_canonical_geometry` compute: bump it whenever either changes, so
# that the rasterisations kept in the cache folder are rebuilt.
_ON_DISK_VERSION = 1


def _on_disk(kind: str, key: tuple, build, fields: type, *, on_device: bool):
  """`build()` (a NamedTuple of arrays), kept in the cache folder under a hash of `key` as well as in the process:
  the canonical face's rasterisations are the same on every run of a model and size, and rebuilding them cost a
  second run ~2 s of rasterising. A file that is missing, unreadable or of another version is rebuilt; one that
  cannot be written is skipped. `on_device`: the fields are device arrays (as `build` makes them), else numpy."""
  digest = hashlib.sha256(repr((kind, key)).encode()).hexdigest()[:32]
  path = assets.cache_dir() / "canonical" / f"{kind}-{digest}.npz"
  try:
    arrays = fileio.load_npz_versioned(path, f"canonical_{kind}", _ON_DISK_VERSION)
    return fields(**{name: jax.device_put(arrays[name]) if on_device else arrays[name] for name in fields._fields})
  except (fileio.FormatError, KeyError):
    pass
  value = build()
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.asarray(getattr(value, name)) for name in fields._fields}
    fileio.save_npz_versioned(path, f"canonical_{kind}", _ON_DISK_VERSION, **arrays)
  except OSError:
    pass
  return value


def model_uv_raster(model: MorphableModel, size: int) -> UVRaster:
  """`make_uv_raster` of the model's UVs and triangles, cached per (model content, size) in this process and in
  the cache folder."""
  key = (_content_key(model.uv, model.triangles), int(size))
  build = lambda: _on_disk(
    "uv_raster", key, lambda: make_uv_raster(model.uv, model.triangles, size), UVRaster, on_device=True
  )
  return _cached(_UV_CACHE, key, build)


# ------------------------------------------------------------------------------------------------ sampling


def _bilinear(image: jax.Array, valid: jax.Array, x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Samples [H, W] `image` at xy (pixel centres at integers, clamped to the edge) over its `valid` pixels.

  Returns:
    (value, coverage): the bilinear interpolation renormalised over valid taps (0 where none), and the
    bilinear weight of the valid taps in [0, 1].
  """
  height, width = image.shape
  x0, y0 = jnp.floor(x), jnp.floor(y)
  fx, fy = x - x0, y - y0
  x0, y0 = x0.astype(jnp.int32), y0.astype(jnp.int32)
  total = jnp.zeros_like(x)
  coverage = jnp.zeros_like(x)
  for dy, wy in ((0, 1.0 - fy), (1, fy)):
    for dx, wx in ((0, 1.0 - fx), (1, fx)):
      i = jnp.clip(y0 + dy, 0, height - 1)
      j = jnp.clip(x0 + dx, 0, width - 1)
      w = wx * wy * valid[i, j]
      total += w * image[i, j]
      coverage += w
  value = jnp.where(coverage > 0, total / jnp.where(coverage > 0, coverage, 1.0), 0.0)
  return value, coverage


_bilinear_jit = jax.jit(_bilinear)  # for host callers (canonical renders): one program, not op-by-op dispatch


@functools.partial(jax.jit, static_argnames=("cosine_weight",))
def to_texture(
  heatmap: jax.typing.ArrayLike,
  fragments: raster.Fragments,
  mesh_in_crop: jax.typing.ArrayLike,
  uv_raster: UVRaster,
  triangles: jax.typing.ArrayLike,
  *,
  valid_heatmap: jax.typing.ArrayLike | None = None,
  cosine_weight: bool = False,
  normals_in_crop: jax.typing.ArrayLike | None = None,
  depth_tolerance: float = DEPTH_TOLERANCE,
) -> tuple[jax.Array, jax.Array]:
  """Pulls a crop's heatmap into the model's texture: the CIS texture and its per-texel weight.

  Jitted (`cosine_weight` static); vmappable over a batch of heatmaps, fragments and meshes with `uv_raster`
  and `triangles` unbatched: ``jax.vmap(to_texture, in_axes=(0, 0, 0, None, None))``. See the module docstring
  for the visibility test and the weights.

  Args:
    heatmap: [H, W] float saliency on the crop.
    fragments: `raster.rasterize(mesh_in_crop, triangles, H, W)`, the crop's z-buffer.
    mesh_in_crop: [V, 3] the fitted mesh in crop x, y and depth (larger = closer, in crop pixels; see
      `mesh_to_crop`).
    uv_raster: the model's `UVRaster` at the texture size T (`model_uv_raster`).
    triangles: [F, 3] int, the model's triangles (the ones both rasters used).
    valid_heatmap: [H, W] bool, pixels where the heatmap has data (e.g. patch count > 0); None: all.
    cosine_weight: multiply the weight by cos(view angle) = |n_z| of the unit normal in crop space.
    normals_in_crop: [V, 3] per-vertex normals in crop space for `cosine_weight` (interpolated per texel);
      None: the triangle's face normal.
    depth_tolerance: constant depth slack of the visibility test, crop pixels.

  Returns:
    (cis_texture [T, T] float32, weight [T, T] float32 in [0, 1]); 0 and 0 where there is no data.
  """
  heatmap = jnp.asarray(heatmap, jnp.float32)
  height, width = heatmap.shape
  mesh = jnp.asarray(mesh_in_crop, jnp.float32)
  triangles = jnp.asarray(triangles, jnp.int32)
  valid = jnp.ones(heatmap.shape, jnp.float32) if valid_heatmap is None else jnp.asarray(valid_heatmap, jnp.float32)

  has_tri = uv_raster.tri_id >= 0
  tri = jnp.maximum(uv_raster.tri_id, 0)
  corners = mesh[triangles[tri]]  # [T, T, 3 corners, 3 xyd]
  point = jnp.einsum("...k,...kc->...c", uv_raster.bary, corners)
  x, y, d = point[..., 0], point[..., 1], point[..., 2]

  normal = jnp.cross(corners[..., 1, :] - corners[..., 0, :], corners[..., 2, :] - corners[..., 0, :])
  front = normal[..., 2] < 0  # negative signed area in crop xy (y down)
  slope = jnp.hypot(normal[..., 0], normal[..., 1]) / jnp.maximum(jnp.abs(normal[..., 2]), 1e-30)

  col, row = jnp.floor(x + 0.5), jnp.floor(y + 0.5)  # nearest pixel centre
  inside = (col >= 0) & (col <= width - 1) & (row >= 0) & (row <= height - 1) & jnp.isfinite(d)
  j = jnp.clip(col, 0, width - 1).astype(jnp.int32)
  i = jnp.clip(row, 0, height - 1).astype(jnp.int32)
  tolerance = depth_tolerance + jnp.minimum(slope, MAX_SLOPE) * jnp.hypot(x - col, y - row)
  unoccluded = (fragments.tri_id[i, j] == tri) | (fragments.depth[i, j] <= d + tolerance)
  visible = has_tri & inside & front & unoccluded

  value, coverage = _bilinear(heatmap, valid, jnp.clip(x, -1.0, width), jnp.clip(y, -1.0, height))
  weight = jnp.where(visible, coverage, 0.0)
  if cosine_weight:
    if normals_in_crop is None:
      n = normal
    else:
      n = jnp.einsum("...k,...kc->...c", uv_raster.bary, jnp.asarray(normals_in_crop, jnp.float32)[triangles[tri]])
    cos = jnp.abs(n[..., 2]) / jnp.maximum(jnp.linalg.norm(n, axis=-1), 1e-30)
    weight = weight * cos
  weight = jnp.clip(weight, 0.0, 1.0)  # bilinear tap shares can sum to 1 + 1 ulp
  cis = jnp.where(weight > 0, value, 0.0)
  return cis, weight


@jax.jit
def outside_mesh_share(
  heatmap: jax.typing.ArrayLike, fragments: raster.Fragments, valid: jax.typing.ArrayLike | None = None
) -> jax.Array:
  """Share of the heatmap's absolute mass on crop pixels that no triangle covers (hair, background, neck).

  Mass is |heatmap| so negative evidence off the face counts too; for non-negative maps it is the plain sum.
  Jitted, vmappable.

  Args:
    heatmap: [H, W] saliency on the crop.
    fragments: the crop's `raster.Fragments` (tri_id -1 off the mesh).
    valid: [H, W] bool pixels with data (None: all).

  Returns:
    [] float32 in [0, 1]; 0 when the map has no mass.
  """
  mass = jnp.abs(jnp.asarray(heatmap, jnp.float32))
  if valid is not None:
    mass = jnp.where(jnp.asarray(valid, bool), mass, 0.0)
  total = jnp.sum(mass)
  outside = jnp.sum(jnp.where(fragments.tri_id < 0, mass, 0.0))
  return jnp.where(total > 0, outside / jnp.where(total > 0, total, 1.0), 0.0)


# ------------------------------------------------------------------------------------------ canonical render


class _Geometry(NamedTuple):
  face: np.ndarray  # [S, S] bool
  texel_xy: np.ndarray  # [S, S, 2] float32 uv per pixel as texel xy at texture side 1 (multiply by T)
  lambert: np.ndarray  # [S, S] float32 in [0, 1]
  cap: np.ndarray  # [S, S] bool face pixels that cap a hole (back faces seen through it): no data


class CanonicalSample(NamedTuple):
  """A texture sampled on the canonical face, per pixel of the rendered image.

  Attributes:
    value: [S, S] float32 saliency (0 where there is no data).
    weight: [S, S] float32 bilinearly sampled texture weight (0: no data).
    face: [S, S] bool pixels on the mean face.
    lambert: [S, S] float32 Lambert term max(n . l, 0) on the face.
    cap: [S, S] bool face pixels capping a hole in the mesh (e.g. the embedded head's eye sockets): shaded as a
      surface facing the camera, never with data (the texels behind a hole are the back of the head).
  """

  value: np.ndarray
  weight: np.ndarray
  face: np.ndarray
  lambert: np.ndarray
  cap: np.ndarray


def vertex_normals(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
  """Area-weighted unit vertex normals [V, 3] (outward for counter-clockwise triangles)."""
  a, b, c = (vertices[triangles[:, k]] for k in range(3))
  face_normals = np.cross(b - a, c - a)
  normals = np.zeros_like(vertices)
  for k in range(3):
    np.add.at(normals, triangles[:, k], face_normals)
  return normals / np.maximum(np.linalg.norm(normals, axis=-1, keepdims=True), 1e-12)


def _canonical_geometry(model: MorphableModel, size: int, margin: float) -> _Geometry:
  """Rasterises the mean shape frontal and orthographic into size x size, fitted with a margin (cached)."""

  def build() -> _Geometry:
    mean = np.asarray(model.mean, np.float64)
    triangles = np.asarray(model.triangles, np.int32)
    lo, hi = mean[:, :2].min(0), mean[:, :2].max(0)
    scale = size * (1 - 2 * margin) / max(float((hi - lo).max()), 1e-12)
    centre = (lo + hi) / 2
    xyd = np.stack(
      [
        (mean[:, 0] - centre[0]) * scale + size / 2 - 0.5,
        (centre[1] - mean[:, 1]) * scale + size / 2 - 0.5,  # y up in the model, down in the image
        mean[:, 2] * scale,
      ],
      axis=-1,
    ).astype(np.float32)
    box = raster.required_box(xyd, triangles, size, size)
    frags = raster.check_complete(raster.rasterize(xyd, triangles, size, size, max_box=box, chunk_size=1024))
    light = np.asarray(_LIGHT, np.float64)
    light /= np.linalg.norm(light)
    normals = vertex_normals(mean, triangles).astype(np.float32)
    attrs = np.concatenate([np.asarray(raster.uv_to_texel_xy(model.uv, 1)) + 0.5, normals], axis=-1)
    per_pixel = np.asarray(raster.interpolate(frags, attrs, triangles))
    n = per_pixel[..., 2:]
    n = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    tri_id = np.asarray(frags.tri_id)
    face = tri_id >= 0
    # Holes in the mesh (the embedded head's eye sockets, dropped as cavities by `morphable.default`) show the
    # inside of the head: back faces, whose texels are the back of the skull. Those pixels are capped: drawn as
    # a surface facing the camera with no data, so the canonical face has closed, neutral eyes (the no-data grey)
    # rather than holes showing another part of the map. Capping at render time keeps the model's mesh (and so
    # fitting and texture sampling) as it is; only what the frontal render shows changes.
    a, b, c = (mean[triangles[:, k]] for k in range(3))
    facing = np.cross(b - a, c - a)[:, 2] > 0  # counter-clockwise seen from outside, the camera on +z
    cap = face & ~facing[np.maximum(tri_id, 0)]
    lambert = np.where(cap, light[2], np.clip(n @ light, 0.0, 1.0))  # a cap faces the camera: n = (0, 0, 1)
    return _Geometry(
      face=face,
      texel_xy=per_pixel[..., :2],
      lambert=np.where(face, lambert, 0.0).astype(np.float32),
      cap=cap,
    )

  key = (_content_key(model.mean, model.triangles, model.uv), int(size), float(margin))
  return _cached(_GEOMETRY_CACHE, key, lambda: _on_disk("geometry", key, build, _Geometry, on_device=False))


def sample_canonical(
  model: MorphableModel,
  texture: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  size: int,
  *,
  margin: float = _MARGIN,
) -> CanonicalSample:
  """Samples a texture and its weight on the mean face, frontal, neutral, orthographic, at size x size.

  Each face pixel's uv comes from the vertex uvs (barycentric, `raster.interpolate`); the texture is sampled
  bilinearly there over texels with weight > 0 (weights interpolate; values renormalise over those texels), so
  texels without data (outside the UV layout, or hidden in every source) never leak in as zeros.

  Args:
    model: the morphable model (its mean, triangles and uv).
    texture: [T, T] values (a CIS, or a CMS mean).
    weight: [T, T] >= 0, 0 where there is no data.
    size: image side S.
    margin: share of S left free around the face on each side.

  Returns:
    `CanonicalSample` with [S, S] fields (numpy).
  """
  texture = np.asarray(texture, np.float32)
  weight = np.asarray(weight, np.float32)
  if texture.ndim != 2 or texture.shape[0] != texture.shape[1] or weight.shape != texture.shape:
    raise ValueError(f"need square [T, T] texture and weight of one shape, got {texture.shape}, {weight.shape}")
  geometry = _canonical_geometry(model, size, margin)
  t = texture.shape[0]
  xy = geometry.texel_xy * t - 0.5
  ones = np.ones(texture.shape, np.float32)
  x, y = np.asarray(xy[..., 0], np.float32), np.asarray(xy[..., 1], np.float32)
  # Weighted bilinear: value = sum(b w t) / sum(b w) over the four taps, weight = sum(b w). Numpy arguments go
  # to the compiled program as they are (no eager op per conversion).
  num, _ = _bilinear_jit(np.where(weight > 0, texture * weight, 0.0).astype(np.float32), ones, x, y)
  w, _ = _bilinear_jit(np.maximum(weight, 0.0).astype(np.float32), ones, x, y)
  num, w = np.asarray(num), np.asarray(w)
  mean = np.where(w > 0, num / np.where(w > 0, w, 1.0), 0.0)
  seen = geometry.face & ~geometry.cap
  return CanonicalSample(
    value=np.where(seen, mean, 0.0).astype(np.float32),
    weight=np.where(seen, w, 0.0).astype(np.float32),
    face=geometry.face,
    lambert=geometry.lambert,
    cap=geometry.cap,
  )


def render_canonical(
  model: MorphableModel,
  texture: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  size: int,
  *,
  vmax: float | None = None,
  signed: bool | None = None,
  min_weight: float = 0.0,
  margin: float = _MARGIN,
) -> np.ndarray:
  """Draws a texture on the canonical face: mean shape, frontal, neutral, orthographic, Lambert-shaded.

  Saliency is coloured with `viz.colorize` (diverging for signed maps) on the scale [-vmax, vmax] (or
  [0, vmax]); pass the same `vmax` to maps that must be compared. Face pixels without data (sampled weight
  <= `min_weight`) are drawn in a flat shaded grey at most 160 with darker diagonal hatching, never in a colour
  of the scale (zero saliency is black on the sequential scale and near-white, >= ~185, on the diverging one).
  Holes in the mesh (the embedded head's eye sockets) are capped and drawn as no data, so the eyes look closed
  (`CanonicalSample.cap`). The background is white.

  Args:
    model: the morphable model.
    texture: [T, T] values.
    weight: [T, T] >= 0, 0 where there is no data.
    size: image side S.
    vmax: end of the colour scale (default: the largest magnitude shown).
    signed: diverging colours (default: if any shown value is negative).
    min_weight: pixels whose sampled weight is at or below this count as no data (0: any data shows).
    margin: share of S left free around the face on each side.

  Returns:
    [S, S, 3] uint8 RGB.

  Example:
    Lines marked +SKIP are not run as doctests: it needs a copy of the Surrey Face Model, a fitted face and a heatmap.
    >>> rgb = render_canonical(model, cis, weight, 256, vmax=1.0)  # doctest: +SKIP
  """
  sample = sample_canonical(model, texture, weight, size, margin=margin)
  shown = sample.face & (sample.weight > min_weight)
  heat = viz.colorize(sample.value, valid=shown, signed=signed, vmax=vmax).astype(np.float64)
  lambert = sample.lambert[..., None].astype(np.float64)
  coloured = heat * (_HEAT_SHADE[0] + _HEAT_SHADE[1] * lambert)
  grey = _NO_DATA_GREY * (_NO_DATA_SHADE[0] + _NO_DATA_SHADE[1] * lambert)
  rows, cols = np.indices((size, size))
  hatch = ((rows + cols) % _HATCH_PERIOD == 0)[..., None]
  grey = np.where(hatch, grey * _HATCH_DARKEN, grey)
  rgb = np.where(shown[..., None], coloured, np.where(sample.face[..., None], grey, _BACKGROUND))
  return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------ texture -> crop


@functools.partial(jax.jit, static_argnames=("crop_size", "max_box", "max_oversized"))
def from_texture(
  texture: jax.typing.ArrayLike,
  weight: jax.typing.ArrayLike,
  vertices_in_crop: jax.typing.ArrayLike,
  triangles: jax.typing.ArrayLike,
  uvs: jax.typing.ArrayLike,
  crop_size: int,
  *,
  max_box: int = raster.DEFAULT_MAX_BOX,
  max_oversized: int = 64,
) -> tuple[jax.Array, jax.Array]:
  """Carries a texture (a CIS, a CMS mean) back onto a crop through a fitted mesh: the inverse of `to_texture`.

  The mesh is rasterised in the crop (`raster.rasterize`, z-buffered); every crop pixel whose visible triangle
  faces the camera gets the texture sampled bilinearly at its UV, interpolated from the vertex UVs with the
  pixel's barycentrics (exact for the orthographic projection). Sampling is over texels with data only, as in
  `sample_canonical`: value = sum(b w t) / sum(b w) over the four taps (b bilinear, w the texel's weight), so
  no-data texels never leak in as zeros. A pixel is valid iff it is on the mesh, its visible triangle faces the
  camera (back faces seen through holes, e.g. inside the mouth, have no texels in `to_texture` either) and some
  tap has weight > 0. Jitted (`crop_size`, `max_box` and `max_oversized` static); vmappable over meshes and
  textures.

  Args:
    texture: [T, T] values on the model's UV layout (texel (i, j) centred at u = (j + 0.5) / T,
      v = 1 - (i + 0.5) / T).
    weight: [T, T] >= 0, 0 where the texture has no data (a CMS's `valid` mask as float works).
    vertices_in_crop: [V, 3] the fitted mesh in crop x, y (pixels, centres at integers) and depth (larger =
      closer), e.g. `mesh_to_crop(fit.vertices_xyd, crop_from_image)`.
    triangles: [F, 3] int, the model's triangles.
    uvs: [V, 2] the model's vertex UVs (u right, v up, in [0, 1]).
    crop_size: S, the crop's side in pixels.
    max_box: the crop rasteriser's fast-path box bound (see `raster.rasterize`).
    max_oversized: triangles larger than the box rasterised by the exact fallback; any beyond are dropped and
      their pixels come out invalid (call `raster.check_complete` on your own rasterisation to be sure).

  Returns:
    (map [S, S] float32, 0 where invalid; valid [S, S] bool).

  Example:
    Lines marked +SKIP are not run as doctests: it needs a copy of the Surrey Face Model, a fitted face and a heatmap.
    >>> mesh = mesh_to_crop(fit.vertices_xyd, crop_from_image)  # doctest: +SKIP
    >>> cms_map, cms_valid = acc.mean("all")  # doctest: +SKIP
    >>> crop_map, valid = from_texture(np.nan_to_num(cms_map), cms_valid, mesh, model.triangles, model.uv, 32)
    ... # doctest: +SKIP
  """
  texture = jnp.asarray(texture, jnp.float32)
  weight = jnp.maximum(jnp.asarray(weight, jnp.float32), 0.0)
  mesh = jnp.asarray(vertices_in_crop, jnp.float32)
  triangles = jnp.asarray(triangles, jnp.int32)
  size = texture.shape[-1]
  frags = raster.rasterize(mesh, triangles, crop_size, crop_size, max_box=max_box, max_oversized=max_oversized)
  corners = mesh[triangles[jnp.maximum(frags.tri_id, 0)]]  # [S, S, 3, 3]
  normal_z = (corners[..., 1, 0] - corners[..., 0, 0]) * (corners[..., 2, 1] - corners[..., 0, 1]) - (
    corners[..., 2, 0] - corners[..., 0, 0]
  ) * (corners[..., 1, 1] - corners[..., 0, 1])
  front = (frags.tri_id >= 0) & (normal_z < 0)  # negative signed area in crop xy (y down): facing the camera
  texel_xy = raster.interpolate(frags, raster.uv_to_texel_xy(uvs, size), triangles)  # [S, S, 2]
  x = jnp.clip(texel_xy[..., 0], -1.0, size)
  y = jnp.clip(texel_xy[..., 1], -1.0, size)
  ones = jnp.ones(texture.shape, jnp.float32)
  data = weight > 0
  num, _ = _bilinear(jnp.where(data, texture * weight, 0.0), ones, x, y)
  den, _ = _bilinear(weight, ones, x, y)
  valid = front & (den > 0)
  value = jnp.where(valid, num / jnp.where(valid, den, 1.0), 0.0)
  return value, valid


# ------------------------------------------------------------------------------------------ regions


def region_labels(model: MorphableModel, size: int) -> np.ndarray:
  """`[T, T]` int32 region index (into `REGION_NAMES`) per texel: the region of the nearest vertex of the
  texel's triangle; -1 outside the UV layout."""
  uvr = model_uv_raster(model, size)
  tri_id, bary = np.asarray(uvr.tri_id), np.asarray(uvr.bary)
  nearest = np.asarray(model.triangles)[np.maximum(tri_id, 0), np.argmax(bary, axis=-1)]
  return np.where(tri_id >= 0, np.asarray(model.regions)[nearest], -1).astype(np.int32)


def region_shares(texture: np.ndarray, weight: np.ndarray, regions: np.ndarray) -> dict[str, float]:
  """Per `REGION_NAMES` region, its share of the texture's weighted |mass| (`regions` from `region_labels`;
  all 0 for a texture with no mass)."""
  mass = np.abs(texture) * weight
  total = float(mass.sum())
  return {
    region: (float(mass[regions == i].sum()) / total if total > 0 else 0.0) for i, region in enumerate(REGION_NAMES)
  }
