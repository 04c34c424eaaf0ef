"""Faithfulness metrics for saliency maps on the model input: two drop protocols, deletion/insertion, controls.

Two drop protocols (`PROTOCOLS`) share the paper's three numbers (John et al., T-BIOM 2021, after Chattopadhay
et al.'s Grad-CAM++ metrics, but hiding the salient part instead of keeping it). For each image, each method's
map `m` makes an occluded image scored `O`, against the unoccluded score `Y` (by default the softmax probability
of the class predicted on the unoccluded image):

* Average Drop % = ``100 * mean_i max(0, Y_i - O_i) / Y_i``;
* % Increase in Confidence = ``100 * mean_i [O_i > Y_i]``;
* Win % = the share of images on which the method wins among the methods compared (ties share the win), and
  pairwise, the share on which it beats each other method (ties count half). `WIN_RULES`: "largest_drop"
  (the mass protocol) or "lowest_score" (the paper's: the lowest `O`; it differs only where several maps raise
  the score, all with a drop of 0).

Direction: the map hides what it says matters, so a **higher** Average Drop and Win % and a **lower** Increase
in Confidence mean the map found what the model needs. Every image keeps its own score `Y_i` and its own target
(a published implementation divides every image of a batch by the last image's score; `tests/test_metrics.py`
checks this cannot happen here). The ratio needs `Y_i > 0`: images whose unoccluded score is not positive (a
probability that underflowed to 0, a negative logit when another score kind is chosen) are excluded from all
three numbers, for every method alike, and counted in `num_excluded`; with no image left the numbers are NaN.

**The mass protocol** (`make_mass_protocol`, ours). Every map is clipped at 0 and given the same total mass
(`scale_to_mass`, a share of the crop), and the occluded input is ``x * (1 - m) + b * m`` in model-input space
(`b` the baseline, 0 by default). Every method hides the same amount, whatever the CMS's own mass; one jitted
program.

**The paper's protocol** (`make_paper_protocol`, as the authors' released code computes it). Every map is
clipped at 0 and min-max scaled to [0, 1]; each rival map is then rescaled so that its sum equals the reference
map's (the CMS carried onto that face) on the same image (`paper_scale`: every method hides the CMS's own mass,
not a fixed share, and a rescaled map may exceed 1). The explanation image is the photo crop's pixels in [0, 1]
times ``1 - m`` per channel, written as an 8-bit image (``(x * 255).astype(uint8)``) and read back through the
model's own preprocessing (`explanation_images`): the substitute is black in pixel space. Where a rescaled map
exceeds 1, ``1 - m`` is negative, and the published 8-bit cast wraps around modulo 256 instead of clipping
(numpy's cast on x86-64), leaving bright garbage where the map is largest; `paper_as_published=True` keeps
that defect, the default clips to [0, 1] before the cast. Win % is the lowest `O` ("lowest_score").
`paper_table` adds bootstrap intervals and paired tests of the reference method against each rival.

**The headline protocol** (no method's home ground). Both protocols above replace hidden pixels with something
one of the compared methods uses itself: 0 in model input space, or black in pixel space, is the occlusion
sweep's and so the CMS's default baseline, and Integrated Gradients', Score-CAM's and RISE's fill; a method
scored with its own baseline has a home advantage. The headline protocol hides with a copy of the photo
blurred in pixel space (`pixel_blur`, a Gaussian of `HEADLINE_BLUR_SHARE` of the crop side, read back through
the model's preprocessing), which is none of the methods' baselines; every map is given the same mass
(`HEADLINE_MASS` of the crop, the mass protocol's "clipped" rule), and the deletion and insertion curves use
the same blurred photo as their substrate. `headline_table` tests the CMS against every other map on all five
figures, as `paper_table` does. The substitute is passed at call time (`substitute=` of the mass protocol and of
the curves), blended in model input space, which is the pixel-space blend wherever the preprocessing is a
per-pixel affine map (every built-in model's normalisation).

**Mass rule** of the mass protocol (`MASS_RULES`). "clipped" (the default): each map is multiplied by the one
factor ``s >= 0`` for which ``sum(min(s * m, 1)) = mass * H * W``, so every method hides exactly the same amount
of the image after the clip to [0, 1] (a peaky map scaled before clipping would lose mass to the clip and hide
less, for reasons that have nothing to do with where its mass is). A map with fewer than ``mass * H * W``
positive pixels cannot reach the target: it becomes its support (1 on every positive pixel) and its mass is
reported. "before_clip": the literal ``m * (mass * H * W / sum(m))`` then clip to [0, 1]. An all-zero map stays
zero (it hides nothing).

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
  >>> protocol = make_mass_protocol(model.apply_fn)  # doctest: +SKIP
  >>> result = protocol(model.params, x, maps, valid)  # x [B, H, W, C], maps [M, B, H, W]  # doctest: +SKIP
  >>> protocol_summary(result, ["cms", "grad_cam"])["cms"]["average_drop_pct"]  # doctest: +SKIP
  >>> paper = make_paper_protocol(model.apply_fn, model.preprocess)  # doctest: +SKIP
  >>> result = paper(model.params, crops, maps, valid)  # crops uint8 [B, H, W, 3]  # doctest: +SKIP
  >>> paper_table(result, ["cms", "grad_cam"], reference="cms")["rows"][0]["win_pct"]  # doctest: +SKIP
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy.typing as npt

from canonsal_jax import occlusion, raster
from canonsal_jax.evidence import stats

__all__ = [
  "DEFAULT_MASS",
  "DEFAULT_STEPS",
  "HEADLINE_BLUR_SHARE",
  "HEADLINE_FIGURES",
  "HEADLINE_MASS",
  "MASS_RULES",
  "PAPER_FIGURES",
  "PROTOCOLS",
  "SUBSTRATES",
  "WIN_RULES",
  "CurveResult",
  "ProtocolResult",
  "centred_gaussian",
  "compare_with_controls",
  "comparison_table",
  "curve_summary",
  "explanation_images",
  "face_mask",
  "headline_blur_sigma",
  "headline_table",
  "make_deletion_insertion",
  "make_mass_protocol",
  "make_paper_protocol",
  "minmax_scale",
  "paper_scale",
  "paper_table",
  "per_image_outcomes",
  "pixel_blur",
  "protocol_summary",
  "randomise_params",
  "scale_to_mass",
  "spearman",
  "uint8_cast",
  "weight_paths",
]

# Share of the crop's pixels' worth of occlusion each map is given in the mass protocol. Our choice: the paper
# does not state one; a tenth of a 32 px crop (~100 px) is about the eyes and brows, or the mouth.
DEFAULT_MASS = 0.1
MASS_RULES = ("clipped", "before_clip")
# The drop protocols (module docstring): the headline (a blurred photo, no method's own baseline); ours, every
# map the same mass with a constant substitute; the paper's, as its released code.
PROTOCOLS = ("blur", "mass", "paper")
# Who wins an image among the methods compared: the largest drop (mass protocol) or the lowest occluded score
# (the paper's code).
WIN_RULES = ("largest_drop", "lowest_score")
# The paper's table, in its order, and the direction in which each figure is better (+1: higher).
PAPER_FIGURES = ("average_drop_pct", "increase_in_confidence_pct", "win_pct")
_BETTER = {"average_drop_pct": 1.0, "increase_in_confidence_pct": -1.0, "win_pct": 1.0}
# The headline protocol's curve figures and their directions (+1: higher is better).
_CURVE_BETTER = {"deletion_auc": -1.0, "insertion_auc": 1.0}
HEADLINE_FIGURES = (*PAPER_FIGURES, *_CURVE_BETTER)
# The headline protocol (module docstring): every map hides this share of the crop, and hidden pixels become a
# copy of the photo blurred in pixel space with a Gaussian of this share of the crop side (2 px on the 32 px
# gender crop, 4 px at 64 px, 9.4 px at 150 px: eyes, brows and mouth lose their shape, the face's layout and
# colours stay). Our choice: strong enough to remove a feature, unlike `DEFAULT_BLUR_SHARE`'s 0.7 px at 32 px.
HEADLINE_MASS = DEFAULT_MASS
HEADLINE_BLUR_SHARE = 1.0 / 16.0
# Explanation images per forward pass of the paper's protocol (bounds memory; one program per pass shape).
_PAPER_BATCH = 64
# The paper's 8-bit images: pixels in [0, 1] times this, cast to uint8.
_UINT8_SCALE = 255.0
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
    mass: [M, B] the sum of each scaled map (pixels' worth of occlusion).
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


def _given_substitute(substitute: Any, x: jax.Array) -> jax.Array:
  sub = jnp.asarray(substitute, jnp.float32)
  if sub.shape != x.shape:
    raise ValueError(f"need a substitute image per input, {x.shape}, got {sub.shape}")
  return sub


def _resolve_baseline(baseline: Any, blur_sigma: float | None, size: int) -> tuple[Any, float]:
  baseline = occlusion._check_baseline(baseline)
  if baseline == "blur":
    sigma = DEFAULT_BLUR_SHARE * size if blur_sigma is None else float(blur_sigma)
    if not sigma > 0:
      raise ValueError(f"a blur needs a positive blur_sigma, got {blur_sigma!r}")
    return baseline, sigma
  return baseline, 0.0


def make_mass_protocol(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  *,
  score: occlusion.Score | None = None,
  baseline: Any = 0.0,
  blur_sigma: float | None = None,
  mass: float = DEFAULT_MASS,
  rule: str = "clipped",
) -> Callable[..., ProtocolResult]:
  """The mass protocol (module docstring) as one jitted function over a batch of images and methods.

  Args:
    apply_fn: `(params, x[B, H, W, C]) -> [B, K]` the model.
    score: what is measured; default `Score("probability")`, the paper's probability of the target class.
    baseline: what the map blends towards, in model input space: a number (0: the paper's ``x * (1 - m)``), a
      per-channel tuple, "mean" or "blur" (as `occlusion.make_sweep`).
    blur_sigma: the "blur" baseline's sigma in pixels (default: `DEFAULT_BLUR_SHARE` of the side).
    mass: the share of pixels each map hides (`scale_to_mass`).
    rule: one of `MASS_RULES`.

  Returns:
    ``protocol(params, images[B, H, W, C], maps[M, B, H, W], valid=None, target=None, substitute=None) ->
    ProtocolResult``. `valid` ([M, B, H, W] or [B, H, W] bool) marks pixels with data; `target` is one target
    for the batch or one per image (default: each image's own prediction); `substitute` ([B, H, W, C], model
    input space) replaces `baseline`: what each image's hidden pixels become (the headline protocol's blurred
    photo, `pixel_blur`).
  """
  score = occlusion.Score("probability") if score is None else score
  if not isinstance(score, occlusion.Score):
    raise ValueError(f"score must be an occlusion.Score, got {score!r}")
  if rule not in MASS_RULES:
    raise ValueError(f"mass rule {rule!r} is not one of {MASS_RULES}")
  if not 0 < mass <= 1:
    raise ValueError(f"mass must be in (0, 1], got {mass}")

  @jax.jit
  def protocol(params, images, maps, valid=None, target=None, substitute=None) -> ProtocolResult:
    x = jnp.asarray(images, jnp.float32)
    maps = jnp.asarray(maps, jnp.float32)
    if x.ndim != 4 or maps.ndim != 4 or maps.shape[1:] != x.shape[:3]:
      raise ValueError(f"need images [B, H, W, C] and maps [M, B, H, W], got {x.shape} and {maps.shape}")
    scaled = scale_to_mass(maps, valid, mass=mass, rule=rule)
    outputs = apply_fn(params, x)
    targets = _per_image_targets(score, jax.lax.stop_gradient(outputs), target)
    original = jax.vmap(lambda o, t: score(o[None], t)[0])(outputs, targets)
    b = (
      _given_substitute(substitute, x)
      if substitute is not None
      else _baseline_images(x, *_resolve_baseline(baseline, blur_sigma, x.shape[1]))
    )

    def one_method(m):  # [B, H, W] -> [B]
      return _scores(apply_fn, score, params, x * (1.0 - m[..., None]) + b * m[..., None], targets)

    occluded = jax.lax.map(one_method, scaled)
    return ProtocolResult(original, occluded, targets, jnp.sum(scaled, axis=(-1, -2)))

  return protocol


# ------------------------------------------------------------------------------------------ the paper's protocol


@jax.jit
def minmax_scale(maps: jax.typing.ArrayLike, valid: jax.typing.ArrayLike | None = None) -> jax.Array:
  """Clips each map at 0 and min-max scales it to [0, 1]: the paper's normalisation of every map.

  Args:
    maps: [..., H, W] saliency on the model input (NaN counts as 0).
    valid: [..., H, W] bool pixels where the map has data (None: all); the others count as 0 before the scaling.

  Returns:
    [..., H, W] float32, ``(m - min m) / (max m - min m)`` of each clipped map; 0 where a map is constant (the
    published code divides by 0 there; a constant map says nothing about where to look).
  """
  m = jnp.maximum(jnp.nan_to_num(jnp.asarray(maps, jnp.float32), nan=0.0), 0.0)
  if valid is not None:
    m = jnp.where(jnp.asarray(valid, bool), m, 0.0)
  lo = jnp.min(m, axis=(-2, -1), keepdims=True)
  span = jnp.max(m, axis=(-2, -1), keepdims=True) - lo
  return jnp.where(span > 0, (m - lo) / jnp.where(span > 0, span, 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=("reference",))
def paper_scale(
  maps: jax.typing.ArrayLike, valid: jax.typing.ArrayLike | None = None, *, reference: int = 0
) -> jax.Array:
  """The paper's maps: min-max scaled, then each rescaled to the reference map's sum on the same image.

  Args:
    maps: [M, B, H, W] the M methods' maps of B images.
    valid: [M, B, H, W] or [B, H, W] bool pixels with data (None: all).
    reference: the index of the method whose sum every map is given (the CMS carried onto the face); its own
      map is only min-max scaled.

  Returns:
    [M, B, H, W] float32, non-negative, each image's maps summing to the reference map's sum (a map that is 0
    everywhere stays 0). Not clipped: a rescaled map may exceed 1, as in the paper.
  """
  scaled = minmax_scale(maps, valid)
  if scaled.ndim != 4 or not 0 <= reference < scaled.shape[0]:
    raise ValueError(f"need maps [M, B, H, W] and a reference in [0, M), got {scaled.shape} and {reference}")
  total = jnp.sum(scaled, axis=(-2, -1), keepdims=True)  # [M, B, 1, 1]
  factor = jnp.where(total > 0, total[reference] / jnp.where(total > 0, total, 1.0), 0.0)
  return scaled * factor


def uint8_cast(values: npt.ArrayLike) -> np.ndarray:
  """Floats to uint8 as numpy's ``astype(np.uint8)`` does on x86-64: truncated toward 0, then wrapped modulo 256.

  C leaves an out-of-range float-to-integer cast undefined; numpy on x86-64 converts to a wide integer and keeps
  its low 8 bits (-1.7 -> 255, 300.2 -> 44), while on ARM it saturates. Written out, the paper's 8-bit images
  come out the same on every machine.

  Args:
    values: finite floats.

  Returns:
    uint8 array of the same shape.
  """
  v = np.trunc(np.asarray(values))
  return np.mod(v.astype(np.int64), 256).astype(np.uint8)


def explanation_images(crops: npt.ArrayLike, maps: npt.ArrayLike, *, paper_as_published: bool = False) -> np.ndarray:
  """The paper's explanation images: the crop's pixels in [0, 1] times ``1 - map`` per channel, in 8 bits.

  Args:
    crops: [..., H, W, C] uint8 face crops at the model's input size.
    maps: [..., H, W] maps scaled by `paper_scale` (broadcast against the crops' leading axes: maps
      [M, B, H, W] with crops [B, H, W, C] give [M, B, H, W, C]).
    paper_as_published: keep the published defect: where a map exceeds 1 the negative pixel values wrap
      around in the 8-bit cast (`uint8_cast`). False: clip to [0, 1] before the cast.

  Returns:
    uint8 [..., H, W, C]: ``uint8_cast(255 * x * (1 - m))`` in float32, x = crop / 255.

  Raises:
    ValueError: the crops are not uint8.
  """
  crops = np.asarray(crops)
  if crops.dtype != np.uint8:
    raise ValueError(f"explanation images need uint8 crops, got {crops.dtype}")
  scale = np.float32(_UINT8_SCALE)
  x = crops.astype(np.float32) / scale
  e = x * (np.float32(1.0) - np.asarray(maps, np.float32)[..., None])
  if not paper_as_published:
    e = np.clip(e, np.float32(0.0), np.float32(1.0))
  return uint8_cast(e * scale)


def make_paper_protocol(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  preprocess: Callable[[np.ndarray], np.ndarray],
  *,
  score: occlusion.Score | None = None,
  reference: int = 0,
  paper_as_published: bool = False,
  batch_size: int = _PAPER_BATCH,
) -> Callable[..., ProtocolResult]:
  """The paper's drop protocol (module docstring) over a batch of face crops and methods.

  A host function around two jitted programs (the scaling and the forward pass): the explanation image is an
  8-bit image read back through `preprocess`, a host function of a uint8 crop (`FaceModel.preprocess`: PIL
  resizes, numpy normalisations), so the 8-bit images are made and preprocessed in numpy between them.

  Args:
    apply_fn: `(params, x[B, H, W, C]) -> [B, K]` the model.
    preprocess: `(crop uint8 [H, W, 3]) -> float32 model input`, the model's own (`FaceModel.preprocess`).
    score: what is measured; default `Score("probability")`, the paper's softmax probability of the target.
    reference: the index among the maps of the method whose sum every map is given (the CMS).
    paper_as_published: keep the published 8-bit wrap-around (`explanation_images`); False clips.
    batch_size: explanation images per forward pass (the last pass is padded: one compiled program).

  Returns:
    ``protocol(params, crops[B, H, W, 3] uint8, maps[M, B, H, W], valid=None, target=None) -> ProtocolResult``
    (`mass`: each map's sum after `paper_scale`). `valid` ([M, B, H, W] or [B, H, W] bool) marks pixels with
    data; `target` is one target for the batch or one per image (default: each image's prediction on the
    unaltered crop).
  """
  score = occlusion.Score("probability") if score is None else score
  if not isinstance(score, occlusion.Score):
    raise ValueError(f"score must be an occlusion.Score, got {score!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

  @jax.jit
  def unaltered(params, x, target):
    outputs = apply_fn(params, x)
    targets = _per_image_targets(score, jax.lax.stop_gradient(outputs), target)
    return jax.vmap(lambda o, t: score(o[None], t)[0])(outputs, targets), targets

  scores = jax.jit(functools.partial(_scores, apply_fn, score))

  def protocol(params, crops, maps, valid=None, target=None) -> ProtocolResult:
    crops = np.asarray(crops)
    maps = np.asarray(maps, np.float32)
    if crops.dtype != np.uint8 or crops.ndim != 4 or maps.ndim != 4 or maps.shape[1:] != crops.shape[:3]:
      raise ValueError(
        f"need uint8 crops [B, H, W, C] and maps [M, B, H, W], got {crops.dtype} {crops.shape} and {maps.shape}"
      )
    if not 0 <= reference < maps.shape[0]:
      raise ValueError(f"reference {reference} is not one of the {maps.shape[0]} maps")
    scaled = np.asarray(paper_scale(maps, valid, reference=reference))
    original, targets = unaltered(params, np.stack([preprocess(c) for c in crops]), target)
    images = explanation_images(crops, scaled, paper_as_published=paper_as_published)  # [M, B, H, W, C]
    x = np.stack([preprocess(image) for image in images.reshape(-1, *crops.shape[1:])])  # [M * B, ...]
    t = np.tile(np.asarray(targets), (maps.shape[0],) + (1,) * (np.ndim(targets) - 1))
    n = x.shape[0]
    pad = -n % min(batch_size, n)
    x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
    t = np.concatenate([t, np.repeat(t[:1], pad, axis=0)])
    step = min(batch_size, n)
    occluded = np.concatenate([np.asarray(scores(params, x[i : i + step], t[i : i + step])) for i in range(0, n, step)])
    return ProtocolResult(
      original, jnp.asarray(occluded[:n].reshape(maps.shape[:2])), targets, jnp.asarray(scaled.sum(axis=(-2, -1)))
    )

  return protocol


# ------------------------------------------------------------------------------------------ the headline substitute


def headline_blur_sigma(side: int) -> float:
  """The headline protocol's blur, in pixels of a crop `side` pixels wide: `HEADLINE_BLUR_SHARE` of the side."""
  return HEADLINE_BLUR_SHARE * float(side)


def pixel_blur(crops: npt.ArrayLike, *, sigma: float) -> np.ndarray:
  """The headline protocol's substitute: each crop blurred in pixel space, as an 8-bit image.

  A Gaussian of `sigma` pixels over rows and columns (`scipy.ndimage.gaussian_filter`, edges reflected, 4 sigma
  each side), each channel apart, on the 8-bit pixels, rounded back to uint8: a blurred copy of the photo, which
  the model then reads through its own preprocessing. It is none of the methods' own occlusion baselines (black
  or a constant in model input space, the crop's mean, or `occlusion`'s light "blur" of the model input).

  Args:
    crops: [..., H, W, C] uint8.
    sigma: the Gaussian's standard deviation in pixels, > 0.

  Returns:
    uint8 [..., H, W, C].
  """
  crops = np.asarray(crops)
  if crops.dtype != np.uint8 or crops.ndim < 3:
    raise ValueError(f"pixel_blur needs uint8 crops [..., H, W, C], got {crops.dtype} {crops.shape}")
  if not sigma > 0:
    raise ValueError(f"pixel_blur needs a positive sigma, got {sigma!r}")
  import scipy.ndimage

  sigmas = (0.0,) * (crops.ndim - 3) + (float(sigma), float(sigma), 0.0)
  blurred = scipy.ndimage.gaussian_filter(crops.astype(np.float64), sigmas, mode="reflect", truncate=4.0)
  return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------ summaries


def per_image_outcomes(result: ProtocolResult, *, win: str = "largest_drop") -> dict[str, np.ndarray]:
  """Per-image values whose means over images are the protocol's three numbers (host-side).

  Args:
    result: a `ProtocolResult` (one batch, or batches concatenated along B).
    win: one of `WIN_RULES`: who wins an image.

  Returns:
    {"ok": [B] bool, images with a positive original score; "drop": [M, B] ``max(0, Y - O) / Y``; "increase":
    [M, B] 1.0 where ``O > Y``; "win": [M, B] the share of the image's win each method takes (ties share)};
    NaN at excluded images.
  """
  if win not in WIN_RULES:
    raise ValueError(f"win rule {win!r} is not one of {WIN_RULES}")
  original = np.asarray(result.original, np.float64)
  occluded = np.asarray(result.occluded, np.float64)
  ok = original > 0
  y = np.where(ok, original, 1.0)
  drop = np.maximum(y - occluded, 0.0) / y  # [M, B]
  key = drop if win == "largest_drop" else -occluded
  winners = key == key.max(axis=0, keepdims=True)
  nan = np.where(ok, 0.0, np.nan)
  return {
    "ok": ok,
    "drop": drop + nan,
    "increase": (occluded > original).astype(np.float64) + nan,
    "win": winners / winners.sum(axis=0, keepdims=True) + nan,
  }


def protocol_summary(
  result: ProtocolResult, names: Sequence[str], *, win: str = "largest_drop"
) -> dict[str, dict[str, Any]]:
  """Average Drop %, % Increase in Confidence and Win % per method (host-side; see the module docstring).

  Args:
    result: a `ProtocolResult` (one batch, or batches concatenated along B).
    names: the M methods' names, in the order of the maps.
    win: one of `WIN_RULES` ("lowest_score" for the paper's protocol).

  Returns:
    name -> {"average_drop_pct", "increase_in_confidence_pct", "win_pct", "pairwise_win_pct" (other name ->
    %), "mean_mass", "num_images", "num_excluded"}; percentages are over images with a positive original score
    (NaN when there are none).
  """
  occluded = np.asarray(result.occluded, np.float64)
  if occluded.shape != (len(names), np.shape(result.original)[0]):
    raise ValueError(f"{len(names)} names for occluded scores of shape {occluded.shape}")
  per = per_image_outcomes(result, win=win)
  ok = per["ok"]
  n = int(ok.sum())
  drop, increase, credit = per["drop"][:, ok], per["increase"][:, ok], per["win"][:, ok]
  key = drop if win == "largest_drop" else -occluded[:, ok]
  nan = float("nan")
  out: dict[str, dict[str, Any]] = {}
  for i, name in enumerate(names):
    pairwise = {}
    for j, other in enumerate(names):
      if j != i:
        share = (np.sum(key[i] > key[j]) + 0.5 * np.sum(key[i] == key[j])) / n if n else np.nan
        pairwise[other] = 100.0 * float(share)
    out[name] = {
      "average_drop_pct": 100.0 * float(drop[i].mean()) if n else nan,
      "increase_in_confidence_pct": 100.0 * float(increase[i].mean()) if n else nan,
      "win_pct": 100.0 * float(credit[i].mean()) if n else nan,
      "pairwise_win_pct": pairwise,
      "mean_mass": float(np.mean(np.asarray(result.mass)[i])),
      "num_images": n,
      "num_excluded": int((~ok).sum()),
    }
  return out


def comparison_table(
  values: Mapping[str, npt.ArrayLike],
  names: Sequence[str],
  *,
  reference: str,
  better: Mapping[str, float] | None = None,
  confidence: float = 0.95,
  alpha: float = 0.05,
  num_resamples: int = 2000,
  num_permutations: int = 9999,
  seed: int = 0,
) -> dict[str, Any]:
  """Per-image figures as a table with intervals, and the tests behind any claim that the reference is better.

  Each figure is the mean over images of a per-image value, given with a bootstrap percentile interval over
  images (`stats.bootstrap_ci`). The reference method is compared with every other on each figure by a two-sided
  paired sign-flip test of the per-image differences (`stats.paired_permutation_test`), Holm-corrected over all
  the comparisons (`stats.holm`); a finding names a winner only where the corrected p-value is at most `alpha`,
  and a claim that the reference is better on a figure holds only where it is found better than every other.

  Args:
    values: figure -> [M, n] the per-image values of the M methods on the same n images (no NaN).
    names: the M methods' names, in order.
    reference: the name of the method compared with every other (the CMS).
    better: figure -> +1 (higher is better) or -1; default `_BETTER` (the drop figures).
    confidence: the intervals' coverage.
    alpha: the family-wise level of the findings.
    num_resamples: bootstrap resamples.
    num_permutations: random sign patterns of the tests (exact enumeration on up to ``log2(P + 1)`` images).
    seed: seeds the bootstrap and the tests.

  Returns:
    {"rows": one dict per method: each figure's mean and "<figure>_ci" [low, high] (NaN with fewer than 2
    images), "num_images"; "comparisons": one dict per other method and figure: "difference" (reference - other,
    in the figure's units), "p_value", "p_holm", "finding" ("<reference> better", "<other> better" or "no
    difference shown"); "claims": figure -> {"supported", "statement"}; and the settings.}
  """
  names = list(names)
  if reference not in names:
    raise ValueError(f"reference {reference!r} is not one of the methods {names}")
  better = dict(_BETTER if better is None else better)
  values = {f: np.asarray(v, np.float64) for f, v in values.items()}
  unknown = [f for f in values if f not in better]
  if unknown:
    raise ValueError(f"figures {unknown} have no direction in `better`")
  n = next(iter(values.values())).shape[1] if values else 0
  rows = [{"method": name} for name in names]
  for figure, v in values.items():
    if v.shape != (len(names), n):
      raise ValueError(f"figure {figure!r}: need values [{len(names)}, {n}], got {v.shape}")
    if n >= 2:
      _, lo, hi = stats.bootstrap_ci(v.T, confidence=confidence, num_resamples=num_resamples, seed=seed)
    else:
      lo = hi = np.full(len(names), np.nan)
    for i, row in enumerate(rows):
      row[figure] = float(v[i].mean()) if n else float("nan")
      row[f"{figure}_ci"] = [float(lo[i]), float(hi[i])]
  for row in rows:
    row["num_images"] = n
  r = names.index(reference)
  comparisons = []
  for j, rival in enumerate(names):
    if j == r:
      continue
    for figure, v in values.items():
      diff, p = stats.paired_permutation_test(v[r] - v[j], num_permutations=num_permutations, seed=seed)
      comparisons.append({"rival": rival, "figure": figure, "difference": diff, "p_value": p})
  p_holm = stats.holm([c["p_value"] for c in comparisons])
  for c, q in zip(comparisons, p_holm):
    c["p_holm"] = float(q)
    if np.isfinite(q) and q <= alpha and c["difference"] != 0:
      c["finding"] = f"{reference if better[c['figure']] * c['difference'] > 0 else c['rival']} better"
    else:
      c["finding"] = "no difference shown"
  claims = {}
  for figure in values:
    mine = [c for c in comparisons if c["figure"] == figure]
    not_beaten = [c["rival"] for c in mine if c["finding"] != f"{reference} better"]
    supported = bool(mine) and not not_beaten
    claims[figure] = {
      "supported": supported,
      "statement": f"{reference} better than every rival"
      if supported
      else f"not shown that {reference} is better than {', '.join(not_beaten) or 'any rival'}",
    }
  return {
    "rows": rows,
    "comparisons": comparisons,
    "claims": claims,
    "reference": reference,
    "figures": list(values),
    "better": {f: better[f] for f in values},
    "intervals": f"{100 * confidence:g}% bootstrap percentile over images ({num_resamples} resamples)",
    "test": "two-sided paired sign-flip permutation test of the per-image differences, Holm-corrected over "
    f"the {len(comparisons)} comparisons, level {alpha:g}",
    "alpha": alpha,
    "num_images": n,
    "seed": seed,
  }


def _drop_figures(result: ProtocolResult, names: Sequence[str], win: str) -> tuple[dict[str, np.ndarray], Any]:
  """The drop figures' per-image values (figure -> [M, n], in %) over the images kept, and the summary."""
  summary = protocol_summary(result, names, win=win)
  per = per_image_outcomes(result, win=win)
  ok = per["ok"]
  values = {
    "average_drop_pct": 100.0 * per["drop"][:, ok],
    "increase_in_confidence_pct": 100.0 * per["increase"][:, ok],
    "win_pct": 100.0 * per["win"][:, ok],
  }
  return values, (summary, ok)


def paper_table(result: ProtocolResult, names: Sequence[str], *, reference: str, **options: Any) -> dict[str, Any]:
  """The paper's table with intervals and the tests behind any claim that the reference method is better.

  `comparison_table` of the three drop figures (`PAPER_FIGURES`, Win % by the lowest occluded score, the
  paper's rule) over the images with a positive unoccluded score.

  Args:
    result: a `ProtocolResult` of the paper's protocol (`make_paper_protocol`).
    names: the M methods' names, in the order of the maps.
    reference: the name of the method compared with every other (the CMS).
    **options: `comparison_table`'s confidence, alpha, num_resamples, num_permutations, seed.

  Returns:
    `comparison_table`'s dict; each row also has "mean_mass" and "num_excluded".
  """
  values, (summary, _) = _drop_figures(result, names, "lowest_score")
  table = comparison_table(values, names, reference=reference, **options)
  for row in table["rows"]:
    row.update({k: summary[row["method"]][k] for k in ("mean_mass", "num_excluded")})
  table["win"] = "lowest occluded score among the methods compared (ties share the win)"
  table["direction"] = "higher average drop and win %, lower increase in confidence: the map found what the model needs"
  return table


def headline_table(
  result: ProtocolResult,
  curves: Sequence[CurveResult],
  names: Sequence[str],
  *,
  reference: str,
  **options: Any,
) -> dict[str, Any]:
  """The headline protocol's table: the three drop figures and the deletion and insertion AUCs, all tested.

  `comparison_table` of Average Drop, Increase in Confidence, Win % (the largest drop) of a mass protocol run
  with the blurred photo as substitute (`make_mass_protocol(...)(..., substitute=pixel_blur(...))`), and of the
  deletion and insertion AUCs on the same substitute, over the images with a positive unoccluded score.

  Args:
    result: the drop protocol's `ProtocolResult` of the M methods.
    curves: one `CurveResult` per method, in the same order, on the same images and substitute.
    names: the M methods' names.
    reference: the method compared with every other (the CMS).
    **options: `comparison_table`'s confidence, alpha, num_resamples, num_permutations, seed.

  Returns:
    `comparison_table`'s dict; each row also has "mean_mass" and "num_excluded".
  """
  if len(curves) != len(names):
    raise ValueError(f"{len(names)} names for {len(curves)} curve results")
  values, (summary, ok) = _drop_figures(result, names, "largest_drop")
  values["deletion_auc"] = np.stack([np.asarray(c.deletion_auc, np.float64)[ok] for c in curves])
  values["insertion_auc"] = np.stack([np.asarray(c.insertion_auc, np.float64)[ok] for c in curves])
  table = comparison_table(values, names, reference=reference, better={**_BETTER, **_CURVE_BETTER}, **options)
  for row in table["rows"]:
    row.update({k: summary[row["method"]][k] for k in ("mean_mass", "num_excluded")})
  table["win"] = "largest drop among the methods compared (ties share the win)"
  table["direction"] = (
    "higher average drop, win % and insertion AUC, lower increase in confidence and deletion AUC: the map found "
    "what the model needs"
  )
  return table


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
    ``curves(params, images[B, H, W, C], maps[B, H, W], valid=None, target=None, key=None, substitute=None) ->
    CurveResult``; `key` seeds the tie-breaking permutation (default `jax.random.key(0)`, the same for every
    method, so equal maps give equal curves); `substitute` ([B, H, W, C], model input space) replaces the
    substrate (the headline protocol's blurred photo, `pixel_blur`).
  """
  score = occlusion.Score("probability") if score is None else score
  if substrate not in SUBSTRATES:
    raise ValueError(f"substrate {substrate!r} is not one of {SUBSTRATES}")
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"steps must be a positive int, got {steps!r}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

  @jax.jit
  def curves(params, images, maps, valid=None, target=None, key=None, substitute=None) -> CurveResult:
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
    if substitute is not None:
      sub = _given_substitute(substitute, x)
    elif substrate == "blur":
      sub = _baseline_images(x, *_resolve_baseline("blur", blur_sigma, height))
    else:
      sub = _baseline_images(x, *_resolve_baseline(constant, None, height))
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
