"""Occlusion saliency: a whole patch sweep as ONE compiled XLA program.

A patch of `patch_size` x `patch_size` pixels, filled with a baseline, is slid over the model input; each
patch's *drop* is ``score(original) - score(occluded)``, and the heatmap is the mean (or sum) of the drops of
the patches covering each pixel.

`make_sweep` is the factory: it returns one jitted function of ``(params, image, centres_rc, valid)`` in
which the occluded images are built inside a vmapped function (never N images on the host), chunks of
`batch_size` go through `lax.map` so peak memory stays near `batch_size` images, and the padded patch axis is
split over the local devices with `jax.shard_map`. Weights, image, centres and the target are arguments, so a
new image, new weights or a new patch set of the same padded size reuse the compiled program.

Square patches are separable: a patch covers pixel (i, j) iff its row indicator covers i and its column
indicator covers j, so the heatmap and its coverage are two small matmuls over `[N, H]` and `[N, W]`
indicator matrices rather than a scatter-add.

Example:
  >>> import jax.numpy as jnp
  >>> from canonsal_jax import occlusion
  >>> apply_fn = lambda params, x: jnp.sum(x * params, axis=(1, 2))  # [B, H, W, C] -> [B, C]
  >>> sweep = occlusion.make_sweep(apply_fn, patch_size=3, batch_size=8, score=occlusion.Score("logit"))
  >>> centres, valid = occlusion.pad_centres(occlusion.grid_centres(8, 8, patch_size=3, stride=1), 40)
  >>> result = sweep(jnp.ones((8, 8, 2)), jnp.ones((8, 8, 2)), centres, valid, target=0)
  >>> result.heatmap.shape
  (8, 8)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from canonsal_jax import incremental
from canonsal_jax.models.base import SCORE_KINDS

__all__ = [
  "BASELINES",
  "REDUCTIONS",
  "Score",
  "SweepResult",
  "check_finite",
  "coverage",
  "grid_centres",
  "make_sweep",
  "occlusion_map",
  "pad_centres",
  "resolve_patch_size",
]

BASELINES = ("mean", "blur")  # besides a constant (scalar or per channel) in model input space
REDUCTIONS = ("mean", "sum")
_CLASS_KINDS = ("logit", "log_softmax", "log_odds", "probability")
_AXIS = "patches"
# On an NVIDIA H200 with jaxlib 0.11.2 (2026-11-27), sweeps with a non-constant or per-channel baseline gave drops
# that disagreed with a naive loop (tests/test_occlusion.py, test_incremental.py; the same at "highest" matmul
# precision), while constant-baseline sweeps of four real networks matched PyTorch to 1e-4. On accelerators the
# occluded images now pass an optimization barrier before the model (a suspected fusion miscompile); that fix is
# unverified on a GPU until `benchmarks/gpu_bench.sh followup` passes there (BENCHMARKS.md, GPU section).
_GPU_BASELINE_NOTE = (
  "a non-scalar baseline (per-channel, 'black' after normalisation, 'mean' or 'blur') is not yet verified on "
  "GPUs: on an H200 with jaxlib 0.11.2 such sweeps disagreed with a naive loop. Check a few drops against "
  "occlusion_map on the CPU, or use a scalar baseline (BENCHMARKS.md, GPU section)."
)


@dataclasses.dataclass(frozen=True)
class Score:
  """What an occlusion sweep measures on the model's outputs.

  The target is given at call time (so new targets reuse the compiled sweep): a class index (int32 scalar) for
  the class kinds, a pair ``(a, b)`` for a contrast ``score(a) - score(b)``, a reference embedding ``[K]`` for
  "cosine" (``[2, K]``, a genuine and an impostor reference, for a cosine contrast); "expected_value" has none.
  With no target, class kinds use the unoccluded prediction (argmax) and "cosine" the unoccluded embedding
  (self-similarity).

  Attributes:
    kind: "logit" (the target logit), "log_softmax", "log_odds" (``log p_t - log(1 - p_t)``), "probability",
      "expected_value" (``sum_k softmax_k * values_k``, e.g. the age of an ordinal head) or "cosine" (cosine
      similarity of the output embedding to a reference).
    values: per-output values for "expected_value".
    contrast: the target is a pair and the score is the difference of their scores: two classes for the class
      kinds, two reference embeddings (genuine, impostor) for "cosine".
  """

  kind: str
  values: tuple[float, ...] | None = None
  contrast: bool = False

  def __post_init__(self):
    if self.kind not in SCORE_KINDS:
      raise ValueError(f"score kind {self.kind!r} is not one of {SCORE_KINDS}")
    if (self.kind == "expected_value") != (self.values is not None):
      raise ValueError("values are needed by, and only by, the expected_value score")
    if self.contrast and self.kind not in (*_CLASS_KINDS, "cosine"):
      raise ValueError(f"a contrast needs a class score ({_CLASS_KINDS}) or cosine, not {self.kind!r}")
    if self.values is not None:
      object.__setattr__(self, "values", tuple(float(v) for v in self.values))

  @classmethod
  def for_model(cls, model: Any, *, kind: str | None = None, contrast: bool = False) -> Score:
    """The model's natural score (`FaceModel.score`), or another `kind` of it."""
    kind = kind or model.score
    return cls(kind, values=model.output_values if kind == "expected_value" else None, contrast=contrast)

  def default_target(self, outputs: jax.Array) -> jax.Array:
    """The target used when none is given, from the unoccluded outputs `[K]`."""
    if self.contrast:
      raise ValueError("a contrast score needs an explicit target: (class_a, class_b), or [2, K] references")
    if self.kind in _CLASS_KINDS:
      return jnp.argmax(outputs).astype(jnp.int32)
    if self.kind == "cosine":
      return outputs
    return jnp.zeros((), jnp.int32)  # expected_value: no target

  def check_target(self, target: jax.Array, num_outputs: int) -> None:
    """Raises ValueError where `target` does not fit this score (shapes are static, so this runs at trace)."""
    if self.kind == "cosine":
      want = (2, num_outputs) if self.contrast else (num_outputs,)
    elif self.contrast:
      want = (2,)
    else:
      want = ()
    if target.shape != want:
      raise ValueError(
        f"{self.kind} score{' contrast' if self.contrast else ''} needs a target of shape {want}, got {target.shape}"
      )
    if self.kind in _CLASS_KINDS and not jnp.issubdtype(target.dtype, jnp.integer):
      raise ValueError(f"class targets must be integers, got {target.dtype}")

  def __call__(self, outputs: jax.Array, target: jax.Array) -> jax.Array:
    """Scores `outputs[B, K]` against `target`; returns `[B]`."""
    if self.kind == "cosine" and self.contrast:
      return self._cosine(outputs, target[0]) - self._cosine(outputs, target[1])
    if self.contrast:
      return self._class_score(outputs, target[0]) - self._class_score(outputs, target[1])
    if self.kind in _CLASS_KINDS:
      return self._class_score(outputs, target)
    if self.kind == "expected_value":
      values = jnp.asarray(self.values, outputs.dtype)
      if values.shape[0] != outputs.shape[-1]:
        raise ValueError(f"{values.shape[0]} values for {outputs.shape[-1]} outputs")
      return jax.nn.softmax(outputs, axis=-1) @ values
    return self._cosine(outputs, target)

  @staticmethod
  def _cosine(outputs: jax.Array, reference: jax.Array) -> jax.Array:
    num = outputs @ reference
    return num / (jnp.linalg.norm(outputs, axis=-1) * jnp.linalg.norm(reference) + _COSINE_EPS)

  def _class_score(self, outputs: jax.Array, t: jax.Array) -> jax.Array:
    logit = jnp.take(outputs, t, axis=-1)
    if self.kind == "logit":
      return logit
    if self.kind == "log_softmax":
      return logit - jax.nn.logsumexp(outputs, axis=-1)
    if self.kind == "probability":
      return jnp.exp(logit - jax.nn.logsumexp(outputs, axis=-1))
    # log_odds: log p_t - log(1 - p_t) = logit_t - logsumexp(other logits), stable for confident models
    others = jnp.where(jnp.arange(outputs.shape[-1]) == t, -jnp.inf, outputs)
    return logit - jax.nn.logsumexp(others, axis=-1)


# Guards the cosine score against a zero embedding; far below any real embedding's norm.
_COSINE_EPS = 1e-12


class SweepResult(NamedTuple):
  """What one sweep returns.

  Attributes:
    drops: `[N]` per-patch score drops ``score(original) - score(occluded)``, 0 for padding.
    heatmap: `[H, W]` mean (or sum) of the drops of the patches covering each pixel; 0 where uncovered.
    count: `[H, W]` number of valid patches covering each pixel (0 = uncovered, not "no saliency").
    score: the unoccluded image's score.
    outputs: `[K]` the unoccluded model outputs.
    target: the target used (given, or the default from the unoccluded outputs).
    num_nonfinite: number of valid patches whose score was NaN or infinite (see `check_finite`).
  """

  drops: jax.Array
  heatmap: jax.Array
  count: jax.Array
  score: jax.Array
  outputs: jax.Array
  target: jax.Array
  num_nonfinite: jax.Array


def check_finite(result: SweepResult, name: str = "image") -> SweepResult:
  """Raises ValueError naming the input if the model produced NaN or infinite scores.

  The compiled sweep cannot raise; this host-side check turns its count of non-finite scores into an error.
  """
  bad = int(result.num_nonfinite)
  if bad or not np.isfinite(float(result.score)):
    raise ValueError(
      f"{name}: the model's score is not finite on {bad} occluded input(s)"
      + ("" if np.isfinite(float(result.score)) else " and on the unoccluded input")
      + " (NaN or inf from the model; check its weights and the input's preprocessing)"
    )
  return result


def resolve_patch_size(patch_size: int | float, face_width: float | None = None) -> int:
  """Patch side in pixels from a size in pixels (>= 1) or a fraction of the face width (< 1).

  Sizes of 1 or more are pixels and must be odd integers (``3`` or ``3.0``, as a config float gives it);
  sizes in (0, 1) are fractions of `face_width`, rounded to the nearest odd number of pixels. The paper uses
  15 px patches on a 224 px face, about 7% of its width (``patch_size=0.07``).

  Raises:
    ValueError: an even, non-integral or non-positive pixel size, or a fraction with no face width.
  """
  if isinstance(patch_size, bool) or not isinstance(patch_size, (int, float, np.integer, np.floating)):
    raise ValueError(f"patch_size must be odd pixels (>= 1) or a fraction of the face (< 1), got {patch_size!r}")
  if not np.isfinite(patch_size) or patch_size <= 0:
    raise ValueError(f"patch_size must be positive, got {patch_size}")
  if patch_size >= 1:
    if patch_size != int(patch_size) or int(patch_size) % 2 == 0:
      raise ValueError(f"patch_size in pixels must be an odd integer, got {patch_size}")
    return int(patch_size)
  if face_width is None or face_width <= 0:
    raise ValueError(f"a relative patch_size ({patch_size}) needs the face width in pixels")
  pixels = patch_size * face_width
  return max(1, 2 * math.floor(pixels / 2.0) + 1)  # nearest odd integer


def grid_centres(height: int, width: int, *, patch_size: int, stride: int, include_borders: bool = False) -> np.ndarray:
  """Patch centres `[N, 2]` int32 (row, col) on a regular grid.

  By default patches lie wholly inside the image, top-left corners at 0, stride, 2*stride, ... (Captum's
  `Occlusion` adds one more, border-clipped window per axis when (size - patch) is not a multiple of the stride;
  `benchmarks.baselines.reference.captum_centres` gives its exact set); `include_borders` centres patches on
  every stride-th pixel from 0, so border pixels are covered by clipped patches.

  Raises:
    ValueError: stride < 1, or a patch larger than the image.
  """
  if isinstance(stride, bool) or not isinstance(stride, (int, np.integer)) or stride < 1:
    raise ValueError(f"stride must be a positive int, got {stride!r}")
  patch_size = resolve_patch_size(patch_size)
  if patch_size > min(height, width):
    raise ValueError(f"patch_size {patch_size} is larger than the image ({height}x{width})")
  half = patch_size // 2
  if include_borders:
    rows, cols = np.arange(0, height, stride), np.arange(0, width, stride)
  else:
    rows = np.arange(half, height - half, stride)
    cols = np.arange(half, width - half, stride)
  rr, cc = np.meshgrid(rows, cols, indexing="ij")
  return np.stack([rr.ravel(), cc.ravel()], axis=1).astype(np.int32)


def pad_centres(centres_rc: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads centres `[N, 2]` to `[size, 2]` with a validity mask `[size]`, so different patch sets share a program.

  Raises:
    ValueError: more centres than `size`, or not `[N, 2]`.
  """
  centres_rc = np.asarray(centres_rc)
  if centres_rc.ndim != 2 or centres_rc.shape[1] != 2:
    raise ValueError(f"centres must be [N, 2] (row, col), got shape {centres_rc.shape}")
  n = centres_rc.shape[0]
  if n > size:
    raise ValueError(f"{n} centres do not fit a padded size of {size}")
  padded = np.zeros((size, 2), np.int32)
  padded[:n] = np.rint(centres_rc).astype(np.int32)
  valid = np.zeros((size,), bool)
  valid[:n] = True
  return padded, valid


def _blur_matrix(n: int, sigma: float) -> jax.Array:
  """`[n, n]` Gaussian smoothing matrix, rows renormalised at the borders."""
  idx = jnp.arange(n, dtype=jnp.float32)
  g = jnp.exp(-0.5 * ((idx[:, None] - idx[None, :]) / sigma) ** 2)
  return g / jnp.sum(g, axis=1, keepdims=True)


def _baseline_image(image: jax.Array, baseline: float | str | tuple[float, ...], blur_sigma: float) -> jax.Array:
  if isinstance(baseline, str):
    if baseline == "mean":
      return jnp.broadcast_to(jnp.mean(image, axis=(0, 1)), image.shape)
    # blur: separable Gaussian as two small matmuls
    gh, gw = _blur_matrix(image.shape[0], blur_sigma), _blur_matrix(image.shape[1], blur_sigma)
    return jnp.einsum("ih,hwc,jw->ijc", gh, image, gw, precision=jax.lax.Precision.HIGHEST)
  value = jnp.asarray(baseline, image.dtype)
  if value.ndim == 1 and value.shape[0] != image.shape[-1]:
    raise ValueError(f"a per-channel baseline needs {image.shape[-1]} values, got {value.shape[0]}")
  return jnp.broadcast_to(value, image.shape)


def _check_baseline(baseline: Any) -> float | str | tuple[float, ...]:
  if isinstance(baseline, str):
    if baseline not in BASELINES:
      raise ValueError(f"baseline {baseline!r} is not a number, a per-channel tuple or one of {BASELINES}")
    return baseline
  if isinstance(baseline, (int, float, np.integer, np.floating)) and not isinstance(baseline, bool):
    if not np.isfinite(baseline):
      raise ValueError(f"baseline must be finite, got {baseline}")
    return float(baseline)
  if isinstance(baseline, Sequence | np.ndarray):
    values = tuple(float(v) for v in np.asarray(baseline, np.float64).ravel())
    if not values or not np.all(np.isfinite(values)):
      raise ValueError(f"a per-channel baseline must be finite numbers, got {baseline!r}")
    return values
  raise ValueError(f"baseline {baseline!r} is not a number, a per-channel tuple or one of {BASELINES}")


METHODS = ("auto", "full", "incremental")
_LOGGED_ONCE: set[str] = set()  # what make_sweep has logged in this process (each note once)


def _sweep_graph(
  apply_fn: Callable, method: str, graph: incremental.LayerGraph | None, approx_threshold: float | None
) -> incremental.LayerGraph | None:
  """The layer graph `make_sweep` runs incrementally, or None for the full-forward sweep."""
  if method not in METHODS:
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")
  if graph is None:
    graph = getattr(apply_fn, "layer_graph", None)
  if graph is not None and not isinstance(graph, incremental.LayerGraph):
    raise ValueError(f"graph must be a canonsal_jax.incremental.LayerGraph, got {graph!r}")
  if approx_threshold is not None:
    if not 0.0 < approx_threshold <= 1.0:
      raise ValueError(f"approx_threshold must be in (0, 1], got {approx_threshold}")
    if method == "full":
      raise ValueError("approx_threshold applies to the incremental sweep, not method='full'")
  if method == "full":
    return None
  if graph is None:
    if method == "incremental" or approx_threshold is not None:
      raise ValueError("the incremental sweep needs a layer graph: pass graph= or an apply_fn with .layer_graph")
    name = getattr(apply_fn, "__name__", type(apply_fn).__name__)
    if name not in _LOGGED_ONCE:
      _LOGGED_ONCE.add(name)
      # An imported network says why it has none (the first operator without window geometry).
      reason = getattr(apply_fn, "layer_graph_reason", "")
      logging.info(
        "occlusion: %s has no layer graph%s; the sweep runs the full model per patch",
        name,
        f" ({reason})" if reason else "",
      )
  return graph


def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive int, got {value!r}")
  return int(value)


def coverage(centres_rc: jax.Array, reach: int, shape: tuple[int, int], *weights: jax.Array) -> tuple[jax.Array, ...]:
  """Per pixel, the sum of each of `weights` (`[N]` each) over the patches within `reach` pixels of it along
  both axes (a square patch of side `2 * reach + 1` centred at `centres_rc[N, 2]`): `[H, W]` each.

  Square patches are separable, so each sum is one matmul of row and column indicators, at the highest precision
  (exact sums of small integers and drops; no TF32 on GPUs). With weights `drops` and `valid` these are the
  heatmap's numerator and the coverage count.
  """
  height, width = shape
  dtype = jnp.result_type(*[w.dtype for w in weights], jnp.float32)
  rows = (jnp.abs(jnp.arange(height)[None, :] - centres_rc[:, :1]) <= reach).astype(dtype)  # [N, H]
  cols = (jnp.abs(jnp.arange(width)[None, :] - centres_rc[:, 1:]) <= reach).astype(dtype)  # [N, W]
  hi = jax.lax.Precision.HIGHEST
  return tuple(jnp.matmul((rows * w.astype(dtype)[:, None]).T, cols, precision=hi) for w in weights)


def make_sweep(
  apply_fn: Callable[[Any, jax.Array], jax.Array],
  *,
  patch_size: int,
  batch_size: int,
  baseline: float | str | Sequence[float] = 0.0,
  score: Score,
  reduce: str = "mean",
  blur_sigma: float | None = None,
  devices: Sequence[jax.Device] | None = None,
  method: str = "auto",
  graph: incremental.LayerGraph | None = None,
  approx_threshold: float | None = None,
  window_batch_size: int | None = None,
) -> Callable[..., SweepResult]:
  """Builds the jitted occlusion sweep for one model and one set of static settings.

  Args:
    apply_fn: pure `(params, x[B, H, W, C]) -> [B, K]`; the weights are an argument, never captured.
    patch_size: odd patch side in pixels (resolve relative sizes first with `resolve_patch_size`).
    batch_size: occluded images per forward pass; peak memory grows with it, not with the number of patches.
    baseline: the occluder: a constant in model input space (scalar or per channel), "mean" (the image's
      per-channel mean) or "blur" (a Gaussian-blurred copy of the image).
    score: what is measured on the outputs (`Score`).
    reduce: "mean" (average drop of the covering patches) or "sum".
    blur_sigma: the Gaussian's sigma in pixels for the "blur" baseline; defaults to `patch_size / 2`.
    devices: devices to split the patch axis over; default all local devices.
    method: "full" runs the whole model on every occluded image; "incremental" recomputes only the window of
      each layer that the patch can change, from the unoccluded image's activations computed once
      (`canonsal_jax.incremental`; needs a layer graph); "auto" is incremental where a graph is known and full
      otherwise (logged once).
    graph: the model's `incremental.LayerGraph`; default `apply_fn.layer_graph` where `apply_fn` carries one
      (the ported face models' `apply_fn` do, see `incremental.with_graph`). It must compute what `apply_fn`
      computes: the incremental sweep takes the unoccluded outputs from it too, so that every drop is the
      difference of two results of the same arithmetic.
    approx_threshold: incremental only: the projective-field threshold tau in (0, 1] of the approximate mode
      (no changed window grows beyond `ceil(tau * side)` of its map); None is exact.
    window_batch_size: incremental only: the windowed layers of a chunk run over groups of at most this many
      patches (the largest that divides the chunk), and the graph's tail (a dense head, `incremental.tail_start`)
      on the whole chunk of `batch_size`. A VGG-sized head reads ~400 MB of weights per pass, so on a CPU a
      large `batch_size` with `window_batch_size=16` beats one batch for both (BENCHMARKS.md, "Incremental occlusion").
      None: one batch for all layers.

  Returns:
    ``sweep(params, image[H, W, C], centres_rc[N, 2] int32, valid[N] bool, target=None) -> SweepResult``,
    jitted. Patches centred near the border are clipped to the image. N is padded inside to a multiple of
    ``batch_size * len(devices)``, or, when N is smaller, to one chunk of ``ceil(N / len(devices))`` per device.

  Raises:
    ValueError: on invalid settings here, and at the first call on inputs of the wrong rank or dtype, a patch
      larger than the image, or a target that does not fit the score.
  """
  patch_size = resolve_patch_size(patch_size)
  batch_size = _positive_int("batch_size", batch_size)
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
  if not isinstance(score, Score):
    raise ValueError(f"score must be a canonsal_jax.occlusion.Score, got {score!r}")
  baseline = _check_baseline(baseline)
  blur_sigma = float(blur_sigma) if blur_sigma is not None else patch_size / 2.0
  if blur_sigma <= 0:
    raise ValueError(f"blur_sigma must be positive, got {blur_sigma}")
  devices = list(devices) if devices is not None else jax.local_devices()
  on_accelerator = any(d.platform != "cpu" for d in devices)
  if not isinstance(baseline, float) and on_accelerator and _GPU_BASELINE_NOTE not in _LOGGED_ONCE:
    _LOGGED_ONCE.add(_GPU_BASELINE_NOTE)
    logging.warning("occlusion: %s", _GPU_BASELINE_NOTE)
  mesh = jax.sharding.Mesh(np.asarray(devices), (_AXIS,)) if len(devices) > 1 else None
  half = patch_size // 2
  if window_batch_size is not None:
    window_batch_size = _positive_int("window_batch_size", window_batch_size)
  graph = _sweep_graph(apply_fn, method, graph, approx_threshold)

  def indicators(centres_rc: jax.Array, height: int, width: int) -> tuple[jax.Array, jax.Array]:
    """Row `[N, H]` and column `[N, W]` coverage of each patch (bool)."""
    rows = jnp.abs(jnp.arange(height)[None, :] - centres_rc[:, :1]) <= half
    cols = jnp.abs(jnp.arange(width)[None, :] - centres_rc[:, 1:]) <= half
    return rows, cols

  def chunk_size(num_patches: int) -> int:
    """Images per forward pass for `num_patches` patches on one device: `batch_size`, or all of them when fewer
    (25 patches at batch 256 would otherwise compute 10x the forward passes needed)."""
    return max(1, min(batch_size, num_patches))

  def chunks_of(centres_rc: jax.Array) -> jax.Array:
    """`[M, 2]` -> `[M / chunk, chunk, 2]` (M is a multiple of the chunk: `sweep` pads it so)."""
    return centres_rc.reshape(-1, chunk_size(centres_rc.shape[0]), 2)

  def occluded_scores(params, image, base, centres_rc, target):
    """Scores of the occluded images for `centres_rc[M, 2]`, `batch_size` images per forward pass."""

    def chunk(chunk_centres):  # [batch_size, 2] -> [batch_size]
      rows, cols = indicators(chunk_centres, image.shape[0], image.shape[1])
      mask = rows[:, :, None, None] & cols[:, None, :, None]  # [b, H, W, 1]
      occluded = jnp.where(mask, base[None], image[None])  # built on the device, one chunk at a time
      if on_accelerator:  # kept out of the model's first fusion (`_GPU_BASELINE_NOTE`); XLA:CPU fuses it well
        occluded = jax.lax.optimization_barrier(occluded)
      return score(apply_fn(params, occluded), target)

    return jax.lax.map(chunk, chunks_of(centres_rc)).reshape(-1)

  def incremental_scores(params, image, base, centres_rc, target, cache):
    """As `occluded_scores`, each chunk recomputing only the windows its patches change (`incremental`)."""
    bound = graph.bind(params)
    the_plan = plans[tuple(image.shape)]  # made by `incremental_plan` when the cache was

    size = chunk_size(centres_rc.shape[0])
    group = None
    if window_batch_size is not None:  # the largest divisor of the chunk not above window_batch_size
      group = max(d for d in range(1, min(window_batch_size, size) + 1) if size % d == 0)

    def chunk(chunk_centres):  # [batch_size, 2] -> [batch_size]
      outputs = incremental.occluded_outputs(
        graph, the_plan, bound, cache, image, base, chunk_centres, barrier=on_accelerator, window_batch=group
      )
      return score(outputs, target)

    return jax.lax.map(chunk, chunks_of(centres_rc)).reshape(-1)

  plans: dict[tuple, incremental.Plan] = {}

  def incremental_plan(image_shape, shapes) -> incremental.Plan:
    """The static windows for this input shape (computed once per shape, at trace time)."""
    key = tuple(image_shape)
    if key not in plans:
      plans[key] = incremental.plan(graph, shapes, patch_size=patch_size, approx_threshold=approx_threshold)
    return plans[key]

  if mesh is not None:
    occluded_scores = jax.shard_map(
      occluded_scores,
      mesh=mesh,
      in_specs=(P(), P(), P(), P(_AXIS), P()),
      out_specs=P(_AXIS),
    )
    incremental_scores = jax.shard_map(
      incremental_scores,
      mesh=mesh,
      in_specs=(P(), P(), P(), P(_AXIS), P(), P()),
      out_specs=P(_AXIS),
    )

  def sweep(params, image, centres_rc, valid, target=None) -> SweepResult:
    image = jnp.asarray(image)
    centres_rc, valid = jnp.asarray(centres_rc), jnp.asarray(valid)
    if image.ndim != 3 or not jnp.issubdtype(image.dtype, jnp.floating):
      raise ValueError(f"image must be a float [H, W, C] model input, got {image.dtype} {image.shape}")
    if centres_rc.ndim != 2 or centres_rc.shape[1] != 2 or not jnp.issubdtype(centres_rc.dtype, jnp.integer):
      raise ValueError(f"centres_rc must be int [N, 2] (row, col), got {centres_rc.dtype} {centres_rc.shape}")
    if valid.shape != centres_rc.shape[:1] or valid.dtype != jnp.bool_:
      raise ValueError(f"valid must be bool [{centres_rc.shape[0]}], got {valid.dtype} {valid.shape}")
    height, width, _ = image.shape
    if patch_size > min(height, width):
      raise ValueError(f"patch_size {patch_size} is larger than the image ({height}x{width})")
    n = centres_rc.shape[0]
    multiple = chunk_size(-(-n // len(devices))) * len(devices)
    padded = -(-n // multiple) * multiple
    centres_p = jnp.pad(centres_rc.astype(jnp.int32), ((0, padded - n), (0, 0)))
    valid_p = jnp.pad(valid, (0, padded - n))

    if graph is None:
      outputs = apply_fn(params, image[None])
    else:  # the unoccluded activations, computed once; the drops then come from one arithmetic
      acts = graph.activations(params, image[None])
      outputs = acts[-1]
    if outputs.ndim != 2:
      raise ValueError(f"apply_fn must return [B, K], got shape {outputs.shape}")
    target = score.default_target(outputs[0]) if target is None else jnp.asarray(target)
    score.check_target(target, outputs.shape[-1])
    original = score(outputs, target)[0]
    base = _baseline_image(image, baseline, blur_sigma)
    if graph is None:
      occluded = occluded_scores(params, image, base, centres_p, target)
    else:
      the_plan = incremental_plan(image.shape, [a.shape[1:] for a in acts])
      cache = incremental.make_cache(graph, the_plan, acts)
      occluded = incremental_scores(params, image, base, centres_p, target, cache)

    finite = jnp.isfinite(occluded)
    drops = jnp.where(valid_p & finite, original - occluded, 0.0)
    total, count = coverage(centres_p, half, (height, width), drops, valid_p)
    heatmap = total if reduce == "sum" else jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)
    return SweepResult(
      drops=drops[:n],
      heatmap=heatmap,
      count=jnp.rint(count).astype(jnp.int32),
      score=original,
      outputs=outputs[0],
      target=target,
      num_nonfinite=jnp.sum(valid_p & ~finite),
    )

  return jax.jit(sweep)


def occlusion_map(
  score_fn: Callable[[jax.Array], jax.Array],
  image: jax.typing.ArrayLike,
  *,
  patch_size: int | float,
  stride: int | None = None,
  centres: np.ndarray | None = None,
  baseline: float | str | Sequence[float] = 0.0,
  batch_size: int = 16,
  reduce: str = "mean",
  face_width: float | None = None,
  name: str = "image",
) -> SweepResult:
  """Occlusion saliency of any callable; a convenience wrapper around `make_sweep` (it may retrace).

  Args:
    score_fn: `x[B, H, W, C] -> [B]` scores (closures are fine here).
    image: `[H, W, C]` float input in the score function's space.
    patch_size: odd pixels, or a fraction of `face_width` (default: the image width).
    stride: grid stride in pixels (default 1); exclusive with `centres`.
    centres: `[N, 2]` (row, col) patch centres, e.g. projected mesh vertices.
    baseline: see `make_sweep`.
    batch_size: occluded images per forward pass.
    reduce: "mean" or "sum".
    face_width: pixels that a relative `patch_size` refers to.
    name: names the input in error messages.

  Returns:
    The `SweepResult` (host-checked for non-finite scores).

  Raises:
    ValueError: bad settings, or non-finite scores (naming `name`).
  """
  image = jnp.asarray(image, jnp.float32)
  if image.ndim != 3:
    raise ValueError(f"{name}: image must be [H, W, C], got shape {image.shape}")
  height, width, _ = image.shape
  patch_size = resolve_patch_size(patch_size, face_width if face_width is not None else float(width))
  if centres is not None and stride is not None:
    raise ValueError("give either stride or centres, not both")
  if centres is None:
    centres = grid_centres(height, width, patch_size=patch_size, stride=1 if stride is None else stride)
  centres_rc, valid = pad_centres(centres, len(centres))
  sweep = make_sweep(
    lambda params, x: score_fn(x)[:, None],
    patch_size=patch_size,
    batch_size=batch_size,
    baseline=baseline,
    score=Score("logit"),
    reduce=reduce,
  )
  return check_finite(sweep(None, image, centres_rc, valid, jnp.int32(0)), name)
