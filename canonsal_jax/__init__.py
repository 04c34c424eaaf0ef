"""canonsal_jax: Canonical Saliency Maps for deep face models, in JAX.

A JAX/Flax reimplementation of John, Balasubramanian and Jawahar, "Canonical Saliency Maps: Decoding Deep
Face Models" (IEEE T-BIOM 2021): occlusion saliency as one compiled XLA program, carried onto a 3D morphable
face model's texture and aggregated over datasets.

Submodules load on first use (`canonsal_jax.occlusion`, `canonsal_jax.models`, ...), so importing the package
is cheap and has no side effects. The core is this flat package; `canonsal_jax.evidence` (import it by name)
holds the experiments and statistics that judge its maps: it imports the core, never the other way round.
docs/ARCHITECTURE.md is the map.
"""

import importlib

__version__ = "0.1.0"

_SUBMODULES = (
  "assets",
  "attribution",
  "batched",
  "canonical",
  "cli",
  "cms",
  "config",
  "datasets",
  "drill_down",
  "faces",
  "fileio",
  "host",
  "incremental",
  "manifest",
  "models",
  "morphable",
  "occlusion",
  "outputs",
  "pipeline",
  "raster",
  "runs",
  "verification",
  "viz",
)

__all__ = ["__version__", *_SUBMODULES]


def _lazy_submodules(package: str, names: tuple[str, ...]):
  """A module `__getattr__` for `package`, loading its submodules `names` on first attribute access."""

  def getattr_(name: str):
    if name in names:
      return importlib.import_module(f"{package}.{name}")
    raise AttributeError(f"module {package!r} has no attribute {name!r}")

  return getattr_


__getattr__ = _lazy_submodules(__name__, _SUBMODULES)


def __dir__():
  return sorted(__all__)
