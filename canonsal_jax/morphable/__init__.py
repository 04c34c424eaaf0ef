"""3D morphable face models: the `MorphableModel` pytree, its loaders and the batched fitter."""

from canonsal_jax.morphable.default import default_model
from canonsal_jax.morphable.fitting import DEFAULT_FIT_CONFIG, FitConfig, FitResult, fit
from canonsal_jax.morphable.model import NUM_LANDMARKS, REGION_NAMES, MorphableModel
from canonsal_jax.morphable.sfm import load_edge_topology, load_sfm

__all__ = [
  "DEFAULT_FIT_CONFIG",
  "NUM_LANDMARKS",
  "REGION_NAMES",
  "FitConfig",
  "FitResult",
  "MorphableModel",
  "default_model",
  "fit",
  "load_edge_topology",
  "load_sfm",
]
