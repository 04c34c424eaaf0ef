"""Pretrained face models to explain, as Flax NNX ports with pure `apply(params, x)` functions.

Example:
  Lines marked +SKIP are not run as doctests: it needs the weights (fetched on first use) and a batch `x`.
  >>> from canonsal_jax import models
  >>> gender = models.load("gender")  # doctest: +SKIP
  >>> gender.logits(x)  # x: float32 [B, 32, 32, 3]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

from canonsal_jax.models.base import CROP_KINDS, SCORE_KINDS, CropSpec, FaceModel
from canonsal_jax.models.card import ModelCard, load_card


def from_onnx(path, card=None) -> FaceModel:
  """An ONNX face network as a `FaceModel` (see `canonsal_jax.models.onnx_import.from_onnx`)."""
  from canonsal_jax.models import onnx_import

  return onnx_import.from_onnx(path, card)


__all__ = ["CROP_KINDS", "SCORE_KINDS", "CropSpec", "FaceModel", "ModelCard", "from_onnx", "load", "load_card", "names"]


def _gender() -> FaceModel:
  from canonsal_jax.models import dlib_onnx

  return dlib_onnx.load_gender()


def _age() -> FaceModel:
  from canonsal_jax.models import dlib_onnx

  return dlib_onnx.load_age()


def _expression() -> FaceModel:
  from canonsal_jax.models import fer

  return fer.load_expression()


def _identity() -> FaceModel:
  from canonsal_jax.models import dlib_resnet

  return dlib_resnet.load_identity()


_REGISTRY: dict[str, Callable[[], FaceModel]] = {
  "gender": _gender,
  "age": _age,
  "expression": _expression,
  "identity": _identity,
}


def names() -> tuple[str, ...]:
  """The registered model names."""
  return tuple(_REGISTRY)


@functools.cache
def load(name: str) -> FaceModel:
  """Loads a registered face model, or a user's model given as ``"package.module:factory"``.

  Registered models' weights are fetched, verified and converted once, then cached. A user's factory is
  imported and called with no arguments; it must return a `FaceModel` built from the user's own JAX/Flax code
  (a pure `apply_fn(params, x)`, its params, input shape, preprocessing, labels and crop convention).

  Args:
    name: one of `names()`, or ``"package.module:factory"``.

  Raises:
    ValueError: `name` is unknown (the message lists the known names), or the factory cannot be imported or
      does not return a `FaceModel`.
  """
  if ":" in name:
    return _user_model(name)
  try:
    loader = _REGISTRY[name]
  except KeyError:
    raise ValueError(
      f"Unknown model {name!r}; known models: {', '.join(_REGISTRY)} (or give package.module:factory)"
    ) from None
  return loader()


def _user_model(spec: str) -> FaceModel:
  module_name, _, factory_name = spec.partition(":")
  try:
    factory = getattr(importlib.import_module(module_name), factory_name)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"model {spec!r}: cannot import {factory_name!r} from module {module_name!r} ({e})") from e
  model = factory()
  if not isinstance(model, FaceModel):
    raise ValueError(f"model {spec!r}: the factory returned {type(model).__name__}, not a canonsal_jax FaceModel")
  return model
