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
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from canonsal_jax import faces, io, models, morphable, occlusion, raster, viz

__all__ = [
  "FaceFit",
  "OcclusionResult",
  "explain_image",
  "fit_image",
  "load_morphable",
  "model_baseline",
  "model_sweep",
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
  model = models.load(config.model)
  face = _largest_face(config, pixels, name, detector)
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
