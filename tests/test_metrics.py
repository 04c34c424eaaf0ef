"""Tests for `evidence.metrics`: mass scaling, the drop protocol, deletion/insertion, controls, randomisation."""

import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from canonsal_jax import faces, fileio, models, occlusion, raster
from canonsal_jax.evidence import metrics

_H = _W = 8
_C = 2


def _linear_two_class(seed=0):
  """A model whose class-0 logit is linear in the pixels, sum(w * x), and class 1's is 0: `(apply_fn, w)`."""
  w = np.random.default_rng(seed).normal(size=(_H, _W, _C)).astype(np.float32)

  def apply_fn(params, x):
    logit = jnp.sum(x * params, axis=(1, 2, 3))
    return jnp.stack([logit, jnp.zeros_like(logit)], axis=-1)

  return apply_fn, jnp.asarray(w)


def _bisect_mass(m: np.ndarray, target: float) -> np.ndarray:
  """Independent reference for the "clipped" rule: bisection on s of sum(min(s m, 1)) = target (float64)."""
  m = np.maximum(m.astype(np.float64), 0)
  lo, hi = 0.0, 1e12
  for _ in range(200):
    mid = np.sqrt(lo * hi) if lo > 0 else hi / 2**40
    if np.minimum(mid * m, 1).sum() < target:
      lo = mid
    else:
      hi = mid
  return np.minimum(hi * m, 1)


# ------------------------------------------------------------------------------------------ mass


def test_clipped_rule_gives_every_map_the_same_mass_and_matches_a_bisection():
  rng = np.random.default_rng(0)
  maps = np.stack([rng.exponential(size=(16, 16)) ** p for p in (1, 4, 8)] + [rng.normal(size=(16, 16))])
  out = np.asarray(metrics.scale_to_mass(maps, mass=0.1))
  target = 0.1 * 256
  np.testing.assert_allclose(out.sum(axis=(1, 2)), target, rtol=1e-4)
  assert out.min() >= 0 and out.max() <= 1
  for m, o in zip(maps, out):
    np.testing.assert_allclose(o, _bisect_mass(m, target), atol=1e-4)
  # The peaky map saturates some pixels; the literal rule would have lost mass to the clip.
  literal = np.asarray(metrics.scale_to_mass(maps, mass=0.1, rule="before_clip"))
  assert (out[2] == 1).sum() > 0 and literal[2].sum() < 0.9 * target
  np.testing.assert_allclose(literal[0], np.clip(maps[0] * target / maps[0].sum(), 0, 1), rtol=1e-5)


def test_mass_edge_cases_zero_map_small_support_and_invalid_pixels():
  maps = np.zeros((3, 10, 10), np.float32)
  maps[1, 0, :5] = [5, 4, 3, 2, 1]  # 5 positive pixels, target 10: can only hide its support
  maps[2] = 1.0
  valid = np.ones((3, 10, 10), bool)
  valid[2, :5] = False  # half of the uniform map has no data
  out = np.asarray(metrics.scale_to_mass(maps, valid, mass=0.1))
  assert out[0].sum() == 0
  np.testing.assert_array_equal(out[1], (maps[1] > 0).astype(np.float32))
  assert np.all(out[2, :5] == 0)
  np.testing.assert_allclose(out[2, 5:], 10 / 50, rtol=1e-6)


# ------------------------------------------------------------------------------------------ drop protocol


def _images(seed=1, batch=4):
  return np.random.default_rng(seed).normal(size=(batch, _H, _W, _C)).astype(np.float32)


def test_protocol_scores_each_image_against_its_own_score():
  apply_fn, w = _linear_two_class()
  x = _images()
  rng = np.random.default_rng(2)
  maps = rng.exponential(size=(2, len(x), _H, _W)).astype(np.float32)
  protocol = metrics.make_mass_protocol(apply_fn, mass=0.2)
  result = protocol(w, x, maps)

  # Reference, image by image in numpy: probability of the predicted class before and after occlusion.
  def prob(image, cls):
    logit = float(np.sum(image * np.asarray(w)))
    p0 = 1 / (1 + np.exp(-logit))
    return p0 if cls == 0 else 1 - p0

  scaled = np.asarray(metrics.scale_to_mass(maps, mass=0.2))
  original = np.array([prob(xi, 0 if np.sum(xi * np.asarray(w)) > 0 else 1) for xi in x])
  assert np.ptp(original) > 0.1  # the images really have different scores
  np.testing.assert_allclose(np.asarray(result.original), original, rtol=1e-5)
  for k in range(2):
    for i, xi in enumerate(x):
      cls = int(result.target[i])
      np.testing.assert_allclose(float(result.occluded[k, i]), prob(xi * (1 - scaled[k, i, ..., None]), cls), rtol=1e-4)
  drops = np.maximum(original - np.asarray(result.occluded), 0) / original
  summary = metrics.protocol_summary(result, ["a", "b"])
  np.testing.assert_allclose(summary["a"]["average_drop_pct"], 100 * drops[0].mean(), rtol=1e-5)
  # The published bug (every image divided by the batch's last score) gives another number on this batch.
  buggy = np.maximum(original[-1] - np.asarray(result.occluded), 0) / original[-1]
  assert abs(100 * buggy[0].mean() - summary["a"]["average_drop_pct"]) > 1.0
  # Batched equals one image at a time.
  for i in range(len(x)):
    one = protocol(w, x[i : i + 1], maps[:, i : i + 1])
    np.testing.assert_allclose(np.asarray(one.occluded)[:, 0], np.asarray(result.occluded)[:, i], rtol=1e-5)


def test_protocol_baseline_is_what_a_full_map_reveals():
  apply_fn, w = _linear_two_class()
  x = _images(batch=2)
  full = np.ones((1, 2, _H, _W), np.float32)
  score = occlusion.Score("logit")
  for baseline, expect in ((0.0, lambda xi: 0.0), (0.5, lambda xi: 0.5 * float(np.sum(w[..., :]))), ("mean", None)):
    result = metrics.make_mass_protocol(apply_fn, score=score, baseline=baseline, mass=1.0)(w, x, full, target=0)
    for i in range(2):
      want = float(np.sum(np.mean(x[i], axis=(0, 1)) * np.asarray(w))) if expect is None else expect(x[i])
      np.testing.assert_allclose(float(result.occluded[0, i]), want, atol=1e-4)


def test_non_positive_original_scores_are_excluded_and_counted():
  apply_fn, w = _linear_two_class()
  x = _images(batch=5)
  logits = np.einsum("bhwc,hwc->b", x, np.asarray(w))
  maps = np.random.default_rng(3).exponential(size=(2, 5, _H, _W)).astype(np.float32)
  # The class-0 logit as the score: images with a negative logit have a non-positive score.
  protocol = metrics.make_mass_protocol(apply_fn, score=occlusion.Score("logit"), mass=0.2)
  result = protocol(w, x, maps, target=0)
  positive = logits > 0
  assert 0 < positive.sum() < 5
  summary = metrics.protocol_summary(result, ["a", "b"])
  assert summary["a"]["num_excluded"] == int((~positive).sum()) and summary["a"]["num_images"] == positive.sum()
  kept = metrics.protocol_summary(protocol(w, x[positive], maps[:, positive], target=0), ["a", "b"])
  for key in ("average_drop_pct", "increase_in_confidence_pct", "win_pct"):
    np.testing.assert_allclose(summary["a"][key], kept["a"][key], rtol=1e-6)
  none = metrics.protocol_summary(protocol(w, x[~positive], maps[:, ~positive], target=0), ["a", "b"])
  assert np.isnan(none["a"]["average_drop_pct"]) and none["a"]["num_images"] == 0


def test_protocol_summary_known_answers():
  result = metrics.ProtocolResult(
    original=np.array([1.0, 0.5, 0.8, 0.0]),
    occluded=np.array([[0.5, 0.5, 0.9, 0.1], [0.75, 0.25, 0.4, 0.2], [0.5, 0.6, 0.4, 0.3]]),
    target=np.zeros(4, np.int32),
    mass=np.ones((3, 4)),
  )
  s = metrics.protocol_summary(result, ["a", "b", "c"])
  # Drops (image 4 excluded, score 0): a = [.5, 0, 0], b = [.25, .5, .5], c = [.5, 0, .5].
  np.testing.assert_allclose(s["a"]["average_drop_pct"], 100 * 0.5 / 3)
  np.testing.assert_allclose(s["b"]["average_drop_pct"], 100 * 1.25 / 3)
  np.testing.assert_allclose(s["a"]["increase_in_confidence_pct"], 100 / 3)  # image 3: 0.9 > 0.8
  np.testing.assert_allclose(s["c"]["increase_in_confidence_pct"], 100 / 3)  # image 2: 0.6 > 0.5
  # Wins: image 1 a and c tie (half each), image 2 b, image 3 b and c tie.
  np.testing.assert_allclose([s[k]["win_pct"] for k in "abc"], [100 * 0.5 / 3, 100 * 1.5 / 3, 100 * 1.0 / 3])
  np.testing.assert_allclose(s["b"]["pairwise_win_pct"]["a"], 100 * 2 / 3)
  np.testing.assert_allclose(s["c"]["pairwise_win_pct"]["b"], 100 * 1.5 / 3)
  assert s["a"]["num_excluded"] == 1


# ------------------------------------------------------------------------------------------ the paper's protocol


def _paper_case():
  """Two methods' maps on one 2 x 2 face, its crop, and the scaled maps worked out by hand.

  CMS [[7, 1], [3, 5]] with the 7 marked invalid: 0 there, then min-max (0 to 5): [[0, .2], [.6, 1]], sum 1.8.
  Rival [[-3, -1], [1, 2]]: clipped to [[0, 0], [1, 2]], min-max: [[0, 0], [.5, 1]], sum 1.5, times 1.8 / 1.5:
  [[0, 0], [.6, 1.2]], over 1 at the bottom right.
  """
  maps = np.array([[[[7, 1], [3, 5]]], [[[-3, -1], [1, 2]]]], np.float32)  # [M=2, B=1, 2, 2]
  valid = np.ones(maps.shape, bool)
  valid[0, 0, 0, 0] = False
  crop = np.array([[[[5, 128, 255], [77, 0, 201]], [[11, 251, 33], [101, 3, 57]]]], np.uint8)  # [1, 2, 2, 3]
  scaled = np.array([[[[0, 0.2], [0.6, 1]]], [[[0, 0], [0.6, 1.2]]]], np.float32)
  return maps, valid, crop, scaled


def test_paper_scaling_min_max_then_the_cms_sum_by_hand():
  maps, valid, _, scaled = _paper_case()
  np.testing.assert_allclose(np.asarray(metrics.minmax_scale(maps[1])), [[[0, 0], [0.5, 1]]])
  np.testing.assert_allclose(np.asarray(metrics.minmax_scale(maps[0], valid[0])), [[[0, 0.2], [0.6, 1]]], rtol=1e-6)
  out = np.asarray(metrics.paper_scale(maps, valid, reference=0))
  np.testing.assert_allclose(out, scaled, rtol=1e-6)
  np.testing.assert_allclose(out.sum(axis=(-2, -1)), [[1.8], [1.8]], rtol=1e-6)
  assert out[1].max() > 1  # not clipped: the paper's rescaled rival exceeds 1
  # The reference is the other way round: the CMS given the rival's sum.
  other = np.asarray(metrics.paper_scale(maps, valid, reference=1))
  np.testing.assert_allclose(other[0], scaled[0] * 1.5 / 1.8, rtol=1e-6)
  # A constant map (no min-max span) and an all-zero map hide nothing.
  flat = np.stack([maps[0], np.full_like(maps[0], 3.0), np.zeros_like(maps[0])])
  assert np.all(np.asarray(metrics.paper_scale(flat, reference=0))[1:] == 0)


def test_explanation_images_wrap_as_published_and_clip_by_default():
  _, _, crop, scaled = _paper_case()
  published = metrics.explanation_images(crop, scaled, paper_as_published=True)  # [2, 1, 2, 2, 3]
  clipped = metrics.explanation_images(crop, scaled)
  assert published.dtype == clipped.dtype == np.uint8 and published.shape == (2, 1, 2, 2, 3)
  # Pixel by pixel, 255 * (v / 255) * (1 - m) truncated: m = 0 keeps v; m = .2 keeps .8 v; m = .6 keeps .4 v.
  cms = [[[5, 128, 255], [61, 0, 160]], [[4, 100, 13], [0, 0, 0]]]  # .8 * (77, 0, 201); .4 * (11, 251, 33)
  np.testing.assert_array_equal(published[0, 0], cms)
  np.testing.assert_array_equal(clipped[0, 0], cms)
  # m = 1.2 on (101, 3, 57): -.2 v = (-20.2, -0.6, -11.4), truncated (-20, 0, -11), wrapped mod 256.
  rival = [[[5, 128, 255], [77, 0, 201]], [[4, 100, 13], [236, 0, 245]]]
  np.testing.assert_array_equal(published[1, 0], rival)
  np.testing.assert_array_equal(clipped[1, 0, 1, 1], [0, 0, 0])  # clipped to black
  np.testing.assert_array_equal(clipped[1, 0, :, 0], published[1, 0, :, 0])
  # The wrap is numpy's own cast on x86-64 (elsewhere numpy may saturate; the written-out cast does not).
  values = np.array([-20.2, -0.6, -11.4, -255.3, 300.2, 255.9], np.float32)
  np.testing.assert_array_equal(metrics.uint8_cast(values), [236, 0, 245, 1, 44, 255])
  if platform.machine() in ("x86_64", "AMD64"):
    with np.errstate(invalid="ignore"):
      np.testing.assert_array_equal(metrics.uint8_cast(values), values.astype(np.uint8))


def test_paper_protocol_scores_the_8_bit_images_through_the_preprocessing():
  maps, valid, crop, scaled = _paper_case()
  w = np.random.default_rng(11).normal(size=(2, 2, 3)).astype(np.float32)

  def apply_fn(params, x):
    logit = jnp.sum(x * params, axis=(1, 2, 3))
    return jnp.stack([logit, -logit], axis=-1)

  preprocess = lambda c: (np.asarray(c, np.float32) - 128.0) / 64.0  # a host function of the uint8 crop
  prob = lambda image, cls: 1 / (1 + np.exp(-2 * (1 - 2 * cls) * float(np.sum(preprocess(image) * w))))
  target = int(np.sum(preprocess(crop[0]) * w) < 0)
  for as_published in (True, False):
    protocol = metrics.make_paper_protocol(apply_fn, preprocess, paper_as_published=as_published, batch_size=3)
    result = protocol(jnp.asarray(w), crop, maps, valid)
    images = metrics.explanation_images(crop, scaled, paper_as_published=as_published)
    assert int(result.target[0]) == target
    np.testing.assert_allclose(float(result.original[0]), prob(crop[0], target), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(result.occluded)[:, 0], [prob(im[0], target) for im in images], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(result.mass), [[1.8], [1.8]], rtol=1e-6)
    if as_published:
      published = np.asarray(result.occluded)
  assert float(published[1, 0]) != pytest.approx(float(result.occluded[1, 0]))  # the wrap changes the score
  assert float(published[0, 0]) == pytest.approx(float(result.occluded[0, 0]))  # the CMS never exceeds 1


def test_paper_figures_by_hand_on_three_faces_and_two_methods():
  # Face 1: a drops .8 -> .4 (.5), b -> .6 (.25): a wins. Face 2: both raise .5 (a .6, b .55), drop 0 each, b
  # has the lower score and wins the paper's way (a tie by drop). Face 3: a raises .4 -> .5, b drops to .2 (.5).
  result = metrics.ProtocolResult(
    original=np.array([0.8, 0.5, 0.4]),
    occluded=np.array([[0.4, 0.6, 0.5], [0.6, 0.55, 0.2]]),
    target=np.zeros(3, np.int32),
    mass=np.ones((2, 3)),
  )
  paper = metrics.protocol_summary(result, ["a", "b"], win="lowest_score")
  np.testing.assert_allclose([paper[k]["average_drop_pct"] for k in "ab"], [100 * 0.5 / 3, 100 * 0.75 / 3])
  np.testing.assert_allclose([paper[k]["increase_in_confidence_pct"] for k in "ab"], [200 / 3, 100 / 3])
  np.testing.assert_allclose([paper[k]["win_pct"] for k in "ab"], [100 / 3, 200 / 3])
  by_drop = metrics.protocol_summary(result, ["a", "b"])
  np.testing.assert_allclose([by_drop[k]["win_pct"] for k in "ab"], [50, 50])
  table = metrics.paper_table(result, ["a", "b"], reference="a", num_resamples=200)
  assert [row["method"] for row in table["rows"]] == ["a", "b"]
  assert table["rows"][1]["win_pct"] == pytest.approx(200 / 3)
  for row in table["rows"]:
    for figure in metrics.PAPER_FIGURES:
      lo, hi = row[f"{figure}_ci"]
      assert lo <= row[figure] <= hi
  # Three faces: the exact sign-flip test cannot go below 2 / 8, so no finding and no claim.
  assert [c["figure"] for c in table["comparisons"]] == list(metrics.PAPER_FIGURES)
  assert all(c["finding"] == "no difference shown" and c["p_value"] >= 0.25 for c in table["comparisons"])
  assert not any(claim["supported"] for claim in table["claims"].values())


def test_paper_table_claims_only_what_the_corrected_tests_support():
  n = 12  # 2**12 sign patterns, enumerated: the smallest two-sided p-value is 2 / 4096
  result = metrics.ProtocolResult(
    original=np.full(n, 0.9),
    occluded=np.stack([np.full(n, 0.1), np.linspace(0.5, 0.8, n)]),
    target=np.zeros(n, np.int32),
    mass=np.ones((2, n)),
  )
  table = metrics.paper_table(result, ["cms", "rival"], reference="cms", num_resamples=200)
  found = {c["figure"]: c for c in table["comparisons"]}
  assert found["average_drop_pct"]["finding"] == found["win_pct"]["finding"] == "cms better"
  np.testing.assert_allclose(found["average_drop_pct"]["p_holm"], 3 * 2 / 4096)  # Holm: 3 x the smallest
  assert found["increase_in_confidence_pct"]["finding"] == "no difference shown"  # no image raised
  assert table["claims"]["win_pct"]["supported"] and not table["claims"]["increase_in_confidence_pct"]["supported"]
  assert "rival" in table["claims"]["increase_in_confidence_pct"]["statement"]


# ------------------------------------------------------------------------------------------ the headline protocol


def test_pixel_blur_of_an_impulse_is_the_sampled_gaussian_by_hand():
  crop = np.zeros((1, 33, 33, 3), np.uint8)
  crop[0, 16, 16] = (255, 0, 100)
  out = metrics.pixel_blur(crop, sigma=2.0)
  assert out.dtype == np.uint8 and out.shape == crop.shape
  # The kernel sampled at -8..8 (4 sigma) and normalised; separable, so the centre keeps w0 ** 2 of the impulse.
  t = np.arange(-8, 9, dtype=np.float64)
  w = np.exp(-(t**2) / 8.0)
  w /= w.sum()
  np.testing.assert_array_equal(out[0, 16, 16], np.rint(np.array([255, 0, 100]) * w[8] ** 2))  # 10, 0, 4
  np.testing.assert_array_equal(out[0, 16, 18], np.rint(np.array([255, 0, 100]) * w[8] * w[10]))  # 6, 0, 2
  assert out[0, 0, 0].tolist() == [0, 0, 0]  # 16 px away: nothing reaches it
  # Each channel apart, a flat image stays flat, and the blur is not black: it is none of the baselines.
  flat = np.full((2, 8, 8, 3), (30, 60, 90), np.uint8)
  np.testing.assert_array_equal(metrics.pixel_blur(flat, sigma=1.5), flat)
  assert metrics.headline_blur_sigma(32) == 2.0 and metrics.headline_blur_sigma(64) == 4.0
  with pytest.raises(ValueError, match="uint8"):
    metrics.pixel_blur(crop.astype(np.float32), sigma=1.0)
  with pytest.raises(ValueError, match="positive sigma"):
    metrics.pixel_blur(crop, sigma=0.0)


def test_mass_protocol_and_curves_hide_with_the_given_substitute():
  # The linear model's logit: hiding pixel p moves it by w_p * (s_p - x_p), s the substitute; by hand.
  apply_fn, w = _linear_two_class()
  x = _images(batch=2)
  sub = np.random.default_rng(12).normal(size=x.shape).astype(np.float32)
  maps = np.zeros((1, 2, _H, _W), np.float32)
  maps[0, :, :2, :] = 1.0  # the top two rows: 16 of 64 pixels, a quarter
  protocol = metrics.make_mass_protocol(apply_fn, score=occlusion.Score("logit"), mass=0.25)
  result = protocol(w, x, maps, target=0, substitute=sub)
  logit = lambda im: np.einsum("bhwc,hwc->b", np.asarray(im, np.float64), np.asarray(w, np.float64))
  hidden = x.copy()
  hidden[:, :2] = sub[:, :2]
  np.testing.assert_allclose(np.asarray(result.occluded[0]), logit(hidden), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(result.mass), [[16, 16]])
  # Without a substitute the baseline (0) is used: another answer.
  plain = protocol(w, x, maps, target=0)
  np.testing.assert_allclose(np.asarray(plain.occluded[0]), logit(np.where(maps[0][..., None] > 0, 0, x)), atol=1e-4)
  curves = metrics.make_deletion_insertion(apply_fn, score=occlusion.Score("logit"), steps=4)
  r = curves(w, x, maps[0], target=0, substitute=sub)
  np.testing.assert_allclose(np.asarray(r.deletion[:, 1]), logit(hidden), rtol=1e-5, atol=1e-4)  # 1/4 deleted
  np.testing.assert_allclose(np.asarray(r.deletion[:, -1]), logit(sub), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(np.asarray(r.insertion[:, 0]), logit(sub), rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="substitute image per input"):
    protocol(w, x, maps, target=0, substitute=sub[:1])


def test_headline_table_by_hand_tests_all_five_figures():
  n = 12  # 2**12 sign patterns, enumerated: the smallest two-sided p-value is 2 / 4096
  result = metrics.ProtocolResult(
    original=np.full(n, 0.8),
    occluded=np.stack([np.full(n, 0.2), np.linspace(0.4, 0.7, n)]),  # cms drops .75, the rival .125 to .5
    target=np.zeros(n, np.int32),
    mass=np.ones((2, n)),
  )
  fraction = np.linspace(0, 1, 3)

  def curve(deletion_auc, insertion_auc):
    return metrics.CurveResult(fraction, None, None, np.asarray(deletion_auc), np.asarray(insertion_auc), None)

  cms = curve(np.full(n, 0.1), np.full(n, 0.7))
  rival = curve(np.linspace(0.3, 0.5, n), np.linspace(0.5, 0.6, n))
  table = metrics.headline_table(result, [cms, rival], ["cms", "rival"], reference="cms", num_resamples=200)
  assert table["figures"] == list(metrics.HEADLINE_FIGURES)
  rows = {row["method"]: row for row in table["rows"]}
  np.testing.assert_allclose(rows["cms"]["average_drop_pct"], 75.0)
  np.testing.assert_allclose(rows["rival"]["average_drop_pct"], 100 * np.mean(1 - np.linspace(0.4, 0.7, n) / 0.8))
  np.testing.assert_allclose([rows["cms"]["win_pct"], rows["rival"]["win_pct"]], [100, 0])
  np.testing.assert_allclose([rows["cms"]["deletion_auc"], rows["rival"]["deletion_auc"]], [0.1, 0.4])
  np.testing.assert_allclose([rows["cms"]["insertion_auc"], rows["rival"]["insertion_auc"]], [0.7, 0.55])
  found = {c["figure"]: c for c in table["comparisons"]}
  # Four comparisons at 2 / 4096, one (no image raised) at 1: Holm multiplies the smallest by 5.
  for figure in ("average_drop_pct", "win_pct", "deletion_auc", "insertion_auc"):
    assert found[figure]["finding"] == "cms better", figure
    np.testing.assert_allclose(found[figure]["p_holm"], 5 * 2 / 4096)
  assert found["deletion_auc"]["difference"] == pytest.approx(-0.3)  # lower is better: the CMS's
  assert found["increase_in_confidence_pct"]["finding"] == "no difference shown"
  assert table["claims"]["deletion_auc"]["supported"] and not table["claims"]["increase_in_confidence_pct"]["supported"]
  # Reversed curves: the rival is found better on them, and no claim for the CMS there.
  table = metrics.headline_table(result, [rival, cms], ["cms", "rival"], reference="cms", num_resamples=200)
  found = {c["figure"]: c for c in table["comparisons"]}
  assert found["deletion_auc"]["finding"] == found["insertion_auc"]["finding"] == "rival better"
  assert not table["claims"]["insertion_auc"]["supported"]
  with pytest.raises(ValueError, match="2 names for 1 curve"):
    metrics.headline_table(result, [cms], ["cms", "rival"], reference="cms")


# ------------------------------------------------------------------------------------------ deletion, insertion


def test_deletion_and_insertion_of_a_linear_model_follow_the_closed_form():
  apply_fn, w = _linear_two_class()
  x = _images(batch=3)
  contrib = np.sum(x * np.asarray(w), axis=-1)  # [B, H, W] each pixel's share of the logit
  steps = 16
  curves = metrics.make_deletion_insertion(
    apply_fn, score=occlusion.Score("logit"), steps=steps, substrate="constant", constant=0.0, batch_size=5
  )
  result = curves(w, x, contrib, target=0)
  n = _H * _W
  counts = np.arange(steps + 1) * n // steps
  np.testing.assert_allclose(np.asarray(result.fraction), counts / n)
  for i in range(3):
    ordered = np.sort(contrib[i].ravel())[::-1]
    removed = np.concatenate([[0.0], np.cumsum(ordered)])[counts]
    np.testing.assert_allclose(np.asarray(result.deletion[i]), ordered.sum() - removed, atol=1e-4)
    np.testing.assert_allclose(np.asarray(result.insertion[i]), removed, atol=1e-4)
    auc = np.trapezoid(ordered.sum() - removed, counts / n)
    np.testing.assert_allclose(float(result.deletion_auc[i]), auc, atol=1e-4)


def test_an_oracle_map_beats_a_random_one():
  apply_fn, w = _linear_two_class()
  x = _images(batch=6)
  contrib = np.sum(x * np.asarray(w), axis=-1)
  random = np.random.default_rng(5).normal(size=contrib.shape).astype(np.float32)
  for substrate in metrics.SUBSTRATES:
    curves = metrics.make_deletion_insertion(
      apply_fn, score=occlusion.Score("logit"), steps=32, substrate=substrate, blur_sigma=1.0
    )
    oracle, chance = curves(w, x, contrib, target=0), curves(w, x, random, target=0)
    assert np.all(np.asarray(oracle.deletion_auc) < np.asarray(chance.deletion_auc))
    assert np.all(np.asarray(oracle.insertion_auc) > np.asarray(chance.insertion_auc))


def test_curves_start_at_the_image_and_end_at_the_substrate():
  apply_fn, w = _linear_two_class()
  x = _images(batch=2)
  maps = np.random.default_rng(6).normal(size=(2, _H, _W)).astype(np.float32)
  curves = metrics.make_deletion_insertion(apply_fn, score=occlusion.Score("logit"), steps=8, blur_sigma=1.5)
  result = curves(w, x, maps, target=0)
  blurred = jax.vmap(lambda im: occlusion._baseline_image(im, "blur", 1.5))(jnp.asarray(x))
  logit = lambda im: np.einsum("bhwc,hwc->b", np.asarray(im), np.asarray(w))
  np.testing.assert_allclose(np.asarray(result.deletion[:, 0]), logit(x), atol=1e-4)
  np.testing.assert_allclose(np.asarray(result.deletion[:, -1]), logit(blurred), atol=1e-4)
  np.testing.assert_allclose(np.asarray(result.insertion[:, 0]), logit(blurred), atol=1e-4)
  np.testing.assert_allclose(np.asarray(result.insertion[:, -1]), logit(x), atol=1e-4)


# ------------------------------------------------------------------------------------------ controls


def test_spearman_matches_scipy_with_ties_and_masks():
  rng = np.random.default_rng(7)
  a = rng.integers(0, 5, size=(3, 6, 6)).astype(np.float32)  # many ties
  b = (a + rng.normal(size=a.shape)).astype(np.float32)
  valid = rng.random(a.shape) > 0.3
  got = np.asarray(metrics.spearman(a, b, valid))
  for k in range(3):
    want = scipy.stats.spearmanr(a[k][valid[k]], b[k][valid[k]]).statistic
    np.testing.assert_allclose(got[k], want, atol=1e-5)
  assert np.isnan(float(metrics.spearman(np.ones((4, 4)), b[0, :4, :4])))


def test_face_mask_and_centred_gaussian():
  xyd = np.array([[1.5, 1.5, 0], [1.5, 6.5, 0], [6.5, 1.5, 0]], np.float32)
  mask = np.asarray(metrics.face_mask(xyd, np.array([[0, 1, 2]]), 8))
  frags = raster.rasterize(xyd, np.array([[0, 1, 2]]), 8, 8)
  np.testing.assert_array_equal(mask, np.asarray(frags.tri_id) >= 0)
  assert 5 < mask.sum() < 20
  g = np.asarray(metrics.centred_gaussian(9))
  assert g.argmax() == 4 * 9 + 4 and g.max() == 1.0
  np.testing.assert_allclose(g, g.T)
  np.testing.assert_allclose(g, g[::-1, ::-1])


def test_compare_with_controls_says_who_beats_what():
  rng = np.random.default_rng(8)
  control = rng.normal(size=40)
  per_image = {
    "good": control + 0.5 + 0.3 * rng.normal(size=40),
    "same": control + 0.3 * rng.normal(size=40),
    "control": control,
  }
  out = metrics.compare_with_controls(per_image, ["control"], num_permutations=999)
  assert out["good"]["control"]["p_value"] < 0.01 and out["good"]["control"]["mean_difference"] > 0.3
  assert out["same"]["control"]["p_value"] > 0.05
  flipped = metrics.compare_with_controls(per_image, ["control"], higher_is_better=False, num_permutations=999)
  assert flipped["good"]["control"]["p_value"] > 0.9  # lower is better now: "good" is worse


# ------------------------------------------------------------------------------------------ randomisation


def test_randomise_params_keeps_shapes_and_scales():
  rng = np.random.default_rng(9)
  params = {
    "conv": {"kernel": jnp.asarray(rng.normal(2.0, 0.3, size=(3, 3, 4, 8)), jnp.float32), "bias": jnp.ones(8)},
    "dense": {"kernel": jnp.asarray(rng.normal(0, 5.0, size=(64, 10)), jnp.float32)},
  }
  out = metrics.randomise_params(params, jax.random.key(0))
  assert jax.tree.structure(out) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(out)):
    assert a.shape == b.shape and a.dtype == b.dtype
  np.testing.assert_array_equal(out["conv"]["bias"], params["conv"]["bias"])
  for layer, mean, std in (("conv", 2.0, 0.3), ("dense", 0.0, 5.0)):
    new, old = np.asarray(out[layer]["kernel"]), np.asarray(params[layer]["kernel"])
    assert abs(new.mean() - mean) < 0.2 * std + 0.05 and abs(new.std() / std - 1) < 0.2
    assert abs(np.corrcoef(new.ravel(), old.ravel())[0, 1]) < 0.2
  names = metrics.weight_paths(params)
  assert names == ["['conv']['kernel']", "['dense']['kernel']"]
  top = metrics.randomise_params(params, jax.random.key(0), select={names[-1]})
  np.testing.assert_array_equal(top["conv"]["kernel"], params["conv"]["kernel"])
  assert not np.array_equal(top["dense"]["kernel"], params["dense"]["kernel"])


@pytest.fixture(scope="module")
def gender_input():
  model = models.load("gender")
  image = fileio.default_image()
  face = faces.largest_face(image, "astronaut", detector=faces.default_detector("hog"), adjust_threshold=0.3)
  crop, _ = faces.crop_face(image, face, model.crop)
  return model, np.asarray(model.preprocess(crop))


def test_occlusion_maps_of_a_randomised_gender_model_do_not_rank_like_the_trained_ones(gender_input):
  model, x = gender_input
  score = occlusion.Score.for_model(model)
  sweep = occlusion.make_sweep(model.apply_fn, patch_size=3, batch_size=16, score=score, baseline=0.0)
  centres = occlusion.grid_centres(32, 32, patch_size=3, stride=1)
  valid = np.ones(len(centres), bool)
  trained = sweep(model.params, x, centres, valid).heatmap
  # Positive control: the same model on a slightly noisy input ranks its pixels nearly alike.
  noisy = x + 0.01 * np.random.default_rng(0).normal(size=x.shape).astype(np.float32) * x.std()
  assert float(metrics.spearman(trained, sweep(model.params, noisy, centres, valid).heatmap)) > 0.8
  rhos = [
    float(
      metrics.spearman(
        trained, sweep(metrics.randomise_params(model.params, jax.random.key(s)), x, centres, valid).heatmap
      )
    )
    for s in range(3)
  ]
  assert max(abs(r) for r in rhos) < 0.4, rhos


def test_protocol_and_curves_do_not_retrace_for_new_inputs_of_the_same_shapes():
  base_fn, w = _linear_two_class()
  traces = []

  def apply_fn(params, x):
    traces.append(x.shape)  # runs only while tracing
    return base_fn(params, x)

  protocol = metrics.make_mass_protocol(apply_fn)
  curves = metrics.make_deletion_insertion(apply_fn, steps=4)
  rng = np.random.default_rng(10)
  for k in range(2):
    x = rng.normal(size=(3, _H, _W, _C)).astype(np.float32)
    maps = rng.random((2, 3, _H, _W)).astype(np.float32)
    protocol(w * rng.random(), x, maps)
    curves(w, x, maps[0])
    if k == 0:
      first = len(traces)
  assert first > 0 and len(traces) == first
