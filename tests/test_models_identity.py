"""dlib's face descriptor: the reader of dlib's `.dat`, and the NNX port against dlib's own runtime."""

import io

import chex
import dlib
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from canonsal_jax import assets, faces, fileio, models, occlusion
from canonsal_jax.models import dlib_resnet

# Parity tolerance on descriptors (entries of magnitude up to ~0.3, norms ~1.3-1.5). Both sides compute in
# float32 but sum in different orders (XLA's convolutions vs dlib's im2col + BLAS) through 29 convolutions; the
# differences seen are below 5e-7. A layout, padding, pooling or `add_prev` mistake moves entries by 1e-2 or
# more, so 1e-4 leaves a wide margin both ways.
_ATOL = 1e-4
# The unoccluded chip's cosine similarity to itself: 1 up to float32 rounding over 128 products.
_SELF_SIMILARITY_ATOL = 1e-6


@pytest.fixture(scope="module")
def model() -> models.FaceModel:
  return models.load("identity")


@pytest.fixture(scope="module")
def recognizer() -> dlib.face_recognition_model_v1:
  return dlib.face_recognition_model_v1(str(assets.path(dlib_resnet.ASSET)))


@pytest.fixture(scope="module")
def embed(model):
  return jax.jit(model.apply_fn)


def _chip(model: models.FaceModel, image: np.ndarray, name: str, **detect) -> np.ndarray:
  face = faces.largest_face(image, name, **detect)
  chip, _ = faces.crop_face(image, face, model.crop)
  return chip


@pytest.fixture(scope="module")
def astronaut(model) -> tuple[np.ndarray, dlib.full_object_detection, np.ndarray]:
  """skimage's astronaut, her 5 dlib landmarks and her chip made by `faces.crop_face`."""
  image = fileio.default_image()
  face = faces.largest_face(image, "astronaut", adjust_threshold=0.3)
  predictor = dlib.shape_predictor(str(assets.path("shape_predictor_5_face_landmarks.dat")))
  shape = predictor(image, face.dlib_rect())
  chip, _ = faces.crop_face(image, face, model.crop)
  return image, shape, chip


def test_reader_parses_the_whole_network():
  net = dlib_resnet.read_dlib_net(assets.path(dlib_resnet.ASSET))  # raises if any byte is left over
  assert net.loss.kind == "loss_metric_2"
  assert net.loss.fields["dist_thresh"] == pytest.approx(dlib_resnet.SAME_PERSON_DISTANCE)
  kinds = [layer.kind for layer in net.layers]
  assert len(kinds) == 131
  counts = {kind: kinds.count(kind) for kind in set(kinds)}
  assert counts == {
    "input_rgb_image_sized": 1,
    "con_4": 29,
    "affine_": 29,
    "relu_": 29,
    "max_pool_2": 1,
    "tag_or_skip": 22,  # tag1 in each of 14 blocks, tag2 and skip1 in the 4 downsampling ones
    "add_prev_": 14,
    "avg_pool_2": 5,
    "fc_2": 1,
  }
  inp = net.layers[0].fields
  means = np.float32([inp["avg_red"], inp["avg_green"], inp["avg_blue"]])
  np.testing.assert_array_equal(means, np.float32([122.782, 117.001, 104.298]))
  assert (inp["nr"], inp["nc"]) == (150, 150)
  stem = net.layers[1]
  assert stem.tensors["filters"].shape == (32, 3, 7, 7) and stem.tensors["biases"].shape == (32,)
  fc = net.layers[-1]
  assert fc.tensors["weights"].shape == (256, 128) and "biases" not in fc.tensors
  weights = dlib_resnet._convert(net, "test")
  num_params = sum(v.size for k, v in weights.items() if not k.startswith(("input/", "loss/")))
  assert num_params == 5_614_592  # conv filters + biases, affine scales + offsets, fc


def test_reader_rejects_truncated_and_foreign_files(tmp_path):
  data = assets.path(dlib_resnet.ASSET).read_bytes()
  truncated = tmp_path / "truncated.dat"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match=r"truncated\.dat"):
    dlib_resnet.read_dlib_net(truncated)
  with pytest.raises(ValueError, match="shape_predictor_5"):
    dlib_resnet.read_dlib_net(assets.path("shape_predictor_5_face_landmarks.dat"))


def test_weights_are_converted_once_and_cached(tmp_path):
  first = dlib_resnet.load_weights(weights_dir=tmp_path)
  (cached,) = tmp_path.glob("*.npz")
  assert assets.ASSETS[dlib_resnet.ASSET].sha256[:16] in cached.name
  assert not list(tmp_path.glob("*.partial"))
  second = dlib_resnet.load_weights(weights_dir=tmp_path)
  chex.assert_trees_all_equal(first, second)
  assert first["stem/conv/kernel"].shape == (7, 7, 3, 32)
  assert first["fc/kernel"].shape == (256, 128)


def test_model_spec(model):
  assert model.name == "identity" and model.score == "cosine"
  assert model.num_outputs == dlib_resnet.EMBEDDING_DIM and model.labels[0] == "emb0"
  assert model.input_shape == (150, 150, 3)
  assert model.crop == models.CropSpec("dlib_chip", 150, 0.25, landmarks=5)
  assert "identity" in models.names()


def test_preprocess_is_dlibs_input_layer(model):
  chip = np.full((150, 150, 3), 200, np.uint8)
  x = model.preprocess(chip)
  assert x.dtype == np.float32 and x.shape == (150, 150, 3)
  np.testing.assert_array_equal(x[0, 0], (np.float32(200) - np.float32([122.782, 117.001, 104.298])) / 256)
  assert model.preprocess(np.full((64, 80, 3), 200, np.uint8)).shape == (150, 150, 3)  # resized
  with pytest.raises(ValueError, match="uint8 RGB"):
    model.preprocess(chip.astype(np.float32))


def test_crop_face_makes_dlibs_chip(model, astronaut):
  image, shape, chip = astronaut
  np.testing.assert_array_equal(chip, dlib.get_face_chip(image, shape, size=150, padding=0.25))


def test_descriptors_match_dlib(model, recognizer, embed, astronaut):
  image, shape, chip = astronaut
  rng = np.random.default_rng(0)
  chips = [chip, np.ascontiguousarray(chip[:, ::-1])]
  chips += [rng.integers(0, 256, (150, 150, 3), dtype=np.uint8) for _ in range(2)]
  ours = np.asarray(embed(model.params, np.stack([model.preprocess(c) for c in chips])))
  theirs = np.array([np.asarray(recognizer.compute_face_descriptor(c)) for c in chips])
  chex.assert_shape(ours, (4, 128))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=_ATOL)
  # dlib's photo + landmarks path makes the same chip, so gives the same descriptor.
  np.testing.assert_allclose(ours[0], np.asarray(recognizer.compute_face_descriptor(image, shape)), atol=_ATOL)
  # Not normalised: dlib's descriptors are the fc output, Euclidean distances compare them as they are.
  assert np.all(np.abs(np.linalg.norm(ours, axis=1) - 1) > 0.05)


def test_same_and_different_people(model, recognizer, embed, astronaut):
  from canonsal_jax import datasets

  # The photos of `datasets.face_recognition_photos`, read directly: it also fits 68 landmarks at upsample 1
  # on these large photos (~9 s), where the 5-point chips need only a box.
  try:
    archive = assets.archive_path(datasets.FACE_RECOGNITION_ARCHIVE)
  except assets.AssetError as e:  # no package index reachable
    pytest.skip(f"face_recognition's sdist is not available: {e}")
  members = assets.read_members(archive, tuple(f"tests/test_images/{n}.jpg" for n in datasets.FACE_RECOGNITION_PHOTOS))
  photos = {
    name: np.asarray(Image.open(io.BytesIO(members[f"tests/test_images/{name}.jpg"])).convert("RGB"))
    for name in datasets.FACE_RECOGNITION_PHOTOS
  }
  _, _, astro = astronaut
  chips = {"astronaut": astro, "astronaut_mirrored": np.ascontiguousarray(astro[:, ::-1])}
  chips |= {name: _chip(model, image, name, upsample=0) for name, image in photos.items()}
  names = list(chips)
  ours = np.asarray(embed(model.params, np.stack([model.preprocess(chips[n]) for n in names])))
  ours = dict(zip(names, ours, strict=True))
  theirs = {n: np.asarray(recognizer.compute_face_descriptor(chips[n])) for n in names}
  threshold = dlib_resnet.SAME_PERSON_DISTANCE
  pairs = {
    ("astronaut", "astronaut_mirrored"): True,
    ("obama", "obama2"): True,
    ("obama", "obama3"): True,
    ("biden", "obama"): False,
    ("biden", "obama2"): False,
    ("astronaut", "obama"): False,
    ("astronaut", "biden"): False,
  }
  for (a, b), same in pairs.items():
    distance = np.linalg.norm(ours[a] - ours[b])
    assert (distance < threshold) == same, f"{a} vs {b}: distance {distance:.3f}"
    assert distance == pytest.approx(np.linalg.norm(theirs[a] - theirs[b]), abs=2 * _ATOL)


def test_params_are_an_argument_and_one_trace_serves_new_weights(model, astronaut):
  _, _, chip = astronaut
  x = model.preprocess(chip)[None]

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(params, x):
    return model.apply_fn(params, x)

  base = f(model.params, x)
  doubled = jax.tree.map(lambda p: p, model.params)
  doubled["fc"] = jax.tree.map(lambda p: 2 * p, doubled["fc"])
  np.testing.assert_allclose(f(doubled, x), 2 * base, rtol=1e-6)
  np.testing.assert_array_equal(f(model.params, x), base)


def test_occlusion_with_cosine_score_runs(model, astronaut):
  _, _, chip = astronaut
  image = jnp.asarray(model.preprocess(chip))
  patch = 31
  sweep = occlusion.make_sweep(
    model.apply_fn, patch_size=patch, batch_size=4, score=occlusion.Score.for_model(model), devices=jax.devices()[:1]
  )
  centres = occlusion.grid_centres(150, 150, patch_size=patch, stride=40)[:4]
  result = sweep(model.params, image, centres, np.ones(len(centres), bool))
  assert float(result.score) == pytest.approx(1.0, abs=_SELF_SIMILARITY_ATOL)
  chex.assert_trees_all_close(result.target, result.outputs)
  drops = np.asarray(result.drops)
  assert drops.shape == (len(centres),) and np.all(np.isfinite(drops))
  assert np.all(drops >= -_SELF_SIMILARITY_ATOL) and drops.max() > 0  # any change lowers self-similarity
  assert int(result.num_nonfinite) == 0
