"""Any PyTorch face network as a `FaceModel`: exported to ONNX once, then imported by `onnx_import`.

The module is traced by PyTorch's own ONNX exporter (in eval mode, batch axis dynamic) into a temporary file,
and the file becomes a `FaceModel` through `onnx_import.from_onnx`, so a PyTorch network gets everything an
ONNX one does: a pure `apply_fn(params, x)` with the weights as a params pytree, channels-last convolutions,
and the layer graph that makes its occlusion sweep incremental. Why this route and not a library that runs
PyTorch operators on JAX arrays (torchax): BENCHMARKS.md, "Imported models"; in short, the latest torchax
does not import with the PyTorch this project pins, and a traced ATen graph in NCHW has no layer geometry.

PyTorch is an optional dependency (`pip install canonsal_jax[torch]`); only this module imports it.

Example:
  Lines marked +SKIP are not run as doctests: they need PyTorch and a user's network.
  >>> from canonsal_jax import models
  >>> card = models.ModelCard(input_size=112, labels=("female", "male"), mean=(0.5,), std=(0.5,))
  >>> model = models.from_torch(my_net, card)  # doctest: +SKIP
"""

from __future__ import annotations

import os
import pathlib
import tempfile
import warnings
from typing import Any

from canonsal_jax.models import onnx_import
from canonsal_jax.models.base import FaceModel
from canonsal_jax.models.card import ModelCard

__all__ = ["DEFAULT_OPSET", "export_onnx", "from_torch"]

# The ONNX opset the export targets: 17 has every operator face networks use (LayerNormalization included)
# and is the newest the TorchScript exporter writes without warnings about later opsets.
DEFAULT_OPSET = 17


def export_onnx(
  module: Any, card: ModelCard, path: os.PathLike[str] | str, *, opset: int = DEFAULT_OPSET
) -> pathlib.Path:
  """Exports `module` (a `torch.nn.Module`, put in eval mode) to an ONNX file for the input its card describes.

  Raises:
    ValueError: PyTorch is not installed, `module` is not a `torch.nn.Module`, or it cannot be traced (the
      message gives PyTorch's reason).
  """
  try:
    import torch
  except ImportError:
    raise ValueError("from_torch needs PyTorch: pip install 'canonsal_jax[torch]'") from None
  if not isinstance(module, torch.nn.Module):
    raise ValueError(f"from_torch takes a torch.nn.Module, got {type(module).__name__}")
  size, channels = card.input_size, card.channels
  shape = (1, channels, size, size) if card.layout == "NCHW" else (1, size, size, channels)
  path = pathlib.Path(path)
  was_training = module.training
  module.eval()
  try:
    with torch.no_grad(), warnings.catch_warnings():
      warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes; failures raise below
      torch.onnx.export(
        module,
        (torch.zeros(shape),),
        str(path),
        input_names=["x"],
        dynamic_axes={"x": {0: "N"}},
        opset_version=opset,
        dynamo=False,
      )
  except Exception as e:  # the exporter raises many kinds (RuntimeError, TypeError, torch.jit errors)
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"{type(module).__name__} cannot be traced for export: {reason}") from e
  finally:
    module.train(was_training)
  return path


def from_torch(module: Any, card: ModelCard, *, opset: int = DEFAULT_OPSET) -> FaceModel:
  """A PyTorch face network as a `FaceModel` (weights copied: later changes to `module` are not seen).

  Args:
    module: a `torch.nn.Module` taking one image batch (`[B, C, H, W]`, or `[B, H, W, C]` with
      `card.layout == "NHWC"`) and returning `[B, K]` (or a tuple of outputs; `card.output_index` picks one).
    card: how to feed it and read it (`ModelCard`); `card.name` defaults to the module's class name.
    opset: the ONNX opset of the export.

  Returns:
    A `FaceModel` as `from_onnx` makes it; its params are keyed by the exported initializer names (PyTorch's
    parameter names where the exporter keeps them).

  Raises:
    ValueError: as `export_onnx` and `onnx_import.from_onnx`.
  """
  name = card.name or type(module).__name__
  source = card.source or f"PyTorch {type(module).__name__}, exported to ONNX opset {opset}"
  card = ModelCard.from_dict({**card.to_dict(), "name": name, "source": source})
  with tempfile.TemporaryDirectory(prefix="canonsal_torch_") as folder:
    path = export_onnx(module, card, pathlib.Path(folder) / f"{name}.onnx", opset=opset)
    return onnx_import.from_onnx(path, card)
