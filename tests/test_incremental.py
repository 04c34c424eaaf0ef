"""Incremental occlusion (`canonsal_jax.incremental`, `make_sweep(method="incremental")`) on synthetic graphs.

Exactness is checked in float64, where the full and the incremental sweeps agree to rounding (1e-12 of the
largest drop) whatever the order of their sums, so any window that misses a changed activation shows up as an
error of the size of a drop. The ported models are checked in tests/test_incremental_models.py.
"""

import logging
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canonsal_jax import incremental as inc
from canonsal_jax import occlusion
from canonsal_jax.occlusion import Score
from tests.tolerance import rounding_atol, sweep_atol


def _brute_force_range(start, length, kernel, stride, pad, out_size):
  """Outputs reading any input row in `[start, start + length)`: output o reads input rows o*s - pad + [0, k)."""
  hit = [o for o in range(out_size) if any(start <= o * stride - pad + t < start + length for t in range(kernel))]
  return (min(hit), max(hit)) if hit else None


def test_window_range_known_answers():
  # 3x3 "same" conv: a changed row 5..7 changes output rows 4..8
  assert tuple(map(int, inc.window_range(5, 3, kernel=3, stride=1, pad=1, out_size=20))) == (4, 8)
  # 3x3 stride 2 valid: output o reads 2o..2o+2, so rows 5..7 reach outputs 2 and 3
  assert tuple(map(int, inc.window_range(5, 3, kernel=3, stride=2, pad=0, out_size=9))) == (2, 3)
  # 1x1 stride 2: only even rows are read; rows 5..7 reach output 3 alone
  assert tuple(map(int, inc.window_range(5, 3, kernel=1, stride=2, pad=0, out_size=10))) == (3, 3)
  # clamped at the borders of the output map
  assert tuple(map(int, inc.window_range(0, 2, kernel=7, stride=2, pad=0, out_size=29))) == (0, 0)
  assert tuple(map(int, inc.window_range(62, 2, kernel=7, stride=2, pad=0, out_size=29))) == (28, 28)


def test_window_range_matches_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(400):
    kernel, stride = int(rng.integers(1, 8)), int(rng.integers(1, 4))
    pad = int(rng.integers(0, kernel))
    size = int(rng.integers(kernel, 40))
    out_size = (size + 2 * pad - kernel) // stride + 1
    length = int(rng.integers(1, size + 1))
    start = int(rng.integers(0, size - length + 1))
    want = _brute_force_range(start, length, kernel, stride, pad, out_size)
    lo, hi = inc.window_range(start, length, kernel=kernel, stride=stride, pad=pad, out_size=out_size)
    if want is None:  # only rows no output reads (k < s): the clamped range may be anything, it is not used
      continue
    assert (int(lo), int(hi)) == want, (kernel, stride, pad, size, start, length)


def test_conv_valid_equals_the_unpadded_convolution():
  """On the CPU `conv_valid` pads one zero column and drops the output that reads it: the result must be the
  VALID convolution's for every stride, kernel and width, including widths the stride does not divide."""
  rng = np.random.default_rng(3)
  for kernel, stride, width, groups in [
    (3, 1, 9, 1),
    (3, 2, 10, 1),
    (3, 2, 9, 1),
    (7, 2, 16, 1),
    (1, 2, 7, 1),
    (3, 1, 8, 4),
  ]:
    x = jnp.asarray(rng.normal(size=(2, 6 + kernel, width, 4)))
    k = jnp.asarray(rng.normal(size=(kernel, kernel, 4 // groups, 4 * (5 if groups == 1 else 1))))
    want = jax.lax.conv_general_dilated(
      x, k, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups
    )
    got = inc.conv_valid(x, k, stride=stride, groups=groups)
    assert got.shape == want.shape, (kernel, stride, width)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The dense case takes the padded form on this backend (the fast one on XLA:CPU); the depthwise one does not.
  hlo = jax.jit(lambda x, k: inc.conv_valid(x, k)).lower(jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 5))).as_text()
  assert ("pad = [[0, 0], [0, 1]]" in hlo) == (jax.default_backend() == "cpu")


def _synthetic(rng, dtype=np.float32):
  """A small graph with every op kind and awkward geometry, on a non-square 21x18x2 input.

  conv 3x3 same -> {max pool 3x3/2 "SAME" (-inf padded), conv 3x3/2 valid, avg pool 2x2 (odd rows dropped)},
  summed by dlib's zero-padding add (three shapes, two channel counts); depthwise 3x3; pointwise 1x1 + tanh;
  {conv 1x1/2 "SAME" (kernel < stride), conv 3x3/2 "SAME"} summed; global mean and a dense layer.
  """

  def w(*shape):
    return jnp.asarray(rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1])), dtype)

  params = {
    "c1": w(3, 3, 2, 4),
    "b1": w(4),
    "c3": w(3, 3, 4, 6),
    "dw": w(3, 3, 1, 6),
    "pw": w(6, 6),
    "s1": w(1, 1, 6, 5),
    "s3": w(3, 3, 6, 5),
    "fc": w(5, 3),
  }
  g = inc.GraphBuilder()
  a = g.spatial(g.input, lambda p, x: jax.nn.relu(inc.conv_valid(x, p["c1"], p["b1"])), kernel=3, padding=1)
  m = g.spatial(a, lambda p, x: inc.max_pool_valid(x, 3, 2), kernel=3, stride=2, padding="SAME", pad_value=-np.inf)
  c = g.spatial(a, lambda p, x: jax.nn.relu(inc.conv_valid(x, p["c3"], stride=2)), kernel=3, stride=2)
  v = g.spatial(a, lambda p, x: inc.avg_pool_valid(x, 2, 2), kernel=2, stride=2)
  s = g.add(c, v, m, pad_to_larger=True)  # [10, 8, 6] + [10, 9, 4] + [11, 9, 4] -> [11, 9, 6]
  d = g.spatial(s, lambda p, x: inc.conv_valid(x, p["dw"], groups=6), kernel=3, padding=1)
  e = g.pointwise(d, lambda p, x: jnp.tanh(x @ p["pw"]))
  f1 = g.spatial(e, lambda p, x: inc.conv_valid(x, p["s1"], stride=2), kernel=1, stride=2, padding="SAME")
  f3 = g.spatial(e, lambda p, x: inc.conv_valid(x, p["s3"], stride=2), kernel=3, stride=2, padding="SAME")
  g.full(g.add(f1, f3), lambda p, x: jnp.mean(x, axis=(1, 2)) @ p["fc"])
  return g.build(), params


def _centres(h, w, patch):
  """Even-stride grid reaching the borders, plus arbitrary (vertex-like) centres inside and just outside."""
  grid = occlusion.grid_centres(h, w, patch_size=patch, stride=2, include_borders=True)
  rng = np.random.default_rng(1)
  arbitrary = rng.integers([-patch, -patch], [h + patch, w + patch], size=(25, 2))
  return np.concatenate([grid, arbitrary, [[-40, 3], [h + 40, w + 40]]]).astype(np.int32)


def _occluded_reference(graph, params, image, base, centres, patch):
  """The graph's outputs on the occluded images built one by one on the host (a patch clipped at the border)."""
  image, base = np.asarray(image), np.asarray(base)
  rows, cols = np.arange(image.shape[0])[:, None], np.arange(image.shape[1])[None, :]
  images = []
  for r, c in centres:
    mask = (np.abs(rows - r) <= patch // 2) & (np.abs(cols - c) <= patch // 2)
    images.append(np.where(mask[:, :, None], base, image))
  return jax.jit(graph.apply)(params, jnp.asarray(np.stack(images)))


def test_synthetic_graph_exact_in_float64():
  """Every baseline kind (the engine sees only the baseline image), borders, even strides, arbitrary centres."""
  h, w, patch = 21, 18, 5
  with jax.enable_x64(True):
    graph, params = _synthetic(np.random.default_rng(0), np.float64)
    image = jnp.asarray(np.random.default_rng(2).normal(size=(h, w, 2)))
    centres = _centres(h, w, patch)
    acts = graph.activations(params, image[None])
    the_plan = inc.plan(graph, [a.shape[1:] for a in acts], patch_size=patch)
    cache = inc.make_cache(graph, the_plan, acts)
    run = jax.jit(lambda p, cache, base, c: inc.occluded_outputs(graph, the_plan, graph.bind(p), cache, image, base, c))
    for baseline in (0.0, (0.5, -1.0), "mean", "blur"):
      base = occlusion._baseline_image(image, baseline, patch / 2.0)
      got = np.asarray(run(params, cache, base, jnp.asarray(centres)))
      want = np.asarray(_occluded_reference(graph, params, image, base, centres, patch))
      assert got.dtype == np.float64
      drops = np.asarray(acts[-1]) - want
      scale = np.abs(drops).max()
      assert scale > 1e-3, baseline  # the patches do change the outputs
      atol = rounding_atol(want, dtype=np.float64, ulps=256)  # float64 rounding of the outputs compared
      np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=str(baseline))
      np.testing.assert_allclose(drops[-2:], 0.0, atol=atol)  # the patches far outside change nothing


@pytest.mark.slow
def test_window_batch_runs_the_tail_on_the_whole_chunk_exactly():
  """`window_batch`: the layers before the dense tail in groups, the tail on the chunk; the same outputs in
  float64, whether the tail reads a whole map (7 px patches) or a window pasted into one (3 px)."""
  h, w = 21, 18
  with jax.enable_x64(True):
    graph, params = _synthetic(np.random.default_rng(0), np.float64)
    image = jnp.asarray(np.random.default_rng(2).normal(size=(h, w, 2)))
    base = jnp.zeros_like(image)
    acts = graph.activations(params, image[None])
    for patch in (3, 7):
      centres = jnp.asarray(_centres(h, w, patch)[:24])
      the_plan = inc.plan(graph, [a.shape[1:] for a in acts], patch_size=patch)
      tail = inc.tail_start(graph, the_plan)
      assert tail == len(graph.nodes) - 1  # the global mean and dense layer
      assert the_plan.nodes[graph.nodes[tail].inputs[0]].windowed == (patch == 3)
      cache = inc.make_cache(graph, the_plan, acts)
      run = jax.jit(
        lambda c, wb, the_plan=the_plan, cache=cache: inc.occluded_outputs(
          graph, the_plan, graph.bind(params), cache, image, base, c, window_batch=wb
        ),
        static_argnums=1,
      )
      want = np.asarray(run(centres, None))
      assert np.abs(np.asarray(acts[-1]) - want).max() > 1e-3  # the patches do change the outputs
      atol = rounding_atol(want, dtype=np.float64, ulps=256)
      for wb in (1, 8, 24):
        np.testing.assert_allclose(np.asarray(run(centres, wb)), want, rtol=0, atol=atol, err_msg=str(wb))
      # the windows run in groups of 8, the dense layer (`@ p["fc"]`, 5 -> 3) once on all 24 patches
      text = run.lower(centres, 8).as_text()
      assert re.search(r"tensor<8x\d+x\d+x\d+xf64>", text)
      dots = [line for line in text.splitlines() if "dot_general" in line]
      assert any("tensor<24x5xf64>" in line for line in dots)
      assert not any("tensor<8x5xf64>" in line for line in dots)
      with pytest.raises(ValueError, match="does not divide"):
        run(centres, 7)


def test_plan_windows_on_synthetic_graph():
  """The windows are smaller than their maps early and cover them late; their static sizes are as derived."""
  graph, params = _synthetic(np.random.default_rng(0))
  shapes = [a.shape[1:] for a in graph.activations(params, jnp.zeros((1, 21, 18, 2)))]
  the_plan = inc.plan(graph, shapes, patch_size=5)
  lines = the_plan.describe()
  assert lines[0] == "0: 5x5 of 21x18"
  assert lines[1] == "1: 7x7 of 21x18"  # 3x3 same: +1 each side
  # 3x3/2 "SAME" over 7 changed rows: 4 or 5 outputs by parity (rows padded (1, 1) to 11, cols (0, 1) to 9)
  assert lines[2] == "2: 5x5 of 11x9"
  assert lines[-1] == f"{len(lines) - 1}: full"
  bad = inc.GraphBuilder()
  bad.full(bad.spatial(bad.input, lambda p, x: x, kernel=3, padding=0), lambda p, x: x)
  with pytest.raises(ValueError, match="geometry gives"):  # a 3x3 valid op cannot keep 8 rows
    inc.plan(bad.build(), [(8, 8, 1), (8, 8, 1), (8, 8, 1)], patch_size=3)


def test_sweep_float32_close_to_full_and_compiled_once():
  """`make_sweep` picks the graph up ("auto"), matches the full sweep and reuses its program."""
  h, w, patch = 21, 18, 3
  graph, params = _synthetic(np.random.default_rng(0))
  image = np.random.default_rng(2).normal(size=(h, w, 2)).astype(np.float32)
  centres, valid = occlusion.pad_centres(_centres(h, w, patch), 140)
  kw = dict(patch_size=patch, batch_size=16, baseline="blur", score=Score("logit"))
  full = occlusion.make_sweep(graph.apply, method="full", **kw)(params, image, centres, valid, 0)
  sweep = occlusion.make_sweep(inc.with_graph(graph.apply, graph), **kw)
  incr = sweep(params, image, centres, valid, 0)
  atol = sweep_atol(full)  # the scores' rounding: drops are differences of scores
  np.testing.assert_allclose(np.asarray(incr.drops), np.asarray(full.drops), rtol=0, atol=atol)
  np.testing.assert_allclose(np.asarray(incr.heatmap), np.asarray(full.heatmap), rtol=0, atol=atol)
  np.testing.assert_array_equal(np.asarray(incr.count), np.asarray(full.count))
  rng = np.random.default_rng(0)
  for i in range(2):  # new weights, image, centres and target: the same program
    more = rng.integers(-2, [h + 2, w + 2], size=(int(rng.integers(5, 140)), 2))
    new_params = jax.tree.map(lambda a, i=i: a * (2 + i), params)
    sweep(new_params, rng.normal(size=(h, w, 2)).astype(np.float32), *occlusion.pad_centres(more, 140), i + 1)
  assert sweep._cache_size() == 1


def test_sweep_window_batch_size_matches_the_full_sweep():
  """`make_sweep(window_batch_size=...)`: groups of the largest divisor of the chunk (16 -> 5 gives 4)."""
  h, w, patch = 21, 18, 3
  graph, params = _synthetic(np.random.default_rng(0))
  image = np.random.default_rng(2).normal(size=(h, w, 2)).astype(np.float32)
  centres, valid = occlusion.pad_centres(_centres(h, w, patch), 140)
  kw = dict(patch_size=patch, batch_size=16, score=Score("logit"))
  full = occlusion.make_sweep(graph.apply, method="full", **kw)(params, image, centres, valid, 0)
  grouped = occlusion.make_sweep(inc.with_graph(graph.apply, graph), window_batch_size=5, **kw)
  got = grouped(params, image, centres, valid, 0)
  np.testing.assert_allclose(np.asarray(got.drops), np.asarray(full.drops), rtol=0, atol=sweep_atol(full))
  # windows in groups of 4 (4-D float tensors of batch 4), the dense layer on all 16; no batch 4 without groups
  groups_of_4 = re.compile(r"tensor<4x\d+x\d+x\d+xf32>")
  hlo = grouped.lower(params, image, centres, valid, 0).as_text()
  assert groups_of_4.search(hlo)
  dots = [line for line in hlo.splitlines() if "dot_general" in line]
  assert any("tensor<16x5xf32>" in line for line in dots) and not any("tensor<4x5xf32>" in line for line in dots)
  ungrouped = occlusion.make_sweep(inc.with_graph(graph.apply, graph), **kw)
  assert not groups_of_4.search(ungrouped.lower(params, image, centres, valid, 0).as_text())
  with pytest.raises(ValueError, match="window_batch_size"):
    occlusion.make_sweep(graph.apply, window_batch_size=0, **kw)


def test_approximate_mode():
  """tau = 1 plans the exact windows; a small tau caps every grown window (and changes the drops).

  How far the drops move is a property of the model (reported with the speed in BENCHMARKS.md), not tested here.
  """
  h, w, patch = 21, 18, 3
  graph, params = _synthetic(np.random.default_rng(0))
  image = jnp.asarray(np.random.default_rng(2).normal(size=(h, w, 2)), jnp.float32)
  shapes = [a.shape[1:] for a in graph.activations(params, image[None])]
  exact_plan = inc.plan(graph, shapes, patch_size=patch)
  assert inc.plan(graph, shapes, patch_size=patch, approx_threshold=1.0).describe() == exact_plan.describe()
  capped = inc.plan(graph, shapes, patch_size=patch, approx_threshold=0.4)
  assert capped.describe() != exact_plan.describe()
  for p in capped.nodes:
    if p.windowed and p.slabs is not None:  # windows that grew through a spatial layer are capped
      assert all(a.length <= np.ceil(0.4 * a.size) for a in p.axes if not a.full)
  centres, valid = occlusion.pad_centres(occlusion.grid_centres(h, w, patch_size=patch, stride=1), 304)
  kw = dict(patch_size=patch, batch_size=16, score=Score("logit"), graph=graph)
  exact = occlusion.make_sweep(graph.apply, **kw)(params, image, centres, valid, 0)
  approx = occlusion.make_sweep(graph.apply, approx_threshold=0.4, **kw)(params, image, centres, valid, 0)
  e, a = np.asarray(exact.drops), np.asarray(approx.drops)
  assert np.all(np.isfinite(a))
  assert np.abs(a - e).max() > 1e-4 * np.abs(e).max()  # on maps this small the cap drops most of the change


def test_auto_falls_back_and_says_so_once(caplog):
  rng = np.random.default_rng(0)
  params = jnp.asarray(rng.normal(size=(8, 8, 2, 3)), jnp.float32)

  def plain_model_without_graph(p, x):
    return jnp.einsum("bhwc,hwck->bk", x, p)

  image = jnp.asarray(rng.normal(size=(8, 8, 2)), jnp.float32)
  centres, valid = occlusion.pad_centres(occlusion.grid_centres(8, 8, patch_size=3, stride=1), 40)
  kw = dict(patch_size=3, batch_size=8, score=Score("logit"))
  with caplog.at_level(logging.INFO):
    auto = occlusion.make_sweep(plain_model_without_graph, **kw)(params, image, centres, valid, 0)
    occlusion.make_sweep(plain_model_without_graph, **kw)
  said = [r for r in caplog.records if "plain_model_without_graph has no layer graph" in r.getMessage()]
  assert len(said) == 1
  full = occlusion.make_sweep(plain_model_without_graph, method="full", **kw)(params, image, centres, valid, 0)
  np.testing.assert_array_equal(np.asarray(auto.drops), np.asarray(full.drops))
  with pytest.raises(ValueError, match="needs a layer graph"):
    occlusion.make_sweep(plain_model_without_graph, method="incremental", **kw)
  with pytest.raises(ValueError, match="method must be one of"):
    occlusion.make_sweep(plain_model_without_graph, method="fast", **kw)
  graph, _ = _synthetic(rng)
  with pytest.raises(ValueError, match="approx_threshold must be in"):
    occlusion.make_sweep(graph.apply, graph=graph, approx_threshold=1.5, **kw)
  with pytest.raises(ValueError, match="not method='full'"):
    occlusion.make_sweep(graph.apply, graph=graph, method="full", approx_threshold=0.5, **kw)


def test_with_graph_carries_the_graph_and_calls_through():
  graph, params = _synthetic(np.random.default_rng(0))
  wrapped = inc.with_graph(graph.apply, graph)
  x = jnp.ones((2, 21, 18, 2))
  np.testing.assert_array_equal(np.asarray(wrapped(params, x)), np.asarray(graph.apply(params, x)))
  assert wrapped.layer_graph is graph
  assert hash(wrapped) != hash(inc.with_graph(graph.apply, graph))  # by identity, as a partial


def test_peak_memory_one_cache_plus_windows():
  """A large chunk: the full sweep holds `batch` whole activation maps, the incremental one their windows."""
  graph, params = _synthetic(np.random.default_rng(0))
  h, w, batch = 21, 18, 256
  image = jnp.zeros((h, w, 2))
  centres, valid = occlusion.pad_centres(np.zeros((1, 2), np.int32), batch)

  def temp_bytes(method):
    sweep = occlusion.make_sweep(
      graph.apply, graph=graph, method=method, patch_size=3, batch_size=batch, score=Score("logit")
    )
    stats = sweep.lower(params, image, centres, valid, jnp.int32(0)).compile().memory_analysis()
    if stats is None:
      pytest.skip("this backend reports no memory analysis")
    return stats.temp_size_in_bytes

  full, incr = temp_bytes("full"), temp_bytes("incremental")
  acts = graph.activations(params, image[None])
  one_image = sum(a.size for a in acts) * 4  # every activation of one image
  shapes = [a.shape[1:] for a in acts]
  the_plan = inc.plan(graph, shapes, patch_size=3)
  windows = sum(
    (np.prod([a.length for a in p.axes]) * shapes[i][-1] if p.windowed else np.prod(shapes[i]))
    for i, p in enumerate(the_plan.nodes)
  )
  # The full sweep needs about `batch` images' activations; the incremental one the cache (a few padded copies
  # of one image's) and `batch` sets of windows (slabs about 1.5x a window, live two at a time).
  assert full > batch * one_image / 4, (full, one_image)
  assert incr < 8 * one_image + 3 * batch * windows * 4, (incr, one_image, windows)
  # XLA:CPU keeps the full sweep's whole maps; XLA:GPU fuses more of them away (H200, jaxlib 0.11.2: 1.93 MB
  # incremental vs 2.67 MB full), so there the saving is smaller but must still be one.
  assert incr < (full / 2 if jax.default_backend() == "cpu" else full), (incr, full)


def test_four_devices_equal_one():
  code = textwrap.dedent(
    """
      import sys
      sys.path.insert(0, "tests")
      import jax, jax.numpy as jnp, numpy as np
      from canonsal_jax import occlusion
      from test_incremental import _synthetic, _centres
      assert len(jax.devices()) == 4
      graph, params = _synthetic(np.random.default_rng(0))
      image = jnp.asarray(np.random.default_rng(2).normal(size=(21, 18, 2)), jnp.float32)
      centres, valid = occlusion.pad_centres(_centres(21, 18, 5), 140)
      kw = dict(patch_size=5, batch_size=4, score=occlusion.Score("logit"), graph=graph)
      four = occlusion.make_sweep(graph.apply, **kw)
      text = four.lower(params, image, centres, valid, 0).as_text()
      assert "shard_map" in text or "sdy.manual_computation" in text or "shmap" in text, "patch axis not sharded"
      four = four(params, image, centres, valid, 0)
      one = occlusion.make_sweep(graph.apply, devices=jax.devices()[:1], **kw)(params, image, centres, valid, 0)
      err = float(jnp.max(jnp.abs(four.drops - one.drops)) / jnp.max(jnp.abs(one.drops)))
      assert err <= 1e-6, err
      print("ok", err)
      """
  )
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("ok")


def test_accelerator_barrier_is_there_and_changes_nothing():
  """Sweeps on accelerators put an optimization barrier before the model (occlusion._GPU_BASELINE_NOTE): forced on
  here (a one-device list naming a GPU), both sweeps carry it, CPU sweeps do not, and the drops are the same."""
  h, w, patch = 21, 18, 3
  graph, params = _synthetic(np.random.default_rng(0))
  image = np.random.default_rng(2).normal(size=(h, w, 2)).astype(np.float32)
  centres, valid = occlusion.pad_centres(_centres(h, w, patch), 140)
  gpu = type("FakeGpu", (), {"platform": "gpu"})()
  for method in ("full", "incremental"):
    kw = dict(graph=graph, method=method, patch_size=patch, batch_size=16, baseline="blur", score=Score("logit"))
    sweeps = {
      "cpu": occlusion.make_sweep(graph.apply, **kw),
      "gpu": occlusion.make_sweep(graph.apply, devices=[gpu], **kw),
    }
    args = (params, image, centres, valid, 0)
    hlo = {k: sweep.lower(*args).as_text() for k, sweep in sweeps.items()}
    assert "optimization_barrier" in hlo["gpu"] and "optimization_barrier" not in hlo["cpu"], method
    plain, barred = (sweeps[k](*args) for k in ("cpu", "gpu"))
    np.testing.assert_array_equal(np.asarray(barred.drops), np.asarray(plain.drops))
