"""The `MorphableModel` pytree: one type for every 3D morphable face model (Surrey, the embedded default).

Model space is right-handed, y up, the face looking along +z (towards the camera), in the model's own units
(millimetres for the Surrey Face Model). Triangles are counter-clockwise seen from outside. UVs have u right,
v up, both in [0, 1].

A face's vertices are ``mean + shape_basis @ alpha + expression_basis @ beta``:
- `alpha [S]`, the shape coefficients, have the prior N(0, I): the basis columns are already scaled by the
  prior's standard deviations (eos's "rescaled" PCA basis), and optional bounds (`shape_lower`,
  `shape_upper`, +-inf where unbounded) hold artist targets inside the range they were made for;
- `beta [E]`, the expression coefficients, lie within `expression_lower`..`expression_upper`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

__all__ = ["NUM_LANDMARKS", "REGION_NAMES", "MorphableModel", "edge_topology_from_triangles"]

# dlib / iBUG 300-W 68-point markup.
NUM_LANDMARKS = 68

# Semantic regions labelled per vertex on every model; `MorphableModel.regions` holds indices into this.
REGION_NAMES = ("other", "forehead", "brows", "eyes", "nose", "cheeks", "mouth", "chin", "jaw", "ears")


class MorphableModel(struct.PyTreeNode):
  """A 3D morphable face model as a pytree of arrays (static metadata in hashable fields).

  Attributes:
    mean: `[V, 3]` mean shape.
    shape_basis: `[V, 3, S]` shape directions, scaled so that alpha ~ N(0, I).
    shape_lower: `[S]` lower bounds of alpha (-inf where unbounded).
    shape_upper: `[S]` upper bounds of alpha (+inf where unbounded).
    expression_basis: `[V, 3, E]` expression directions (blendshape offsets from the neutral face).
    expression_lower: `[E]` lower bounds of beta.
    expression_upper: `[E]` upper bounds of beta.
    triangles: `[F, 3]` int32 vertex ids, counter-clockwise seen from outside.
    uv: `[V, 2]` texture coordinates.
    landmark_ids: `[68]` int32 vertex of each dlib landmark, -1 where the landmark is left to contour fitting
      (the outer jaw points, whose vertex depends on the pose).
    contour_right_ids: `[Cr]` int32 candidate vertices for the right jaw contour (landmarks 1-8, the face's right,
      image left).
    contour_left_ids: `[Cl]` int32 candidate vertices for the left jaw contour (landmarks 10-17).
    regions: `[V]` int32 index into `REGION_NAMES` per vertex.
    edge_vertex_ids: `[Ne, 2]` int32 the two vertices of each mesh edge (`edge_topology_from_triangles`); empty
      when the model has none (the fitter's occluding-contour matching needs them).
    edge_face_ids: `[Ne, 2]` int32 the triangles on either side of each edge, -1 for the missing one of an edge
      on the mesh border.
    name: a short name for reports ("sfm_3448", "default").
    shape_names: names of the shape components (for artist targets) or "pc0", "pc1", ...
    expression_names: names of the expression components.
  """

  mean: jax.Array
  shape_basis: jax.Array
  shape_lower: jax.Array
  shape_upper: jax.Array
  expression_basis: jax.Array
  expression_lower: jax.Array
  expression_upper: jax.Array
  triangles: jax.Array
  uv: jax.Array
  landmark_ids: jax.Array
  contour_right_ids: jax.Array
  contour_left_ids: jax.Array
  regions: jax.Array
  edge_vertex_ids: jax.Array = struct.field(default_factory=lambda: np.zeros((0, 2), np.int32))
  edge_face_ids: jax.Array = struct.field(default_factory=lambda: np.zeros((0, 2), np.int32))
  name: str = struct.field(pytree_node=False, default="model")
  shape_names: tuple[str, ...] = struct.field(pytree_node=False, default=())
  expression_names: tuple[str, ...] = struct.field(pytree_node=False, default=())

  @property
  def num_vertices(self) -> int:
    return self.mean.shape[0]

  @property
  def num_shape(self) -> int:
    return self.shape_basis.shape[-1]

  @property
  def num_expression(self) -> int:
    return self.expression_basis.shape[-1]

  def vertices(self, alpha: jax.typing.ArrayLike | None = None, beta: jax.typing.ArrayLike | None = None) -> jax.Array:
    """Model-space vertices `[V, 3]` for shape `alpha [S]` and expression `beta [E]` (zeros when None)."""
    v = self.mean
    if alpha is not None:
      v = v + jnp.einsum("vds,s->vd", self.shape_basis, jnp.asarray(alpha, self.mean.dtype))
    if beta is not None:
      v = v + jnp.einsum("vde,e->vd", self.expression_basis, jnp.asarray(beta, self.mean.dtype))
    return v

  def check(self) -> MorphableModel:
    """Raises ValueError if the arrays' shapes do not fit together; returns self."""
    v, s, e = self.num_vertices, self.num_shape, self.num_expression
    want = {
      "mean": (v, 3),
      "shape_basis": (v, 3, s),
      "shape_lower": (s,),
      "shape_upper": (s,),
      "expression_basis": (v, 3, e),
      "expression_lower": (e,),
      "expression_upper": (e,),
      "uv": (v, 2),
      "landmark_ids": (NUM_LANDMARKS,),
      "regions": (v,),
    }
    for field, shape in want.items():
      got = tuple(getattr(self, field).shape)
      if got != shape:
        raise ValueError(f"{self.name}: {field} has shape {got}, expected {shape}")
    if self.triangles.ndim != 2 or self.triangles.shape[1] != 3:
      raise ValueError(f"{self.name}: triangles must be [F, 3], got {self.triangles.shape}")
    edges = tuple(self.edge_vertex_ids.shape), tuple(self.edge_face_ids.shape)
    if len(edges[0]) != 2 or edges[0][1:] != (2,) or edges[0] != edges[1]:
      raise ValueError(f"{self.name}: edge_vertex_ids and edge_face_ids must both be [Ne, 2], got {edges}")
    return self


def edge_topology_from_triangles(triangles: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The edges of a triangle mesh and the faces on either side, as `MorphableModel.edge_*` wants them.

  The same information as eos's edge topology file (`sfm.load_edge_topology`), computed from the triangles, in
  the order of the sorted vertex pairs; a border edge's one face comes first, -1 second.

  Args:
    triangles: `[F, 3]` vertex ids.

  Returns:
    `(edge_vertex_ids [Ne, 2], edge_face_ids [Ne, 2])`, int32, the vertex pairs sorted (smaller id first).

  Raises:
    ValueError: an edge is shared by more than two triangles (a non-manifold mesh).
  """
  triangles = np.asarray(triangles, np.int64)
  pairs = np.sort(np.concatenate([triangles[:, [0, 1]], triangles[:, [1, 2]], triangles[:, [2, 0]]]), axis=1)
  faces = np.tile(np.arange(triangles.shape[0]), 3)
  edges, inverse, counts = np.unique(pairs, axis=0, return_inverse=True, return_counts=True)
  if counts.size and counts.max() > 2:
    raise ValueError(f"{int((counts > 2).sum())} edges are shared by more than two triangles")
  order = np.argsort(inverse.reshape(-1), kind="stable")  # the faces grouped by edge
  starts = np.cumsum(counts) - counts
  second = faces[order[np.minimum(starts + 1, order.size - 1)]]
  edge_faces = np.stack([faces[order[starts]], np.where(counts == 2, second, -1)], axis=1)
  return edges.astype(np.int32), edge_faces.astype(np.int32)
