"""canonsal_jax: Canonical Saliency Maps for deep face models, in JAX.

A JAX/Flax reimplementation of John, Balasubramanian and Jawahar, "Canonical Saliency Maps: Decoding Deep
Face Models" (IEEE T-BIOM 2021): occlusion saliency as one compiled XLA program, carried onto a 3D morphable
face model's texture and aggregated over datasets.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
