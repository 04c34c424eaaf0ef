"""The occlusion sweep: known answers, a naive loop on a real model, no recompiles, bounded memory, sharding."""

import os
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canonsal_jax import occlusion
from canonsal_jax.occlusion import Score
from tests.tolerance import sweep_atol


def _naive_sweep(score_fn, image, centres, patch_size, base):
  """One occluded image at a time, painted into the heatmap in a Python loop (the paper's procedure)."""
  h, w, _ = image.shape
  half = patch_size // 2
  original = float(score_fn(image[None])[0])
  total = np.zeros((h, w))
  count = np.zeros((h, w))
  drops = []
  for r, c in centres:
    r0, r1, c0, c1 = max(r - half, 0), min(r + half + 1, h), max(c - half, 0), min(c + half + 1, w)
    x = np.array(image, copy=True)
    x[r0:r1, c0:c1] = base[r0:r1, c0:c1]
    drop = original - float(score_fn(x[None])[0])
    drops.append(drop)
    total[r0:r1, c0:c1] += drop
    count[r0:r1, c0:c1] += 1
  heat = np.where(count > 0, total / np.maximum(count, 1), 0.0)
  return np.array(drops), heat, count


def _linear_model(height, width, channels, classes, seed=0):
  rng = np.random.default_rng(seed)
  params = jnp.asarray(rng.normal(size=(height, width, channels, classes)), jnp.float32)
  apply_fn = lambda p, x: jnp.einsum("bhwc,hwck->bk", x, p, precision=jax.lax.Precision.HIGHEST)
  return apply_fn, params


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_single_pixel_score_gives_heatmap_exactly_there(reduce):
  h, w, p = 11, 13, 3
  star = (4, 7)
  image = np.ones((h, w, 1), np.float32)
  score_fn = lambda x: x[:, star[0], star[1], 0]
  centres = occlusion.grid_centres(h, w, patch_size=p, stride=1, include_borders=True)
  result = occlusion.occlusion_map(score_fn, image, patch_size=p, centres=centres, reduce=reduce)
  # A patch drops the score by exactly 1 iff it covers the pixel: the drops are the indicator of that.
  covers = np.all(np.abs(centres - np.array(star)) <= p // 2, axis=1)
  np.testing.assert_array_equal(np.asarray(result.drops), covers.astype(np.float32))
  heat = np.asarray(result.heatmap)
  # Only pixels sharing a patch with the starred pixel (Chebyshev distance <= p - 1) get any saliency ...
  rr, cc = np.mgrid[:h, :w]
  near = np.maximum(np.abs(rr - star[0]), np.abs(cc - star[1])) <= p - 1
  assert np.all(heat[~near] == 0) and np.all(heat[near] > 0)
  # ... and the starred pixel itself gets the full drop (every patch covering it covers it).
  count_star = int(np.asarray(result.count)[star])
  assert heat[star] == (1.0 if reduce == "mean" else count_star)
  assert heat.max() == heat[star]


def test_coverage_counts_and_uncovered_border():
  h, w, p = 9, 10, 3
  centres = occlusion.grid_centres(h, w, patch_size=p, stride=3)
  result = occlusion.occlusion_map(lambda x: jnp.sum(x, axis=(1, 2, 3)), np.ones((h, w, 2)), patch_size=p, stride=3)
  _, _, count = _naive_sweep(lambda x: np.zeros(1), np.ones((h, w, 2)), centres, p, np.zeros((h, w, 2)))
  np.testing.assert_array_equal(np.asarray(result.count), count)
  assert np.asarray(result.count)[:, -1].sum() == 0  # column 9 is never covered by windows inside the image
  np.testing.assert_array_equal(np.asarray(result.heatmap)[:, -1], 0.0)


@pytest.mark.parametrize("baseline", [0.0, -0.5, (0.1, -0.2), "mean", "blur"])
def test_matches_naive_loop_on_synthetic_model(baseline):
  h, w, c, k, p = 10, 12, 2, 4, 3
  apply_fn, params = _linear_model(h, w, c, k)
  image = np.random.default_rng(1).normal(size=(h, w, c)).astype(np.float32)
  score = Score("log_softmax")
  sweep = occlusion.make_sweep(apply_fn, patch_size=p, batch_size=5, baseline=baseline, score=score)
  centres = occlusion.grid_centres(h, w, patch_size=p, stride=1, include_borders=True)
  got = sweep(params, image, *occlusion.pad_centres(centres, len(centres) + 7))
  target = int(np.argmax(apply_fn(params, image[None])[0]))
  if baseline == "blur":
    base = np.asarray(occlusion._baseline_image(jnp.asarray(image), "blur", p / 2.0))
    # The blur is a normalised Gaussian: a constant image stays constant.
    const = np.asarray(occlusion._baseline_image(jnp.full((h, w, c), 3.0), "blur", 1.5))
    np.testing.assert_allclose(const, 3.0, rtol=1e-6)
  elif baseline == "mean":
    base = np.broadcast_to(image.mean(axis=(0, 1)), image.shape)
  else:
    base = np.broadcast_to(np.asarray(baseline, np.float32), image.shape)
  score_fn = lambda x: np.asarray(score(apply_fn(params, jnp.asarray(x, jnp.float32)), target))
  drops, heat, count = _naive_sweep(score_fn, image, centres, p, base)
  atol = sweep_atol(got)  # the scores' rounding: the loop and the sweep batch the forward passes differently
  np.testing.assert_allclose(np.asarray(got.drops)[: len(centres)], drops, atol=atol)
  np.testing.assert_array_equal(np.asarray(got.drops)[len(centres) :], 0.0)  # padding carries no drop
  np.testing.assert_allclose(np.asarray(got.heatmap), heat, atol=atol)
  np.testing.assert_array_equal(np.asarray(got.count), count)
  assert int(got.target) == target


def test_scores_known_values():
  outputs = jnp.array([[1.0, 3.0, -2.0], [0.5, 0.5, 0.5]])
  lse = jax.nn.logsumexp(outputs, axis=-1)
  chex.assert_trees_all_close(Score("logit")(outputs, jnp.int32(1)), outputs[:, 1])
  chex.assert_trees_all_close(Score("log_softmax")(outputs, jnp.int32(0)), outputs[:, 0] - lse)
  chex.assert_trees_all_close(Score("probability")(outputs, jnp.int32(2)), jnp.exp(outputs[:, 2] - lse))
  p = jax.nn.softmax(outputs, axis=-1)
  chex.assert_trees_all_close(Score("log_odds")(outputs, jnp.int32(1)), jnp.log(p[:, 1] / (1 - p[:, 1])), rtol=1e-5)
  two = jnp.array([[2.0, -1.0]])
  chex.assert_trees_all_close(Score("log_odds")(two, jnp.int32(0)), jnp.array([3.0]))
  chex.assert_trees_all_close(Score("logit", contrast=True)(outputs, jnp.array([1, 0])), outputs[:, 1] - outputs[:, 0])
  ev = Score("expected_value", values=(10.0, 20.0, 30.0))(outputs, jnp.int32(0))
  chex.assert_trees_all_close(ev, p @ jnp.array([10.0, 20.0, 30.0]))
  chex.assert_trees_all_close(
    Score("cosine")(outputs, outputs[1]), jnp.array([1.0 / np.sqrt(14 * 0.75), 1.0]), rtol=1e-6
  )


def test_cosine_contrast_is_genuine_minus_impostor():
  rng = np.random.default_rng(5)
  outputs = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  refs = jnp.asarray(rng.normal(size=(2, 6)), jnp.float32)
  cos = np.asarray(outputs) @ np.asarray(refs).T
  cos /= np.linalg.norm(outputs, axis=1)[:, None] * np.linalg.norm(refs, axis=1)[None]
  got = Score("cosine", contrast=True)(outputs, refs)
  np.testing.assert_allclose(np.asarray(got), cos[:, 0] - cos[:, 1], rtol=1e-5, atol=1e-6)
  h, w, c, k = 8, 8, 1, 6
  apply_fn, params = _linear_model(h, w, c, k, seed=4)
  image = rng.normal(size=(h, w, c)).astype(np.float32)
  sweep = occlusion.make_sweep(apply_fn, patch_size=3, batch_size=4, score=Score("cosine", contrast=True))
  centres, valid = occlusion.pad_centres(occlusion.grid_centres(h, w, patch_size=3, stride=2), 12)
  res = sweep(params, image, centres, valid, refs)
  single = occlusion.make_sweep(apply_fn, patch_size=3, batch_size=4, score=Score("cosine"))
  genuine, impostor = (single(params, image, centres, valid, r) for r in refs)
  np.testing.assert_allclose(np.asarray(res.drops), np.asarray(genuine.drops - impostor.drops), atol=1e-6)
  with pytest.raises(ValueError, match=r"target of shape \(2, 6\)"):
    sweep(params, image, centres, valid, refs[0])


def test_cosine_self_similarity_default_target():
  h, w, c, k = 8, 8, 1, 6
  apply_fn, params = _linear_model(h, w, c, k, seed=3)
  image = np.random.default_rng(2).normal(size=(h, w, c)).astype(np.float32)
  sweep = occlusion.make_sweep(apply_fn, patch_size=3, batch_size=4, score=Score("cosine"))
  res = sweep(params, image, *occlusion.pad_centres(occlusion.grid_centres(h, w, patch_size=3, stride=2), 12))
  np.testing.assert_allclose(float(res.score), 1.0, rtol=1e-6)  # the unoccluded embedding is the reference
  np.testing.assert_allclose(np.asarray(res.target), np.asarray(apply_fn(params, image[None])[0]), rtol=1e-6)
  assert np.all(np.asarray(res.drops) >= -1e-6)  # nothing is more similar to itself than itself


def test_no_recompile_for_new_weights_image_centres_and_target():
  h, w, c, k = 8, 9, 2, 3
  apply_fn, params = _linear_model(h, w, c, k)
  traced = chex.assert_max_traces(apply_fn, n=2)  # one trace for the unoccluded pass, one inside lax.map
  sweep = occlusion.make_sweep(traced, patch_size=3, batch_size=4, score=Score("log_odds"))
  rng = np.random.default_rng(0)
  for i in range(3):
    centres = rng.integers(0, [h, w], size=(int(rng.integers(5, 20)), 2))
    sweep(
      params * (i + 1),
      rng.normal(size=(h, w, c)).astype(np.float32),
      *occlusion.pad_centres(centres, 20),
      target=jnp.int32(i),
    )
  assert sweep._cache_size() == 1


def test_peak_memory_bounded_by_batch_not_patches():
  """Temporary memory of the compiled sweep must not grow with the number of occluded images."""
  h, w, c, k = 32, 32, 3, 8
  apply_fn, params = _linear_model(h, w, c, k)
  sweep = occlusion.make_sweep(apply_fn, patch_size=5, batch_size=8, score=Score("logit"))
  image = jnp.zeros((h, w, c))

  def temp_bytes(n):
    centres, valid = occlusion.pad_centres(np.zeros((1, 2), np.int32), n)
    compiled = sweep.lower(params, image, centres, valid, jnp.int32(0)).compile()
    stats = compiled.memory_analysis()
    if stats is None:
      pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes

  small, large = temp_bytes(64), temp_bytes(4096)
  one_image = h * w * c * 4
  # Holding the 4096 occluded images would take 4096 images; the per-patch indicator rows, drops and masks are
  # O(N * (H + W)), about 1/10 of an image per patch here. Allow 1/4 image per extra patch.
  assert large - small < (4096 - 64) * one_image / 4, (small, large)


def test_four_devices_equal_one():
  code = textwrap.dedent(
    """
      import jax, jax.numpy as jnp, numpy as np
      from canonsal_jax import occlusion
      assert len(jax.devices()) == 4
      rng = np.random.default_rng(0)
      params = jnp.asarray(rng.normal(size=(12, 12, 3, 5)), jnp.float32)
      apply_fn = lambda p, x: jnp.tanh(jnp.einsum("bhwc,hwck->bk", x, p))
      image = jnp.asarray(rng.normal(size=(12, 12, 3)), jnp.float32)
      centres, valid = occlusion.pad_centres(occlusion.grid_centres(12, 12, patch_size=3, stride=1), 110)
      kw = dict(patch_size=3, batch_size=4, score=occlusion.Score("log_odds"))
      four = occlusion.make_sweep(apply_fn, **kw)(params, image, centres, valid)
      one = occlusion.make_sweep(apply_fn, devices=jax.devices()[:1], **kw)(params, image, centres, valid)
      text = occlusion.make_sweep(apply_fn, **kw).lower(params, image, centres, valid).as_text()
      assert "shard_map" in text or "sdy.manual_computation" in text or "shmap" in text, "patch axis not sharded"
      err = float(jnp.max(jnp.abs(four.heatmap - one.heatmap)) / jnp.max(jnp.abs(one.heatmap)))
      assert err <= 1e-6, err
      print("ok", err)
      """
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("ok")


def test_resolve_patch_size():
  assert occlusion.resolve_patch_size(0.07, 224) == 15  # the paper's 15 px on a 224 px face
  assert occlusion.resolve_patch_size(0.07, 64) == 5
  assert occlusion.resolve_patch_size(7) == 7
  assert occlusion.resolve_patch_size(7.0) == 7  # a config float holding pixels
  for bad in (4, 4.0, 0, -3, 1.5, 0.0, float("nan"), True, "7"):
    with pytest.raises(ValueError):
      occlusion.resolve_patch_size(bad, 100)
  with pytest.raises(ValueError, match="face width"):
    occlusion.resolve_patch_size(0.1)


def test_bad_input_errors():
  apply_fn, params = _linear_model(8, 8, 1, 2)
  score = Score("logit")
  with pytest.raises(ValueError, match="odd"):
    occlusion.make_sweep(apply_fn, patch_size=4, batch_size=2, score=score)
  with pytest.raises(ValueError, match="batch_size"):
    occlusion.make_sweep(apply_fn, patch_size=3, batch_size=0, score=score)
  with pytest.raises(ValueError, match="reduce"):
    occlusion.make_sweep(apply_fn, patch_size=3, batch_size=2, score=score, reduce="max")
  with pytest.raises(ValueError, match="baseline"):
    occlusion.make_sweep(apply_fn, patch_size=3, batch_size=2, score=score, baseline="noise")
  with pytest.raises(ValueError, match="stride"):
    occlusion.grid_centres(8, 8, patch_size=3, stride=0)
  with pytest.raises(ValueError, match="larger than the image"):
    occlusion.grid_centres(8, 8, patch_size=9, stride=1)
  with pytest.raises(ValueError, match="values"):
    Score("expected_value")
  with pytest.raises(ValueError, match="contrast"):
    Score("expected_value", values=(1.0, 2.0), contrast=True)
  sweep = occlusion.make_sweep(apply_fn, patch_size=3, batch_size=2, score=score)
  centres, valid = occlusion.pad_centres(np.array([[2, 2]]), 2)
  image = np.zeros((8, 8, 1), np.float32)
  with pytest.raises(ValueError, match=r"\[H, W, C\]"):
    sweep(params, image[..., 0], centres, valid)
  with pytest.raises(ValueError, match="float"):
    sweep(params, image.astype(np.int32), centres, valid)
  with pytest.raises(ValueError, match="centres_rc"):
    sweep(params, image, centres.astype(np.float32), valid)
  with pytest.raises(ValueError, match="valid"):
    sweep(params, image, centres, valid.astype(np.int32))
  with pytest.raises(ValueError, match="target of shape"):
    sweep(params, image, centres, valid, target=jnp.array([0, 1]))
  with pytest.raises(ValueError, match="larger than the image"):
    occlusion.make_sweep(apply_fn, patch_size=9, batch_size=2, score=score)(params, image, centres, valid)
  with pytest.raises(ValueError, match="explicit target"):
    occlusion.make_sweep(apply_fn, patch_size=3, batch_size=2, score=Score("logit", contrast=True))(
      params, image, centres, valid
    )


def test_nan_scores_raise_naming_the_input():
  def score_fn(x):  # NaN whenever the top-left pixel is occluded
    return jnp.where(x[:, 0, 0, 0] == 0.0, jnp.nan, jnp.sum(x, axis=(1, 2, 3)))

  with pytest.raises(ValueError, match=r"face_007\.png.*not finite on 1 "):
    occlusion.occlusion_map(score_fn, np.ones((6, 6, 1)), patch_size=3, stride=1, name="face_007.png")


@pytest.mark.parametrize("name,score_kind", [("gender", "log_odds"), ("age", "expected_value")])
def test_matches_naive_loop_on_real_model(name, score_kind):
  """A real ported network: the compiled sweep equals one occluded image at a time, to 1e-5 of the largest drop."""
  from canonsal_jax import faces, fileio, models

  model = models.load(name)
  image = fileio.default_image()
  face = faces.largest_face(image, "astronaut", adjust_threshold=0.3)
  crop, _ = faces.crop_face(image, face, model.crop)
  x = model.preprocess(crop)
  size, patch = model.crop.size, 5
  centres = occlusion.grid_centres(size, size, patch_size=patch, stride=4 if size > 32 else 2, include_borders=True)
  score = Score.for_model(model)
  assert score.kind == score_kind
  black = tuple(model.preprocess(np.zeros((size, size, 3), np.uint8))[0, 0])
  with jax.default_matmul_precision("highest"):
    sweep = occlusion.make_sweep(model.apply_fn, patch_size=patch, batch_size=16, baseline=black, score=score)
    got = sweep(model.params, x, *occlusion.pad_centres(centres, len(centres)))
    target = got.target
    apply = jax.jit(model.apply_fn)
    score_fn = lambda batch: np.asarray(score(apply(model.params, jnp.asarray(batch, jnp.float32)), target))
    drops, heat, _ = _naive_sweep(score_fn, x, centres, patch, np.broadcast_to(np.asarray(black, np.float32), x.shape))
  assert np.abs(drops).max() > 100 * sweep_atol(got)  # the patches change the score far beyond its rounding
  np.testing.assert_allclose(np.asarray(got.drops), drops, atol=sweep_atol(got))
  np.testing.assert_allclose(np.asarray(got.heatmap), heat, atol=sweep_atol(got))


def test_non_scalar_baseline_on_gpu_warns_once(caplog, monkeypatch):
  """Non-scalar baselines are unverified on GPUs (occlusion._GPU_BASELINE_NOTE): said once, never on the CPU."""
  monkeypatch.setattr(occlusion, "_LOGGED_ONCE", set())
  apply_fn, _ = _linear_model(4, 4, 2, 3)
  gpu = type("FakeGpu", (), {"platform": "gpu"})()
  kw = dict(patch_size=1, batch_size=2, score=Score("logit"))
  with caplog.at_level("WARNING"):
    occlusion.make_sweep(apply_fn, **kw, baseline="mean")  # this machine's CPU: nothing to say
    occlusion.make_sweep(apply_fn, **kw, baseline=0.5, devices=[gpu])  # a scalar: verified
    assert "not yet verified on GPUs" not in caplog.text
    occlusion.make_sweep(apply_fn, **kw, baseline=(0.1, 0.2), devices=[gpu])
    occlusion.make_sweep(apply_fn, **kw, baseline="blur", devices=[gpu])
  assert caplog.text.count("not yet verified on GPUs") == 1


def test_fewer_patches_than_a_batch_run_one_small_chunk():
  """5 patches at batch 256: one forward pass of 5 images (not 256, mostly padding), the same drops."""
  base_fn, params = _linear_model(6, 7, 1, 3)
  seen = []

  def apply_fn(p, x):
    seen.append(x.shape[0])  # at trace time
    return base_fn(p, x)

  image = np.random.default_rng(0).normal(size=(6, 7, 1)).astype(np.float32)
  centres = np.array([[0, 0], [2, 3], [5, 6], [3, 1], [1, 5]], np.int32)
  kw = dict(patch_size=3, score=Score("logit"))
  big = occlusion.make_sweep(apply_fn, batch_size=256, **kw)(params, image, centres, np.ones(5, bool))
  assert sorted(set(seen)) == [1, 5], seen  # the unoccluded image, then one chunk of 5
  small = occlusion.make_sweep(base_fn, batch_size=2, **kw)(params, image, centres, np.ones(5, bool))
  np.testing.assert_allclose(np.asarray(big.drops), np.asarray(small.drops), rtol=0, atol=sweep_atol(small))
