"""Tests for `canonsal_jax.morphable.fitting` on the Surrey Face Model: synthetic faces with known truth, the
astronaut photo with held-out landmarks (against eos's own fit when `eos-py` is installed), gradients and
compilation reuse.

Synthetic faces: α ~ 0.7 N(0, I), each blendshape active with probability 0.3 at U(0, 0.5); yaw U(±45°), pitch
and roll U(±20°); the face 150-250 px wide in a 500x500 image; landmarks = the true projected landmark vertices
+ N(0, 1.5 px). The jaw landmarks are the true projections of fixed contour candidates (8 evenly spaced along
each side's candidate list, chin to ear order as iBUG's), not a rendered silhouette: the fitter re-matches them
to its nearest projected candidate, which is what it must get right here.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canonsal_jax import faces, io
from canonsal_jax.morphable import fitting

sfm = pytest.importorskip("canonsal_jax.morphable.sfm")

IMAGE_SIZE = (500, 500)
NUM_SYNTHETIC = 32
NOISE_PX = 1.5
# 1-based iBUG: brow middles (20, 25), nostrils (32, 36), mouth corners (49, 55), outer lip midpoints (52, 58),
# one upper-lid point per eye (38, 45).
HELD_OUT = np.array([20, 25, 32, 36, 49, 55, 52, 58, 38, 45]) - 1
RIGHT_EYE_OUTER, LEFT_EYE_OUTER = 36, 45  # 0-based iBUG outer eye corners


@pytest.fixture(scope="module")
def model(shared_dir):
  return sfm.load_sfm(shared_dir / "assets" / "sfm")


def _synthetic(model, rng, batch):
  """Ground-truth faces and their noisy landmarks (see the module docstring)."""
  alpha = 0.7 * rng.standard_normal((batch, model.num_shape))
  active = rng.uniform(size=(batch, model.num_expression)) < 0.3
  beta = active * rng.uniform(0.0, 0.5, (batch, model.num_expression))
  ypr = np.deg2rad(np.stack([rng.uniform(-45, 45, batch), rng.uniform(-20, 20, batch), rng.uniform(-20, 20, batch)], 1))
  rotation = fitting.rotation_from_yaw_pitch_roll(ypr.astype(np.float32))
  vertices = jax.vmap(model.vertices)(alpha.astype(np.float32), beta.astype(np.float32))
  width_mm = float(np.ptp(np.asarray(model.mean)[:, 0]))
  scale = rng.uniform(150, 250, batch) / width_mm
  translation = rng.uniform(200, 300, (batch, 2))
  xyd = np.asarray(fitting.project(vertices, rotation, scale.astype(np.float32), translation.astype(np.float32)))
  ids = np.asarray(model.landmark_ids).copy()
  right, left = np.asarray(model.contour_right_ids), np.asarray(model.contour_left_ids)
  ids[:8] = right[np.round(np.linspace(0, len(right) - 1, 9)[:8]).astype(int)]
  ids[9:17] = left[np.round(np.linspace(0, len(left) - 1, 9)[:8]).astype(int)][::-1]
  landmarks = xyd[:, np.maximum(ids, 0), :2] + NOISE_PX * rng.standard_normal((batch, 68, 2))
  return {"ypr": ypr, "vertices": np.asarray(vertices), "landmarks": landmarks.astype(np.float32)}


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


def _held_out_error(xy, landmarks_xy):
  """Mean held-out landmark error over the outer-eye-corner distance."""
  eye_distance = np.linalg.norm(landmarks_xy[RIGHT_EYE_OUTER] - landmarks_xy[LEFT_EYE_OUTER])
  return float(np.linalg.norm(xy - landmarks_xy[HELD_OUT], axis=1).mean() / eye_distance)


def _eos_held_out(shared_dir, landmarks_xy, weights, image_size, vertex_ids):
  """eos's full fit (edge topology, contour landmarks, model contours, 5 iterations), its held-out vertices in xy."""
  eos = pytest.importorskip("eos")
  folder = shared_dir / "assets" / "sfm"
  shape = eos.morphablemodel.load_model(str(folder / "sfm_shape_3448.bin"))
  blendshapes = eos.morphablemodel.load_blendshapes(str(folder / "expression_blendshapes_3448.bin"))
  eos_model = eos.morphablemodel.MorphableModel(
    shape.get_shape_model(),
    blendshapes,
    color_model=eos.morphablemodel.PcaModel(),
    vertex_definitions=None,
    texture_coordinates=shape.get_texture_coordinates(),
  )
  landmarks = [
    eos.core.Landmark(str(i + 1), [float(x), float(y)]) for i, (x, y) in enumerate(landmarks_xy) if weights[i] > 0
  ]
  height, width = image_size
  mesh, pose, _, _ = eos.fitting.fit_shape_and_pose(
    eos_model,
    landmarks,
    eos.core.LandmarkMapper(str(folder / "ibug_to_sfm.txt")),
    width,
    height,
    eos.morphablemodel.load_edge_topology(str(folder / "sfm_3448_edge_topology.json")),
    eos.fitting.ContourLandmarks.load(str(folder / "ibug_to_sfm.txt")),
    eos.fitting.ModelContour.load(str(folder / "sfm_model_contours.json")),
    5,
  )
  camera = np.asarray(eos.fitting.get_3x4_affine_camera_matrix(pose, width, height))
  vertices = np.asarray(mesh.vertices)[vertex_ids]
  return vertices @ camera[:2, :3].T + camera[:2, 3]


def test_astronaut_held_out_landmarks(model, shared_dir):
  image = io.default_image()
  images = [image, np.ascontiguousarray(image[:, ::-1])]  # the photo and its mirror image: two faces
  landmarks = np.stack(
    [faces.largest_face(im, "astronaut", adjust_threshold=0.3).landmarks_xy for im in images]
  ).astype(np.float32)
  weights = np.ones(68, np.float32)
  weights[HELD_OUT] = 0.0
  result = fitting.fit(model, landmarks, image_size=image.shape[:2], landmark_weights=weights)
  vertex_ids = np.asarray(model.landmark_ids)[HELD_OUT]
  ours = [_held_out_error(np.asarray(result.vertices_xyd[i, vertex_ids, :2]), landmarks[i]) for i in range(2)]
  print(f"astronaut held-out error / eye-corner distance, ours: {ours}")
  # Measured 0.045 and 0.049 (the mouth corners dominate: 7-9 px of a 60 px eye-corner distance).
  assert max(ours) < 0.07
  try:
    theirs = [
      _held_out_error(_eos_held_out(shared_dir, landmarks[i], weights, image.shape[:2], vertex_ids), landmarks[i])
      for i in range(2)
    ]
  except pytest.skip.Exception:
    return
  print(f"eos: {theirs}; ours / eos: {np.array(ours) / np.array(theirs)}")
  # Measured ratios 0.99 and 1.08: on par with eos, not the 0.8 hoped for; this guards against regressions.
  assert np.mean(ours) < 1.25 * np.mean(theirs)
