"""A VGG-16-sized network in Flax NNX, with random weights, for timing occlusion at the paper's model size.

The paper explains VGG-16 face models at 224x224 (VGG-Face); its weights are not ours to ship, and timing
does not need them. This is VGG-16's configuration "D" (Simonyan and Zisserman 2015): 13 3x3 "same" convs
with ReLU in five stages of 64, 128, 256, 512, 512 channels, each stage ending in a 2x2 max pool, then fully
connected layers of 4096, 4096 and `num_classes` (138 M weights at 1000 classes, about 15.5 GFLOP per image).
Weights are He-normal so activations keep their scale through the depth; biases are small and random so that
the parity tests exercise them. Inference only: no dropout.

Example:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> net = VGG16(num_classes=10, widths=(4, 4, 4, 4, 4), hidden=8, rngs=nnx.Rngs(0))
  >>> net(jnp.zeros((1, 224, 224, 3))).shape
  (1, 10)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from canonsal_jax import incremental
from canonsal_jax.models.base import CropSpec, FaceModel

__all__ = ["HIDDEN", "INPUT_SIZE", "STAGES", "VGG16", "WIDTHS", "apply", "layer_graph", "load_vgg16", "make_vgg16"]

INPUT_SIZE = 224  # VGG-16's (and VGG-Face's) input side
# Convs per stage and their widths, VGG configuration "D".
STAGES = (2, 2, 3, 3, 3)
WIDTHS = (64, 128, 256, 512, 512)
HIDDEN = 4096
# Scale of the random biases; small next to the He-normal pre-activations (std ~1).
_BIAS_STD = 0.01


class VGG16(nnx.Module):
  """VGG-16 (configuration D) on NHWC input: `[B, 224, 224, C]` -> logits `[B, num_classes]`."""

  def __init__(
    self,
    *,
    in_features: int = 3,
    num_classes: int = 1000,
    widths: tuple[int, ...] = WIDTHS,
    hidden: int = HIDDEN,
    rngs: nnx.Rngs,
  ):
    kernel_init = nnx.initializers.he_normal()
    bias_init = nnx.initializers.normal(_BIAS_STD)
    convs, c_in = [], in_features
    for n, width in zip(STAGES, widths, strict=True):
      for _ in range(n):
        convs.append(
          nnx.Conv(c_in, width, (3, 3), padding="SAME", kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
        )
        c_in = width
    self.convs = nnx.List(convs)
    side = INPUT_SIZE // 2 ** len(STAGES)  # 7
    dense = dict(kernel_init=kernel_init, bias_init=bias_init, rngs=rngs)
    self.fc1 = nnx.Linear(side * side * c_in, hidden, **dense)  # rows in NHWC flattening order
    self.fc2 = nnx.Linear(hidden, hidden, **dense)
    self.fc3 = nnx.Linear(hidden, num_classes, **dense)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, 224, 224, C]` -> logits `[B, num_classes]`."""
    i = 0
    for n in STAGES:
      for _ in range(n):
        # As the graph computes it: XLA:CPU runs these faster than `nnx.Conv`'s "SAME" (see `conv_valid`).
        x = _conv_relu(i, self, jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))))
        i += 1
      # A max of strided views (exact): XLA:CPU ran a `reduce_window` feeding the dense head about 10x slower.
      x = incremental.max_pool_valid(x, 2, 2)
    x = x.reshape(x.shape[0], -1)
    x = jax.nn.relu(self.fc1(x))
    x = jax.nn.relu(self.fc2(x))
    return self.fc3(x)

  @staticmethod
  def layer_graph() -> incremental.LayerGraph:
    """This network as a `LayerGraph` for incremental occlusion (node fns take the merged module); its
    geometry depends on `STAGES` only, not on widths or weights."""
    g = incremental.GraphBuilder()
    x, i = g.input, 0
    for n in STAGES:
      for _ in range(n):
        x = g.spatial(x, functools.partial(_conv_relu, i), kernel=3, padding=1, name=f"convs.{i}")
        i += 1
      x = g.spatial(x, _max_pool, kernel=2, stride=2, pad_value=-np.inf, name="max_pool")
    g.full(x, _head, name="head")
    return g.build()


def _conv_relu(i: int, net: VGG16, x_padded: jax.Array) -> jax.Array:
  """`relu(convs[i](x))` on an input already padded by 1 pixel (graph node fn)."""
  conv = net.convs[i]
  return jax.nn.relu(incremental.conv_valid(x_padded, conv.kernel[...], conv.bias[...]))


def _max_pool(net: VGG16, x: jax.Array) -> jax.Array:
  """The 2x2 max pool (graph node fn), as `__call__` computes it."""
  del net
  return incremental.max_pool_valid(x, 2, 2)


def _head(net: VGG16, x: jax.Array) -> jax.Array:
  """The dense layers on the last pooled map `[B, 7, 7, C]` -> logits `[B, num_classes]`."""
  x = x.reshape(x.shape[0], -1)
  x = jax.nn.relu(net.fc1(x))
  x = jax.nn.relu(net.fc2(x))
  return net.fc3(x)


def apply(graphdef: nnx.GraphDef, params: nnx.State, x: jax.typing.ArrayLike) -> jax.Array:
  """`x[B, 224, 224, C]` -> logits `[B, num_classes]` with the weights `params` (pure; jit it)."""
  return nnx.merge(graphdef, params)(jnp.asarray(x, jnp.float32))


def layer_graph(graphdef: nnx.GraphDef) -> incremental.LayerGraph:
  """The `LayerGraph` of a split VGG16 (its fns take the module that `nnx.merge(graphdef, params)` gives)."""
  graph = VGG16.layer_graph()
  return incremental.LayerGraph(graph.nodes, functools.partial(nnx.merge, graphdef))


def make_vgg16(seed: int = 0, **kwargs) -> tuple[nnx.GraphDef, nnx.State]:
  """A random VGG-16 split into graph and weights; `functools.partial(apply, graphdef)` is its apply_fn.

  Args:
    seed: seeds the weights (the same seed gives the same weights on every machine).
    **kwargs: `VGG16` options (`num_classes`, `widths`, `hidden`, `in_features`).
  """
  return nnx.split(VGG16(rngs=nnx.Rngs(seed), **kwargs))


def _preprocess(face: np.ndarray) -> np.ndarray:
  """`uint8 [224, 224, 3]` -> `float32` in [-1, 1] (no resizing: the timing inputs are made at size)."""
  return face.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def load_vgg16(seed: int = 0, *, num_classes: int = 1000) -> FaceModel:
  """The random VGG-16 as a `FaceModel` named "vgg16" (a 224 px "box" crop with no margin, logit score).

  With no margin the face is the whole 224 px crop, so a patch of 7% of the face width is the paper's 15 px.
  """
  graphdef, params = make_vgg16(seed, num_classes=num_classes)
  return FaceModel(
    name="vgg16",
    labels=tuple(str(k) for k in range(num_classes)),
    input_shape=(INPUT_SIZE, INPUT_SIZE, 3),
    apply_fn=incremental.with_graph(functools.partial(apply, graphdef), layer_graph(graphdef)),
    params=params,
    preprocess_fn=_preprocess,
    crop=CropSpec("box", INPUT_SIZE, 0.0),
    score="logit",
    source=f"random He-normal weights, seed {seed} (timing only)",
  )
