"""Batched fitting of a `MorphableModel` to 68 image landmarks: pose, shape α and expression β.

The camera is scaled orthographic (the conventions of docs/ARCHITECTURE.md: model space right-handed, y up, the
face looking along +z; image `xy` in pixels, y down; depth larger = closer):

  x_img = s * (R v)_x + t_x,    y_img = -s * (R v)_y + t_y,    depth = s * (R v)_z.

`R = R_y(yaw) @ R_x(pitch) @ R_z(roll)`: positive yaw turns the face towards +x (the subject looks to their
left, image right), positive pitch turns the nose down, positive roll turns the face counter-clockwise in
model space (clockwise as seen in the image, whose y points down).

The cost, per face, is a maximum a posteriori one:

  sum_k w_k ||proj(v_k) - x_k||^2 / sigma_k^2  +  lambda_α ||α||^2  +  lambda_β ||β||^2,

with α ~ N(0, I) (the basis is pre-scaled), `sigma_k^2 = sigma_px^2 + (s * sigma_model_k)^2` (detector noise in
pixels plus landmark k's definition mismatch in model units, which grows with the face's size in the image;
per landmark, learned on development photos, where the model has a table in `LEARNED_LANDMARK_SIGMA_MODEL`),
α and β held in their bounds. Weight 0 holds a landmark out.

Solver (one compiled program per batch size, `vmap` over faces, fixed iteration counts under `lax.scan`):
1. Start from the mean face and a closed-form affine camera fitted to the fixed (non-contour) landmarks,
   orthonormalised into (R, s, t).
2. `num_iterations` outer iterations, each one (a) re-matches the jaw landmarks whose model id is -1 to the
   vertex whose projection is nearest in the image (`FitConfig.contour_matching`; by default as eos's
   `fit_shape_and_pose`: the side turned towards the camera to its fixed contour candidates, the side turned
   away to the mesh's silhouette in the current pose), then (b) runs `num_lm_steps` joint
   Levenberg–Marquardt steps on (rotation as a Cayley update, log scale, translation, α, β), with the
   bounds kept by a projected step: coordinates at a bound whose gradient points out are frozen, the rest
   clipped. A step that raises the cost is rejected and the damping raised, deterministically.

Everything is differentiable (the contour matching is piecewise constant), so `jax.grad` of a function of the
fit with respect to the landmarks works.

Example:
  Lines marked +SKIP are not run as doctests: it needs a model and detected landmarks.
  >>> result = fit(model, landmarks_xy, image_size=(500, 500))  # doctest: +SKIP
  >>> result.yaw_pitch_roll.shape, result.vertices_xyd.shape  # doctest: +SKIP
  ((B, 3), (B, V, 3))
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from canonsal_jax.morphable.model import NUM_LANDMARKS, REGION_NAMES, MorphableModel

__all__ = [
  "CONTOUR_MATCHING",
  "DEFAULT_FIT_CONFIG",
  "LANDMARK_NOISE",
  "LEARNED_LANDMARK_SIGMA_MODEL",
  "FitConfig",
  "FitResult",
  "fit",
  "landmark_sigma_model",
  "project",
  "rotation_from_yaw_pitch_roll",
  "yaw_pitch_roll_from_rotation",
]

# iBUG 68-point markup: the jaw is landmarks 0-16 (0-based), the chin is 8; 0-7 are the subject's right
# (image left), 9-16 their left. Landmarks with model id -1 in this range are matched to contour candidates.
_JAW_END = 17
_CHIN = 8

# How the jaw landmarks (model id -1) find their vertex, `FitConfig.contour_matching`:
# - "candidates": both sides to the nearest projected fixed contour candidate (`contour_right_ids`, `..._left_ids`);
# - "occluding": as eos's `fit_shape_and_pose`, the side turned towards the camera (the subject's right, landmarks
#   0-7, for yaw >= 0) to its fixed candidates, the other side to the nearest projected silhouette vertex: a
#   vertex of an occluding edge, whose two faces point to either side of the camera (or a border edge whose one
#   face points at it), among the lower face's vertices on that side (`_silhouette_allowed`). eos also drops
#   silhouette vertices hidden behind the mesh by ray casting; the masks stand in for it here.
CONTOUR_MATCHING = ("candidates", "occluding")

# Regions (`REGION_NAMES`) whose vertices may make the jaw's silhouette: not the eyes, brows, nose or lips, whose
# own occluding edges (the lips' border, the nose's side) are no jaw outline.
_SILHOUETTE_REGIONS = ("cheeks", "jaw", "chin")


# `FitConfig.landmark_noise`: a per-landmark noise model learned on development photos, or one sigma for all.
LANDMARK_NOISE = ("learned", "uniform")

# Per-landmark definition noise (model units, per coordinate; iBUG order, 0 where the model maps no vertex) by
# model name: the RMS residual of each landmark when fitting the development set (`datasets.development_photos`,
# never the held-out test photos), mirror pairs pooled, floored at 1 mm, re-estimated twice with the fit using it.
# Made by `python tools/fit_noise_model.py --morphable_model=path/to/sfm` (`fit_accuracy.learn_landmark_sigma`).
LEARNED_LANDMARK_SIGMA_MODEL: dict[str, tuple[float, ...]] = {
  # The Surrey Face Model, mm; learned on the 6 development faces (3 photos and their mirror images, dlib's
  # landmarks). Large: the inner lip (62-68, 1-based), the nose bridge top (28), the nostrils (32, 36), the mouth
  # corners (49, 55), the outer eye corners (37, 46), jaw 6-7 / 11-12: landmarks the SFM's vertex defines
  # differently from iBUG's markup, which the uniform 3 mm made pull the shape.
  "sfm_3448": (
    1.00, 1.48, 1.88, 1.33, 1.28, 2.32, 2.43, 1.30, 1.00, 1.30,
    2.43, 2.32, 1.28, 1.33, 1.88, 1.48, 1.00, 2.35, 1.00, 1.00,
    1.25, 1.00, 1.00, 1.25, 1.00, 1.00, 2.35, 3.48, 1.14, 1.00,
    1.00, 2.96, 2.33, 1.69, 2.33, 2.96, 2.50, 1.00, 1.00, 1.00,
    1.72, 1.00, 1.00, 1.00, 1.00, 2.50, 1.00, 1.72, 3.16, 1.12,
    1.81, 2.39, 1.81, 1.12, 3.16, 1.00, 1.00, 1.00, 1.00, 1.00,
    0.00, 3.66, 1.00, 3.66, 0.00, 3.61, 1.00, 3.61,
  ),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class FitConfig:
  """Static settings of `fit` (hashable: a new value compiles a new program).

  Attributes:
    num_iterations: outer iterations, each re-matching the jaw contour; eos's `fit_shape_and_pose` default (5).
    num_lm_steps: Levenberg–Marquardt steps per outer iteration. Measured on 64 synthetic SFM faces: 5 x 2
      steps reach the cost and pose errors of 10 x 4 (to 0.01 degrees); 3 x 3 stops about 1% higher.
    landmark_sigma_px: detector noise per coordinate, pixels; eos's `fit_shape_to_landmarks_linear` default
      `detector_standard_deviation = sqrt(3)`.
    landmark_sigma_model: landmark-definition noise per coordinate in model units (mm for the SFM): about 3%
      of the SFM's outer-eye-corner distance (91.5 mm), the order of dlib's normalised error on 300-W.
      Chosen before looking at held-out errors. Used for every landmark when `landmark_noise` is "uniform" or
      the model has no learned table.
    landmark_noise: one of `LANDMARK_NOISE`: "learned" takes each landmark's own definition noise from
      `LEARNED_LANDMARK_SIGMA_MODEL` when the model (by name) has an entry there, "uniform" uses
      `landmark_sigma_model` for all; or 68 values (model units, iBUG order) to use instead.
    shape_prior_weight: lambda_α; 1 is the MAP estimate under α ~ N(0, I).
    expression_prior_weight: lambda_β; 1 treats β like α (unit prior scale per blendshape).
    contour_weight: extra weight on the contour-matched jaw landmarks (1: as eos, same as the others).
    contour_matching: how jaw landmarks find their vertex, one of `CONTOUR_MATCHING` ("occluding", eos's rule,
      needs the model's edges; "candidates", the fixed contour candidates on both sides).
    initial_damping: LM damping μ relative to the Jacobi-scaled normal matrix (unit diagonal).
    damping_decrease: μ is multiplied by this after an accepted step (Nielsen-style 1/3, clipped below).
    damping_increase: μ is multiplied by this after a rejected step.
    min_damping: lower bound on μ, keeps the float32 solve well conditioned.
    affine_ridge: ridge added to the 4x4 normal matrix of the initial affine fit, relative to its trace /4;
      float32 safety only.
  """

  num_iterations: int = 5
  num_lm_steps: int = 2
  landmark_sigma_px: float = math.sqrt(3.0)
  # The noise model reaches the compiled program as an argument (`landmark_sigma_model(model, config)`), never as
  # a constant: configs that differ in it alone compare equal and share one program.
  landmark_sigma_model: float = dataclasses.field(default=3.0, compare=False)
  landmark_noise: str | tuple[float, ...] = dataclasses.field(default="learned", compare=False)
  shape_prior_weight: float = 1.0
  expression_prior_weight: float = 1.0
  contour_weight: float = 1.0
  contour_matching: str = "occluding"
  initial_damping: float = 1e-3
  damping_decrease: float = 1.0 / 3.0
  damping_increase: float = 10.0
  min_damping: float = 1e-7
  affine_ridge: float = 1e-6


DEFAULT_FIT_CONFIG = FitConfig()


class FitResult(struct.PyTreeNode):
  """What `fit` returns, batched over faces.

  Attributes:
    rotation: `[B, 3, 3]` model-to-camera rotation R.
    yaw_pitch_roll: `[B, 3]` radians, `R = R_y(yaw) @ R_x(pitch) @ R_z(roll)`.
    translation: `[B, 2]` (t_x, t_y) in image pixels.
    scale: `[B]` pixels per model unit.
    alpha: `[B, S]` shape coefficients (prior N(0, I)).
    beta: `[B, E]` expression coefficients.
    landmarks_xy: `[B, 68, 2]` the fitted model's landmarks projected into the image (jaw from the matched
      contour vertices); NaN for landmarks the model does not map (the SFM's inner mouth corners 61, 65).
    landmark_vertex_ids: `[B, 68]` int32 vertex used for each landmark (the contour match for the jaw), -1
      where the model maps none.
    vertices_xyd: `[B, V, 3]` every vertex in image coordinates: x, y in pixels, depth (larger = closer) in
      the same pixel scale.
    cost: `[B]` final value of the MAP cost (landmark term plus priors).
  """

  rotation: jax.Array
  yaw_pitch_roll: jax.Array
  translation: jax.Array
  scale: jax.Array
  alpha: jax.Array
  beta: jax.Array
  landmarks_xy: jax.Array
  landmark_vertex_ids: jax.Array
  vertices_xyd: jax.Array
  cost: jax.Array


class _Pose(struct.PyTreeNode):
  rotation: jax.Array  # [3, 3]
  log_scale: jax.Array  # []
  translation: jax.Array  # [2]


class _State(struct.PyTreeNode):
  pose: _Pose
  alpha: jax.Array  # [S]
  beta: jax.Array  # [E]
  damping: jax.Array  # []


def rotation_from_yaw_pitch_roll(yaw_pitch_roll: jax.typing.ArrayLike) -> jax.Array:
  """`[..., 3]` radians (yaw, pitch, roll) to `[..., 3, 3]` rotations `R_y(yaw) @ R_x(pitch) @ R_z(roll)`."""
  ypr = jnp.asarray(yaw_pitch_roll)
  cy, sy = jnp.cos(ypr[..., 0]), jnp.sin(ypr[..., 0])
  cp, sp = jnp.cos(ypr[..., 1]), jnp.sin(ypr[..., 1])
  cr, sr = jnp.cos(ypr[..., 2]), jnp.sin(ypr[..., 2])
  one, zero = jnp.ones_like(cy), jnp.zeros_like(cy)
  ry = jnp.stack([jnp.stack([cy, zero, sy], -1), jnp.stack([zero, one, zero], -1), jnp.stack([-sy, zero, cy], -1)], -2)
  rx = jnp.stack([jnp.stack([one, zero, zero], -1), jnp.stack([zero, cp, -sp], -1), jnp.stack([zero, sp, cp], -1)], -2)
  rz = jnp.stack([jnp.stack([cr, -sr, zero], -1), jnp.stack([sr, cr, zero], -1), jnp.stack([zero, zero, one], -1)], -2)
  return ry @ rx @ rz


def yaw_pitch_roll_from_rotation(rotation: jax.typing.ArrayLike) -> jax.Array:
  """`[..., 3, 3]` rotations to `[..., 3]` radians (yaw, pitch, roll); inverse of `rotation_from_yaw_pitch_roll`."""
  r = jnp.asarray(rotation)
  yaw = jnp.arctan2(r[..., 0, 2], r[..., 2, 2])
  pitch = jnp.arcsin(jnp.clip(-r[..., 1, 2], -1.0, 1.0))
  roll = jnp.arctan2(r[..., 1, 0], r[..., 1, 1])
  return jnp.stack([yaw, pitch, roll], axis=-1)


def project(
  points: jax.typing.ArrayLike,
  rotation: jax.typing.ArrayLike,
  scale: jax.typing.ArrayLike,
  translation: jax.typing.ArrayLike,
) -> jax.Array:
  """Scaled-orthographic projection of model-space points to image `xy` and depth.

  Args:
    points: `[..., N, 3]` model-space points.
    rotation: `[..., 3, 3]`.
    scale: `[...]` pixels per model unit.
    translation: `[..., 2]` pixels.

  Returns:
    `[..., N, 3]`: x, y in image pixels (y down) and depth (larger = closer), in pixels.
  """
  rotated = jnp.einsum("...ij,...nj->...ni", jnp.asarray(rotation), jnp.asarray(points))
  scale = jnp.asarray(scale)[..., None, None]
  flip = jnp.array([1.0, -1.0, 1.0], rotated.dtype)
  offset = jnp.concatenate([jnp.asarray(translation), jnp.zeros_like(jnp.asarray(translation)[..., :1])], -1)
  return scale * rotated * flip + offset[..., None, :]


def _cayley(omega: jax.Array) -> jax.Array:
  """Rotation `(I - K/2)^-1 (I + K/2)` for the skew matrix K of `omega [3]`: smooth everywhere, exact rotation."""
  x, y, z = omega[0], omega[1], omega[2]
  zero = jnp.zeros_like(x)
  k = jnp.stack([jnp.stack([zero, -z, y]), jnp.stack([z, zero, -x]), jnp.stack([-y, x, zero])])
  eye = jnp.eye(3, dtype=omega.dtype)
  return jnp.linalg.solve(eye - 0.5 * k, eye + 0.5 * k)


def _normalize(v: jax.Array) -> jax.Array:
  return v / jnp.linalg.norm(v)


def _initial_pose(points: jax.Array, targets: jax.Array, weights: jax.Array, config: FitConfig) -> _Pose:
  """Closed-form weighted affine camera on `points [N, 3]` -> `targets [N, 2]`, orthonormalised.

  Like eos's `estimate_orthographic_projection_linear` but with a symmetric orthonormalisation of the two
  rows (smooth, so gradients flow) instead of an SVD (whose gradient is unbounded at equal singular values).
  """
  homogeneous = jnp.concatenate([points, jnp.ones_like(points[:, :1])], axis=1)  # [N, 4]
  normal = jnp.einsum("n,ni,nj->ij", weights, homogeneous, homogeneous)
  normal = normal + config.affine_ridge * jnp.trace(normal) / 4.0 * jnp.eye(4, dtype=normal.dtype)
  rhs = jnp.einsum("n,ni,nc->ic", weights, homogeneous, targets)
  affine = jnp.linalg.solve(normal, rhs).T  # [2, 4]
  row_x, row_y = affine[0, :3], -affine[1, :3]  # the image y axis flips the model's
  scale = 0.5 * (jnp.linalg.norm(row_x) + jnp.linalg.norm(row_y))
  a, b = _normalize(row_x), _normalize(row_y)
  c, d = _normalize(a + b), _normalize(a - b)
  a, b = (c + d) / math.sqrt(2.0), (c - d) / math.sqrt(2.0)
  rotation = jnp.stack([a, b, jnp.cross(a, b)])
  return _Pose(rotation=rotation, log_scale=jnp.log(scale), translation=affine[:, 3])


def _project_points(points: jax.Array, pose: _Pose) -> jax.Array:
  """`[N, 3]` model points to `[N, 2]` image xy (in the fit's normalised image frame).

  The two rows written out: vmapped, a `[N, 3] @ [3, 3]` product is a batched tiny matmul that XLA:CPU runs
  about 20x slower.
  """
  r, x, y, z = pose.rotation, points[:, 0], points[:, 1], points[:, 2]
  scale = jnp.exp(pose.log_scale)
  image_x = scale * (r[0, 0] * x + r[0, 1] * y + r[0, 2] * z) + pose.translation[0]
  image_y = -scale * (r[1, 0] * x + r[1, 1] * y + r[1, 2] * z) + pose.translation[1]
  return jnp.stack([image_x, image_y], axis=-1)


def _gather_vertices(model: MorphableModel, ids: jax.Array, alpha: jax.Array, beta: jax.Array) -> jax.Array:
  """Model-space vertices `[N, 3]` at `ids [N]`."""
  return (
    model.mean[ids]
    + jnp.einsum("nds,s->nd", model.shape_basis[ids], alpha)
    + jnp.einsum("nde,e->nd", model.expression_basis[ids], beta)
  )


def _silhouette_allowed(model: MorphableModel) -> tuple[jax.Array, jax.Array]:
  """`[V]` bool masks of the vertices that may stand for the right and the left jaw's silhouette.

  A vertex qualifies on a side when it lies on that side of the chin's vertex (model x), no higher and no lower
  than that side's fixed contour candidates (the lower face, from the ear to the chin), in `_SILHOUETTE_REGIONS`.
  Works on concrete (numpy) and traced model arrays alike.
  """
  xp = np if all(isinstance(a, np.ndarray) for a in (model.mean, model.regions, model.landmark_ids)) else jnp
  x, y = model.mean[:, 0], model.mean[:, 1]
  chin_x = model.mean[xp.maximum(model.landmark_ids[_CHIN], 0), 0]
  region = xp.zeros(x.shape, bool)
  for name in _SILHOUETTE_REGIONS:
    region = region | (model.regions == REGION_NAMES.index(name))

  def side(candidates, on_side):
    heights = y[candidates]
    return region & on_side & (y <= xp.max(heights)) & (y >= xp.min(heights))

  # Model x points to the subject's left: the right contour lies at x < the chin's.
  return side(model.contour_right_ids, x < chin_x), side(model.contour_left_ids, x > chin_x)


def _silhouette_vertices(model: MorphableModel, vertices: jax.Array, rotation: jax.Array) -> jax.Array:
  """`[V]` bool: vertices of the mesh's occluding edges under `rotation` (static shapes: a mask, not a list).

  An edge is occluding when its two faces point to either side of the camera (the z of their rotated normals
  differ in sign, as eos's `occluding_boundary_vertices`), or when it lies on the mesh border and its one face
  points at the camera (the SFM is a face mask: turned towards the camera, its border is its outline).

  The whole mesh, with a scatter: the reference for `_SilhouetteMesh`'s jaw-area test, which the fit uses.
  """
  occluding = _occluding_edges(vertices, model.triangles, model.edge_face_ids, rotation)
  hits = (
    jnp.zeros(vertices.shape[:1], jnp.int32)
    .at[model.edge_vertex_ids.reshape(-1)]
    .add(jnp.repeat(occluding.astype(jnp.int32), 2))
  )
  return hits > 0


def _occluding_edges(
  vertices: jax.Array, triangles: jax.Array, edge_faces: jax.Array, rotation: jax.Array
) -> jax.Array:
  """`[Ne]` bool: which edges occlude (see `_silhouette_vertices`); `edge_faces [Ne, 2]` index `triangles`, -1 none."""
  corners = vertices[triangles]  # [F, 3, 3]
  normals = jnp.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])  # outward: counter-clockwise
  return _occluding_from_facing(normals @ rotation[2] > 0, edge_faces)  # depth larger = closer: camera looks along -z


def _occluding_from_facing(facing: jax.Array, edge_faces: jax.Array) -> jax.Array:
  """`[Ne]` bool occluding edges from `facing [F]` (the triangle's outside is turned to the camera)."""
  valid = edge_faces >= 0
  facing_pair = facing[jnp.maximum(edge_faces, 0)]  # [Ne, 2]
  return jnp.where(
    valid[:, 0] & valid[:, 1],
    facing_pair[:, 0] != facing_pair[:, 1],
    jnp.any(valid & facing_pair, axis=1),
  )


def _facing_from_projection(projected_xy: jax.Array, triangles: jax.Array) -> jax.Array:
  """`[F]` bool: the triangle's outside is turned to the camera, from its vertices' image `xy` `[V, 2]`.

  Under an orthographic camera the rotated normal's depth component has the sign of the projected triangle's
  signed area; image y points down, which flips the counter-clockwise winding: facing triangles turn clockwise.
  Two dimensions instead of three (`_occluding_edges`), from projections the match needs anyway.
  """
  corners = projected_xy[triangles]  # [F, 3, 2]
  u, v = corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]
  return u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0] < 0


class _SilhouetteSide(NamedTuple):
  """One jaw side's candidates for the silhouette match (`_SilhouetteMesh`).

  Attributes:
    vertex_ids: `[A]` int32 model vertex ids of the side's allowed vertices (`_silhouette_allowed`).
    local_ids: `[A]` int32 their indices into `_SilhouetteMesh.vertex_ids`.
    incident_edges: `[A, D]` int32 local indices of each one's edges, padded with `Es` (an edge that never occludes).
  """

  vertex_ids: jax.Array
  local_ids: jax.Array
  incident_edges: jax.Array


class _SilhouetteMesh(NamedTuple):
  """The jaw area of a model's mesh: what the occluding-contour matching needs, with static shapes per model.

  Every edge with an endpoint that may stand for the jaw's silhouette (`_silhouette_allowed`), the triangles on
  either side of them and their corners, renumbered locally; per side, the allowed vertices and their edges. An
  allowed vertex is a silhouette vertex exactly when one of its edges occludes, and all its edges are here, so the
  match equals the whole-mesh one (`_silhouette_vertices`) without its scatter-add. On the SFM: 52% of the edges,
  and 864 / 847 candidate vertices (right / left) instead of all 3448.

  Attributes:
    vertex_ids: `[Vs]` int32 model vertex ids of the local vertices.
    triangles: `[Ts, 3]` int32 local vertex indices.
    edge_faces: `[Es, 2]` int32 local triangle indices, -1 for a border edge's missing face.
    right: the right jaw's `_SilhouetteSide`.
    left: the left jaw's.
  """

  vertex_ids: jax.Array
  triangles: jax.Array
  edge_faces: jax.Array
  right: _SilhouetteSide
  left: _SilhouetteSide


# `_silhouette_mesh`'s last few results by model object: id(model) -> (model, mesh); holding the model keeps its id
# from being reused by another object while the entry lives.
_SILHOUETTE_CACHE: dict[int, tuple[MorphableModel, _SilhouetteMesh]] = {}
_SILHOUETTE_CACHE_SIZE = 4


def _silhouette_mesh(model: MorphableModel) -> _SilhouetteMesh | None:
  """The jaw-area `_SilhouetteMesh` of a concrete model, computed in numpy once per model object (cached).

  Returns None when the model's arrays are traced (`fit` called inside a `jit` over the model): no static subset
  can be taken then, and the match falls back to the whole mesh.
  """
  cached = _SILHOUETTE_CACHE.get(id(model))
  if cached is not None and cached[0] is model:
    return cached[1]
  mesh = _build_silhouette_mesh(model)
  if mesh is not None:
    if len(_SILHOUETTE_CACHE) >= _SILHOUETTE_CACHE_SIZE:
      _SILHOUETTE_CACHE.pop(next(iter(_SILHOUETTE_CACHE)))
    _SILHOUETTE_CACHE[id(model)] = (model, mesh)
  return mesh


def _build_silhouette_mesh(model: MorphableModel) -> _SilhouetteMesh | None:
  """`_silhouette_mesh` without the cache."""
  fields = ("mean", "regions", "landmark_ids", "contour_right_ids", "contour_left_ids", "triangles")
  fields += ("edge_vertex_ids", "edge_face_ids")
  try:
    concrete = model.replace(**{f: np.asarray(getattr(model, f)) for f in fields})
  except jax.errors.TracerArrayConversionError:
    return None
  right, left = _silhouette_allowed(concrete)
  edges, edge_faces = concrete.edge_vertex_ids, concrete.edge_face_ids
  keep = (right | left)[edges].any(axis=1)
  edges, edge_faces = edges[keep], edge_faces[keep]
  tri_ids = np.unique(edge_faces[edge_faces >= 0])
  vertex_ids = np.unique(np.concatenate([concrete.triangles[tri_ids].reshape(-1), edges.reshape(-1)]))
  local_vertex = np.full(model.num_vertices, -1, np.int64)
  local_vertex[vertex_ids] = np.arange(vertex_ids.size)
  local_tri = np.full(concrete.triangles.shape[0], -1, np.int64)
  local_tri[tri_ids] = np.arange(tri_ids.size)
  num_edges = edges.shape[0]
  # Each vertex's edges: the edge ends sorted by vertex, then a padded row per vertex.
  ends = edges.reshape(-1)
  order = np.argsort(ends, kind="stable")
  edge_of_end = np.repeat(np.arange(num_edges), 2)[order]
  counts = np.bincount(ends, minlength=model.num_vertices)
  starts = np.cumsum(counts) - counts

  def side(allowed: np.ndarray) -> _SilhouetteSide:
    ids = np.flatnonzero(allowed)
    columns = np.arange(counts[ids].max())
    valid = columns[None, :] < counts[ids][:, None]
    position = np.minimum(starts[ids][:, None] + columns[None, :], ends.size - 1)
    padded = np.where(valid, edge_of_end[position], num_edges)
    return _SilhouetteSide(*(jax.device_put(np.asarray(a, np.int32)) for a in (ids, local_vertex[ids], padded)))

  return _SilhouetteMesh(
    vertex_ids=jax.device_put(np.asarray(vertex_ids, np.int32)),
    triangles=jax.device_put(np.asarray(local_vertex[concrete.triangles[tri_ids]], np.int32)),
    edge_faces=jax.device_put(
      np.asarray(np.where(edge_faces >= 0, local_tri[np.maximum(edge_faces, 0)], -1), np.int32)
    ),
    right=side(right),
    left=side(left),
  )


def _nearest_index(distances: jax.Array) -> jax.Array:
  """`[K]` int32 index of each row's smallest value in `distances [K, N]` (the first among ties), as argmin.

  Two plain reductions: XLA:CPU's argmin is a variadic reduce that costs tens of ns per element, which over the
  mesh made the silhouette match most of the fit's time.
  """
  smallest = jnp.min(distances, axis=1, keepdims=True)
  index = jnp.arange(distances.shape[1], dtype=jnp.int32)
  return jnp.min(jnp.where(distances == smallest, index, distances.shape[1] - 1), axis=1)


def _match_contour(
  model: MorphableModel, state: _State, targets: jax.Array, config: FitConfig, mesh: _SilhouetteMesh | None
) -> jax.Array:
  """`[68]` vertex ids: the model's landmark ids, -1 jaw entries replaced as `config.contour_matching` says."""
  ids = model.landmark_ids
  right_targets, left_targets = targets[:_CHIN], targets[_CHIN + 1 : _JAW_END]

  def nearest(candidates, projected, jaw_targets, usable=None):
    # The candidate (ids [C], image xy [C, 2]) nearest each target, among the usable ones if given.
    # x and y written out: XLA:CPU reduces a trailing axis of size 2 about 10x slower than this.
    distances = (jaw_targets[:, None, 0] - projected[None, :, 0]) ** 2 + (
      jaw_targets[:, None, 1] - projected[None, :, 1]
    ) ** 2  # [K, C]
    if usable is not None:
      distances = jnp.where(usable, distances, jnp.inf)
    return candidates[_nearest_index(distances)].astype(ids.dtype)

  def project_ids(candidates):
    return _project_points(_gather_vertices(model, candidates, state.alpha, state.beta), state.pose)

  right = nearest(model.contour_right_ids, project_ids(model.contour_right_ids), right_targets)
  left = nearest(model.contour_left_ids, project_ids(model.contour_left_ids), left_targets)
  if config.contour_matching == "occluding":
    if mesh is None:  # traced model: the whole mesh
      vertices = model.vertices(state.alpha, state.beta)
      silhouette = _silhouette_vertices(model, vertices, state.pose.rotation)
      every, projected = jnp.arange(model.num_vertices, dtype=ids.dtype), _project_points(vertices, state.pose)
      right_allowed, left_allowed = _silhouette_allowed(model)
      right_sil = (every, projected, silhouette & right_allowed)
      left_sil = (every, projected, silhouette & left_allowed)
    else:
      projected = project_ids(mesh.vertex_ids)  # [Vs, 2], the jaw area
      occluding = _occluding_from_facing(_facing_from_projection(projected, mesh.triangles), mesh.edge_faces)
      occluding = jnp.concatenate([occluding, jnp.zeros((1,), bool)])  # the padding edge never occludes
      right_sil, left_sil = (
        (side.vertex_ids, projected[side.local_ids], occluding[side.incident_edges].any(axis=1))
        for side in (mesh.right, mesh.left)
      )

    def nearest_silhouette(side, jaw_targets, fallback):
      candidates, projected, usable = side
      return jnp.where(jnp.any(usable), nearest(candidates, projected, jaw_targets, usable), fallback)

    # eos's `select_contour`: positive yaw turns the subject's left (landmarks 9-16) away from the camera.
    yaw = yaw_pitch_roll_from_rotation(state.pose.rotation)[0]
    right = jnp.where(yaw < 0, nearest_silhouette(right_sil, right_targets, right), right)
    left = jnp.where(yaw >= 0, nearest_silhouette(left_sil, left_targets, left), left)
  matched = jnp.concatenate([right, ids[_CHIN : _CHIN + 1], left, ids[_JAW_END:]])
  # Unmapped landmarks outside the jaw (the SFM's inner mouth corners) keep -1; callers give them weight 0.
  return jnp.where(ids < 0, matched, ids)


def _residuals(
  model: MorphableModel,
  state: _State,
  delta: jax.Array,
  ids: jax.Array,
  targets: jax.Array,
  sqrt_weights: jax.Array,
  config: FitConfig,
) -> jax.Array:
  """Whitened residuals `[2 * 68 + S + E]` at `state` moved by `delta [6 + S + E]`."""
  num_shape = model.num_shape
  alpha = state.alpha + delta[6 : 6 + num_shape]
  beta = state.beta + delta[6 + num_shape :]
  pose = _Pose(
    rotation=_cayley(delta[:3]) @ state.pose.rotation,
    log_scale=state.pose.log_scale + delta[3],
    translation=state.pose.translation + delta[4:6],
  )
  projected = _project_points(_gather_vertices(model, jnp.maximum(ids, 0), alpha, beta), pose)
  landmark_terms = (sqrt_weights[:, None] * (projected - targets)).reshape(-1)
  return jnp.concatenate(
    [
      landmark_terms,
      math.sqrt(config.shape_prior_weight) * alpha,
      math.sqrt(config.expression_prior_weight) * beta,
    ]
  )


def landmark_sigma_model(model: MorphableModel, config: FitConfig | None = None) -> np.ndarray:
  """`float32 [68]` the landmark-definition noise `fit` uses for `model` under `config`, model units per coordinate.

  Raises:
    ValueError: an unknown `config.landmark_noise`, or a learned table whose length is not 68.
  """
  config = DEFAULT_FIT_CONFIG if config is None else config
  if isinstance(config.landmark_noise, tuple):
    learned, where = config.landmark_noise, "FitConfig.landmark_noise"
  elif config.landmark_noise in LANDMARK_NOISE:
    learned = LEARNED_LANDMARK_SIGMA_MODEL.get(model.name) if config.landmark_noise == "learned" else None
    where = f"LEARNED_LANDMARK_SIGMA_MODEL[{model.name!r}]"
  else:
    raise ValueError(f"unknown landmark_noise {config.landmark_noise!r}; known: {', '.join(LANDMARK_NOISE)}")
  if learned is None:
    return np.full(NUM_LANDMARKS, config.landmark_sigma_model, np.float32)
  if len(learned) != NUM_LANDMARKS:
    raise ValueError(f"{where} has {len(learned)} values, not {NUM_LANDMARKS}")
  return np.where(np.asarray(learned) > 0, learned, config.landmark_sigma_model).astype(np.float32)


def _sqrt_weights(weights: jax.Array, state: _State, sigma_px: jax.Array, sigma_model: jax.Array) -> jax.Array:
  """`[68]` sqrt(w_k) / sigma_k, with a zero-safe square root (its gradient at w = 0 would be infinite)."""
  sigma = jnp.sqrt(sigma_px**2 + (jnp.exp(state.pose.log_scale) * sigma_model) ** 2)
  positive = weights > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, weights, 1.0)), 0.0) / sigma


def _lm_step(
  model: MorphableModel,
  state: _State,
  ids: jax.Array,
  targets: jax.Array,
  weights: jax.Array,
  noise: tuple[jax.Array, jax.Array],
  config: FitConfig,
) -> _State:
  """One projected, Jacobi-scaled Levenberg–Marquardt step with accept/reject."""
  sqrt_weights = _sqrt_weights(weights, state, *noise)
  num_params = 6 + model.num_shape + model.num_expression
  residual_fn = functools.partial(_residuals, model, ids=ids, targets=targets, sqrt_weights=sqrt_weights, config=config)
  zero = jnp.zeros((num_params,), state.alpha.dtype)
  residual = residual_fn(state, zero)
  jacobian = jax.jacfwd(lambda d: residual_fn(state, d))(zero)  # [M, P]
  gradient = jacobian.T @ residual
  hessian = jacobian.T @ jacobian
  # Jacobi scaling: the pose and coefficient columns differ by orders of magnitude.
  diag_scale = jnp.sqrt(jnp.diagonal(hessian)) + jnp.finfo(hessian.dtype).eps
  hessian = hessian / (diag_scale[:, None] * diag_scale[None, :])
  gradient = gradient / diag_scale
  # Projected step: coefficients at a bound whose descent direction leaves the box are frozen.
  coeffs = jnp.concatenate([state.alpha, state.beta])
  lower = jnp.concatenate([model.shape_lower, model.expression_lower])
  upper = jnp.concatenate([model.shape_upper, model.expression_upper])
  blocked = ((coeffs <= lower) & (gradient[6:] > 0)) | ((coeffs >= upper) & (gradient[6:] < 0))
  free = jnp.concatenate([jnp.ones((6,), bool), ~blocked]).astype(hessian.dtype)
  hessian = hessian * free[:, None] * free[None, :] + jnp.diag(1.0 - free)
  system = hessian + state.damping * jnp.eye(num_params, dtype=hessian.dtype)
  step = -jnp.linalg.solve(system, free * gradient) / diag_scale

  moved = _State(
    pose=_Pose(
      rotation=_cayley(step[:3]) @ state.pose.rotation,
      log_scale=state.pose.log_scale + step[3],
      translation=state.pose.translation + step[4:6],
    ),
    alpha=jnp.clip(state.alpha + step[6 : 6 + model.num_shape], model.shape_lower, model.shape_upper),
    beta=jnp.clip(state.beta + step[6 + model.num_shape :], model.expression_lower, model.expression_upper),
    damping=state.damping,
  )
  # Compare costs under the same noise model (sigma from the current scale).
  old_cost = jnp.sum(residual**2)
  new_cost = jnp.sum(residual_fn(moved, zero) ** 2)
  accept = new_cost < old_cost
  chosen = jax.tree.map(lambda new, old: jnp.where(accept, new, old), moved, state)
  damping = jnp.where(
    accept,
    jnp.maximum(state.damping * config.damping_decrease, config.min_damping),
    state.damping * config.damping_increase,
  )
  return chosen.replace(damping=damping)


def _cost(model, state, ids, targets, weights, noise, config) -> jax.Array:
  zero = jnp.zeros((6 + model.num_shape + model.num_expression,), state.alpha.dtype)
  residual = _residuals(model, state, zero, ids, targets, _sqrt_weights(weights, state, *noise), config)
  return jnp.sum(residual**2)


def _fit_one(
  model: MorphableModel,
  mesh: _SilhouetteMesh | None,
  targets: jax.Array,
  weights: jax.Array,
  noise: tuple[jax.Array, jax.Array],
  config: FitConfig,
) -> tuple[_State, jax.Array, jax.Array]:
  """Fits one face in the normalised image frame; returns the state, the landmark vertex ids and the cost.

  `noise` is (detector sigma in the normalised frame `[]`, landmark-definition sigma in model units `[68]`).
  """
  dtype = model.mean.dtype
  fixed = model.landmark_ids >= 0
  fixed_points = model.mean[jnp.maximum(model.landmark_ids, 0)]
  pose = _initial_pose(fixed_points, targets, jnp.where(fixed, weights, 0.0), config)
  zeros_beta = jnp.zeros((model.num_expression,), dtype)
  state = _State(
    pose=pose,
    alpha=jnp.clip(jnp.zeros((model.num_shape,), dtype), model.shape_lower, model.shape_upper),
    beta=jnp.clip(zeros_beta, model.expression_lower, model.expression_upper),
    damping=jnp.asarray(config.initial_damping, dtype),
  )
  jaw = jnp.arange(NUM_LANDMARKS) < _JAW_END
  contour = (model.landmark_ids < 0) & jaw
  weights = jnp.where(contour, config.contour_weight * weights, weights)
  weights = jnp.where((model.landmark_ids < 0) & ~jaw, 0.0, weights)  # unmapped: no vertex to fit

  def outer(state, _):
    ids = _match_contour(model, state, targets, config, mesh)

    def inner(state, _):
      return _lm_step(model, state, ids, targets, weights, noise, config), None

    state, _ = jax.lax.scan(inner, state, None, length=config.num_lm_steps)
    return state, None

  state, _ = jax.lax.scan(outer, state, None, length=config.num_iterations)
  ids = _match_contour(model, state, targets, config, mesh)
  return state, ids, _cost(model, state, ids, targets, weights, noise, config)


@functools.partial(jax.jit, static_argnames=("config",))
def _fit_batch(
  model: MorphableModel,
  mesh: _SilhouetteMesh | None,
  landmarks_xy: jax.Array,
  landmark_weights: jax.Array,
  image_size: jax.Array,
  sigma_model: jax.Array,
  config: FitConfig,
) -> FitResult:
  dtype = model.mean.dtype
  height, width = image_size[0], image_size[1]
  # Work in a frame centred on the image and scaled to about [-1, 1], for float32 conditioning.
  centre = jnp.stack([(width - 1.0) / 2.0, (height - 1.0) / 2.0]).astype(dtype)
  half_size = (jnp.maximum(height, width) / 2.0).astype(dtype)
  targets = (landmarks_xy.astype(dtype) - centre) / half_size
  noise = (jnp.asarray(config.landmark_sigma_px, dtype) / half_size, sigma_model.astype(dtype))

  states, ids, cost = jax.vmap(lambda t, w: _fit_one(model, mesh, t, w, noise, config))(
    targets, landmark_weights.astype(dtype)
  )
  rotation = states.pose.rotation
  scale = jnp.exp(states.pose.log_scale) * half_size
  translation = states.pose.translation * half_size + centre
  vertices = jax.vmap(model.vertices)(states.alpha, states.beta)  # [B, V, 3]
  vertices_xyd = project(vertices, rotation, scale, translation)
  landmarks = jnp.take_along_axis(vertices_xyd, jnp.maximum(ids, 0)[:, :, None], axis=1)[..., :2]
  landmarks = jnp.where(ids[:, :, None] < 0, jnp.nan, landmarks)
  return FitResult(
    rotation=rotation,
    yaw_pitch_roll=yaw_pitch_roll_from_rotation(rotation),
    translation=translation,
    scale=scale,
    alpha=states.alpha,
    beta=states.beta,
    landmarks_xy=landmarks,
    landmark_vertex_ids=ids.astype(jnp.int32),
    vertices_xyd=vertices_xyd,
    cost=cost,
  )


def fit(
  model: MorphableModel,
  landmarks_xy: jax.typing.ArrayLike,
  *,
  image_size: tuple[int, int],
  landmark_weights: jax.typing.ArrayLike | None = None,
  config: FitConfig | None = None,
) -> FitResult:
  """Fits pose, shape α and expression β of `model` to a batch of 68-point landmark sets.

  One compiled program per (model shapes, batch size, config): new landmarks, weights or image sizes reuse it.

  Args:
    model: the morphable model; its `landmark_ids` map the 68 landmarks to vertices, -1 for jaw landmarks
      left to contour matching.
    landmarks_xy: `[B, 68, 2]` image `xy` (pixel (i, j) centred at (j, i)), iBUG 68-point order.
    image_size: (height, width) in pixels; sets the numerical frame only (coordinates are centred on the image
      and scaled by half its larger side inside the solver, for float32 conditioning).
    landmark_weights: `[B, 68]` or `[68]` non-negative weights (0 holds a landmark out); all ones if None.
      Landmarks the model does not map (id -1 outside the jaw) are ignored whatever their weight.
    config: static settings; `DEFAULT_FIT_CONFIG` if None.

  Returns:
    A `FitResult` with leading batch axis B.

  Raises:
    ValueError: if the shapes do not fit, `config.contour_matching` or `config.landmark_noise` is unknown, or
      contour matching is "occluding" and the model has no edges.

  Example:
    Lines marked +SKIP are not run as doctests: it needs a model and detected landmarks.
    >>> result = fit(model, face.landmarks_xy[None], image_size=image.shape[:2])  # doctest: +SKIP
    >>> np.degrees(result.yaw_pitch_roll[0])  # doctest: +SKIP
  """
  config = DEFAULT_FIT_CONFIG if config is None else config
  if config.contour_matching not in CONTOUR_MATCHING:
    raise ValueError(f"unknown contour_matching {config.contour_matching!r}; known: {', '.join(CONTOUR_MATCHING)}")
  if config.contour_matching == "occluding" and model.edge_face_ids.shape[0] == 0:
    raise ValueError(
      f"{model.name} has no edges (edge_vertex_ids, edge_face_ids) for contour_matching='occluding'; build them "
      "with model.edge_topology_from_triangles or use contour_matching='candidates'"
    )
  landmarks_xy = jnp.asarray(landmarks_xy, model.mean.dtype)
  if landmarks_xy.ndim != 3 or landmarks_xy.shape[1:] != (NUM_LANDMARKS, 2):
    raise ValueError(f"landmarks_xy must be [B, {NUM_LANDMARKS}, 2], got {landmarks_xy.shape}")
  batch = landmarks_xy.shape[0]
  if landmark_weights is None:
    landmark_weights = jnp.ones((batch, NUM_LANDMARKS), model.mean.dtype)
  landmark_weights = jnp.asarray(landmark_weights, model.mean.dtype)
  if landmark_weights.shape not in ((NUM_LANDMARKS,), (batch, NUM_LANDMARKS)):
    raise ValueError(
      f"landmark_weights must be [{NUM_LANDMARKS}] or [B, {NUM_LANDMARKS}], got {landmark_weights.shape}"
    )
  landmark_weights = jnp.broadcast_to(landmark_weights, (batch, NUM_LANDMARKS))
  if len(image_size) != 2:
    raise ValueError(f"image_size must be (height, width), got {image_size}")
  image_size = jnp.asarray(np.asarray(image_size, np.float32))
  mesh = _silhouette_mesh(model) if config.contour_matching == "occluding" else None
  sigma_model = jnp.asarray(landmark_sigma_model(model, config))
  return _fit_batch(model, mesh, landmarks_xy, landmark_weights, image_size, sigma_model, config)
