"""Rival saliency methods in JAX: gradients, Integrated Gradients, Grad-CAM, Grad-CAM++, Score-CAM and RISE.

Every method takes ``(model, params, x[B, H, W, C], score, target=None, **settings)`` and returns a heatmap
`[B, H, W]` on the model input. `model` is a `FaceModel`, a `ModelFns` or a bare ``apply_fn(params, x)``;
`score` is the `canonsal_jax.occlusion.Score` the occlusion sweeps use, so every method explains the same
number. Targets follow `Score`: a class index (or a pair for a contrast, a reference embedding for "cosine")
shared by the batch, or one per example (a leading `B` axis); None takes each input's own prediction (its
own embedding for "cosine", whose gradient there is zero: give another face's embedding as the target).

Each method runs one jitted program: the model functions, the score and the settings are static, so new
inputs, weights, targets or PRNG keys of the same shapes reuse it (the model functions are keyed by identity:
pass the same `FaceModel`, not a fresh lambda, to avoid recompiling). Methods that run the model many times
per input (Integrated Gradients, Score-CAM, RISE) go through `lax.scan` over chunks of `batch_size` so that
peak memory grows with ``B * batch_size`` model inputs, not with the number of steps, channels or masks.

Channel reductions of input gradients (`CHANNEL_REDUCTIONS`): "abs_max" is Simonyan et al.'s (2014)
``max_c |g_c|``, the default of `vanilla_gradient`; "sum" is the signed sum over channels, the default of
`integrated_gradients` because it keeps completeness (the heatmap sums to ``score(x) - score(baseline)``);
"abs_sum" and "l2" are the other common choices.

The CAMs weigh the last convolutional feature map (`FaceModel.features_fn`), combine the channels at the
feature map's resolution, apply a ReLU as the papers do, and upsample bilinearly (half-pixel centres, as
`F.interpolate(align_corners=False)` and OpenCV) to the input size. Heatmaps are not normalised.

Example:
  Lines marked +SKIP are not run as doctests: it needs the gender model's weights (fetched on first use) and a batch x.
  >>> from canonsal_jax import attribution, models, occlusion
  >>> gender = models.load("gender")  # doctest: +SKIP
  >>> score = occlusion.Score.for_model(gender)  # doctest: +SKIP
  >>> maps = attribution.attribute("grad_cam", gender, gender.params, x, score)  # [B, 32, 32]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from canonsal_jax import occlusion
from canonsal_jax.models.base import FaceModel

__all__ = [
  "CHANNEL_REDUCTIONS",
  "IG_RULES",
  "METHODS",
  "ModelFns",
  "attribute",
  "grad_cam",
  "grad_cam_plus_plus",
  "integrated_gradients",
  "model_fns",
  "rise",
  "score_cam",
  "vanilla_gradient",
]

CHANNEL_REDUCTIONS = ("abs_max", "sum", "abs_sum", "l2")
# Quadrature rules for the Integrated Gradients path integral; "gausslegendre" is Captum's default, the
# others are Riemann sums (Sundararajan et al. 2017 use "riemann_right").
IG_RULES = ("gausslegendre", "riemann_middle", "riemann_trapezoid", "riemann_right")
# Default IG steps: the range Sundararajan et al. (2017) found enough for completeness within 5% (20-300).
_IG_STEPS = 64
# RISE defaults from Petsiuk et al. (2018): 7x7 grids kept with p = 0.5; they use 4000-8000 masks at 224 px.
_RISE_MASKS = 4000
_RISE_CELLS = 7
_RISE_P = 0.5
# Model inputs per example in one forward pass of the chunked methods.
_BATCH_SIZE = 32
# Grad-CAM++'s guard for an exactly zero alpha denominator (pytorch-grad-cam's epsilon).
_CAMPP_EPS = 1e-7


class ModelFns(NamedTuple):
  """The pure functions of a model that the methods need.

  Attributes:
    apply_fn: `(params, x[B, H, W, C]) -> [B, K]`.
    features_fn: `(params, x) -> [B, h, w, D]`, the last conv feature map; None: no CAMs.
    head_fn: `(params, features) -> [B, K]` with `head_fn(params, features_fn(params, x)) == apply_fn(params, x)`.
  """

  apply_fn: Callable[[Any, jax.Array], jax.Array]
  features_fn: Callable[[Any, jax.Array], jax.Array] | None = None
  head_fn: Callable[[Any, jax.Array], jax.Array] | None = None


def model_fns(model: FaceModel | ModelFns | Callable[[Any, jax.Array], jax.Array]) -> ModelFns:
  """A `FaceModel`, a `ModelFns` or a bare `apply_fn` as `ModelFns`.

  Raises:
    ValueError: anything else, or only one of `features_fn` and `head_fn`.
  """
  if isinstance(model, ModelFns):
    fns = model
  elif isinstance(model, FaceModel):
    fns = ModelFns(model.apply_fn, model.features_fn, model.head_fn)
  elif callable(model):
    fns = ModelFns(model)
  else:
    raise ValueError(f"model must be a FaceModel, a ModelFns or an apply_fn, got {type(model).__name__}")
  if (fns.features_fn is None) != (fns.head_fn is None):
    raise ValueError("features_fn and head_fn are given together or not at all")
  return fns


# ----------------------------------------------------------------------------------------------------------
# Shared pieces (run at trace time inside the jitted programs).


def _check_input(x: jax.Array) -> None:
  if x.ndim != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"x must be a float [B, H, W, C] model input batch, got {x.dtype} {x.shape}")


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
  return int(value)


def _targets(score: occlusion.Score, target: Any, outputs: jax.Array) -> jax.Array:
  """Per-example targets `[B, ...]` from a shared target, per-example targets or None (the default)."""
  batch, num_outputs = outputs.shape
  if target is None:
    return jax.vmap(score.default_target)(jax.lax.stop_gradient(outputs))
  target = jnp.asarray(target)
  per_example_ndim = 1 if (score.contrast or score.kind == "cosine") else 0
  if target.ndim == per_example_ndim:
    target = jnp.broadcast_to(target, (batch, *target.shape))
  elif target.ndim != per_example_ndim + 1 or target.shape[0] != batch:
    raise ValueError(
      f"target of shape {target.shape} is neither one target for the batch nor one per example (B = {batch})"
    )
  score.check_target(target[0], num_outputs)
  return target


def _scores(score: occlusion.Score, outputs: jax.Array, targets: jax.Array) -> jax.Array:
  """`outputs[B, K]` scored against per-example `targets[B, ...]` -> `[B]`."""
  return jax.vmap(lambda o, t: score(o[None], t)[0])(outputs, targets)


def _reduce_channels(values: jax.Array, reduce: str) -> jax.Array:
  """`[B, H, W, C]` -> `[B, H, W]`."""
  if reduce == "abs_max":
    return jnp.max(jnp.abs(values), axis=-1)
  if reduce == "sum":
    return jnp.sum(values, axis=-1)
  if reduce == "abs_sum":
    return jnp.sum(jnp.abs(values), axis=-1)
  return jnp.sqrt(jnp.sum(values * values, axis=-1))  # l2


def _check_reduce(reduce: str) -> str:
  if reduce not in CHANNEL_REDUCTIONS:
    raise ValueError(f"channel reduction {reduce!r} is not one of {CHANNEL_REDUCTIONS}")
  return reduce


def _check_baseline(baseline: Any, blur_sigma: float | None) -> tuple[Any, float]:
  """A hashable baseline (see `occlusion.make_sweep`) and the blur's sigma (0 where unused)."""
  baseline = occlusion._check_baseline(baseline)
  if baseline == "blur":
    if blur_sigma is None or not blur_sigma > 0:
      raise ValueError(f"a blur baseline needs a positive blur_sigma in pixels, got {blur_sigma!r}")
    return baseline, float(blur_sigma)
  return baseline, 0.0


def _baselines(x: jax.Array, baseline: Any, blur_sigma: float) -> jax.Array:
  """The baseline image of each input: `[B, H, W, C]`."""
  return jax.vmap(lambda image: occlusion._baseline_image(image, baseline, blur_sigma))(x)


def _upsample(maps: jax.Array, height: int, width: int) -> jax.Array:
  """`[..., h, w]` -> `[..., height, width]`, bilinear with half-pixel centres."""
  return jax.image.resize(maps, (*maps.shape[:-2], height, width), "bilinear")


def _require_features(fns: ModelFns, method: str) -> None:
  if fns.features_fn is None:
    raise ValueError(
      f"{method} needs the model's last convolutional feature map: give FaceModel(features_fn=..., head_fn=...) "
      "or ModelFns(apply_fn, features_fn, head_fn); the gradient methods and RISE work without it"
    )


def _chunks(n: int, batch_size: int) -> tuple[int, int]:
  """(number of chunks, chunk size) covering `n` items `batch_size` at a time."""
  size = min(batch_size, n)
  return -(-n // size), size


# ----------------------------------------------------------------------------------------------------------
# Gradients.


@functools.partial(jax.jit, static_argnames=("fns", "score", "reduce"))
def _vanilla_gradient(fns, params, x, target, *, score, reduce):
  x = jnp.asarray(x)
  _check_input(x)
  targets = _targets(score, target, fns.apply_fn(params, x))
  grads = jax.grad(lambda xs: jnp.sum(_scores(score, fns.apply_fn(params, xs), targets)))(x)
  return _reduce_channels(grads, reduce)


def vanilla_gradient(
  model: FaceModel | ModelFns | Callable,
  params: Any,
  x: jax.typing.ArrayLike,
  score: occlusion.Score,
  target: jax.typing.ArrayLike | None = None,
  *,
  reduce: str = "abs_max",
) -> jax.Array:
  """Gradient of the score with respect to the input (Simonyan, Vedaldi & Zisserman 2014).

  Args:
    model: a `FaceModel`, `ModelFns` or `apply_fn(params, x) -> [B, K]`.
    params: the weights.
    x: `[B, H, W, C]` model inputs.
    score: what is explained (`occlusion.Score`).
    target: see the module docstring.
    reduce: one of `CHANNEL_REDUCTIONS`; "abs_max" (the paper's ``max_c |dS/dx_c|``) by default.

  Returns:
    `[B, H, W]` the channel-reduced gradient.

  Raises:
    ValueError: a bad setting, input or target.
  """
  fns = model_fns(model)
  return _vanilla_gradient(fns, params, x, target, score=_check_score(score), reduce=_check_reduce(reduce))


def _ig_nodes(steps: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
  """Quadrature nodes `alpha[steps]` in [0, 1] and weights summing to 1 for the path integral."""
  if rule == "gausslegendre":
    nodes, weights = np.polynomial.legendre.leggauss(steps)
    return (nodes + 1.0) / 2.0, weights / 2.0
  k = np.arange(steps, dtype=np.float64)
  if rule == "riemann_middle":
    return (k + 0.5) / steps, np.full(steps, 1.0 / steps)
  if rule == "riemann_right":
    return (k + 1.0) / steps, np.full(steps, 1.0 / steps)
  # trapezoid over steps nodes from 0 to 1 inclusive
  if steps < 2:
    raise ValueError("the trapezoid rule needs steps >= 2")
  weights = np.full(steps, 1.0 / (steps - 1))
  weights[[0, -1]] /= 2.0
  return k / (steps - 1), weights


@functools.partial(
  jax.jit, static_argnames=("fns", "score", "steps", "rule", "baseline", "blur_sigma", "reduce", "batch_size")
)
def _integrated_gradients(fns, params, x, target, *, score, steps, rule, baseline, blur_sigma, reduce, batch_size):
  x = jnp.asarray(x)
  _check_input(x)
  targets = _targets(score, target, fns.apply_fn(params, x))
  base = _baselines(x, baseline, blur_sigma)
  delta = x - base
  alphas, weights = _ig_nodes(steps, rule)
  num_chunks, size = _chunks(steps, batch_size)
  pad = num_chunks * size - steps  # padded nodes get weight 0
  alphas = jnp.asarray(np.pad(alphas, (0, pad)).reshape(num_chunks, size), x.dtype)
  weights = jnp.asarray(np.pad(weights, (0, pad)).reshape(num_chunks, size), x.dtype)
  tiled_targets = jnp.concatenate([targets] * size)  # example-major within each alpha: [size * B, ...]

  def total_score(xs):  # [size * B, H, W, C] -> []
    return jnp.sum(_scores(score, fns.apply_fn(params, xs), tiled_targets))

  def step(acc, chunk):
    alpha, weight = chunk  # [size]
    xs = base[None] + alpha[:, None, None, None, None] * delta[None]  # [size, B, H, W, C]
    grads = jax.grad(total_score)(xs.reshape(-1, *x.shape[1:])).reshape(xs.shape)
    return acc + jnp.tensordot(weight, grads, axes=1), None

  # Unrolled: XLA:CPU runs convolution gradients inside a loop about 5x slower than the same ops outside one
  # (seen on the gender model, jax 0.10), and IG needs only `steps / batch_size` chunks.
  avg_grads, _ = jax.lax.scan(step, jnp.zeros_like(x), (alphas, weights), unroll=True)
  return _reduce_channels(delta * avg_grads, reduce)


def integrated_gradients(
  model: FaceModel | ModelFns | Callable,
  params: Any,
  x: jax.typing.ArrayLike,
  score: occlusion.Score,
  target: jax.typing.ArrayLike | None = None,
  *,
  steps: int = _IG_STEPS,
  baseline: float | str | tuple[float, ...] = 0.0,
  blur_sigma: float | None = None,
  rule: str = "gausslegendre",
  reduce: str = "sum",
  batch_size: int = _BATCH_SIZE,
) -> jax.Array:
  """Integrated Gradients (Sundararajan, Taly & Yan 2017): ``(x - x') * ∫ dS/dx(x' + α (x - x')) dα``.

  With ``reduce="sum"`` the heatmap sums to ``score(x) - score(x')`` (completeness) up to quadrature error.

  Args:
    model: a `FaceModel`, `ModelFns` or `apply_fn(params, x) -> [B, K]`.
    params: the weights.
    x: `[B, H, W, C]` model inputs.
    score: what is explained (`occlusion.Score`).
    target: see the module docstring.
    steps: quadrature nodes on the path.
    baseline: `x'`: a constant in model input space (scalar or per channel), "mean" (the input's channel
      means) or "blur" (a Gaussian blur of the input, needs `blur_sigma`), as `occlusion.make_sweep`.
    blur_sigma: the blur baseline's sigma in pixels.
    rule: one of `IG_RULES`.
    reduce: one of `CHANNEL_REDUCTIONS`; "sum" keeps completeness.
    batch_size: path points per example in one forward and backward pass; the ``steps / batch_size`` chunks
      are unrolled in the program (compile time grows with their number).

  Returns:
    `[B, H, W]` attributions.

  Raises:
    ValueError: a bad setting, input or target.
  """
  fns = model_fns(model)
  if rule not in IG_RULES:
    raise ValueError(f"IG rule {rule!r} is not one of {IG_RULES}")
  baseline, blur_sigma = _check_baseline(baseline, blur_sigma)
  return _integrated_gradients(
    fns,
    params,
    x,
    target,
    score=_check_score(score),
    steps=_check_int("steps", steps),
    rule=rule,
    baseline=baseline,
    blur_sigma=blur_sigma,
    reduce=_check_reduce(reduce),
    batch_size=_check_int("batch_size", batch_size),
  )


# ----------------------------------------------------------------------------------------------------------
# CAMs.


def _feature_grads(fns: ModelFns, params, x, target, score) -> tuple[jax.Array, jax.Array]:
  """The feature map `A[B, h, w, D]` and the score's gradient with respect to it."""
  x = jnp.asarray(x)
  _check_input(x)
  features = fns.features_fn(params, x)
  if features.ndim != 4:
    raise ValueError(f"features_fn must return [B, h, w, D], got shape {features.shape}")
  targets = _targets(score, target, fns.head_fn(params, features))
  grads = jax.grad(lambda a: jnp.sum(_scores(score, fns.head_fn(params, a), targets)))(features)
  return features, grads


def _cam(features: jax.Array, weights: jax.Array, height: int, width: int) -> jax.Array:
  """``upsample(relu(sum_k w_k A_k))``: `features[B, h, w, D]`, `weights[B, D]` -> `[B, height, width]`."""
  cam = jax.nn.relu(jnp.einsum("bhwd,bd->bhw", features, weights, precision=jax.lax.Precision.HIGHEST))
  return _upsample(cam, height, width)


@functools.partial(jax.jit, static_argnames=("fns", "score"))
def _grad_cam(fns, params, x, target, *, score):
  features, grads = _feature_grads(fns, params, x, target, score)
  return _cam(features, jnp.mean(grads, axis=(1, 2)), *x.shape[1:3])


def grad_cam(
  model: FaceModel | ModelFns,
  params: Any,
  x: jax.typing.ArrayLike,
  score: occlusion.Score,
  target: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Grad-CAM (Selvaraju et al. 2017): ``ReLU(sum_k mean_ij(dS/dA_kij) A_k)``, upsampled to the input.

  Args:
    model: a `FaceModel` or `ModelFns` with `features_fn` and `head_fn`.
    params: the weights.
    x: `[B, H, W, C]` model inputs.
    score: what is explained (`occlusion.Score`).
    target: see the module docstring.

  Returns:
    `[B, H, W]`, non-negative.

  Raises:
    ValueError: the model does not expose its feature map, or a bad input or target.
  """
  fns = model_fns(model)
  _require_features(fns, "grad_cam")
  return _grad_cam(fns, params, x, target, score=_check_score(score))


@functools.partial(jax.jit, static_argnames=("fns", "score"))
def _grad_cam_plus_plus(fns, params, x, target, *, score):
  features, grads = _feature_grads(fns, params, x, target, score)
  # Chattopadhay et al. (2018) eq. 19 with an exponential of the score, whose higher derivatives are powers
  # of the first: alpha = g^2 / (2 g^2 + sum_ab A_ab g^3).
  g2, g3 = grads**2, grads**3
  sum_a = jnp.sum(features, axis=(1, 2), keepdims=True)
  denom = 2.0 * g2 + sum_a * g3
  alpha = jnp.where(grads != 0.0, g2 / jnp.where(denom != 0.0, denom, _CAMPP_EPS), 0.0)
  weights = jnp.sum(alpha * jax.nn.relu(grads), axis=(1, 2))
  return _cam(features, weights, *x.shape[1:3])


def grad_cam_plus_plus(
  model: FaceModel | ModelFns,
  params: Any,
  x: jax.typing.ArrayLike,
  score: occlusion.Score,
  target: jax.typing.ArrayLike | None = None,
) -> jax.Array:
  """Grad-CAM++ (Chattopadhay et al. 2018), with the exponential-score closed form of its alphas.

  ``w_k = sum_ij alpha_kij ReLU(g_kij)``, ``alpha = g^2 / (2 g^2 + sum_ab A_kab g^3)`` with ``g = dS/dA``, and
  the map ``ReLU(sum_k w_k A_k)`` upsampled to the input. Unlike pytorch-grad-cam, which adds 1e-7 to every
  denominator, only exactly zero denominators are guarded, so small gradients keep the paper's alphas.

  Args:
    model: a `FaceModel` or `ModelFns` with `features_fn` and `head_fn`.
    params: the weights.
    x: `[B, H, W, C]` model inputs.
    score: what is explained (`occlusion.Score`).
    target: see the module docstring.

  Returns:
    `[B, H, W]`, non-negative.

  Raises:
    ValueError: the model does not expose its feature map, or a bad input or target.
  """
  fns = model_fns(model)
  _require_features(fns, "grad_cam_plus_plus")
  return _grad_cam_plus_plus(fns, params, x, target, score=_check_score(score))


@functools.partial(jax.jit, static_argnames=("fns", "score", "baseline", "blur_sigma", "batch_size"))
def _score_cam(fns, params, x, target, *, score, baseline, blur_sigma, batch_size):
  x = jnp.asarray(x)
  _check_input(x)
  batch, height, width, _ = x.shape
  features = fns.features_fn(params, x)  # [B, h, w, D]
  outputs = fns.head_fn(params, features)
  targets = _targets(score, target, outputs)
  base = _baselines(x, baseline, blur_sigma)
  base_score = _scores(score, fns.apply_fn(params, base), targets)  # [B]
  depth = features.shape[-1]
  num_chunks, size = _chunks(depth, batch_size)
  channels = jnp.pad(jnp.moveaxis(features, -1, 0), ((0, num_chunks * size - depth), (0, 0), (0, 0), (0, 0)))
  channels = channels.reshape(num_chunks, size, batch, *features.shape[1:3])  # [n, size, B, h, w]
  tiled_targets = jnp.concatenate([targets] * size)

  def chunk(maps):  # [size, B, h, w] -> increases [size, B]
    up = _upsample(maps, height, width)  # [size, B, H, W]
    lo = jnp.min(up, axis=(2, 3), keepdims=True)
    span = jnp.max(up, axis=(2, 3), keepdims=True) - lo
    masks = jnp.where(span > 0, (up - lo) / jnp.where(span > 0, span, 1.0), 0.0)[..., None]
    masked = base[None] + masks * (x - base)[None]  # [size, B, H, W, C]
    s = _scores(score, fns.apply_fn(params, masked.reshape(-1, *x.shape[1:])), tiled_targets).reshape(size, batch)
    # Wang et al.'s increase of confidence; a constant map carries no location, so it gets no weight.
    return jnp.where(span[:, :, 0, 0] > 0, s - base_score[None], 0.0)

  weights = jax.lax.map(chunk, channels).reshape(-1, batch)[:depth].T  # [B, D]
  return _cam(features, weights, height, width)


def score_cam(
  model: FaceModel | ModelFns,
  params: Any,
  x: jax.typing.ArrayLike,
  score: occlusion.Score,
  target: jax.typing.ArrayLike | None = None,
  *,
  baseline: float | str | tuple[float, ...] = 0.0,
  blur_sigma: float | None = None,
  batch_size: int = _BATCH_SIZE,
) -> jax.Array:
  """Score-CAM (Wang et al. 2020): channels weighted by the score of the input masked by each channel.

  Each feature channel `A_k`, upsampled and min-max normalised to a mask `M_k` in [0, 1], blends the input
  with the baseline, ``x_k = x' + M_k (x - x')`` (the paper's ``x * M_k`` is a baseline of 0); its weight is
  the increase of confidence ``S(x_k) - S(x')`` and the map ``ReLU(sum_k w_k A_k)``, upsampled. The reference
  implementation weighs by the softmax probability; pass ``Score("probability")`` for its scale.

  Args:
    model: a `FaceModel` or `ModelFns` with `features_fn` and `head_fn`.
    params: the weights.
    x: `[B, H, W, C]` model inputs.
    score: what is explained (`occlusion.Score`).
    target: see the module docstring.
    baseline: `x'`, as for `integrated_gradients`.
    blur_sigma: the blur baseline's sigma in pixels.
    batch_size: channels per example in one forward pass (`B * batch_size` inputs per pass).

  Returns:
    `[B, H, W]`, non-negative.

  Raises:
    ValueError: the model does not expose its feature map, or a bad setting, input or target.
  """
  fns = model_fns(model)
  _require_features(fns, "score_cam")
  baseline, blur_sigma = _check_baseline(baseline, blur_sigma)
  return _score_cam(
    fns,
    params,
    x,
    target,
    score=_check_score(score),
    baseline=baseline,
    blur_sigma=blur_sigma,
    batch_size=_check_int("batch_size", batch_size),
  )


# ----------------------------------------------------------------------------------------------------------
# RISE.


def _rise_masks(key: jax.Array, n: int, height: int, width: int, cells: int, p: float) -> jax.Array:
  """`n` RISE masks `[n, H, W]` in [0, 1] (Petsiuk et al. 2018, section 3.2).

  A `cells` x `cells` binary grid, each cell kept with probability `p`, is upsampled bilinearly to
  ``(cells + 1) * cell_size`` pixels (``cell_size = ceil(size / cells)``) and cropped at a uniformly random
  shift in ``[0, cell_size)``, so the masks' edges fall anywhere, not on a fixed grid.
  """
  cell_h, cell_w = math.ceil(height / cells), math.ceil(width / cells)
  key_grid, key_shift = jax.random.split(key)
  grids = jax.random.bernoulli(key_grid, p, (n, cells, cells)).astype(jnp.float32)
  up = jax.image.resize(grids, (n, (cells + 1) * cell_h, (cells + 1) * cell_w), "bilinear")
  shifts = jax.random.randint(key_shift, (n, 2), 0, jnp.asarray([cell_h, cell_w]))
  return jax.vmap(lambda m, s: jax.lax.dynamic_slice(m, (s[0], s[1]), (height, width)))(up, shifts)


@functools.partial(
  jax.jit, static_argnames=("fns", "score", "num_masks", "cells", "p", "baseline", "blur_sigma", "batch_size")
)
def _rise(fns, params, x, target, key, *, score, num_masks, cells, p, baseline, blur_sigma, batch_size):
  x = jnp.asarray(x)
  _check_input(x)
  batch, height, width, _ = x.shape
  targets = _targets(score, target, fns.apply_fn(params, x))
  base = _baselines(x, baseline, blur_sigma)
  num_chunks, size = _chunks(num_masks, batch_size)
  tiled_targets = jnp.concatenate([targets] * size)

  def step(acc, i):
    masks = _rise_masks(jax.random.fold_in(key, i), size, height, width, cells, p)  # [size, H, W]
    masked = base[None] + masks[:, None, :, :, None] * (x - base)[None]  # [size, B, H, W, C]
    s = _scores(score, fns.apply_fn(params, masked.reshape(-1, *x.shape[1:])), tiled_targets).reshape(size, batch)
    s = jnp.where((i * size + jnp.arange(size) < num_masks)[:, None], s, 0.0)  # the last chunk's spares
    return acc + jnp.einsum("nb,nhw->bhw", s, masks, precision=jax.lax.Precision.HIGHEST), None

  total, _ = jax.lax.scan(step, jnp.zeros((batch, height, width), x.dtype), jnp.arange(num_chunks))
  return total / (num_masks * p)


def rise(
  model: FaceModel | ModelFns | Callable,
  params: Any,
  x: jax.typing.ArrayLike,
  score: occlusion.Score,
  target: jax.typing.ArrayLike | None = None,
  *,
  key: jax.Array | None = None,
  num_masks: int = _RISE_MASKS,
  cells: int = _RISE_CELLS,
  p: float = _RISE_P,
  baseline: float | str | tuple[float, ...] = 0.0,
  blur_sigma: float | None = None,
  batch_size: int = _BATCH_SIZE,
) -> jax.Array:
  """RISE (Petsiuk, Das & Saenko 2018): the mean of random masks weighted by the masked input's score.

  ``heatmap = sum_i S(x' + M_i (x - x')) M_i / (N p)``, Monte Carlo over `num_masks` masks. The masks are
  generated inside the program, one chunk at a time, from `key`; every example of the batch sees the same
  masks. The paper scores with the class probability (``Score("probability")``); no ReLU is applied.

  Args:
    model: a `FaceModel`, `ModelFns` or `apply_fn(params, x) -> [B, K]`.
    params: the weights.
    x: `[B, H, W, C]` model inputs.
    score: what is explained (`occlusion.Score`).
    target: see the module docstring.
    key: a `jax.random` key for the masks (a new key reuses the compiled program); default ``key(0)``.
    num_masks: N.
    cells: the grid's side in cells (the paper's s).
    p: the probability that a cell is kept.
    baseline: `x'` where a mask is 0, as for `integrated_gradients` (the paper's ``x * M`` is 0).
    blur_sigma: the blur baseline's sigma in pixels.
    batch_size: masks per example in one forward pass (`B * batch_size` inputs per pass).

  Returns:
    `[B, H, W]`.

  Raises:
    ValueError: a bad setting, input or target.
  """
  fns = model_fns(model)
  if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 < p <= 1.0:
    raise ValueError(f"p must be in (0, 1], got {p!r}")
  baseline, blur_sigma = _check_baseline(baseline, blur_sigma)
  return _rise(
    fns,
    params,
    x,
    target,
    jax.random.key(0) if key is None else key,
    score=_check_score(score),
    num_masks=_check_int("num_masks", num_masks),
    cells=_check_int("cells", cells),
    p=float(p),
    baseline=baseline,
    blur_sigma=blur_sigma,
    batch_size=_check_int("batch_size", batch_size),
  )


def _check_score(score: Any) -> occlusion.Score:
  if not isinstance(score, occlusion.Score):
    raise ValueError(f"score must be a canonsal_jax.occlusion.Score, got {score!r}")
  return score


# ----------------------------------------------------------------------------------------------------------
# Registry.

METHODS: dict[str, Callable[..., jax.Array]] = {
  "vanilla_gradient": vanilla_gradient,
  "integrated_gradients": integrated_gradients,
  "grad_cam": grad_cam,
  "grad_cam_plus_plus": grad_cam_plus_plus,
  "score_cam": score_cam,
  "rise": rise,
}


def attribute(
  name: str,
  model: FaceModel | ModelFns | Callable,
  params: Any,
  x: jax.typing.ArrayLike,
  score: occlusion.Score,
  target: jax.typing.ArrayLike | None = None,
  **settings: Any,
) -> jax.Array:
  """Runs the method `name` of `METHODS` with its keyword `settings`: `x[B, H, W, C]` -> `[B, H, W]`.

  Raises:
    ValueError: an unknown method (the message lists the known ones), or the method's own errors.
  """
  try:
    method = METHODS[name]
  except KeyError:
    raise ValueError(f"unknown attribution method {name!r}; known: {', '.join(METHODS)}") from None
  return method(model, params, x, score, target, **settings)
