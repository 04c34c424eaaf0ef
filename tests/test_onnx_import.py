"""ONNX files as FaceModels: every operator against onnxruntime, the dlib networks against their hand ports,
weights as params, the layer graph's incremental sweep against the full sweep, and the errors of bad input."""

from __future__ import annotations

import json

import chex
import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.baselines import face_nets
from canonsal_jax import assets, models, occlusion
from canonsal_jax.models import card as card_lib
from canonsal_jax.models import onnx_import

# onnxruntime and XLA sum convolutions and matrix products in different orders: float32 rounding of outputs
# of size ~1-10 after a few hundred multiply-adds stays well under 1e-5 of the largest output.
ORT_RTOL = 1e-5
# The bar for the imported dlib networks against their hand ports: 1e-5 of the largest logit.
PORT_RTOL = 1e-5


def _save(tmp_path, nodes, inits, in_shape, out_name="y", opset=13, name="net"):
  """A graph `x[N, C, H, W] -> nodes -> Flatten -> out`, saved; returns its path."""
  graph = helper.make_graph(
    [*nodes, helper.make_node("Flatten", [out_name], ["out"], axis=1)],
    name,
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *in_shape])],
    [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
    [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()],
  )
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
  model.ir_version = 8
  path = tmp_path / f"{name}.onnx"
  onnx.save(model, path)
  return path


def _embedding_card(size, channels=3):
  return card_lib.ModelCard(
    input_size=size, channels=channels, channel_order="RGB" if channels == 3 else "GRAY", output="embedding"
  )


def _compare(path, size, channels=3, *, batch=2, seed=0):
  """Our output against onnxruntime's on random input; returns the model."""
  model = models.from_onnx(path, _embedding_card(size, channels))
  x = np.random.default_rng(seed).normal(size=(batch, size, size, channels)).astype(np.float32)
  ours = np.asarray(jax.jit(model.apply_fn)(model.params, x))
  want = ort.InferenceSession(str(path)).run(None, {"x": x.transpose(0, 3, 1, 2)})[0]
  chex.assert_trees_all_close(ours, want, rtol=0, atol=ORT_RTOL * max(1.0, float(np.abs(want).max())))
  if model.layer_graph is not None:  # the incremental sweep's arithmetic is the forward's
    graph_out = np.asarray(jax.jit(model.layer_graph.apply)(model.params, x))
    chex.assert_trees_all_close(graph_out, ours, rtol=0, atol=1e-6 * max(1.0, float(np.abs(ours).max())))
  return model


def _rand(*shape, seed=1):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


W = _rand(4, 3, 3, 3)
B = _rand(4, seed=2)
C4 = lambda seed: np.abs(_rand(4, seed=seed)) + 0.5

# (case id, nodes, initializers, opset): each reads `x[N, 3, 9, 9]` and writes `y`.
OP_CASES = [
  (
    "conv_pads",
    [helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 0, 2, 1], strides=[2, 1])],
    {"w": W, "b": B},
    13,
  ),
  (
    "conv_same_upper",
    [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_UPPER", strides=[2, 2])],
    {"w": W},
    11,
  ),
  ("conv_same_lower", [helper.make_node("Conv", ["x", "w"], ["y"], auto_pad="SAME_LOWER")], {"w": W}, 11),
  ("conv_valid", [helper.make_node("Conv", ["x", "w", "b"], ["y"], auto_pad="VALID")], {"w": W, "b": B}, 9),
  ("conv_dilated", [helper.make_node("Conv", ["x", "w"], ["y"], dilations=[2, 2], pads=[2, 2, 2, 2])], {"w": W}, 13),
  (
    "conv_grouped",
    [helper.make_node("Conv", ["x", "wg"], ["y"], group=3, pads=[1, 1, 1, 1])],
    {"wg": _rand(6, 1, 3, 3)},
    13,
  ),
  (
    "batchnorm_prelu",
    [
      helper.make_node("BatchNormalization", ["x", "s", "o", "m", "v"], ["h"], epsilon=1e-3),
      helper.make_node("PRelu", ["h", "slope"], ["y"]),
    ],
    {"s": C4(3)[:3], "o": _rand(3, seed=4), "m": _rand(3, seed=5), "v": C4(6)[:3], "slope": _rand(3, 1, 1, seed=7)},
    15,
  ),
  (
    "activations",
    [
      helper.make_node("LeakyRelu", ["x"], ["a"], alpha=0.1),
      helper.make_node("Sigmoid", ["a"], ["b1"]),
      helper.make_node("Tanh", ["x"], ["b2"]),
      helper.make_node("Relu", ["x"], ["b3"]),
      helper.make_node("Sum", ["b1", "b2", "b3"], ["y"]),
    ],
    {},
    13,
  ),
  ("clip_attrs", [helper.make_node("Clip", ["x"], ["y"], min=-0.5, max=0.7)], {}, 9),
  (
    "clip_inputs",
    [helper.make_node("Clip", ["x", "lo", "hi"], ["y"])],
    {"lo": np.float32(-0.5), "hi": np.float32(0.7)},
    13,
  ),
  (
    "maxpool_ceil",
    [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1)],
    {},
    13,
  ),
  (
    "maxpool_pads",
    [helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1])],
    {},
    11,
  ),
  (
    "avgpool_pads_excluded",
    [helper.make_node("AveragePool", ["x"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])],
    {},
    13,
  ),
  (
    "avgpool_pads_counted",
    [
      helper.make_node(
        "AveragePool", ["x"], ["y"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1
      )
    ],
    {},
    13,
  ),
  (
    "global_pools",
    [
      helper.make_node("GlobalAveragePool", ["x"], ["a"]),
      helper.make_node("GlobalMaxPool", ["x"], ["b1"]),
      helper.make_node("Sub", ["a", "b1"], ["y"]),
    ],
    {},
    13,
  ),
  (
    "gemm_matmul",
    [
      helper.make_node("Flatten", ["x"], ["f"]),
      helper.make_node("Gemm", ["f", "g", "gb"], ["h"], transB=1, alpha=0.5, beta=2.0),
      helper.make_node("MatMul", ["h", "mm"], ["y"]),
    ],
    {"g": _rand(5, 243), "gb": _rand(5, seed=3), "mm": _rand(5, 4, seed=4)},
    13,
  ),
  (
    "arithmetic",
    [
      helper.make_node("Mul", ["x", "c"], ["a"]),
      helper.make_node("Div", ["a", "d"], ["b1"]),
      helper.make_node("Sub", ["b1", "x"], ["b2"]),
      helper.make_node("Add", ["b2", "s"], ["y"]),
    ],
    {"c": _rand(3, 1, 1), "d": C4(8)[:3].reshape(3, 1, 1), "s": np.float32(0.25)},
    13,
  ),
  (
    "shape_reshape",  # PyTorch's x.view(x.size(0), -1): the target computed from Shape, resolved statically
    [
      helper.make_node("Shape", ["x"], ["shp"]),
      helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
      helper.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
      helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
      helper.make_node("Reshape", ["x", "target"], ["y"]),
    ],
    {"zero": np.int64(0), "axes0": np.asarray([0], np.int64), "minus1": np.asarray([-1], np.int64)},
    13,
  ),
  (
    "transpose_squeeze_unsqueeze_opset11",
    [
      helper.make_node("GlobalAveragePool", ["x"], ["g"]),
      helper.make_node("Squeeze", ["g"], ["s"], axes=[2, 3]),
      helper.make_node("Unsqueeze", ["s"], ["u"], axes=[1]),
      helper.make_node("Transpose", ["u"], ["y"], perm=[0, 2, 1]),
    ],
    {},
    11,
  ),
  ("transpose_4d", [helper.make_node("Transpose", ["x"], ["y"], perm=[0, 3, 2, 1])], {}, 13),
  (
    "concat_channels",
    [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Concat", ["x", "r"], ["y"], axis=1)],
    {},
    13,
  ),
  ("pad_attrs", [helper.make_node("Pad", ["x"], ["y"], pads=[0, 1, 1, 0, 0, 2, 0, 2], value=0.5)], {}, 9),
  (
    "pad_inputs",
    [helper.make_node("Pad", ["x", "pads", "cv"], ["y"])],
    {"pads": np.asarray([0, 0, 2, 1, 0, 0, 0, 3], np.int64), "cv": np.float32(-1.0)},
    13,
  ),
  (
    "pad_reflect",
    [helper.make_node("Pad", ["x", "pads"], ["y"], mode="reflect")],
    {"pads": np.asarray([0, 0, 2, 1, 0, 0, 1, 2], np.int64)},
    13,
  ),
  (
    "pad_edge",
    [helper.make_node("Pad", ["x", "pads"], ["y"], mode="edge")],
    {"pads": np.asarray([0, 0, 2, 1, 0, 0, 1, 2], np.int64)},
    13,
  ),
  (
    "resize_nearest",
    [
      helper.make_node(
        "Resize",
        ["x", "", "scales"],
        ["y"],
        mode="nearest",
        coordinate_transformation_mode="asymmetric",
        nearest_mode="floor",
      )
    ],
    {"scales": np.asarray([1, 1, 2, 2], np.float32)},
    13,
  ),
  (
    "resize_linear_half_pixel",
    [helper.make_node("Resize", ["x", "", "", "sizes"], ["y"], mode="linear", axes=[2, 3])],
    {"sizes": np.asarray([14, 5], np.int64)},
    19,
  ),
  (
    "resize_linear_align_corners",
    [
      helper.make_node(
        "Resize", ["x", "roi", "scales"], ["y"], mode="linear", coordinate_transformation_mode="align_corners"
      )
    ],
    {"roi": np.zeros(0, np.float32), "scales": np.asarray([1, 1, 1.5, 2], np.float32)},
    11,
  ),
  (
    "upsample",
    [helper.make_node("Upsample", ["x", "scales"], ["y"], mode="nearest")],
    {"scales": np.asarray([1, 1, 2, 3], np.float32)},
    9,
  ),
  ("softmax_opset11", [helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}, 11),
  ("softmax_opset13", [helper.make_node("Softmax", ["x"], ["y"], axis=1)], {}, 13),
  (
    "dropout_identity_constant",
    [
      helper.make_node("Constant", [], ["k"], value=numpy_helper.from_array(np.float32(2.0))),
      helper.make_node("Dropout", ["x"], ["d"]),
      helper.make_node("Identity", ["d"], ["i"]),
      helper.make_node("Mul", ["i", "k"], ["y"]),
    ],
    {},
    13,
  ),
  (
    "elementwise_and_reductions",
    [
      helper.make_node("Abs", ["x"], ["a"]),
      helper.make_node("Sqrt", ["a"], ["b1"]),
      helper.make_node("Exp", ["x"], ["b2"]),
      helper.make_node("Elu", ["x"], ["b3"], alpha=0.7),
      helper.make_node("HardSigmoid", ["x"], ["b4"]),
      helper.make_node("HardSwish", ["x"], ["b5"]),
      helper.make_node("Max", ["b1", "b2", "b3"], ["m1"]),
      helper.make_node("Min", ["b4", "b5"], ["m2"]),
      helper.make_node("Mean", ["m1", "m2"], ["m"]),
      helper.make_node("ReduceMean", ["m"], ["r"], axes=[2], keepdims=1),
      helper.make_node("Split", ["r", "sp"], ["s1", "s2"], axis=3),
      helper.make_node("Concat", ["s2", "s1"], ["y"], axis=3),
    ],
    {"sp": np.asarray([4, 5], np.int64)},
    14,
  ),
  (
    "more_elementwise_and_reductions",
    [
      helper.make_node("Neg", ["x"], ["n"]),
      helper.make_node("Abs", ["n"], ["a"]),
      helper.make_node("Add", ["a", "one"], ["a1"]),
      helper.make_node("Log", ["a1"], ["l"]),
      helper.make_node("Reciprocal", ["a1"], ["rc"]),
      helper.make_node("Pow", ["a1", "two"], ["pw"]),
      helper.make_node("Floor", ["x"], ["fl"]),
      helper.make_node("Ceil", ["x"], ["ce"]),
      helper.make_node("Erf", ["x"], ["er"]),
      helper.make_node("Softplus", ["x"], ["so"]),
      helper.make_node("Softsign", ["x"], ["sg"]),
      helper.make_node("Selu", ["x"], ["se"]),
      helper.make_node("Greater", ["x", "zero"], ["g"]),
      helper.make_node("Where", ["g", "so", "sg"], ["w"]),
      helper.make_node("Sum", ["l", "rc", "pw", "fl", "ce", "er", "w", "se"], ["s"]),
      helper.make_node("LogSoftmax", ["s"], ["ls"], axis=1),
      helper.make_node("ReduceMax", ["ls"], ["rm"], axes=[2], keepdims=1),
      helper.make_node("ReduceSum", ["ls", "ax3"], ["rs"], keepdims=1),
      helper.make_node("Expand", ["rm", "eshape"], ["ex"]),
      helper.make_node("Tile", ["rs", "reps"], ["ti"]),
      helper.make_node("Cast", ["ti"], ["ct"], to=TensorProto.FLOAT),
      helper.make_node("Flatten", ["ex"], ["f1"]),
      helper.make_node("Flatten", ["ct"], ["f2"]),
      helper.make_node("Concat", ["f1", "f2"], ["y"], axis=1),
    ],
    {
      "one": np.float32(1.0),
      "two": np.float32(2.0),
      "zero": np.float32(0.0),
      "ax3": np.asarray([3], np.int64),
      "eshape": np.asarray([1, 3, 2, 9], np.int64),
      "reps": np.asarray([1, 1, 2, 3], np.int64),
    },
    13,
  ),
  (
    "opset21_slice",
    [helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"])],
    {"st": np.asarray([1, 2], np.int64), "en": np.asarray([8, -1], np.int64), "ax": np.asarray([2, 3], np.int64)},
    21,
  ),
]


@pytest.mark.parametrize(("nodes", "inits", "opset"), [pytest.param(n, i, o, id=c) for c, n, i, o in OP_CASES])
def test_operator_matches_onnxruntime(tmp_path, nodes, inits, opset):
  _compare(_save(tmp_path, nodes, inits, (3, 9, 9), opset=opset), 9)


def test_every_supported_operator_is_checked():
  """Every operator the importer claims is compared with onnxruntime above, but a few used only in shape
  arithmetic (their results are numpy constants there, which `shape_reshape` exercises)."""
  checked = {n.op_type for _, nodes, _, _ in OP_CASES for n in nodes} | {"Flatten"}
  unchecked = onnx_import.SUPPORTED_OPS - checked
  assert unchecked <= {"Equal", "Less", "And", "Or", "Not", "Size", "ConstantOfShape", "Range", "ReduceMin"}, unchecked


# ----------------------------------------------------------------------------------------------------------
# The layer graph.


def _residual_net(tmp_path, opset=13):
  """conv-bn-prelu, a residual block, maxpool, global pool, dense: every op with geometry."""
  nodes = [
    helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
    helper.make_node("BatchNormalization", ["c1", "s", "o", "m", "v"], ["n1"]),
    helper.make_node("PRelu", ["n1", "slope"], ["p1"]),
    helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
    helper.make_node("Relu", ["c2"], ["r2"]),
    helper.make_node("Add", ["r2", "p1"], ["a"]),
    helper.make_node("MaxPool", ["a"], ["mp"], kernel_shape=[3, 3], strides=[2, 2], ceil_mode=1),
    helper.make_node("GlobalAveragePool", ["mp"], ["g"]),
    helper.make_node("Flatten", ["g"], ["f"]),
    helper.make_node("Gemm", ["f", "fc", "fcb"], ["y"], transB=1),
  ]
  inits = {
    "w1": _rand(8, 3, 3, 3),
    "b1": _rand(8, seed=2),
    "s": C4(3).repeat(2),
    "o": _rand(8, seed=4),
    "m": _rand(8, seed=5),
    "v": C4(6).repeat(2),
    "slope": _rand(8, 1, 1, seed=7) * 0.1,
    "w2": _rand(8, 8, 3, 3, seed=8),
    "fc": _rand(5, 8, seed=9),
    "fcb": _rand(5, seed=10),
  }
  return _save(tmp_path, nodes, inits, (3, 16, 16), opset=opset)


def test_layer_graph_of_a_residual_network_and_its_exact_incremental_sweep(tmp_path):
  model = _compare(_residual_net(tmp_path), 16)
  kinds = [type(n.op).__name__ for n in model.layer_graph.nodes]
  # conv(+bn+prelu fused), conv(+relu), add, maxpool, then the head.
  assert kinds == ["_Input", "Spatial", "Spatial", "Add", "Spatial", "Full"], kinds
  image = _rand(16, 16, 3, seed=11)
  centres = occlusion.grid_centres(16, 16, patch_size=3, stride=1)
  valid = np.ones(len(centres), bool)
  score = occlusion.Score("cosine")
  drops = {}
  for method in ("full", "incremental"):
    sweep = occlusion.make_sweep(model.apply_fn, patch_size=3, batch_size=16, score=score, method=method)
    drops[method] = np.asarray(sweep(model.params, image, centres, valid).drops)
  scale = np.abs(drops["full"]).max()
  chex.assert_trees_all_close(drops["incremental"], drops["full"], rtol=0, atol=1e-5 * scale)


def test_a_weight_shared_through_identity_reaches_every_layer(tmp_path):
  """PyTorch's exporter stores equal weights once and feeds the second layer through an `Identity` node placed
  anywhere in the graph; each layer of the incremental sweep must still see it."""
  nodes = [
    helper.make_node("Identity", ["slope"], ["slope_copy"]),
    helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
    helper.make_node("PRelu", ["c1", "slope"], ["p1"]),
    helper.make_node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
    helper.make_node("PRelu", ["c2", "slope_copy"], ["p2"]),
    helper.make_node("GlobalAveragePool", ["p2"], ["y"]),
  ]
  inits = {"w1": _rand(4, 3, 3, 3), "w2": _rand(4, 4, 3, 3, seed=3), "slope": _rand(4, 1, 1, seed=4)}
  model = _compare(_save(tmp_path, nodes, inits, (3, 12, 12), name="shared"), 12)
  image = _rand(12, 12, 3, seed=5)
  centres = occlusion.grid_centres(12, 12, patch_size=3, stride=1)
  valid = np.ones(len(centres), bool)
  drops = {
    method: np.asarray(
      occlusion.make_sweep(model.apply_fn, patch_size=3, batch_size=8, score=occlusion.Score("cosine"), method=method)(
        model.params, image, centres, valid
      ).drops
    )
    for method in ("full", "incremental")
  }
  chex.assert_trees_all_close(drops["incremental"], drops["full"], rtol=0, atol=1e-5 * np.abs(drops["full"]).max())


def test_a_network_without_geometry_falls_back_and_says_which_operator(tmp_path):
  nodes = [
    helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
    helper.make_node("Resize", ["c", "", "scales"], ["r"], mode="nearest"),
    helper.make_node("GlobalAveragePool", ["r"], ["y"]),
  ]
  path = _save(tmp_path, nodes, {"w": W, "scales": np.asarray([1, 1, 2, 2], np.float32)}, (3, 9, 9), name="up")
  model = _compare(path, 9)
  assert model.layer_graph is None
  assert "Resize" in model.apply_fn.layer_graph_reason
  with pytest.raises(ValueError, match="needs a layer graph"):
    occlusion.make_sweep(
      model.apply_fn, patch_size=3, batch_size=4, score=occlusion.Score("cosine"), method="incremental"
    )


# ----------------------------------------------------------------------------------------------------------
# Weights as params.


def test_new_weights_reuse_the_compiled_program(tmp_path):
  model = models.from_onnx(_residual_net(tmp_path), _embedding_card(16))
  x = _rand(2, 16, 16, 3, seed=12)
  assert all(isinstance(v, jax.Array) for v in jax.tree.leaves(model.params))
  apply = jax.jit(chex.assert_max_traces(lambda p, x: model.apply_fn(p, x), n=1))
  first = np.asarray(apply(model.params, x))
  doubled = jax.tree.map(lambda w: 2 * w, model.params)
  second = np.asarray(apply(doubled, x))  # a second call with new weights: no new trace
  assert not np.allclose(first, second)
  # Convolution kernels are params in HWIO.
  assert model.params["w1"].shape == (3, 3, 3, 8)


# ----------------------------------------------------------------------------------------------------------
# The dlib networks through the generic importer.


@pytest.mark.parametrize("task", ["gender", "age"])
def test_dlib_networks_equal_their_hand_ports_and_onnxruntime(task):
  hand = models.load(task)
  path = assets.path(f"{task}-v1.onnx")
  model = models.from_onnx(path, face_nets.dlib_onnx_card(task))
  assert model.layer_graph is not None
  rng = np.random.default_rng(0)
  crops = rng.integers(0, 256, size=(3, 80, 80, 3), dtype=np.uint8)
  x = np.stack([model.preprocess(c) for c in crops])
  chex.assert_trees_all_close(x, np.stack([hand.preprocess(c) for c in crops]), rtol=0, atol=1e-6)
  ours, port = np.asarray(model.logits(x)), np.asarray(hand.logits(x))
  chex.assert_trees_all_close(ours, port, rtol=0, atol=PORT_RTOL * np.abs(port).max())
  probabilities = ort.InferenceSession(str(path)).run(None, {"images": x.transpose(0, 3, 1, 2)})[0]
  chex.assert_trees_all_close(np.asarray(jax.nn.softmax(ours)), probabilities, rtol=0, atol=ORT_RTOL)
  graph_forward = jax.jit(model.layer_graph.apply)(model.params, x)  # both compiled, as the sweeps run them
  chex.assert_trees_all_close(np.asarray(graph_forward), ours, rtol=0, atol=1e-6)


def test_imported_gender_sweep_equals_the_hand_port_sweep():
  hand = models.load("gender")
  model = models.from_onnx(assets.path("gender-v1.onnx"), face_nets.dlib_onnx_card("gender"))
  image = hand.preprocess(np.random.default_rng(1).integers(0, 256, size=(32, 32, 3), dtype=np.uint8))
  centres = occlusion.grid_centres(32, 32, patch_size=3, stride=2)
  valid = np.ones(len(centres), bool)
  score = occlusion.Score.for_model(hand)
  run = lambda m, method: np.asarray(
    occlusion.make_sweep(m.apply_fn, patch_size=3, batch_size=32, score=score, method=method)(
      m.params, image, centres, valid
    ).drops
  )
  want = run(hand, "full")
  scale = np.abs(want).max()
  for got in (run(model, "full"), run(model, "incremental")):
    chex.assert_trees_all_close(got, want, rtol=0, atol=1e-5 * scale)


# ----------------------------------------------------------------------------------------------------------
# Bad input: one line naming what to change.


def test_unsupported_operator_names_operator_node_and_opset(tmp_path):
  nodes = [helper.make_node("LpNormalization", ["x"], ["y"], name="norm_7")]
  path = _save(tmp_path, nodes, {}, (3, 9, 9), opset=17)
  with pytest.raises(ValueError, match=r"unsupported ONNX operator LpNormalization \(node 'norm_7', opset 17\)"):
    models.from_onnx(path, _embedding_card(9))


def test_unsupported_opset(tmp_path):
  path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], {}, (3, 9, 9), opset=8)
  with pytest.raises(ValueError, match="opset 8 of the default domain is not supported"):
    models.from_onnx(path, _embedding_card(9))


def test_card_that_does_not_match_the_input_names_field_and_shapes(tmp_path):
  path = _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"])], {}, (3, 9, 9))
  with pytest.raises(
    ValueError,
    match=r"field 'input_size' gives input \[N, 3, 12, 12\] \(NCHW\) but the input 'x' of net.onnx has shape "
    r"\[N, 3, 9, 9\]",
  ):
    models.from_onnx(path, _embedding_card(12))
  with pytest.raises(ValueError, match=r"field 'channels'"):
    models.from_onnx(path, _embedding_card(9, channels=1))


def test_output_that_is_not_batch_by_k_says_what_it_is(tmp_path):
  graph = helper.make_graph(
    [helper.make_node("Relu", ["x"], ["y"])],
    "maps",
    [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
    [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
  )
  path = tmp_path / "maps.onnx"
  onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
  with pytest.raises(ValueError, match=r"output must be \[B, K\]; output 0 is \[2, 3, 9, 9\]"):
    models.from_onnx(path, _embedding_card(9))


def test_labels_that_do_not_match_the_outputs(tmp_path):
  path = _residual_net(tmp_path)
  card = card_lib.ModelCard(input_size=16, labels=("a", "b"))
  with pytest.raises(ValueError, match=r"field 'labels' names 2 classes but net\.onnx returns 5 outputs"):
    models.from_onnx(path, card)


def test_card_beside_the_model_is_found_and_validated(tmp_path):
  path = _residual_net(tmp_path)
  with pytest.raises(ValueError, match=r"model card .*net.json does not exist"):
    models.from_onnx(path)
  (tmp_path / "net.json").write_text(json.dumps({"input_size": 16, "output": "embedding", "colour": "RGB"}))
  with pytest.raises(ValueError, match=r"model card .*net.json: unknown field 'colour'"):
    models.from_onnx(path)
  (tmp_path / "net.json").write_text(json.dumps({"input_size": 16, "output": "embedding", "std": [0, 1, 1]}))
  with pytest.raises(ValueError, match=r"net.json: field 'std' must not be 0"):
    models.from_onnx(path)
  (tmp_path / "net.json").write_text(json.dumps({"input_size": 16, "output": "embedding", "name": "toy"}))
  model = models.from_onnx(path)
  assert (model.name, model.score, model.num_outputs) == ("toy", "cosine", 5)


def test_card_round_trips_through_json():
  card = card_lib.ModelCard(input_size=64, labels=("a", "b", "c"), mean=(0.5,), std=(0.25, 0.5, 1.0), crop="dlib_chip")
  assert card_lib.ModelCard.from_dict(json.loads(json.dumps(card.to_dict()))) == card


def test_card_preprocessing_orders_scales_and_resizes():
  face = np.random.default_rng(3).integers(0, 256, size=(20, 24, 3), dtype=np.uint8)
  bgr = card_lib.ModelCard(
    input_size=20, labels=("a", "b"), channel_order="BGR", pixel_scale=1.0, mean=(1.0, 2.0, 3.0), std=(2.0,)
  )
  out = bgr.preprocess(face[:, :20])
  chex.assert_trees_all_close(out, (face[:, :20, ::-1].astype(np.float32) - [1, 2, 3]) / 2, rtol=0, atol=1e-6)
  gray = card_lib.ModelCard(input_size=20, labels=("a", "b"), channels=1, channel_order="GRAY", pixel_scale=1.0)
  chex.assert_trees_all_close(gray.preprocess(face[:, :20]), face[:, :20].mean(axis=-1, keepdims=True), atol=1e-4)
  assert gray.preprocess(face).shape == (20, 20, 1)  # a crop of another size is resized


def test_probabilities_not_from_a_final_softmax_are_read_as_log_probabilities_by_both_sweeps(tmp_path):
  """A probability output whose softmax cannot be stripped (here an Identity follows it) becomes log p in the
  forward and in the layer graph's head alike, so the incremental sweep scores what the full sweep scores."""
  path = _residual_net(tmp_path)
  model = onnx.load(path)
  model.graph.node[-2].output[0] = "logits"  # the Gemm, before the final Flatten of `_save`
  model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Softmax", ["logits"], ["p"], axis=1))
  model.graph.node.insert(len(model.graph.node) - 1, helper.make_node("Identity", ["p"], ["y"]))
  onnx.save(model, path)
  card = card_lib.ModelCard(input_size=16, labels=tuple("abcde"), output="probabilities")
  imported = models.from_onnx(path, card)
  x = _rand(2, 16, 16, 3, seed=13)
  probabilities = ort.InferenceSession(str(path)).run(None, {"x": x.transpose(0, 3, 1, 2)})[0]
  want = np.log(np.maximum(probabilities, np.finfo(np.float32).tiny))  # underflowed classes: the smallest float
  chex.assert_trees_all_close(np.asarray(imported.logits(x)), want, rtol=0, atol=1e-5 * np.abs(want).max())
  graph_out = np.asarray(jax.jit(imported.layer_graph.apply)(imported.params, x))
  chex.assert_trees_all_close(graph_out, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_imported_models_expose_features_and_head_for_the_cams():
  hand = models.load("gender")
  model = models.from_onnx(assets.path("gender-v1.onnx"), face_nets.dlib_onnx_card("gender"))
  x = np.stack([hand.preprocess(c) for c in np.random.default_rng(6).integers(0, 256, (2, 32, 32, 3), np.uint8)])
  features = model.features_fn(model.params, x)
  assert features.ndim == 4 and features.shape[0] == 2
  chex.assert_trees_all_close(
    np.asarray(model.head_fn(model.params, features)), np.asarray(model.logits(x)), rtol=0, atol=1e-5
  )
  from canonsal_jax import attribution

  maps = np.asarray(attribution.attribute("grad_cam", model, model.params, x, occlusion.Score.for_model(model)))
  assert maps.shape == (2, 32, 32) and np.isfinite(maps).all() and np.abs(maps).max() > 0
