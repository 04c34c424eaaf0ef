"""The ported face networks and the VGG-16-sized network in PyTorch, built from the same weight arrays.

Each module takes the flat weights of its Flax NNX counterpart (`flat_weights(state)`, keyed by NNX state path
such as ``"conv1/kernel"``) and converts layouts only: HWIO conv kernels become OIHW, depthwise kernels
`[3, 3, 1, C]` become `[C, 1, 3, 3]`, dense kernels `[D_in, D_out]` become `[D_out, D_in]` with the rows of a
kernel fed by a flattened feature map reordered from NHWC to NCHW flattening order. Inputs are NCHW; outputs
are the same logits as the JAX models'. Nothing here is trained or fitted.

Example:
  >>> from canonsal_jax import models  # doctest: +SKIP
  >>> net = torch_models.from_face_model(models.load("gender"))  # doctest: +SKIP
  >>> net(torch.zeros(1, 3, 32, 32)).shape  # doctest: +SKIP
  torch.Size([1, 2])
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from flax import nnx
from torch import nn

__all__ = [
  "TorchAgeNet",
  "TorchGenderNet",
  "TorchMiniXception",
  "TorchVGG16",
  "flat_weights",
  "from_face_model",
  "to_nchw",
]

Weights = Mapping[str, np.ndarray]


def flat_weights(state: nnx.State) -> dict[str, np.ndarray]:
  """An NNX state as `{"a/b/kernel": float32 array}` (host copies)."""
  return {"/".join(map(str, path)): np.asarray(var.get_value(), np.float32) for path, var in nnx.to_flat_state(state)}


def to_nchw(x: Any) -> torch.Tensor:
  """`[B, H, W, C]` (numpy or JAX) -> a contiguous float32 torch tensor `[B, C, H, W]`."""
  return torch.from_numpy(np.ascontiguousarray(np.transpose(np.asarray(x, np.float32), (0, 3, 1, 2))))


def _t(a: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.array(a, np.float32, order="C"))  # a writable copy


def _conv(weights: Weights, prefix: str, *, stride: int = 1, padding: int = 0, bias: bool = True) -> nn.Conv2d:
  kernel = weights[f"{prefix}/kernel"]  # [kh, kw, I, O]
  kh, kw, c_in, c_out = kernel.shape
  conv = nn.Conv2d(c_in, c_out, (kh, kw), stride=stride, padding=padding, bias=bias)
  with torch.no_grad():
    conv.weight.copy_(_t(np.transpose(kernel, (3, 2, 0, 1))))
    if bias:
      conv.bias.copy_(_t(weights[f"{prefix}/bias"]))
  return conv


def _linear(weights: Weights, prefix: str, *, nhwc_map: tuple[int, int, int] | None = None) -> nn.Linear:
  """A dense layer; `nhwc_map = (H, W, C)` when its input is a flattened feature map (rows reordered to CHW)."""
  kernel = weights[f"{prefix}/kernel"]  # [D_in, D_out]
  if nhwc_map is not None:
    h, w, c = nhwc_map
    kernel = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(h * w * c, -1)
  linear = nn.Linear(kernel.shape[0], kernel.shape[1])
  with torch.no_grad():
    linear.weight.copy_(_t(kernel.T))
    linear.bias.copy_(_t(weights[f"{prefix}/bias"]))
  return linear


class _Affine(nn.Module):
  """dlib's inference-time batch norm: `x * scale + offset` per channel (NCHW)."""

  def __init__(self, weights: Weights, prefix: str):
    super().__init__()
    self.register_buffer("scale", _t(weights[f"{prefix}/scale"]).view(1, -1, 1, 1))
    self.register_buffer("offset", _t(weights[f"{prefix}/offset"]).view(1, -1, 1, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * self.scale + self.offset


def _batch_norm(weights: Weights, prefix: str, epsilon: float) -> nn.BatchNorm2d:
  scale = weights[f"{prefix}/scale"]
  bn = nn.BatchNorm2d(scale.shape[0], eps=epsilon)
  with torch.no_grad():
    bn.weight.copy_(_t(scale))
    bn.bias.copy_(_t(weights[f"{prefix}/bias"]))
    bn.running_mean.copy_(_t(weights[f"{prefix}/mean"]))
    bn.running_var.copy_(_t(weights[f"{prefix}/var"]))
  return bn.eval()


class TorchGenderNet(nn.Module):
  """`canonsal_jax.models.dlib_onnx.GenderNet` in PyTorch: `[B, 3, 32, 32]` -> logits `[B, 2]`."""

  def __init__(self, weights: Weights):
    super().__init__()
    self.conv1 = _conv(weights, "conv1", padding=1)
    self.affine1 = _Affine(weights, "affine1")
    self.conv2 = _conv(weights, "conv2", padding=1)
    self.affine2 = _Affine(weights, "affine2")
    self.conv3 = _conv(weights, "conv3", padding=1)
    self.affine3 = _Affine(weights, "affine3")
    self.conv4 = _conv(weights, "conv4", padding=1)
    self.affine4 = _Affine(weights, "affine4")
    self.dropout1 = weights["dropout1/factor"].item()
    self.fc1 = _linear(weights, "fc1", nhwc_map=(8, 8, 64))
    self.dropout2 = weights["dropout2/factor"].item()
    self.fc2 = _linear(weights, "fc2")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.affine1(self.conv1(x)))
    x = F.relu(self.affine2(self.conv2(x)))
    x = F.avg_pool2d(x, 2)
    x = F.relu(self.affine3(self.conv3(x)))
    x = F.relu(self.affine4(self.conv4(x)))
    x = F.avg_pool2d(x, 2)
    x = F.relu(self.fc1(torch.flatten(x, 1) * self.dropout1))
    return self.fc2(x * self.dropout2)


def _add_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  """dlib's `add_prev` on NCHW: zero-pads channels, rows and columns at the end to the larger shape, then adds."""
  shape = [max(s, t) for s, t in zip(a.shape, b.shape, strict=True)]

  def pad(x: torch.Tensor) -> torch.Tensor:
    _, c, h, w = x.shape
    return F.pad(x, (0, shape[3] - w, 0, shape[2] - h, 0, shape[1] - c))

  return pad(a) + pad(b)


class _Residual(nn.Module):
  def __init__(self, weights: Weights, prefix: str, *, downsample: bool):
    super().__init__()
    self.conv1 = _conv(weights, f"{prefix}/conv1", stride=2 if downsample else 1, padding=0 if downsample else 1)
    self.affine1 = _Affine(weights, f"{prefix}/affine1")
    self.conv2 = _conv(weights, f"{prefix}/conv2", padding=1)
    self.affine2 = _Affine(weights, f"{prefix}/affine2")
    self.downsample = downsample

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.affine1(self.conv1(x)))
    y = self.affine2(self.conv2(y))
    shortcut = F.avg_pool2d(x, 2) if self.downsample else x
    return F.relu(_add_padded(shortcut, y))


class TorchAgeNet(nn.Module):
  """`canonsal_jax.models.dlib_onnx.AgeNet` in PyTorch: `[B, 3, 64, 64]` -> logits `[B, 81]`."""

  def __init__(self, weights: Weights):
    super().__init__()
    self.stem_conv = _conv(weights, "stem_conv", stride=2)
    self.stem_affine = _Affine(weights, "stem_affine")
    self.blocks = nn.Sequential(*(_Residual(weights, f"block{i}", downsample=i in (2, 4)) for i in range(1, 6)))
    self.fc = _linear(weights, "fc")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.stem_affine(self.stem_conv(x)))
    x = F.max_pool2d(x, 3, 2)
    x = self.blocks(x)
    return self.fc(x.mean(dim=(2, 3)))


class TorchFaceDescriptorNet(nn.Module):
  """`canonsal_jax.models.dlib_resnet.FaceDescriptorNet` in PyTorch: `[B, 3, 150, 150]` -> descriptors `[B, 128]`.

  A block downsamples where its first convolution is applied at stride 2 in the port: the 3x3 kernels of the
  `ares_down` blocks are read with no padding, as dlib does; `dlib_resnet._BLOCKS` says which blocks those are.
  """

  def __init__(self, weights: Weights):
    super().__init__()
    from canonsal_jax.models import dlib_resnet

    self.stem_conv = _conv(weights, "stem_conv", stride=2)
    self.stem_affine = _Affine(weights, "stem_affine")
    self.blocks = nn.Sequential(
      *(_Residual(weights, f"blocks/{b}", downsample=down) for b, (_, down) in enumerate(dlib_resnet._BLOCKS))
    )
    self.fc = nn.Linear(*weights["fc"].shape, bias=False)
    with torch.no_grad():
      self.fc.weight.copy_(_t(weights["fc"].T))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)
    return self.fc(self.blocks(x).mean(dim=(2, 3)))


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
  """TensorFlow's 3x3 stride-2 "same" max pool: the extra padding goes to the bottom and right."""
  pads = []
  for n in (x.shape[3], x.shape[2]):  # F.pad order: last dim first
    total = max((-(-n // 2) - 1) * 2 + 3 - n, 0)
    pads += [total // 2, total - total // 2]
  return F.max_pool2d(F.pad(x, pads, value=-torch.inf), 3, 2)


class _SeparableBN(nn.Module):
  def __init__(self, weights: Weights, prefix: str, epsilon: float):
    super().__init__()
    depthwise = weights[f"{prefix}/depthwise/kernel"]  # [3, 3, 1, C]
    c = depthwise.shape[-1]
    self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False)
    with torch.no_grad():
      self.depthwise.weight.copy_(_t(np.transpose(depthwise, (3, 2, 0, 1))))
    self.pointwise = _conv(weights, f"{prefix}/pointwise", bias=False)
    self.bn = _batch_norm(weights, f"{prefix}/bn", epsilon)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.bn(self.pointwise(self.depthwise(x)))


class _XceptionModule(nn.Module):
  def __init__(self, weights: Weights, prefix: str, epsilon: float):
    super().__init__()
    self.sep1 = _SeparableBN(weights, f"{prefix}/sep1", epsilon)
    self.sep2 = _SeparableBN(weights, f"{prefix}/sep2", epsilon)
    self.shortcut_conv = _conv(weights, f"{prefix}/shortcut/conv", stride=2, bias=False)  # 1x1: "same" = 0 pad
    self.shortcut_bn = _batch_norm(weights, f"{prefix}/shortcut/bn", epsilon)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = _max_pool_same(self.sep2(F.relu(self.sep1(x))))
    return y + self.shortcut_bn(self.shortcut_conv(x))


class TorchMiniXception(nn.Module):
  """`canonsal_jax.models.fer.MiniXception` in PyTorch: `[B, 1, 64, 64]` -> logits `[B, 7]`."""

  def __init__(self, weights: Weights, *, epsilon: float):
    super().__init__()
    self.stem1_conv = _conv(weights, "stem1/conv", bias=False)
    self.stem1_bn = _batch_norm(weights, "stem1/bn", epsilon)
    self.stem2_conv = _conv(weights, "stem2/conv", bias=False)
    self.stem2_bn = _batch_norm(weights, "stem2/bn", epsilon)
    num_blocks = len({k.split("/")[1] for k in weights if k.startswith("blocks/")})
    self.blocks = nn.Sequential(*(_XceptionModule(weights, f"blocks/{i}", epsilon) for i in range(num_blocks)))
    self.head = _conv(weights, "head", padding=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.stem1_bn(self.stem1_conv(x)))
    x = F.relu(self.stem2_bn(self.stem2_conv(x)))
    return self.head(self.blocks(x)).mean(dim=(2, 3))


class TorchVGG16(nn.Module):
  """`benchmarks.baselines.vgg.VGG16` in PyTorch: `[B, C, 224, 224]` -> logits `[B, num_classes]`."""

  def __init__(self, weights: Weights):
    super().__init__()
    from benchmarks.baselines import vgg

    self.stages = vgg.STAGES
    num_convs = sum(vgg.STAGES)
    self.convs = nn.ModuleList(_conv(weights, f"convs/{i}", padding=1) for i in range(num_convs))
    side = vgg.INPUT_SIZE // 2 ** len(vgg.STAGES)
    width = weights[f"convs/{num_convs - 1}/kernel"].shape[-1]
    self.fc1 = _linear(weights, "fc1", nhwc_map=(side, side, width))
    self.fc2 = _linear(weights, "fc2")
    self.fc3 = _linear(weights, "fc3")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    i = 0
    for n in self.stages:
      for _ in range(n):
        x = F.relu(self.convs[i](x))
        i += 1
      x = F.max_pool2d(x, 2)
    x = F.relu(self.fc1(torch.flatten(x, 1)))
    x = F.relu(self.fc2(x))
    return self.fc3(x)


def _fer_epsilon() -> float:
  from canonsal_jax.models import fer

  arrays = fer.load_weights()
  return float(arrays[fer._EPSILON_KEY])


_BUILDERS: dict[str, Callable[[Weights], nn.Module]] = {
  "gender": TorchGenderNet,
  "age": TorchAgeNet,
  "expression": lambda w: TorchMiniXception(w, epsilon=_fer_epsilon()),
  "identity": TorchFaceDescriptorNet,
  "vgg16": TorchVGG16,
}


def from_face_model(model: Any) -> nn.Module:
  """The PyTorch twin of a ported model (a `FaceModel` named gender, age or expression, or the VGG-16 pair).

  Args:
    model: anything with `name` and `params` (an NNX state), e.g. `models.load("age")`.

  Returns:
    The module in eval mode, float32, on the CPU.

  Raises:
    ValueError: no PyTorch twin for `model.name`.
  """
  try:
    builder = _BUILDERS[model.name]
  except KeyError:
    raise ValueError(f"no PyTorch twin for {model.name!r}; known: {', '.join(_BUILDERS)}") from None
  return builder(flat_weights(model.params)).eval()
