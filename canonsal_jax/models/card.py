"""The model card: what a network file alone does not say about how to feed it and read it.

An ONNX file or a PyTorch module says which arithmetic a face model does, not what it expects: the crop
(how the face is cut out of a photo), the pixel order and scaling, the names of its outputs and which score is
natural to explain. `ModelCard` holds exactly that; `canonsal_jax.models.from_onnx` and `from_torch` turn a
network plus its card into a `FaceModel`. A card is a Python dataclass or a JSON file of the same fields
(`load_card`), conventionally beside the model (`gender.onnx` -> `gender.json`).

Preprocessing, in order: the crop (`uint8 [h, w, 3]` RGB) is resized to `input_size` with PIL's bilinear
filter, reordered to `channel_order` (or averaged to grey), and normalised per channel as
``(pixels * pixel_scale - mean) / std``. Common cards: dlib's networks ``pixel_scale=1, mean=(122.782,
117.001, 104.298), std=(256, 256, 256)``; ImageNet-style PyTorch models ``pixel_scale=1/255, mean=(0.485,
0.456, 0.406), std=(0.229, 0.224, 0.225)``; ArcFace-style ``pixel_scale=1, mean=127.5, std=127.5`` (one value
applies to every channel).

Example:
  >>> from canonsal_jax.models import card
  >>> c = card.ModelCard(input_size=32, labels=("female", "male"), pixel_scale=1.0, mean=(122.782,), std=(256,))
  >>> c.score_kind  # two classes: the log-odds of the explained class
  'log_odds'
  >>> card.ModelCard.from_dict({"input_size": 0, "labels": ["a", "b"]})
  Traceback (most recent call last):
  ...
  ValueError: model card: field 'input_size' must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any

import numpy as np
from PIL import Image

from canonsal_jax.models.base import CROP_KINDS, SCORE_KINDS, CropSpec

__all__ = ["CHANNEL_ORDERS", "LAYOUTS", "OUTPUT_KINDS", "ModelCard", "card_beside", "load_card"]

CHANNEL_ORDERS = ("RGB", "BGR", "GRAY")
LAYOUTS = ("NCHW", "NHWC")
# What the network's chosen output holds: pre-softmax scores, class probabilities (a final softmax, which the
# importers strip or invert so that the `FaceModel` returns logits), or an identity embedding.
OUTPUT_KINDS = ("logits", "probabilities", "embedding")


@dataclasses.dataclass(frozen=True)
class ModelCard:
  """How to feed a face network and read its output.

  Attributes:
    input_size: side of the square input in pixels (the network's H and W).
    labels: one name per output class; empty for an embedding (its dimensions are named by the importer).
    channels: 3 (colour) or 1 (grey).
    channel_order: "RGB", "BGR" or "GRAY" (`channels == 1`).
    layout: the network's input layout, "NCHW" (PyTorch, most ONNX files) or "NHWC" (Keras, TensorFlow).
    pixel_scale: raw `0..255` pixels are multiplied by this first (1/255 for `[0, 1]` inputs).
    mean: subtracted per channel after scaling (one value: every channel).
    std: divides per channel after the mean (one value: every channel).
    crop: how the face crop is cut from a photo, one of `base.CROP_KINDS` ("dlib_chip" or "box").
    crop_padding: dlib's chip padding, or the box margin per side as a fraction of its width.
    landmarks: 5 or 68, the dlib landmark predictor the "dlib_chip" alignment uses.
    output: one of `OUTPUT_KINDS`.
    output_index: which of the network's outputs to explain (MTCNN's O-Net returns three).
    score: the natural score kind (one of `base.SCORE_KINDS`); default "cosine" for embeddings, "log_odds"
      for two classes, "log_softmax" for more.
    output_values: per-class values for an "expected_value" score (an age classifier's bin ages).
    name: the model's name in outputs and reports (default: the file's stem).
    source: where the weights came from (file, licence), for reports.
  """

  input_size: int
  labels: tuple[str, ...] = ()
  channels: int = 3
  channel_order: str = "RGB"
  layout: str = "NCHW"
  pixel_scale: float = 1.0 / 255.0
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  crop: str = "box"
  crop_padding: float = 0.0
  landmarks: int = 5
  output: str = "logits"
  output_index: int = 0
  score: str | None = None
  output_values: tuple[float, ...] | None = None
  name: str = ""
  source: str = ""

  def __post_init__(self):
    def bad(field: str, why: str, value: Any) -> ValueError:
      return ValueError(f"model card: field {field!r} {why}, got {value!r}")

    def positive_int(field: str) -> None:
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise bad(field, "must be a positive integer", value)

    positive_int("input_size")
    object.__setattr__(self, "labels", tuple(self.labels))
    if not all(isinstance(label, str) for label in self.labels):
      raise bad("labels", "must be a list of strings", self.labels)
    if self.channels not in (1, 3):
      raise bad("channels", "must be 1 or 3", self.channels)
    if self.channel_order not in CHANNEL_ORDERS:
      raise bad("channel_order", f"must be one of {CHANNEL_ORDERS}", self.channel_order)
    if (self.channel_order == "GRAY") != (self.channels == 1):
      raise bad(
        "channel_order", f"must be 'GRAY' exactly when channels is 1 (channels={self.channels})", self.channel_order
      )
    if self.layout not in LAYOUTS:
      raise bad("layout", f"must be one of {LAYOUTS}", self.layout)
    for field in ("pixel_scale", "crop_padding"):
      value = getattr(self, field)
      if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(field, "must be a finite number", value)
    if self.pixel_scale <= 0:
      raise bad("pixel_scale", "must be positive", self.pixel_scale)
    for field in ("mean", "std"):
      value = getattr(self, field)
      values = (value,) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
      try:
        values = tuple(float(v) for v in values)
      except (TypeError, ValueError):
        raise bad(field, "must be a number or a list of numbers", value) from None
      if len(values) not in (1, self.channels) or not all(math.isfinite(v) for v in values):
        raise bad(field, f"must hold 1 or {self.channels} finite numbers", value)
      if field == "std" and any(v == 0 for v in values):
        raise bad(field, "must not be 0", value)
      object.__setattr__(self, field, values)
    if self.crop not in CROP_KINDS:
      raise bad("crop", f"must be one of {CROP_KINDS}", self.crop)
    if self.crop_padding < 0:
      raise bad("crop_padding", "must be >= 0", self.crop_padding)
    if self.landmarks not in (5, 68):
      raise bad("landmarks", "must be 5 or 68", self.landmarks)
    if self.output not in OUTPUT_KINDS:
      raise bad("output", f"must be one of {OUTPUT_KINDS}", self.output)
    if (
      isinstance(self.output_index, bool)
      or not isinstance(self.output_index, (int, np.integer))
      or self.output_index < 0
    ):
      raise bad("output_index", "must be an integer >= 0", self.output_index)
    if self.output == "embedding":
      if self.labels:
        raise bad("labels", "must be empty for an embedding (it has dimensions, not classes)", self.labels)
      if self.score not in (None, "cosine"):
        raise bad("score", "must be 'cosine' for an embedding", self.score)
    else:
      if len(self.labels) < 2:
        raise bad("labels", "must name at least two classes", self.labels)
      if self.score == "cosine":
        raise bad("score", "'cosine' needs output 'embedding'", self.score)
    if self.score is not None and self.score not in SCORE_KINDS:
      raise bad("score", f"must be one of {SCORE_KINDS}", self.score)
    if self.output_values is not None:
      values = tuple(float(v) for v in self.output_values)
      if len(values) != len(self.labels):
        raise bad("output_values", f"must hold one value per label ({len(self.labels)})", self.output_values)
      object.__setattr__(self, "output_values", values)
    if self.score == "expected_value" and self.output_values is None:
      raise bad("output_values", "is needed by the 'expected_value' score", None)

  @property
  def score_kind(self) -> str:
    """The natural score: the card's `score`, else by output kind and number of classes."""
    if self.score is not None:
      return self.score
    if self.output == "embedding":
      return "cosine"
    return "log_odds" if len(self.labels) == 2 else "log_softmax"

  @property
  def input_shape(self) -> tuple[int, int, int]:
    """`(H, W, C)` of one preprocessed input, channels last (what a `FaceModel` takes)."""
    return (self.input_size, self.input_size, self.channels)

  @property
  def crop_spec(self) -> CropSpec:
    return CropSpec(self.crop, self.input_size, float(self.crop_padding), landmarks=self.landmarks)

  def preprocess(self, face: np.ndarray) -> np.ndarray:
    """`uint8 [h, w, 3]` RGB crop -> `float32 [input_size, input_size, channels]`, as the card says."""
    size = self.input_size
    if face.shape[:2] != (size, size):
      face = np.asarray(Image.fromarray(face).resize((size, size), Image.Resampling.BILINEAR))
    pixels = face.astype(np.float32)
    if self.channel_order == "BGR":
      pixels = pixels[..., ::-1]
    elif self.channel_order == "GRAY":
      pixels = pixels.mean(axis=-1, keepdims=True)
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    return ((pixels * np.float32(self.pixel_scale) - mean) / std).astype(np.float32)

  @classmethod
  def from_dict(cls, values: dict[str, Any], *, origin: str = "") -> ModelCard:
    """A card from a mapping of its fields (a parsed JSON card); unknown fields are refused by name."""
    where = f" {origin}" if origin else ""
    if not isinstance(values, dict):
      raise ValueError(f"model card{where}: expected a JSON object of fields, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
      raise ValueError(f"model card{where}: unknown field {unknown[0]!r}; known fields: {', '.join(sorted(known))}")
    if "input_size" not in values:
      raise ValueError(f"model card{where}: field 'input_size' is required")
    try:
      return cls(**values)
    except ValueError as e:
      if origin:
        raise ValueError(str(e).replace("model card:", f"model card {origin}:", 1)) from None
      raise

  def to_dict(self) -> dict[str, Any]:
    """The card's fields as JSON-ready values (what `from_dict` reads back)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def load_card(path: os.PathLike[str] | str) -> ModelCard:
  """Reads a JSON model card.

  Raises:
    ValueError: the file is missing, is not JSON, or a field is unknown or invalid (the message names it).
  """
  path = pathlib.Path(path)
  try:
    values = json.loads(path.read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise ValueError(
      f"model card {path} does not exist (give --model_card=PATH or put NAME.json beside the model)"
    ) from None
  except json.JSONDecodeError as e:
    raise ValueError(f"model card {path} is not valid JSON: {e}") from None
  return ModelCard.from_dict(values, origin=str(path))


def card_beside(model_path: os.PathLike[str] | str) -> pathlib.Path:
  """Where a model's card is looked for by default: the same path with the suffix `.json`."""
  return pathlib.Path(model_path).with_suffix(".json")
