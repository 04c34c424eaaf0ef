"""Incremental occlusion: each patch recomputes only the activations it can change.

An occluded image differs from the original only inside the patch. Through a layer with kernel `k` and stride
`s` the changed region grows by the layer's receptive field: the outputs that read a changed input row `r0 <=
r < r1` are rows ``ceil((r0 + p - k + 1) / s) .. floor((r1 - 1 + p) / s)`` (`p` the layer's leading padding),
so each layer needs to recompute only that window of its output and can read every other position from the
unoccluded image's activations, computed once per image (Nakandala, Kumar and Papakonstantinou, "Incremental
and Approximate Inference for Faster Occlusion-based Deep CNN Explanations", SIGMOD 2019). Once the window
covers the whole map the remaining layers run in full.

The model is described by a `LayerGraph`: nodes with known geometry (`Spatial` sliding-window ops such as
convolutions, depthwise convolutions and pools; `Pointwise` per-pixel ops such as affine maps, batch norms,
activations and 1x1 convolutions; `Add`, with dlib's zero-padding `add_prev` as an option; `Full` ops that
need the whole map, such as global pooling and dense layers). Window sizes are static: for every possible
patch centre the window's start along each axis is tabulated on the host (`plan`), the length is the largest
over all centres, and at run time each patch looks its starts up and moves its windows with
`lax.dynamic_slice` / `lax.dynamic_update_slice`. A spatial layer computes its output window as a VALID op on
a slab of its padded cached input with the changed input window pasted in, for all patches of a chunk in one
batched call.

With `approx_threshold=tau` (the paper's projective-field threshold) no window grows beyond `ceil(tau * side)`
of its map: the changes outside that central part of the projective field are dropped, trading exactness for
speed; `tau=None` is exact.

`occlusion.make_sweep(..., method="incremental")` uses this module; a `FaceModel` whose `apply_fn` carries a
`layer_graph` (see `with_graph`) gets it by default.

Example:
  >>> import jax, jax.numpy as jnp
  >>> from canonsal_jax import incremental
  >>> g = incremental.GraphBuilder()
  >>> x = g.spatial(g.input, lambda w, x: incremental.conv_valid(x, w), kernel=3, padding=1)
  >>> x = g.full(x, lambda w, x: jnp.mean(x, axis=(1, 2)))
  >>> graph = g.build()
  >>> graph.apply(jnp.ones((3, 3, 1, 2)), jnp.ones((1, 8, 8, 1))).shape
  (1, 2)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = [
  "Add",
  "Full",
  "GraphBuilder",
  "LayerGraph",
  "Node",
  "Plan",
  "Pointwise",
  "Spatial",
  "WithGraph",
  "avg_pool_valid",
  "call",
  "conv_valid",
  "make_cache",
  "max_pool_valid",
  "occluded_outputs",
  "plan",
  "resolve",
  "tail_start",
  "window_range",
  "with_graph",
]

NodeFn = Callable[[Any, jax.Array], jax.Array]


# ----------------------------------------------------------------------------------------------------------
# The layer description.


@dataclasses.dataclass(frozen=True, eq=False)
class Spatial:
  """A sliding-window op on `[B, H, W, C]` maps: convolution (any groups), depthwise convolution, pooling.

  Attributes:
    fn: `(bound, x_padded[B, H + pads, W + pads, C]) -> [B, H', W', C']`, the op as a VALID op on an input that
      is already padded (pointwise ops after it may be fused in, e.g. a ReLU).
    kernel: window size (rows, cols).
    stride: (rows, cols).
    padding: ((top, bottom), (left, right)) in pixels, or "SAME" (TensorFlow's and `lax`'s: the extra pixel at
      the bottom / right) or "VALID", resolved against the input size.
    pad_value: what padding holds: 0 for convolutions, `-inf` for max pools.
  """

  fn: NodeFn
  kernel: tuple[int, int]
  stride: tuple[int, int] = (1, 1)
  padding: tuple[tuple[int, int], tuple[int, int]] | str = ((0, 0), (0, 0))
  pad_value: float = 0.0


@dataclasses.dataclass(frozen=True, eq=False)
class Pointwise:
  """A per-pixel op: output pixel (i, j) depends on input pixel (i, j) only (affine, batch norm, ReLU, 1x1 conv).

  Attributes:
    fn: `(bound, x[B, h, w, C]) -> [B, h, w, C']` for any `h`, `w`.
  """

  fn: NodeFn


@dataclasses.dataclass(frozen=True)
class Add:
  """The sum of its inputs (a residual connection).

  Attributes:
    pad_to_larger: dlib's `add_prev`: each input is zero-padded at the end of rows, columns and channels to the
      largest shape first; otherwise the shapes must be equal.
  """

  pad_to_larger: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Full:
  """An op that needs the whole map (global pooling, flatten, dense layers): no windows from here on.

  Attributes:
    fn: `(bound, x[B, ...]) -> [B, ...]`.
  """

  fn: NodeFn


@dataclasses.dataclass(frozen=True)
class _Input:
  """The graph input (the model's `[B, H, W, C]` input)."""


Op = Spatial | Pointwise | Add | Full | _Input


@dataclasses.dataclass(frozen=True)
class Node:
  """One op and the ids of the nodes it reads (0 is the graph input; ids are positions in `LayerGraph.nodes`)."""

  op: Op
  inputs: tuple[int, ...]
  name: str = ""


def _identity(params: Any) -> Any:
  return params


@dataclasses.dataclass(frozen=True, eq=False)
class LayerGraph:
  """A model as a graph of ops with known geometry; the last node is the output.

  Attributes:
    nodes: node 0 is the input; every node reads earlier nodes only.
    bind: `params -> bound`, what every node's `fn` receives as its first argument (for an NNX model,
      `functools.partial(nnx.merge, graphdef)`); the identity by default.
  """

  nodes: tuple[Node, ...]
  bind: Callable[[Any], Any] = _identity

  def __post_init__(self):
    if not self.nodes or not isinstance(self.nodes[0].op, _Input):
      raise ValueError("node 0 of a LayerGraph must be its input (use GraphBuilder)")
    for i, node in enumerate(self.nodes[1:], start=1):
      if not node.inputs or any(not 0 <= j < i for j in node.inputs):
        raise ValueError(f"node {i} ({node.name}) reads {node.inputs}: inputs must be earlier nodes")
      if not isinstance(node.op, Add) and len(node.inputs) != 1:
        raise ValueError(f"node {i} ({node.name}): only Add takes more than one input")

  def activations(self, params: Any, x: jax.Array) -> list[jax.Array]:
    """Every node's output on `x[B, H, W, C]` (full maps, no windows); the last is the model output."""
    return _forward(self.bind(params), self.nodes, jnp.asarray(x))

  def apply(self, params: Any, x: jax.Array) -> jax.Array:
    """The model output on `x[B, H, W, C]`: what the model's `apply_fn` computes."""
    return self.activations(params, x)[-1]


class GraphBuilder:
  """Builds a `LayerGraph` node by node; each method returns the new node's id.

  Example:
    >>> g = GraphBuilder()
    >>> y = g.spatial(g.input, lambda w, x: conv_valid(x, w["k"]), kernel=3, padding=1)
    >>> y = g.pointwise(y, lambda w, x: jax.nn.relu(x))
    >>> out = g.full(g.add(y, g.input), lambda w, x: x.mean(axis=(1, 2)))
  """

  input = 0

  def __init__(self):
    self._nodes: list[Node] = [Node(_Input(), (), "input")]

  def _push(self, op: Op, inputs: tuple[int, ...], name: str) -> int:
    self._nodes.append(Node(op, inputs, name))
    return len(self._nodes) - 1

  def spatial(
    self,
    x: int,
    fn: NodeFn,
    *,
    kernel: int | tuple[int, int],
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] | str = 0,
    pad_value: float = 0.0,
    name: str = "",
  ) -> int:
    """A `Spatial` op; `kernel`, `stride` may be ints (square), `padding` an int (the same on every side)."""
    pair = lambda v: (int(v), int(v)) if isinstance(v, (int, np.integer)) else tuple(int(u) for u in v)
    if isinstance(padding, str):
      if padding not in ("SAME", "VALID"):
        raise ValueError(f"padding must be pixels, 'SAME' or 'VALID', got {padding!r}")
      pads: Any = padding
    elif isinstance(padding, (int, np.integer)):
      pads = ((int(padding),) * 2,) * 2
    else:
      pads = tuple(tuple(int(p) for p in axis) for axis in padding)
    return self._push(Spatial(fn, pair(kernel), pair(stride), pads, float(pad_value)), (x,), name)

  def pointwise(self, x: int, fn: NodeFn, *, name: str = "") -> int:
    return self._push(Pointwise(fn), (x,), name)

  def add(self, *xs: int, pad_to_larger: bool = False, name: str = "") -> int:
    if len(xs) < 2:
      raise ValueError("add needs at least two inputs")
    return self._push(Add(pad_to_larger), tuple(xs), name)

  def full(self, x: int, fn: NodeFn, *, name: str = "") -> int:
    return self._push(Full(fn), (x,), name)

  def build(self, bind: Callable[[Any], Any] | None = None) -> LayerGraph:
    return LayerGraph(tuple(self._nodes), bind if bind is not None else _identity)


@dataclasses.dataclass(frozen=True, eq=False)
class WithGraph:
  """An `apply_fn` that carries its model's `LayerGraph` (`occlusion.make_sweep` looks for `layer_graph`).

  Calls go to `fn` unchanged; hashing and equality are by identity, as for the `functools.partial` it wraps.
  """

  fn: Callable[[Any, jax.Array], jax.Array]
  layer_graph: LayerGraph

  def __call__(self, params: Any, x: jax.typing.ArrayLike) -> jax.Array:
    return self.fn(params, x)


def with_graph(apply_fn: Callable[[Any, jax.Array], jax.Array], graph: LayerGraph) -> WithGraph:
  """`apply_fn` with `graph` attached as its `layer_graph` attribute."""
  return WithGraph(apply_fn, graph)


def resolve(bound: Any, path: str) -> Any:
  """`bound.<path>`: `path` is dotted, integer parts index (``"blocks.0.conv1"``); "" is `bound` itself."""
  for part in path.split("."):
    if part:
      bound = bound[int(part)] if part.isdigit() else getattr(bound, part)
  return bound


def _call_path(path: str, method: str, bound: Any, x: jax.Array) -> jax.Array:
  return getattr(resolve(bound, path), method)(x)


def call(path: str, method: str = "__call__") -> NodeFn:
  """A node fn calling `bound.<path>.<method>(x)` (see `resolve`)."""
  return functools.partial(_call_path, path, method)


# ----------------------------------------------------------------------------------------------------------
# VALID ops on pre-padded input, for `Spatial.fn`.


def conv_valid(
  x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, stride: int = 1, groups: int = 1
) -> jax.Array:
  """Cross-correlation without padding: `x[B, H, W, C_in]`, `kernel[kh, kw, C_in / groups, C_out]` (HWIO).

  On XLA:CPU a dense convolution with no padding at all runs up to 3x slower than the same one with any
  padding (YNNPACK, jax 0.10; at batch 16: 22 vs 55 GMAC/s on 14x14 outputs with 512 channels, and VGG's
  28 px layer at 21 vs 61 at batch 8; BENCHMARKS.md, "Incremental occlusion"). There the input gets one zero
  column on the right and the output column that reads it is dropped: no kept output reads the zeros, so the
  result is the VALID one, for one column of extra arithmetic.
  """
  out_width = (x.shape[2] - kernel.shape[1]) // stride + 1
  pad_right = 1 if groups == 1 and jax.default_backend() == "cpu" else 0
  y = lax.conv_general_dilated(
    x,
    kernel,
    window_strides=(stride, stride),
    padding=((0, 0), (0, pad_right)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )
  y = y[:, :, :out_width]
  return y if bias is None else y + bias


def max_pool_valid(x: jax.Array, size: int, stride: int) -> jax.Array:
  """Max pool without padding, as a max over the `size**2` strided views (exact; faster than `reduce_window`)."""
  h, w = (x.shape[1] - size) // stride + 1, (x.shape[2] - size) // stride + 1
  views = [
    x[:, i : i + stride * (h - 1) + 1 : stride, j : j + stride * (w - 1) + 1 : stride]
    for i in range(size)
    for j in range(size)
  ]
  return functools.reduce(jnp.maximum, views)


def avg_pool_valid(x: jax.Array, size: int, stride: int) -> jax.Array:
  """Average pool without padding (every window full): `[B, H, W, C]` -> `[B, (H - size) // stride + 1, ...]`."""
  y = lax.reduce_window(x, 0.0, lax.add, (1, size, size, 1), (1, stride, stride, 1), "VALID")
  return y / (size * size)


# ----------------------------------------------------------------------------------------------------------
# Geometry: the window arithmetic along one axis.


def _resolve_padding(padding: Any, size: int, kernel: int, stride: int, axis: int) -> tuple[int, int]:
  if padding == "VALID":
    return (0, 0)
  if padding == "SAME":
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return (total // 2, total - total // 2)
  return tuple(padding[axis])


def window_range(start: np.ndarray, length: int, *, kernel: int, stride: int, pad: int, out_size: int):
  """Output rows `[lo, hi]` (inclusive, clamped to the map) that read any of the input rows `[start, start + length)`.

  Args:
    start: input window starts (any shape of ints).
    length: input window length.
    kernel, stride: the layer's along this axis.
    pad: its leading padding.
    out_size: the output map's length along this axis.

  Returns:
    `(lo, hi)` arrays like `start`: ``lo = ceil((start + pad - kernel + 1) / stride)``,
    ``hi = floor((start + length - 1 + pad) / stride)``, clamped to `[0, out_size - 1]`.
  """
  start = np.asarray(start, np.int64)
  lo = -((kernel - 1 - pad - start) // stride)  # ceil((start + pad - kernel + 1) / stride)
  hi = (start + length - 1 + pad) // stride
  return np.clip(lo, 0, out_size - 1), np.clip(hi, 0, out_size - 1)


@dataclasses.dataclass(frozen=True)
class _Axis:
  """A window along one axis of a map: `length` rows from `start[i]` for centre index `i` (full: the whole map)."""

  size: int
  length: int
  start: np.ndarray  # [num_centre_indices] int32

  @property
  def full(self) -> bool:
    return self.length == self.size


@dataclasses.dataclass(frozen=True)
class _Slab:
  """What a `Spatial` node reads along one axis: `length` rows of its padded cached input from `start[i]`,
  the changed input window pasted at `paste[i]`, and its output window at `offset` in the slab's output."""

  length: int
  start: np.ndarray
  paste: np.ndarray
  offset: int


@dataclasses.dataclass(frozen=True)
class _NodePlan:
  """A node's windows: `axes` (rows, cols) where its per-patch output is a window or the node reads one; `slabs`
  and `pads` for a `Spatial` node reading a windowed input."""

  axes: tuple[_Axis, _Axis] | None = None
  slabs: tuple[_Slab, _Slab] | None = None
  pads: tuple[tuple[int, int], tuple[int, int]] | None = None

  @property
  def windowed(self) -> bool:
    """Whether each patch carries a window of this node's output rather than the whole map."""
    return self.axes is not None and not all(a.full for a in self.axes)


@dataclasses.dataclass(frozen=True)
class Plan:
  """Static windows of every node for one input shape and patch size (see `plan`)."""

  nodes: tuple[_NodePlan, ...]
  half: int
  input_size: tuple[int, int]

  def describe(self) -> list[str]:
    """One line per node: its window (rows x cols) against its map, or "full"."""
    out = []
    for i, p in enumerate(self.nodes):
      if p.windowed:
        r, c = p.axes
        out.append(f"{i}: {r.length}x{c.length} of {r.size}x{c.size}")
      else:
        out.append(f"{i}: full")
    return out


def _cap(lo: np.ndarray, hi: np.ndarray, length: int, size: int, threshold: float | None) -> tuple[int, np.ndarray]:
  """Static window length and starts covering `[lo, hi]`, at most `ceil(threshold * size)` long if given."""
  if threshold is not None:
    cap = max(1, math.ceil(threshold * size))
    if length > cap:
      start = (lo + hi + 1 - cap) // 2  # centred on the changed range
      return cap, np.clip(start, 0, size - cap).astype(np.int32)
  return length, np.clip(lo, 0, size - length).astype(np.int32)


def _spatial_axis(
  inp: _Axis, kernel: int, stride: int, pads: tuple[int, int], threshold: float | None
) -> tuple[_Axis, _Slab, tuple[int, int]]:
  """The output window, the slab to read and the cache's padding (incl. margins) of a `Spatial` node, one axis."""
  out_size = (inp.size + pads[0] + pads[1] - kernel) // stride + 1
  if out_size < 1:
    raise ValueError(f"a {kernel}-wide window with stride {stride} does not fit a map of {inp.size} (+{pads})")
  lo, hi = window_range(inp.start, inp.length, kernel=kernel, stride=stride, pad=pads[0], out_size=out_size)
  length = int(np.max(hi - lo + 1))
  length, start = _cap(lo, hi, length, out_size, threshold)
  # The slab (in padded input coordinates) covers the rows the output window reads and the input window, and
  # starts on the output's stride grid (`margin` outputs early) so that its VALID output lines up.
  need_lo = start.astype(np.int64) * stride
  need_hi = need_lo + (length - 1) * stride + kernel
  win_lo = inp.start.astype(np.int64) + pads[0]
  win_hi = win_lo + inp.length
  margin = max(0, -(-int(np.max(need_lo - win_lo)) // stride))
  slab_lo = need_lo - margin * stride
  slab_len = int(np.max(np.maximum(need_hi, win_hi) - slab_lo))
  padded = inp.size + pads[0] + pads[1]
  extra_lo = max(0, int(np.max(-slab_lo)))
  extra_hi = max(0, int(np.max(slab_lo + slab_len - padded)))
  slab = _Slab(slab_len, (slab_lo + extra_lo).astype(np.int32), (win_lo - slab_lo).astype(np.int32), margin)
  return _Axis(out_size, length, start), slab, (pads[0] + extra_lo, pads[1] + extra_hi)


def plan(
  graph: LayerGraph,
  shapes: Sequence[tuple[int, ...]],
  *,
  patch_size: int,
  approx_threshold: float | None = None,
) -> Plan:
  """The static windows of every node for patches of `patch_size` (odd) pixels.

  Args:
    graph: the model.
    shapes: every node's output shape without the batch axis (`[H, W, C]` for maps); node 0 the input's.
    patch_size: patch side in pixels.
    approx_threshold: None (exact), or the projective-field threshold tau in (0, 1].

  Returns:
    A `Plan`: per node and axis, the window length and its start for each centre index
    ``clip(centre, -half, size - 1 + half) + half``.

  Raises:
    ValueError: a node's geometry does not give the shape its fn gives.
  """
  height, width = shapes[0][:2]
  half = patch_size // 2
  nodes: list[_NodePlan] = []
  for i, node in enumerate(graph.nodes):
    op = node.op
    if isinstance(op, _Input):
      axes = []
      for size in (height, width):
        length = min(patch_size, size)
        centres = np.arange(-half, size + half)
        axes.append(_Axis(size, length, np.clip(centres - half, 0, size - length).astype(np.int32)))
      nodes.append(_NodePlan(tuple(axes)))
      continue
    ins = [nodes[j] for j in node.inputs]
    if isinstance(op, Full) or not any(p.windowed for p in ins):
      nodes.append(_NodePlan())
    elif isinstance(op, Pointwise):
      nodes.append(_NodePlan(ins[0].axes))
    elif isinstance(op, Spatial):
      in_shape = shapes[node.inputs[0]]
      results = [
        _spatial_axis(
          ins[0].axes[a],
          op.kernel[a],
          op.stride[a],
          _resolve_padding(op.padding, in_shape[a], op.kernel[a], op.stride[a], a),
          approx_threshold,
        )
        for a in (0, 1)
      ]
      axes = tuple(r[0] for r in results)
      if tuple(a.size for a in axes) != tuple(shapes[i][:2]):
        raise ValueError(f"node {i} ({node.name}): geometry gives {[a.size for a in axes]}, fn gives {shapes[i]}")
      nodes.append(_NodePlan(axes, tuple(r[1] for r in results), tuple(r[2] for r in results)))
    elif isinstance(op, Add):
      if not op.pad_to_larger and len({shapes[j] for j in node.inputs}) != 1:
        raise ValueError(f"node {i} ({node.name}) adds shapes {[shapes[j] for j in node.inputs]}")
      num = next(p.axes for p in ins if p.windowed)
      axes = []
      for a in (0, 1):
        size = shapes[i][a]
        if any(not p.windowed or p.axes[a].full for p in ins):
          axes.append(_Axis(size, size, np.zeros_like(num[a].start)))
          continue
        lo = np.min([p.axes[a].start for p in ins], axis=0)
        hi = np.max([p.axes[a].start + p.axes[a].length for p in ins], axis=0)
        length = int(np.max(hi - lo))
        axes.append(_Axis(size, length, np.clip(lo, 0, size - length).astype(np.int32)))
      nodes.append(_NodePlan(tuple(axes)))
    else:
      raise TypeError(f"unknown op {op!r}")
  return Plan(tuple(nodes), half, (height, width))


# ----------------------------------------------------------------------------------------------------------
# Running the graph: full forward, the per-image cache, the windows of a chunk of patches.


def _pad_map(x: jax.Array, pads, value: float, channels: int | None = None) -> jax.Array:
  """Pads rows and columns of `x[B, H, W, C]` (and channels at the end, with zeros, up to `channels`)."""
  widths = [(0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)]
  if any(w != (0, 0) for w in widths):
    x = jnp.pad(x, widths, constant_values=value)
  if channels is not None and channels > x.shape[-1]:
    x = jnp.pad(x, [(0, 0)] * 3 + [(0, channels - x.shape[-1])])
  return x


def _spatial_pads(op: Spatial, shape: tuple[int, ...]) -> tuple[tuple[int, int], tuple[int, int]]:
  return tuple(_resolve_padding(op.padding, shape[a], op.kernel[a], op.stride[a], a) for a in (0, 1))


def _add_full(xs: Sequence[jax.Array], pad_to_larger: bool) -> jax.Array:
  if not pad_to_larger:
    return functools.reduce(jnp.add, xs)
  shape = tuple(max(s) for s in zip(*(x.shape for x in xs), strict=True))
  padded = [jnp.pad(x, [(0, n - s) for s, n in zip(x.shape, shape, strict=True)]) for x in xs]
  return functools.reduce(jnp.add, padded)


def _forward(bound: Any, nodes: Sequence[Node], x: jax.Array) -> list[jax.Array]:
  acts = [x]
  for node in nodes[1:]:
    op, xs = node.op, [acts[j] for j in node.inputs]
    if isinstance(op, Spatial):
      y = op.fn(bound, _pad_map(xs[0], _spatial_pads(op, xs[0].shape[1:]), op.pad_value))
    elif isinstance(op, (Pointwise, Full)):
      y = op.fn(bound, xs[0])
    else:
      y = _add_full(xs, op.pad_to_larger)
    acts.append(y)
  return acts


def make_cache(graph: LayerGraph, the_plan: Plan, acts: Sequence[jax.Array]) -> dict[int, tuple[jax.Array, ...]]:
  """What the windowed nodes read from the unoccluded image's activations `acts` (batch 1), per node id.

  Spatial nodes with a windowed input: their input padded with the layer's padding plus the slab margins; Add
  nodes with a windowed operand: every operand zero-padded to the sum's rows and columns; Full nodes with a
  windowed input: that input.
  """
  cache: dict[int, tuple[jax.Array, ...]] = {}
  for i, node in enumerate(graph.nodes):
    op, p = node.op, the_plan.nodes[i]
    if not any(the_plan.nodes[j].windowed for j in node.inputs):
      continue
    if isinstance(op, Spatial):
      cache[i] = (_pad_map(acts[node.inputs[0]], p.pads, op.pad_value)[0],)
    elif isinstance(op, Add):
      out = acts[i].shape
      cache[i] = tuple(
        _pad_map(acts[j], [(0, out[1] - acts[j].shape[1]), (0, out[2] - acts[j].shape[2])], 0.0)[0] for j in node.inputs
      )
    elif isinstance(op, Full):
      cache[i] = (acts[node.inputs[0]][0],)
  return cache


def _lookup(table: np.ndarray, idx: jax.Array) -> jax.Array:
  return jnp.asarray(table, jnp.int32)[idx]


def _slices(x: jax.Array, rows: jax.Array, cols: jax.Array, size: tuple[int, int, int]) -> jax.Array:
  """`[b, *size]` windows of one `x[H, W, C]` at per-patch starts `rows[b]`, `cols[b]`."""
  return jax.vmap(lambda r, c: lax.dynamic_slice(x, (r, c, jnp.zeros_like(r)), size))(rows, cols)


def _paste(slabs: jax.Array, windows: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
  """`slabs[b, ...]` with `windows[b, h, w, C]` written at per-patch offsets `rows[b]`, `cols[b]`."""
  return jax.vmap(lambda s, w, r, c: lax.dynamic_update_slice(s, w, (r, c, jnp.zeros_like(r))))(
    slabs, windows, rows, cols
  )


def _whole(unoccluded: jax.Array | None, x: jax.Array, rows: jax.Array | None, cols: jax.Array | None) -> jax.Array:
  """A node state as whole maps: windows `x[b, h, w, C]` at `rows[b]`, `cols[b]` pasted into copies of the
  unoccluded map `[H, W, C]`; `x` itself where it is whole already (`rows` None)."""
  if rows is None:
    return x
  return _paste(jnp.broadcast_to(unoccluded, (x.shape[0], *unoccluded.shape)), x, rows, cols)


def tail_start(graph: LayerGraph, the_plan: Plan) -> int:
  """The first node of the graph's tail: the `Full` node after the last windowed one (a dense head), from which
  every node runs on whole maps; `len(graph.nodes)` when there is none."""
  last = max((i for i, p in enumerate(the_plan.nodes) if p.windowed), default=0)
  return next((i for i in range(last + 1, len(graph.nodes)) if isinstance(graph.nodes[i].op, Full)), len(graph.nodes))


def occluded_outputs(
  graph: LayerGraph,
  the_plan: Plan,
  bound: Any,
  cache: dict[int, tuple[jax.Array, ...]],
  image: jax.Array,
  base: jax.Array,
  centres_rc: jax.Array,
  *,
  barrier: bool = False,
  window_batch: int | None = None,
) -> jax.Array:
  """The model outputs of the occluded images for a chunk of patches, computing only their windows.

  Args:
    graph: the model.
    the_plan: `plan(graph, ...)` for this input shape and patch size.
    bound: `graph.bind(params)`.
    cache: `make_cache(graph, the_plan, graph.activations(params, image[None]))`.
    image: `[H, W, C]` the unoccluded input.
    base: `[H, W, C]` the baseline the patch is filled with.
    centres_rc: `int32 [b, 2]` patch centres (row, col); a patch is clipped at the border.
    barrier: pass the occluded input windows through an optimization barrier before the first layer (what
      `occlusion.make_sweep` does on accelerators, see `occlusion._GPU_BASELINE_NOTE`).
    window_batch: run the layers before the graph's tail (`tail_start`) over groups of this many patches
      (`lax.map`; it must divide `b`), and the tail on all `b` at once: a dense head such as VGG's reads its
      weights once per pass, so it pays to give it more patches than the convolutions take efficiently.
      None: every layer on all `b`.

  Returns:
    The graph's output for the `b` occluded images, `[b, ...]`.
  """
  nodes = graph.nodes

  def unoccluded(i: int) -> jax.Array | None:  # the map a `Full` node `i` pastes a windowed input into
    return cache[i][0] if i in cache else None

  def run(centres, given, node_ids):
    """Runs `node_ids` (in order) for the patches `centres[b, 2]`, from the node states in `given`. A node's
    state is `(values[b, h, w, C], row starts[b], col starts[b])` of its window, or `(values[b, ...], None,
    None)` for whole maps; returns every state, `given` included."""
    height, width = the_plan.input_size
    half = the_plan.half
    centres = centres.astype(jnp.int32)
    idx = (
      jnp.clip(centres[:, 0], -half, height - 1 + half) + half,
      jnp.clip(centres[:, 1], -half, width - 1 + half) + half,
    )

    def starts(axes: tuple[_Axis, _Axis]) -> tuple[jax.Array, jax.Array]:
      return _lookup(axes[0].start, idx[0]), _lookup(axes[1].start, idx[1])

    states = dict(given)
    for i in node_ids:
      node = graph.nodes[i]
      op, p = node.op, the_plan.nodes[i]
      ins = [states[j] for j in node.inputs]
      if isinstance(op, _Input):
        r0, c0 = starts(p.axes)
        size = (p.axes[0].length, p.axes[1].length, image.shape[-1])
        rows = jnp.abs(r0[:, None] + jnp.arange(size[0])[None] - centres[:, :1]) <= half  # [b, h]
        cols = jnp.abs(c0[:, None] + jnp.arange(size[1])[None] - centres[:, 1:]) <= half  # [b, w]
        mask = rows[:, :, None, None] & cols[:, None, :, None]
        y = jnp.where(mask, _slices(base, r0, c0, size), _slices(image, r0, c0, size))
        y = lax.optimization_barrier(y) if barrier else y
      elif isinstance(op, Pointwise):
        y = op.fn(bound, ins[0][0])
      elif isinstance(op, Full):
        y = op.fn(bound, _whole(unoccluded(i), *ins[0]))
      elif isinstance(op, Spatial):
        x, r, c = ins[0]
        if r is None:
          y = op.fn(bound, _pad_map(x, _spatial_pads(op, x.shape[1:]), op.pad_value))
        else:
          (sr, sc), (ar, ac) = p.slabs, p.axes
          slab = _slices(
            cache[i][0], _lookup(sr.start, idx[0]), _lookup(sc.start, idx[1]), (sr.length, sc.length, x.shape[-1])
          )
          slab = _paste(slab, x, _lookup(sr.paste, idx[0]), _lookup(sc.paste, idx[1]))
          y = op.fn(bound, slab)[:, sr.offset : sr.offset + ar.length, sc.offset : sc.offset + ac.length]
      else:  # Add
        if p.axes is None:  # no operand windowed
          y = _add_full([s[0] for s in ins], op.pad_to_larger)
        else:
          r_out, c_out = starts(p.axes)
          terms = []
          for k, (x, r, c) in enumerate(ins):
            size = (p.axes[0].length, p.axes[1].length, x.shape[-1])
            if r is not None:
              terms.append(_paste(_slices(cache[i][k], r_out, c_out, size), x, r - r_out, c - c_out))
            else:
              x = _pad_map(x, [(0, p.axes[0].size - x.shape[1]), (0, p.axes[1].size - x.shape[2])], 0.0)
              slice_one = lambda x, r, c, size=size: lax.dynamic_slice(x, (r, c, jnp.zeros_like(r)), size)
              terms.append(jax.vmap(slice_one)(x, r_out, c_out))
          if op.pad_to_larger:
            channels = max(t.shape[-1] for t in terms)
            terms = [_pad_map(t, ((0, 0), (0, 0)), 0.0, channels) for t in terms]
          y = functools.reduce(jnp.add, terms)
      states[i] = (y, *starts(p.axes)) if p.windowed else (y, None, None)
    return states

  tail = tail_start(graph, the_plan)
  num = centres_rc.shape[0]
  if window_batch is None or window_batch >= num or tail == len(nodes):
    return run(centres_rc, {}, range(len(nodes)))[len(nodes) - 1][0]
  if num % window_batch:
    raise ValueError(f"window_batch {window_batch} does not divide the chunk of {num} patches")
  # What the tail reads from before it, as whole maps: a windowed one (read by a `Full` node, whose cache holds
  # the unoccluded map) is pasted into it, as that node would.
  handover = sorted({j for node in nodes[tail:] for j in node.inputs if j < tail})
  readers = {j: next(i for i in range(tail, len(nodes)) if j in nodes[i].inputs) for j in handover}

  def head_inputs(centres):  # [window_batch, 2] -> the handed-over maps of these patches
    states = run(centres, {}, range(tail))
    return tuple(_whole(unoccluded(readers[j]), *states[j]) for j in handover)

  maps = lax.map(head_inputs, centres_rc.reshape(-1, window_batch, 2))
  given = {j: (m.reshape(num, *m.shape[2:]), None, None) for j, m in zip(handover, maps, strict=True)}
  return run(centres_rc, given, range(tail, len(nodes)))[len(nodes) - 1][0]
