"""Benchmark suites: ratios measured in one process, compile time kept apart, medians of repeats.

Used by `scripts/benchmark.py`; results go to `BENCHMARKS.md` with the command that produced them.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from canonsal_jax import models, occlusion

__all__ = ["environment", "median_seconds", "sweep_vs_forward"]


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
