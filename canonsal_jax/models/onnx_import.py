"""Any ONNX face network as a `FaceModel`: the graph interpreted in JAX, the weights a params pytree.

`from_onnx(path, card)` reads the file with the `onnx` package (no ONNX runtime), checks it against its
`ModelCard`, and returns a `FaceModel` whose `apply_fn(params, x)` evaluates the graph node by node with JAX
operations. The float initializers are the params (a dict keyed by initializer name; convolution kernels
stored as HWIO), so a new image or new weights reuse the compiled sweep; integer initializers and `Constant`
nodes are static.

Design, and why it is written here rather than taken from a library: the converters that exist
(`onnx2jax`-style projects, `jaxonnxruntime`) either close over the weights as constants, run the graph in
NCHW (slow convolutions on XLA:CPU) or have no notion of the window geometry that incremental occlusion needs.
This interpreter:
- keeps 4-D maps channels-last: a tensor whose ONNX meaning is NCHW is stored NHWC (`_T.cl`) from the first
  convolution on, and is turned back only where an op's meaning depends on the axis order (Flatten, Reshape,
  Transpose, Softmax over a 4-D tensor, ...). The `FaceModel` input is NHWC, which is exactly that storage for
  an NCHW network, so no transpose happens at the input either;
- resolves shape arithmetic (`Shape`, `Gather`, `Concat` of sizes, `Reshape` targets) statically with numpy:
  shapes are static under `jax.jit`, so a PyTorch export's `x.view(x.size(0), -1)` costs nothing;
- derives the network's `incremental.LayerGraph` (convolutions, pools, pads as `Spatial`; activations, batch
  norms, per-channel constants as `Pointwise`; residual sums as `Add`; everything from the first global pool
  or flatten on as one `Full` tail), so `occlusion.make_sweep(method="auto")` runs the exact incremental
  sweep. Where an operator has no window geometry before the tail (an upsampling, a concatenation of two
  branches, a gate multiplying two maps), the model gets no graph and `FaceModel.layer_graph_reason` says which
  operator; the sweep then runs the full model per patch.

Operators: `SUPPORTED_OPS`, opsets `OPSETS` of the default domain. Semantics follow the ONNX operator
specification; each is checked against onnxruntime in `tests/test_onnx_import.py`.

Example:
  Lines marked +SKIP are not run as doctests: they need a model file and its card.
  >>> from canonsal_jax import models
  >>> net = models.from_onnx("arcface.onnx", models.load_card("arcface.json"))  # doctest: +SKIP
  >>> net.apply_fn(net.params, x)  # x: float32 [B, 112, 112, 3]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from canonsal_jax import incremental
from canonsal_jax.models.base import FaceModel
from canonsal_jax.models.card import ModelCard, card_beside, load_card

__all__ = ["OPSETS", "SUPPORTED_OPS", "OnnxGraph", "from_onnx", "read_graph"]

OPSETS = range(9, 22)  # 9..21, the default domain's versions this interpreter follows


# ----------------------------------------------------------------------------------------------------------
# Values. Static values are numpy arrays; values that depend on the input or on the weights are `_T`.


class _T(NamedTuple):
  """A traced tensor. `cl`: a 4-D tensor whose ONNX meaning is NCHW, stored NHWC (`data[b, h, w, c]`)."""

  data: jax.Array
  cl: bool = False

  @property
  def plain(self) -> jax.Array:
    """The tensor in its ONNX axis order."""
    return jnp.transpose(self.data, (0, 3, 1, 2)) if self.cl else self.data

  @property
  def ndim(self) -> int:
    return self.data.ndim

  @property
  def shape(self) -> tuple[int, ...]:
    """The ONNX (logical) shape."""
    s = self.data.shape
    return (s[0], s[3], s[1], s[2]) if self.cl else tuple(s)


def _is_static(v: Any) -> bool:
  return isinstance(v, (np.ndarray, np.generic))


def _plain(v: Any) -> Any:
  return v.plain if isinstance(v, _T) else v


def _shape(v: Any) -> tuple[int, ...]:
  return tuple(v.shape)


def _to_cl(v: Any) -> jax.Array:
  """A 4-D NCHW value as NHWC data."""
  if isinstance(v, _T) and v.cl:
    return v.data
  x = _plain(v)
  if x.ndim != 4:
    raise _OpError(f"expects a 4-D NCHW tensor, got shape {tuple(x.shape)}")
  return jnp.transpose(x, (0, 2, 3, 1))


def _broadcast_cl(v: Any) -> Any:
  """An operand broadcast against a channels-last 4-D map: its NCHW broadcast shape, moved to NHWC."""
  if isinstance(v, _T) and v.cl:
    return v.data
  x = _plain(v)
  if x.ndim > 4:
    raise _OpError(f"cannot broadcast a {x.ndim}-D operand against a 4-D map")
  x = x.reshape((1,) * (4 - x.ndim) + tuple(x.shape))
  return x.transpose(0, 2, 3, 1)


class _OpError(ValueError):
  """An operator that cannot be evaluated as given; re-raised naming the node."""


_DTYPES = {
  1: np.float32,
  2: np.uint8,
  3: np.int8,
  5: np.int16,
  6: np.int32,
  7: np.int64,
  9: np.bool_,
  10: np.float16,
  11: np.float64,
}


# ----------------------------------------------------------------------------------------------------------
# The graph, read once.


@dataclasses.dataclass(frozen=True)
class _Node:
  op: str
  name: str
  inputs: tuple[str, ...]  # "" where an optional input is left out
  outputs: tuple[str, ...]
  attrs: dict[str, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class OnnxGraph:
  """An ONNX graph read for interpretation.

  Attributes:
    path: the file.
    opset: the default domain's opset.
    input_name: the graph input (the one that is not an initializer).
    input_dims: its declared shape, with None for symbolic dimensions.
    output_names: the graph outputs.
    nodes: in the file's (topological) order.
    statics: integer initializers, `Constant` outputs and initializers read as shapes, sizes or bounds.
    params: the float initializers as float32 arrays (convolution kernels already HWIO: `hwio`).
    hwio: names of the params that are convolution kernels stored HWIO.
  """

  path: str
  opset: int
  input_name: str
  input_dims: tuple[int | None, ...]
  output_names: tuple[str, ...]
  nodes: tuple[_Node, ...]
  statics: dict[str, np.ndarray]
  params: dict[str, np.ndarray]
  hwio: frozenset[str]


# Inputs (by position) that an operator reads as a shape, axes, pads, sizes or bounds: never weights.
_STATIC_INPUTS = {
  "Reshape": (1,),
  "Pad": (1, 2, 3),
  "Resize": (1, 2, 3),
  "Upsample": (1,),
  "Slice": (1, 2, 3, 4),
  "Squeeze": (1,),
  "Unsqueeze": (1,),
  "ReduceMean": (1,),
  "ReduceSum": (1,),
  "ReduceMax": (1,),
  "ReduceMin": (1,),
  "Split": (1,),
  "Tile": (1,),
  "Expand": (1,),
  "ConstantOfShape": (0,),
  "Clip": (1, 2),
  "Dropout": (1, 2),
}


def read_graph(path: os.PathLike[str] | str) -> OnnxGraph:
  """Reads an ONNX file's graph, weights and constants.

  Raises:
    ValueError: the file cannot be read, uses another domain or an opset outside `OPSETS`, or an operator not
      in `SUPPORTED_OPS` (named with its node and the opset), or has more than one non-initializer input.
  """
  import onnx  # imported here: only an import of an ONNX file needs it
  from onnx import numpy_helper

  path = os.fspath(path)
  try:
    model = onnx.load(path)
  except FileNotFoundError:
    raise ValueError(f"ONNX model {path} does not exist") from None
  except Exception as e:  # onnx raises DecodeError and others for a file that is not a model
    raise ValueError(f"{path} is not a readable ONNX model ({type(e).__name__}: {e})") from None
  opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
  opset = opsets.get("ai.onnx")
  if opset is None or opset not in OPSETS:
    raise ValueError(f"{path}: opset {opset} of the default domain is not supported (opsets {OPSETS[0]}-{OPSETS[-1]})")
  graph = model.graph
  inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  inputs = [v for v in graph.input if v.name not in inits]
  if len(inputs) != 1:
    raise ValueError(f"{path}: a face model takes one image input; this graph takes {[v.name for v in inputs]}")
  dims = tuple(d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim)
  nodes = []
  for i, node in enumerate(graph.node):
    name = node.name or f"#{i}"
    domain = node.domain or "ai.onnx"
    if domain != "ai.onnx" or node.op_type not in _OPS:
      op = node.op_type if domain == "ai.onnx" else f"{domain}.{node.op_type}"
      raise ValueError(f"{path}: unsupported ONNX operator {op} (node {name!r}, opset {opset})")
    attrs = {a.name: _attribute(a) for a in node.attribute}
    nodes.append(_Node(node.op_type, name, tuple(node.input), tuple(node.output), attrs))
  static_names = {
    node.inputs[j] for node in nodes for j in _STATIC_INPUTS.get(node.op, ()) if j < len(node.inputs) and node.inputs[j]
  }
  hwio = {node.inputs[1] for node in nodes if node.op == "Conv" and node.inputs[1] in inits}
  statics, params = {}, {}
  for name, value in inits.items():
    if name in static_names or not np.issubdtype(value.dtype, np.floating):
      statics[name] = value
    elif name in hwio:
      if value.ndim != 4:
        raise ValueError(
          f"{path}: convolution kernel {name!r} has shape {value.shape}; only 2-D convolutions are supported"
        )
      params[name] = np.ascontiguousarray(value.transpose(2, 3, 1, 0), np.float32)
    else:
      params[name] = np.asarray(value, np.float32)
  return OnnxGraph(
    path=path,
    opset=opset,
    input_name=inputs[0].name,
    input_dims=dims,
    output_names=tuple(o.name for o in graph.output),
    nodes=tuple(nodes),
    statics=statics,
    params=params,
    hwio=frozenset(name for name in hwio if name in params),
  )


def _attribute(a: Any) -> Any:
  from onnx import helper, numpy_helper

  value = helper.get_attribute_value(a)
  if a.type == a.TENSOR:
    return numpy_helper.to_array(value)
  if isinstance(value, bytes):
    return value.decode()
  if isinstance(value, list) and value and isinstance(value[0], bytes):
    return [v.decode() for v in value]
  return value


# ----------------------------------------------------------------------------------------------------------
# Operators. Each takes (node, args, opset) and returns its outputs; args are numpy (static), `_T` or None.


_OPS: dict[str, Callable[..., tuple[Any, ...]]] = {}


def _op(*names: str):
  def register(fn):
    for name in names:
      _OPS[name] = fn
    return fn

  return register


def _ints(v: Any) -> list[int]:
  return [int(u) for u in np.asarray(v).reshape(-1)]


def _static(node: _Node, args: Sequence[Any], i: int, what: str) -> np.ndarray | None:
  if i >= len(args) or args[i] is None:
    return None
  if not _is_static(args[i]):
    raise _OpError(f"its {what} (input {i}) is computed from the image at run time; it must be a constant")
  return args[i]


def _xp(*args: Any):
  return np if all(_is_static(a) for a in args if a is not None) else jnp


def _elementwise(fn_np: Callable, fn_jnp: Callable, *args: Any) -> Any:
  """Applies a broadcasting op keeping channels-last maps channels-last."""
  if all(_is_static(a) for a in args):
    return fn_np(*args)
  if any(isinstance(a, _T) and a.cl for a in args):
    return _T(fn_jnp(*[_broadcast_cl(a) for a in args]), cl=True)
  return _T(fn_jnp(*[jnp.asarray(_plain(a)) for a in args]))


def _unary(node: _Node, fn: Callable[[Any], Any], x: Any) -> Any:
  if _is_static(x):  # shape arithmetic (a Neg of a size): evaluated now, even inside a trace
    with jax.ensure_compile_time_eval():
      return np.asarray(fn(jnp.asarray(x)))
  return _T(fn(x.data), x.cl)


_BINARY = {
  "Add": (np.add, jnp.add),
  "Sub": (np.subtract, jnp.subtract),
  "Mul": (np.multiply, jnp.multiply),
  "Div": (lambda a, b: a // b if np.issubdtype(np.result_type(a, b), np.integer) else a / b, jnp.divide),
  "Pow": (np.power, jnp.power),
  "Equal": (np.equal, jnp.equal),
  "Greater": (np.greater, jnp.greater),
  "Less": (np.less, jnp.less),
  "And": (np.logical_and, jnp.logical_and),
  "Or": (np.logical_or, jnp.logical_or),
}


@_op(*_BINARY)
def _binary(node, args, opset):
  fn_np, fn_jnp = _BINARY[node.op]
  return (_elementwise(fn_np, fn_jnp, args[0], args[1]),)


_VARIADIC = {"Sum": (np.add, jnp.add), "Max": (np.maximum, jnp.maximum), "Min": (np.minimum, jnp.minimum)}


@_op("Sum", "Max", "Min", "Mean")
def _variadic(node, args, opset):
  fn_np, fn_jnp = _VARIADIC["Sum" if node.op == "Mean" else node.op]
  out = args[0]
  for a in args[1:]:
    out = _elementwise(fn_np, fn_jnp, out, a)
  if node.op == "Mean":
    out = _elementwise(np.divide, jnp.divide, out, np.float32(len(args)))
  return (out,)


@_op("Where")
def _where(node, args, opset):
  return (_elementwise(np.where, jnp.where, *args),)


_UNARY: dict[str, Callable[[_Node], Callable[[Any], Any]]] = {
  "Relu": lambda n: jax.nn.relu,
  "Sigmoid": lambda n: jax.nn.sigmoid,
  "Tanh": lambda n: jnp.tanh,
  "Exp": lambda n: jnp.exp,
  "Log": lambda n: jnp.log,
  "Abs": lambda n: jnp.abs,
  "Neg": lambda n: jnp.negative,
  "Sqrt": lambda n: jnp.sqrt,
  "Reciprocal": lambda n: jnp.reciprocal,
  "Floor": lambda n: jnp.floor,
  "Ceil": lambda n: jnp.ceil,
  "Erf": lambda n: lax.erf,
  "Not": lambda n: jnp.logical_not,
  "Softplus": lambda n: jax.nn.softplus,
  "Softsign": lambda n: jax.nn.soft_sign,
  "LeakyRelu": lambda n: functools.partial(jax.nn.leaky_relu, negative_slope=n.attrs.get("alpha", 0.01)),
  "Elu": lambda n: functools.partial(jax.nn.elu, alpha=n.attrs.get("alpha", 1.0)),
  "Selu": lambda n: (
    lambda x: (
      n.attrs.get("gamma", 1.0507009873554805)
      * jnp.where(x > 0, x, n.attrs.get("alpha", 1.6732632423543772) * jnp.expm1(x))
    )
  ),
  "HardSigmoid": lambda n: lambda x: jnp.clip(n.attrs.get("alpha", 0.2) * x + n.attrs.get("beta", 0.5), 0.0, 1.0),
  "HardSwish": lambda n: lambda x: x * jnp.clip(x / 6.0 + 0.5, 0.0, 1.0),
  "Identity": lambda n: lambda x: x,
}


@_op(*_UNARY)
def _unary_op(node, args, opset):
  return (_unary(node, _UNARY[node.op](node), args[0]),)


@_op("Dropout")
def _dropout(node, args, opset):
  if len(node.outputs) > 1 and node.outputs[1]:
    raise _OpError("its mask output is used; only inference (the identity) is supported")
  return (args[0],)


@_op("Cast")
def _cast(node, args, opset):
  dtype = _DTYPES.get(node.attrs["to"])
  if dtype is None:
    raise _OpError(f"casts to ONNX type {node.attrs['to']}, which is not supported")
  x = args[0]
  return (x.astype(dtype) if _is_static(x) else _T(x.data.astype(dtype), x.cl),)


@_op("Clip")
def _clip(node, args, opset):
  if opset < 11:
    lo, hi = node.attrs.get("min"), node.attrs.get("max")
  else:
    lo = _static(node, args, 1, "min")
    hi = _static(node, args, 2, "max")
  lo = None if lo is None else float(np.asarray(lo))
  hi = None if hi is None else float(np.asarray(hi))
  return (_unary(node, lambda x: jnp.clip(x, lo, hi), args[0]),)


@_op("PRelu")
def _prelu(node, args, opset):
  return (_elementwise(None, lambda x, a: jnp.where(x >= 0, x, a * x), args[0], args[1]),)


@_op("BatchNormalization")
def _batch_norm(node, args, opset):
  if len(node.outputs) > 1 and any(node.outputs[1:]):
    raise _OpError("it is in training mode (running statistics are outputs); export the model in eval mode")
  x, scale, bias, mean, var = args[:5]
  eps = node.attrs.get("epsilon", 1e-5)
  per_channel = lambda v: jnp.asarray(_plain(v)).reshape(-1)
  inv = per_channel(scale) / jnp.sqrt(per_channel(var) + eps)
  shift = per_channel(bias) - per_channel(mean) * inv
  if isinstance(x, _T) and x.cl:
    return (_T(x.data * inv + shift, cl=True),)
  data = _plain(x)
  shape = (1, -1) + (1,) * (data.ndim - 2)
  return (_T(data * inv.reshape(shape) + shift.reshape(shape)),)


@_op("Softmax", "LogSoftmax")
def _softmax(node, args, opset):
  x = jnp.asarray(_plain(args[0]))
  fn = jax.nn.softmax if node.op == "Softmax" else jax.nn.log_softmax
  if opset < 13:  # the input is coerced to 2-D at `axis` (default 1) and normalised over the second part
    axis = node.attrs.get("axis", 1) % x.ndim
    shape = x.shape
    return (_T(fn(x.reshape(math.prod(shape[:axis]), -1), axis=-1).reshape(shape)),)
  return (_T(fn(x, axis=node.attrs.get("axis", -1))),)


# Pads and windows. ONNX `pads` are [x1_begin, x2_begin, ..., x1_end, x2_end, ...].


def _window_attrs(node: _Node, in_hw: tuple[int, int], kernel: tuple[int, int]) -> tuple[tuple, tuple, tuple]:
  """(strides, dilations, ((top, bottom), (left, right))) of a Conv or pool, `auto_pad` resolved."""
  strides = tuple(node.attrs.get("strides", (1, 1)))
  dilations = tuple(node.attrs.get("dilations", (1, 1)))
  if len(strides) != 2 or len(kernel) != 2:
    raise _OpError("only 2-D convolutions and pools are supported")
  auto = node.attrs.get("auto_pad", "NOTSET")
  if auto in ("SAME_UPPER", "SAME_LOWER"):
    pads = []
    for size, k, s, d in zip(in_hw, kernel, strides, dilations, strict=True):
      out = -(-size // s)
      total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
      small, large = total // 2, total - total // 2
      pads.append((small, large) if auto == "SAME_UPPER" else (large, small))
  elif auto == "VALID":
    pads = [(0, 0), (0, 0)]
  else:
    p = list(node.attrs.get("pads", (0, 0, 0, 0)))
    pads = [(p[0], p[2]), (p[1], p[3])]
  return strides, dilations, tuple(tuple(int(v) for v in axis) for axis in pads)


def _conv_geometry(node: _Node, x_shape: tuple[int, ...], w_shape_oihw: tuple[int, ...]) -> dict[str, Any]:
  kernel = tuple(node.attrs.get("kernel_shape", w_shape_oihw[2:]))
  strides, dilations, pads = _window_attrs(node, tuple(x_shape[2:]), kernel)
  span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dilations, strict=True))
  return {"kernel": span, "stride": strides, "dilation": dilations, "padding": pads, "pad_value": 0.0}


def _pool_geometry(node: _Node, x_shape: tuple[int, ...]) -> dict[str, Any]:
  kernel = tuple(node.attrs["kernel_shape"])
  strides, dilations, pads = _window_attrs(node, tuple(x_shape[2:]), kernel)
  if any(d != 1 for d in dilations):
    raise _OpError("dilated pooling is not supported")
  extra = []
  for size, k, s, (lo, hi) in zip(x_shape[2:], kernel, strides, pads, strict=True):
    if node.attrs.get("ceil_mode", 0):
      out = -(-(size + lo + hi - k) // s) + 1
      if (out - 1) * s >= size + lo:  # the last window must start inside the input or the leading padding
        out -= 1
      extra.append(max(0, (out - 1) * s + k - (size + lo + hi)))
    else:
      extra.append(0)
  padding = tuple((lo, hi + e) for (lo, hi), e in zip(pads, extra, strict=True))
  max_pool = node.op == "MaxPool"
  # An average that leaves padding out of its divisor depends on where the window is, not just on what it
  # reads: it has no sliding-window form on a pre-padded input.
  counted = (
    max_pool
    or (node.attrs.get("count_include_pad", 0) and not any(extra))
    or not any(v for axis in padding for v in axis)
  )
  return {
    "kernel": kernel,
    "stride": strides,
    "padding": padding,
    "explicit": pads,
    "pad_value": -np.inf if max_pool else 0.0,
    "geometric": bool(counted),
  }


def _pad_hw(x: jax.Array, padding, value: float) -> jax.Array:
  if not any(v for axis in padding for v in axis):
    return x
  return jnp.pad(x, ((0, 0), *padding, (0, 0)), constant_values=value)


def _conv_valid(node: _Node, geo: dict[str, Any], x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
  """The Conv on channels-last input already padded: `x[B, H, W, C]`, `w` HWIO."""
  groups = int(node.attrs.get("group", 1))
  stride = geo["stride"]
  if geo["dilation"] == (1, 1) and stride[0] == stride[1]:
    return incremental.conv_valid(x, w, b, stride=stride[0], groups=groups)
  y = lax.conv_general_dilated(
    x,
    w,
    stride,
    "VALID",
    rhs_dilation=geo["dilation"],
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=groups,
  )
  return y if b is None else y + b


def _kernel_hwio(graph: OnnxGraph, node: _Node, w: Any) -> jax.Array:
  if node.inputs[1] in graph.hwio:
    return w.data if isinstance(w, _T) else jnp.asarray(w)
  return jnp.transpose(jnp.asarray(_plain(w)), (2, 3, 1, 0))


def _kernel_oihw_shape(graph: OnnxGraph, node: _Node, w: Any) -> tuple[int, ...]:
  """A Conv's kernel shape in ONNX's OIHW order (`w` a value, a param or a static; params are stored HWIO)."""
  s = tuple((w.data if isinstance(w, _T) else w).shape)
  return (s[3], s[2], s[0], s[1]) if node.inputs[1] in graph.hwio else s


def _pool_valid(node: _Node, geo: dict[str, Any], x: jax.Array) -> jax.Array:
  k, s = geo["kernel"], geo["stride"]
  if node.op == "MaxPool":
    if k[0] == k[1] and s[0] == s[1]:
      return incremental.max_pool_valid(x, k[0], s[0])
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, *k, 1), (1, *s, 1), "VALID")
  total = lax.reduce_window(x, 0.0, lax.add, (1, *k, 1), (1, *s, 1), "VALID")
  return total / (k[0] * k[1])


@_op("Conv")
def _conv(node, args, opset, graph):
  x, w = args[0], args[1]
  b = None if len(args) < 3 or args[2] is None else jnp.asarray(_plain(args[2]))
  geo = _conv_geometry(node, _shape(x) if not isinstance(x, _T) else x.shape, _kernel_oihw_shape(graph, node, w))
  data = _pad_hw(_to_cl(x), geo["padding"], 0.0)
  return (_T(_conv_valid(node, geo, data, _kernel_hwio(graph, node, w), b), cl=True),)


@_op("MaxPool", "AveragePool")
def _pool(node, args, opset):
  if len(node.outputs) > 1 and node.outputs[1]:
    raise _OpError("its Indices output is used, which is not supported")
  x = args[0]
  geo = _pool_geometry(node, x.shape)
  data = _to_cl(x)
  if geo["geometric"]:
    return (_T(_pool_valid(node, geo, _pad_hw(data, geo["padding"], geo["pad_value"])), cl=True),)
  # Average with padding left out of the divisor: the sum over the zero-padded map over the count of real
  # pixels under each window (explicit padding counted where count_include_pad says so).
  k, s = geo["kernel"], geo["stride"]
  total = lax.reduce_window(_pad_hw(data, geo["padding"], 0.0), 0.0, lax.add, (1, *k, 1), (1, *s, 1), "VALID")
  ones = jnp.ones((1, *data.shape[1:3], 1), data.dtype)
  if node.attrs.get("count_include_pad", 0):
    ones = _pad_hw(ones, geo["explicit"], 1.0)
    extra = tuple((0, p[1] - e[1]) for p, e in zip(geo["padding"], geo["explicit"], strict=True))
    ones = _pad_hw(ones, extra, 0.0)
  else:
    ones = _pad_hw(ones, geo["padding"], 0.0)
  count = lax.reduce_window(ones, 0.0, lax.add, (1, *k, 1), (1, *s, 1), "VALID")
  return (_T(total / count, cl=True),)


@_op("GlobalAveragePool", "GlobalMaxPool")
def _global_pool(node, args, opset):
  x = args[0]
  reduce = jnp.mean if node.op == "GlobalAveragePool" else jnp.max
  if isinstance(x, _T) and x.cl:
    return (_T(reduce(x.data, axis=(1, 2), keepdims=True), cl=True),)
  data = _plain(x)
  return (_T(reduce(data, axis=tuple(range(2, data.ndim)), keepdims=True)),)


def _pad_widths(node: _Node, args: Sequence[Any], opset: int, ndim: int) -> tuple[list[tuple[int, int]], float, str]:
  if opset < 11:
    pads, value = node.attrs["pads"], node.attrs.get("value", 0.0)
  else:
    pads = _ints(_static(node, args, 1, "pads"))
    value = _static(node, args, 2, "constant_value")
    value = 0.0 if value is None else float(np.asarray(value).reshape(()))
  pads = list(pads)
  axes = list(range(ndim))
  if opset >= 18 and len(args) > 3 and args[3] is not None:
    axes = [a % ndim for a in _ints(_static(node, args, 3, "axes"))]
  widths = [(0, 0)] * ndim
  n = len(axes)
  for j, a in enumerate(axes):
    widths[a] = (int(pads[j]), int(pads[j + n]))
  return widths, value, node.attrs.get("mode", "constant")


def _pad_array(x: Any, widths: Sequence[tuple[int, int]], value: float, mode: str) -> Any:
  xp = np if _is_static(x) else jnp
  crop = tuple(slice(max(0, -lo), x.shape[i] - max(0, -hi)) for i, (lo, hi) in enumerate(widths))
  x = x[crop]
  widths = [(max(0, lo), max(0, hi)) for lo, hi in widths]
  if mode == "constant":
    return xp.pad(x, widths, constant_values=value)
  if mode in ("reflect", "edge"):
    return xp.pad(x, widths, mode=mode)
  raise _OpError(f"pad mode {mode!r} is not supported")


@_op("Pad")
def _pad(node, args, opset):
  x = args[0]
  widths, value, mode = _pad_widths(node, args, opset, len(_shape(x) if not isinstance(x, _T) else x.shape))
  if _is_static(x):
    return (_pad_array(x, widths, value, mode),)
  if x.cl:
    n, c, h, w = widths
    return (_T(_pad_array(x.data, [n, h, w, c], value, mode), cl=True),)
  return (_T(_pad_array(x.data, widths, value, mode)),)


def _pad_geometry(node: _Node, args: Sequence[Any], opset: int) -> dict[str, Any] | None:
  """A Pad of a 4-D map as a window op (kernel 1): constant, non-negative, not along the batch."""
  widths, value, mode = _pad_widths(node, args, opset, 4)
  if mode != "constant" or any(v < 0 for w in widths for v in w) or widths[0] != (0, 0):
    return None
  return {
    "kernel": (1, 1),
    "stride": (1, 1),
    "padding": (widths[2], widths[3]),
    "pad_value": value,
    "channels": widths[1],
  }


@_op("Flatten")
def _flatten(node, args, opset):
  x = _plain(args[0])
  axis = node.attrs.get("axis", 1) % max(x.ndim, 1)
  shape = (math.prod(x.shape[:axis]), -1)
  return (x.reshape(shape) if _is_static(x) else _T(x.reshape(shape)),)


@_op("Reshape")
def _reshape(node, args, opset):
  x = _plain(args[0])
  target = _ints(_static(node, args, 1, "shape"))
  if not node.attrs.get("allowzero", 0):
    target = [x.shape[i] if t == 0 else t for i, t in enumerate(target)]
  return (x.reshape(target) if _is_static(x) else _T(x.reshape(target)),)


@_op("Transpose")
def _transpose(node, args, opset):
  x = args[0]
  ndim = len(x.shape)
  perm = tuple(node.attrs.get("perm", tuple(reversed(range(ndim)))))
  if isinstance(x, _T) and ndim == 4:
    if not x.cl and perm == (0, 3, 1, 2):  # NHWC data seen as NCHW: the same storage
      return (_T(x.data, cl=True),)
    if x.cl and perm == (0, 2, 3, 1):
      return (_T(x.data),)
  data = _plain(x)
  return (data.transpose(perm) if _is_static(data) else _T(data.transpose(perm)),)


def _axes(node: _Node, args: Sequence[Any], opset: int, since: int) -> list[int] | None:
  if opset >= since:
    axes = _static(node, args, 1, "axes")
    return None if axes is None else _ints(axes)
  axes = node.attrs.get("axes")
  return None if axes is None else list(axes)


@_op("Squeeze")
def _squeeze(node, args, opset):
  x = _plain(args[0])
  axes = _axes(node, args, opset, 13)
  axes = tuple(i for i, s in enumerate(x.shape) if s == 1) if axes is None else tuple(a % x.ndim for a in axes)
  xp = _xp(x)
  out = xp.squeeze(x, axis=axes)
  return (out if _is_static(x) else _T(out),)


@_op("Unsqueeze")
def _unsqueeze(node, args, opset):
  x = _plain(args[0])
  axes = sorted(a % (x.ndim + len(_axes(node, args, opset, 13))) for a in _axes(node, args, opset, 13))
  out = x
  for a in axes:
    out = (np if _is_static(x) else jnp).expand_dims(out, a)
  return (out if _is_static(x) else _T(out),)


@_op("Concat")
def _concat(node, args, opset):
  axis = node.attrs["axis"]
  if all(_is_static(a) for a in args):
    return (np.concatenate(args, axis=axis),)
  if all(isinstance(a, _T) and a.cl for a in args):
    return (_T(jnp.concatenate([a.data for a in args], axis=(0, 3, 1, 2)[axis % 4]), cl=True),)
  return (_T(jnp.concatenate([jnp.asarray(_plain(a)) for a in args], axis=axis)),)


@_op("Gemm")
def _gemm(node, args, opset):
  a, b = (jnp.asarray(_plain(v)) for v in args[:2])
  if node.attrs.get("transA", 0):
    a = a.T
  if node.attrs.get("transB", 0):
    b = b.T
  y = node.attrs.get("alpha", 1.0) * (a @ b)
  if len(args) > 2 and args[2] is not None:
    y = y + node.attrs.get("beta", 1.0) * jnp.asarray(_plain(args[2]))
  return (_T(y),)


@_op("MatMul")
def _matmul(node, args, opset):
  if all(_is_static(a) for a in args):
    return (np.matmul(*args),)
  return (_T(jnp.matmul(jnp.asarray(_plain(args[0])), jnp.asarray(_plain(args[1])))),)


@_op("Shape")
def _shape_op(node, args, opset):
  shape = np.asarray(args[0].shape, np.int64)
  start, end = node.attrs.get("start", 0), node.attrs.get("end")
  return (shape[start:end],)


@_op("Size")
def _size(node, args, opset):
  return (np.asarray(math.prod(args[0].shape), np.int64),)


@_op("Constant")
def _constant(node, args, opset):
  attrs = node.attrs
  for key, dtype in (
    ("value", None),
    ("value_float", np.float32),
    ("value_floats", np.float32),
    ("value_int", np.int64),
    ("value_ints", np.int64),
  ):
    if key in attrs:
      return (np.asarray(attrs[key], dtype=dtype),)
  raise _OpError(f"constant kind {sorted(attrs)} is not supported")


@_op("ConstantOfShape")
def _constant_of_shape(node, args, opset):
  value = node.attrs.get("value", np.zeros(1, np.float32))
  return (np.full(_ints(args[0]), np.asarray(value).reshape(-1)[0], dtype=np.asarray(value).dtype),)


@_op("Gather")
def _gather(node, args, opset):
  x, idx = _plain(args[0]), args[1]
  axis = node.attrs.get("axis", 0)
  if _is_static(x) and _is_static(idx):
    return (np.take(x, idx, axis=axis),)
  return (_T(jnp.take(jnp.asarray(x), jnp.asarray(_plain(idx)), axis=axis)),)


@_op("Slice")
def _slice(node, args, opset):
  x = _plain(args[0])
  if opset < 10:
    starts, ends = node.attrs["starts"], node.attrs["ends"]
    axes, steps = node.attrs.get("axes"), None
  else:
    starts, ends = _ints(_static(node, args, 1, "starts")), _ints(_static(node, args, 2, "ends"))
    axes = _static(node, args, 3, "axes")
    axes = None if axes is None else _ints(axes)
    steps = _static(node, args, 4, "steps")
    steps = None if steps is None else _ints(steps)
  axes = list(range(len(starts))) if axes is None else axes
  steps = [1] * len(starts) if steps is None else steps
  index = [slice(None)] * x.ndim
  for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
    size = x.shape[a]
    index[a] = slice(max(-size - 1, min(size, s)), None if (st < 0 and e < -size) else max(-size - 1, min(size, e)), st)
  out = x[tuple(index)]
  return (out if _is_static(x) else _T(out),)


@_op("Split")
def _split(node, args, opset):
  x = _plain(args[0])
  axis = node.attrs.get("axis", 0) % x.ndim
  sizes = node.attrs.get("split") if opset < 13 else (None if len(args) < 2 or args[1] is None else _ints(args[1]))
  n = len(node.outputs)
  if sizes is None:
    size = -(-x.shape[axis] // n)
    sizes = [size] * (n - 1) + [x.shape[axis] - size * (n - 1)]
  cuts = np.cumsum(sizes)[:-1]
  xp = _xp(x)
  parts = xp.split(x, cuts, axis=axis)
  return tuple(p if _is_static(x) else _T(p) for p in parts)


@_op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(node, args, opset):
  x = _plain(args[0])
  since = 13 if node.op == "ReduceSum" else 18
  axes = _axes(node, args, opset, since)
  if axes is None:
    if node.attrs.get("noop_with_empty_axes", 0):
      return (args[0],)
    axes = list(range(x.ndim))
  xp = _xp(x)
  fn = {"ReduceMean": xp.mean, "ReduceSum": xp.sum, "ReduceMax": xp.max, "ReduceMin": xp.min}[node.op]
  out = fn(x, axis=tuple(a % x.ndim for a in axes), keepdims=bool(node.attrs.get("keepdims", 1)))
  return (out if _is_static(x) else _T(out),)


@_op("Expand")
def _expand(node, args, opset):
  x = _plain(args[0])
  shape = np.broadcast_shapes(tuple(x.shape), tuple(_ints(args[1])))
  return (np.broadcast_to(x, shape).copy() if _is_static(x) else _T(jnp.broadcast_to(x, shape)),)


@_op("Tile")
def _tile(node, args, opset):
  x = _plain(args[0])
  reps = _ints(args[1])
  return (np.tile(x, reps) if _is_static(x) else _T(jnp.tile(x, reps)),)


@_op("Range")
def _range(node, args, opset):
  start, limit, delta = (np.asarray(_static(node, args, i, "bound")).reshape(()) for i in range(3))
  return (np.arange(start, limit, delta),)


def _resize_axis(x: jax.Array, axis: int, out: int, scale: float, node: _Node) -> jax.Array:
  """One spatial axis of Resize / Upsample by index arithmetic (static indices, so it compiles to gathers)."""
  size = x.shape[axis]
  mode = node.attrs.get("mode", "nearest")
  ctm = node.attrs.get("coordinate_transformation_mode", "asymmetric" if node.op == "Upsample" else "half_pixel")
  i = np.arange(out, dtype=np.float64)
  if ctm == "half_pixel":
    src = (i + 0.5) / scale - 0.5
  elif ctm == "pytorch_half_pixel":
    src = (i + 0.5) / scale - 0.5 if out > 1 else np.zeros_like(i)
  elif ctm == "align_corners":
    src = i * (size - 1) / (out - 1) if out > 1 else np.zeros_like(i)
  elif ctm == "asymmetric":
    src = i / scale
  else:
    raise _OpError(f"coordinate_transformation_mode {ctm!r} is not supported")
  if mode == "nearest":
    rounding = node.attrs.get("nearest_mode", "round_prefer_floor") if node.op == "Resize" else "floor"
    if rounding == "floor":
      idx = np.floor(src)
    elif rounding == "ceil":
      idx = np.ceil(src)
    elif rounding == "round_prefer_ceil":
      idx = np.floor(src + 0.5)
    else:
      idx = np.ceil(src - 0.5)
    return jnp.take(x, np.clip(idx, 0, size - 1).astype(np.int32), axis=axis)
  if mode == "linear":
    src = np.clip(src, 0, size - 1)
    lo = np.floor(src).astype(np.int32)
    hi = np.minimum(lo + 1, size - 1)
    shape = [1] * x.ndim
    shape[axis] = out
    w = jnp.asarray((src - lo).reshape(shape), x.dtype)
    return jnp.take(x, lo, axis=axis) * (1 - w) + jnp.take(x, hi, axis=axis) * w
  raise _OpError(f"resize mode {mode!r} is not supported (nearest, linear)")


@_op("Resize", "Upsample")
def _resize(node, args, opset):
  x = args[0]
  shape = x.shape
  if node.op == "Upsample" or opset == 10:
    scales = _static(node, args, 1, "scales")
    sizes = None
  else:
    scales, sizes = _static(node, args, 2, "scales"), _static(node, args, 3, "sizes")
    scales = None if scales is None or scales.size == 0 else scales
  axes = [a % len(shape) for a in node.attrs.get("axes", range(len(shape)))]  # opset 18 on
  given = np.ones(len(shape), np.float64)
  if sizes is not None and sizes.size:
    given[axes] = np.asarray(_ints(sizes), np.float64) / np.asarray([shape[a] for a in axes], np.float64)
    scales = given
    sizes = [
      shape[a] if a not in axes else _ints(_static(node, args, 3, "sizes"))[axes.index(a)] for a in range(len(shape))
    ]
  else:
    given[axes] = np.asarray(scales, np.float64).reshape(-1)
    scales = given
    sizes = [math.floor(s * f) for s, f in zip(shape, scales, strict=True)]
  if len(shape) != 4 or scales[0] != 1 or scales[1] != 1:
    raise _OpError(f"resizes axes other than height and width (scales {list(scales)})")
  data = _to_cl(x)
  for axis, a in ((1, 2), (2, 3)):
    if sizes[a] != shape[a]:
      data = _resize_axis(data, axis, sizes[a], float(scales[a]), node)
  return (_T(data, cl=True),)


SUPPORTED_OPS = frozenset(_OPS)


# ----------------------------------------------------------------------------------------------------------
# Running the graph.


class _Abstract(NamedTuple):
  """A value the graph computed elsewhere, of which only the shape is known here (for `Shape` nodes)."""

  shape: tuple[int, ...]


def _run(
  graph: OnnxGraph,
  params: dict[str, Any],
  env: dict[str, Any],
  start: int = 0,
  stop: int | None = None,
  *,
  indices: Sequence[int] | None = None,
) -> dict[str, Any]:
  """Evaluates nodes `start:stop` (or `indices`) on `env` (values by name), returning `env` with their outputs."""
  env = dict(env)
  for index in range(start, len(graph.nodes) if stop is None else stop) if indices is None else indices:
    node = graph.nodes[index]
    args = []
    for name in node.inputs:
      if not name:
        args.append(None)
      elif name in env:
        value = env[name]
        if isinstance(value, _Abstract) and node.op not in ("Shape", "Size"):
          raise ValueError(f"{graph.path}: node {node.name!r} ({node.op}) reads {name!r} outside its layer")
        args.append(value)
      elif name in params:
        args.append(_T(jnp.asarray(params[name])))
      elif name in graph.statics:
        args.append(graph.statics[name])
      else:
        raise ValueError(f"{graph.path}: node {node.name!r} ({node.op}) reads {name!r}, which nothing produces")
    try:
      fn = _OPS[node.op]
      outs = fn(node, args, graph.opset, graph) if node.op == "Conv" else fn(node, args, graph.opset)
    except _OpError as e:
      raise ValueError(f"{graph.path}: {node.op} node {node.name!r} (opset {graph.opset}): {e}") from None
    for name, value in zip(node.outputs, outs, strict=False):
      if name:
        env[name] = np.asarray(value) if isinstance(value, np.generic) else value
  return env


def _input_value(x: jax.Array, layout: str) -> _T:
  """The `FaceModel`'s NHWC input as the graph's input value."""
  return _T(x, cl=layout == "NCHW")


# ----------------------------------------------------------------------------------------------------------
# The layer graph for incremental occlusion.

# Operators after which the rest of the network is a head that needs the whole map.
_HEAD_OPS = frozenset(
  {"GlobalAveragePool", "GlobalMaxPool", "Flatten", "Reshape", "Gemm", "MatMul", "Transpose", "Squeeze"}
  | {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin"}
)
_POINTWISE_OPS = frozenset(
  set(_UNARY)
  | {"Dropout", "Cast", "Clip", "PRelu", "BatchNormalization"}
  | set(_BINARY)
  | {"Sum", "Max", "Min", "Mean"}
)


@dataclasses.dataclass
class _Spec:
  """A layer-graph node being built: its kind, its input node ids, the ONNX nodes it runs in order, and the
  ONNX name of the map it reads."""

  kind: str  # "input", "spatial", "pointwise", "add", "full"
  inputs: tuple[int, ...]
  onnx: list[int]
  reads: str = ""
  geometry: dict[str, Any] | None = None


def _dynamic_names(graph: OnnxGraph) -> set[str]:
  """Values that depend on the image (shape queries do not)."""
  dynamic = {graph.input_name}
  for node in graph.nodes:
    if node.op not in ("Shape", "Size") and any(name in dynamic for name in node.inputs):
      dynamic.update(name for name in node.outputs if name)
  return dynamic


def _fold_constants(graph: OnnxGraph) -> OnnxGraph:
  """The graph with every value computed from constants alone (not from shapes) added to its statics."""
  folded = dataclasses.replace(graph, statics=dict(graph.statics))  # its statics grow as nodes fold
  for i, node in enumerate(graph.nodes):
    if node.op in ("Shape", "Size") or not all(not name or name in folded.statics for name in node.inputs):
      continue
    env = _run(folded, {}, {}, indices=[i])
    folded.statics.update({name: v for name, v in env.items() if _is_static(v)})
  return folded


def _trace_values(
  graph: OnnxGraph, layout: str, input_shape: tuple[int, int, int], batch: int = 1
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Every computed value's (shape, channels-last) on a batch of `batch` images, and the static values the
  shape arithmetic computed, evaluated abstractly (nothing is computed on the device)."""
  recorded: dict[str, Any] = {}
  statics: dict[str, np.ndarray] = {}

  def forward(params, x):
    env = _run(graph, params, {graph.input_name: _input_value(x, layout)})
    for name, v in env.items():
      recorded[name] = (tuple(v.shape), isinstance(v, _T) and v.cl)
      if _is_static(v) and name not in graph.statics:
        statics[name] = np.asarray(v)
    return 0.0

  jax.eval_shape(forward, graph.params, jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32))
  return recorded, statics


def _fold_shapes(graph: OnnxGraph, layout: str, input_shape: tuple[int, int, int]) -> tuple[OnnxGraph, dict[str, Any]]:
  """The graph with the shape arithmetic that does not depend on the batch size folded into its statics (a
  TensorFlow-style "same" pool's pads, computed from `Shape(x)[2:]`): what is equal for batches of 1 and 2.
  Also returns every value's (shape, channels-last) for a batch of 1 (`_trace_values`; folding changes none)."""
  values, one = _trace_values(graph, layout, input_shape, 1)
  _, two = _trace_values(graph, layout, input_shape, 2)
  same = {
    name: v for name, v in one.items() if name in two and v.shape == two[name].shape and np.array_equal(v, two[name])
  }
  return dataclasses.replace(graph, statics={**graph.statics, **same}), values


def _value_shape(graph: OnnxGraph, values: dict[str, Any], name: str) -> tuple[int, ...]:
  if name in values:
    return values[name][0]
  if name in graph.params:
    return tuple(graph.params[name].shape)
  return tuple(np.shape(graph.statics.get(name, ())))


def _constant_over_space(shape: tuple[int, ...]) -> bool:
  """Whether an operand of this shape, broadcast against an NCHW map, is the same at every pixel."""
  if len(shape) > 4:
    return False
  shape = (1,) * (4 - len(shape)) + tuple(shape)
  return shape[0] == 1 and shape[2] == 1 and shape[3] == 1


def _layer_graph(
  graph: OnnxGraph, values: dict[str, Any], output: str, log_output: bool = False
) -> tuple[incremental.LayerGraph | None, str]:
  """The network as an `incremental.LayerGraph`, or None and the reason (the operator without geometry).

  `values`: every computed value's (shape, channels-last) on a batch of 1 (`_fold_shapes`)."""
  dynamic = _dynamic_names(graph)
  consumers: dict[str, int] = {}
  for node in graph.nodes:
    for name in set(node.inputs):
      if name in dynamic:
        consumers[name] = consumers.get(name, 0) + 1
  specs: list[_Spec] = [_Spec("input", (), [], graph.input_name)]
  where = {graph.input_name: 0}  # ONNX value -> spec id
  for k, node in enumerate(graph.nodes):
    dyn_in = [name for name in node.inputs if name in dynamic]
    if not dyn_in or node.op in ("Shape", "Size") or all(name in graph.statics for name in node.outputs if name):
      continue  # shape arithmetic: folded, or evaluated where it is read
    if node.op == "Transpose" and tuple(node.attrs.get("perm", ())) == (0, 3, 1, 2) and not values[dyn_in[0]][1]:
      where[node.outputs[0]] = where[dyn_in[0]]  # NHWC seen as NCHW: the same storage, nothing to compute
      continue
    is_map = all(values[name][1] for name in dyn_in)
    kind, geometry = None, None
    if node.op in _HEAD_OPS or not is_map:
      live = {name for name in where if name == output or any(name in n.inputs for n in graph.nodes[k:])}
      if live != {dyn_in[0]} or len(set(dyn_in)) != 1:
        return None, f"the head from {node.op} (node {node.name!r}) reads {len(live)} maps"
      if not values[dyn_in[0]][1]:
        return None, f"{node.op} (node {node.name!r}) reads a map that is not an NCHW image map"
      specs.append(_Spec("full", (where[dyn_in[0]],), list(range(k, len(graph.nodes))), dyn_in[0]))
      return _build_layer_graph(graph, specs, output, values, dynamic, log_output), ""
    kernel = graph.params.get(node.inputs[1], graph.statics.get(node.inputs[1])) if node.op == "Conv" else None
    if node.op == "Conv" and dyn_in == [node.inputs[0]] and kernel is not None:
      w_shape = _kernel_oihw_shape(graph, node, kernel)
      kind, geometry = "spatial", _conv_geometry(node, values[node.inputs[0]][0], w_shape)
    elif node.op in ("MaxPool", "AveragePool"):
      geometry = _pool_geometry(node, values[node.inputs[0]][0])
      kind = "spatial" if geometry["geometric"] else None
    elif node.op == "Pad" and dyn_in == [node.inputs[0]]:
      try:
        geometry = _pad_geometry(node, [graph.statics.get(n) if n else None for n in node.inputs], graph.opset)
      except _OpError:
        geometry = None
      kind = "spatial" if geometry else None
    elif node.op in ("Add", "Sum") and len(dyn_in) >= 2 and len(set(dyn_in)) == len(dyn_in) == len(node.inputs):
      kind = "add" if len({values[name][0] for name in dyn_in}) == 1 else None
    elif node.op in _POINTWISE_OPS and len(dyn_in) == 1:
      # Per pixel when every other operand is the same at every pixel (scalars, per-channel values).
      others = [n for n in node.inputs if n and n not in dynamic]
      per_pixel = node.op == "BatchNormalization" or all(
        _constant_over_space(_value_shape(graph, values, n)) for n in others
      )
      kind = "pointwise" if per_pixel else None
    if kind is None:
      return None, f"operator {node.op} (node {node.name!r}) has no window geometry"
    ids = tuple(where[name] for name in dyn_in)
    if kind == "pointwise":
      src = specs[ids[0]]
      if src.kind in ("spatial", "pointwise") and consumers.get(dyn_in[0], 0) == 1 and dyn_in[0] != output:
        src.onnx.append(k)  # fused into the node that made its input
        where[node.outputs[0]] = ids[0]
        continue
    specs.append(_Spec(kind, ids, [k], dyn_in[0], geometry))
    where[node.outputs[0]] = len(specs) - 1
  return None, "the network has no head (a global pool, flatten or dense layer) to end its layer graph"


def _node_fn(graph: OnnxGraph, onnx_ids: Sequence[int], reads: str, spatial: dict[str, Any] | None):
  """The fn of a layer-graph node running ONNX nodes `onnx_ids` on its one map input (`bound` is the params)."""

  def fn(bound: dict[str, Any], x: jax.Array) -> jax.Array:
    first = graph.nodes[onnx_ids[0]]
    if spatial is None:
      env = {reads: _T(x, cl=True)}
      rest = onnx_ids
    else:  # x is already padded: the op's VALID form
      if first.op == "Conv":
        w = _T(jnp.asarray(bound[first.inputs[1]] if first.inputs[1] in bound else graph.statics[first.inputs[1]]))
        b = None
        if len(first.inputs) > 2 and first.inputs[2]:
          b = jnp.asarray(bound[first.inputs[2]] if first.inputs[2] in bound else graph.statics[first.inputs[2]])
        y = _conv_valid(first, spatial, x, _kernel_hwio(graph, first, w), b)
      elif first.op == "Pad":
        c = spatial["channels"]
        y = jnp.pad(x, ((0, 0), (0, 0), (0, 0), c), constant_values=spatial["pad_value"]) if any(c) else x
      else:
        y = _pool_valid(first, spatial, x)
      env = {first.outputs[0]: _T(y, cl=True)}
      rest = onnx_ids[1:]
    env = _run(graph, bound, env, indices=rest)
    return env[graph.nodes[onnx_ids[-1]].outputs[0]].data

  return fn


def _weight_nodes(graph: OnnxGraph) -> tuple[int, ...]:
  """Nodes computed from the weights alone (an exporter's `Identity` of a weight shared by two layers, a
  transposed kernel). They may sit anywhere in the graph, so the layer graph's `bind` computes them once per
  call (`_bind`), before any layer reads them."""
  known = set(graph.params) | set(graph.statics)
  out = []
  for i, node in enumerate(graph.nodes):
    if node.op in ("Shape", "Size") or all(name in graph.statics for name in node.outputs if name):
      continue
    if all(not name or name in known for name in node.inputs):
      out.append(i)
      known.update(name for name in node.outputs if name)
  return tuple(out)


def _bind(graph: OnnxGraph, weight_nodes: Sequence[int], params: dict[str, Any]) -> dict[str, Any]:
  """The params with the weight nodes' outputs added: what every layer-graph fn receives as `bound`."""
  if not weight_nodes:
    return params
  env = _run(graph, params, {}, indices=weight_nodes)
  return {**params, **{name: v.plain for name, v in env.items() if isinstance(v, _T)}}


def _as_logits(y: jax.Array, log_output: bool) -> jax.Array:
  """A probability output as logits: log p differs from the logits by a constant per row, which every
  softmax-based score ignores (used only where the graph does not end in a Softmax to strip)."""
  return jnp.log(jnp.maximum(y, jnp.finfo(y.dtype).tiny)) if log_output else y


def _tail_fn(
  graph: OnnxGraph,
  start: int,
  reads: str,
  output: str,
  values: dict[str, Any],
  dynamic: set[str],
  log_output: bool,
  weight_nodes: Sequence[int],
):
  """The `Full` node: every ONNX node from `start` on, plus the earlier shape arithmetic they read (the weight
  nodes' outputs come bound)."""
  before = [
    i
    for i, node in enumerate(graph.nodes[:start])
    if i not in weight_nodes and not any(name in dynamic for name in node.outputs if name)
  ]
  known = [name for name in values if name in dynamic and name != reads]

  def fn(bound: dict[str, Any], x: jax.Array) -> jax.Array:
    env = {name: _Abstract((x.shape[0], *values[name][0][1:])) for name in known}
    env[reads] = _T(x, cl=True)
    env = _run(graph, bound, env, indices=[*before, *range(start, len(graph.nodes))])
    return _as_logits(jnp.asarray(_plain(env[output])), log_output)

  return fn


def _build_layer_graph(
  graph: OnnxGraph, specs: list[_Spec], output: str, values: dict[str, Any], dynamic: set[str], log_output: bool
) -> incremental.LayerGraph:
  weight_nodes = _weight_nodes(graph)
  g = incremental.GraphBuilder()
  ids = [g.input]
  for spec in specs[1:]:
    inputs = tuple(ids[i] for i in spec.inputs)
    label = graph.nodes[spec.onnx[0]].name
    if spec.kind == "spatial":
      geo = spec.geometry
      fn = _node_fn(graph, spec.onnx, spec.reads, geo)
      node = g.spatial(
        inputs[0],
        fn,
        kernel=geo["kernel"],
        stride=geo["stride"],
        padding=geo["padding"],
        pad_value=geo["pad_value"],
        name=label,
      )
    elif spec.kind == "pointwise":
      node = g.pointwise(inputs[0], _node_fn(graph, spec.onnx, spec.reads, None), name=label)
    elif spec.kind == "add":
      node = g.add(*inputs, name=label)
    else:
      tail = _tail_fn(graph, spec.onnx[0], spec.reads, output, values, dynamic, log_output, weight_nodes)
      node = g.full(inputs[0], tail, name=label)
    ids.append(node)
  return g.build(functools.partial(_bind, graph, weight_nodes))


# ----------------------------------------------------------------------------------------------------------
# The FaceModel.


class _Apply:
  """`apply_fn(params, x[B, H, W, C]) -> [B, K]` of an imported graph, with its layer graph when it has one.

  Hashing and equality are by identity (as a `functools.partial` is), so jit caches per model.
  """

  def __init__(self, graph: OnnxGraph, layout: str, output: str, log_output: bool, layer_graph, reason: str):
    self._graph, self._layout, self._output, self._log = graph, layout, output, log_output
    if layer_graph is not None:
      self.layer_graph = layer_graph
    self.layer_graph_reason = reason
    self.__name__ = pathlib.Path(graph.path).name

  def __call__(self, params: Any, x: jax.typing.ArrayLike) -> jax.Array:
    env = _run(self._graph, params, {self._graph.input_name: _input_value(jnp.asarray(x, jnp.float32), self._layout)})
    return _as_logits(jnp.asarray(_plain(env[self._output])), self._log)


def _strip_softmax(graph: OnnxGraph, output: str) -> str | None:
  """The input of a final Softmax over the classes (the logits), or None."""
  producer = next((n for n in graph.nodes if output in n.outputs), None)
  if producer is None or producer.op != "Softmax":
    return None
  axis = producer.attrs.get("axis", 1 if graph.opset < 13 else -1)
  return producer.inputs[0] if axis in (1, -1) else None


def from_onnx(path: os.PathLike[str] | str, card: ModelCard | os.PathLike[str] | str | None = None) -> FaceModel:
  """An ONNX face network as a `FaceModel`.

  Args:
    path: the `.onnx` file.
    card: its `ModelCard`, or the path of a JSON card; default the JSON card beside the file
      (`model.onnx` -> `model.json`).

  Returns:
    A `FaceModel` whose `apply_fn(params, x[B, H, W, C])` evaluates the graph in JAX with `params` (the float
    initializers, by name) and returns `[B, K]` logits or embeddings; it carries a `layer_graph` for
    incremental occlusion where the network has one, else `apply_fn.layer_graph_reason` says why not.

  Raises:
    ValueError: the file cannot be read or uses an unsupported operator (named with its node and opset); the
      card is invalid or does not match the graph's input (naming the field and both shapes); the chosen
      output is not `[B, K]` (saying what it is) or its size does not match the card's labels.
  """
  path = pathlib.Path(path)
  if card is None:
    card = card_beside(path)
  if not isinstance(card, ModelCard):
    card = load_card(card)
  graph = read_graph(path)
  _check_input(graph, card)
  if card.output_index >= len(graph.output_names):
    raise ValueError(
      f"model card: field 'output_index' is {card.output_index} but {path.name} has "
      f"{len(graph.output_names)} output(s): {list(graph.output_names)}"
    )
  output = graph.output_names[card.output_index]
  log_output = False
  if card.output == "probabilities":
    logits = _strip_softmax(graph, output)
    log_output = logits is None
    output = logits or output
  graph, values = _fold_shapes(_fold_constants(graph), card.layout, card.input_shape)
  layer_graph, reason = _layer_graph(graph, values, output, log_output)
  apply_fn = _Apply(graph, card.layout, output, log_output, layer_graph, reason)
  params = {name: jnp.asarray(value) for name, value in graph.params.items()}
  out = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((2, *card.input_shape), jnp.float32))
  labels = _check_output(path.name, card, out)
  return FaceModel(
    name=card.name or path.stem,
    labels=labels,
    input_shape=card.input_shape,
    apply_fn=apply_fn,
    params=params,
    preprocess_fn=card.preprocess,
    crop=card.crop_spec,
    score=card.score_kind,
    output_values=card.output_values,
    source=card.source or f"{path.name} (ONNX opset {graph.opset})",
    features_fn=functools.partial(_features, layer_graph) if layer_graph is not None else None,
    head_fn=functools.partial(_head, layer_graph) if layer_graph is not None else None,
  )


def _features(layer_graph: incremental.LayerGraph, params: Any, x: jax.typing.ArrayLike) -> jax.Array:
  """The map the head reads (the last map before the first flatten or global pool), `[B, h, w, D]`: what
  Grad-CAM and its kin weigh (`canonsal_jax.attribution`)."""
  acts = layer_graph.activations(params, jnp.asarray(x, jnp.float32))
  return acts[layer_graph.nodes[-1].inputs[0]]


def _head(layer_graph: incremental.LayerGraph, params: Any, features: jax.typing.ArrayLike) -> jax.Array:
  """The network from that map on: `head(params, features(params, x)) == apply_fn(params, x)`."""
  return layer_graph.nodes[-1].op.fn(layer_graph.bind(params), jnp.asarray(features))


def _check_input(graph: OnnxGraph, card: ModelCard) -> None:
  dims = graph.input_dims
  if card.layout == "NCHW":
    expected = (None, card.channels, card.input_size, card.input_size)
    fields = ("", "channels", "input_size", "input_size")
  else:
    expected = (None, card.input_size, card.input_size, card.channels)
    fields = ("", "input_size", "input_size", "channels")
  shown = "[" + ", ".join("N" if d is None else str(d) for d in dims) + "]"
  want = "[" + ", ".join("N" if d is None else str(d) for d in expected) + "]"
  if len(dims) != 4:
    raise ValueError(
      f"model card: field 'layout' is {card.layout} ({want}) but the input {graph.input_name!r} of "
      f"{pathlib.Path(graph.path).name} has shape {shown}"
    )
  for d, e, field in zip(dims, expected, fields, strict=True):
    if d is not None and e is not None and d != e and d > 0:
      raise ValueError(
        f"model card: field {field!r} gives input {want} ({card.layout}) but the input {graph.input_name!r} of "
        f"{pathlib.Path(graph.path).name} has shape {shown}"
      )


def _check_output(file_name: str, card: ModelCard, out: jax.ShapeDtypeStruct) -> tuple[str, ...]:
  if len(out.shape) != 2 or out.shape[0] != 2:
    raise ValueError(
      f"{file_name}: a face model's output must be [B, K]; output {card.output_index} is {list(out.shape)} for a "
      f"batch of 2 (choose another with the card's 'output_index', or end the network in a flatten)"
    )
  k = out.shape[1]
  if card.output == "embedding":
    return tuple(f"dim{i}" for i in range(k))
  if len(card.labels) != k:
    raise ValueError(f"model card: field 'labels' names {len(card.labels)} classes but {file_name} returns {k} outputs")
  return card.labels
