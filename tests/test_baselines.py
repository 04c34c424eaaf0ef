"""The PyTorch baselines against ours: same logits from the same weights, same heatmaps from the same patches."""

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("captum")

from benchmarks.baselines import reference, torch_models, vgg  # noqa: E402
from canonsal_jax import models, occlusion  # noqa: E402

FACE_MODELS = ("gender", "age", "expression")
# float32 in both frameworks, different summation orders: relative differences measured are 3e-7 to 4e-6 (VGG);
# 1e-4 of the largest value leaves room for other CPUs' kernels without hiding a layout error (those give O(1)).
RTOL_OF_MAX = 1e-4


def _close_to_max(actual, expected):
  actual, expected = np.asarray(actual), np.asarray(expected)
  assert actual.shape == expected.shape
  scale = np.abs(expected).max()
  assert scale > 0
  np.testing.assert_array_less(np.abs(actual - expected).max(), RTOL_OF_MAX * scale)


def _inputs(model, n, seed=0):
  rng = np.random.default_rng(seed)
  size = model.input_shape[0]
  return np.stack([model.preprocess(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)])


@pytest.fixture(scope="module")
def vgg16():
  return vgg.load_vgg16(seed=0)


@pytest.mark.parametrize("name", [*FACE_MODELS, pytest.param("vgg16", marks=pytest.mark.slow)])
def test_torch_twin_logits_match(name, request):
  model = request.getfixturevalue("vgg16") if name == "vgg16" else models.load(name)
  x = _inputs(model, 1 if name == "vgg16" else 4)
  net = torch_models.from_face_model(model)
  with jax.default_matmul_precision("highest"):
    ours = model.logits(x)
  with torch.inference_mode():
    theirs = net(torch_models.to_nchw(x)).numpy()
  _close_to_max(theirs, ours)


def test_unknown_twin_is_refused():
  class Fake:
    name = "resnet"
    params = None

  with pytest.raises(ValueError, match="no PyTorch twin for 'resnet'"):
    torch_models.from_face_model(Fake())


def test_captum_centres_crop_the_last_window():
  centres = reference.captum_centres(10, 12, patch_size=3, stride=3)
  np.testing.assert_array_equal(np.unique(centres[:, 0]), [1, 4, 7, 10])  # window at 9..11 cropped to 9
  np.testing.assert_array_equal(np.unique(centres[:, 1]), [1, 4, 7, 10])  # 12 - 3 = 9 = 3 * 3: no crop
  np.testing.assert_array_equal(
    reference.captum_centres(12, 12, patch_size=3, stride=3), occlusion.grid_centres(12, 12, patch_size=3, stride=3)
  )


@pytest.mark.parametrize("name, patch, stride", [("gender", 5, 4), ("age", 9, 8), ("expression", 9, 8)])
def test_baseline_heatmaps_match_ours(name, patch, stride):
  """(size - patch) % stride == stride - 1: Captum's last window is cropped at the border (225 / 64 patches)."""
  model = models.load(name)
  image = _inputs(model, 1, seed=1)[0]
  size = model.input_shape[0]
  centres = reference.captum_centres(size, size, patch_size=patch, stride=stride)
  score = occlusion.Score.for_model(model)
  sweep = occlusion.make_sweep(model.apply_fn, patch_size=patch, batch_size=16, score=score)
  with jax.default_matmul_precision("highest"):
    ours = sweep(model.params, image, centres, np.ones(len(centres), bool))
  assert int(np.asarray(ours.count).min()) > 0  # Captum's windows cover every pixel here
  score_fn = reference.torch_score(
    score.kind, target=None if score.kind == "expected_value" else int(ours.target), values=score.values
  )
  net = torch_models.from_face_model(model)
  x = torch_models.to_nchw(image[None])[0]
  paper = reference.paper_occlusion(net, x, centres, patch_size=patch, score_fn=score_fn)
  _close_to_max(paper.numpy(), ours.heatmap)
  for ppe in (1, 7) if name == "gender" else (7,):  # one image per forward; a count not dividing the windows
    captum = reference.captum_occlusion(
      net, x, patch_size=patch, stride=stride, score_fn=score_fn, perturbations_per_eval=ppe
    )
    _close_to_max(captum.numpy(), ours.heatmap)


def test_paper_procedure_on_scattered_patches():
  """Arbitrary centres (the paper's are projected vertices), some at the border, one repeated; uncovered -> 0."""
  model = models.load("gender")
  image = _inputs(model, 1, seed=2)[0]
  centres = np.array([[0, 0], [31, 31], [5, 17], [5, 17], [20, 3], [12, 30]], np.int32)
  score = occlusion.Score("logit")
  with jax.default_matmul_precision("highest"):
    ours = occlusion.make_sweep(model.apply_fn, patch_size=3, batch_size=4, score=score)(
      model.params, image, centres, np.ones(len(centres), bool), target=1
    )
  net = torch_models.from_face_model(model)
  paper = reference.paper_occlusion(
    net, torch_models.to_nchw(image[None])[0], centres, patch_size=3, score_fn=reference.torch_score("logit", target=1)
  )
  assert (np.asarray(ours.count) == 0).any()
  _close_to_max(paper.numpy(), ours.heatmap)


@pytest.mark.slow
def test_benchmark_against_torch_runs_and_agrees():
  """`bench.sweep_vs_torch` (the --suite=torch figures): ours (incremental), the full sweep, the paper's procedure
  and Captum all give the same heatmap, and every method is timed."""
  from benchmarks import bench
  from canonsal_jax import models

  res = bench.sweep_vs_torch(
    models.load("gender"), strides=(1,), batch_size=64, perturbations_per_eval=(64,), repeats=1
  )
  (row,) = res["rows"]
  assert res["batch_size"] == 64
  assert row["num_patches"] == 32 * 32 and row["grid"]
  assert max(row["paper_err"], row["ours_full_err"], row["captum"][64]["err"]) <= 1e-4
  assert set(row["seconds"]) == {"ours", "ours_full", "paper", "captum_64", "jax_forward", "torch_forward"}
  assert row["captum_best_ppe"] == 64 and row["paper_over_full"] > 0
