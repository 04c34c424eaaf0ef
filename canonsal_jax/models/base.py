"""The `FaceModel` interface: a pretrained face network as pure functions over a weight pytree."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

__all__ = ["CROP_KINDS", "SCORE_KINDS", "CropSpec", "FaceModel"]

# How a model's face crop is made from a photo (see `canonsal_jax.faces`):
#   "dlib_chip": `dlib.get_face_chip_details(shape, size, padding)` on the predictor's landmarks (a similarity
#                transform that levels the eyes), as dlib's age and gender networks were trained;
#   "box":       the detector's box grown by `padding` times its width on every side, axis-aligned, resized.
CROP_KINDS = ("dlib_chip", "box")

# Score kinds a model may name as its natural default; `canonsal_jax.occlusion` implements them.
SCORE_KINDS = ("logit", "log_softmax", "log_odds", "probability", "expected_value", "cosine")


@dataclasses.dataclass(frozen=True)
class CropSpec:
  """The face crop a model expects.

  Attributes:
    kind: one of `CROP_KINDS`.
    size: side of the square crop in pixels (the model's input height and width).
    padding: for "dlib_chip", dlib's chip padding; for "box", the margin per side as a fraction of box width.
    landmarks: which dlib landmark predictor the alignment uses (5 or 68 points).
  """

  kind: str
  size: int
  padding: float
  landmarks: int = 5

  def __post_init__(self):
    if self.kind not in CROP_KINDS:
      raise ValueError(f"crop kind {self.kind!r} is not one of {CROP_KINDS}")
    if self.landmarks not in (5, 68):
      raise ValueError(f"landmarks must be 5 or 68, got {self.landmarks}")

  @property
  def face_width(self) -> float:
    """The width in crop pixels of the face (the detector box or dlib's landmark-normalised face square).

    Patch sizes given relative to the face (the paper's 15 px on a 224 px face) resolve against this.
    """
    return self.size / (1.0 + 2.0 * self.padding)


@dataclasses.dataclass(frozen=True, eq=False)
class FaceModel:
  """A pretrained face model to explain.

  `apply_fn(params, x)` is pure and jittable: the weights are an argument, never closure constants, so one
  compiled program serves new weights. Inputs are `float32 [B, H, W, C]` made by `preprocess`; outputs are
  `[B, num_outputs]` pre-softmax logits (or embeddings for `score == "cosine"`).

  Attributes:
    name: registry name (`canonsal_jax.models.load(name)`).
    labels: one name per output (class names, or age bins' values as text).
    input_shape: (H, W, C) of one preprocessed input.
    apply_fn: `(params, x[B, H, W, C]) -> [B, num_outputs]`.
    params: the weight pytree.
    preprocess_fn: `(face_rgb_uint8[h, w, 3]) -> float32[H, W, C]`; resizes, converts colour and normalises
      as the model's authors do.
    crop: how the face crop is made from a photo.
    score: the natural default score kind (one of `SCORE_KINDS`).
    output_values: per-output values for "expected_value" scores (the age bins), else None.
    source: where the weights came from (file, package, licence), for reports.
    features_fn: optional `(params, x[B, H, W, C]) -> [B, h, w, D]`, the last convolutional feature map (what
      Grad-CAM, Grad-CAM++ and Score-CAM weigh, see `canonsal_jax.attribution`); None where the model does not
      expose it. Given together with `head_fn`.
    head_fn: optional `(params, features[B, h, w, D]) -> [B, num_outputs]`, the rest of the network, so that
      `head_fn(params, features_fn(params, x))` is `apply_fn(params, x)`.
  """

  name: str
  labels: tuple[str, ...]
  input_shape: tuple[int, int, int]
  apply_fn: Callable[[Any, jax.Array], jax.Array]
  params: Any
  preprocess_fn: Callable[[np.ndarray], np.ndarray]
  crop: CropSpec
  score: str
  output_values: tuple[float, ...] | None = None
  source: str = ""
  features_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  head_fn: Callable[[Any, jax.Array], jax.Array] | None = None

  def __post_init__(self):
    if (self.features_fn is None) != (self.head_fn is None):
      raise ValueError("features_fn and head_fn are given together or not at all")
    if self.score not in SCORE_KINDS:
      raise ValueError(f"score {self.score!r} is not one of {SCORE_KINDS}")
    if self.score == "expected_value" and self.output_values is None:
      raise ValueError("an expected_value score needs output_values")
    if self.crop.size != self.input_shape[0] or self.input_shape[0] != self.input_shape[1]:
      raise ValueError(f"crop size {self.crop.size} does not match input shape {self.input_shape}")
    # One compiled forward pass per model for `logits` (an eager `apply_fn` call dispatches, and at a process's
    # first call compiles, every layer's ops one by one: ~50 small programs for the identity network).
    object.__setattr__(self, "_jitted_apply", jax.jit(self.apply_fn))

  @property
  def num_outputs(self) -> int:
    return len(self.labels)

  @property
  def layer_graph(self) -> Any:
    """The model's `canonsal_jax.incremental.LayerGraph` where its `apply_fn` carries one (the ported models'
    do; `occlusion.make_sweep` then runs incremental occlusion), else None."""
    return getattr(self.apply_fn, "layer_graph", None)

  def apply(self, params: Any, x: jax.typing.ArrayLike) -> jax.Array:
    """Pure forward pass: `x[B, H, W, C]` -> `[B, num_outputs]`."""
    return self.apply_fn(params, x)

  def logits(self, x: jax.typing.ArrayLike) -> jax.Array:
    """Forward pass with the model's own weights, one compiled program: `x[B, H, W, C]` -> `[B, num_outputs]`."""
    return self._jitted_apply(self.params, x)

  def preprocess(self, face_rgb_uint8: np.ndarray) -> np.ndarray:
    """Crop image (`uint8 [h, w, 3]` RGB) -> model input `float32 [H, W, C]`.

    Raises:
      ValueError: the crop is not a non-empty uint8 RGB image.
    """
    face = np.asarray(face_rgb_uint8)
    if face.dtype != np.uint8 or face.ndim != 3 or face.shape[2] != 3 or min(face.shape[:2]) < 1:
      raise ValueError(f"{self.name}: preprocess expects a uint8 RGB crop [h, w, 3], got {face.dtype} {face.shape}")
    out = np.asarray(self.preprocess_fn(face), dtype=np.float32)
    if out.shape != self.input_shape:
      raise AssertionError(f"{self.name}: preprocess gave {out.shape}, expected {self.input_shape}")
    return out
