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
from flax import struct

__all__ = ["NUM_LANDMARKS", "REGION_NAMES", "MorphableModel"]

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
    return self
