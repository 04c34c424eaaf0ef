"""Drill-down occlusion: exact where the fine stage ran, the mean of ran and estimated drops elsewhere, the budget
spent where the coarse map is salient."""

from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from canonsal_jax import drill_down, occlusion


def _spot_model(params, x):
  """Logit 0 reads a Gaussian spot of the image (a model that looks at one place), logit 1 is constant."""
  return jnp.stack([jnp.sum(x * params, axis=(1, 2, 3)), jnp.zeros(x.shape[0])], axis=1)


@pytest.fixture(scope="module")
def setting():
  size = 20
  yy, xx = np.mgrid[:size, :size]
  spot = np.exp(-((yy - 6.0) ** 2 + (xx - 13.0) ** 2) / 6.0)[..., None].astype(np.float32)
  image = np.random.default_rng(0).uniform(0.5, 1.5, size=(size, size, 1)).astype(np.float32)
  centres = occlusion.grid_centres(size, size, patch_size=3, stride=1)
  valid = np.ones(len(centres), bool)
  score = occlusion.Score("logit")
  full = occlusion.make_sweep(_spot_model, patch_size=3, batch_size=16, score=score)(spot, image, centres, valid, 0)
  return spot, image, centres, valid, score, full


def _drill(setting, every, fraction, **middle):
  spot, image, centres, valid, score, _ = setting
  sweep = drill_down.make_drill_down_sweep(
    _spot_model, patch_size=3, batch_size=16, score=score, coarse_every=every, fine_fraction=fraction, **middle
  )
  return sweep(spot, image, centres, valid, 0)


def test_a_full_budget_is_the_fine_sweep(setting):
  full = setting[-1]
  result = _drill(setting, 3, 1.0)
  assert bool(np.all(result.exact[np.asarray(full.count) > 0]))
  chex.assert_trees_all_close(result.heatmap, full.heatmap, rtol=0, atol=1e-6)
  chex.assert_trees_all_close(result.drops, full.drops, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(result.count, full.count)
  assert bool(np.all(result.ran))


def _naive_map(centres, valid, drops, ran, every, half, shape):
  """The drill-down's map off the exact pixels, by loops: each patch that did not run takes the tent-weighted
  mean of the ran drops (grid offsets in distinct rows and columns), each pixel the mean over its covering
  patches."""
  rows = {r: i for i, r in enumerate(sorted({int(r) for r in centres[:, 0]}))}
  cols = {c: i for i, c in enumerate(sorted({int(c) for c in centres[:, 1]}))}
  grid = np.array([[rows[int(r)], cols[int(c)]] for r, c in centres], float)
  radius = drill_down.TENT_RADIUS * every
  filled = np.array(drops, np.float64)
  for n in np.flatnonzero(~ran):
    w = np.prod(np.maximum(0.0, 1.0 - np.abs(grid[ran] - grid[n]) / radius), axis=1)
    filled[n] = (w * drops[ran]).sum() / w.sum()
  out = np.zeros(shape)
  for i in range(shape[0]):
    for j in range(shape[1]):
      near = valid & np.all(np.abs(centres - [i, j]) <= half, axis=1)
      out[i, j] = filled[near].mean() if near.any() else 0.0
  return out


def test_exact_where_the_fine_stage_ran_estimated_elsewhere(setting):
  full = setting[-1]
  result = _drill(setting, 3, 0.15)
  exact = np.asarray(result.exact)
  assert 0 < exact.sum() < exact.size
  chex.assert_trees_all_close(np.asarray(result.heatmap)[exact], np.asarray(full.heatmap)[exact], rtol=0, atol=1e-6)
  ran, drops = np.asarray(result.ran), np.asarray(result.drops, np.float64)
  naive = _naive_map(setting[2], setting[3], drops, ran, 3, 1, exact.shape)
  np.testing.assert_allclose(np.asarray(result.heatmap)[~exact], naive[~exact], rtol=1e-5, atol=1e-7)
  # The ran drops are the fine sweep's; ran patches: the coarse lattice plus at most the budget.
  chex.assert_trees_all_close(drops[ran], np.asarray(full.drops, np.float64)[ran], rtol=0, atol=1e-6)
  assert int(result.ran.sum()) == len(drill_down.coarse_subset(setting[2], 3)) + 49  # ceil(0.15 * 324)


def test_the_estimate_beats_spreading_the_coarse_drops(setting):
  """Off the exact pixels, the map of estimated drops is nearer the exact map than the coarse drops spread over
  the lattice's cells (what the map held before the estimate), on the spot model at every 3rd / 10%."""
  full = np.asarray(setting[-1].heatmap)
  result = _drill(setting, 3, 0.1)
  off = ~np.asarray(result.exact) & (np.asarray(setting[-1].count) > 0)
  lattice = setting[2][drill_down.coarse_subset(setting[2], 3)]
  coarse_drops = np.asarray(result.coarse.drops)
  spread = np.zeros_like(full)
  for i, j in zip(*np.nonzero(off), strict=True):
    spread[i, j] = coarse_drops[np.all(np.abs(lattice - [i, j]) <= 1, axis=1)].mean()
  error = lambda m: np.abs(m[off] - full[off]).max()
  assert error(np.asarray(result.heatmap)) < 0.5 * error(spread)


def test_the_budget_goes_where_the_coarse_map_is_salient(setting):
  """The top 5% of the exact map (20 pixels) needs 44 fine patches; a budget of 20% of the grid (65 patches,
  some of them on the coarse lattice already) spent by the coarse map's salience covers them all."""
  full = setting[-1]
  result = _drill(setting, 3, 0.2)
  top = np.asarray(np.abs(full.heatmap)) >= np.quantile(np.abs(full.heatmap), 0.95)
  assert np.asarray(result.exact)[top].mean() == 1.0  # the top 5% of the exact map is exact


def test_a_lattice_wider_than_the_patch_leaves_no_holes(setting):
  """Every 4th centre with 3 px patches: the coarse patches cover a quarter of the rows and columns; off the exact
  region each pixel gets the mean of its covering patches' ran or estimated drops, so no covered pixel is 0."""
  full = setting[-1]
  result = _drill(setting, 4, 0.1)
  coarse_holes = (np.asarray(result.coarse.count) == 0) & (np.asarray(full.count) > 0)
  assert coarse_holes.sum() > 0  # the coarse sweep's own map has holes here
  heatmap, exact = np.asarray(result.heatmap), np.asarray(result.exact)
  assert np.all(heatmap[coarse_holes & ~exact] != 0)
  chex.assert_trees_all_close(heatmap[exact], np.asarray(full.heatmap)[exact], rtol=0, atol=1e-6)


def test_no_budget_is_the_coarse_stage_alone(setting):
  centres = setting[2]
  result = _drill(setting, 3, 0.0)
  np.testing.assert_array_equal(np.flatnonzero(result.ran), drill_down.coarse_subset(centres, 3))
  ran, drops = np.asarray(result.ran), np.asarray(result.drops, np.float64)
  naive = _naive_map(centres, setting[3], drops, ran, 3, 1, result.heatmap.shape)
  exact = np.asarray(result.exact)
  np.testing.assert_allclose(np.asarray(result.heatmap)[~exact], naive[~exact], rtol=1e-5, atol=1e-7)


def test_a_middle_stage_runs_its_budget_on_its_lattice(setting):
  """Every 4th, then 5% of the grid on every 2nd row and column, then 5% anywhere: the middle stage's patches lie on
  its lattice, where the spot is; the map is exact where everything ran and the estimate elsewhere."""
  full, centres = setting[-1], setting[2]
  result = _drill(setting, 4, 0.05, middle_every=2, middle_fraction=0.05)
  ran = np.asarray(result.ran)
  coarse, middle = (np.isin(np.arange(len(centres)), drill_down.coarse_subset(centres, k)) for k in (4, 2))
  budget = int(np.ceil(0.05 * len(centres)))
  assert int(ran.sum()) == coarse.sum() + 2 * budget
  fine_only = ran & ~middle  # the fine stage's picks off the middle lattice
  assert 0 < fine_only.sum() <= budget and (ran & middle & ~coarse).sum() >= budget
  picked = centres[ran & ~coarse]
  assert np.all(np.abs(picked - [6, 13]).max(axis=1) <= 5)  # all near the spot at (6, 13)
  exact, heatmap = np.asarray(result.exact), np.asarray(result.heatmap)
  chex.assert_trees_all_close(heatmap[exact], np.asarray(full.heatmap)[exact], rtol=0, atol=1e-6)
  naive = _naive_map(centres, setting[3], np.asarray(result.drops, np.float64), ran, 4, 1, exact.shape)
  np.testing.assert_allclose(heatmap[~exact], naive[~exact], rtol=1e-5, atol=1e-7)


def _naive_pick(map_, centres, candidate, budget, half):
  """A round's picks, by loops: the candidates whose patch window holds the largest |map| (ties broken by the
  window's mean |map|), the `budget` largest."""
  salience = np.abs(map_)
  key = np.full(len(centres), -np.inf)
  for n in np.flatnonzero(candidate):
    r, c = centres[n]
    window = salience[max(r - half, 0) : r + half + 1, max(c - half, 0) : c + half + 1]
    key[n] = window.max() + 1e-3 * window.sum() / (2 * half + 1) ** 2
  return np.argsort(-key, kind="stable")[:budget]


def test_fine_rounds_each_pick_on_the_map_with_the_rounds_before(setting):
  """Every 3rd, then 48 patches in 3 rounds of 16: each round's patches are the ones a loop-by-loop reference picks
  on the map estimated from the lattice and the rounds before it (the fine sweep's drops standing in for the
  model), not the 48 that one round picks on the lattice's map."""
  full, centres, valid = setting[-1], setting[2], setting[3]
  result = _drill(setting, 3, 0.148, fine_rounds=3)  # ceil(0.148 * 324 / 3) = 16; one round: ceil(47.95) = 48
  lattice = np.isin(np.arange(len(centres)), drill_down.coarse_subset(centres, 3))
  ran = lattice.copy()
  drops = np.where(ran, np.asarray(full.drops, np.float64), 0.0)
  budget = 16
  first_map = _naive_map(centres, valid, drops, ran, 3, 1, result.heatmap.shape)
  for _ in range(3):
    current = _naive_map(centres, valid, drops, ran, 3, 1, result.heatmap.shape)
    picked = _naive_pick(current, centres, valid & ~ran, budget, 1)
    ran[picked] = True
    drops[picked] = np.asarray(full.drops, np.float64)[picked]
  np.testing.assert_array_equal(np.asarray(result.ran), ran)
  exact, heatmap = np.asarray(result.exact), np.asarray(result.heatmap)
  chex.assert_trees_all_close(heatmap[exact], np.asarray(full.heatmap)[exact], rtol=0, atol=1e-6)
  naive = _naive_map(centres, valid, np.asarray(result.drops, np.float64), ran, 3, 1, exact.shape)
  np.testing.assert_allclose(heatmap[~exact], naive[~exact], rtol=1e-5, atol=1e-7)
  one_round = _drill(setting, 3, 0.148)
  assert int(np.sum(one_round.ran)) == int(ran.sum()) == lattice.sum() + 48
  stale = lattice.copy()  # all 48 picked on the lattice's map: what rounds that did not update would run
  stale[_naive_pick(first_map, centres, valid & ~lattice, 48, 1)] = True
  np.testing.assert_array_equal(np.asarray(one_round.ran), stale)
  assert (stale != ran).sum() > 0


def test_coarse_subset_takes_every_kth_distinct_row_and_column():
  centres = occlusion.grid_centres(10, 10, patch_size=3, stride=1)  # rows and columns 1..8
  picked = centres[drill_down.coarse_subset(centres, 3)]
  assert sorted({int(r) for r in picked[:, 0]}) == [1, 4, 7, 8] and len(picked) == 16  # the last row and column too


def test_bad_settings():
  score = occlusion.Score("logit")
  with pytest.raises(ValueError, match="coarse_every must be a positive int"):
    drill_down.make_drill_down_sweep(
      _spot_model, patch_size=3, batch_size=4, score=score, coarse_every=0, fine_fraction=0.1
    )
  with pytest.raises(ValueError, match=r"fine_fraction must be in \[0, 1\]"):
    drill_down.make_drill_down_sweep(
      _spot_model, patch_size=3, batch_size=4, score=score, coarse_every=2, fine_fraction=2
    )
  with pytest.raises(ValueError, match="middle_every must lie strictly between 1 and coarse_every=3"):
    drill_down.make_drill_down_sweep(
      _spot_model, patch_size=3, batch_size=4, score=score, coarse_every=3, fine_fraction=0.1, middle_every=3
    )
  with pytest.raises(ValueError, match=r"middle_fraction must be in \[0, 1\]"):
    drill_down.make_drill_down_sweep(
      _spot_model,
      patch_size=3,
      batch_size=4,
      score=score,
      coarse_every=4,
      fine_fraction=0.1,
      middle_every=2,
      middle_fraction=-0.1,
    )
  with pytest.raises(ValueError, match="fine_rounds must be a positive int"):
    drill_down.make_drill_down_sweep(
      _spot_model, patch_size=3, batch_size=4, score=score, coarse_every=2, fine_fraction=0.1, fine_rounds=0
    )
  with pytest.raises(ValueError, match="reduce must be 'mean'"):
    drill_down.make_drill_down_sweep(
      _spot_model, patch_size=3, batch_size=4, score=score, coarse_every=2, fine_fraction=0.1, reduce="sum"
    )


def test_the_map_reaches_every_pixel_the_fine_grid_covers(setting):
  """Centres 1..18, every 2nd: the lattice's last row and column (17) sit one step short of the grid's (18), so
  the lattice takes the grid's last row and column too; every covered pixel has a value, and `count` is the fine
  grid's (0: no data, as the exact sweep says)."""
  full = setting[-1]
  result = _drill(setting, 2, 0.05)
  np.testing.assert_array_equal(result.count, full.count)
  covered, exact = np.asarray(full.count) > 0, np.asarray(result.exact)
  assert (covered & ~exact).sum() > 0
  ran, drops = np.asarray(result.ran), np.asarray(result.drops, np.float64)
  naive = _naive_map(setting[2], setting[3], drops, ran, 2, 1, exact.shape)
  np.testing.assert_allclose(np.asarray(result.heatmap)[covered], naive[covered], rtol=1e-5, atol=1e-7)
  assert {18} <= {int(r) for r in setting[2][np.asarray(result.ran)][:, 0]}


def test_estimate_drops_known_answers():
  """A constant field stays constant; a patch midway between two ran ones takes their mean; a patch beyond the
  radius of every ran one is unknown (0)."""
  row, col = np.repeat(np.arange(4), 4), np.tile(np.arange(4), 4)
  ran = (row % 2 == 0) & (col % 2 == 0)
  est, known = drill_down.estimate_drops(np.full(16, 2.5), ran, row, col, (4, 4), 1.5)
  np.testing.assert_allclose(np.asarray(est), 2.5, rtol=1e-6)
  drops = np.where(col == 0, 1.0, np.where(col == 2, 3.0, 0.0))
  est, _ = drill_down.estimate_drops(drops, ran, row, col, (4, 4), 1.5)
  np.testing.assert_allclose(np.asarray(est)[(row == 0) & (col == 1)], 2.0, rtol=1e-6)
  est, known = drill_down.estimate_drops(drops, ran, row, col, (4, 4), 0.9)
  assert not bool(np.asarray(known)[(row == 1) & (col == 1)][0])
  assert float(np.asarray(est)[(row == 1) & (col == 1)][0]) == 0.0
