"""Rival saliency methods: known answers on small hand-built networks, and runs on the ported face models."""

import collections

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from canonsal_jax import attribution, models, occlusion
from canonsal_jax.models import FaceModel

# Float32 sums over at most a few hundred products of O(1) values: rounding stays below 1e-5 relative.
_TIGHT = 1e-5
# The completeness tolerance set for Integrated Gradients at 64 steps on a smooth network.
_IG_COMPLETENESS_RTOL = 1e-3

_LOGIT = occlusion.Score("logit")

# Settings that keep the many-pass methods quick on the CPU; the defaults are the papers'.
_QUICK = {
  "vanilla_gradient": {},
  "integrated_gradients": {"steps": 8, "batch_size": 4},
  "grad_cam": {},
  "grad_cam_plus_plus": {},
  "score_cam": {"batch_size": 16},
  "rise": {"num_masks": 40, "batch_size": 16},
}


def _linear_model(height=6, width=5, channels=3, classes=4, seed=0):
  """`apply(params, x) = sum_hwc x[b, h, w, c] W[h, w, c, k] + bias[k]` and its weights."""
  rng = np.random.default_rng(seed)
  params = {
    "w": jnp.asarray(rng.normal(size=(height, width, channels, classes)), jnp.float32),
    "b": jnp.asarray(rng.normal(size=(classes,)), jnp.float32),
  }
  apply_fn = lambda p, x: jnp.einsum("bhwc,hwck->bk", x, p["w"], precision="highest") + p["b"]
  return apply_fn, params


def _smooth_net(seed=0):
  """A small conv net with smooth activations (tanh, softplus): `[B, 8, 8, 3]` -> `[B, 5]`."""
  rng = np.random.default_rng(seed)
  params = {
    "conv": jnp.asarray(rng.normal(size=(3, 3, 3, 6)) / 3.0, jnp.float32),
    "dense": jnp.asarray(rng.normal(size=(6 * 8 * 8, 5)) / 8.0, jnp.float32),
  }

  def apply_fn(p, x):
    h = jax.lax.conv_general_dilated(
      x, p["conv"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
    )
    h = jax.nn.softplus(jnp.tanh(h) * 2.0)
    return jnp.dot(h.reshape(h.shape[0], -1), p["dense"], precision="highest")

  return apply_fn, params


# --- gradients ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduce", attribution.CHANNEL_REDUCTIONS)
def test_vanilla_gradient_of_a_linear_model_is_its_weights(reduce):
  apply_fn, params = _linear_model()
  x = jax.random.normal(jax.random.key(0), (3, 6, 5, 3))
  targets = jnp.asarray([2, 0, 3], jnp.int32)  # one per example
  got = attribution.vanilla_gradient(apply_fn, params, x, _LOGIT, targets, reduce=reduce)
  w = np.moveaxis(np.asarray(params["w"]), -1, 0)[np.asarray(targets)]  # [B, H, W, C]
  want = {
    "abs_max": np.abs(w).max(-1),
    "sum": w.sum(-1),
    "abs_sum": np.abs(w).sum(-1),
    "l2": np.sqrt((w * w).sum(-1)),
  }[reduce]
  chex.assert_trees_all_close(got, want, rtol=_TIGHT, atol=_TIGHT)


def test_integrated_gradients_of_a_linear_model_is_input_times_weights():
  apply_fn, params = _linear_model()
  x = jax.random.normal(jax.random.key(1), (2, 6, 5, 3))
  got = attribution.integrated_gradients(apply_fn, params, x, _LOGIT, 1, steps=4, baseline=0.5, reduce="sum")
  want = np.sum((np.asarray(x) - 0.5) * np.asarray(params["w"])[..., 1], axis=-1)
  chex.assert_trees_all_close(got, want, rtol=_TIGHT, atol=_TIGHT)


@pytest.mark.parametrize(
  ("rule", "rtol"),
  [
    ("gausslegendre", _IG_COMPLETENESS_RTOL),
    ("riemann_middle", _IG_COMPLETENESS_RTOL),
    # The trapezoid rule's error bound is twice the midpoint rule's (seen: 1.2e-3 where the midpoint gives 6e-4).
    ("riemann_trapezoid", 2.5 * _IG_COMPLETENESS_RTOL),
  ],
)
@pytest.mark.parametrize("baseline", [0.0, "mean", (0.1, -0.2, 0.3)])
def test_integrated_gradients_completeness(rule, rtol, baseline):
  apply_fn, params = _smooth_net()
  x = jax.random.normal(jax.random.key(2), (3, 8, 8, 3))
  score = occlusion.Score("log_softmax")
  maps = attribution.integrated_gradients(
    apply_fn, params, x, score, 3, steps=64, baseline=baseline, rule=rule, batch_size=24
  )
  chex.assert_shape(maps, (3, 8, 8))
  if baseline == "mean":
    base = jnp.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
  else:
    base = jnp.broadcast_to(jnp.asarray(baseline, jnp.float32), x.shape)
  diff = score(apply_fn(params, x), 3) - score(apply_fn(params, base), 3)
  assert np.all(np.abs(np.asarray(diff)) > 0.1), "the test needs a score that moves along the path"
  chex.assert_trees_all_close(maps.sum(axis=(1, 2)), diff, rtol=rtol, atol=0.0)


def test_integrated_gradients_right_riemann_converges_to_the_integral():
  """The paper's right Riemann sum is first order: far from complete at 4 steps, within 1e-2 at 256."""
  apply_fn, params = _smooth_net()
  x = 2.0 * jax.random.normal(jax.random.key(3), (1, 8, 8, 3))
  score = occlusion.Score("log_softmax")
  diff = float((score(apply_fn(params, x), 0) - score(apply_fn(params, jnp.zeros_like(x)), 0))[0])
  errors = [
    abs(
      float(attribution.integrated_gradients(apply_fn, params, x, score, 0, steps=n, rule="riemann_right").sum()) - diff
    )
    for n in (4, 256)
  ]
  assert errors[1] < 1e-2 * abs(diff) < errors[0]


def test_batched_equals_one_at_a_time():
  apply_fn, params = _smooth_net()
  x = jax.random.normal(jax.random.key(4), (3, 8, 8, 3))
  targets = jnp.asarray([0, 4, 2], jnp.int32)
  for name in ("vanilla_gradient", "integrated_gradients", "rise"):
    batched = attribution.attribute(name, apply_fn, params, x, _LOGIT, targets, **_QUICK[name])
    for b in range(3):
      single = attribution.attribute(name, apply_fn, params, x[b : b + 1], _LOGIT, targets[b], **_QUICK[name])
      chex.assert_trees_all_close(batched[b], single[0], rtol=1e-4, atol=1e-5)


# --- CAMs -----------------------------------------------------------------------------------------------------


def _gap_dense(features_fn):
  """A head of global average pooling and a dense layer on `features_fn`'s map: `ModelFns` and weights `[D, K]`."""
  head_fn = lambda p, a: jnp.dot(jnp.mean(a, axis=(1, 2)), p, precision="highest")
  return attribution.ModelFns(lambda p, x: head_fn(p, features_fn(p, x)), features_fn, head_fn)


def test_grad_cam_with_the_input_as_features_is_the_class_activation_map():
  """Features = the input's channels, head = GAP + dense: dS/dA_c = W[c, k] / (h w) everywhere, so Grad-CAM is
  ReLU(sum_c W[c, k] x_c) / (h w), Zhou et al.'s CAM (the upsampling to the same size is the identity)."""
  fns = _gap_dense(lambda p, x: x)
  w = jnp.asarray(np.random.default_rng(5).normal(size=(3, 4)), jnp.float32)
  x = jax.random.normal(jax.random.key(5), (2, 6, 7, 3))
  got = attribution.grad_cam(fns, w, x, _LOGIT, 2)
  want = np.maximum(np.einsum("bhwc,c->bhw", np.asarray(x), np.asarray(w[:, 2])), 0.0) / (6 * 7)
  chex.assert_trees_all_close(got, want, rtol=_TIGHT, atol=1e-7)


def test_grad_cam_upsamples_the_coarse_map_bilinearly():
  """Features = 2x2 average-pooled input: Grad-CAM is the coarse CAM, ReLU'd, resized with half-pixel centres."""
  pool = lambda p, x: x.reshape(x.shape[0], x.shape[1] // 2, 2, x.shape[2] // 2, 2, x.shape[3]).mean(axis=(2, 4))
  fns = _gap_dense(pool)
  w = jnp.asarray(np.random.default_rng(6).normal(size=(3, 2)), jnp.float32)
  x = jax.random.normal(jax.random.key(6), (2, 8, 8, 3))
  got = attribution.grad_cam(fns, w, x, _LOGIT, 0)
  coarse = np.maximum(np.einsum("bhwc,c->bhw", np.asarray(pool(None, x)), np.asarray(w[:, 0])), 0.0) / 16
  # Bilinear upsampling by 2 with half-pixel centres: interior pixels are 3:1 blends of their two nearest.
  chex.assert_trees_all_close(got[:, 1:-1:2, 0], 0.75 * coarse[:, :-1, 0] + 0.25 * coarse[:, 1:, 0], rtol=1e-5)
  chex.assert_trees_all_close(got[:, 0, 0], coarse[:, 0, 0], rtol=1e-5)


def test_grad_cam_plus_plus_with_a_linear_head():
  """With a linear head the gradient g_c = W[c, k] / (h w) is constant over space, so each positive channel's
  weight is h w g^2 / (2 g^2 + S_c g^3) g (S_c = the channel's sum), negative channels get 0."""
  fns = _gap_dense(lambda p, x: x)
  w = jnp.asarray([[1.0], [-2.0], [0.5]], jnp.float32)
  x = jax.random.uniform(jax.random.key(7), (1, 4, 4, 3))
  got = attribution.grad_cam_plus_plus(fns, w, x, _LOGIT, 0)
  g = np.asarray(w[:, 0]) / 16
  sums = np.asarray(x).sum(axis=(1, 2))[0]
  weights = np.where(g > 0, 16 * g**2 / (2 * g**2 + sums * g**3) * g, 0.0)
  want = np.maximum(np.einsum("hwc,c->hw", np.asarray(x[0]), weights), 0.0)
  chex.assert_trees_all_close(got[0], want, rtol=_TIGHT, atol=1e-8)


def _quadrant_model(size=16):
  """A model that looks only at the top-left quadrant, with one feature channel per quadrant.

  features[d] = x * quadrant_d (full resolution), head = w * the sum of the top-left channel; logits `[score, 0]`.
  """
  half = size // 2
  quads = np.zeros((4, size, size), np.float32)
  for d, (r, c) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
    quads[d, r * half : (r + 1) * half, c * half : (c + 1) * half] = 1.0
  quads = jnp.asarray(quads)
  features_fn = lambda p, x: x[..., :1] * jnp.moveaxis(quads, 0, -1)  # [B, H, W, 4]
  head_fn = lambda p, a: jnp.stack([p * jnp.sum(a[..., 0] * quads[0], axis=(1, 2)), jnp.zeros(a.shape[0])], -1)
  fns = attribution.ModelFns(lambda p, x: head_fn(p, features_fn(p, x)), features_fn, head_fn)
  return fns, quads


@pytest.mark.parametrize("name", ["grad_cam", "grad_cam_plus_plus", "score_cam"])
def test_cams_of_a_one_quadrant_model_stay_in_that_quadrant(name):
  fns, quads = _quadrant_model()
  x = jax.random.uniform(jax.random.key(8), (2, 16, 16, 1), minval=0.5, maxval=1.5)
  maps = attribution.attribute(name, fns, jnp.float32(2.0), x, _LOGIT, 0, **_QUICK[name])
  inside = np.asarray(jnp.sum(maps * quads[0], axis=(1, 2)))
  assert np.all(inside > 0)
  # Exactly 0 outside but for the bilinear resize's one-pixel bleed at the quadrant's edge (none here: the
  # feature map has the input's size).
  chex.assert_trees_all_close(inside, np.asarray(maps.sum(axis=(1, 2))), rtol=_TIGHT)


def test_rise_of_a_one_quadrant_model_peaks_in_that_quadrant():
  fns, quads = _quadrant_model()
  x = jax.random.uniform(jax.random.key(9), (2, 16, 16, 1), minval=0.5, maxval=1.5)
  maps = attribution.rise(fns, jnp.float32(1.0), x, _LOGIT, 0, num_masks=2000, cells=4, key=jax.random.key(1))
  means = np.asarray(jnp.einsum("bhw,qhw->bq", maps, quads) / quads[0].sum())  # [B, 4] quadrant means
  # RISE estimates E[S(x M) M] / p. Far from the quadrant a pixel's mask is independent of the score, so the map
  # there is E[S] / p * p = w p sum_TL x, an offset rather than 0 (Monte Carlo noise ~3% at N = 2000).
  offset = 0.5 * np.asarray(jnp.sum(x[..., 0] * quads[0], axis=(1, 2)))
  chex.assert_trees_all_close(means[:, 3], offset, rtol=0.05)
  # Inside, the pixel's mask covaries with the score; the neighbouring quadrants share only the masks' cells
  # across the border (seen: excess 7-8 inside, under 2 next door).
  excess = means - offset[:, None]
  assert np.all(excess[:, 0] > 3.0 * excess[:, 1:].max(axis=1)), means


def test_rise_masks_have_mean_p_and_depend_on_the_key():
  masks = attribution._rise_masks(jax.random.key(0), 1000, 20, 20, 5, 0.3)
  chex.assert_shape(masks, (1000, 20, 20))
  assert float(masks.min()) >= 0.0 and float(masks.max()) <= 1.0
  np.testing.assert_allclose(float(masks.mean()), 0.3, atol=0.02)  # ~0.005 Monte Carlo noise
  assert not np.array_equal(masks[:8], attribution._rise_masks(jax.random.key(1), 8, 20, 20, 5, 0.3))


# --- settings and errors ----------------------------------------------------------------------------------------


def test_cams_need_a_feature_map():
  apply_fn, params = _linear_model()
  x = jnp.zeros((1, 6, 5, 3))
  for name in ("grad_cam", "grad_cam_plus_plus", "score_cam"):
    with pytest.raises(ValueError, match="last convolutional feature map"):
      attribution.attribute(name, apply_fn, params, x, _LOGIT, 0)
  assert attribution.attribute("rise", apply_fn, params, x, _LOGIT, 0, num_masks=8).shape == (1, 6, 5)


def test_unknown_method_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"grad_cam_plus_plus, score_cam"):
    attribution.attribute("lime", lambda p, x: x, None, jnp.zeros((1, 2, 2, 1)), _LOGIT)


def test_bad_settings_and_targets_are_rejected():
  apply_fn, params = _linear_model()
  x = jnp.zeros((2, 6, 5, 3))
  with pytest.raises(ValueError, match="channel reduction"):
    attribution.vanilla_gradient(apply_fn, params, x, _LOGIT, 0, reduce="max")
  with pytest.raises(ValueError, match="rule"):
    attribution.integrated_gradients(apply_fn, params, x, _LOGIT, 0, rule="simpson")
  with pytest.raises(ValueError, match="blur_sigma"):
    attribution.integrated_gradients(apply_fn, params, x, _LOGIT, 0, baseline="blur")
  with pytest.raises(ValueError, match="p must be"):
    attribution.rise(apply_fn, params, x, _LOGIT, 0, p=0.0)
  with pytest.raises(ValueError, match="one per example"):
    attribution.vanilla_gradient(apply_fn, params, x, _LOGIT, jnp.zeros((3,), jnp.int32))
  with pytest.raises(ValueError, match="score must be"):
    attribution.vanilla_gradient(apply_fn, params, x, "logit", 0)
  with pytest.raises(ValueError, match="float"):
    attribution.vanilla_gradient(apply_fn, params, jnp.zeros((6, 5, 3)), _LOGIT, 0)


def test_face_model_takes_features_and_head_together():
  gender = models.load("gender")
  with pytest.raises(ValueError, match="together"):
    FaceModel(**{**_fields(gender), "head_fn": None})


def _fields(model: FaceModel) -> dict:
  return {f: getattr(model, f) for f in model.__dataclass_fields__}


# --- the ported face models -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
  ("name", "feature_shape"),
  [("gender", (16, 16, 64)), ("age", (3, 3, 256)), ("expression", (4, 4, 128)), ("identity", (2, 2, 256))],
)
def test_features_then_head_is_apply(name, feature_shape):
  model = models.load(name)
  x = jax.random.normal(jax.random.key(10), (2, *model.input_shape))
  features = model.features_fn(model.params, x)
  chex.assert_shape(features, (2, *feature_shape))
  # The modules' __call__ is head(features(x)): the same ops in the same order, so equal bit for bit.
  chex.assert_trees_all_equal(model.head_fn(model.params, features), model.apply_fn(model.params, x))


class _Counted:
  """Wraps a model's functions and counts their calls (each one is a trace inside a jitted method)."""

  def __init__(self, model: FaceModel):
    self.calls = collections.Counter()

    def wrap(name, fn):
      def counted(params, x):
        self.calls[name] += 1
        return fn(params, x)

      return counted

    self.fns = attribution.ModelFns(
      wrap("apply", model.apply_fn), wrap("features", model.features_fn), wrap("head", model.head_fn)
    )


@pytest.fixture(scope="module")
def gender():
  return models.load("gender")


@pytest.mark.parametrize("name", list(attribution.METHODS))
def test_every_method_on_the_gender_model_batched_without_retracing(gender, name):
  counted = _Counted(gender)
  score = occlusion.Score.for_model(gender)
  x = jax.random.normal(jax.random.key(11), (4, 32, 32, 3))
  settings = dict(_QUICK[name])
  if name == "rise":
    settings["key"] = jax.random.key(0)
  maps = attribution.attribute(name, counted.fns, gender.params, x, score, **settings)
  chex.assert_shape(maps, (4, 32, 32))
  chex.assert_tree_all_finite(maps)
  assert float(jnp.abs(maps).max()) > 0
  traced = sum(counted.calls.values())
  assert traced > 0
  # New inputs (and for RISE a new key) reuse the compiled program.
  if name == "rise":
    settings["key"] = jax.random.key(1)
  again = attribution.attribute(name, counted.fns, gender.params, x + 0.5, score, **settings)
  chex.assert_shape(again, (4, 32, 32))
  assert not np.array_equal(again, maps)
  assert sum(counted.calls.values()) == traced
  # An explicit target is another program (None has no array); new target values then reuse it.
  attribution.attribute(name, counted.fns, gender.params, x, score, jnp.int32(1), **settings)
  traced = sum(counted.calls.values())
  attribution.attribute(name, counted.fns, gender.params, x - 0.5, score, jnp.int32(0), **settings)
  assert sum(counted.calls.values()) == traced
