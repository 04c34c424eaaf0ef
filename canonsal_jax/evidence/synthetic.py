"""Synthetic views of a real face: a fitted 3DMM textured from its photo, rendered at chosen poses.

The canonicalisation check (`canonicalisation`, README) needs the same face seen from several yaws with nothing else
changing. This module builds it from one photo:

1. `textured_face`: the fitted shape (`model.vertices(alpha, beta)`, model space) and a colour texture pulled
   from the photo through the fitted mesh with `canonical.to_texture` (inverse mapping with the same
   visibility test as a CIS, one colour channel at a time). Texels the photo does not see (the back of the
   head, the far side of the nose) are filled from the nearest seen texel in UV space, so a turned head shows
   plausible skin instead of holes.
2. `render`: the textured shape rotated to a (yaw, pitch, roll), projected orthographically (as the fitter's
   camera), rasterised with `raster.rasterize`, the texture sampled bilinearly at each pixel's uv, optionally
   Lambert-shaded by a light at the camera, on a plain background, supersampled and box-filtered so edges are
   anti-aliased (dlib's HOG detector and shape predictor read gradients).

`agreement` measures how well two maps agree on the points both have data for (Pearson and Spearman);
`compare_views` applies it to two CIS results of one face seen at two poses, both the 3-D way (CIS textures,
texels both views see) and the 2-D way (`warp2d`: heatmaps warped piecewise-affinely onto a landmark template).

Example:
  Lines marked +SKIP are not run as doctests: it fits and renders the astronaut (seconds, weights fetched on first use).
  >>> from canonsal_jax import config as config_lib, pipeline
  >>> from canonsal_jax.evidence import synthetic
  >>> fit = pipeline.fit_image(config_lib.default_config())  # the astronaut  # doctest: +SKIP
  >>> face = synthetic.textured_face(fit.model, fit.image, fit.fit)  # doctest: +SKIP
  >>> view = synthetic.render(face, np.radians([20.0, 0.0, 0.0]), scale=fit.fit.scale)  # doctest: +SKIP
  >>> view.image.shape  # doctest: +SKIP
  (384, 384, 3)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.ndimage
import scipy.spatial
import scipy.stats

from canonsal_jax import canonical, raster
from canonsal_jax.evidence import warp2d
from canonsal_jax.morphable import fitting
from canonsal_jax.morphable.model import REGION_NAMES, MorphableModel

__all__ = [
  "VIEW_ZOOM",
  "Agreement",
  "RenderedView",
  "TexturedFace",
  "ViewAgreement",
  "agreement",
  "compare_views",
  "crop_texture",
  "face_texels",
  "luminance",
  "render",
  "textured_face",
]

# Renders big enough for dlib's HOG detector at upsample 1 (faces from ~40 px) with a ~140 px face and room
# around it; a plain mid-grey background.
_DEFAULT_IMAGE_SIZE = (384, 384)
_DEFAULT_BACKGROUND = (128, 128, 128)
# Holes inside the face's silhouette (the default model's eye sockets, an open mouth on the Surrey model) are
# drawn in a dark cavity colour, as a mouth or a shadowed socket looks, not in the background's.
_DEFAULT_CAVITY = (45, 35, 35)
# Rendering supersamples each output pixel this many times per axis and box-filters: anti-aliased edges.
_DEFAULT_SUPERSAMPLE = 2
_BOX_STEP = 8  # rasteriser box bounds are rounded up to a multiple of this (fewer recompilations)
# The canonicalisation check renders at the photo's fitted scale times this: the astronaut's face (~110 px in
# the photo) becomes ~140 px wide in the render, with little texture upsampling.
VIEW_ZOOM = 1.3


class TexturedFace(NamedTuple):
  """A face shape in model space with a colour texture.

  Attributes:
    vertices: [V, 3] float32 model space (y up, looking along +z).
    triangles: [F, 3] int32, counter-clockwise seen from outside.
    uv: [V, 2] float32 texture coordinates (u right, v up).
    texture: [T, T, 3] float32 RGB in [0, 255], every texel filled.
    seen: [T, T] float32 the extraction weight (0: filled from a neighbour, not seen in the photo).
  """

  vertices: np.ndarray
  triangles: np.ndarray
  uv: np.ndarray
  texture: np.ndarray
  seen: np.ndarray


class RenderedView(NamedTuple):
  """One render of a `TexturedFace`.

  Attributes:
    image: [H, W, 3] uint8 RGB.
    vertices_xyd: [V, 3] float32 the mesh in image x, y (pixels, centres at integers) and depth (larger =
      closer), as `morphable.fit` reports a fitted mesh.
    yaw_pitch_roll: [3] radians of the pose rendered.
  """

  image: np.ndarray
  vertices_xyd: np.ndarray
  yaw_pitch_roll: np.ndarray


def _fill_unseen(texture: np.ndarray, weight: np.ndarray) -> np.ndarray:
  """Copies every unseen texel (weight 0) from the nearest seen one in texel space."""
  unseen = weight <= 0
  if not unseen.any():
    return texture
  if unseen.all():
    raise ValueError("the photo sees no texel of the mesh; nothing to texture it with")
  _, (rows, cols) = scipy.ndimage.distance_transform_edt(unseen, return_indices=True)
  return texture[rows, cols]


def textured_face(
  model: MorphableModel,
  image: np.ndarray,
  fit: Any,
  *,
  texture_size: int | None = None,
) -> TexturedFace:
  """The fitted face of a photo with its colours: shape from the fit, texture from the photo.

  Args:
    model: the morphable model that was fitted.
    image: [H, W, 3] uint8 the photo.
    fit: one face's `morphable.FitResult` (batch axis removed): its `alpha`, `beta`, `vertices_xyd` and
      `scale` are used.
    texture_size: texture side T; None: `canonical.default_texture_size` of the face's size in the photo (its
      model-space width times the fit's scale), so the texture resolves what the photo does.

  Returns:
    The `TexturedFace`.
  """
  rgb = np.asarray(image, np.float32)
  if rgb.ndim != 3 or rgb.shape[-1] != 3:
    raise ValueError(f"need an RGB image [H, W, 3], got shape {rgb.shape}")
  height, width = rgb.shape[:2]
  triangles = np.asarray(model.triangles, np.int32)
  mesh = np.asarray(fit.vertices_xyd, np.float32)
  if texture_size is None:
    face_px = float(np.ptp(np.asarray(model.mean)[:, 0])) * float(fit.scale)
    texture_size = canonical.default_texture_size(max(round(face_px), 1), model)
  # The box bound rounded up, so photos of similar size share one compiled rasteriser (it is a static argument).
  box = -(-raster.required_box(mesh[:, :2], triangles, height, width) // _BOX_STEP) * _BOX_STEP
  frags = raster.check_complete(raster.rasterize(mesh, triangles, height, width, max_box=box, chunk_size=1024))
  uvr = canonical.model_uv_raster(model, texture_size)
  per_channel = jax.vmap(canonical.to_texture, in_axes=(0, None, None, None, None))
  texture, weight = per_channel(jnp.moveaxis(jnp.asarray(rgb), -1, 0), frags, mesh, uvr, triangles)
  texture = np.moveaxis(np.asarray(texture), 0, -1)
  weight = np.asarray(weight[0])
  return TexturedFace(
    vertices=np.asarray(model.vertices(fit.alpha, fit.beta), np.float32),
    triangles=triangles,
    uv=np.asarray(model.uv, np.float32),
    texture=_fill_unseen(texture, weight).astype(np.float32),
    seen=weight.astype(np.float32),
  )


def _sample_rgb(texture: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Bilinear sample of a [T, T, 3] texture at texel xy (centres at integers, clamped to the edge)."""
  size = texture.shape[0]
  x = np.clip(x, 0.0, size - 1.0)
  y = np.clip(y, 0.0, size - 1.0)
  x0 = np.minimum(np.floor(x).astype(np.int64), size - 2)
  y0 = np.minimum(np.floor(y).astype(np.int64), size - 2)
  fx, fy = (x - x0)[..., None], (y - y0)[..., None]
  top = texture[y0, x0] * (1 - fx) + texture[y0, x0 + 1] * fx
  bottom = texture[y0 + 1, x0] * (1 - fx) + texture[y0 + 1, x0 + 1] * fx
  return top * (1 - fy) + bottom * fy


def render(
  face: TexturedFace,
  yaw_pitch_roll: np.ndarray,
  *,
  scale: float,
  image_size: tuple[int, int] = _DEFAULT_IMAGE_SIZE,
  background: tuple[int, int, int] = _DEFAULT_BACKGROUND,
  cavity: tuple[int, int, int] = _DEFAULT_CAVITY,
  ambient: float = 1.0,
  supersample: int = _DEFAULT_SUPERSAMPLE,
) -> RenderedView:
  """Renders a textured face at a pose, orthographic, centred in the image.

  The head turns about the centre of its bounding box, which lands on the image centre; the camera is the
  fitter's scaled orthographic one (`morphable.fitting.project`), so a fit of the render recovers the pose.

  Args:
    face: the `TexturedFace`.
    yaw_pitch_roll: [3] radians, `R = R_y(yaw) R_x(pitch) R_z(roll)` as `morphable.fit` reports; positive yaw
      turns the nose towards the image's right (+x).
    scale: pixels per model unit (the photo's `fit.scale` keeps the texture's resolution).
    image_size: (height, width) of the render.
    background: RGB of pixels the mesh does not cover.
    cavity: RGB of uncovered pixels enclosed by the face (holes of the mesh: eye sockets, an open mouth).
    ambient: shading = ambient + (1 - ambient) * max(n . l, 0) with the light at the camera; 1: flat (the
      texture's own shading only).
    supersample: samples per pixel and axis (box filter).

  Returns:
    The `RenderedView`.
  """
  ypr = np.asarray(yaw_pitch_roll, np.float32)
  rotation = np.asarray(fitting.rotation_from_yaw_pitch_roll(ypr), np.float32)
  vertices = face.vertices - (face.vertices.min(0) + face.vertices.max(0)) / 2
  height, width = image_size
  ss = int(supersample)
  big_h, big_w = height * ss, width * ss
  # In the supersampled frame, output pixel centre (j, i) sits at ss * (j, i) + (ss - 1) / 2.
  centre = np.array([(width - 1) / 2, (height - 1) / 2], np.float32)
  xyd = np.asarray(fitting.project(vertices, rotation, np.float32(scale), centre))
  big = xyd * ss + np.array([(ss - 1) / 2, (ss - 1) / 2, 0.0], np.float32)
  # Round the box bound up so nearby poses share one compiled rasteriser.
  box = -(-raster.required_box(big[:, :2], face.triangles, big_h, big_w) // _BOX_STEP) * _BOX_STEP
  frags = raster.check_complete(
    raster.rasterize(big, face.triangles, big_h, big_w, max_box=box, cull_backfaces=True, chunk_size=1024)
  )
  size = face.texture.shape[0]
  texel_xy = np.asarray(raster.uv_to_texel_xy(face.uv, size))
  normals = canonical.vertex_normals(vertices @ rotation.T, face.triangles)
  attrs = np.concatenate([texel_xy, normals], axis=-1)
  per_pixel = np.asarray(raster.interpolate(frags, attrs, face.triangles))
  covered = np.asarray(frags.tri_id) >= 0
  colour = _sample_rgb(face.texture, per_pixel[..., 0], per_pixel[..., 1])
  n = per_pixel[..., 2:]
  n_z = n[..., 2] / np.maximum(np.linalg.norm(n, axis=-1), 1e-12)  # light along +z, towards the viewer
  colour = colour * (ambient + (1.0 - ambient) * np.clip(n_z, 0.0, 1.0))[..., None]
  holes = scipy.ndimage.binary_fill_holes(covered) & ~covered
  canvas = np.where(covered[..., None], colour, np.asarray(background, np.float32))
  canvas = np.where(holes[..., None], np.asarray(cavity, np.float32), canvas)
  canvas = canvas.reshape(height, ss, width, ss, 3).mean(axis=(1, 3))
  return RenderedView(
    image=np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
    vertices_xyd=xyd.astype(np.float32),
    yaw_pitch_roll=ypr,
  )


class Agreement(NamedTuple):
  """How two maps agree on the points where both have data.

  Attributes:
    pearson: Pearson correlation of the values (NaN if fewer than 3 points or a constant map).
    spearman: Spearman rank correlation.
    num_points: points compared.
  """

  pearson: float
  spearman: float
  num_points: int


def agreement(a: np.ndarray, b: np.ndarray, valid: np.ndarray) -> Agreement:
  """Pearson and Spearman correlations of `a` and `b` over `valid` (same shapes, any)."""
  valid = np.asarray(valid, bool)
  x = np.asarray(a, np.float64)[valid]
  y = np.asarray(b, np.float64)[valid]
  if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
    return Agreement(float("nan"), float("nan"), int(x.size))
  return Agreement(float(np.corrcoef(x, y)[0, 1]), float(scipy.stats.spearmanr(x, y)[0]), int(x.size))


# The face proper in `face_texels`: what a face model sees of the 3DMM, without the head's back, ears and neck.
FACE_REGIONS = ("brows", "eyes", "nose", "cheeks", "mouth", "chin")


def face_texels(model: MorphableModel, size: int) -> np.ndarray:
  """[T, T] bool, texels in `FACE_REGIONS` (the region of the nearest corner of the texel's triangle)."""

  return np.isin(canonical.region_labels(model, size), [REGION_NAMES.index(r) for r in FACE_REGIONS])


class ViewAgreement(NamedTuple):
  """How the saliency of one face agrees between a reference view and another view.

  Attributes:
    cis: the CIS textures on the texels both views see (weight > 0 in both).
    cis_face: the same, on `face_texels` only.
    cis_hull: the same, on texels whose point on the reference's fitted mesh projects inside the reference's
      landmark hull: the 2-D template's domain, so the two paths are compared on the same part of the face.
    shared_share: share of the `face_texels` both views see.
    warp: the heatmaps warped onto the 2-D template, on template pixels both have data for.
    warp_share: share of the template's hull both warped maps cover.
  """

  cis: Agreement
  cis_face: Agreement
  cis_hull: Agreement
  shared_share: float
  warp: Agreement
  warp_share: float


def crop_texture(
  result: Any,
  crop_map: np.ndarray,
  valid: np.ndarray | None = None,
  *,
  vertices_xyd: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """Carries any map on a CIS result's crop into the texture, as `pipeline.cis_face` carries the heatmap.

  Args:
    result: a `pipeline.CISResult` (its crop transform, fitted mesh, model and texture size are used).
    crop_map: [S, S] values on its crop (e.g. the crop's own luminance, to test registration alone).
    valid: [S, S] bool pixels with data; None: all.
    vertices_xyd: [V, 3] a mesh in image coordinates to use instead of the fitted one (e.g. the true mesh of
      a render, to separate fitting error from the rest).

  Returns:
    (texture [T, T], weight [T, T]) float32.
  """
  occ = result.occlusion
  model = result.fit.model
  size = occ.crop.shape[0]
  vertices = result.fit.fit.vertices_xyd if vertices_xyd is None else vertices_xyd
  mesh = canonical.mesh_to_crop(vertices, occ.crop_from_image)
  max_box, max_oversized = canonical.crop_raster_bounds(occ.face_width)
  frags = raster.check_complete(
    raster.rasterize(mesh, model.triangles, size, size, max_box=max_box, max_oversized=max_oversized)
  )
  uvr = canonical.model_uv_raster(model, result.texture.shape[0])
  texture, weight = canonical.to_texture(crop_map, frags, mesh, uvr, model.triangles, valid_heatmap=valid)
  return np.asarray(texture, np.float32), np.asarray(weight, np.float32)


def _hull_texels(result: Any, model: MorphableModel, size: int) -> np.ndarray:
  """[T, T] bool: texels whose point on the result's fitted mesh lies inside the hull of its 68 landmarks."""
  uvr = canonical.model_uv_raster(model, size)
  tri_id, bary = np.asarray(uvr.tri_id), np.asarray(uvr.bary)
  mesh = np.asarray(result.fit.fit.vertices_xyd, np.float64)[:, :2]
  corners = mesh[np.asarray(model.triangles)[np.maximum(tri_id, 0)]]  # [T, T, 3, 2]
  xy = np.einsum("...k,...kc->...c", bary, corners)
  hull = scipy.spatial.Delaunay(np.asarray(result.occlusion.face.landmarks_xy, np.float64))
  return (tri_id >= 0) & (hull.find_simplex(xy.reshape(-1, 2)) >= 0).reshape(tri_id.shape)


def luminance(rgb: np.ndarray) -> np.ndarray:
  """[..., 3] RGB -> [...] float32 luma (ITU-R BT.601 weights)."""
  return np.asarray(rgb, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def compare_views(
  reference: Any,
  other: Any,
  model: MorphableModel,
  template: warp2d.Template,
  *,
  maps: tuple[Any, Any] | None = None,
) -> ViewAgreement:
  """Agreement of two CIS results (`pipeline.CISResult`) of one face, the 3-D way and the 2-D way.

  Args:
    reference: the reference view's result (e.g. the frontal render's).
    other: the other view's result, with a texture of the same size.
    model: the morphable model both were fitted with.
    template: the 2-D landmark template (e.g. `warp2d.make_template` of the reference's landmarks).
    maps: per view, `(crop_map [S, S], valid [S, S], texture [T, T], weight [T, T])` to compare instead of the
      heatmaps and CIS textures (e.g. the crops' luminance and its `crop_texture`); None: the saliency.

  Returns:
    The `ViewAgreement`.
  """
  if maps is None:
    maps = tuple((r.occlusion.heatmap, r.occlusion.count > 0, r.texture, r.weight) for r in (reference, other))
  (map_a, valid_a, tex_a, w_a), (map_b, valid_b, tex_b, w_b) = maps
  both = (w_a > 0) & (w_b > 0)
  face = face_texels(model, tex_a.shape[0])
  warped = [
    warp2d.warp_to_template(
      crop_map, r.occlusion.face.landmarks_xy, template, crop_from_image=r.occlusion.crop_from_image, valid=valid
    )
    for r, crop_map, valid in ((reference, map_a, valid_a), (other, map_b, valid_b))
  ]
  covered = (warped[0][1] > 0) & (warped[1][1] > 0)
  return ViewAgreement(
    cis=agreement(tex_a, tex_b, both),
    cis_face=agreement(tex_a, tex_b, both & face),
    cis_hull=agreement(tex_a, tex_b, both & _hull_texels(reference, model, tex_a.shape[0])),
    shared_share=float((both & face).sum() / max(face.sum(), 1)),
    warp=agreement(warped[0][0], warped[1][0], covered),
    warp_share=float(covered.sum() / max(template.inside.sum(), 1)),
  )
