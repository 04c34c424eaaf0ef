"""Tests for the scatter rasteriser: exact hand-built scenes, the fill rule, and trimesh ray casting as reference."""

import fractions
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from trimesh.ray import ray_triangle

from canonsal_jax import raster


def _covers(tri_xy, px, py) -> bool:
  """Top-left fill rule in exact rational arithmetic, written from its definition (independent of raster.py)."""
  a, b, c = [tuple(fractions.Fraction(float(v)) for v in p) for p in tri_xy]
  p = (fractions.Fraction(px), fractions.Fraction(py))

  def cross(o, e, q):
    return (e[0] - o[0]) * (q[1] - o[1]) - (e[1] - o[1]) * (q[0] - o[0])

  area = cross(a, b, c)
  if area == 0:
    return False
  if area < 0:
    b, c = c, b
  for start, end in ((a, b), (b, c), (c, a)):
    value = cross(start, end, p)
    ex, ey = end[0] - start[0], end[1] - start[1]
    top_left = ey < 0 or (ey == 0 and ex > 0)  # y down: left edges go up, top edges go right
    if value < 0 or (value == 0 and not top_left):
      return False
  return True


def _brute_coverage(tri_xy, height, width) -> np.ndarray:
  """[H, W] bool: pixel (i, j) with centre (j, i) covered by the triangle [3, 2]."""
  return np.array([[_covers(tri_xy, j, i) for j in range(width)] for i in range(height)])


class _AllTriangles:
  """Stand-in for trimesh's r-tree (rtree is not a dependency): axis-aligned box overlap by brute force."""

  def __init__(self, triangles: np.ndarray):
    self.lo, self.hi = triangles.min(axis=1), triangles.max(axis=1)
    self.bounds = np.concatenate([self.lo.min(0), self.hi.max(0)])

  def intersection(self, box):
    box = np.asarray(box)
    return np.nonzero(np.all(self.lo <= box[3:] + 1e-9, axis=1) & np.all(self.hi >= box[:3] - 1e-9, axis=1))[0]


def _ray_cast(xyd: np.ndarray, triangles: np.ndarray, height: int, width: int) -> np.ndarray:
  """[H, W] id of the first triangle hit by a ray from each pixel centre along -depth (trimesh), -1: none."""
  tris = np.asarray(xyd, np.float64)[triangles]
  ii, jj = np.mgrid[:height, :width]
  origins = np.stack([jj.ravel(), ii.ravel(), np.full(ii.size, tris[..., 2].max() + 1.0)], -1).astype(np.float64)
  directions = np.tile([0.0, 0.0, -1.0], (ii.size, 1))
  tri_idx, ray_idx, _ = ray_triangle.ray_triangle_id(
    tris, origins, directions, tree=_AllTriangles(tris), multiple_hits=False
  )
  out = np.full(height * width, -1)
  out[ray_idx] = tri_idx
  return out.reshape(height, width)


def _project(vertices: np.ndarray, scale: float, centre: tuple[float, float]) -> np.ndarray:
  """Orthographic projection of model-space points (y up, looking along +z) to image xy + depth."""
  return np.stack([centre[0] + scale * vertices[:, 0], centre[1] - scale * vertices[:, 1], vertices[:, 2]], -1)


def _rotation(seed: int) -> np.ndarray:
  return trimesh.transformations.random_rotation_matrix(np.random.default_rng(seed).random(3))[:3, :3]


def test_single_triangle_matches_brute_force_fill_rule():
  rng = np.random.default_rng(0)
  height, width = 12, 13
  for _ in range(12):
    # Vertices on a quarter-pixel grid, some outside the image: many centres fall exactly on edges and vertices.
    xy = rng.integers(-8, 4 * 14, size=(3, 2)) / 4.0
    for order in ([0, 1, 2], [0, 2, 1]):  # both windings
      xyd = np.concatenate([xy[order], np.ones((3, 1))], -1)
      frags = raster.rasterize(xyd, np.array([[0, 1, 2]]), height, width, max_box=16)
      assert int(frags.num_oversized) == 0
      np.testing.assert_array_equal(np.asarray(frags.tri_id) == 0, _brute_coverage(xy[order], height, width))


def test_docstring_triangle_and_pixel_centres():
  # Left and top edges are in, the hypotenuse (a right/bottom edge) is out: x, y >= 1 and x + y < 6.
  xyd = np.array([[1.0, 1.0, 0.0], [1.0, 5.0, 0.0], [5.0, 1.0, 0.0]])
  frags = raster.rasterize(xyd, np.array([[0, 1, 2]]), 8, 8)
  ii, jj = np.mgrid[:8, :8]
  np.testing.assert_array_equal(np.asarray(frags.tri_id) == 0, (jj >= 1) & (ii >= 1) & (ii + jj < 6))


def test_overlapping_triangles_nearer_wins():
  height, width = 10, 10
  xy0 = np.array([[0.5, 0.5], [8.5, 0.5], [0.5, 8.5]])
  xy1 = np.array([[2.0, 2.0], [9.5, 3.0], [3.0, 9.5]])
  for depths in ((1.0, 2.0), (2.0, 1.0)):
    xyd = np.concatenate([np.c_[xy0, np.full(3, depths[0])], np.c_[xy1, np.full(3, depths[1])]])
    frags = raster.rasterize(xyd, np.array([[0, 1, 2], [3, 4, 5]]), height, width)
    cov0, cov1 = _brute_coverage(xy0, height, width), _brute_coverage(xy1, height, width)
    expected = np.full((height, width), -1)
    near, far = (1, 0) if depths[1] > depths[0] else (0, 1)
    covs = (cov0, cov1)
    expected[covs[far]] = far
    expected[covs[near]] = near
    assert (cov0 & cov1).sum() > 5
    np.testing.assert_array_equal(np.asarray(frags.tri_id), expected)
    np.testing.assert_array_equal(np.asarray(frags.depth), np.where(expected >= 0, np.take(depths, expected), -np.inf))


def test_equal_depth_tie_goes_to_smallest_id():
  xy = np.array([[0.0, 0.0], [7.0, 0.0], [0.0, 7.0], [2.0, 1.0], [7.0, 7.0], [1.0, 7.0]])
  xyd = np.c_[xy, np.full(6, 3.0)]
  cov_a, cov_b = _brute_coverage(xy[:3], 8, 8), _brute_coverage(xy[3:], 8, 8)
  for triangles, id_a, id_b in (([[0, 1, 2], [3, 4, 5]], 0, 1), ([[3, 4, 5], [0, 1, 2]], 1, 0)):
    tri_id = np.asarray(raster.rasterize(xyd, np.array(triangles), 8, 8).tri_id)
    assert (cov_a & cov_b).any()
    np.testing.assert_array_equal(tri_id[cov_a & cov_b], min(id_a, id_b))
    np.testing.assert_array_equal(tri_id[cov_a & ~cov_b], id_a)
    np.testing.assert_array_equal(tri_id[cov_b & ~cov_a], id_b)


def _jittered_grid(seed: int, n: int, step: float, offset: float):
  """A planar triangulation of an n x n grid of quads whose vertices sit on half-pixel positions."""
  rng = np.random.default_rng(seed)
  gy, gx = np.mgrid[: n + 1, : n + 1]
  xy = np.stack([gx, gy], -1).reshape(-1, 2) * step + offset
  interior = ((gx > 0) & (gx < n) & (gy > 0) & (gy < n)).reshape(-1)
  xy[interior] += rng.integers(-1, 2, size=(interior.sum(), 2)) * 0.5
  triangles = []
  for r in range(n):
    for c in range(n):
      v00, v01, v10, v11 = r * (n + 1) + c, r * (n + 1) + c + 1, (r + 1) * (n + 1) + c, (r + 1) * (n + 1) + c + 1
      if rng.random() < 0.5:
        triangles += [[v00, v01, v11], [v00, v11, v10]]
      else:
        triangles += [[v00, v01, v10], [v01, v11, v10]]
  return xy, np.array(triangles)


def test_shared_edges_and_vertices_cover_each_pixel_once():
  height, width = 20, 20
  xy, triangles = _jittered_grid(seed=1, n=6, step=3.0, offset=1.0)  # the union is [1, 19] x [1, 19]
  xyd = np.c_[xy, np.zeros(len(xy))]
  # Each triangle alone, vmapped over triangles: how many triangles claim each pixel.
  alone = jax.vmap(lambda t: raster.rasterize(xyd, t[None], height, width).tri_id)(jnp.asarray(triangles))
  count = np.asarray(jnp.sum(alone == 0, axis=0))
  ii, jj = np.mgrid[:height, :width]
  # Left and top boundaries of the union are top-left edges (in), right and bottom ones are not.
  union = (jj >= 1) & (jj < 19) & (ii >= 1) & (ii < 19)
  np.testing.assert_array_equal(count, union.astype(int))
  # Pixel centres lie on shared edges and shared vertices here, not only by chance.
  on_vertex = np.isin(ii * 1000 + jj, (xy[:, 1] * 1000 + xy[:, 0]).astype(int))
  assert on_vertex[union].sum() >= 10
  # The whole mesh at equal depth: each pixel's owner is the one triangle claiming it, not the smallest id.
  tri_id = np.asarray(raster.rasterize(xyd, triangles, height, width).tri_id)
  np.testing.assert_array_equal(tri_id, np.where(union, np.argmax(np.asarray(alone) == 0, axis=0), -1))


def test_degenerate_triangles_produce_nothing():
  xyd = np.array([[0.0, 0.0, 1.0], [2.0, 2.0, 1.0], [5.0, 5.0, 1.0], [1.0, 3.0, 1.0]])
  frags = raster.rasterize(xyd, np.array([[0, 1, 2], [3, 3, 3], [1, 1, 2]]), 8, 8)
  assert np.all(np.asarray(frags.tri_id) == -1)
  assert np.all(np.asarray(frags.depth) == -np.inf)
  assert int(frags.num_oversized) == 0
  empty = raster.rasterize(xyd, np.zeros((0, 3), np.int32), 8, 8)
  assert np.all(np.asarray(empty.tri_id) == -1) and np.all(np.asarray(empty.depth) == -np.inf)


def test_barycentrics_reproduce_pixel_centres_and_depth():
  rng = np.random.default_rng(3)
  xy, triangles = _jittered_grid(seed=2, n=5, step=5.0, offset=-1.3)
  xy = xy + rng.normal(scale=0.2, size=xy.shape)
  depth = rng.normal(size=len(xy))
  xyd = np.c_[xy, depth]
  frags = raster.rasterize(xyd, triangles, 24, 22)
  covered = np.asarray(frags.tri_id) >= 0
  assert covered.sum() > 300
  bary = np.asarray(frags.bary)
  np.testing.assert_allclose(bary.sum(-1)[covered], 1.0, atol=1e-6)
  assert np.all(bary >= 0)
  np.testing.assert_array_equal(bary[~covered], 0.0)
  # Interpolating the vertices' xy gives back the pixel centre (j, i); tolerance: float32 on ~20 px coordinates.
  ii, jj = np.mgrid[:24, :22]
  xy_back = np.asarray(raster.interpolate(frags, xy.astype(np.float32), triangles))
  np.testing.assert_allclose(xy_back[covered], np.stack([jj, ii], -1)[covered], atol=1e-4)
  depth_back = np.asarray(raster.interpolate(frags, depth[:, None].astype(np.float32), triangles))[..., 0]
  np.testing.assert_allclose(depth_back[covered], np.asarray(frags.depth)[covered], atol=1e-5)
  assert np.all(np.isnan(np.asarray(raster.interpolate(frags, xy, triangles, background=jnp.nan))[~covered]))


def test_cube_shows_front_faces_only_and_matches_ray_casting():
  mesh = trimesh.creation.box(extents=(2.0, 2.0, 2.0))
  vertices = mesh.vertices @ _rotation(4).T
  xyd = _project(vertices, scale=9.0, centre=(15.3, 16.1))
  triangles = np.asarray(mesh.faces)
  frags = raster.rasterize(xyd, triangles, 32, 32, max_box=raster.required_box(xyd, triangles, 32, 32))
  tri_id = np.asarray(frags.tri_id)
  front = (mesh.face_normals @ _rotation(4).T)[:, 2] > 0  # faces looking towards the camera (+z)
  seen = np.unique(tri_id[tri_id >= 0])
  assert front[seen].all() and len(seen) == front.sum()
  culled = raster.rasterize(xyd, triangles, 32, 32, max_box=24, cull_backfaces=True)
  np.testing.assert_array_equal(np.asarray(culled.tri_id), tri_id)
  reference = _ray_cast(xyd, triangles, 32, 32)
  np.testing.assert_array_equal(tri_id >= 0, reference >= 0)
  # Each visible square face is two triangles; rays on their diagonal may pick either, so compare faces.
  same_face = (tri_id // 2 == reference // 2)[tri_id >= 0]
  assert same_face.mean() >= 0.99


def test_icosphere_matches_trimesh_ray_casting():
  mesh = trimesh.creation.icosphere(subdivisions=3)
  rotation = _rotation(5)
  xyd = _project(mesh.vertices @ rotation.T * np.array([1.0, 0.8, 1.0]), scale=27.0, centre=(31.7, 32.2))
  triangles = np.asarray(mesh.faces)
  max_box = raster.required_box(xyd, triangles, 64, 64)
  assert max_box <= 8
  frags = raster.rasterize(xyd, triangles, 64, 64, max_box=max_box)
  assert int(frags.num_oversized) == 0
  tri_id = np.asarray(frags.tri_id)
  reference = _ray_cast(xyd, triangles, 64, 64)
  covered = (tri_id >= 0) | (reference >= 0)
  agreement = (tri_id == reference)[covered].mean()
  assert agreement >= 0.995, agreement
  # Depth agrees with the ray's hit where the ids agree (float32 interpolation of depths in [-1, 1]).
  hit_depth = np.sum(np.asarray(frags.bary) * xyd[triangles[np.maximum(tri_id, 0)], 2], -1)
  np.testing.assert_allclose(np.asarray(frags.depth)[covered], hit_depth[covered], atol=1e-5)


def test_oversized_triangles_are_counted_and_fallback_is_exact():
  mesh = trimesh.creation.icosphere(subdivisions=1)
  xyd = _project(mesh.vertices @ _rotation(6).T, scale=13.0, centre=(15.5, 14.8))
  triangles = np.asarray(mesh.faces)
  need = raster.required_box(xyd, triangles, 30, 32)
  exact = raster.rasterize(xyd, triangles, 30, 32, max_box=need)
  assert int(exact.num_oversized) == 0 and int(exact.num_dropped) == 0
  small = raster.rasterize(xyd, triangles, 30, 32, max_box=need - 1)
  assert int(small.num_oversized) >= 1
  assert int(small.num_dropped) == int(small.num_oversized)
  with pytest.raises(ValueError, match="oversized"):
    raster.check_complete(small)
  few = need // 2
  num_over = int(raster.rasterize(xyd, triangles, 30, 32, max_box=few).num_oversized)
  fallback = raster.rasterize(xyd, triangles, 30, 32, max_box=few, max_oversized=num_over)
  assert int(fallback.num_oversized) == num_over and int(fallback.num_dropped) == 0
  # Same coverage; depths may differ in the last bit (another compiled program sums the barycentric terms).
  np.testing.assert_array_equal(np.asarray(raster.check_complete(fallback).tri_id), np.asarray(exact.tri_id))
  chex.assert_trees_all_close(fallback._replace(num_oversized=0), exact, atol=1e-6, rtol=0)
  partial = raster.rasterize(xyd, triangles, 30, 32, max_box=few, max_oversized=num_over - 1)
  assert int(partial.num_dropped) == 1


def test_chunked_equals_unchunked():
  mesh = trimesh.creation.icosphere(subdivisions=2)
  xyd = _project(mesh.vertices @ _rotation(7).T, scale=14.0, centre=(16.0, 15.5))
  triangles = np.asarray(mesh.faces)
  whole = raster.rasterize(xyd, triangles, 32, 32)
  chex.assert_trees_all_equal(raster.rasterize(xyd, triangles, 32, 32, chunk_size=37), whole)


def test_vmap_over_meshes_equals_separate_calls():
  mesh = trimesh.creation.icosphere(subdivisions=2)
  triangles = np.asarray(mesh.faces)
  batch = np.stack([_project(mesh.vertices @ _rotation(s).T, 12.0, (16.0 + s, 15.0)) for s in (8, 9)])
  fn = functools.partial(raster.rasterize, triangles=triangles, height=32, width=32, max_box=8)
  batched = jax.vmap(lambda v: fn(v))(jnp.asarray(batch, jnp.float32))
  chex.assert_shape(batched.tri_id, (2, 32, 32))
  for b in range(2):
    single = fn(batch[b])
    # Ids exactly; floats to the last bit of float32 (the batched program may fuse the arithmetic differently).
    np.testing.assert_array_equal(np.asarray(batched.tri_id[b]), np.asarray(single.tri_id))
    chex.assert_trees_all_close(jax.tree.map(lambda a, b=b: a[b], batched), single, atol=1e-6, rtol=0)


def test_no_retrace_for_new_vertices():
  mesh = trimesh.creation.icosphere(subdivisions=1)
  triangles = jnp.asarray(mesh.faces, jnp.int32)
  render = jax.jit(chex.assert_max_traces(lambda v: raster.rasterize(v, triangles, 24, 24), n=1))
  for seed in (10, 11, 12):
    render(jnp.asarray(_project(mesh.vertices @ _rotation(seed).T, 9.0, (12.0, 11.5)), jnp.float32))


def test_rasterize_uv_texel_convention():
  size = 16
  uv = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
  triangles = np.array([[0, 1, 2], [0, 2, 3]])  # counter-clockwise in UV
  frags = raster.rasterize_uv(uv, triangles, size, max_box=size)
  assert int(frags.num_oversized) == 0
  tri_id = np.asarray(frags.tri_id)
  assert np.all(tri_id >= 0)  # all texel centres lie inside [0, 1]^2
  np.testing.assert_array_equal(np.asarray(frags.depth), 0.0)
  ii, jj = np.mgrid[:size, :size]
  texel_uv = np.stack([(jj + 0.5) / size, 1.0 - (ii + 0.5) / size], -1)
  np.testing.assert_allclose(np.asarray(raster.interpolate(frags, uv, triangles)), texel_uv, atol=1e-6)
  # The diagonal u = v splits the texture; texels below it in UV (u > v) belong to the first triangle.
  np.testing.assert_array_equal(tri_id[texel_uv[..., 0] > texel_uv[..., 1]], 0)
  np.testing.assert_array_equal(tri_id[texel_uv[..., 0] < texel_uv[..., 1]], 1)
  np.testing.assert_allclose(
    np.asarray(raster.uv_to_texel_xy(texel_uv, size)), np.stack([jj, ii], -1).astype(np.float32), atol=1e-5
  )


def test_required_box_counts_clipped_pixel_centres():
  xy = np.array([[0.5, 0.5], [6.5, 0.5], [0.5, 3.0], [-50.0, -50.0], [50.0, -50.0], [-50.0, 2.2]])
  assert raster.required_box(xy, np.array([[0, 1, 2]]), 10, 10) == 6  # x centres 1..6
  assert raster.required_box(xy, np.array([[3, 4, 5]]), 10, 10) == 10  # clipped to the image
  assert raster.required_box(xy, np.array([[0, 0, 1]]), 10, 10) == 1  # degenerate only
