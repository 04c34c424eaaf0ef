"""Benchmark suites: ratios measured in one process, compile time kept apart, medians of repeats.

Used by `scripts/benchmark.py`; results go to `BENCHMARKS.md` with the command that produced them.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from canonsal_jax import models, occlusion

__all__ = ["environment", "fit_vs_eos", "median_seconds", "sweep_vs_forward"]


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  return {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": __import__("os").cpu_count(),
    "python": platform.python_version(),
    "machine": platform.machine(),
  }


def median_seconds(fn: Callable[[], Any], *, repeats: int, warmup: int = 1) -> float:
  """Median wall time of `fn()` (its result blocked on), after `warmup` untimed calls."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _forward_program(apply_fn: Callable, batch_size: int) -> Callable:
  """A plain batched forward pass over `[n / batch_size, batch_size, H, W, C]` ready-made images."""

  def forward(params, images):
    return jax.lax.map(lambda batch: apply_fn(params, batch), images)

  return jax.jit(forward)


def sweep_vs_forward(
  model: models.FaceModel,
  *,
  patch_size: int | float = 0.07,
  stride: int = 1,
  batch_sizes: Sequence[int] = (8, 16, 32),
  repeats: int = 5,
  seed: int = 0,
) -> dict[str, Any]:
  """Times the occlusion sweep against a plain batched forward pass over the same number of images.

  The forward baseline gets its images ready-made in device memory (no masking, no scoring), so the ratio
  `sweep throughput / forward throughput` measures everything the sweep adds. Both are compiled ahead with
  `.lower().compile()`; the best batch size of each is compared.

  Returns:
    A dict with per-batch-size times (seconds, medians), images/s, and `ratio` (best sweep / best forward).
  """
  rng = np.random.default_rng(seed)
  size = model.crop.size
  face = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
  image = model.preprocess(face)
  patch_px = occlusion.resolve_patch_size(patch_size, model.crop.face_width)
  centres = occlusion.grid_centres(size, size, patch_size=patch_px, stride=stride)
  n = len(centres)
  valid = np.ones(n, bool)
  score = occlusion.Score.for_model(model)
  rows = []
  for bs in batch_sizes:
    sweep = occlusion.make_sweep(model.apply_fn, patch_size=patch_px, batch_size=bs, score=score)
    compiled_sweep = sweep.lower(model.params, image, centres, valid).compile()
    t_sweep = median_seconds(lambda f=compiled_sweep: f(model.params, image, centres, valid), repeats=repeats)
    padded = -(-n // bs) * bs  # the sweep pads the patch axis the same way
    images = np.broadcast_to(image, (padded // bs, bs, *image.shape)).copy()
    images += rng.normal(scale=1e-3, size=images.shape).astype(np.float32)  # distinct images, same statistics
    images = jax.device_put(images)
    compiled_fwd = _forward_program(model.apply_fn, bs).lower(model.params, images).compile()
    t_fwd = median_seconds(lambda f=compiled_fwd, x=images: f(model.params, x), repeats=repeats)
    rows.append(
      {
        "batch_size": bs,
        "sweep_s": t_sweep,
        "forward_s": t_fwd,
        "sweep_images_per_s": n / t_sweep,
        "forward_images_per_s": padded / t_fwd,
      }
    )
  best_sweep = max(r["sweep_images_per_s"] for r in rows)
  best_fwd = max(r["forward_images_per_s"] for r in rows)
  return {
    "model": model.name,
    "input_shape": list(model.input_shape),
    "patch_size_px": patch_px,
    "stride": stride,
    "num_patches": n,
    "rows": rows,
    "best_sweep_images_per_s": best_sweep,
    "best_forward_images_per_s": best_fwd,
    "ratio": best_sweep / best_fwd,
  }


def fit_vs_eos(
  model_dir: str | os.PathLike[str],
  *,
  batch_size: int = 64,
  repeats: int = 5,
  eos_repeats: int = 3,
  seed: int = 0,
) -> dict[str, Any]:
  """Times `fitting.fit` on a batch of synthetic faces against eos's full fit of the same faces, one by one.

  The faces are `evaluate.synthetic_faces` (random shape, expression, yaw within ±45°) of the Surrey Face Model
  in `model_dir`. Ours is one jitted call on the whole batch, compiled ahead with `.lower().compile()`;
  eos's is `evaluate.eos_fit` (edge topology, contour landmarks, model contours, 5 iterations) in a Python loop
  over the faces, its model files loaded once beforehand. Both get all 68 landmarks. The accuracy of both on
  the same faces against the known truth comes along (pose and dense vertex errors).

  Returns:
    A dict with ``ours_ms_per_face`` and ``eos_ms_per_face`` (medians over repeats of the whole batch, divided
    by the batch size), ``ratio`` (ours / eos), ``compile_s``, and mean errors of both.
  """
  from canonsal_jax.morphable import evaluate, fitting, sfm

  model = sfm.load_sfm(model_dir)
  truth = evaluate.synthetic_faces(model, np.random.default_rng(seed), batch_size)
  landmarks = jax.device_put(truth["landmarks"])
  image_size = truth["image_size"]

  start = time.perf_counter()
  compiled = jax.jit(lambda m, lm: fitting.fit(m, lm, image_size=image_size)).lower(model, landmarks).compile()
  compile_s = time.perf_counter() - start
  ours_s = median_seconds(lambda: compiled(model, landmarks), repeats=repeats)
  result = compiled(model, landmarks)

  evaluate.load_eos_model(model_dir)  # file loading is not part of a fit
  eos_fits: list[Any] = []

  def eos_batch():
    eos_fits[:] = [evaluate.eos_fit(model_dir, face, image_size) for face in truth["landmarks"]]
    return eos_fits

  eos_s = median_seconds(eos_batch, repeats=eos_repeats, warmup=0)

  ours_errors = evaluate.pose_and_dense_errors(
    model, truth, np.asarray(result.yaw_pitch_roll), np.asarray(jax.vmap(model.vertices)(result.alpha, result.beta))
  )
  eos_vertices = np.stack(
    [np.asarray(model.vertices(f.shape_coefficients, f.expression_coefficients)) for f in eos_fits]
  )
  eos_errors = evaluate.pose_and_dense_errors(
    model, truth, np.stack([f.yaw_pitch_roll for f in eos_fits]), eos_vertices
  )

  def summary(errors):
    return {
      "pose_deg_mean": errors["pose_deg"].mean(0).tolist(),
      "pose_deg_median": np.median(errors["pose_deg"], 0).tolist(),
      "dense_mm_mean": float(errors["dense_mm"].mean()),
      "dense_fraction_mean": float(errors["dense_fraction"].mean()),
    }

  return {
    "batch_size": batch_size,
    "compile_s": compile_s,
    "ours_ms_per_face": 1e3 * ours_s / batch_size,
    "eos_ms_per_face": 1e3 * eos_s / batch_size,
    "ratio": ours_s / eos_s,
    "ours_errors": summary(ours_errors),
    "eos_errors": summary(eos_errors),
    "mean_face_mm": float(ours_errors["mean_face_mm"].mean()),
  }
