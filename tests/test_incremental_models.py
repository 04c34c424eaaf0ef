"""Incremental occlusion on the ported face models and the VGG-16-sized network.

Two links make the chain from a model's own `apply_fn` to the incremental sweep: its `LayerGraph` computes what
`apply_fn` computes (float32, the same ops), and the incremental windows give what the graph gives on every
occluded image (float64, where both agree to rounding whatever the order of their sums, so a missed activation
would show as an error of the size of a drop). The float32 sweeps of gender and age against a one-image-at-a-time
loop are in tests/test_occlusion.py (`make_sweep` runs them incrementally by default).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from benchmarks.baselines import vgg
from canonsal_jax import incremental as inc
from canonsal_jax import models, occlusion
from tests.tolerance import rounding_atol

# Patch sides: the paper's 7% of the face (3 px on the 64 px chips, 5 px on identity's 150, 15 px on VGG's 224),
# 5 px on the 64 px chips as the incremental benchmark uses, 1 px on gender's 32.
_CASES = {"gender": 3, "age": 5, "expression": 5, "identity": 11, "vgg16": 15}


def _model(name: str):
  """(apply_fn, params, input shape); VGG narrowed (4-8 channels: the geometry is VGG-16's, the cost is not)."""
  if name == "vgg16":
    graphdef, params = vgg.make_vgg16(0, widths=(4, 4, 8, 8, 8), hidden=16, num_classes=5)
    apply_fn = inc.with_graph(functools.partial(vgg.apply, graphdef), vgg.layer_graph(graphdef))
    return apply_fn, params, (vgg.INPUT_SIZE, vgg.INPUT_SIZE, 3)
  model = models.load(name)
  assert model.layer_graph is model.apply_fn.layer_graph
  return model.apply_fn, model.params, model.input_shape


def _centres(size: int, patch: int, rng) -> np.ndarray:
  """Corners, edges (clipped patches), interior and arbitrary (vertex-like) centres."""
  fixed = [[0, 0], [0, size - 1], [size - 1, 0], [size - 1, size - 1], [size // 2, 0], [1, size // 2]]
  fixed += [[size // 2, size // 2], [size // 3, 2 * size // 3], [-(patch // 2), 4], [size + patch // 2 - 1, 7]]
  return np.concatenate([fixed, rng.integers(0, size, size=(6, 2))]).astype(np.int32)


@pytest.mark.parametrize(
  "name", [pytest.param(n, marks=pytest.mark.slow) if n in ("expression", "vgg16") else n for n in _CASES]
)
def test_graph_computes_what_apply_fn_computes(name):
  apply_fn, params, shape = _model(name)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, *shape)), jnp.float32)
  want = np.asarray(apply_fn(params, x))
  got = np.asarray(apply_fn.layer_graph.apply(params, x))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize(
  "name",
  [
    "gender",
    pytest.param("age", marks=pytest.mark.slow),
    # the larger graphs take 15-30 s each on a quiet 2-core machine (mostly compiling float64 programs)
    pytest.param("expression", marks=pytest.mark.slow),
    pytest.param("identity", marks=pytest.mark.slow),
    pytest.param("vgg16", marks=pytest.mark.slow),
  ],
)
def test_incremental_windows_exact_in_float64(name):
  apply_fn, params, shape = _model(name)
  graph, patch = apply_fn.layer_graph, _CASES[name]
  rng = np.random.default_rng(1)
  centres = _centres(shape[0], patch, rng)
  with jax.enable_x64(True):
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
    image = jnp.asarray(rng.normal(size=shape))
    base = jnp.broadcast_to(jnp.asarray(rng.normal(size=shape[-1:])), shape)  # a per-channel baseline
    acts = graph.activations(params, image[None])
    the_plan = inc.plan(graph, [a.shape[1:] for a in acts], patch_size=patch)
    assert any(p.windowed for p in the_plan.nodes[1:])  # the windows do get used
    cache = inc.make_cache(graph, the_plan, acts)
    run = jax.jit(lambda p, cache, c: inc.occluded_outputs(graph, the_plan, graph.bind(p), cache, image, base, c))
    got = np.asarray(run(params, cache, jnp.asarray(centres)))
    half = patch // 2
    rows, cols = np.arange(shape[0])[:, None], np.arange(shape[1])[None, :]
    masks = [(np.abs(rows - r) <= half) & (np.abs(cols - c) <= half) for r, c in centres]
    occluded = jnp.where(jnp.asarray(np.stack(masks))[..., None], base, image)
    want = np.asarray(jax.jit(graph.apply)(params, occluded))
  assert got.dtype == np.float64
  drops = np.asarray(acts[-1]) - want
  assert np.abs(drops).max() > 1e-6 * np.abs(want).max()  # the patches do change the outputs
  np.testing.assert_allclose(got, want, rtol=0, atol=rounding_atol(want, dtype=np.float64, ulps=1024))


def test_nnx_models_bind_by_merge():
  """The graphs of the NNX ports read the weights they are given (new weights, no recompiled closure)."""
  graphdef, params = vgg.make_vgg16(0, widths=(4, 4, 8, 8, 8), hidden=16, num_classes=5)
  graph = vgg.layer_graph(graphdef)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 224, 224, 3)), jnp.float32)
  doubled = jax.tree.map(lambda a: 2 * a, params)
  want = nnx.merge(graphdef, doubled)(x)
  np.testing.assert_allclose(np.asarray(graph.apply(doubled, x)), np.asarray(want), rtol=1e-5, atol=1e-5)
  assert occlusion.make_sweep(graph.apply, graph=graph, patch_size=15, batch_size=4, score=occlusion.Score("logit"))


@pytest.mark.slow
def test_benchmark_function_runs_and_agrees():
  """`bench.incremental_vs_full` (the --suite=incremental figures) on a few gender patches: every method agrees."""
  from benchmarks import bench

  res = bench.incremental_vs_full(
    models.load("gender"),
    patch_size=1,
    num_positions=32,
    batch_size=8,
    approx_thresholds=(1.0,),
    repeats=1,
    more_batch_sizes=(4,),
  )
  assert res["num_patches"] == 32
  assert set(res["seconds"]) >= {"full", "full_graph", "incremental", "approx_1", "full@4", "incremental@4"}
  assert res["drop_error"]["incremental"] < 1e-5 and res["drop_error"]["approx_1"] < 1e-5
  assert res["drop_error"]["incremental@4"] < 1e-5 and res["drop_error"]["full@4"] < 1e-5
  # each sweep at its fastest batch; with one round the best-vs-best ratio is the ratio of those two times
  best, sec = res["best"], res["seconds"]
  fastest_full = min(("full", "full@4"), key=sec.get)
  fastest_inc = min(("incremental", "incremental@4"), key=sec.get)
  assert best["full"] == {"batch_size": 8 if fastest_full == "full" else 4, "seconds": sec[fastest_full]}
  assert best["incremental"]["batch_size"] == (8 if fastest_inc == "incremental" else 4)
  assert best["speedup"] == pytest.approx(sec[fastest_full] / sec[fastest_inc])
  assert res["drop_correlation"]["incremental"] > 0.999999
  if res["torch"] is not None:  # the paper's PyTorch procedure on the same patches gives the same heatmap
    assert res["torch"]["paper_heatmap_err"] < 1e-4
  assert res["windows"][0] == "0: 1x1 of 32x32" and res["windows"][-1].endswith("full")


@pytest.mark.slow
def test_precision_benchmark_compares_against_highest():
  """`bench.precision_vs_highest` (the --suite=precision figures): "highest" is its own reference, and on XLA:CPU,
  where matmul precision settings change nothing, every precision's drops equal it."""
  from benchmarks import bench

  res = bench.precision_vs_highest(models.load("gender"), num_positions=16, batch_size=8, repeats=1)
  assert res["num_patches"] == 16 and set(res["seconds"]) == {"highest", "default", "high"}
  assert res["drop_error"]["highest"] == 0.0 and res["speedup"]["highest"] == 1.0
  if res["backend"] == "cpu":
    assert max(res["drop_error"].values()) == 0.0, res["drop_error"]
