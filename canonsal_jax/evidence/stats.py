"""Statistics on canonical maps: per-region saliency mass, bootstrap intervals, and group comparisons.

Everything here is host-side numpy on arrays a CMS run can keep: textures `[N, T, T]` with weights `[N, T, T]`
(weight 0 = no data, never zero saliency) and per-image records (`cms.CMSAccumulator.records()`).

* **Regions.** `canonical.region_labels` labels each texel with the `morphable.REGION_NAMES` region of its
  triangle's nearest vertex (the rule the pipeline uses for per-image region masses). `region_mass` gives, per
  region, the raw mass
  ``sum(|v| * w)`` (or signed), its share of the image's total, and two normalisations by area: `density` =
  share / the region's share of the UV layout's texels (1 = as salient as its size; UV area, not surface area:
  layouts stretch some parts), and `mean_value` = mass / the region's total weight (the mean saliency on the
  texels of the region that were seen; NaN when none were).
* **Intervals.** `bootstrap_ci`: seeded percentile or BCa (Efron 1987) intervals over images of any per-image
  statistic array, e.g. the region shares in the records.
* **Groups.** `difference_map`: the signed difference of two groups' weighted mean textures (NaN where either
  group has no data). `region_permutation_test`: the difference of group means per region, label
  permutations, Holm's step-down correction over regions (`holm`). `cluster_permutation_test`: texel-level
  (Maris & Oostenveld 2007): a weighted Welch t map, texels beyond a threshold grouped into 4-connected clusters
  of one sign on the texture (`scipy.ndimage.label`, or a small union-find without scipy), each cluster's mass
  ``sum |t|`` compared with the permutation distribution of the largest cluster mass, which controls the
  family-wise error over all texels and clusters.
* **Pairs.** `paired_permutation_test`: two methods scored on the same images, a two-sided sign-flip test of
  their mean per-image difference (exact by enumeration on few images).

Random permutation p-values are ``(1 + #{null >= observed}) / (1 + P)``, never 0. Texture-space adjacency ignores UV
seams: a cluster crossing a seam counts as two (conservative).

Example:
  Lines marked +SKIP are not run as doctests: it needs a CMS run's saved textures.
  >>> regions = canonical.region_labels(model, 128)  # doctest: +SKIP
  >>> masses = region_mass(textures, weights, regions)  # [N, R] fields  # doctest: +SKIP
  >>> est, lo, hi = bootstrap_ci(masses.share, seed=0)  # doctest: +SKIP
  >>> result = cluster_permutation_test(textures, weights, is_female, num_permutations=999)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from canonsal_jax.morphable.model import REGION_NAMES

__all__ = [
  "BOOTSTRAP_METHODS",
  "ClusterResult",
  "RegionMass",
  "RegionTest",
  "bootstrap_ci",
  "cluster_permutation_test",
  "difference_map",
  "group_mean",
  "holm",
  "label_clusters",
  "paired_permutation_test",
  "records_in_group",
  "records_region_masses",
  "region_mass",
  "region_permutation_test",
  "weighted_t_map",
]

BOOTSTRAP_METHODS = ("percentile", "bca")
# Permutations processed at once in the cluster test (bounds memory to this many [T, T] maps per array).
_PERMUTATION_CHUNK = 64
# Each group needs this effective number of images at a texel for its variance (Kish's n_eff = (sum w)^2 /
# sum w^2); the Welch t needs n_eff > 1 in both groups.
_MIN_EFFECTIVE_IMAGES = 2.0


class RegionMass(NamedTuple):
  """Saliency per region (leading axes those of the textures given; R regions last).

  Attributes:
    mass: [..., R] sum over the region's texels of |value| * weight (value * weight when signed).
    share: [..., R] mass / the image's total mass over all labelled texels (0 when that is 0).
    area_share: [R] the region's share of the labelled texels of the UV layout.
    density: [..., R] share / area_share (1 = as salient as its size; NaN for regions with no texels).
    mean_value: [..., R] mass / the region's total weight: the mean saliency where it was seen (NaN if unseen).
  """

  mass: np.ndarray
  share: np.ndarray
  area_share: np.ndarray
  density: np.ndarray
  mean_value: np.ndarray


def region_mass(
  textures: Any, weights: Any, regions: Any, *, num_regions: int = len(REGION_NAMES), signed: bool = False
) -> RegionMass:
  """Per-region saliency of one texture [T, T] or many [N, T, T], raw and normalised by area.

  Args:
    textures: [..., T, T] values (NaN allowed where the weight is 0).
    weights: [..., T, T] in [0, 1], 0 = no data.
    regions: [T, T] int region per texel (`canonical.region_labels`), -1 outside the layout (ignored).
    num_regions: R.
    signed: sum values * weight instead of |values| * weight (shares then need not lie in [0, 1]).

  Returns:
    `RegionMass` (float64).
  """
  v = np.asarray(textures, np.float64)
  w = np.asarray(weights, np.float64)
  regions = np.asarray(regions)
  if v.shape != w.shape or v.shape[-2:] != regions.shape:
    raise ValueError(f"textures {v.shape}, weights {w.shape} and regions {regions.shape} do not match")
  w = np.where(w > 0, w, 0.0)
  v = np.where(w > 0, v, 0.0)
  per_texel = (v if signed else np.abs(v)) * w
  onehot = (regions[..., None] == np.arange(num_regions)).reshape(-1, num_regions).astype(np.float64)  # [T*T, R]
  flat = lambda a: a.reshape(*a.shape[:-2], -1)
  mass = flat(per_texel) @ onehot
  seen = flat(w) @ onehot
  total = mass.sum(axis=-1, keepdims=True)
  share = np.divide(mass, total, out=np.zeros_like(mass), where=total != 0)
  area = onehot.sum(axis=0)
  area_share = area / max(area.sum(), 1.0)
  density = np.divide(share, area_share, out=np.full_like(share, np.nan), where=area_share > 0)
  mean_value = np.divide(mass, seen, out=np.full_like(mass, np.nan), where=seen > 0)
  return RegionMass(mass, share, area_share, density, mean_value)


def records_region_masses(
  records: Sequence[Mapping[str, Any]], *, regions: Sequence[str] = REGION_NAMES
) -> tuple[list[str], np.ndarray]:
  """Per-image region shares from CMS records: `(names, shares [N, R])` over the records with status "ok".

  Reads the key "region_mass" (what `runs.run_cms` writes; "region_masses" too, as older records have it);
  a region missing from a record is NaN.
  """
  names, rows = [], []
  for rec in records:
    if rec.get("status", "ok") != "ok":
      continue
    masses = rec.get("region_mass", rec.get("region_masses"))
    if masses is None:
      raise ValueError(f"record {rec.get('index')} ({rec.get('name')!r}) holds no region masses")
    names.append(rec.get("name"))
    rows.append([float(masses.get(r, np.nan)) for r in regions])
  return names, np.asarray(rows, np.float64).reshape(len(rows), len(regions))


def records_in_group(records: Sequence[Mapping[str, Any]], group: str) -> np.ndarray:
  """[N] bool over the records with status "ok" (in order, as `records_region_masses` lists them): whether
  each image was accumulated into `group` (e.g. "pred_female", "label_male", "misclassified")."""
  return np.array([group in rec.get("groups", ()) for rec in records if rec.get("status", "ok") == "ok"], bool)


# ------------------------------------------------------------------------------------------ bootstrap


def _norm_ppf(q):
  from scipy.stats import norm

  return norm.ppf(q)


def _norm_cdf(x):
  from scipy.stats import norm

  return norm.cdf(x)


def bootstrap_ci(
  values: Any,
  *,
  statistic: Callable[..., np.ndarray] = np.nanmean,
  confidence: float = 0.95,
  num_resamples: int = 2000,
  method: str = "percentile",
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Bootstrap confidence interval over images (the first axis) of a per-image statistic.

  Args:
    values: [N, ...] one row per image (e.g. region shares [N, R]).
    statistic: `f(array, axis=...)` reducing over an axis; default `np.nanmean` (NaN rows of a column skipped).
    confidence: the interval's coverage, e.g. 0.95.
    num_resamples: bootstrap resamples B.
    method: "percentile" or "bca" (bias-corrected and accelerated, with the jackknife acceleration).
    seed: the resampling seed (numpy's default generator).

  Returns:
    (estimate [...], low [...], high [...]): the statistic on the data and the interval ends.
  """
  if method not in BOOTSTRAP_METHODS:
    raise ValueError(f"bootstrap method {method!r} is not one of {BOOTSTRAP_METHODS}")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  x = np.asarray(values, np.float64)
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"need at least 2 images for a bootstrap, got {n}")
  rng = np.random.default_rng(seed)
  estimate = statistic(x, axis=0)
  idx = rng.integers(0, n, size=(num_resamples, n))
  boot = statistic(x[idx], axis=1)  # [B, ...]
  alpha = (1 - confidence) / 2
  if method == "percentile":
    lo_q, hi_q = np.full(estimate.shape, alpha), np.full(estimate.shape, 1 - alpha)
  else:
    below = np.mean(boot < estimate, axis=0) + 0.5 * np.mean(boot == estimate, axis=0)
    z0 = _norm_ppf(np.clip(below, 1.0 / (num_resamples + 1), num_resamples / (num_resamples + 1)))
    keep = ~np.eye(n, dtype=bool)
    jack = np.stack([statistic(x[keep[i]], axis=0) for i in range(n)])  # [N, ...]
    d = jack.mean(axis=0) - jack
    den = 6.0 * np.sum(d**2, axis=0) ** 1.5
    accel = np.divide(np.sum(d**3, axis=0), den, out=np.zeros_like(den), where=den > 0)
    z = _norm_ppf(np.array([alpha, 1 - alpha]))
    lo_q, hi_q = (_norm_cdf(z0 + (z0 + zk) / (1 - accel * (z0 + zk))) for zk in z)
  flat_boot = boot.reshape(num_resamples, -1)
  lo = np.array([np.nanquantile(flat_boot[:, k], q) for k, q in enumerate(np.ravel(lo_q))]).reshape(estimate.shape)
  hi = np.array([np.nanquantile(flat_boot[:, k], q) for k, q in enumerate(np.ravel(hi_q))]).reshape(estimate.shape)
  return estimate, lo, hi


# ------------------------------------------------------------------------------------------ group means


def _check_group(in_group: Any, n: int) -> np.ndarray:
  g = np.asarray(in_group)
  if g.shape != (n,) or g.dtype != bool:
    raise ValueError(f"group membership must be bool [{n}], got {g.dtype} {g.shape}")
  return g


def group_mean(textures: Any, weights: Any) -> tuple[np.ndarray, np.ndarray]:
  """Weighted mean texture of a group: `(mean [T, T] float64, NaN where no image has data; valid [T, T])`."""
  v = np.asarray(textures, np.float64)
  w = np.maximum(np.asarray(weights, np.float64), 0.0)
  num = np.sum(np.where(w > 0, v, 0.0) * w, axis=0)
  den = np.sum(w, axis=0)
  valid = den > 0
  return np.divide(num, den, out=np.full(num.shape, np.nan), where=valid), valid


def difference_map(textures: Any, weights: Any, in_a: Any, in_b: Any | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Signed difference of two groups' mean textures, A - B (draw on a diverging scale).

  Args:
    textures: [N, T, T].
    weights: [N, T, T].
    in_a: [N] bool, images of group A.
    in_b: [N] bool, images of group B (default: the others).

  Returns:
    (difference [T, T] float64, NaN where either group has no data; valid [T, T] bool).
  """
  v, w = np.asarray(textures), np.asarray(weights)
  a = _check_group(in_a, v.shape[0])
  b = ~a if in_b is None else _check_group(in_b, v.shape[0])
  mean_a, valid_a = group_mean(v[a], w[a])
  mean_b, valid_b = group_mean(v[b], w[b])
  valid = valid_a & valid_b
  return np.where(valid, mean_a - mean_b, np.nan), valid


# ------------------------------------------------------------------------------------------ region tests


def holm(p_values: Any) -> np.ndarray:
  """Holm's step-down adjusted p-values (family-wise error control), same shape; NaN entries stay NaN."""
  p = np.asarray(p_values, np.float64)
  flat = p.ravel()
  ok = np.flatnonzero(np.isfinite(flat))
  m = ok.size
  out = np.full(flat.shape, np.nan)
  order = ok[np.argsort(flat[ok], kind="stable")]
  adjusted = np.minimum(np.maximum.accumulate((m - np.arange(m)) * flat[order]), 1.0)
  out[order] = adjusted
  return out.reshape(p.shape)


def paired_permutation_test(differences: Any, *, num_permutations: int = 9999, seed: int = 0) -> tuple[float, float]:
  """Two-sided sign-flip permutation test that paired per-image differences have mean 0.

  Under the null the two members of each pair are exchangeable, so each difference is as likely with either
  sign. All ``2**n`` sign patterns are enumerated when there are no more than ``num_permutations + 1`` of them
  (exact p-value, the observed pattern included); otherwise `num_permutations` random ones are drawn and
  ``p = (1 + #{|null| >= |observed|}) / (1 + P)``. Binary per-image values (0/1 indicators) make this an exact
  McNemar-type test.

  Args:
    differences: [N] per-image differences a - b; NaN entries (images missing in either) are left out.
    num_permutations: random sign patterns P when enumeration is too large.
    seed: the random patterns' seed.

  Returns:
    (mean difference, two-sided p-value); (NaN, NaN) with no finite difference, and p = 1 when all are 0.
  """
  d = np.asarray(differences, np.float64).ravel()
  d = d[np.isfinite(d)]
  n = d.size
  if n == 0:
    return float("nan"), float("nan")
  observed = float(d.mean())
  if n < 63 and 2**n <= num_permutations + 1:
    bits = (np.arange(2**n)[:, None] >> np.arange(n)[None, :]) & 1
    null = ((1 - 2 * bits) * d).mean(axis=1)
    extra, total = 0, 2**n
  else:
    flips = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(num_permutations, n))
    null = (flips * d).mean(axis=1)
    extra, total = 1, num_permutations + 1
  tol = 1e-12 * max(1.0, abs(observed))
  p = (extra + np.sum(np.abs(null) >= abs(observed) - tol)) / total
  return observed, float(min(p, 1.0))


class RegionTest(NamedTuple):
  """Per-region permutation test of group A vs group B.

  Attributes:
    difference: [R] mean of A - mean of B.
    p_value: [R] two-sided permutation p-value per region.
    p_holm: [R] Holm-adjusted over the regions.
    significant: [R] p_holm <= alpha.
  """

  difference: np.ndarray
  p_value: np.ndarray
  p_holm: np.ndarray
  significant: np.ndarray


def _permuted_groups(in_a: np.ndarray, num_permutations: int, rng: np.random.Generator) -> np.ndarray:
  """[P, N] float random relabellings with the same group sizes."""
  n = in_a.size
  keys = rng.random((num_permutations, n))
  order = np.argsort(keys, axis=1)
  return in_a[order].astype(np.float64)


def region_permutation_test(
  values: Any,
  in_a: Any,
  *,
  num_permutations: int = 9999,
  alpha: float = 0.05,
  seed: int = 0,
) -> RegionTest:
  """Whether two groups differ per region: difference of means, label permutations, Holm over regions.

  Args:
    values: [N, R] per-image, per-region values (e.g. `region_mass(...).share` or the records' region masses);
      NaN = missing (left out of that region's means).
    in_a: [N] bool, images of group A (the rest are B).
    num_permutations: random relabellings P.
    alpha: family-wise level for `significant`.
    seed: the permutations' seed.

  Returns:
    `RegionTest`.
  """
  x = np.asarray(values, np.float64)
  a = _check_group(in_a, x.shape[0])
  if a.all() or not a.any():
    raise ValueError("both groups need at least one image")
  ok = np.isfinite(x).astype(np.float64)
  x0 = np.where(ok > 0, x, 0.0)

  def diffs(labels):  # [P, N] -> [P, R]
    sum_a, cnt_a = labels @ x0, labels @ ok
    sum_b, cnt_b = (1 - labels) @ x0, (1 - labels) @ ok
    with np.errstate(invalid="ignore", divide="ignore"):
      return sum_a / cnt_a - sum_b / cnt_b

  observed = diffs(a[None].astype(np.float64))[0]
  null = diffs(_permuted_groups(a, num_permutations, np.random.default_rng(seed)))
  tol = 1e-12 * np.maximum(1.0, np.abs(observed))
  exceed = np.sum(np.abs(null) >= np.abs(observed) - tol, axis=0)
  p = np.where(np.isfinite(observed), (1 + exceed) / (1 + num_permutations), np.nan)
  p_holm = holm(p)
  return RegionTest(observed, p, p_holm, np.nan_to_num(p_holm, nan=1.0) <= alpha)


# ------------------------------------------------------------------------------------------ cluster test


def weighted_t_map(textures: Any, weights: Any, in_a: Any) -> np.ndarray:
  """Welch t of A vs B per texel, with per-image weights as reliability weights: [T, T], NaN where undefined.

  Per group: weighted mean m = sum(w v) / sum(w), variance s2 = sum(w (v - m)^2) / sum(w), effective count
  n = (sum w)^2 / sum(w^2); standard error^2 = s2 / (n - 1) (equal to the usual s^2 / n when weights are 0/1).
  Undefined where either group has n < 2 or both standard errors are 0.
  """
  v = np.asarray(textures, np.float64)
  n = v.shape[0]
  a = _check_group(in_a, n)
  return _t_maps(v.reshape(n, -1), np.asarray(weights, np.float64).reshape(n, -1), a[None].astype(np.float64))[
    0
  ].reshape(v.shape[1:])


def _t_maps(v: np.ndarray, w: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """t maps [P, K] for labellings [P, N] of textures v [N, K] with weights w [N, K]."""
  w = np.where(w > 0, w, 0.0)
  v = np.where(w > 0, v, 0.0)
  wv, wv2, w2 = w * v, w * v * v, w * w
  totals = [a.sum(axis=0) for a in (w, wv, wv2, w2)]

  def moments(s0, s1, s2, q):
    with np.errstate(invalid="ignore", divide="ignore"):
      mean = s1 / s0
      var = np.maximum(s2 / s0 - mean**2, 0.0)
      n_eff = s0**2 / q
      se2 = var / (n_eff - 1)
    return mean, se2, n_eff

  a = [labels @ x for x in (w, wv, wv2, w2)]
  b = [t - x for t, x in zip(totals, a)]
  mean_a, se2_a, n_a = moments(*a)
  mean_b, se2_b, n_b = moments(*b)
  se = np.sqrt(se2_a + se2_b)
  ok = (n_a >= _MIN_EFFECTIVE_IMAGES) & (n_b >= _MIN_EFFECTIVE_IMAGES) & (se > 0)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(ok, (mean_a - mean_b) / np.where(ok, se, 1.0), np.nan)


def _union_find_label(mask: np.ndarray) -> tuple[np.ndarray, int]:
  """4-connected components of a 2-D bool mask: (labels int32, 0 = background, 1..K; K)."""
  height, width = mask.shape
  parent = np.arange(height * width)

  def find(i):
    while parent[i] != i:
      parent[i] = parent[parent[i]]
      i = parent[i]
    return i

  flat = mask.ravel()
  for i in np.flatnonzero(flat):
    r, c = divmod(int(i), width)
    for j in ((i - width) if r > 0 else -1, (i - 1) if c > 0 else -1):
      if j >= 0 and flat[j]:
        ri, rj = find(i), find(j)
        if ri != rj:
          parent[max(ri, rj)] = min(ri, rj)
  labels = np.zeros(height * width, np.int32)
  roots: dict[int, int] = {}
  for i in np.flatnonzero(flat):  # raster order: labels numbered as scipy numbers them
    labels[i] = roots.setdefault(find(int(i)), len(roots) + 1)
  return labels.reshape(height, width), len(roots)


def label_clusters(mask: Any, *, use_scipy: bool = True) -> tuple[np.ndarray, int]:
  """4-connected components of a [T, T] bool mask: (labels [T, T] int32, 0 = none, 1..K; K).

  `scipy.ndimage.label` with its default (cross-shaped, 4-connectivity) structure when scipy is importable and
  `use_scipy`; otherwise a small union-find with the same numbering (components in raster order of their first
  texel).
  """
  mask = np.asarray(mask, bool)
  if use_scipy:
    try:
      from scipy import ndimage
    except ImportError:
      pass
    else:
      labels, count = ndimage.label(mask)
      return labels.astype(np.int32), int(count)
  return _union_find_label(mask)


def _clusters(t: np.ndarray, threshold: float) -> tuple[np.ndarray, list[tuple[int, float, int]]]:
  """Signed clusters of a t map: labels [T, T] (0 none) and (sign, mass, size) per label 1..K."""
  labels = np.zeros(t.shape, np.int32)
  found: list[tuple[int, float, int]] = []
  finite = np.nan_to_num(t, nan=0.0)
  for sign in (1, -1):
    lab, count = label_clusters(sign * finite > threshold)
    if count:
      masses = np.bincount(lab.ravel(), weights=np.abs(finite).ravel(), minlength=count + 1)[1:]
      sizes = np.bincount(lab.ravel(), minlength=count + 1)[1:]
      labels = np.where(lab > 0, lab + len(found), labels)
      found += [(sign, float(m), int(s)) for m, s in zip(masses, sizes)]
  return labels, found


class ClusterResult(NamedTuple):
  """Texel-level cluster permutation test of group A vs group B.

  Attributes:
    t: [T, T] the observed Welch t map (NaN where undefined).
    labels: [T, T] int32 cluster index 1..K of each texel (0: in no cluster).
    clusters: per cluster k = labels value k: {"sign" (+1: A > B), "mass" (sum |t|), "size" (texels),
      "p_value"}.
    significant: [T, T] bool texels in clusters with p_value <= alpha.
    threshold: the cluster-forming |t| threshold used.
    null_max_mass: [P] the largest cluster mass of each permutation (0 when it had none).
  """

  t: np.ndarray
  labels: np.ndarray
  clusters: list[dict[str, float]]
  significant: np.ndarray
  threshold: float
  null_max_mass: np.ndarray


def cluster_permutation_test(
  textures: Any,
  weights: Any,
  in_a: Any,
  *,
  threshold: float | None = None,
  num_permutations: int = 999,
  alpha: float = 0.05,
  seed: int = 0,
) -> ClusterResult:
  """Where on the texture two groups differ, with family-wise error control over all texels (max cluster mass).

  Args:
    textures: [N, T, T] per-image textures (CIS), NaN allowed where the weight is 0.
    weights: [N, T, T] in [0, 1], 0 = no data.
    in_a: [N] bool, images of group A (the rest are B).
    threshold: cluster-forming |t| (default: the two-sided 5% point of Student's t with N - 2 degrees of
      freedom).
    num_permutations: random relabellings P.
    alpha: level for `significant`.
    seed: the permutations' seed.

  Returns:
    `ClusterResult`.
  """
  v = np.asarray(textures, np.float64)
  w = np.asarray(weights, np.float64)
  if v.ndim != 3 or v.shape != w.shape:
    raise ValueError(f"need textures and weights [N, T, T] of one shape, got {v.shape} and {w.shape}")
  n = v.shape[0]
  a = _check_group(in_a, n)
  if a.sum() < 2 or (~a).sum() < 2:
    raise ValueError("each group needs at least 2 images")
  if threshold is None:
    from scipy.stats import t as student_t

    threshold = float(student_t.ppf(0.975, df=n - 2))
  flat_v, flat_w = v.reshape(n, -1), w.reshape(n, -1)
  t_obs = _t_maps(flat_v, flat_w, a[None].astype(np.float64))[0].reshape(v.shape[1:])
  labels, found = _clusters(t_obs, threshold)
  rng = np.random.default_rng(seed)
  null = np.zeros(num_permutations)
  for start in range(0, num_permutations, _PERMUTATION_CHUNK):
    perm = _permuted_groups(a, min(_PERMUTATION_CHUNK, num_permutations - start), rng)
    for k, t_perm in enumerate(_t_maps(flat_v, flat_w, perm)):
      _, perm_found = _clusters(t_perm.reshape(v.shape[1:]), threshold)
      null[start + k] = max((m for _, m, _ in perm_found), default=0.0)
  clusters = []
  significant = np.zeros(t_obs.shape, bool)
  for k, (sign, mass, size) in enumerate(found, start=1):
    p = (1 + np.sum(null >= mass * (1 - 1e-12))) / (1 + num_permutations)
    clusters.append({"sign": sign, "mass": mass, "size": size, "p_value": float(p)})
    if p <= alpha:
      significant |= labels == k
  return ClusterResult(t_obs, labels, clusters, significant, float(threshold), null)
