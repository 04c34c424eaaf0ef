"""Tests for `canonsal_jax.cms`: CMS sums, normalisations, exact order independence, merge, checkpoints."""

import functools
import re

import numpy as np
import pytest

from canonsal_jax import cms, fileio

T = 4


def _settings(normalisation="none", texture_size=T, on_invalid="raise"):
  return cms.CMSSettings(texture_size=texture_size, normalisation=normalisation, on_invalid=on_invalid)


def _random_images(n, t, seed=0):
  """n (texture, weight, group) triples whose values span many magnitudes, so float sums depend on order."""
  rng = np.random.default_rng(seed)
  images = []
  for i in range(n):
    texture = (rng.standard_normal((t, t)) * 10.0 ** rng.integers(-6, 7, size=(t, t))).astype(np.float32)
    weight = rng.uniform(0, 1, (t, t)).astype(np.float32)
    weight[rng.uniform(size=(t, t)) < 0.3] = 0
    texture[weight == 0] = np.nan  # no data; must never be read
    images.append((texture, weight, ("all", "even" if i % 2 == 0 else "odd")))
  return images


def _fill(acc, images, order):
  for i in order:
    texture, weight, groups = images[i]
    acc.add(i, f"img{i:03d}.png", texture, weight, group=groups, record={"score": float(i) / 7})
  return acc


def _assert_bitwise_equal(a: cms.CMSAccumulator, b: cms.CMSAccumulator):
  assert a.groups() == b.groups()
  for g in a.groups():
    sa, sb = a.sums(g), b.sums(g)
    for x, y in zip(
      (sa.value_sum, sa.weight_sum, sa.count, sa.abs_sum), (sb.value_sum, sb.weight_sum, sb.count, sb.abs_sum)
    ):
      assert x.dtype == y.dtype and x.tobytes() == y.tobytes()
    assert sa.num_images == sb.num_images
    for x, y in zip(a.mean(g), b.mean(g)):
      assert x.tobytes() == y.tobytes()
  assert a.records() == b.records()


# ------------------------------------------------------------------------------------------ values


def test_mean_is_the_weighted_mean_by_hand():
  acc = cms.CMSAccumulator(_settings())
  textures = [np.full((T, T), v, np.float32) for v in (1.0, 2.0, -3.0)]
  weights = [np.full((T, T), w, np.float32) for w in (1.0, 0.5, 0.25)]
  for i, (x, w) in enumerate(zip(textures, weights)):
    assert acc.add(i, f"{i}.png", x, w, group="g")
  got, valid = acc.mean("g")
  by_hand = (1.0 * 1 + 2.0 * 0.5 - 3.0 * 0.25) / (1 + 0.5 + 0.25)
  np.testing.assert_allclose(got, by_hand, rtol=1e-15)
  assert valid.all()
  s = acc.sums("g")
  np.testing.assert_allclose(s.weight_sum, 1.75, rtol=1e-15)
  np.testing.assert_array_equal(s.count, 3)
  assert s.num_images == 3 and acc.groups() == ["g"]


def test_weight_zero_texels_never_contribute_and_show_no_data():
  acc = cms.CMSAccumulator(_settings())
  a = np.array([[1, 2, 3, 4]] * T, np.float32)
  wa = np.ones((T, T), np.float32)
  wa[:, 0] = 0
  b = np.full((T, T), np.nan, np.float32)  # NaN and huge values only where weight is 0
  b[:, 1] = 1e30
  b[:, 2:] = 10
  wb = np.zeros((T, T), np.float32)
  wb[:, 2:] = 1
  acc.add(0, "a", a, wa)
  acc.add(1, "b", b, wb)
  got, valid = acc.mean("all")
  assert not valid[:, 0].any() and np.isnan(got[:, 0]).all()  # no image saw column 0: no data, not zero
  np.testing.assert_array_equal(got[:, 1], 2.0)
  np.testing.assert_array_equal(got[:, 2], 6.5)
  np.testing.assert_array_equal(got[:, 3], 7.0)
  np.testing.assert_array_equal(acc.sums("all").count, np.array([[0, 1, 2, 2]] * T))
  _, valid2 = acc.mean("all", min_count=2)
  np.testing.assert_array_equal(valid2[0], [False, False, True, True])


@pytest.mark.parametrize(
  ("normalisation", "expected"),
  [("none", 1.0), ("max_abs", 4.0), ("sum_abs", 2 * 1 + 4 * 0.5 + 1 * 0.25)],
)
def test_normalisations_known_answers(normalisation, expected):
  texture = np.array([[2, -4], [1, 100]], np.float32)
  weight = np.array([[1, 0.5], [0.25, 0]], np.float32)  # the 100 is not visible
  assert cms.normaliser(texture, weight, normalisation) == expected
  acc = cms.CMSAccumulator(_settings(normalisation, texture_size=2))
  acc.add(0, "x", texture, weight, record={"prediction": "female"})
  (rec,) = acc.records()
  assert rec["normaliser"] == expected and rec["normalisation"] == normalisation and rec["prediction"] == "female"
  assert rec["visible_texels"] == 3 and rec["weight_total"] == 1.75
  s = acc.sums("all")
  np.testing.assert_allclose(
    s.value_sum, np.where(weight > 0, weight * texture, 0).astype(np.float64) / expected, rtol=1e-15
  )
  got, _ = acc.mean("all")
  np.testing.assert_allclose(got[0], [2 / expected, -4 / expected], rtol=1e-15)


def test_all_zero_image_counts_as_no_saliency():
  acc = cms.CMSAccumulator(_settings("max_abs", texture_size=2))
  acc.add(0, "zero", np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32))
  got, valid = acc.mean("all")
  assert valid.all() and (got == 0).all() and acc.records()[0]["normaliser"] == 0.0


def test_exact_sum_survives_cancellation():
  # In float64, 1e16 + 1 - 1e16 is 0; the fixed-point sum keeps the 1, in any order.
  big = np.full((1, 1), 1e16, np.float32)
  one = np.ones((1, 1), np.float32)
  parts = [big, one, -big]
  for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
    acc = cms.CMSAccumulator(_settings(texture_size=1))
    for i in order:
      acc.add(i, str(i), parts[i], one)
    assert acc.sums("all").value_sum[0, 0] == 1.0


# ------------------------------------------------------------------------------------------ determinism


@pytest.mark.parametrize("normalisation", cms.NORMALISATIONS)
def test_order_and_sharding_independence_bit_for_bit(normalisation):
  t, n = 8, 40
  images = _random_images(n, t)
  reference = _fill(cms.CMSAccumulator(_settings(normalisation, t)), images, range(n))
  rng = np.random.default_rng(1)
  for _ in range(3):
    _assert_bitwise_equal(reference, _fill(cms.CMSAccumulator(_settings(normalisation, t)), images, rng.permutation(n)))
    # Random strided / uneven shards, each fed in shuffled order, merged in a random order and tree shape.
    labels = rng.integers(0, 5, n)
    shards = [
      _fill(cms.CMSAccumulator(_settings(normalisation, t)), images, rng.permutation(np.flatnonzero(labels == k)))
      for k in range(5)
    ]
    rng.shuffle(shards)
    _assert_bitwise_equal(reference, cms.merge(*shards))
    _assert_bitwise_equal(reference, functools.reduce(lambda a, b: b.merge(a), shards))
    _assert_bitwise_equal(reference, cms.merge(cms.merge(*shards[:2]), cms.merge(*shards[2:])))


def test_naive_float_sums_would_depend_on_order():
  # Guards the test above: with these images, plain float64 accumulation is not order independent.
  t, n = 8, 40
  images = _random_images(n, t)
  contributions = [np.where(w > 0, w.astype(np.float64) * x, 0) for x, w, _ in images]
  forward = functools.reduce(np.add, contributions)
  backward = functools.reduce(np.add, contributions[::-1])
  assert forward.tobytes() != backward.tobytes()


def test_checkpoint_resume_equals_uninterrupted_run(tmp_path):
  t, n = 8, 30
  images = _random_images(n, t, seed=3)
  settings = _settings("max_abs", t)
  order = np.random.default_rng(4).permutation(n)
  path = tmp_path / "ckpt" / "cms.npz"
  first = _fill(cms.CMSAccumulator(settings), images, order[:11])
  first.skip(int(order[11]), f"img{order[11]:03d}.png", "no face found", record={"detector": "dlib"})
  first.save(path)
  resumed = cms.CMSAccumulator.load(path, settings=settings)
  assert resumed.done_indices() == frozenset(int(i) for i in order[:12])
  _assert_bitwise_equal(first, resumed)
  todo = [i for i in range(n) if i not in resumed.done_indices()]
  _fill(resumed, images, todo)
  resumed.save(path)  # saving over the old checkpoint
  final = cms.CMSAccumulator.load(path)
  # The uninterrupted run, in another order, with the same skip.
  reference = _fill(cms.CMSAccumulator(settings), images, [i for i in range(n) if i != order[11]])
  reference.skip(int(order[11]), f"img{order[11]:03d}.png", "no face found", record={"detector": "dlib"})
  _assert_bitwise_equal(reference, final)


def test_empty_accumulator_round_trips(tmp_path):
  acc = cms.CMSAccumulator(_settings())
  acc.save(tmp_path / "e.npz")
  back = cms.CMSAccumulator.load(tmp_path / "e.npz")
  assert back.groups() == [] and back.records() == [] and back.settings == acc.settings


# ------------------------------------------------------------------------------------------ errors


def test_corrupt_or_foreign_checkpoint_is_a_clear_error(tmp_path):
  acc = _fill(cms.CMSAccumulator(_settings(texture_size=8)), _random_images(3, 8), range(3))
  good = tmp_path / "good.npz"
  acc.save(good)
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(good.read_bytes()[:200])
  foreign = tmp_path / "foreign.npz"
  fileio.save_npz_versioned(foreign, "morphable_model", 1, mean=np.zeros(3))
  wrong_version = tmp_path / "v1.npz"  # version 1 had no absolute sums
  old = {
    k: v for k, v in fileio.load_npz_versioned(good, cms.FORMAT_KIND, cms.FORMAT_VERSION).items() if k != "abs_limbs"
  }
  fileio.save_npz_versioned(wrong_version, cms.FORMAT_KIND, 1, **old)
  bad_meta = tmp_path / "bad_meta.npz"
  arrays = fileio.load_npz_versioned(good, cms.FORMAT_KIND, cms.FORMAT_VERSION)
  fileio.save_npz_versioned(bad_meta, cms.FORMAT_KIND, cms.FORMAT_VERSION, **{**arrays, "meta": arrays["meta"][:-5]})
  bad_limbs = tmp_path / "bad_limbs.npz"
  fileio.save_npz_versioned(
    bad_limbs, cms.FORMAT_KIND, cms.FORMAT_VERSION, **{**arrays, "count": arrays["count"][..., :-1]}
  )
  for path in (tmp_path / "missing.npz", truncated, foreign, wrong_version, bad_meta, bad_limbs):
    with pytest.raises(fileio.FormatError, match=path.name):
      cms.CMSAccumulator.load(path)
  with pytest.raises(ValueError, match=r"good\.npz.*normalisation"):
    cms.CMSAccumulator.load(good, settings=_settings("sum_abs", texture_size=8))


def test_merge_refuses_mismatch_and_duplicates():
  images = _random_images(4, T)
  a = _fill(cms.CMSAccumulator(_settings()), images, [0, 1])
  with pytest.raises(ValueError, match="texture_size"):
    cms.merge(a, cms.CMSAccumulator(_settings(texture_size=T + 1)))
  with pytest.raises(ValueError, match="normalisation"):
    cms.merge(a, cms.CMSAccumulator(_settings("max_abs")))
  b = _fill(cms.CMSAccumulator(_settings()), images, [1, 2])
  with pytest.raises(ValueError, match="more than one accumulator"):
    cms.merge(a, b)
  c = cms.CMSAccumulator(_settings())
  c.skip(0, "img000.png", "unreadable")  # a skip also claims its index
  with pytest.raises(ValueError, match="more than one accumulator"):
    cms.merge(c, a)
  assert a.done_indices() == {0, 1} and b.done_indices() == {1, 2}  # inputs untouched


def test_skip_is_recorded_and_leaves_sums_alone():
  images = _random_images(3, T)
  acc = _fill(cms.CMSAccumulator(_settings()), images, [0, 2])
  before = acc.sums("all")
  acc.skip(1, "img001.png", "no face found", group="odd", record={"region_mass": {"eyes": 0.5}})
  after = acc.sums("all")
  for x, y in zip(before[:3], after[:3]):
    assert x.tobytes() == y.tobytes()
  assert acc.num_images() == 2 and acc.num_images("all") == 2 and "odd" not in acc.groups()
  rec = acc.records()[1]
  assert rec["status"] == "skipped" and rec["reason"] == "no face found" and rec["groups"] == ["odd"]
  with pytest.raises(ValueError, match="already in the accumulator"):
    acc.add(1, "img001.png", *images[1][:2])
  with pytest.raises(ValueError, match="already in the accumulator"):
    acc.skip(0, "img000.png", "again")


def test_nan_raises_naming_the_image_and_changes_nothing():
  acc = _fill(cms.CMSAccumulator(_settings()), _random_images(2, T), [0, 1])
  before = acc.sums("all")
  texture = np.ones((T, T), np.float32)
  texture[1, 2] = np.nan
  with pytest.raises(ValueError, match=r"image 5 \('broken\.png'\).*NaN"):
    acc.add(5, "broken.png", texture, np.ones((T, T), np.float32), group=("all", "new"))
  assert acc.done_indices() == {0, 1} and acc.groups() == ["all", "even", "odd"]
  assert acc.sums("all").value_sum.tobytes() == before.value_sum.tobytes()


@pytest.mark.parametrize(
  ("texture", "weight", "reason"),
  [
    (np.full((T, T), np.inf, np.float32), np.ones((T, T), np.float32), "infinite"),
    (np.ones((T, T), np.float32), np.full((T, T), 1.5, np.float32), r"\[0, 1\]"),
    (np.ones((T, T), np.float32), np.full((T, T), np.nan, np.float32), "weight holds"),
    (np.full((T, T), 3e18, np.float32), np.ones((T, T), np.float32), "limit"),
  ],
)
def test_invalid_input_skipped_and_recorded_when_asked(texture, weight, reason):
  acc = cms.CMSAccumulator(_settings(on_invalid="skip"))
  assert not acc.add(0, "bad.png", texture, weight, record={"score": 1.0})
  (rec,) = acc.records()
  assert rec["status"] == "skipped" and rec["score"] == 1.0
  assert re.search(reason, rec["reason"])
  assert acc.groups() == [] and acc.num_images() == 0


def test_wrong_shape_always_raises():
  acc = cms.CMSAccumulator(_settings(on_invalid="skip"))
  with pytest.raises(ValueError, match=r"image 0 \('x'\): texture must be float \[4, 4\]"):
    acc.add(0, "x", np.ones((T, T + 1), np.float32), np.ones((T, T), np.float32))
  with pytest.raises(ValueError, match="weight must be float"):
    acc.add(0, "x", np.ones((T, T), np.float32), np.ones((T, T), np.uint8))
  assert acc.records() == []


def test_settings_and_arguments_are_checked():
  with pytest.raises(ValueError, match="known"):
    cms.CMSSettings(texture_size=4, normalisation="zscore")
  with pytest.raises(ValueError, match="known"):
    cms.CMSSettings(texture_size=4, on_invalid="ignore")
  acc = cms.CMSAccumulator(4)
  assert acc.settings == cms.CMSSettings(texture_size=4)
  ones = np.ones((4, 4), np.float32)
  with pytest.raises(ValueError, match="non-negative int"):
    acc.add(-1, "x", ones, ones)
  with pytest.raises(ValueError, match="set by the accumulator"):
    acc.add(0, "x", ones, ones, record={"status": "fine"})
  with pytest.raises(ValueError, match="not JSON serialisable"):
    acc.add(0, "x", ones, ones, record={"f": object()})
  with pytest.raises(ValueError, match="unknown CMS group 'nope'"):
    acc.mean("nope")


def test_records_table_is_flat_and_rectangular():
  acc = cms.CMSAccumulator(_settings())
  ones = np.ones((T, T), np.float32)
  acc.add(
    2, "b.png", ones, ones, group=("all", "male"), record={"prediction": 1, "region_mass": {"eyes": np.float32(0.25)}}
  )
  acc.add(0, "a.png", ones, ones, record={"score": np.float64(0.5), "region_mass": {"nose": 0.75}})
  acc.skip(1, "c.png", "unreadable")
  rows = acc.records_table()
  assert [r["index"] for r in rows] == [0, 1, 2]
  assert len({tuple(r) for r in rows}) == 1  # every row has the same columns
  assert rows[2]["groups"] == "all|male" and rows[2]["region_mass/eyes"] == 0.25 and rows[2]["region_mass/nose"] is None
  assert rows[0]["score"] == 0.5 and rows[1]["status"] == "skipped" and rows[1]["normaliser"] is None
  assert [r["index"] for r in acc.records_table(status="ok")] == [0, 2]


def test_fixed_point_round_trip_is_exact_where_the_grid_allows():
  # Floats whose last bit is at least the grid step 2**-64 (|x| >= 2**-11) are on the grid: limbs hold them
  # exactly, negatives included; smaller ones round to the nearest grid point.
  rng = np.random.default_rng(5)
  x = rng.choice([-1.0, 1.0], 1000) * np.exp2(rng.uniform(-11, 59.9, 1000))
  limbs = cms._to_limbs(x)
  assert limbs[:-1].min() >= 0 and limbs[:-1].max() < 2**32
  np.testing.assert_array_equal(cms._limbs_to_float(limbs), x)
  np.testing.assert_array_equal(cms._limbs_to_float(cms._to_limbs(np.array([2.0**-66, -(2.0**-63)]))), [0, -(2.0**-63)])
  total = cms._add_limbs(cms._to_limbs(x), cms._to_limbs(-x))
  assert not total.any()


def test_derived_views_known_answers():
  """Signed and absolute means, the paper's plain sum, group differences and the min-count mask, by hand."""
  acc = cms.CMSAccumulator(_settings(texture_size=2))
  ones = np.ones((2, 2), np.float32)
  seen_once = np.array([[1, 1], [1, 0]], np.float32)
  acc.add(0, "a", np.array([[1, -2], [3, 9]], np.float32), seen_once, group=("all", "f"))
  acc.add(1, "b", np.array([[-1, -2], [1, 5]], np.float32), ones * 0.5, group=("all", "m"))
  mean, valid = acc.mean("all")
  np.testing.assert_allclose(mean[valid], [(1 - 0.5) / 1.5, -2.0, (3 + 0.5) / 1.5, 5.0])
  absolute, _ = acc.mean("all", kind="absolute")
  np.testing.assert_allclose(absolute[valid], [(1 + 0.5) / 1.5, 2.0, (3 + 0.5) / 1.5, 5.0])
  total, total_valid = acc.plain_sum("all")
  np.testing.assert_allclose(total[total_valid], [0.5, -3.0, 3.5, 2.5])
  assert total_valid.all()
  _, twice = acc.mean("all", min_count=2)
  np.testing.assert_array_equal(twice, [[True, True], [True, False]])
  diff, diff_valid = acc.difference("f", "m")
  np.testing.assert_array_equal(diff_valid, [[True, True], [True, False]])
  np.testing.assert_allclose(diff[diff_valid], [1 - (-1), -2 - (-2), 3 - 1])
  assert np.isnan(diff[1, 1]) and np.isnan(acc.mean("f")[0][1, 1])
  with pytest.raises(ValueError, match="kind"):
    acc.mean("all", kind="max")
  with pytest.raises(ValueError, match="min_count"):
    acc.mean("all", min_count=0)
  with pytest.raises(ValueError, match="unknown CMS group"):
    acc.difference("f", "nobody")


def test_absolute_sums_bound_signed_sums_and_survive_merge_and_checkpoint(tmp_path):
  images = _random_images(6, T, seed=3)
  whole = _fill(cms.CMSAccumulator(_settings("max_abs")), images, range(6))
  parts = [_fill(cms.CMSAccumulator(_settings("max_abs")), images, idx) for idx in ([0, 2, 4], [5, 3, 1])]
  merged = cms.merge(*parts)
  _assert_bitwise_equal(whole, merged)
  path = tmp_path / "cms.npz"
  merged.save(path)
  loaded = cms.CMSAccumulator.load(path)
  for acc in (merged, loaded):
    s = acc.sums("all")
    np.testing.assert_array_equal(s.abs_sum, whole.sums("all").abs_sum)
    assert np.all(s.abs_sum >= np.abs(s.value_sum))
    assert np.any(s.abs_sum > np.abs(s.value_sum))  # the random images have both signs somewhere


def test_comparisons_pairs_classes_labels_and_correctness():
  groups = ["all", "pred_b", "pred_a", "pred_c", "label_x", "label_y", "correct", "misclassified", "other"]
  assert cms.comparisons(groups) == [
    ("pred_a", "pred_b"),
    ("pred_a", "pred_c"),
    ("pred_b", "pred_c"),
    ("label_x", "label_y"),
    ("correct", "misclassified"),
  ]
  assert cms.comparisons(["all", "pred_only", "correct"]) == []
