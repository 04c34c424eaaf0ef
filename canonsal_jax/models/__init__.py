"""Face models to explain: the built-in ports (Flax NNX) and any ONNX file or PyTorch module, each a
`FaceModel` with a pure `apply_fn(params, x)`.

Example:
  Lines marked +SKIP are not run as doctests: it needs the weights (fetched on first use) and a batch `x`.
  >>> from canonsal_jax import models
  >>> gender = models.load("gender")  # doctest: +SKIP
  >>> gender.logits(x)  # x: float32 [B, 32, 32, 3]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import pathlib
import sys
from collections.abc import Callable

from canonsal_jax.models.base import CROP_KINDS, SCORE_KINDS, CropSpec, FaceModel
from canonsal_jax.models.card import ModelCard, load_card


def from_onnx(path, card=None) -> FaceModel:
  """An ONNX face network as a `FaceModel` (see `canonsal_jax.models.onnx_import.from_onnx`)."""
  from canonsal_jax.models import onnx_import

  return onnx_import.from_onnx(path, card)


def from_torch(module, card: ModelCard) -> FaceModel:
  """A PyTorch face network as a `FaceModel` (see `canonsal_jax.models.torch_import.from_torch`)."""
  from canonsal_jax.models import torch_import

  return torch_import.from_torch(module, card)


__all__ = [
  "BUILTIN",
  "CROP_KINDS",
  "SCORE_KINDS",
  "CropSpec",
  "FaceModel",
  "ModelCard",
  "from_onnx",
  "from_torch",
  "load",
  "load_card",
  "load_configured",
  "names",
  "register",
]


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


BUILTIN = tuple(_REGISTRY)  # the built-in models' names


def names() -> tuple[str, ...]:
  """The registered model names: the built-in ones, then those given to `register`."""
  return tuple(_REGISTRY)


def register(name: str, factory: Callable[[], FaceModel]) -> None:
  """Makes `load(name)` (and so `config.model = name` in every pipeline) call `factory`, once.

  For a model made in the caller's own code, e.g. ``register("mine", lambda: from_torch(net, card))``.

  Raises:
    ValueError: `name` is a built-in model's, or has the form of a path or module spec.
  """
  if name in BUILTIN:
    raise ValueError(f"model name {name!r} is a built-in model's; choose another")
  if not name or ":" in name:
    raise ValueError(f"model name {name!r} must be non-empty and without ':' (that form names files and modules)")
  _REGISTRY[name] = factory
  load.cache_clear()


def load_configured(config) -> FaceModel:
  """`load(config.model, card=config.model_card)`: the model a configuration names."""
  return load(config.model, config.model_card or None)


@functools.cache
def load(name: str, card: str | None = None) -> FaceModel:
  """Loads a built-in face model, an ONNX file, or a user's factory.

  Built-in models' weights are fetched, verified and converted once, then cached. An ONNX file is imported by
  `from_onnx` with its model card. A user's factory is called with no arguments and must return a `FaceModel`
  (for a PyTorch module, one made by `from_torch`; for JAX/Flax code, a pure `apply_fn(params, x)`, its params,
  input shape, preprocessing, labels and crop convention).

  Args:
    name: one of `names()`; ``"onnx:PATH"``; ``"PATH.py:factory"`` (a file, no `PYTHONPATH` needed); or
      ``"package.module:factory"``.
    card: the JSON model card of an ONNX file (default: beside it, `PATH` with the suffix `.json`).

  Raises:
    ValueError: `name` is unknown (the message lists the known names and forms), the file or factory cannot
      be read or imported, or the factory does not return a `FaceModel`; a card given for a model that is not
      an ONNX file.
  """
  if name.startswith("onnx:"):
    return from_onnx(name.removeprefix("onnx:"), card)
  if card:
    raise ValueError(f"model {name!r}: a model card applies to onnx:PATH models only (remove --model_card)")
  if ":" in name:
    return _user_model(name)
  try:
    loader = _REGISTRY[name]
  except KeyError:
    raise ValueError(
      f"Unknown model {name!r}; known models: {', '.join(_REGISTRY)}; or give onnx:PATH, PATH.py:factory or "
      "package.module:factory"
    ) from None
  return loader()


def _user_model(spec: str) -> FaceModel:
  target, _, factory_name = spec.rpartition(":")
  if target.endswith(".py"):
    factory = _factory_from_file(spec, pathlib.Path(target), factory_name)
  else:
    try:
      factory = getattr(importlib.import_module(target), factory_name)
    except (ImportError, AttributeError) as e:
      raise ValueError(f"model {spec!r}: cannot import {factory_name!r} from module {target!r} ({e})") from e
  model = factory()
  if not isinstance(model, FaceModel):
    raise ValueError(f"model {spec!r}: the factory returned {type(model).__name__}, not a canonsal_jax FaceModel")
  return model


def _factory_from_file(spec: str, path: pathlib.Path, factory_name: str):
  """`factory_name` from the Python file `path`, loaded as a module of its own (no `sys.path` change)."""
  if not path.is_file():
    raise ValueError(f"model {spec!r}: {path} does not exist")
  module_name = f"canonsal_jax_user_model_{abs(hash(str(path.resolve())))}"
  spec_obj = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(spec_obj)
  sys.modules[module_name] = module  # dataclasses and pickling look a module up by name
  try:
    spec_obj.loader.exec_module(module)
  except Exception as e:
    del sys.modules[module_name]
    raise ValueError(f"model {spec!r}: {path} fails to import ({type(e).__name__}: {e})") from e
  factory = getattr(module, factory_name, None)
  if not callable(factory):
    raise ValueError(f"model {spec!r}: {path} defines no function {factory_name!r}")
  return factory
