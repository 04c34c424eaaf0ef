"""The Surrey Face Model loader against eos's own loader (eos-py), trimesh and the model's symmetry file."""

import pathlib
import re
import shutil

import chex
import numpy as np
import pytest
import trimesh

from canonsal_jax.morphable import sfm
from canonsal_jax.morphable.model import NUM_LANDMARKS, REGION_NAMES

# Float32 values parsed from the same bytes: exact, except the rescaled basis, where eos's Eigen may vectorise
# the float32 product differently (1 ulp of the largest value, ~1e-6 relative).
_BASIS_RTOL = 1e-6


@pytest.fixture(scope="module")
def sfm_dir(shared_dir) -> pathlib.Path:
  path = shared_dir / "assets" / "sfm"
  if not (path / sfm.SFM_FILES["shape"]).is_file():
    pytest.skip(f"Surrey Face Model not found at {path}")
  return path


@pytest.fixture(scope="module")
def model(sfm_dir):
  return sfm.load_sfm(sfm_dir)


@pytest.fixture(scope="module")
def eos():
  return pytest.importorskip("eos")


@pytest.fixture(scope="module")
def eos_model(eos, sfm_dir):
  return eos.morphablemodel.load_model(str(sfm_dir / sfm.SFM_FILES["shape"]))


def _mirror_ids(sfm_dir) -> np.ndarray:
  """0-based mirror vertex of each of the reference's vertices (the file is 1-based)."""
  return np.loadtxt(sfm_dir / "sfm_reference_symmetry.txt", comments="#", dtype=np.int64) - 1


def test_shapes_and_check(model):
  model.check()
  v = model.num_vertices
  assert (v, model.num_shape, model.num_expression) == (3448, 63, 6)
  chex.assert_shape(model.triangles, (6736, 3))
  assert model.name == "sfm_3448"
  assert model.shape_names[0] == "pc0" and len(model.shape_names) == 63
  assert model.expression_names == ("anger", "disgust", "fear", "happiness", "sadness", "surprise")
  for a in (model.mean, model.shape_basis, model.expression_basis, model.uv):
    assert a.dtype == np.float32
  for a in (model.triangles, model.landmark_ids, model.contour_right_ids, model.contour_left_ids, model.regions):
    assert a.dtype == np.int32
  assert np.all(np.isinf(model.shape_lower)) and np.all(np.isinf(model.shape_upper))
  np.testing.assert_array_equal(model.expression_lower, 0)
  np.testing.assert_array_equal(model.expression_upper, sfm.SFM_EXPRESSION_UPPER)


def test_accepts_the_bin_path(model, sfm_dir):
  other = sfm.load_sfm(sfm_dir / sfm.SFM_FILES["shape"])
  chex.assert_trees_all_equal(other, model)


def test_mean_basis_triangles_match_eos(model, eos_model):
  shape = eos_model.get_shape_model()
  v = model.num_vertices
  np.testing.assert_array_equal(np.asarray(model.mean), np.asarray(shape.get_mean()).reshape(v, 3))
  eos_rescaled = np.asarray(shape.get_rescaled_pca_basis()).reshape(v, 3, -1)
  np.testing.assert_allclose(model.shape_basis, eos_rescaled, rtol=0, atol=_BASIS_RTOL * np.abs(eos_rescaled).max())
  # The rescaled basis is the orthonormal one times the prior's standard deviations.
  orthonormal = np.asarray(shape.get_orthonormal_pca_basis())
  np.testing.assert_allclose(np.linalg.norm(orthonormal, axis=0), 1, atol=1e-4)
  sd = np.sqrt(np.asarray(shape.get_eigenvalues()))
  np.testing.assert_allclose(
    np.asarray(model.shape_basis).reshape(3 * v, -1), orthonormal * sd, atol=_BASIS_RTOL * np.abs(eos_rescaled).max()
  )
  # eos's triangles are already counter-clockwise seen from outside: no flip.
  np.testing.assert_array_equal(model.triangles, np.asarray(shape.get_triangle_list()))


def test_uv_is_eos_with_v_flipped(model, eos_model):
  eos_uv = np.asarray(eos_model.get_texture_coordinates())
  np.testing.assert_allclose(model.uv[:, 0], eos_uv[:, 0], atol=1e-7)
  np.testing.assert_allclose(model.uv[:, 1], 1 - eos_uv[:, 1], atol=1e-7)
  assert float(model.uv.min()) >= 0 and float(model.uv.max()) <= 1
  # v up: the eyes are above the chin in the texture as on the face.
  eye, chin = model.landmark_ids[36], model.landmark_ids[8]
  assert model.uv[eye, 1] > model.uv[chin, 1]
  assert model.mean[eye, 1] > model.mean[chin, 1]


def test_blendshapes_match_eos(model, eos, sfm_dir):
  shapes = eos.morphablemodel.load_blendshapes(str(sfm_dir / sfm.SFM_FILES["expression"]))
  assert tuple(b.name for b in shapes) == model.expression_names
  for i, b in enumerate(shapes):
    np.testing.assert_array_equal(model.expression_basis[..., i], np.asarray(b.deformation).reshape(-1, 3))


def test_landmarks_match_eos_mapper(model, eos, sfm_dir):
  mapper = eos.core.LandmarkMapper(str(sfm_dir / sfm.SFM_FILES["landmarks"]))
  for k in range(1, NUM_LANDMARKS + 1):
    vertex = mapper.convert(str(k))
    assert int(model.landmark_ids[k - 1]) == (-1 if vertex is None else int(vertex)), k
  # Contour points (1-8, 10-17) and the inner mouth corners (61, 65) are left unmapped.
  unmapped = {k for k in range(1, NUM_LANDMARKS + 1) if model.landmark_ids[k - 1] < 0}
  assert unmapped == {*range(1, 9), *range(10, 18), 61, 65}


def test_eos_reads_our_reading_of_a_version_4_file(model, eos, eos_model, sfm_dir, tmp_path):
  """eos writes the newest format (version 4: blendshapes, landmark definitions, texture triangles inside)."""
  shapes = eos.morphablemodel.load_blendshapes(str(sfm_dir / sfm.SFM_FILES["expression"]))
  uv = eos_model.get_texture_coordinates()
  tri = eos_model.get_shape_model().get_triangle_list()
  full = eos.morphablemodel.MorphableModel(
    eos_model.get_shape_model(), shapes, eos_model.get_color_model(), {"nose.tip": 114}, uv, tri
  )
  folder = tmp_path / "sfm"
  folder.mkdir()
  eos.morphablemodel.save_model(full, str(folder / sfm.SFM_FILES["shape"]))
  for key in ("landmarks", "contours"):
    shutil.copy(sfm_dir / sfm.SFM_FILES[key], folder)
  # No separate blendshapes file: they come from inside the model file.
  chex.assert_trees_all_equal(sfm.load_sfm(folder), model)


def test_contours(model, sfm_dir):
  right, left = np.asarray(model.contour_right_ids), np.asarray(model.contour_left_ids)
  assert right.shape == left.shape == (17,)
  mean = np.asarray(model.mean)
  # The face's right is at -x (image left when the face looks at the camera along +z).
  assert np.all(mean[right, 0] < 0) and np.all(mean[left, 0] > 0)
  assert model.mean[model.landmark_ids[36], 0] < 0  # landmark 37, the right eye's outer corner
  # The two contours mirror each other (the symmetry file covers the reference's 845 vertices).
  mirror = _mirror_ids(sfm_dir)
  np.testing.assert_array_equal(mirror[right], left)


def test_edge_topology(model, eos, sfm_dir):
  topo = sfm.load_edge_topology(sfm_dir)
  eos_topo = eos.morphablemodel.load_edge_topology(str(sfm_dir / sfm.SFM_FILES["edge_topology"]))
  np.testing.assert_array_equal(topo.adjacent_faces, np.asarray(eos_topo.adjacent_faces) - 1)
  np.testing.assert_array_equal(topo.adjacent_vertices, np.asarray(eos_topo.adjacent_vertices) - 1)
  # Every edge's vertices belong to its faces; border edges have one face (eos puts the -1 first).
  tri = np.asarray(model.triangles)
  for col in (0, 1):
    has = topo.adjacent_faces[:, col] >= 0
    face = tri[topo.adjacent_faces[has, col]]
    assert np.all((face[:, :, None] == topo.adjacent_vertices[has, None, :]).any(axis=1))
  assert (topo.adjacent_faces[:, 0] == -1).sum() == 160 and topo.adjacent_faces[:, 1].min() >= 0


def test_normals_point_outward(model):
  mesh = trimesh.Trimesh(np.asarray(model.mean), np.asarray(model.triangles), process=False)
  assert mesh.is_winding_consistent
  # The face mask's outside looks along +z: nearly all faces there, and away from the head's centre.
  normals = mesh.face_normals
  assert (normals[:, 2] > 0).mean() > 0.95
  outward = np.einsum("fd,fd->f", normals, mesh.triangles_center - mesh.vertices.mean(0))
  assert (outward > 0).mean() > 0.9
  nose_tip = int(model.landmark_ids[30])
  assert mesh.vertex_normals[nose_tip, 2] > 0.9


def test_landmarks_land_on_the_reference_mesh(model, sfm_dir):
  """The 845-vertex reference shares the model's first vertex ids; a vertex-order error would move them far."""
  ref = trimesh.load(sfm_dir / "sfm_reference.obj", process=False)
  n = ref.vertices.shape[0]
  ids = np.asarray(model.landmark_ids)
  ids = ids[(ids >= 0) & (ids < n)]
  # The reference is a face close to, not equal to, the mean (about 1.3 mm apart at the median vertex).
  dist = np.linalg.norm(np.asarray(model.mean)[ids] - ref.vertices[ids], axis=1)
  assert dist.max() < 6.0, dist.max()
  assert np.median(np.linalg.norm(np.asarray(model.mean)[:n] - ref.vertices, axis=1)) < 2.0
  # The nose tip (landmark 31) is the reference's most forward vertex region.
  nose_tip = int(model.landmark_ids[30])
  assert ref.vertices[nose_tip, 2] > np.percentile(ref.vertices[:, 2], 99.5)


def test_symmetry_maps_landmarks_to_their_mirrors(model, sfm_dir):
  mirror = _mirror_ids(sfm_dir)
  ids = np.asarray(model.landmark_ids)
  # iBUG mirror pairs (1-based) whose vertices both lie on the reference.
  pairs = {37: 46, 38: 45, 39: 44, 40: 43, 41: 48, 42: 47, 18: 27, 20: 25, 22: 23, 32: 36, 49: 55, 50: 54}
  pairs.update({51: 53, 56: 60, 57: 59, 62: 64, 66: 68})
  for a, b in pairs.items():
    assert mirror[ids[a - 1]] == ids[b - 1], (a, b)
  for k in (9, 31, 34, 52, 58, 63, 67):  # on the midline
    assert mirror[ids[k - 1]] == ids[k - 1], k
  mean = np.asarray(model.mean)
  mirrored = mean[mirror] * np.array([-1, 1, 1])
  err = np.linalg.norm(mirrored - mean[: len(mirror)], axis=1)
  assert err.max() < 3.0 and np.median(err) < 1.0  # the mean face is nearly symmetric (mm)


def test_regions(model, sfm_dir):
  regions = np.asarray(model.regions)
  assert regions.min() >= 0 and regions.max() < len(REGION_NAMES)
  counts = np.bincount(regions, minlength=len(REGION_NAMES))
  for name in ("forehead", "brows", "eyes", "nose", "cheeks", "mouth", "chin", "jaw"):
    assert counts[REGION_NAMES.index(name)] > 50, name
  assert counts[REGION_NAMES.index("ears")] == 0  # the SFM is a face mask without ears
  ids = np.asarray(model.landmark_ids)
  expect = {"eyes": [37, 40, 43, 46], "brows": [18, 20, 25, 27], "nose": [31, 34], "mouth": [49, 52, 55, 58]}
  expect["chin"] = [9]
  for name, landmarks in expect.items():
    for k in landmarks:
      assert REGION_NAMES[regions[ids[k - 1]]] == name, (k, name)
  # Left-right symmetric: mirror vertices share their region (up to the mean's own slight asymmetry).
  mirror = _mirror_ids(sfm_dir)
  assert (regions[mirror] == regions[: len(mirror)]).mean() > 0.97
  # Deterministic.
  np.testing.assert_array_equal(sfm.label_regions(model.mean, model.landmark_ids), regions)


def test_missing_folder_and_files(tmp_path, sfm_dir):
  with pytest.raises(FileNotFoundError, match=r"Surrey Face Model not found.*--morphable_model"):
    sfm.load_sfm(tmp_path / "nowhere")
  folder = tmp_path / "partial"
  folder.mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape(sfm.SFM_FILES["shape"])):
    sfm.load_sfm(folder)
  shutil.copy(sfm_dir / sfm.SFM_FILES["shape"], folder)
  with pytest.raises(FileNotFoundError, match=re.escape(sfm.SFM_FILES["expression"] + " is missing")):
    sfm.load_sfm(folder)
  with pytest.raises(FileNotFoundError, match="edge topology not found"):
    sfm.load_edge_topology(folder)


def _copy(sfm_dir, tmp_path) -> pathlib.Path:
  folder = tmp_path / "sfm"
  shutil.copytree(sfm_dir, folder)
  for f in folder.iterdir():
    f.chmod(0o644)
  return folder


@pytest.mark.parametrize("key", ["shape", "expression"])
@pytest.mark.parametrize("keep", [0, 3, 1000, -1])
def test_truncated_binary_files(sfm_dir, tmp_path, key, keep):
  folder = _copy(sfm_dir, tmp_path)
  path = folder / sfm.SFM_FILES[key]
  data = path.read_bytes()
  path.write_bytes(data[:keep])
  with pytest.raises(ValueError, match=re.escape(sfm.SFM_FILES[key] + ": not a valid eos file")):
    sfm.load_sfm(folder)


@pytest.mark.parametrize("key", ["shape", "expression"])
def test_corrupt_binary_files(sfm_dir, tmp_path, key):
  folder = _copy(sfm_dir, tmp_path)
  path = folder / sfm.SFM_FILES[key]
  data = bytearray(path.read_bytes())
  if key == "shape":
    data[0:4] = (7).to_bytes(4, "little")  # an unknown class version
    match = "version 7"
  else:
    data[8:16] = (10**12).to_bytes(8, "little")  # an absurd name length
    match = "claims"
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match=match):
    sfm.load_sfm(folder)
  path.write_bytes(bytes(data) + b"\0")
  with pytest.raises(ValueError, match=re.escape(sfm.SFM_FILES[key])):
    sfm.load_sfm(folder)


def test_trailing_bytes(sfm_dir, tmp_path):
  folder = _copy(sfm_dir, tmp_path)
  path = folder / sfm.SFM_FILES["shape"]
  path.write_bytes(path.read_bytes() + b"\0\0")
  with pytest.raises(ValueError, match="left over"):
    sfm.load_sfm(folder)


def test_bad_text_files(sfm_dir, tmp_path):
  folder = _copy(sfm_dir, tmp_path)
  (folder / sfm.SFM_FILES["landmarks"]).write_text("[landmark_mappings]\n31 = 99999\n")
  with pytest.raises(ValueError, match="maps to vertex 99999"):
    sfm.load_sfm(folder)
  shutil.copy(sfm_dir / sfm.SFM_FILES["landmarks"], folder)
  (folder / sfm.SFM_FILES["contours"]).write_text("{}")
  with pytest.raises(ValueError, match="model_contour"):
    sfm.load_sfm(folder)
