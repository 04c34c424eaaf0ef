"""Tolerances that follow the rounding of the quantities compared, not the size of their difference.

A drop is `score(original) - score(occluded)`: two results of a network's float32 arithmetic, each rounded at
its own magnitude. Two programs that compute the same scores in another order (another batch size, the windowed
convolutions of the incremental sweep, another CPU's vector width) differ by a few units in the last place
(ulps) of the scores, however small the drop: 4.8e-7 on scores of 3.5 (two ulps) was seen on an AVX-512 CPU
where the drops peak at 2.2e-2. A tolerance relative to the largest drop (1e-5 of it: 2.2e-7 there) fails on
such a machine; one relative to the scores holds on any, and still catches a wrong drop, which is off by a
sizeable share of the drop itself (10^3 to 10^4 times these tolerances in the tests that use them).
"""

import numpy as np

# Units in the last place allowed on the largest score: a few rounding steps per layer of the small networks
# tested, with room for another vector width or summation order.
ULPS = 32


def rounding_atol(values, *, ulps: int = ULPS, dtype=np.float32) -> float:
  """`ulps` units in the last place of the largest |value|, in `dtype`."""
  return ulps * float(np.finfo(dtype).eps) * float(np.max(np.abs(np.asarray(values, np.float64))))


def sweep_atol(result, *, ulps: int = ULPS) -> float:
  """For the drops and heatmap of an `occlusion.SweepResult`: the rounding of the unoccluded and occluded
  scores that the drops are differences of (`score - drops` are the occluded scores)."""
  score = float(np.asarray(result.score))
  return rounding_atol(np.append(score - np.asarray(result.drops, np.float64), score), ulps=ulps)
