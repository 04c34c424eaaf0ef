"""Tests for canonical.from_texture: texture -> crop through a fitted mesh, the inverse of to_texture."""

import numpy as np
import pytest

from canonsal_jax import canonical, raster
from canonsal_jax.morphable.sfm import load_sfm

_CROP = 64
_TEXTURE = 128


@pytest.fixture(scope="module")
def sfm(shared_dir):
  return load_sfm(shared_dir / "assets" / "sfm")


def _posed(model, yaw: float) -> np.ndarray:
  """The mean shape yawed by `yaw` radians, orthographic into a 64 px crop (x right, y down, larger depth closer)."""
  c, s = np.cos(yaw), np.sin(yaw)
  rotation = np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]])
  v = np.asarray(model.mean, np.float64) @ rotation.T
  scale = 0.8 * _CROP / np.ptp(v[:, 0])
  centre = (v.max(0) + v.min(0)) / 2
  return np.stack(
    [(v[:, 0] - centre[0]) * scale + _CROP / 2, (centre[1] - v[:, 1]) * scale + _CROP / 2, v[:, 2] * scale], -1
  ).astype(np.float32)


def _frags(mesh, triangles):
  return raster.check_complete(raster.rasterize(mesh, triangles, _CROP, _CROP, max_box=8, max_oversized=64))


def _front_facing_mesh_pixels(mesh: np.ndarray, triangles: np.ndarray, tri_id: np.ndarray) -> np.ndarray:
  """Pixels whose visible triangle faces the camera (negative signed area in crop xy), computed in numpy."""
  a, b, c = (mesh[triangles[:, k], :2].astype(np.float64) for k in range(3))
  area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (c[:, 0] - a[:, 0]) * (b[:, 1] - a[:, 1])
  return (tri_id >= 0) & (area[np.maximum(tri_id, 0)] < 0)


@pytest.mark.parametrize("yaw_deg", [0.0, 30.0])
def test_constant_texture_maps_to_a_constant_on_exactly_the_mesh_pixels(sfm, yaw_deg):
  mesh = _posed(sfm, np.radians(yaw_deg))
  triangles = np.asarray(sfm.triangles)
  texture = np.full((_TEXTURE, _TEXTURE), 0.7, np.float32)
  crop_map, valid = canonical.from_texture(
    texture, np.ones_like(texture), mesh, triangles, sfm.uv, _CROP, max_box=8, max_oversized=64
  )
  crop_map, valid = np.asarray(crop_map), np.asarray(valid)
  tri_id = np.asarray(_frags(mesh, triangles).tri_id)
  expected = _front_facing_mesh_pixels(mesh, triangles, tri_id)
  assert expected.sum() > 0.3 * _CROP**2  # the face fills the crop
  np.testing.assert_array_equal(valid, expected)
  np.testing.assert_allclose(crop_map[valid], 0.7, rtol=1e-6)
  assert np.all(crop_map[~valid] == 0)


def _smooth_field(size: int) -> np.ndarray:
  """A smooth function of (u, v) sampled at texel centres: a few wavelengths across the layout."""
  j, i = np.meshgrid(np.arange(size), np.arange(size))
  u, v = (j + 0.5) / size, 1 - (i + 0.5) / size
  return (np.sin(2 * np.pi * 1.5 * u) * np.cos(2 * np.pi * v) + 0.5 * u).astype(np.float32)


@pytest.mark.parametrize("yaw_deg", [0.0, 25.0])
def test_round_trip_texture_crop_texture_agrees_where_visible(sfm, yaw_deg):
  mesh = _posed(sfm, np.radians(yaw_deg))
  triangles = np.asarray(sfm.triangles)
  uvr = canonical.model_uv_raster(sfm, _TEXTURE)
  layout = (np.asarray(uvr.tri_id) >= 0).astype(np.float32)
  field = _smooth_field(_TEXTURE)
  crop_map, valid = canonical.from_texture(field * layout, layout, mesh, triangles, sfm.uv, _CROP)
  frags = _frags(mesh, triangles)
  back, weight = canonical.to_texture(crop_map, frags, mesh, uvr, triangles, valid_heatmap=valid)
  back, weight = np.asarray(back), np.asarray(weight)
  seen = weight > 0.999  # all four crop taps valid: no bilinear mixing with off-mesh pixels
  assert seen.sum() > 1000
  # The field changes by at most ~2 pi * 1.5 / T = 0.074 per texel; a texel maps to ~0.4 crop pixels, and two
  # bilinear resamplings blur by about a crop pixel's worth of texels (~2.5): errors of a few hundredths.
  err = np.abs(back[seen] - field[seen])
  assert np.median(err) < 0.02
  assert np.quantile(err, 0.99) < 0.12
  # An unrelated field does not agree: the test can tell a wrong mapping from a right one.
  assert np.median(np.abs(back[seen] - np.roll(field, _TEXTURE // 3, axis=1)[seen])) > 0.2


def test_no_data_texels_do_not_leak_as_zeros(sfm):
  mesh = _posed(sfm, 0.0)
  triangles = np.asarray(sfm.triangles)
  texture = np.full((_TEXTURE, _TEXTURE), 2.0, np.float32)
  weight = np.ones_like(texture)
  weight[:, : _TEXTURE // 2] = 0.0  # u < 0.5 has no data
  texture[weight == 0] = np.nan  # values at no-data texels are ignored, NaN included
  crop_map, valid = canonical.from_texture(texture, weight, mesh, triangles, sfm.uv, _CROP)
  crop_map, valid = np.asarray(crop_map), np.asarray(valid)
  assert np.all(np.isfinite(crop_map))
  np.testing.assert_allclose(crop_map[valid], 2.0, rtol=1e-6)
  on_mesh = np.asarray(_frags(mesh, triangles).tri_id) >= 0
  assert 0.2 < valid.sum() / on_mesh.sum() < 0.8  # about half the face lost its data
