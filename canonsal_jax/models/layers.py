"""Layers shared by the ports of dlib's networks (the age and gender CNNs, the ResNet face descriptor).

Each layer holds the trained arrays it is given; the port decides how its converted weights are named.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from canonsal_jax import incremental

__all__ = [
  "Affine",
  "Conv",
  "add_padded",
  "affine_relu_fn",
  "apply",
  "avg_pool_2x2",
  "avg_pool_2x2_fn",
  "conv_graph",
  "features",
  "head",
  "max_pool_3x3_s2",
  "residual_graph",
  "stem_graph",
]


class Conv(nnx.Module):
  """dlib's `con_`: 2-D cross-correlation with bias, NHWC, symmetric zero padding."""

  def __init__(self, kernel: jax.typing.ArrayLike, bias: jax.typing.ArrayLike, *, stride: int = 1, padding: int = 0):
    self.kernel = nnx.Param(jax.device_put(np.asarray(kernel)))  # [kh, kw, C_in, C_out]
    self.bias = nnx.Param(jax.device_put(np.asarray(bias)))  # [C_out]
    self.stride = stride
    self.padding = padding

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, H, W, C_in]` -> `[B, H', W', C_out]`: zero padding, then `valid` (so the model's forward does the
    arithmetic of its layer graph, and XLA:CPU's faster form of it, see `incremental.conv_valid`)."""
    p = self.padding
    return self.valid(jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x)

  def valid(self, x_padded: jax.Array) -> jax.Array:
    """The same convolution on an input already padded by `padding` (no padding of its own; for
    `canonsal_jax.incremental`): `[B, H + 2p, W + 2p, C_in]` -> `[B, H', W', C_out]`."""
    return incremental.conv_valid(x_padded, self.kernel[...], self.bias[...], stride=self.stride)


class Affine(nnx.Module):
  """dlib's `affine_` (its batch norms at inference): per-channel `x * scale + offset`, kept unfolded."""

  def __init__(self, scale: jax.typing.ArrayLike, offset: jax.typing.ArrayLike):
    self.scale = nnx.Param(jax.device_put(np.asarray(scale)))  # [C]
    self.offset = nnx.Param(jax.device_put(np.asarray(offset)))  # [C]

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[..., C]` -> `[..., C]`."""
    return x * self.scale[...] + self.offset[...]


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  """dlib's `max_pool<3,3,2,2>` (no padding): `[B, H, W, C]` -> `[B, (H-3)//2+1, (W-3)//2+1, C]`.

  `incremental.max_pool_valid`: a max over the nine strided views rather than `reduce_window`, which XLA:CPU
  runs several times slower; the result is the same bit for bit (a max is exact).
  """
  return incremental.max_pool_valid(x, 3, 2)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
  """dlib's `avg_pool<2,2,2,2>` (no padding; a trailing odd row or column is dropped): `[B, H, W, C]`."""
  h, w = x.shape[1] // 2, x.shape[2] // 2
  x = x[:, : 2 * h, : 2 * w]
  return x.reshape(x.shape[0], h, 2, w, 2, x.shape[3]).mean(axis=(2, 4))


def add_padded(a: jax.Array, b: jax.Array) -> jax.Array:
  """dlib's `add_prev`: zero-pads the trailing rows, columns and channels of each to the larger shape, then adds.

  Args:
    a: `[B, H_a, W_a, C_a]`.
    b: `[B, H_b, W_b, C_b]`.

  Returns:
    `[B, max(H_a, H_b), max(W_a, W_b), max(C_a, C_b)]`, the top-left origin of both preserved.
  """
  shape = tuple(max(s, t) for s, t in zip(a.shape, b.shape, strict=True))

  def pad(x: jax.Array) -> jax.Array:
    if x.shape == shape:
      return x
    return jnp.pad(x, [(0, n - s) for s, n in zip(x.shape, shape, strict=True)])

  return pad(a) + pad(b)


def apply(graphdef: nnx.GraphDef, params: nnx.State, x: jax.typing.ArrayLike) -> jax.Array:
  """The module's forward pass with the weights `params` (bind `graphdef` with `functools.partial`)."""
  return nnx.merge(graphdef, params)(jnp.asarray(x, jnp.float32))


def features(graphdef: nnx.GraphDef, params: nnx.State, x: jax.typing.ArrayLike) -> jax.Array:
  """The module's last convolutional feature map `[B, h, w, D]` (its `features` method)."""
  return nnx.merge(graphdef, params).features(jnp.asarray(x, jnp.float32))


def head(graphdef: nnx.GraphDef, params: nnx.State, feature_map: jax.typing.ArrayLike) -> jax.Array:
  """The module's outputs from its feature map (its `head` method)."""
  return nnx.merge(graphdef, params).head(jnp.asarray(feature_map, jnp.float32))


# ----------------------------------------------------------------------------------------------------------
# Layer graphs (`canonsal_jax.incremental`) of the dlib ports, in terms of the modules above.


def _affine_relu(path: str, bound: nnx.Module, x: jax.Array) -> jax.Array:
  return jax.nn.relu(incremental.call(path)(bound, x))


def _max_pool(bound: nnx.Module, x: jax.Array) -> jax.Array:
  del bound
  return max_pool_3x3_s2(x)


def avg_pool_2x2_fn(bound: nnx.Module, x: jax.Array) -> jax.Array:
  """`avg_pool_2x2` as a graph node fn (it has no weights)."""
  del bound
  return avg_pool_2x2(x)


def affine_relu_fn(path: str) -> incremental.NodeFn:
  """A graph node fn: `relu(bound.<path>(x))`, an `Affine` and a ReLU."""
  return functools.partial(_affine_relu, path)


def _relu(bound: nnx.Module, x: jax.Array) -> jax.Array:
  del bound
  return jax.nn.relu(x)


def conv_graph(g: incremental.GraphBuilder, x: int, path: str, conv: Conv) -> int:
  """A `Conv` at `path` (in the bound module) as a `Spatial` node reading node `x`."""
  k = conv.kernel.shape[0]
  return g.spatial(x, incremental.call(path, "valid"), kernel=k, stride=conv.stride, padding=conv.padding, name=path)


def stem_graph(g: incremental.GraphBuilder, x: int, net: nnx.Module, conv: str, affine: str) -> int:
  """dlib's stem `max_pool<3,3,2,2>(relu(affine(con(x))))` as graph nodes."""
  x = conv_graph(g, x, conv, incremental.resolve(net, conv))
  x = g.pointwise(x, affine_relu_fn(affine), name=affine)
  return g.spatial(x, _max_pool, kernel=3, stride=2, padding=0, name="max_pool")


def residual_graph(g: incremental.GraphBuilder, x: int, net: nnx.Module, path: str) -> int:
  """dlib's `residual` / `residual_down` block at `path` (with conv1, affine1, conv2, affine2, downsample) as
  graph nodes: `relu(shortcut(x) ⊕ affine2(conv2(relu(affine1(conv1(x))))))`, `⊕` being `add_padded`."""
  block = incremental.resolve(net, path)
  y = conv_graph(g, x, f"{path}.conv1", block.conv1)
  y = g.pointwise(y, affine_relu_fn(f"{path}.affine1"), name=f"{path}.affine1")
  y = conv_graph(g, y, f"{path}.conv2", block.conv2)
  y = g.pointwise(y, incremental.call(f"{path}.affine2"), name=f"{path}.affine2")
  shortcut = g.spatial(x, avg_pool_2x2_fn, kernel=2, stride=2, name=f"{path}.pool") if block.downsample else x
  return g.pointwise(g.add(shortcut, y, pad_to_larger=True, name=f"{path}.add"), _relu, name=f"{path}.relu")
