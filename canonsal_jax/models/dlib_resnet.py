"""dlib's ResNet face descriptor (`dlib_face_recognition_resnet_model_v1.dat`, Davis King, CC0) in Flax NNX.

The network is dlib's `anet_type` (dlib/examples/dnn_face_recognition_ex.cpp): a 150x150 RGB chip ->
conv7x7/2 valid(32) affine relu, maxpool3x3/2 valid [35x35x32]; 3 x residual(32); residual_down(64),
3 x residual(64) [17x17]; residual_down(128), 2 x residual(128) [8x8]; residual_down(256), 2 x residual(256)
[4x4]; residual_down(256) [2x2]; global average pool; fc without bias (128). The 128-D output is the face
descriptor itself: dlib's `loss_metric` compares raw Euclidean distances (same person below its
`dist_thresh`, 0.6) and `compute_face_descriptor` returns the fc output without normalising it (norms of 1.3-1.5 on
the chips tried). Residual blocks are `relu(shortcut ⊕ affine(conv3x3(relu(affine(conv3x3/s(x))))))`
with dlib's zero-padding `add_prev` (`layers.add_padded`); the 2x2 average-pool shortcut of the third
downsampling block is 4x4 where its conv branch is 3x3, and of the last 2x2 against 1x1.

dlib's Python API does not expose the weights, so `read_dlib_net` parses dlib's own binary serialisation
(`dlib::serialize` of the network, see `_Reader`); `load_weights` converts once into a `.npz` cached under the
asset's SHA-256 and `_WEIGHTS_FORMAT`.

Example:
  Lines marked +SKIP are not run as doctests: it needs the weights (fetched on first use) and a chip.
  >>> from canonsal_jax import models
  >>> identity = models.load("identity")  # doctest: +SKIP
  >>> emb = identity.logits(identity.preprocess(chip_rgb_uint8)[None])  # [1, 128]  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from canonsal_jax import assets, fileio, incremental
from canonsal_jax.models import layers
from canonsal_jax.models.base import CropSpec, FaceModel

__all__ = [
  "ASSET",
  "EMBEDDING_DIM",
  "SAME_PERSON_DISTANCE",
  "DlibLayer",
  "DlibNet",
  "FaceDescriptorNet",
  "ResidualBlock",
  "load_identity",
  "load_weights",
  "read_dlib_net",
]

ASSET = "dlib_face_recognition_resnet_model_v1.dat"
EMBEDDING_DIM = 128
CHIP_SIZE = 150
# dlib's face chips for this network: `get_face_chip(img, shape5, size=150, padding=0.25)`, as in
# `dlib.face_recognition_model_v1.compute_face_descriptor(img, shape)`.
CHIP_PADDING = 0.25
# dlib's threshold on the Euclidean distance between two descriptors: below it, the same person. It is the
# `dist_thresh` stored with the network's `loss_metric_` (0.6; dlib's example and face_recognition use it).
SAME_PERSON_DISTANCE = 0.6
# dlib's `input_rgb_image_sized` divides the mean-subtracted pixel values by this constant (dlib/dnn/input.h).
_INPUT_DIVISOR = 256.0

# Bump when the layout of the converted `.npz` changes, so stale conversions are not read back.
_WEIGHTS_FORMAT = 1

# (channels, downsample) of the residual blocks, input to output: alevel4 .. alevel0 of dlib's `anet_type`.
_BLOCKS = (
  *((32, False),) * 3,
  (64, True),
  *((64, False),) * 3,
  (128, True),
  *((128, False),) * 2,
  (256, True),
  *((256, False),) * 2,
  (256, True),
)
_STEM_FILTERS, _STEM_KERNEL, _STEM_STRIDE = 32, 7, 2
_POOL_SIZE, _POOL_STRIDE = 3, 2

Weights = Mapping[str, np.ndarray]


# ----------------------------------------------------------------------------------------------------------
# Reading dlib's serialisation.


@dataclasses.dataclass(frozen=True)
class DlibLayer:
  """One layer of a deserialised dlib network.

  Attributes:
    kind: the layer's serialisation tag ("input_rgb_image_sized", "con_4", "affine_", "relu_", "max_pool_2",
      "avg_pool_2", "add_prev_", "fc_2"), or "tag_or_skip" for dlib's `tag`/`skip` wrappers, which store
      nothing but a version (so the two, and their ids, cannot be told apart from the file).
    fields: the layer's scalar settings (ints and floats), by dlib's member names.
    tensors: float32 parameter arrays by name ("filters" `[O, I, kh, kw]`, "biases" `[O]`, "gamma" / "beta"
      `[C]`, "weights" `[D_in, D_out]`), split from the layer's `params` tensor by its stored alias shapes.
  """

  kind: str
  fields: Mapping[str, int | float] = dataclasses.field(default_factory=dict)
  tensors: Mapping[str, np.ndarray] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DlibNet:
  """A deserialised dlib network.

  Attributes:
    loss: the loss layer's tag (e.g. "loss_metric_2") and its fields (`margin`, `dist_thresh`).
    layers: input layer first, then every computational layer and `tag`/`skip` wrapper in forward order.
  """

  loss: DlibLayer
  layers: tuple[DlibLayer, ...]


class _Reader:
  """A cursor over bytes in dlib's serialisation format (dlib/serialize.h, dlib/float_details.h).

  * Integers (any width, signed or not): one control byte, the low nibble the count n of magnitude bytes,
    bit 0x80 the sign; then n bytes little-endian (`ser_helper::pack_int`).
  * bool: the character '0' or '1'.
  * float / double: `float_details`, i.e. an int64 mantissa m and an int16 exponent e, both as integers above,
    meaning m * 2**e (exponents 32000-32002 mean inf, -inf, nan).
  * std::string: its length as an integer, then the bytes.
  * tensor (dlib/cuda/tensor.h): version (1 or 2), num_samples, k, nr, nc; then the values, as floats above
    (version 1) or as little-endian IEEE float32 (version 2).
  * alias_tensor: version 1 and the four sizes; it names a slice of a layer's `params` tensor.
  """

  def __init__(self, data: bytes, name: str):
    self.data = data
    self.pos = 0
    self.name = name

  def error(self, message: str) -> ValueError:
    return ValueError(f"{self.name}: {message} (at byte {self.pos})")

  def int(self) -> int:
    if self.pos >= len(self.data):
      raise self.error("unexpected end of file")
    control = self.data[self.pos]
    n = control & 0x0F
    if n == 0 or n > 8 or control & 0x70:
      raise self.error(f"bad integer control byte {control:#04x}")
    start = self.pos + 1
    self.pos = start + n
    if self.pos > len(self.data):
      raise self.error("unexpected end of file")
    value = int.from_bytes(self.data[start : self.pos], "little")
    return -value if control & 0x80 else value

  def bool(self) -> bool:
    char = self.data[self.pos : self.pos + 1]
    if char not in (b"0", b"1"):
      raise self.error(f"bad bool {char!r}")
    self.pos += 1
    return char == b"1"

  def float(self) -> float:
    mantissa, exponent = self.int(), self.int()
    special = {32000: math.inf, 32001: -math.inf, 32002: math.nan}
    return special[exponent] if exponent in special else math.ldexp(mantissa, exponent)

  def string(self) -> str:
    n = self.int()
    if self.pos + n > len(self.data):
      raise self.error("unexpected end of file")
    text = self.data[self.pos : self.pos + n]
    self.pos += n
    try:
      return text.decode("ascii")
    except UnicodeDecodeError:
      raise self.error(f"expected a layer name, got {text[:32]!r}") from None

  def peek_string(self) -> str | None:
    """The string at the cursor if one plausibly starts there (length > 8, identifier chars), else None."""
    saved = self.pos
    try:
      n = self.int()
      text = self.data[self.pos : self.pos + n]
      ok = 8 < n < 64 and len(text) == n and all(chr(c).isalnum() or c == ord("_") for c in text)
      return text.decode("ascii") if ok else None
    except ValueError:
      return None
    finally:
      self.pos = saved

  def tensor(self) -> np.ndarray:
    """A dlib tensor as float32 `[num_samples, k, nr, nc]`."""
    version = self.int()
    shape = tuple(self.int() for _ in range(4))
    size = math.prod(shape)
    if min(shape) < 0 or (version == 2 and self.pos + 4 * size > len(self.data)):
      raise self.error(f"tensor of shape {shape} runs past the end of the file")
    if version == 2:
      values = np.frombuffer(self.data, "<f4", size, self.pos)
      self.pos += 4 * size
    elif version == 1:
      values = np.array([self.float() for _ in range(size)])
    else:
      raise self.error(f"unknown tensor version {version}")
    return values.astype(np.float32).reshape(shape)

  def alias(self) -> tuple[int, ...]:
    version = self.int()
    if version != 1:
      raise self.error(f"unknown alias_tensor version {version}")
    return tuple(self.int() for _ in range(4))


def _split_params(reader: _Reader, params: np.ndarray, parts: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
  """Cuts a layer's flat `params` into consecutive `alias_tensor` views of the stored shapes (dlib's layout)."""
  flat = params.reshape(-1)
  out, offset = {}, 0
  for name, shape in parts.items():
    size = math.prod(shape)
    out[name] = flat[offset : offset + size].reshape(shape)
    offset += size
  if offset != flat.size:
    raise reader.error(f"params hold {flat.size} values, the aliases {dict(parts)} {offset}")
  return out


def _read_details(reader: _Reader) -> DlibLayer:
  """One layer's `serialize(layer_details)` record (dlib/dnn/layers.h)."""
  kind = reader.string()
  if kind == "con_4":
    params = reader.tensor()
    names = ("num_filters", "nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
    fields: dict[str, int | float] = {name: reader.int() for name in names}
    parts = {"filters": reader.alias(), "biases": reader.alias()}
    for name in ("learning_rate_multiplier", "weight_decay_multiplier", "bias_lr_multiplier", "bias_wd_multiplier"):
      fields[name] = reader.float()
    tensors = _split_params(reader, params, parts)
    tensors["biases"] = tensors["biases"].reshape(-1)
    return DlibLayer(kind, fields, tensors)
  if kind == "affine_":
    params = reader.tensor()
    parts = {"gamma": reader.alias(), "beta": reader.alias()}
    fields = {"mode": reader.int()}  # dlib's layer_mode: CONV_MODE (0) per channel, FC_MODE (1) per unit
    tensors = {name: value.reshape(-1) for name, value in _split_params(reader, params, parts).items()}
    return DlibLayer(kind, fields, tensors)
  if kind == "fc_2":
    fields = {"num_outputs": reader.int(), "num_inputs": reader.int()}
    params = reader.tensor()
    parts = {"weights": reader.alias(), "biases": reader.alias()}
    fields["bias_mode"] = reader.int()
    for name in ("learning_rate_multiplier", "weight_decay_multiplier", "bias_lr_multiplier", "bias_wd_multiplier"):
      fields[name] = reader.float()
    tensors = _split_params(reader, params, parts)
    tensors["weights"] = tensors["weights"].reshape(fields["num_inputs"], fields["num_outputs"])
    if tensors["biases"].size == 0:
      del tensors["biases"]
    return DlibLayer(kind, fields, tensors)
  if kind in ("max_pool_2", "avg_pool_2"):
    names = ("nr", "nc", "stride_y", "stride_x", "padding_y", "padding_x")
    return DlibLayer(kind, {name: reader.int() for name in names})
  if kind in ("relu_", "add_prev_"):
    return DlibLayer(kind)
  raise reader.error(f"unsupported dlib layer {kind!r}")


def _read_layer_trailer(reader: _Reader, *, input_layer: bool, version: int) -> None:
  """The training state `add_layer` stores after its details (dlib/dnn/core.h); checked and dropped."""
  for _ in range(3):  # this_layer_setup_called, gradient_input_is_stale, get_output_and_gradient_input_disabled
    reader.bool()
  for _ in range(3):  # x_grad, cached_output, then params_grad (grad_final for the layer on the input)
    reader.tensor()
  if input_layer and version >= 3:
    reader.int()  # _sample_expansion_factor


def read_dlib_net(path: os.PathLike[str] | str) -> DlibNet:
  """Parses a network saved by dlib's `serialize(file) << net` with a loss layer on top.

  The stream is recursive, outermost layer first: `add_loss_layer` writes its version (1), its loss details
  and its subnetwork; each `add_layer` writes its version (2; 3 for the one on the input layer), its
  subnetwork, then its layer details and training state; `tag` and `skip` write a version (1) and their
  subnetwork; the input layer writes its tag and settings. So the file holds all the wrapper versions first,
  then the input layer, then the layers' details from the input upwards.

  Args:
    path: the `.dat` file.

  Returns:
    The loss layer and the layers in forward order.

  Raises:
    ValueError: the file is not in this format or holds a layer this reader does not know.
  """
  reader = _Reader(pathlib.Path(path).read_bytes(), os.fspath(path))
  if (version := reader.int()) != 1:
    raise reader.error(f"unknown add_loss_layer version {version}")
  loss_kind = reader.string()
  if loss_kind != "loss_metric_2":
    raise reader.error(f"unsupported loss layer {loss_kind!r}")
  loss = DlibLayer(loss_kind, {"margin": reader.float(), "dist_thresh": reader.float()})
  versions = []
  while (kind := reader.peek_string()) is None or not kind.startswith("input_"):
    versions.append(reader.int())
    if len(versions) > 100_000:
      raise reader.error("no input layer found")
  kind = reader.string()
  if kind != "input_rgb_image_sized":
    raise reader.error(f"unsupported input layer {kind!r}")
  names = ("avg_red", "avg_green", "avg_blue")
  fields: dict[str, int | float] = {name: reader.float() for name in names}
  fields |= {"nr": reader.int(), "nc": reader.int()}
  layers = [DlibLayer(kind, fields)]
  if not versions or versions[-1] not in (2, 3):
    raise reader.error(f"the input layer's add_layer has version {versions[-1:]}, expected 2 or 3")
  for i, version in enumerate(reversed(versions)):
    if i == 0:
      layers.append(_read_details(reader))
      _read_layer_trailer(reader, input_layer=True, version=version)
    elif version == 2:
      layers.append(_read_details(reader))
      _read_layer_trailer(reader, input_layer=False, version=version)
    elif version == 1:
      layers.append(DlibLayer("tag_or_skip"))
    else:
      raise reader.error(f"unknown layer wrapper version {version}")
  if reader.pos != len(reader.data):
    raise reader.error(f"{len(reader.data) - reader.pos} bytes left after the network")
  return DlibNet(loss, tuple(layers))


# ----------------------------------------------------------------------------------------------------------
# Conversion: check the file is `anet_type`, lay its weights out in NHWC.


def _expected_layers() -> Iterator[tuple[str, dict[str, int]]]:
  """`anet_type` in forward order as (kind, settings that must match); `tag_or_skip` as in `DlibNet`."""

  def con(n: int, k: int, stride: int) -> tuple[str, dict[str, int]]:
    pad = 0 if stride != 1 else k // 2  # dlib's `con` default padding
    return "con_4", {"num_filters": n, "nr": k, "nc": k, "stride_y": stride, "stride_x": stride,
                     "padding_y": pad, "padding_x": pad}  # fmt: skip

  yield "input_rgb_image_sized", {"nr": CHIP_SIZE, "nc": CHIP_SIZE}
  yield con(_STEM_FILTERS, _STEM_KERNEL, _STEM_STRIDE)
  yield "affine_", {"mode": 0}
  yield "relu_", {}
  pool = {"nr": _POOL_SIZE, "nc": _POOL_SIZE, "stride_y": _POOL_STRIDE, "stride_x": _POOL_STRIDE}
  yield "max_pool_2", pool | {"padding_y": 0, "padding_x": 0}
  for n, down in _BLOCKS:
    yield "tag_or_skip", {}  # tag1
    yield con(n, 3, 2 if down else 1)
    yield "affine_", {"mode": 0}
    yield "relu_", {}
    yield con(n, 3, 1)
    yield "affine_", {"mode": 0}
    if down:
      yield "tag_or_skip", {}  # tag2
      yield "tag_or_skip", {}  # skip1
      yield "avg_pool_2", {"nr": 2, "nc": 2, "stride_y": 2, "stride_x": 2, "padding_y": 0, "padding_x": 0}
    yield "add_prev_", {}
    yield "relu_", {}
  yield "avg_pool_2", {"nr": 0, "nc": 0}  # avg_pool_everything
  yield "fc_2", {"num_outputs": EMBEDDING_DIM, "bias_mode": 1}  # FC_NO_BIAS


def _convert(net: DlibNet, name: str) -> dict[str, np.ndarray]:
  """`anet_type` weights keyed "stem/conv/kernel", "block03/affine1/scale", ..., in NHWC / HWIO layout.

  Raises:
    ValueError: the network is not `anet_type`.
  """
  expected = list(_expected_layers())
  if len(net.layers) != len(expected):
    raise ValueError(f"{name}: {len(net.layers)} layers, dlib's anet_type has {len(expected)}")
  for i, (layer, (kind, settings)) in enumerate(zip(net.layers, expected, strict=True)):
    got = {k: layer.fields.get(k) for k in settings}
    if layer.kind != kind or got != settings:
      raise ValueError(f"{name}: layer {i} is {layer.kind} {got}, anet_type has {kind} {settings}")
  computational = iter(layer for layer in net.layers if layer.kind in ("con_4", "affine_", "fc_2"))
  out: dict[str, np.ndarray] = {}

  def conv(prefix: str) -> None:
    layer = next(computational)
    out[f"{prefix}/kernel"] = layer.tensors["filters"].transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> HWIO
    out[f"{prefix}/bias"] = layer.tensors["biases"]

  def affine(prefix: str) -> None:
    layer = next(computational)
    out[f"{prefix}/scale"] = layer.tensors["gamma"]
    out[f"{prefix}/offset"] = layer.tensors["beta"]

  inp = net.layers[0].fields
  out["input/means"] = np.array([inp["avg_red"], inp["avg_green"], inp["avg_blue"]], np.float32)
  out["loss/dist_thresh"] = np.array(net.loss.fields["dist_thresh"], np.float32)
  conv("stem/conv")
  affine("stem/affine")
  for b in range(len(_BLOCKS)):
    conv(f"block{b:02d}/conv1")
    affine(f"block{b:02d}/affine1")
    conv(f"block{b:02d}/conv2")
    affine(f"block{b:02d}/affine2")
  out["fc/kernel"] = next(computational).tensors["weights"]  # [256, 128]: y = x @ W, as dlib's fc_
  return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def _weights_file(asset: assets.Asset, weights_dir: pathlib.Path) -> pathlib.Path:
  stem = asset.name.removesuffix(".dat")
  return weights_dir / f"{stem}-{asset.sha256[:16]}-format{_WEIGHTS_FORMAT}.npz"


def load_weights(*, weights_dir: os.PathLike[str] | str | None = None) -> dict[str, np.ndarray]:
  """The face descriptor's weights, converted once from dlib's `.dat` and cached as `.npz`.

  The cache file is keyed by the `.dat` file's pinned SHA-256 and `_WEIGHTS_FORMAT`; a cached conversion is
  read without touching the `.dat`, which `assets.path` verifies (and fetches) only when converting.

  Args:
    weights_dir: where converted weights live; default `assets.cache_dir() / "weights"`.

  Returns:
    float32 arrays: "input/means" `[3]` (RGB), "loss/dist_thresh" `[]`, conv "kernel" `[kh, kw, I, O]` and
    "bias" `[O]`, affine "scale" / "offset" `[C]`, "fc/kernel" `[256, 128]`.
  """
  asset = assets.ASSETS[ASSET]
  weights_dir = pathlib.Path(weights_dir) if weights_dir is not None else assets.cache_dir() / "weights"
  target = _weights_file(asset, weights_dir)
  if target.is_file():
    with np.load(target, allow_pickle=False) as cached:
      return {name: cached[name] for name in cached.files}
  path = assets.path(ASSET)
  weights = _convert(read_dlib_net(path), os.fspath(path))
  fileio.save_npz(target, **weights)
  return weights


# ----------------------------------------------------------------------------------------------------------
# The network.


def _conv(weights: Weights, prefix: str, **kwargs) -> layers.Conv:
  """dlib's `con_` as converted: `<prefix>/kernel` (HWIO) and `<prefix>/bias`."""
  return layers.Conv(weights[f"{prefix}/kernel"], weights[f"{prefix}/bias"], **kwargs)


def _affine(weights: Weights, prefix: str) -> layers.Affine:
  """dlib's `affine_` as converted: `<prefix>/scale` and `<prefix>/offset`."""
  return layers.Affine(weights[f"{prefix}/scale"], weights[f"{prefix}/offset"])


class ResidualBlock(nnx.Module):
  """dlib's `ares` / `ares_down`: `relu(shortcut(x) ⊕ affine(conv(relu(affine(conv(x))))))`.

  Downsampling blocks: the first conv is 3x3 stride 2 without padding and the shortcut a 2x2 average pool;
  otherwise both convs are 3x3 "same" and the shortcut is the identity. `⊕` zero-pads the smaller operand at
  the end of rows, columns and channels (dlib's `add_prev`).
  """

  def __init__(self, weights: Weights, prefix: str, *, downsample: bool):
    self.conv1 = _conv(weights, f"{prefix}/conv1", stride=2 if downsample else 1, padding=0 if downsample else 1)
    self.affine1 = _affine(weights, f"{prefix}/affine1")
    self.conv2 = _conv(weights, f"{prefix}/conv2", stride=1, padding=1)
    self.affine2 = _affine(weights, f"{prefix}/affine2")
    self.downsample = downsample

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, H, W, C]` -> `[B, H', W', C']`."""
    y = jax.nn.relu(self.affine1(self.conv1(x)))
    y = self.affine2(self.conv2(y))
    shortcut = layers.avg_pool_2x2(x) if self.downsample else x
    return jax.nn.relu(layers.add_padded(shortcut, y))


class FaceDescriptorNet(nnx.Module):
  """dlib's face descriptor (`anet_type`): `[B, 150, 150, 3]` normalised RGB -> `[B, 128]` descriptors."""

  def __init__(self, weights: Weights):
    self.stem_conv = _conv(weights, "stem/conv", stride=_STEM_STRIDE, padding=0)
    self.stem_affine = _affine(weights, "stem/affine")
    self.blocks = nnx.List(
      [ResidualBlock(weights, f"block{b:02d}", downsample=down) for b, (_, down) in enumerate(_BLOCKS)]
    )
    self.fc = nnx.Param(jax.device_put(weights["fc/kernel"]))  # [256, 128]

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x[B, 150, 150, 3]` -> `[B, 128]`."""
    return self.head(self.features(x))

  def features(self, x: jax.Array) -> jax.Array:
    """The last residual block's output: `x[B, 150, 150, 3]` -> `[B, 2, 2, 256]`."""
    x = jax.nn.relu(self.stem_affine(self.stem_conv(x)))  # [B, 72, 72, 32]
    x = layers.max_pool_3x3_s2(x)  # [B, 35, 35, 32]
    for block in self.blocks:
      x = block(x)  # ... [B, 17, 17, 64], [B, 8, 8, 128], [B, 4, 4, 256], [B, 2, 2, 256]
    return x

  def layer_graph(self) -> incremental.LayerGraph:
    """This network as a `LayerGraph` for incremental occlusion (node fns take the merged module)."""
    g = incremental.GraphBuilder()
    x = layers.stem_graph(g, g.input, self, "stem_conv", "stem_affine")
    for b in range(len(self.blocks)):
      x = layers.residual_graph(g, x, self, f"blocks.{b}")
    g.full(x, incremental.call("", "head"), name="head")
    return g.build()

  def head(self, features: jax.Array) -> jax.Array:
    """`features[B, 2, 2, 256]` -> descriptors `[B, 128]` (global average pool, fc)."""
    return jnp.mean(features, axis=(1, 2)) @ self.fc[...]


# ----------------------------------------------------------------------------------------------------------
# FaceModel factory.


def _preprocess(face: np.ndarray, *, means: np.ndarray) -> np.ndarray:
  """`uint8 [h, w, 3]` RGB chip -> `float32 [150, 150, 3]`, `(RGB - means) / 256` as `input_rgb_image_sized`.

  A chip of another size is resized with PIL's bilinear filter first (dlib's chips are made at 150).
  """
  if face.shape[:2] != (CHIP_SIZE, CHIP_SIZE):
    face = np.asarray(Image.fromarray(face).resize((CHIP_SIZE, CHIP_SIZE), Image.Resampling.BILINEAR))
  return (face.astype(np.float32) - means) / np.float32(_INPUT_DIVISOR)


def load_identity() -> FaceModel:
  """dlib's face descriptor: 150x150 dlib chips (5 landmarks, padding 0.25) -> descriptors `[B, 128]`.

  Its natural score is the cosine similarity to a reference descriptor (by default the unoccluded chip's own).
  dlib itself compares descriptors by Euclidean distance (same person below `SAME_PERSON_DISTANCE`).
  """
  weights = load_weights()
  asset = assets.ASSETS[ASSET]
  module = FaceDescriptorNet(weights)
  graph = module.layer_graph()
  graphdef, params = nnx.split(module)
  return FaceModel(
    name="identity",
    labels=tuple(f"emb{i}" for i in range(EMBEDDING_DIM)),
    input_shape=(CHIP_SIZE, CHIP_SIZE, 3),
    apply_fn=incremental.with_graph(
      functools.partial(layers.apply, graphdef),
      incremental.LayerGraph(graph.nodes, functools.partial(nnx.merge, graphdef)),
    ),
    params=params,
    preprocess_fn=functools.partial(_preprocess, means=weights["input/means"]),
    crop=CropSpec("dlib_chip", CHIP_SIZE, CHIP_PADDING, landmarks=5),
    score="cosine",
    source=f"{asset.name} (dlib, Davis King) from {asset.package}=={asset.version}, {asset.licence}",
    features_fn=functools.partial(layers.features, graphdef),
    head_fn=functools.partial(layers.head, graphdef),
  )
