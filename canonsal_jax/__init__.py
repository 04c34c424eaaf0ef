"""canonsal_jax: Canonical Saliency Maps for deep face models, in JAX.

A JAX/Flax reimplementation of John, Balasubramanian and Jawahar, "Canonical Saliency Maps: Decoding Deep
Face Models" (IEEE T-BIOM 2021): occlusion saliency as one compiled XLA program, carried onto a 3D morphable
face model's texture and aggregated over datasets.

Submodules load on first use (`canonsal_jax.occlusion`, `canonsal_jax.models`, ...), so importing the package
is cheap and has no side effects.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
  "assets",
  "attribution",
  "bench",
  "canonical",
  "cms",
  "config",
  "datasets",
  "faces",
  "io",
  "models",
  "morphable",
  "occlusion",
  "pipeline",
  "raster",
  "synthetic",
  "viz",
  "warp2d",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str):
  if name in _SUBMODULES:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
  return sorted(__all__)
