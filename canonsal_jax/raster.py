"""Scatter-based triangle rasteriser in JAX: z-buffer, visible triangle ids and barycentrics per pixel.

The mesh arrives already projected (orthographic): `vertices_xyd[V, 3]` holds image `xy` in pixels (the
centre of pixel (i, j) is (x, y) = (j, i), dlib's convention) and a depth `d` where larger is closer. For every
triangle the pixel centres of its bounding box (clipped to the image) are enumerated up to a static
`max_box` x `max_box` bound, offsets from the box's first pixel; each centre is tested with edge functions.
Visibility is resolved in two 32-bit scatter passes over all fragments:

1. ``depth.at[pixel].max(fragment_depth)``: the z-buffer keeps the largest depth;
2. among fragments whose depth equals the pixel's maximum, ``tri.at[pixel].min(triangle_id)``: ties of depth go
   to the smallest triangle id. Exact, with no 64-bit (depth, id) keys.

The winner's barycentrics are then recomputed for (pixel, winning triangle) by a gather.

**Fill rule.** A pixel centre strictly inside a triangle is covered; one exactly on an edge is covered only if
that edge is a *top* or *left* edge (Direct3D's rule, written for image axes with y down): with the triangle
put in positive orientation (signed area ``(x1-x0)(y2-y0) - (x2-x0)(y1-y0) > 0``), an edge with direction
``e = b - a`` is top-left iff ``e_y < 0`` (a left edge: the inside lies towards +x) or ``e_y == 0 and e_x > 0``
(a top edge: the inside lies below it, towards +y). This equals nudging the sample point by (δ, δ²), so a
pixel centre on an edge shared by two triangles, or on a vertex shared by a fan, belongs to exactly one of
them. Edge functions are evaluated as ``cross(a - p, b - p)`` with the edge's endpoints ordered
lexicographically by (x, y): the two triangles sharing an edge compute bit-identical values of opposite
sign, the value is exactly 0 at both endpoints (with or without fused multiply-adds), so the rule holds in
float32, not only in exact arithmetic. Zero-area triangles (and those with non-finite coordinates) produce no
fragments.

**Winding.** Triangles are counter-clockwise seen from outside in model space with y up
(docs/ARCHITECTURE.md). Projection flips y, so a front face has a *negative* signed area in image `xy`
(clockwise in the maths sense with y down; drawn on screen with y down it still looks counter-clockwise).
`cull_backfaces=True` keeps only triangles with negative signed area; by default both windings are rasterised.

**Oversized triangles.** A triangle whose clipped box spans more than `max_box` pixel centres in x or y is not
rasterised by the fast path. It is counted in `Fragments.num_oversized`, never dropped silently; with
`max_oversized=N` the first N of them go through an exact (slow) fallback that tests all H x W pixels for each,
and `Fragments.num_dropped` counts those left over. Pick `max_box` with `required_box` (host-side) to make the
fast path cover everything, or call `check_complete` on the result to raise when anything was dropped.

Memory: ``F * max_box**2`` fragments, each kept as a pixel index and a depth (8 bytes) between the passes; the
transient work is bounded by ``chunk_size`` triangles at a time when given. The fallback adds ``max_oversized *
H * W`` fragments. The Surrey Face Model's 6,736 triangles on a 64-224 px crop are a few pixels each, so
`DEFAULT_MAX_BOX` = 8 is cheap; UV-space rasterisation at 256-512 texels needs a larger box.

Example:
  >>> import jax.numpy as jnp
  >>> from canonsal_jax import raster
  >>> xyd = jnp.array([[0.5, 0.5, 1.0], [6.5, 0.5, 1.0], [0.5, 6.5, 1.0]])
  >>> frags = raster.rasterize(xyd, jnp.array([[0, 1, 2]]), 8, 8)
  >>> int(frags.tri_id[1, 1]), int(frags.tri_id[7, 7]), int(frags.num_oversized)
  (0, -1, 0)
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt
from jax import lax

__all__ = [
  "DEFAULT_MAX_BOX",
  "Fragments",
  "check_complete",
  "interpolate",
  "rasterize",
  "rasterize_uv",
  "required_box",
  "uv_to_texel_xy",
]

# A fitted face mesh (SFM, 6,736 triangles) on a 64-224 px crop has triangles a few pixels across.
DEFAULT_MAX_BOX = 8


class Fragments(NamedTuple):
  """What the rasteriser sees at each pixel (leading batch axes when vmapped).

  Attributes:
    tri_id: [H, W] int32, the visible triangle's index, -1 where no triangle covers the pixel centre.
    bary: [H, W, 3] float32, barycentric coordinates of the pixel centre in the visible triangle (image-space,
      i.e. exact for an orthographic projection), summing to 1; zeros on background.
    depth: [H, W] float32, interpolated depth of the visible triangle (larger = closer), -inf on background.
    num_oversized: [] int32, triangles whose clipped bounding box exceeded `max_box` (not rasterised by the
      fast path).
    num_dropped: [] int32, oversized triangles that the exact fallback did not take either (missing from the
      image); 0 means the result is complete.
  """

  tri_id: jax.Array
  bary: jax.Array
  depth: jax.Array
  num_oversized: jax.Array
  num_dropped: jax.Array


def _edge_functions(px: jax.Array, py: jax.Array, vx: jax.Array, vy: jax.Array) -> jax.Array:
  """Edge function of each triangle edge at points, computed canonically (see the module docstring).

  Args:
    px: [...] pixel-centre x, broadcastable against `vx[..., 0]`.
    py: [...] pixel-centre y.
    vx: [..., 3] vertex x.
    vy: [..., 3] vertex y.

  Returns:
    [..., 3] value k = cross(v[k+2] - v[k+1], p - v[k+1]) for the edge opposite vertex k (positive on the left
    of the edge in the maths sense), so the three sum to the triangle's signed doubled area.
  """
  ax, ay = jnp.roll(vx, -1, axis=-1), jnp.roll(vy, -1, axis=-1)
  bx, by = jnp.roll(vx, -2, axis=-1), jnp.roll(vy, -2, axis=-1)
  swap = (bx < ax) | ((bx == ax) & (by < ay))
  cax, cay = jnp.where(swap, bx, ax), jnp.where(swap, by, ay)
  cbx, cby = jnp.where(swap, ax, bx), jnp.where(swap, ay, by)
  px, py = px[..., None], py[..., None]
  value = (cax - px) * (cby - py) - (cay - py) * (cbx - px)
  return jnp.where(swap, -value, value)


def _orientation(vx: jax.Array, vy: jax.Array) -> jax.Array:
  """Sign of the signed doubled area `(x1-x0)(y2-y0) - (x2-x0)(y1-y0)`, [..., 3] -> [...] float32 in {-1, 0, 1}."""
  area = (vx[..., 1] - vx[..., 0]) * (vy[..., 2] - vy[..., 0]) - (vx[..., 2] - vx[..., 0]) * (vy[..., 1] - vy[..., 0])
  return jnp.sign(area)


def _top_left(vx: jax.Array, vy: jax.Array, sign: jax.Array) -> jax.Array:
  """Whether each edge (opposite vertex k) is a top or left edge of the positively oriented triangle, [..., 3]."""
  ex = (jnp.roll(vx, -2, axis=-1) - jnp.roll(vx, -1, axis=-1)) * sign[..., None]
  ey = (jnp.roll(vy, -2, axis=-1) - jnp.roll(vy, -1, axis=-1)) * sign[..., None]
  return (ey < 0) | ((ey == 0) & (ex > 0))


class _Setup(NamedTuple):
  vx: jax.Array  # [F, 3]
  vy: jax.Array  # [F, 3]
  vd: jax.Array  # [F, 3]
  sign: jax.Array  # [F] orientation in {-1, 1} (0 for degenerate)
  top_left: jax.Array  # [F, 3] bool
  origin: jax.Array  # [F, 2] int32 (j, i) of the clipped box's first pixel centre
  extent: jax.Array  # [F, 2] int32 number of pixel centres in x and y (0 when empty)
  drawable: jax.Array  # [F] bool: finite, non-degenerate, not culled, box not empty


def _setup(vertices_xyd: jax.Array, triangles: jax.Array, height: int, width: int, cull_backfaces: bool) -> _Setup:
  corners = vertices_xyd[triangles]  # [F, 3, 3]
  vx, vy, vd = corners[..., 0], corners[..., 1], corners[..., 2]
  sign = _orientation(vx, vy)
  finite = jnp.all(jnp.isfinite(corners), axis=(-1, -2))
  drawable = finite & (sign != 0)
  if cull_backfaces:
    drawable &= sign < 0  # front faces have negative signed area in image xy (y down)

  def span(lo: jax.Array, hi: jax.Array, size: int) -> tuple[jax.Array, jax.Array]:
    # First and last pixel centre (integers) inside [lo, hi], clipped to the image; clip in float before
    # converting so huge or non-finite coordinates cannot overflow int32.
    first = jnp.clip(jnp.ceil(lo), 0.0, float(size))
    last = jnp.clip(jnp.floor(hi), -1.0, float(size - 1))
    first = jnp.where(finite, first, 0.0).astype(jnp.int32)
    last = jnp.where(finite, last, -1.0).astype(jnp.int32)
    return first, jnp.maximum(last - first + 1, 0)

  j0, nx = span(vx.min(-1), vx.max(-1), width)
  i0, ny = span(vy.min(-1), vy.max(-1), height)
  extent = jnp.stack([nx, ny], -1)
  drawable &= jnp.all(extent > 0, axis=-1)
  return _Setup(
    vx=vx,
    vy=vy,
    vd=vd,
    sign=sign,
    top_left=_top_left(vx, vy, sign),
    origin=jnp.stack([j0, i0], -1),
    extent=jnp.where(drawable[:, None], extent, 0),
    drawable=drawable,
  )


def _box_pixels(origin: jax.Array, extent: jax.Array, box_h: int, box_w: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pixel centres of each triangle's box: x [N, P] int32, y [N, P] int32, in-box mask [N, P], P = box_h * box_w."""
  di, dj = np.divmod(np.arange(box_h * box_w, dtype=np.int32), box_w)
  px = origin[:, :1] + dj[None]
  py = origin[:, 1:] + di[None]
  in_box = (dj[None] < extent[:, :1]) & (di[None] < extent[:, 1:])
  return px, py, in_box


def _fragments(s: _Setup, box_h: int, box_w: int, width: int, num_pixels: int) -> tuple[jax.Array, jax.Array]:
  """Fragments of the triangles in `s` (leading axis N): flat pixel index [N*P] int32 and depth [N*P].

  Fragments that do not exist (outside the box or the triangle, undrawable triangle, non-finite depth) get
  pixel index `num_pixels` (dropped by the scatters) and depth -inf.
  """
  px, py, in_box = _box_pixels(s.origin, s.extent, box_h, box_w)
  w = _edge_functions(px.astype(jnp.float32), py.astype(jnp.float32), s.vx[:, None], s.vy[:, None])
  w = w * s.sign[:, None, None]
  inside = jnp.all((w > 0) | ((w == 0) & s.top_left[:, None]), axis=-1) & in_box & s.drawable[:, None]
  total = jnp.sum(w, axis=-1)
  depth = jnp.sum(w * s.vd[:, None], axis=-1) / jnp.where(inside, total, 1.0)
  valid = inside & jnp.isfinite(depth)
  pixel = jnp.where(valid, py * width + px, num_pixels)
  depth = jnp.where(valid, depth, -jnp.inf)
  return pixel.reshape(-1), depth.reshape(-1)


def _chunked(s: _Setup, ids: jax.Array, chunk: int) -> tuple[_Setup, jax.Array]:
  """Splits triangles [N, ...] and their ids [N] into [N // chunk, chunk, ...] (N is a multiple of chunk)."""
  return jax.tree.map(lambda a: a.reshape(-1, chunk, *a.shape[1:]), (s, ids))


def _zbuffer(
  groups: list[tuple[_Setup, jax.Array, int, int]], width: int, num_pixels: int
) -> tuple[jax.Array, jax.Array]:
  """The two scatter passes over groups of (setup [C, K, ...], tri ids [C, K], box_h, box_w); C chunks of K.

  Returns:
    depth [num_pixels] (max per pixel, -inf where empty) and tri [num_pixels] int32 (-1 where empty).
  """
  zbuf = jnp.full((num_pixels,), -jnp.inf, jnp.float32)
  stored = []
  for s, _, box_h, box_w in groups:

    def pass1(zbuf, s, box_h=box_h, box_w=box_w):
      pixel, depth = _fragments(s, box_h, box_w, width, num_pixels)
      # One materialised copy of the depths feeds both the scatter and pass 2's equality test, so no
      # re-fused recomputation can differ from it in the last bit.
      pixel, depth = lax.optimization_barrier((pixel, depth))
      return zbuf.at[pixel].max(depth, mode="drop"), (pixel, depth)

    zbuf, out = lax.scan(pass1, zbuf, s)
    stored.append(out)

  sentinel = jnp.iinfo(jnp.int32).max
  tbuf = jnp.full((num_pixels,), sentinel, jnp.int32)
  for (_, ids, box_h, box_w), (pixels, depths) in zip(groups, stored):
    num_frag = box_h * box_w

    def pass2(tbuf, xs, num_frag=num_frag):
      pixel, depth, ids = xs
      tri = jnp.repeat(ids, num_frag, total_repeat_length=ids.shape[0] * num_frag)
      winner = (depth > -jnp.inf) & (depth == zbuf.at[pixel].get(mode="fill", fill_value=jnp.inf))
      return tbuf.at[jnp.where(winner, pixel, num_pixels)].min(tri, mode="drop"), None

    tbuf, _ = lax.scan(pass2, tbuf, (pixels, depths, ids))
  return zbuf, jnp.where(tbuf == sentinel, -1, tbuf)


def _barycentrics(s: _Setup, tri_id: jax.Array, width: int) -> jax.Array:
  """Barycentrics [HW, 3] of each pixel centre in its triangle `tri_id` [HW] (-1: zeros)."""
  num_pixels = tri_id.shape[0]
  idx = jnp.maximum(tri_id, 0)
  py, px = jnp.divmod(jnp.arange(num_pixels, dtype=jnp.int32), width)
  w = _edge_functions(px.astype(jnp.float32), py.astype(jnp.float32), s.vx[idx], s.vy[idx])
  w = jnp.maximum(w * s.sign[idx, None], 0.0)  # >= 0 for covered pixels up to rounding
  total = jnp.sum(w, axis=-1, keepdims=True)
  covered = (tri_id >= 0)[:, None] & (total > 0)
  return jnp.where(covered, w / jnp.where(covered, total, 1.0), 0.0)


@functools.partial(
  jax.jit, static_argnames=("height", "width", "max_box", "cull_backfaces", "max_oversized", "chunk_size")
)
def rasterize(
  vertices_xyd: jax.typing.ArrayLike,
  triangles: jax.typing.ArrayLike,
  height: int,
  width: int,
  *,
  max_box: int = DEFAULT_MAX_BOX,
  cull_backfaces: bool = False,
  max_oversized: int = 0,
  chunk_size: int | None = None,
) -> Fragments:
  """Rasterises a projected triangle mesh: visible triangle, barycentrics and depth per pixel.

  Jitted; `height`, `width`, `max_box`, `cull_backfaces`, `max_oversized` and `chunk_size` are static, so new
  vertices (or triangles) of the same shapes reuse the compiled program. Vmappable over a batch of meshes.

  Args:
    vertices_xyd: [V, 3] float, image x, y in pixels (pixel (i, j) has centre (j, i)) and depth (larger =
      closer).
    triangles: [F, 3] int, vertex indices. Padding triangles can be made degenerate (e.g. [0, 0, 0]): zero-area
      triangles produce no fragments.
    height: image height H.
    width: image width W.
    max_box: static bound on a triangle's clipped bounding box, in pixel centres per axis; larger triangles are
      counted in `num_oversized` and left to the fallback.
    cull_backfaces: keep only front faces, i.e. triangles with negative signed area in image xy (model-space
      counter-clockwise with y up, projected with y flipped).
    max_oversized: how many oversized triangles the exact fallback rasterises (each costs H * W fragments);
      the rest are counted in `num_dropped`.
    chunk_size: rasterise this many triangles at a time (bounds the transient memory to chunk_size *
      max_box**2 fragments); None: all at once.

  Returns:
    `Fragments` with [H, W] fields. Ties of depth go to the smallest triangle id.

  Example:
    >>> frags = rasterize(jnp.array([[1.0, 1.0, 0.0], [1.0, 9.0, 0.0], [9.0, 1.0, 0.0]]), jnp.array([[0, 1, 2]]),
    ...                   10, 10, max_box=9, cull_backfaces=True)  # negative signed area: a front face
    >>> int((frags.tri_id == 0).sum())
    36
  """
  vertices_xyd = jnp.asarray(vertices_xyd, jnp.float32)
  triangles = jnp.asarray(triangles, jnp.int32)
  num_tri = triangles.shape[0]
  num_pixels = height * width
  if max_box < 1 or max_oversized < 0 or (chunk_size is not None and chunk_size < 1):
    raise ValueError(
      f"need max_box >= 1, max_oversized >= 0, chunk_size >= 1; got {max_box}, {max_oversized}, {chunk_size}"
    )
  if num_tri == 0:
    return Fragments(
      tri_id=jnp.full((height, width), -1, jnp.int32),
      bary=jnp.zeros((height, width, 3), jnp.float32),
      depth=jnp.full((height, width), -jnp.inf, jnp.float32),
      num_oversized=jnp.zeros((), jnp.int32),
      num_dropped=jnp.zeros((), jnp.int32),
    )
  s = _setup(vertices_xyd, triangles, height, width, cull_backfaces)
  oversized = s.drawable & jnp.any(s.extent > max_box, axis=-1)
  num_oversized = jnp.sum(oversized, dtype=jnp.int32)

  # Fast path: every triangle, boxes of max_box x max_box; oversized ones are masked out.
  chunk = num_tri if chunk_size is None else min(chunk_size, num_tri)
  padded = -(-num_tri // chunk) * chunk
  fast = s._replace(drawable=s.drawable & ~oversized, extent=jnp.where(oversized[:, None], 0, s.extent))
  fast = jax.tree.map(lambda a: jnp.concatenate([a, jnp.zeros((padded - num_tri, *a.shape[1:]), a.dtype)]), fast)
  groups = [(*_chunked(fast, jnp.arange(padded, dtype=jnp.int32), chunk), max_box, max_box)]

  if max_oversized:
    # Exact fallback: each oversized triangle tests all H x W pixels of a full-image box, one at a time.
    slow_ids = jnp.nonzero(oversized, size=max_oversized, fill_value=0)[0].astype(jnp.int32)
    taken = jnp.arange(max_oversized) < num_oversized
    slow = jax.tree.map(lambda a: a[slow_ids], s)
    slow = slow._replace(drawable=slow.drawable & taken, extent=jnp.where(taken[:, None], slow.extent, 0))
    groups.append((*_chunked(slow, slow_ids, 1), height, width))
  num_dropped = jnp.maximum(num_oversized - max_oversized, 0).astype(jnp.int32)

  zbuf, tri_id = _zbuffer(groups, width, num_pixels)
  bary = _barycentrics(s, tri_id, width)
  return Fragments(
    tri_id=tri_id.reshape(height, width),
    bary=bary.reshape(height, width, 3),
    depth=zbuf.reshape(height, width),
    num_oversized=num_oversized,
    num_dropped=num_dropped,
  )


@jax.jit  # host callers get one program, not an eager op per line
def uv_to_texel_xy(uv: jax.typing.ArrayLike, size: int) -> jax.Array:
  """Maps UVs [..., 2] (u right, v up, in [0, 1]) to texel `xy` [..., 2] of a size x size texture.

  Texel (i, j) has centre u = (j + 0.5) / size, v = 1 - (i + 0.5) / size, i.e. x = u * size - 0.5 and
  y = (1 - v) * size - 0.5, so texel (i, j) sits at xy = (j, i) like an image pixel.
  """
  uv = jnp.asarray(uv, jnp.float32)
  return jnp.stack([uv[..., 0] * size - 0.5, (1.0 - uv[..., 1]) * size - 0.5], axis=-1)


@functools.partial(jax.jit, static_argnames=("size", "max_box", "max_oversized", "chunk_size"))
def rasterize_uv(
  uv: jax.typing.ArrayLike,
  triangles: jax.typing.ArrayLike,
  size: int,
  *,
  max_box: int = DEFAULT_MAX_BOX,
  max_oversized: int = 0,
  chunk_size: int | None = None,
) -> Fragments:
  """Rasterises a mesh in UV space: each texel of a size x size texture gets its triangle and barycentrics.

  Every triangle has depth 0 (the result's `depth` is 0 on covered texels, -inf elsewhere), so where UV
  islands overlap the smallest triangle id wins. Both windings are kept (UV-space counter-clockwise triangles
  have negative signed area in texel xy, as front faces do in images).

  Args:
    uv: [V, 2] float, u right and v up in [0, 1].
    triangles: [F, 3] int.
    size: texture side T.
    max_box: as in `rasterize`; use `required_box(uv_to_texel_xy(uv, size), triangles, size, size)`.
    max_oversized: as in `rasterize`.
    chunk_size: as in `rasterize`.

  Returns:
    `Fragments` with [T, T] fields, indexed by texel row i and column j.
  """
  xy = uv_to_texel_xy(uv, size)
  xyd = jnp.concatenate([xy, jnp.zeros_like(xy[..., :1])], axis=-1)
  return rasterize(xyd, triangles, size, size, max_box=max_box, max_oversized=max_oversized, chunk_size=chunk_size)


@jax.jit  # host callers get one program, not an eager op per line
def interpolate(
  fragments: Fragments,
  vertex_attrs: jax.typing.ArrayLike,
  triangles: jax.typing.ArrayLike,
  *,
  background: float = 0.0,
) -> jax.Array:
  """Interpolates per-vertex attributes with the fragments' barycentrics.

  Args:
    fragments: from `rasterize` / `rasterize_uv`, [H, W] fields.
    vertex_attrs: [V, K] values per vertex.
    triangles: [F, 3] the triangles that were rasterised.
    background: value on pixels no triangle covers (0 by default; pass `jnp.nan` to make holes explicit).

  Returns:
    [H, W, K] interpolated attributes, `background` where `tri_id == -1`.
  """
  vertex_attrs = jnp.asarray(vertex_attrs)
  triangles = jnp.asarray(triangles, jnp.int32)
  corners = vertex_attrs[triangles[jnp.maximum(fragments.tri_id, 0)]]  # [H, W, 3, K]
  values = jnp.einsum("hwc,hwck->hwk", fragments.bary.astype(corners.dtype), corners)
  return jnp.where((fragments.tri_id >= 0)[..., None], values, jnp.asarray(background, values.dtype))


def required_box(vertices_xy: npt.ArrayLike, triangles: npt.ArrayLike, height: int, width: int) -> int:
  """Smallest `max_box` that rasterises every triangle on the fast path (host-side, numpy).

  Counts the pixel centres (integers) spanned by each triangle's bounding box clipped to the H x W image,
  the same way `rasterize` does in float32; zero-area and non-finite triangles are ignored.

  Args:
    vertices_xy: [V, 2] (or [V, 3]; extra columns ignored) image x, y in pixels.
    triangles: [F, 3] int.
    height: image height H.
    width: image width W.

  Returns:
    The bound, at least 1.
  """
  xy = np.asarray(vertices_xy, np.float32)[:, :2]
  corners = xy[np.asarray(triangles, np.int64)]  # [F, 3, 2]
  x, y = corners[..., 0], corners[..., 1]
  area = (x[:, 1] - x[:, 0]) * (y[:, 2] - y[:, 0]) - (x[:, 2] - x[:, 0]) * (y[:, 1] - y[:, 0])
  ok = np.isfinite(corners).all(axis=(1, 2)) & (area != 0)
  if not ok.any():
    return 1
  x, y = x[ok], y[ok]
  nx = np.clip(np.floor(x.max(-1)), -1, width - 1) - np.clip(np.ceil(x.min(-1)), 0, width) + 1
  ny = np.clip(np.floor(y.max(-1)), -1, height - 1) - np.clip(np.ceil(y.min(-1)), 0, height) + 1
  visible = (nx > 0) & (ny > 0)
  if not visible.any():
    return 1
  return max(1, math.ceil(max(nx[visible].max(), ny[visible].max())))


def check_complete(fragments: Fragments) -> Fragments:
  """Raises if any triangle was left out (host-side; call outside jit). Returns `fragments` unchanged.

  Raises:
    ValueError: some oversized triangle was neither on the fast path nor in the fallback.
  """
  dropped = int(np.max(np.asarray(fragments.num_dropped)))
  if dropped:
    oversized = int(np.max(np.asarray(fragments.num_oversized)))
    raise ValueError(
      f"{dropped} of {oversized} oversized triangles were not rasterised: raise max_box (see required_box) or "
      "max_oversized"
    )
  return fragments
