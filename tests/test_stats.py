"""Tests for `evidence.stats`: region masses, bootstrap coverage, permutation tests' error rates and power."""

import numpy as np
import pytest
from scipy import ndimage

from canonsal_jax import canonical
from canonsal_jax.evidence import stats
from canonsal_jax.morphable.model import REGION_NAMES
from canonsal_jax.morphable.sfm import load_sfm

# ------------------------------------------------------------------------------------------ regions


def test_region_mass_known_answers():
  regions = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 2, 2], [-1, -1, -1, -1]])
  texture = np.array([[1, 1, -2, 0], [1, 1, 0, 0], [3, 0, 0, 0], [9, 9, 9, 9]], np.float32)
  weight = np.array([[1, 1, 1, 0], [1, 0.5, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], np.float32)
  texture[0, 3] = np.nan  # no data there: ignored
  out = stats.region_mass(texture, weight, regions, num_regions=4)
  np.testing.assert_allclose(out.mass, [3.5, 2.0, 3.0, 0.0])
  np.testing.assert_allclose(out.share, np.array([3.5, 2.0, 3.0, 0.0]) / 8.5)
  np.testing.assert_allclose(out.area_share, [4 / 12, 4 / 12, 4 / 12, 0])
  np.testing.assert_allclose(out.density[:3], np.array([3.5, 2.0, 3.0]) / 8.5 * 3)
  assert np.isnan(out.density[3])
  np.testing.assert_allclose(out.mean_value[:3], [3.5 / 3.5, 2.0 / 1.0, 3.0 / 4.0])
  signed = stats.region_mass(texture, weight, regions, num_regions=4, signed=True)
  np.testing.assert_allclose(signed.mass, [3.5, -2.0, 3.0, 0.0])
  batched = stats.region_mass(np.stack([texture, 2 * texture]), np.stack([weight, weight]), regions, num_regions=4)
  np.testing.assert_allclose(batched.mass[1], 2 * out.mass)
  np.testing.assert_allclose(batched.share[1], out.share)


def test_region_labels_on_the_surrey_model(shared_dir):
  model = load_sfm(shared_dir / "assets" / "sfm")
  labels = canonical.region_labels(model, 64)
  inside = np.asarray(canonical.model_uv_raster(model, 64).tri_id) >= 0
  np.testing.assert_array_equal(labels >= 0, inside)
  present = {REGION_NAMES[i] for i in np.unique(labels[labels >= 0])}
  assert {"eyes", "nose", "mouth", "cheeks", "forehead"} <= present


def test_records_region_masses_reads_both_keys_and_skips_failures():
  records = [
    {"index": 0, "name": "a", "status": "ok", "region_mass": {"eyes": 0.5, "nose": 0.25}},
    {"index": 1, "name": "b", "status": "skipped", "reason": "no face"},
    {"index": 2, "name": "c", "status": "ok", "region_masses": {"eyes": 0.1}},
  ]
  records[0]["groups"], records[2]["groups"] = ["all", "pred_female"], ["all"]
  names, shares = stats.records_region_masses(records, regions=("eyes", "nose"))
  assert names == ["a", "c"]
  np.testing.assert_array_equal(stats.records_in_group(records, "pred_female"), [True, False])
  np.testing.assert_allclose(shares, [[0.5, 0.25], [0.1, np.nan]])


# ------------------------------------------------------------------------------------------ bootstrap


@pytest.mark.parametrize(
  "method, draw",
  [
    ("percentile", lambda rng, size: rng.normal(2.0, 1.0, size)),
    ("bca", lambda rng, size: rng.normal(2.0, 1.0, size)),
    ("bca", lambda rng, size: 1.0 + rng.exponential(1.0, size)),  # skewed, mean 2 too
  ],
)
def test_bootstrap_intervals_cover_the_true_mean_95_percent_of_the_time(method, draw):
  rng = np.random.default_rng(0)
  repeats, n = 300, 40
  # Columns are independent data sets: one call bootstraps all of them (the statistic works per column).
  data = draw(rng, (n, repeats))
  estimate, lo, hi = stats.bootstrap_ci(data, method=method, num_resamples=1000, seed=1)
  np.testing.assert_allclose(estimate, data.mean(axis=0))
  assert np.all(lo <= estimate) and np.all(estimate <= hi)
  coverage = np.mean((lo <= 2.0) & (2.0 <= hi))
  # 300 intervals: the binomial standard error at 0.95 is 0.013; small-sample bootstraps run slightly narrow.
  assert 0.90 <= coverage <= 0.985, coverage
  again = stats.bootstrap_ci(data[:, :3], method=method, num_resamples=1000, seed=1)
  np.testing.assert_array_equal(again[1], stats.bootstrap_ci(data[:, :3], method=method, num_resamples=1000, seed=1)[1])


def test_bootstrap_interval_narrows_with_more_images():
  rng = np.random.default_rng(2)
  small = stats.bootstrap_ci(rng.normal(size=(20, 1)), seed=0)
  large = stats.bootstrap_ci(rng.normal(size=(320, 1)), seed=0)
  ratio = (small[2] - small[1]) / (large[2] - large[1])
  assert 3.0 < ratio[0] < 5.5  # sqrt(16) = 4


# ------------------------------------------------------------------------------------------ region tests


def test_holm_known_answer():
  np.testing.assert_allclose(stats.holm([0.01, 0.04, 0.03, 0.005]), [0.03, 0.06, 0.06, 0.02])
  np.testing.assert_allclose(stats.holm([0.5, np.nan, 0.2]), [0.5, np.nan, 0.4])


def test_paired_permutation_test_exact_and_random():
  # [1, 2, 3]: of the 8 sign patterns only all + and all - reach |mean| >= 2.
  assert stats.paired_permutation_test([1.0, 2.0, 3.0, np.nan]) == (2.0, 0.25)
  assert stats.paired_permutation_test([-1.0, 1.0])[1] == 1.0
  assert stats.paired_permutation_test(np.zeros(4)) == (0.0, 1.0)
  assert np.isnan(stats.paired_permutation_test([np.nan])[1])
  # Too many patterns to enumerate: random ones, p = (1 + #) / (1 + P), never 0.
  mean, p = stats.paired_permutation_test(np.ones(40), num_permutations=999)
  assert mean == 1.0 and p == pytest.approx(1 / 1000)
  rng = np.random.default_rng(0)
  null_p = [stats.paired_permutation_test(rng.normal(size=20), num_permutations=199, seed=k)[1] for k in range(200)]
  assert 0.02 < np.mean(np.array(null_p) <= 0.05) < 0.1


def test_region_permutation_test_null_false_positive_rate_and_planted_difference():
  rng = np.random.default_rng(3)
  n, regions = 24, 6
  groups = np.arange(n) < 12
  p_values, family_errors = [], 0
  for seed in range(120):
    values = rng.normal(size=(n, regions))
    result = stats.region_permutation_test(values, groups, num_permutations=199, seed=seed)
    p_values.append(result.p_value)
    family_errors += bool(result.significant.any())
  p = np.concatenate(p_values)
  assert 0.03 <= np.mean(p <= 0.05) <= 0.08  # 720 null tests: false positives ~ alpha
  assert abs(np.mean(p) - 0.5) < 0.05  # roughly uniform
  assert np.histogram(p, bins=5, range=(0, 1))[0].min() > 0.13 * p.size
  assert family_errors / 120 <= 0.1  # Holm keeps the family-wise rate near alpha

  values = rng.normal(size=(40, regions))
  groups = np.arange(40) < 20
  values[groups, 2] += 1.5
  result = stats.region_permutation_test(values, groups, num_permutations=999)
  np.testing.assert_array_equal(result.significant, np.arange(regions) == 2)
  assert result.difference[2] > 1.0


# ------------------------------------------------------------------------------------------ cluster test


def _smooth_noise(rng, n, size, sigma=1.0):
  noise = rng.normal(size=(n, size, size))
  smooth = np.stack([ndimage.gaussian_filter(x, sigma, mode="wrap") for x in noise])
  return smooth / smooth.std()


def test_label_clusters_union_find_matches_scipy():
  rng = np.random.default_rng(4)
  for _ in range(20):
    mask = rng.random((13, 11)) > 0.55
    ours, count = stats.label_clusters(mask, use_scipy=False)
    theirs, want = ndimage.label(mask)
    assert count == want
    np.testing.assert_array_equal(ours, theirs)


def test_cluster_test_finds_a_planted_blob_as_one_significant_cluster():
  rng = np.random.default_rng(5)
  n, size = 24, 16
  textures = _smooth_noise(rng, n, size)
  weights = np.ones_like(textures)
  weights[:, :, :2] = 0.0  # two columns never seen
  textures[:, :, :2] = np.nan
  groups = np.arange(n) < 12
  rows, cols = np.mgrid[:size, :size]
  blob = (rows - 8) ** 2 + (cols - 10) ** 2 <= 6
  textures[np.ix_(groups)] += 1.5 * blob
  result = stats.cluster_permutation_test(textures, weights, groups, num_permutations=199, seed=0)
  significant = [c for c in result.clusters if c["p_value"] <= 0.05]
  assert len(significant) == 1 and significant[0]["sign"] == 1
  assert result.significant[blob].mean() > 0.8  # the blob is found ...
  assert result.significant[~blob].sum() <= 0.5 * blob.sum()  # ... and not much else
  assert np.all(np.isnan(result.t[:, :2]))
  # The t map agrees with scipy's Welch test where weights are 0/1.
  from scipy.stats import ttest_ind

  want = ttest_ind(textures[groups][:, 5, 5], textures[~groups][:, 5, 5], equal_var=False).statistic
  np.testing.assert_allclose(result.t[5, 5], want, rtol=1e-6)


def test_cluster_test_family_wise_false_positives_near_alpha_on_noise():
  rng = np.random.default_rng(6)
  n, size, runs = 16, 10, 120
  groups = np.arange(n) < 8
  hits = 0
  for seed in range(runs):
    textures = _smooth_noise(rng, n, size)
    result = stats.cluster_permutation_test(textures, np.ones_like(textures), groups, num_permutations=99, seed=seed)
    hits += bool(result.significant.any())
  # 120 runs: binomial standard error at 0.05 is 0.02.
  assert 0.005 <= hits / runs <= 0.11, hits / runs


def test_difference_map_signed_and_no_data():
  textures = np.array([np.full((2, 2), 1.0), np.full((2, 2), 3.0), np.full((2, 2), 0.5), np.full((2, 2), 0.0)])
  weights = np.ones_like(textures)
  weights[:, 0, 0] = [1, 0, 1, 1]  # image 1 does not see texel (0, 0)
  weights[2:, 1, 1] = 0  # group B does not see texel (1, 1)
  diff, valid = stats.difference_map(textures, weights, np.array([True, True, False, False]))
  np.testing.assert_allclose(diff[0, 1], 2.0 - 0.25)
  np.testing.assert_allclose(diff[0, 0], 1.0 - 0.25)
  assert not valid[1, 1] and np.isnan(diff[1, 1])
