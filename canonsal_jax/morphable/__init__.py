"""3D morphable face models: the `MorphableModel` pytree, its loaders and the batched fitter."""

from canonsal_jax.morphable.model import NUM_LANDMARKS, REGION_NAMES, MorphableModel
from canonsal_jax.morphable.sfm import load_edge_topology, load_sfm

__all__ = ["NUM_LANDMARKS", "REGION_NAMES", "MorphableModel", "load_edge_topology", "load_sfm"]
