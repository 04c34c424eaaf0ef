"""Pretrained face models to explain, as Flax NNX ports with pure `apply(params, x)` functions.

Example:
  >>> from canonsal_jax import models
  >>> gender = models.load("gender")  # doctest: +SKIP
  >>> gender.logits(x)  # x: float32 [B, 32, 32, 3]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from canonsal_jax.models.base import CROP_KINDS, SCORE_KINDS, CropSpec, FaceModel

__all__ = ["CROP_KINDS", "SCORE_KINDS", "CropSpec", "FaceModel", "load", "names"]


def _gender() -> FaceModel:
  from canonsal_jax.models import dlib_onnx

  return dlib_onnx.load_gender()


def _age() -> FaceModel:
  from canonsal_jax.models import dlib_onnx

  return dlib_onnx.load_age()


def _expression() -> FaceModel:
  from canonsal_jax.models import fer

  return fer.load_expression()


_REGISTRY: dict[str, Callable[[], FaceModel]] = {
  "gender": _gender,
  "age": _age,
  "expression": _expression,
}


def names() -> tuple[str, ...]:
  """The registered model names."""
  return tuple(_REGISTRY)


@functools.cache
def load(name: str) -> FaceModel:
  """Loads a registered face model (weights fetched, verified and converted once, then cached).

  Args:
    name: one of `names()`.

  Raises:
    ValueError: `name` is unknown; the message lists the known names.
  """
  try:
    loader = _REGISTRY[name]
  except KeyError:
    raise ValueError(f"Unknown model {name!r}; known models: {', '.join(_REGISTRY)}") from None
  return loader()
