"""Per-face drivers: photo -> face -> model crop -> occlusion sweep (or a rival method) -> 3DMM fit -> CIS.

`explain_image` / `explain_face` give the heatmap on the model's crop and in the photo, `fit_image` the fitted
3DMM, `cis_image` / `cis_face` the Canonical Image Saliency; `sweep_plan` is what every face of a run shares
(the compiled sweep, its patch grid and target). `outputs` writes their results; `runs.run_cms` runs a
dataset through the same steps in batches (`batched`).

Example:
  Lines marked +SKIP are not run as doctests: it explains the astronaut and writes files (weights fetched on first use).
  >>> from canonsal_jax import config as config_lib, outputs, pipeline
  >>> cfg = config_lib.default_config()
  >>> result = pipeline.explain_image(cfg)  # the astronaut, the gender model  # doctest: +SKIP
  >>> outputs.write_occlusion(result, "/tmp/out")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from canonsal_jax import canonical, drill_down, faces, fileio, host, models, morphable, occlusion, raster
from canonsal_jax import config as config_lib

__all__ = [
  "CISResult",
  "FaceFit",
  "OcclusionResult",
  "StageClock",
  "SweepPlan",
  "cached_sweep",
  "check_settings",
  "cis_face",
  "cis_image",
  "detect_face",
  "detect_faces",
  "detection_cache",
  "drill_down_settings",
  "embed_face",
  "embed_image",
  "explain_face",
  "explain_image",
  "fit_image",
  "load_input",
  "load_morphable",
  "model_baseline",
  "model_sweep",
  "predicted_label",
  "sweep_plan",
  "sweep_record",
]

# Pixel colours that the "black" and "white" baselines stand for, before the model's preprocessing.
_NAMED_BASELINES = {"black": 0, "white": 255}


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
    face: the face explained.
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
    detection: every face found in the photo and which one is `face` (None when the caller gave the face).
    distances: an embedding model's (cosine score) Euclidean descriptor distances to the references explained
      against (one, or genuine and impostor); empty for classifiers. 0 for self-similarity.
    exact: `[S, S]` bool: pixels where `heatmap` is the exact sweep's (all True but for a drill-down sweep).
    sweep: how the heatmap was made (`sweep_record`): `{"mode": "exact"}`, or the drill-down's settings, the
      patches it ran and the share of covered pixels that are exact; `{"mode": <rival method>}` for a rival.
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
  detection: faces.Detection | None = None
  distances: tuple[float, ...] = ()
  exact: np.ndarray | None = None
  sweep: dict[str, Any] = dataclasses.field(default_factory=lambda: {"mode": "exact"})

  @property
  def is_embedding(self) -> bool:
    """An embedding model's result (cosine score): a similarity and distance, no class, label or probabilities."""
    return self.score_kind.startswith("cosine")


def model_baseline(model: models.FaceModel, baseline: Any) -> float | str | tuple[float, ...]:
  """Resolves a configured baseline into model input space ("black" = a black pixel, preprocessed); a per-channel
  list (as a config holds it) becomes a tuple, hashable for the compiled sweeps' caches."""
  if isinstance(baseline, str) and baseline in _NAMED_BASELINES:
    size = model.crop.size
    pixel = np.full((size, size, 3), _NAMED_BASELINES[baseline], np.uint8)
    return tuple(float(v) for v in model.preprocess(pixel)[size // 2, size // 2])
  if isinstance(baseline, str) and baseline not in occlusion.BASELINES:
    try:  # a number given on the command line (the key holds a string)
      return float(baseline)
    except ValueError:
      raise ValueError(f"baseline {baseline!r} is not a number or one of {', '.join(config_lib.BASELINES)}") from None
  return tuple(baseline) if isinstance(baseline, list) else baseline


def drill_down_settings(occ: ml_collections.ConfigDict) -> drill_down.Settings | None:
  """The `drill_down.Settings` of `config.occlusion.drill_down` when it is enabled (`middle_fraction` 0 without a
  middle stage), else None."""
  dd = occ.drill_down
  if not dd.enabled:
    return None
  middle = int(dd.middle_every)
  return drill_down.Settings(
    coarse_every=int(dd.coarse_every),
    fine_fraction=float(dd.fine_fraction),
    middle_every=middle,
    middle_fraction=float(dd.middle_fraction) if middle else 0.0,
    fine_rounds=int(dd.fine_rounds),
  )


@functools.lru_cache(maxsize=16)
def cached_sweep(
  apply_fn: Callable,
  patch_size: int,
  batch_size: int,
  baseline,
  score: occlusion.Score,
  reduce: str,
  drill: drill_down.Settings | None = None,
  devices: tuple | None = None,
) -> Callable:
  """The per-image sweep of these settings, built once per process: `occlusion.make_sweep`, or with `drill`
  `drill_down.make_drill_down_sweep` (whose `reduce` is always "mean"); `devices` as `make_sweep`'s (None: every
  local device). The single-photo scripts and the batched runs (`batched`) both take their sweep from here."""
  kwargs = {"patch_size": patch_size, "batch_size": batch_size, "baseline": baseline, "score": score}
  kwargs["devices"] = devices
  if drill is None:
    return occlusion.make_sweep(apply_fn, reduce=reduce, **kwargs)
  return drill_down.make_drill_down_sweep(apply_fn, **drill._asdict(), **kwargs)


def model_sweep(
  model: models.FaceModel, occ: ml_collections.ConfigDict, *, contrast: bool | None = None
) -> tuple[Callable, int, occlusion.Score]:
  """The compiled sweep for a model and the `config.occlusion` settings, shared by every image of a run: a
  `drill_down.make_drill_down_sweep` with `config.occlusion.drill_down.enabled`, else `occlusion.make_sweep`.

  `contrast` overrides what the settings say (a contrast class or an impostor photo).

  Returns:
    `(sweep, patch_size_px, score)`.
  """
  try:
    patch_size = occlusion.resolve_patch_size(occ.patch_size, model.crop.face_width)
  except ValueError as e:
    raise config_lib.ConfigError("occlusion.patch_size", occ.patch_size, str(e)) from None
  if contrast is None:
    contrast = occ.contrast >= 0 or bool(occ.impostor)
  score = occlusion.Score.for_model(model, kind=occ.score or None, contrast=contrast)
  try:
    baseline = model_baseline(model, occ.baseline)
  except ValueError as e:
    raise config_lib.ConfigError("occlusion.baseline", occ.baseline, str(e)) from None
  drill = drill_down_settings(occ)
  if drill is not None and occ.reduce != "mean":
    raise config_lib.ConfigError(
      "occlusion.reduce", occ.reduce, "must be mean with --config.occlusion.drill_down.enabled=True"
    )
  sweep = cached_sweep(model.apply_fn, patch_size, int(occ.batch_size), baseline, score, occ.reduce, drill)
  return sweep, patch_size, score


def _target(score: occlusion.Score, occ: ml_collections.ConfigDict, num_outputs: int):
  if occ.impostor and not occ.reference:
    raise config_lib.ConfigError("occlusion.impostor", occ.impostor, "needs --config.occlusion.reference too")
  if occ.reference:
    if score.kind != "cosine":
      needs = f"needs a cosine score (an embedding model such as identity), not {score.kind}"
      raise config_lib.ConfigError("occlusion.reference", occ.reference, needs)
    return None  # resolved from the reference photos by `sweep_plan`
  if score.kind == "cosine":
    return None  # self-similarity, or references given as the target
  for key in ("target", "contrast"):
    if not -1 <= occ[key] < num_outputs:
      raise config_lib.ConfigError(
        f"occlusion.{key}", occ[key], f"not a class index of this model (0..{num_outputs - 1}, or -1)"
      )
  if score.contrast:
    if occ.target < 0:
      raise config_lib.ConfigError("occlusion.contrast", occ.contrast, "needs --config.occlusion.target too")
    return np.array([occ.target, occ.contrast], np.int32)
  if score.kind in ("expected_value", "cosine") or occ.target < 0:
    return None
  return np.int32(occ.target)


def load_input(image: str | pathlib.Path | np.ndarray | None, name: str | None) -> tuple[str, np.ndarray]:
  """`(name, uint8 [H, W, 3])` of a photo given as a path, an array, or None (the astronaut).

  Raises:
    fileio.ImageError: the file cannot be read as an image, or the array is not one.
  """
  if image is None:
    return name or "astronaut", fileio.default_image()
  if isinstance(image, (str, pathlib.Path)):
    return name or str(image), fileio.load_image(image)
  name = name or "array"
  return name, fileio.validate_image(image, name)


def detect_faces(
  config, pixels: np.ndarray, name: str, detector: faces.FaceDetector | None, *, face: str | None = None
) -> faces.Detection:
  """Every face found with the config's detector settings (through the detection cache when it is on), and the
  one `face` chooses (default `config.face`: the face explained; a reference or impostor photo passes
  "largest", since the choice names a face of the photo explained). Logs one warning line when the chosen face
  may not be the one meant (`faces.Detection.warning`).

  With `config.landmarks` set, the photo explained (`face` None) is not detected: its annotated 68 landmarks
  (`datasets.read_landmarks`, matched by `name`) give its one face (`faces.annotated_detection`).

  Raises:
    faces.NoFaceError: no face was found (the message names `name`, the settings and the ones to try).
    faces.FaceChoiceError: `config.face` is an index or a box that matches none of the faces found.
    ValueError: `config.landmarks` holds no annotation for `name`, or a malformed one (naming file and row).
  """
  landmarks_xy = None
  if face is None and config.landmarks:
    from canonsal_jax import datasets

    landmarks_xy = datasets.read_landmarks(config.landmarks, [name], every_row=False).get(name)
    if landmarks_xy is None:
      raise ValueError(f"{name}: --config.landmarks={config.landmarks} holds no landmarks for this photo")
  cache = detection_cache() if config.detection_cache else None
  detection = host.find_detection(config, pixels, name, detector, face=face, landmarks_xy=landmarks_xy, cache=cache)
  warning = detection.warning(name)
  if warning is not None:
    logging.warning("%s", warning)
  return detection


def detect_face(
  config, pixels: np.ndarray, name: str, detector: faces.FaceDetector | None, *, face: str | None = None
) -> faces.Face:
  """The face `face` (default `config.face`) chooses (`detect_faces(...).face`)."""
  return detect_faces(config, pixels, name, detector, face=face).face


@functools.cache
def detection_cache() -> faces.DetectionCache:
  """The process's `faces.DetectionCache` in the cache folder (its `hits` and `misses` count this process's)."""
  return faces.DetectionCache()


def explain_image(
  config: ml_collections.ConfigDict,
  image: str | pathlib.Path | np.ndarray | None = None,
  *,
  name: str | None = None,
  detector: faces.FaceDetector | None = None,
) -> OcclusionResult:
  """Occlusion saliency of one face in one photo: the one `config.face` chooses (default: the largest).

  Args:
    config: a configuration as `canonsal_jax.config.default_config()`.
    image: a file path, a `uint8 [H, W, 3]` array, or None for the default image (scikit-image's astronaut).
    name: the input's name in errors and outputs (default: the path, or "astronaut").
    detector: a `faces.FaceDetector` to reuse across images.

  Raises:
    fileio.ImageError: the image cannot be read.
    faces.NoFaceError: no face is found.
    config.ConfigError: bad settings (checked before the photo is read).
    ValueError: non-finite model scores.
  """
  check_settings(config)
  name, pixels = load_input(image, name)
  detection = detect_faces(config, pixels, name, detector)
  return dataclasses.replace(explain_face(config, pixels, detection.face, name), detection=detection)


def check_settings(config: ml_collections.ConfigDict) -> models.FaceModel:
  """`config.validate`, then what needs the model (its crop, its classes): loads `config.model` and plans its
  sweep, so that a bad setting is said before any photo is read or face detected.

  Returns:
    The loaded model.

  Raises:
    config.ConfigError: naming the key at fault.
  """
  config_lib.validate(config)
  model = models.load_configured(config)
  sweep_plan(config, model)
  return model


@dataclasses.dataclass(frozen=True)
class SweepPlan:
  """What every face of a run shares: the compiled sweep, its patch grid and target."""

  sweep: Callable
  patch_size: int
  stride: int
  score: occlusion.Score
  centres: np.ndarray  # [N, 2] int32 (row, col)
  valid: np.ndarray  # [N] bool
  target: np.ndarray | None
  drill_down: drill_down.Settings | None = None  # a drill-down sweep's `drill_down_settings`


def sweep_record(plan: SweepPlan, result: Any) -> dict[str, Any]:
  """How a heatmap was made, as the outputs record it: `{"mode": "exact"}`, or for a drill-down sweep its
  lattices and budgets, the patches that ran (of the grid's) and `exact_share`, the share of the covered pixels
  whose value is the exact sweep's (the rest hold the mean of ran and estimated drops)."""
  if plan.drill_down is None:
    return {"mode": "exact"}
  covered = np.asarray(result.count) > 0
  exact = np.asarray(result.exact)
  return {
    "mode": "drill_down",
    **plan.drill_down._asdict(),
    "patches_run": int(np.sum(result.ran)),
    "num_patches": len(plan.centres),
    "exact_share": float(exact[covered].mean()) if covered.any() else 0.0,
  }


def sweep_plan(config: ml_collections.ConfigDict, model: models.FaceModel, target: Any = None) -> SweepPlan:
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
    raise config_lib.ConfigError("occlusion.stride", occ.stride, "must be an integer >= 1")
  if patch_size > size:
    at = f" ({patch_size} px at the model's face width of {model.crop.face_width:g} px)" if occ.patch_size < 1 else ""
    raise config_lib.ConfigError(
      "occlusion.patch_size",
      occ.patch_size,
      f"larger than the {model.name} model's {size} px crop{at}; give an odd size up to {size - 1 + size % 2} or a "
      "smaller fraction of the face width",
    )
  centres = occlusion.grid_centres(size, size, patch_size=patch_size, stride=occ.stride)
  configured = _target(score, occ, len(model.labels))  # validates the settings even where overridden
  if not override and occ.reference:
    refs = [_reference_embedding(config, model, path) for path in (occ.reference, occ.impostor) if path]
    target = np.stack(refs) if score.contrast else refs[0]
  elif not override:
    target = configured
  valid = np.ones(len(centres), bool)
  return SweepPlan(sweep, patch_size, int(occ.stride), score, centres, valid, target, drill_down_settings(occ))


def embed_face(model: models.FaceModel, pixels: np.ndarray, face: faces.Face, name: str) -> np.ndarray:
  """The model's outputs `[K]` (float64) for one detected face: an identity model's descriptor.

  Raises:
    ValueError: the outputs are not finite (naming `name`).
  """
  crop, _ = faces.crop_face(pixels, face, model.crop)
  outputs = np.asarray(model.logits(model.preprocess(crop)[None]), np.float64)[0]
  if not np.all(np.isfinite(outputs)):
    raise ValueError(f"{name}: the {model.name} model's outputs are not finite")
  return outputs


def embed_image(
  config: ml_collections.ConfigDict, image: str | pathlib.Path | np.ndarray, *, name: str | None = None
) -> np.ndarray:
  """`embed_face` of the chosen face (`config.face`) in a photo (`config.model`, detector settings from `config`)."""
  name, pixels = load_input(image, name)
  face = detect_face(config, pixels, name, None)
  return embed_face(models.load_configured(config), pixels, face, name)


def _reference_embedding(config: ml_collections.ConfigDict, model: models.FaceModel, path: str) -> np.ndarray:
  """A verification reference's embedding (float32 `[K]`), cached per model, photo and detector settings."""
  key = (
    config.model,
    config.model_card,
    str(path),
    config.detector,
    config.upsample,
    config.detector_threshold,
  )
  if key not in _REFERENCES:
    name, pixels = load_input(str(path), f"reference photo {path}")
    face = detect_face(config, pixels, name, None, face="largest")
    _REFERENCES[key] = embed_face(model, pixels, face, name).astype(np.float32)
  return _REFERENCES[key]


_REFERENCES: dict[tuple, np.ndarray] = {}


def _attribution_result(
  config: ml_collections.ConfigDict, model: models.FaceModel, plan: SweepPlan, x: np.ndarray
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
  outputs = model.logits(x[None])
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


def predicted_label(model: models.FaceModel, score: occlusion.Score, result: occlusion.SweepResult) -> tuple[str, int]:
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
  model = models.load_configured(config)
  crop, crop_from_image = faces.crop_face(pixels, face, model.crop)
  plan = sweep_plan(config, model, target)
  if config.explainer == "occlusion":
    result = occlusion.check_finite(
      jax.device_get(plan.sweep(model.params, model.preprocess(crop), plan.centres, plan.valid, plan.target)), name
    )
    how = sweep_record(plan, result)
  else:
    result = _attribution_result(config, model, plan, model.preprocess(crop))
    result = occlusion.check_finite(jax.device_get(result), name)
    plan = dataclasses.replace(plan, patch_size=0, stride=0, centres=plan.centres[:0])
    how = {"mode": config.explainer}
  outputs = np.asarray(result.outputs, np.float64)
  if plan.score.kind == "cosine":  # a descriptor, not class scores: no probabilities; distances to the references
    probabilities = np.zeros((0,), np.float64)
    references = outputs[None] if plan.target is None else np.asarray(plan.target, np.float64).reshape(-1, len(outputs))
    distances = tuple(float(np.linalg.norm(outputs - r)) for r in references)
  else:
    probabilities = np.exp(outputs - outputs.max())
    probabilities /= probabilities.sum()
    distances = ()
  label, target = predicted_label(model, plan.score, result)
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
    distances=distances,
    exact=np.asarray(result.exact) if how["mode"] == "drill_down" else np.ones(heatmap.shape, bool),
    sweep=how,
  )


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
  """A 3DMM fitted to one face of a photo.

  Attributes:
    name: the input's name.
    image: `uint8 [H, W, 3]` the photo.
    face: the detected face (box and 68 landmarks).
    model: the morphable model.
    fit: the `morphable.FitResult` of this face, batch axis removed, as numpy arrays.
    detection: every face found and which one is `face` (None when the caller gave the face).
  """

  name: str
  image: np.ndarray
  face: faces.Face
  model: morphable.MorphableModel
  fit: Any
  detection: faces.Detection | None = None


def fit_image(
  config: ml_collections.ConfigDict,
  image: str | pathlib.Path | np.ndarray | None = None,
  *,
  name: str | None = None,
  detector: faces.FaceDetector | None = None,
) -> FaceFit:
  """Detects the face `config.face` chooses and fits `config.morphable_model` to its 68 landmarks.

  Raises:
    fileio.ImageError: the image cannot be read.
    faces.NoFaceError: no face is found.
    FileNotFoundError: the morphable model is missing.
    config.ConfigError: bad settings (checked before the photo is read).
  """
  config_lib.validate(config)
  model = load_morphable(config.morphable_model)
  name, pixels = load_input(image, name)
  detection = detect_faces(config, pixels, name, detector)
  face = detection.face
  result = morphable.fit(model, face.landmarks_xy[None], image_size=pixels.shape[:2])
  result = jax.tree.map(lambda a: np.asarray(a)[0], result)
  if not np.all(np.isfinite(result.vertices_xyd)):
    raise ValueError(f"{name}: the 3DMM fit diverged (non-finite vertices)")
  return FaceFit(name=name, image=pixels, face=face, model=model, fit=result, detection=detection)


class StageClock:
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
  clock = StageClock(timings)
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
  region_mass = canonical.region_shares(texture, weight, canonical.region_labels(model3d, texture_size))
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
  """Canonical Image Saliency of one face in a photo (None: the astronaut): the one `config.face` chooses.

  Raises:
    fileio.ImageError, faces.NoFaceError, FileNotFoundError (a missing 3DMM), config.ConfigError (bad settings,
    checked before the photo is read), ValueError (NaN scores).
  """
  check_settings(config)
  load_morphable(config.morphable_model)
  name, pixels = load_input(image, name)
  detection = detect_faces(config, pixels, name, detector)
  result = cis_face(config, pixels, detection.face, name, target=target)
  return dataclasses.replace(
    result,
    occlusion=dataclasses.replace(result.occlusion, detection=detection),
    fit=dataclasses.replace(result.fit, detection=detection),
  )
