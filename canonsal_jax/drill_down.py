"""Adaptive drill-down occlusion: a coarse sweep everywhere, the fine sweep only where the coarse map is salient.

Krypton (Nakandala, Kumar and Papakonstantinou, "Incremental and Approximate Inference for Faster
Occlusion-based Deep CNN Explanations", SIGMOD 2019) gets most of its approximate speed-up this way. Stage 1
runs the patches of the fine grid that lie on a coarser lattice (every `coarse_every`-th row and column of
candidate centres, and the last row and column, so that the coarse map reaches every pixel the fine grid
covers). Stage 2 runs a fixed budget of the remaining fine patches, `ceil(fine_fraction * N)` (at most the
patches off the lattice; in `fine_rounds` rounds, `ceil(fine_fraction * N / fine_rounds)` each), those whose
centre sees the largest |estimated heatmap| within the patch around it (stage 1's map with every other drop
estimated, as below, dilated by the patch; ties broken by the mean under the patch), so that the fine stage
spends its budget where the coarse map is salient. Optionally a middle stage comes between (`middle_every`,
`middle_fraction`): a budget of patches on an intermediate lattice, picked the same way, so that the salient
areas are sampled more densely before the fine stage picks. On the identity
network's 7 px patches at stride 1, every 4th, then 4% on every 2nd, then 1% anywhere keeps the top-10% overlap
at 0.98 with 12% of the patches, where two stages need 17% for 0.95. The fine stage may run in rounds
(`fine_rounds`), each picking on the map with the drops of the rounds before it: on age's 3 px patches, every
3rd, then 4 rounds of 192 patches (20% of the grid) keeps the top-10% overlap at 0.954 where one round of the
same budget keeps 0.949. Every stage runs one `occlusion.make_sweep` program (incremental where the model has a
layer graph), compiled once per number of patches (rounds of one size share it): the budget is static, padded
to whole batches with the validity mask.

The map: a pixel every one of whose fine patches ran (in either stage) gets exactly the fine sweep's value.
Every other pixel the fine grid covers gets the fine sweep's formula, the mean drop of the patches covering it,
over drops that ran where they ran and estimated ones elsewhere: each patch that did not run takes the mean of
the drops that ran (coarse and fine) near it on the grid, weighted by a tent of radius 3/4 of the lattice step
along rows and columns (`estimate_drops`). A patch between two lattice patches leans on the nearer one, and fine
patches that ran next to it count most. On the stride-1 sweeps of the identity, age and expression models this
estimate keeps the top-10% overlap and Pearson r of the exact map at budgets where spreading the coarse drops
alone does not (and a tent of the whole step, bilinear interpolation, does less well on these peaked maps;
BENCHMARKS.md, "Drill-down occlusion"). `DrillDownResult.exact` says which pixels are exact; `count` is the fine
grid's, as the exact sweep's (0: no data).

Example:
  >>> import jax.numpy as jnp, numpy as np
  >>> from canonsal_jax import drill_down, occlusion
  >>> apply_fn = lambda p, x: jnp.stack([jnp.sum(x * p, axis=(1, 2, 3)), jnp.zeros(x.shape[0])], axis=1)
  >>> sweep = drill_down.make_drill_down_sweep(
  ...   apply_fn, patch_size=3, batch_size=8, score=occlusion.Score("logit"), coarse_every=2, fine_fraction=0.25)
  >>> centres = occlusion.grid_centres(12, 12, patch_size=3, stride=1)
  >>> result = sweep(jnp.ones((12, 12, 1)), jnp.ones((12, 12, 1)), centres, np.ones(len(centres), bool), 0)
  >>> result.heatmap.shape, result.exact.dtype
  ((12, 12), dtype('bool'))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from canonsal_jax import occlusion

__all__ = [
  "TENT_RADIUS",
  "DrillDownResult",
  "Settings",
  "budget",
  "coarse_subset",
  "estimate_drops",
  "make_drill_down_sweep",
]


class Settings(NamedTuple):
  """A drill-down's lattices and budgets: `make_drill_down_sweep`'s arguments of the same names, as the config
  (`config.occlusion.drill_down`), the outputs' records and the batched runs carry them."""

  coarse_every: int
  fine_fraction: float
  middle_every: int = 0
  middle_fraction: float = 0.0
  fine_rounds: int = 1


class DrillDownResult(NamedTuple):
  """A drill-down sweep's result: `occlusion.SweepResult`'s fields over the fine grid, and where it is exact.

  The first seven fields repeat `SweepResult`'s, names and order, on purpose: code that reads a sweep's result
  (the pipeline, the batched runs, `occlusion.check_finite`) reads this one unchanged.

  Attributes:
    drops: `[N]` drops of the fine grid's patches that ran (either stage), 0 for the others.
    heatmap: `[H, W]` the fine sweep's mean drop where `exact`; elsewhere the mean over the covering patches of
      their drops, estimated for the patches that did not run (`estimate_drops`).
    count: `[H, W]` the fine grid's (valid) patches covering each pixel, ran or not: the exact sweep's count, so
      that 0 means no data as it does there (the heatmap has a value wherever count > 0).
    score, outputs, target, num_nonfinite: as `SweepResult` (the unoccluded image's; non-finite of both stages).
    exact: `[H, W]` bool: every fine patch covering the pixel ran, so `heatmap` is the fine sweep's there.
    ran: `[N]` bool: which fine patches ran.
    coarse: the stage-1 `SweepResult`.
  """

  drops: jax.Array
  heatmap: jax.Array
  count: jax.Array
  score: jax.Array
  outputs: jax.Array
  target: jax.Array
  num_nonfinite: jax.Array
  exact: jax.Array
  ran: jax.Array
  coarse: occlusion.SweepResult


def budget(fraction: float, num_patches: int) -> int:
  """A stage's (or round's) number of patches for a share of the grid: ``ceil(fraction * num_patches)``, the
  product rounded to 6 decimals first so that float error does not add a patch.

  Example:
    >>> 0.07 * 3200, budget(0.07, 3200), budget(0.1997 / 4, 3844)
    (224.00000000000003, 224, 192)
  """
  return math.ceil(round(fraction * num_patches, 6))


def coarse_subset(centres_rc: np.ndarray, every: int) -> np.ndarray:
  """Indices of the centres on every `every`-th distinct row and every `every`-th distinct column of the grid,
  the first and the last row and column included, as numpy `[M]` int.

  Example:
    >>> coarse_subset(np.array([[1, 1], [1, 2], [1, 3], [2, 1], [3, 1], [3, 3]]), 2).tolist()
    [0, 2, 4, 5]
    >>> coarse_subset(np.array([[1, 1], [1, 2], [1, 3], [1, 4]]), 2).tolist()  # columns 1, 3 and the last, 4
    [0, 2, 3]
  """
  row, col, num_rows, num_cols = grid_index(np.asarray(centres_rc))
  on_row = (row % every == 0) | (row == num_rows - 1)
  on_col = (col % every == 0) | (col == num_cols - 1)
  return np.flatnonzero(on_row & on_col)


TENT_RADIUS = 0.75
"""The estimate's tent radius, as a share of the lattice step (`coarse_every` grid positions)."""


def grid_index(centres_rc: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
  """Each centre's row and column among the distinct rows and columns (numpy `[N]` int each), and their numbers."""
  rows, row = np.unique(centres_rc[:, 0], return_inverse=True)
  cols, col = np.unique(centres_rc[:, 1], return_inverse=True)
  return row.reshape(-1), col.reshape(-1), len(rows), len(cols)


def estimate_drops(
  drops: jax.Array, ran: jax.Array, row: jax.Array, col: jax.Array, shape: tuple[int, int], radius: float
) -> tuple[jax.Array, jax.Array]:
  """Drops of the patches that did not run, estimated from those that did: jittable.

  On the grid of distinct rows and columns, each patch gets the mean of the drops that ran, weighted by
  `max(0, 1 - |dr| / radius) * max(0, 1 - |dc| / radius)` for grid offsets `dr`, `dc` (a separable tent); a
  patch that ran keeps its drop.

  Args:
    drops: `[N]` the drops (any value where not `ran`).
    ran: `[N]` bool.
    row, col: `[N]` int each centre's grid row and column (`grid_index`).
    shape: the grid's (rows, columns).
    radius: the tent's radius in grid steps (> 0).

  Returns:
    `([N] drops, [N] bool known)`: the drop that ran or its estimate, and whether any ran patch lies within the
    radius (where not, the estimate is 0).

  Example:
    >>> row, col = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 2, 0, 1, 2])
    >>> ran = np.array([True, False, True, True, False, True])
    >>> est, known = estimate_drops(np.array([1.0, 9, 3, 1, 9, 3]), ran, row, col, (2, 3), 2.0)
    >>> np.asarray(est).tolist(), bool(known.all())
    ([1.0, 2.0, 3.0, 1.0, 2.0, 3.0], True)
  """
  hi = jax.lax.Precision.HIGHEST
  num_rows, num_cols = shape
  tent = lambda n: jnp.maximum(0.0, 1.0 - jnp.abs(jnp.arange(n)[:, None] - jnp.arange(n)[None, :]) / radius)
  grid = lambda v: jnp.zeros(shape, jnp.float32).at[row, col].add(v.astype(jnp.float32))
  smooth = lambda g: jnp.matmul(jnp.matmul(tent(num_rows), g, precision=hi), tent(num_cols), precision=hi)
  num, den = smooth(grid(jnp.where(ran, drops, 0.0))), smooth(grid(ran))
  num, den = num[row, col], den[row, col]
  known = den > 0
  estimate = jnp.where(known, num / jnp.where(known, den, 1.0), 0.0)
  return jnp.where(ran, drops, estimate), ran | known


def _lattice_step(centres_rc: np.ndarray) -> int:
  """The smallest spacing between distinct rows or columns of the centres (1 for a single centre)."""
  steps = [np.diff(np.unique(centres_rc[:, a])) for a in (0, 1)]
  steps = [int(d.min()) for d in steps if d.size]
  return min(steps) if steps else 1


def make_drill_down_sweep(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  *,
  patch_size: int,
  batch_size: int,
  score: occlusion.Score,
  coarse_every: int,
  fine_fraction: float,
  middle_every: int = 0,
  middle_fraction: float = 0.0,
  fine_rounds: int = 1,
  **sweep_kwargs: Any,
) -> Callable[..., DrillDownResult]:
  """Builds a drill-down occlusion sweep; the returned function is called as `make_sweep`'s.

  Args:
    apply_fn, patch_size, batch_size, score: as `occlusion.make_sweep`.
    coarse_every: stage 1 runs every `coarse_every`-th row and column of the given centres (>= 1; 1 runs the
      whole fine grid in stage 1).
    fine_fraction: the fine stage's budget as a share of the fine grid's patches, in [0, 1] (at most the
      patches off the coarse lattice, less the middle stage's budget). A stage's sweep pads its patches to whole
      batches, and padding costs what a patch costs: budgets that fill their batches waste nothing.
    middle_every: 0 (no middle stage), or a lattice between the two, 1 < `middle_every` < `coarse_every`: a
      middle stage runs before the fine one, its budget of patches on every `middle_every`-th row and column,
      picked as the fine stage's are.
    middle_fraction: the middle stage's budget as a share of the fine grid's patches, in [0, 1] (at most its
      lattice's patches off the coarse one).
    fine_rounds: the fine stage runs in this many rounds of `ceil(fine_fraction * N / fine_rounds)` patches each
      (>= 1), every round picking on the estimated map that holds the drops of the rounds before it, so that a
      salient spot found by one round is followed up by the next. Rounds of one size share one compiled program.
    **sweep_kwargs: the other `make_sweep` settings (baseline, method, ...); `reduce` must stay "mean" (a sum
      over the patches that ran is not comparable between exact and coarse pixels).

  Returns:
    ``sweep(params, image[H, W, C], centres_rc[N, 2], valid[N], target=None) -> DrillDownResult``: the centres
    are the fine grid (numpy, on the host: its coarse lattice is found there).

  Raises:
    ValueError: invalid settings.
  """
  if isinstance(coarse_every, bool) or not isinstance(coarse_every, (int, np.integer)) or coarse_every < 1:
    raise ValueError(f"coarse_every must be a positive int, got {coarse_every!r}")
  if not 0.0 <= float(fine_fraction) <= 1.0:
    raise ValueError(f"fine_fraction must be in [0, 1], got {fine_fraction!r}")
  if isinstance(middle_every, bool) or not isinstance(middle_every, (int, np.integer)) or middle_every < 0:
    raise ValueError(f"middle_every must be 0 or an int between 1 and coarse_every, got {middle_every!r}")
  if middle_every and not 1 < middle_every < coarse_every:
    raise ValueError(f"middle_every must lie strictly between 1 and coarse_every={coarse_every}, got {middle_every}")
  if not 0.0 <= float(middle_fraction) <= 1.0:
    raise ValueError(f"middle_fraction must be in [0, 1], got {middle_fraction!r}")
  if isinstance(fine_rounds, bool) or not isinstance(fine_rounds, (int, np.integer)) or fine_rounds < 1:
    raise ValueError(f"fine_rounds must be a positive int, got {fine_rounds!r}")
  if sweep_kwargs.get("reduce", "mean") != "mean":
    raise ValueError("a drill-down sweep averages the drops of the patches covering a pixel: reduce must be 'mean'")
  patch_size = occlusion.resolve_patch_size(patch_size)
  half = patch_size // 2
  # One sweep for every stage: its jit compiles one program per number of patches, and an incremental sweep
  # plans its windows once.
  stage_sweep = occlusion.make_sweep(
    apply_fn, patch_size=patch_size, batch_size=batch_size, score=score, **sweep_kwargs
  )

  @functools.partial(jax.jit, static_argnames="reach")
  def coarse_map(coarse: occlusion.SweepResult, coarse_centres, coarse_valid, reach: int):
    """The coarse drops spread over the lattice's cells: each patch stands for the pixels up to half the lattice
    step around it. The map's fallback where no covering patch has a drop or an estimate (only where invalid
    centres leave the estimate nothing within its radius)."""
    total, count = occlusion.coverage(coarse_centres, reach, coarse.heatmap.shape, coarse.drops, coarse_valid)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)

  @functools.partial(jax.jit, static_argnames=("grid_shape", "radius"))
  def estimated_map(drops, ran, centres_rc, valid, row, col, coarse_spread, grid_shape, radius):
    """The fine sweep's map with the drops that did not run estimated (`estimate_drops`): `[H, W]` mean over the
    covering patches (the coarse spread where no covering patch has a drop or an estimate), and `[H, W]` the
    number of valid patches covering each pixel."""
    filled, known = estimate_drops(drops, ran, row, col, grid_shape, radius)
    known = known & valid
    total, count, every = occlusion.coverage(
      centres_rc, half, coarse_spread.shape, jnp.where(known, filled, 0.0), known, valid
    )
    heatmap = jnp.where(count > 0, total / jnp.maximum(count, 1.0), jnp.where(every > 0, coarse_spread, 0.0))
    return heatmap, every

  @functools.partial(jax.jit, static_argnames="size")
  def select(salience_map, centres_rc, candidate, size: int):
    """A stage's patches: the `size` candidates with the most salient estimated surroundings."""
    salience = jnp.abs(salience_map)
    window = ((patch_size, patch_size), (1, 1), ((half, half), (half, half)))
    dilated = jax.lax.reduce_window(salience, -jnp.inf, jax.lax.max, *window)
    # Ties (flat stretches of the estimate) are broken by the mean salience under the patch, which prefers
    # centres nearer the salient spot. The mean is at most the max, so 1e-3 of it reorders only maxima that
    # differ by less than 1e-3 of themselves.
    mean = jax.lax.reduce_window(salience, 0.0, jax.lax.add, *window) / (patch_size * patch_size)
    at_centre = (dilated + 1e-3 * mean)[centres_rc[:, 0], centres_rc[:, 1]]
    key = jnp.where(candidate, at_centre, -jnp.inf)
    _, chosen = jax.lax.top_k(key, size)
    return chosen, candidate[chosen]

  @functools.partial(jax.jit, static_argnames=("grid_shape", "radius"))
  def combine(drops, ran, coarse_spread, centres_rc, valid, row, col, grid_shape, radius):
    total, count, every = occlusion.coverage(centres_rc, half, coarse_spread.shape, drops, ran, valid)
    exact = (every > 0) & (count == every)
    estimate, _ = estimated_map(drops, ran, centres_rc, valid, row, col, coarse_spread, grid_shape, radius)
    # Exact pixels keep the exact sweep's own arithmetic (the ran drops' sum over their count).
    heatmap = jnp.where(exact, total / jnp.maximum(count, 1.0), estimate)
    return heatmap, jnp.rint(every).astype(jnp.int32), exact

  @jax.jit
  def add_stage(drops, ran, chosen, chosen_valid, stage_drops):
    return drops.at[chosen].add(jnp.where(chosen_valid, stage_drops, 0.0)), ran.at[chosen].max(chosen_valid)

  # (lattice, budget as a share of the grid): the middle stage, then the fine stage's rounds.
  stages = [(middle_every, float(middle_fraction))] if middle_every else []
  stages += [(1, float(fine_fraction) / fine_rounds)] * fine_rounds

  def sweep(params, image, centres_rc, valid, target=None) -> DrillDownResult:
    centres_rc = np.asarray(centres_rc, np.int32)
    valid = np.asarray(valid, bool)
    n = len(centres_rc)
    coarse_idx = coarse_subset(centres_rc, coarse_every)
    is_coarse = np.zeros(n, bool)
    is_coarse[coarse_idx] = True
    coarse = stage_sweep(params, image, centres_rc[coarse_idx], valid[coarse_idx], target)
    # Half the regular lattice's step (the last row and column may lie closer to the one before).
    reach = max(half, coarse_every * _lattice_step(centres_rc) // 2)
    coarse_spread = coarse_map(coarse, centres_rc[coarse_idx], valid[coarse_idx], reach)
    row, col, num_rows, num_cols = grid_index(centres_rc)
    grid = {"row": row, "col": col, "grid_shape": (num_rows, num_cols), "radius": TENT_RADIUS * coarse_every}
    drops = jnp.zeros(n, coarse.drops.dtype).at[coarse_idx].set(coarse.drops)
    ran = jnp.asarray(is_coarse & valid)
    num_nonfinite = coarse.num_nonfinite
    spent = 0
    for every, fraction in stages:
      on_lattice = np.zeros(n, bool)
      on_lattice[coarse_subset(centres_rc, every)] = True
      # At most the stage's lattice off the coarse one, less what earlier stages may have taken from it: a budget
      # beyond its candidates would run padding through the model.
      size = min(budget(fraction, n), int(np.sum(on_lattice & ~is_coarse)) - spent)
      if size <= 0:
        continue
      current, _ = estimated_map(drops, ran, centres_rc, valid, coarse_spread=coarse_spread, **grid)
      chosen, chosen_valid = select(current, centres_rc, jnp.asarray(on_lattice & valid) & ~ran, size)
      stage = stage_sweep(params, image, jnp.asarray(centres_rc)[chosen], chosen_valid, coarse.target)
      drops, ran = add_stage(drops, ran, chosen, chosen_valid, stage.drops)
      num_nonfinite = num_nonfinite + stage.num_nonfinite
      spent += size
    heatmap, count, exact = combine(drops, ran, coarse_spread, centres_rc, valid, **grid)
    return DrillDownResult(
      drops=drops,
      heatmap=heatmap,
      count=count,
      score=coarse.score,
      outputs=coarse.outputs,
      target=coarse.target,
      num_nonfinite=num_nonfinite,
      exact=exact,
      ran=ran,
      coarse=coarse,
    )

  return sweep
