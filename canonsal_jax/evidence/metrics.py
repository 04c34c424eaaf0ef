"""Faithfulness metrics for saliency maps on the model input: the paper's drop protocol, deletion/insertion, controls.

**The paper's protocol** (John et al., T-BIOM 2021, after Chattopadhay et al.'s Grad-CAM++ metrics, but
occluding the salient part instead of keeping it). For each image `x` (a model input) and each method's map `m`
on the same crop: clip at 0, give every method the same total mass (`scale_to_mass`), form the occluded input
``x * (1 - m) + b * m`` (`b` the baseline; the paper's ``x * (1 - m)`` is ``b = 0``), and score both with the
model's score `Y` (by default the probability of the target class, the unoccluded prediction):

* Average Drop % = ``100 * mean_i max(0, Y_i - O_i) / Y_i``;
* % Increase in Confidence = ``100 * mean_i [O_i > Y_i]``;
* Win % = the share of images on which the method has the largest drop among the methods compared (ties share
  the win), and pairwise, the share on which it beats each other method (ties count half).

Direction: the map hides what it says matters, so a **higher** Average Drop and a **lower** Increase in
Confidence mean the map found what the model needs. Every image keeps its own score `Y_i` and its own target (a
published implementation divides every image of a batch by the last image's score; `tests/test_metrics.py`
checks this cannot happen here). The ratio needs `Y_i > 0`: images whose unoccluded score is not positive (a
probability that underflowed to 0, a negative logit when another score kind is chosen) are excluded from all
three numbers, for every method alike, and counted in `num_excluded`; with no image left the numbers are NaN.

**Mass rule** (`MASS_RULES`). "clipped" (the default): each map is multiplied by the one factor ``s >= 0`` for
which ``sum(min(s * m, 1)) = mass * H * W``, so every method hides exactly the same amount of the image after
the clip to [0, 1] (a peaky map scaled before clipping would lose mass to the clip and hide less, for reasons
that have nothing to do with where its mass is). A map with fewer than ``mass * H * W`` positive pixels cannot
reach the target: it becomes its support (1 on every positive pixel) and its mass is reported. "before_clip":
the literal ``m * (mass * H * W / sum(m))`` then clip to [0, 1]. An all-zero map stays zero (it hides nothing).

**Deletion and insertion** (Petsiuk et al., RISE, 2018). Pixels are ranked by the map, most salient first (ties
broken by a fixed random permutation, so a uniform map is not read top to bottom); at step k of `steps` the first
``floor(k * H * W / steps)`` pixels are replaced by the substrate (deletion) or restored onto it (insertion), and
the score is recorded; the AUC is the trapezoid area under score vs the fraction of pixels changed, in [0, 1]
on the x axis. Lower deletion AUC and higher insertion AUC are better. Two substrates (`SUBSTRATES`): a constant
(the occluder's baseline) and a blurred copy of the image, since a metric that removes with the occluder's own
baseline favours occlusion maps.

**Controls.** `face_mask` (uniform saliency on the mesh's pixels) and `centred_gaussian` are maps that know
nothing about the model; `compare_with_controls` says whether a method beats them per image with a sign-flip
permutation test. `randomise_params` re-initialises a model's weights (model randomisation, Adebayo et al.
2018): a map that barely changes (`spearman` rank correlation near 1) does not explain the model.

Example:
  Lines marked +SKIP are not run as doctests: it needs a model, a batch of images and their maps.
  >>> protocol = make_protocol(model.apply_fn)  # doctest: +SKIP
  >>> result = protocol(model.params, x, maps, valid)  # x [B, H, W, C], maps [M, B, H, W]  # doctest: +SKIP
  >>> protocol_summary(result, ["cms", "grad_cam"])["cms"]["average_drop_pct"]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from canonsal_jax import occlusion, raster

__all__ = [
  "DEFAULT_MASS",
  "DEFAULT_STEPS",
  "MASS_RULES",
  "SUBSTRATES",
  "CurveResult",
  "ProtocolResult",
  "centred_gaussian",
  "compare_with_controls",
  "curve_summary",
  "face_mask",
  "make_deletion_insertion",
  "make_protocol",
  "protocol_summary",
  "randomise_params",
  "scale_to_mass",
  "spearman",
  "weight_paths",
]

# Share of the crop's pixels' worth of occlusion each map is given in the drop protocol. Our choice: the paper
# does not state one; a tenth of a 32 px crop (~100 px) is about the eyes and brows, or the mouth.
DEFAULT_MASS = 0.1
MASS_RULES = ("clipped", "before_clip")
# Deletion / insertion steps: Petsiuk et al. change 224 px per step on 224 x 224 inputs (224 steps); 64 steps
# resolve the curves of 32-64 px crops to under 2% of their pixels.
DEFAULT_STEPS = 64
SUBSTRATES = ("constant", "blur")
# Blur of the "blur" substrate as a share of the crop side: Petsiuk et al. blur 224 px inputs with sigma 5 px
# and kernel 11 px; a share keeps the same look across crop sizes.
DEFAULT_BLUR_SHARE = 5.0 / 224.0
# Model inputs per forward pass of the curves (steps are chunked).
_BATCH_SIZE = 16
# Centred Gaussian control: sigma as a share of the crop side (the face fills the middle of a face crop).
_GAUSSIAN_SIGMA = 0.25


# ------------------------------------------------------------------------------------------ mass scaling


def _scale_one(m: jax.Array, target: jax.Array, rule: str) -> jax.Array:
  """One flat non-negative map [n] scaled to `target` mass by `rule` (see the module docstring)."""
  total = jnp.sum(m)
  if rule == "before_clip":
    return jnp.clip(m * jnp.where(total > 0, target / jnp.where(total > 0, total, 1.0), 0.0), 0.0, 1.0)
  # "clipped": with the k largest values saturated, sum(min(s m, 1)) = k + s * tail_k, so s_k = (target - k) /
  # tail_k; the solution is the k at which exactly the k largest values satisfy s_k v >= 1.
  v = -jnp.sort(-m)  # descending
  n = v.shape[0]
  tail = jnp.cumsum(v[::-1])[::-1]  # tail[k] = sum(v[k:])
  k = jnp.arange(n, dtype=m.dtype)
  s = (target - k) / jnp.where(tail > 0, tail, 1.0)
  prev = jnp.concatenate([jnp.full((1,), jnp.inf, m.dtype), v[:-1]])
  slack = 1e-5  # float32 rounding of s * v at a saturation boundary
  ok = (tail > 0) & (k <= target) & (s * v <= 1.0 + slack) & (s * prev >= 1.0 - slack)
  found = jnp.any(ok)
  scale = s[jnp.argmax(ok)]
  support = (m > 0).astype(m.dtype)  # too few positive pixels to reach the target: hide them all
  return jnp.where(found, jnp.clip(m * scale, 0.0, 1.0), support)


@functools.partial(jax.jit, static_argnames=("rule",))
def scale_to_mass(
  maps: jax.typing.ArrayLike,
  valid: jax.typing.ArrayLike | None = None,
  *,
  mass: float = DEFAULT_MASS,
  rule: str = "clipped",
) -> jax.Array:
  """Clips maps at 0, zeroes invalid pixels, and scales each to the same mass in [0, 1] (module docstring).

  Args:
    maps: [..., H, W] saliency on the model input.
    valid: [..., H, W] bool pixels where the map has data (None: all); others count as 0.
    mass: target mass as a share of the H * W pixels, in (0, 1].
    rule: one of `MASS_RULES`.

  Returns:
    [..., H, W] float32 in [0, 1], each map summing to `mass * H * W` (unless it has too few positive pixels,
    or is all zero, or under "before_clip" loses mass to the clip).
  """
  if rule not in MASS_RULES:
    raise ValueError(f"mass rule {rule!r} is not one of {MASS_RULES}")
  m = jnp.maximum(jnp.nan_to_num(jnp.asarray(maps, jnp.float32), nan=0.0), 0.0)
  if valid is not None:
    m = jnp.where(jnp.asarray(valid, bool), m, 0.0)
  height, width = m.shape[-2:]
  flat = m.reshape(-1, height * width)
  target = jnp.float32(mass * height * width)
  out = jax.vmap(lambda f: _scale_one(f, target, rule))(flat)
  return out.reshape(m.shape)


# ------------------------------------------------------------------------------------------ drop protocol


class ProtocolResult(NamedTuple):
  """Per-image outcome of the drop protocol.

  Attributes:
    original: [B] the unoccluded score of each image.
    occluded: [M, B] the score of each image occluded by each method's map.
    target: [B] the target each image was scored on.
    mass: [M, B] the mass each scaled map hid (pixels' worth).
  """

  original: jax.Array
  occluded: jax.Array
  target: jax.Array
  mass: jax.Array


def _per_image_targets(score: occlusion.Score, outputs: jax.Array, target: jax.Array | None) -> jax.Array:
  if target is None:
    return jax.vmap(score.default_target)(outputs)
  target = jnp.asarray(target)
  per_example_ndim = 1 if (score.contrast or score.kind == "cosine") else 0
  if target.ndim == per_example_ndim:
    target = jnp.broadcast_to(target, (outputs.shape[0], *target.shape))
  return target


def _scores(apply_fn, score: occlusion.Score, params, x: jax.Array, target: jax.Array) -> jax.Array:
  """Scores of a batch [B, H, W, C] against per-image targets [B, ...] -> [B] (each image its own target)."""
  outputs = apply_fn(params, x)
  return jax.vmap(lambda o, t: score(o[None], t)[0])(outputs, target)


def _baseline_images(x: jax.Array, baseline: Any, blur_sigma: float) -> jax.Array:
  return jax.vmap(lambda image: occlusion._baseline_image(image, baseline, blur_sigma))(x)


def _resolve_baseline(baseline: Any, blur_sigma: float | None, size: int) -> tuple[Any, float]:
  baseline = occlusion._check_baseline(baseline)
  if baseline == "blur":
    sigma = DEFAULT_BLUR_SHARE * size if blur_sigma is None else float(blur_sigma)
    if not sigma > 0:
      raise ValueError(f"a blur needs a positive blur_sigma, got {blur_sigma!r}")
    return baseline, sigma
  return baseline, 0.0


def make_protocol(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  *,
  score: occlusion.Score | None = None,
  baseline: Any = 0.0,
  blur_sigma: float | None = None,
  mass: float = DEFAULT_MASS,
  rule: str = "clipped",
) -> Callable[..., ProtocolResult]:
  """The drop protocol as one jitted function over a batch of images and methods.

  Args:
    apply_fn: `(params, x[B, H, W, C]) -> [B, K]` the model.
    score: what is measured; default `Score("probability")`, the paper's probability of the target class.
    baseline: what the map blends towards, in model input space: a number (0: the paper's ``x * (1 - m)``), a
      per-channel tuple, "mean" or "blur" (as `occlusion.make_sweep`).
    blur_sigma: the "blur" baseline's sigma in pixels (default: `DEFAULT_BLUR_SHARE` of the side).
    mass: the share of pixels each map hides (`scale_to_mass`).
    rule: one of `MASS_RULES`.

  Returns:
    ``protocol(params, images[B, H, W, C], maps[M, B, H, W], valid=None, target=None) -> ProtocolResult``.
    `valid` ([M, B, H, W] or [B, H, W] bool) marks pixels with data; `target` is one target for the batch or
    one per image (default: each image's own prediction).
  """
  score = occlusion.Score("probability") if score is None else score
  if not isinstance(score, occlusion.Score):
    raise ValueError(f"score must be an occlusion.Score, got {score!r}")
  if rule not in MASS_RULES:
    raise ValueError(f"mass rule {rule!r} is not one of {MASS_RULES}")
  if not 0 < mass <= 1:
    raise ValueError(f"mass must be in (0, 1], got {mass}")

  @jax.jit
  def protocol(params, images, maps, valid=None, target=None) -> ProtocolResult:
    x = jnp.asarray(images, jnp.float32)
    maps = jnp.asarray(maps, jnp.float32)
    if x.ndim != 4 or maps.ndim != 4 or maps.shape[1:] != x.shape[:3]:
      raise ValueError(f"need images [B, H, W, C] and maps [M, B, H, W], got {x.shape} and {maps.shape}")
    base, sigma = _resolve_baseline(baseline, blur_sigma, x.shape[1])
    scaled = scale_to_mass(maps, valid, mass=mass, rule=rule)
    outputs = apply_fn(params, x)
    targets = _per_image_targets(score, jax.lax.stop_gradient(outputs), target)
    original = jax.vmap(lambda o, t: score(o[None], t)[0])(outputs, targets)
    b = _baseline_images(x, base, sigma)

    def one_method(m):  # [B, H, W] -> [B]
      return _scores(apply_fn, score, params, x * (1.0 - m[..., None]) + b * m[..., None], targets)

    occluded = jax.lax.map(one_method, scaled)
    return ProtocolResult(original, occluded, targets, jnp.sum(scaled, axis=(-1, -2)))

  return protocol


def protocol_summary(result: ProtocolResult, names: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Average Drop %, % Increase in Confidence and Win % per method (host-side; see the module docstring).

  Args:
    result: a `ProtocolResult` (one batch, or batches concatenated along B).
    names: the M methods' names, in the order of the maps.

  Returns:
    name -> {"average_drop_pct", "increase_in_confidence_pct", "win_pct", "pairwise_win_pct" (other name ->
    %), "mean_mass", "num_images", "num_excluded"}; percentages are over images with a positive original score
    (NaN when there are none).
  """
  original = np.asarray(result.original, np.float64)
  occluded = np.asarray(result.occluded, np.float64)
  if occluded.shape != (len(names), original.shape[0]):
    raise ValueError(f"{len(names)} names for occluded scores of shape {occluded.shape}")
  ok = original > 0
  n = int(ok.sum())
  drop = np.maximum(original[ok] - occluded[:, ok], 0.0) / original[ok]  # [M, n]
  increase = occluded[:, ok] > original[ok]
  if n:
    best = drop.max(axis=0)
    winners = drop == best
    win_credit = (winners / winners.sum(axis=0)).sum(axis=1)
  out: dict[str, dict[str, Any]] = {}
  for i, name in enumerate(names):
    pairwise = {}
    for j, other in enumerate(names):
      if j != i:
        share = (np.sum(drop[i] > drop[j]) + 0.5 * np.sum(drop[i] == drop[j])) / n if n else np.nan
        pairwise[other] = 100.0 * float(share)
    out[name] = {
      "average_drop_pct": 100.0 * float(drop[i].mean()) if n else float("nan"),
      "increase_in_confidence_pct": 100.0 * float(increase[i].mean()) if n else float("nan"),
      "win_pct": 100.0 * float(win_credit[i]) / n if n else float("nan"),
      "pairwise_win_pct": pairwise,
      "mean_mass": float(np.mean(np.asarray(result.mass)[i])),
      "num_images": n,
      "num_excluded": int((~ok).sum()),
    }
  return out


# ------------------------------------------------------------------------------------------ deletion, insertion


class CurveResult(NamedTuple):
  """Deletion and insertion curves of a batch.

  Attributes:
    fraction: [S + 1] share of the pixels changed at each step, 0 to 1.
    deletion: [B, S + 1] score as the most salient pixels are replaced by the substrate.
    insertion: [B, S + 1] score as the most salient pixels are restored onto the substrate.
    deletion_auc: [B] trapezoid area under `deletion` over `fraction` (lower is better).
    insertion_auc: [B] area under `insertion` (higher is better).
    target: [B] the target each image was scored on.
  """

  fraction: jax.Array
  deletion: jax.Array
  insertion: jax.Array
  deletion_auc: jax.Array
  insertion_auc: jax.Array
  target: jax.Array


def _ranks(m: jax.Array, valid: jax.Array, tiebreak: jax.Array) -> jax.Array:
  """Rank of each pixel [n] (0 = most salient); invalid pixels after every valid one; ties by `tiebreak`."""
  key = jnp.where(valid, -m, jnp.inf)
  order = jnp.lexsort((tiebreak, key))
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _trapezoid(y: jax.Array, x: jax.Array) -> jax.Array:
  return jnp.sum(0.5 * (y[..., 1:] + y[..., :-1]) * (x[1:] - x[:-1]), axis=-1)


def make_deletion_insertion(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  *,
  score: occlusion.Score | None = None,
  steps: int = DEFAULT_STEPS,
  substrate: str = "blur",
  constant: Any = 0.0,
  blur_sigma: float | None = None,
  batch_size: int = _BATCH_SIZE,
) -> Callable[..., CurveResult]:
  """Deletion and insertion curves as one jitted function over a batch of images and their maps.

  Args:
    apply_fn: `(params, x[B, H, W, C]) -> [B, K]`.
    score: what is measured (default `Score("probability")`).
    steps: S, the number of steps from nothing changed to every pixel changed.
    substrate: "constant" (the value `constant`, e.g. the occluder's baseline in model input space) or "blur"
      (a Gaussian-blurred copy of the image).
    constant: the constant substrate: a number or a per-channel tuple in model input space, or "mean".
    blur_sigma: the blur's sigma in pixels (default `DEFAULT_BLUR_SHARE` of the side).
    batch_size: steps per forward pass (each of B images), bounding memory to ``B * batch_size`` inputs.

  Returns:
    ``curves(params, images[B, H, W, C], maps[B, H, W], valid=None, target=None, key=None) -> CurveResult``;
    `key` seeds the tie-breaking permutation (default `jax.random.key(0)`, the same for every method, so
    equal maps give equal curves).
  """
  score = occlusion.Score("probability") if score is None else score
  if substrate not in SUBSTRATES:
    raise ValueError(f"substrate {substrate!r} is not one of {SUBSTRATES}")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

  @jax.jit
  def curves(params, images, maps, valid=None, target=None, key=None) -> CurveResult:
    x = jnp.asarray(images, jnp.float32)
    maps = jnp.nan_to_num(jnp.asarray(maps, jnp.float32), nan=-jnp.inf)
    batch, height, width, _ = x.shape
    if maps.shape != (batch, height, width):
      raise ValueError(f"need maps [B, H, W] for images {x.shape}, got {maps.shape}")
    n = height * width
    valid_ = jnp.ones(maps.shape, bool) if valid is None else jnp.asarray(valid, bool)
    key_ = jax.random.key(0) if key is None else key
    tiebreak = jax.random.permutation(key_, n)
    ranks = jax.vmap(lambda m, v: _ranks(m.reshape(-1), v.reshape(-1), tiebreak))(maps, valid_)
    ranks = ranks.reshape(batch, height, width)
    if substrate == "blur":
      base, sigma = _resolve_baseline("blur", blur_sigma, height)
    else:
      base, sigma = _resolve_baseline(constant, None, height)
    sub = _baseline_images(x, base, sigma)
    outputs = apply_fn(params, x)
    targets = _per_image_targets(score, jax.lax.stop_gradient(outputs), target)
    counts = (jnp.arange(steps + 1) * n) // steps  # exact integers: 0 ... n

    def at_step(count):  # [] -> ([B], [B])
      changed = (ranks < count)[..., None]
      deleted = _scores(apply_fn, score, params, jnp.where(changed, sub, x), targets)
      inserted = _scores(apply_fn, score, params, jnp.where(changed, x, sub), targets)
      return deleted, inserted

    deletion, insertion = jax.lax.map(at_step, counts, batch_size=min(batch_size, steps + 1))
    fraction = counts.astype(jnp.float32) / n
    deletion, insertion = deletion.T, insertion.T
    return CurveResult(
      fraction, deletion, insertion, _trapezoid(deletion, fraction), _trapezoid(insertion, fraction), targets
    )

  return curves


def curve_summary(results: Mapping[str, CurveResult]) -> dict[str, dict[str, float]]:
  """Mean deletion and insertion AUC per method (host-side): name -> {"deletion_auc", "insertion_auc"}."""
  return {
    name: {
      "deletion_auc": float(np.mean(np.asarray(r.deletion_auc))),
      "insertion_auc": float(np.mean(np.asarray(r.insertion_auc))),
    }
    for name, r in results.items()
  }


# ------------------------------------------------------------------------------------------ controls


def face_mask(
  vertices_in_crop: jax.typing.ArrayLike,
  triangles: jax.typing.ArrayLike,
  crop_size: int,
  *,
  max_box: int = raster.DEFAULT_MAX_BOX,
  max_oversized: int = 64,
) -> jax.Array:
  """The uniform face control: 1 on crop pixels the fitted mesh covers, 0 elsewhere, [S, S] float32.

  Args:
    vertices_in_crop: [V, 3] the fitted mesh in crop x, y, depth (`canonical.mesh_to_crop`).
    triangles: [F, 3] int.
    crop_size: S.
    max_box, max_oversized: as in `raster.rasterize`.
  """
  frags = raster.rasterize(
    vertices_in_crop, triangles, crop_size, crop_size, max_box=max_box, max_oversized=max_oversized
  )
  return (frags.tri_id >= 0).astype(jnp.float32)


def centred_gaussian(height: int, width: int | None = None, *, sigma: float = _GAUSSIAN_SIGMA) -> np.ndarray:
  """The centre-bias control: an isotropic Gaussian at the crop's centre, peak 1, [H, W] float32 (numpy).

  Args:
    height: H.
    width: W (default H).
    sigma: standard deviation as a share of the shorter side.
  """
  width = height if width is None else width
  i, j = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
  s = sigma * min(height, width)
  g = np.exp(-0.5 * (((i - (height - 1) / 2) / s) ** 2 + ((j - (width - 1) / 2) / s) ** 2))
  return g.astype(np.float32)


def _average_ranks(x: jax.Array, valid: jax.Array) -> jax.Array:
  """Ranks 1..n_valid of the valid entries of flat `x`, ties averaged; invalid entries get 0."""
  key = jnp.where(valid, x, jnp.inf)
  ordered = jnp.sort(key)
  lo = jnp.searchsorted(ordered, key, side="left")
  hi = jnp.searchsorted(ordered, key, side="right")
  return jnp.where(valid, (lo + hi + 1) / 2.0, 0.0)


@jax.jit
def spearman(a: jax.typing.ArrayLike, b: jax.typing.ArrayLike, valid: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Spearman rank correlation of two maps over their common valid entries (ties get average ranks).

  Args:
    a: [..., H, W] maps (the last two axes are one map; leading axes are a batch).
    b: [..., H, W] the maps to compare with.
    valid: same shape bool, entries to compare (None: all finite entries of both).

  Returns:
    [...] correlation in [-1, 1] per map; NaN where fewer than two valid entries or a map is constant there.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  ok = jnp.isfinite(a) & jnp.isfinite(b)
  if valid is not None:
    ok &= jnp.asarray(valid, bool)
  lead = a.shape[:-2]
  flat = lambda t: t.reshape(-1, a.shape[-2] * a.shape[-1])
  a, b, ok = flat(a), flat(b), flat(ok)

  def one(a, b, ok):
    ra, rb = _average_ranks(a, ok), _average_ranks(b, ok)
    n = jnp.sum(ok)
    ma, mb = jnp.sum(ra) / n, jnp.sum(rb) / n
    da, db = jnp.where(ok, ra - ma, 0.0), jnp.where(ok, rb - mb, 0.0)
    den = jnp.sqrt(jnp.sum(da * da) * jnp.sum(db * db))
    return jnp.where((n >= 2) & (den > 0), jnp.sum(da * db) / jnp.where(den > 0, den, 1.0), jnp.nan)

  return jax.vmap(one)(a, b, ok).reshape(lead)


def compare_with_controls(
  per_image: Mapping[str, Any],
  controls: Sequence[str],
  *,
  higher_is_better: bool = True,
  num_permutations: int = 9999,
  seed: int = 0,
) -> dict[str, dict[str, dict[str, float]]]:
  """Whether each method beats each control on a per-image metric: paired, with a sign-flip permutation test.

  Args:
    per_image: name -> [N] the metric per image (methods and controls, the same images in the same order;
      NaN entries, e.g. excluded images, are left out of each pair).
    controls: the names in `per_image` that are controls.
    higher_is_better: the metric's direction (Average Drop: True; deletion AUC: False).
    num_permutations: random sign flips (the p-value's resolution is 1 / (num_permutations + 1)).
    seed: the permutations' seed.

  Returns:
    method -> control -> {"mean_difference" (method - control, in the better direction's sign: > 0 = method
    better), "share_better" (images where the method is better; ties half), "p_value" (one-sided, method
    better), "num_images"}.
  """
  rng = np.random.default_rng(seed)
  out: dict[str, dict[str, dict[str, float]]] = {}
  sign = 1.0 if higher_is_better else -1.0
  for method, values in per_image.items():
    if method in controls:
      continue
    out[method] = {}
    for control in controls:
      d = sign * (np.asarray(values, np.float64) - np.asarray(per_image[control], np.float64))
      d = d[np.isfinite(d)]
      n = d.size
      if n == 0:
        out[method][control] = {"mean_difference": np.nan, "share_better": np.nan, "p_value": np.nan, "num_images": 0}
        continue
      flips = rng.choice(np.array([-1.0, 1.0]), size=(num_permutations, n))
      null = (flips * d).mean(axis=1)
      observed = d.mean()
      p = (1 + np.sum(null >= observed - 1e-12 * max(1.0, abs(observed)))) / (num_permutations + 1)
      out[method][control] = {
        "mean_difference": float(observed),
        "share_better": float((np.sum(d > 0) + 0.5 * np.sum(d == 0)) / n),
        "p_value": float(p),
        "num_images": int(n),
      }
  return out


# ------------------------------------------------------------------------------------------ model randomisation


def _path_name(path) -> str:
  return jax.tree_util.keystr(path)


def weight_paths(params: Any) -> list[str]:
  """The names (`jax.tree_util.keystr` paths) of the weight leaves `randomise_params` re-draws, in tree order.

  Weight leaves are arrays of rank >= 2 (convolution and dense kernels). For cascading randomisation
  (Adebayo et al.), randomise the last k of them: ``randomise_params(p, key, select=set(weight_paths(p)[-k:]))``
  (tree order follows the names, which for the ported models is the layer order within each block).
  """
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [_path_name(path) for path, leaf in leaves if np.ndim(leaf) >= 2]


def randomise_params(params: Any, key: jax.Array, *, select: Callable[[str], bool] | set[str] | None = None) -> Any:
  """Re-initialises a model's weights layer by layer, keeping every shape, dtype and each layer's scale.

  Every weight leaf (rank >= 2: convolution and dense kernels) that `select` picks is replaced by independent
  normal draws with that leaf's own mean and standard deviation, so activations keep their magnitude while
  everything learned is gone. Rank-0/1 leaves (biases, folded batch-norm scales and offsets, running
  statistics) are kept: they set scales, not what the network looks at, and re-drawing running statistics
  would only make activations explode.

  Args:
    params: the weight pytree (a `flax.nnx.State`, dicts, ...).
    key: a PRNG key; each leaf gets its own fold of it.
    select: which weight leaves to re-draw, by their `jax.tree_util.keystr` path (a predicate or a set);
      None: all of them.

  Returns:
    A pytree of the same structure.
  """
  if isinstance(select, set | frozenset):
    chosen = select
    select = lambda name: name in chosen
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  picked = [
    i for i, (path, leaf) in enumerate(leaves) if np.ndim(leaf) >= 2 and (select is None or select(_path_name(path)))
  ]
  drawn = _redraw(key, tuple(picked), tuple(jnp.asarray(leaves[i][1]) for i in picked))
  out = [leaf for _, leaf in leaves]
  for i, new in zip(picked, drawn):
    out[i] = new
  return jax.tree_util.tree_unflatten(treedef, out)


@functools.partial(jax.jit, static_argnames=("ids",))
def _redraw(key: jax.Array, ids: tuple[int, ...], arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
  """Normal draws with each array's own mean and std, keyed by its leaf index (one program for all leaves)."""
  out = []
  for i, a in zip(ids, arrays):
    a32 = a.astype(jnp.float32)
    draw = jax.random.normal(jax.random.fold_in(key, i), a.shape, jnp.float32) * jnp.std(a32) + jnp.mean(a32)
    out.append(draw.astype(a.dtype))
  return tuple(out)
