"""Evidence that a map is right: experiments, metrics and statistics built on the core, never imported by it.

* `faithfulness`, `metrics`: the faithfulness protocol (drop, deletion/insertion, controls) and its metrics.
* `stats`: region masses, bootstrap intervals, group and cluster permutation tests.
* `planted`, `synthetic`: experiments with known truth (a planted cue; renders of a textured 3DMM at chosen poses).
* `canonicalisation`: one face at several views, 3-D canonicalisation against a 2-D warp (`warp2d`).
* `fit_accuracy`: the 3DMM fitter against held-out landmarks and against eos.
* `report`: the HTML report of a CMS run.

Submodules load on first use, like the core's.
"""

from canonsal_jax import _lazy_submodules

_SUBMODULES = (
  "canonicalisation",
  "faithfulness",
  "fit_accuracy",
  "metrics",
  "planted",
  "report",
  "stats",
  "synthetic",
  "warp2d",
)

__all__ = list(_SUBMODULES)


__getattr__ = _lazy_submodules(__name__, _SUBMODULES)


def __dir__():
  return sorted(__all__)
