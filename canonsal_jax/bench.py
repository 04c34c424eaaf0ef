"""Benchmark suites: ratios measured in one process, compile time kept apart, medians of repeats.

Used by `scripts/benchmark.py`; results go to `BENCHMARKS.md` with the command that produced them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from canonsal_jax import models, occlusion

__all__ = ["environment", "fit_vs_eos", "median_seconds", "sweep_vs_forward", "sweep_vs_torch"]


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


def interleaved_seconds(
  fns: Mapping[str, Callable[[], Any]], *, repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
  """Wall times of several callables run in rounds (A B C, A B C, ...), each result blocked on.

  On a shared machine the load drifts over minutes; timing the compared methods in alternation exposes each
  round's methods to the same load, so per-round ratios (`median_ratio`) are steadier than ratios of medians
  taken minutes apart.

  Args:
    fns: name -> a callable with no arguments.
    repeats: timed rounds.
    warmup: untimed rounds before them.

  Returns:
    name -> `[repeats]` seconds, in round order.
  """
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times: dict[str, list[float]] = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return times


def median_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
  """Median over rounds of `numerator[i] / denominator[i]` (times of one `interleaved_seconds` run)."""
  return statistics.median(a / b for a, b in zip(numerator, denominator, strict=True))


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


def vertex_centres(model3d: Any, size: int, *, face_fraction: float = 0.9) -> np.ndarray:
  """Patch centres on the visible vertices of a frontal mean face, as the paper places its patches.

  The mean shape of `model3d` (a `morphable.MorphableModel`) is drawn frontal and orthographic on a `size` x
  `size` crop, the width of its face regions (brows, eyes, nose, cheeks, mouth, chin) `face_fraction` of the
  crop, centred on them; a vertex counts when the crop's z-buffer at its nearest pixel holds it (depth within
  1 px), and vertices sharing a pixel count once.

  Returns:
    `int32 [N, 2]` (row, col) crop pixels, sorted, unique.
  """
  from canonsal_jax import raster
  from canonsal_jax.morphable.model import REGION_NAMES

  mean = np.asarray(model3d.mean, np.float64)
  face_ids = [REGION_NAMES.index(r) for r in ("brows", "eyes", "nose", "cheeks", "mouth", "chin")]
  face = mean[np.isin(np.asarray(model3d.regions), face_ids)]
  lo, hi = face.min(0), face.max(0)
  scale = face_fraction * size / (hi[0] - lo[0])
  centre = (lo + hi) / 2
  xyd = np.stack(
    [
      (mean[:, 0] - centre[0]) * scale + (size - 1) / 2,
      (centre[1] - mean[:, 1]) * scale + (size - 1) / 2,
      mean[:, 2] * scale,
    ],
    -1,
  ).astype(np.float32)
  triangles = np.asarray(model3d.triangles)
  box = raster.required_box(xyd, triangles, size, size)
  frags = raster.check_complete(raster.rasterize(xyd, triangles, size, size, max_box=box))
  rc = np.rint(xyd[:, [1, 0]]).astype(np.int64)
  inside = ((rc >= 0) & (rc < size)).all(1)
  rc, depth = rc[inside], xyd[inside, 2]
  zbuffer = np.asarray(frags.depth)[rc[:, 0], rc[:, 1]]
  seen = np.asarray(frags.tri_id)[rc[:, 0], rc[:, 1]] >= 0
  visible = seen & (depth >= zbuffer - 1.0)
  return np.unique(rc[visible], axis=0).astype(np.int32)


def sweep_vs_torch(
  model: models.FaceModel,
  *,
  patch_size: int | float = 0.07,
  strides: Sequence[int] = (1, 4, 8),
  num_positions: int | None = None,
  batch_size: int = 16,
  perturbations_per_eval: Sequence[int] = (16, 64, 256),
  repeats: int = 3,
  seed: int = 0,
  device: str = "cpu",
  positions: np.ndarray | None = None,
) -> dict[str, Any]:
  """Times our sweep against the paper's PyTorch procedure and Captum's `Occlusion` on the same patches.

  All three get the same patch set (Captum's windows, `reference.captum_centres`) or, with `num_positions`, a
  random subsample of it (Captum cannot run a subsample and is skipped), on one random face crop, constant
  baseline 0. `positions` (`[N, 2]` (row, col), e.g. `vertex_centres`) replaces the grid (one row, whatever
  `strides` holds beyond its first; Captum skipped), subsampled to `num_positions` likewise. Ours is compiled
  ahead with `.lower().compile()`; the paper's procedure batches 16 images; Captum is timed at each
  `perturbations_per_eval` (it refuses strides larger than the window). Plain batched forward throughput of
  each framework over the same number of ready-made images comes along: JAX as in `sweep_vs_forward`, PyTorch
  as one `net(batch)` per batch under `torch.inference_mode()`. Heatmaps are checked equal (to 1e-4 of the
  largest value) before timing. All methods of a row are timed in interleaved
  rounds (`interleaved_seconds`); times are medians of `repeats` rounds, ratios medians of per-round ratios.

  Both sides compute in full float32: ours is compiled under ``jax.default_matmul_precision("highest")`` and
  PyTorch's TF32 is switched off (no-ops on a CPU), so the heatmaps can be compared on a GPU too. `device`
  ("cpu", "cuda") is where the PyTorch side runs; ours runs on JAX's default device. Captum is skipped when it
  is not installed.

  Returns:
    A dict per stride with seconds and images/s of each side, and ratios of ours to each.
  """
  import torch

  from canonsal_jax.baselines import reference, torch_models

  if importlib.util.find_spec("captum") is None:
    perturbations_per_eval = ()
  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False

  def sync():
    if torch.device(device).type == "cuda":
      torch.cuda.synchronize()

  rng = np.random.default_rng(seed)
  size = model.crop.size
  image = model.preprocess(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
  patch_px = occlusion.resolve_patch_size(patch_size, model.crop.face_width)
  score = occlusion.Score.for_model(model)
  net = torch_models.from_face_model(model).to(device)
  x = torch_models.to_nchw(image[None])[0]
  rows = []
  if positions is not None:
    strides = list(strides)[:1]
  for stride in strides:
    centres = reference.captum_centres(size, size, patch_size=patch_px, stride=stride)
    if positions is not None:
      centres = np.asarray(positions, np.int32)
    grid = positions is None and (num_positions is None or num_positions >= len(centres))
    if num_positions is not None and num_positions < len(centres):
      centres = centres[np.sort(rng.choice(len(centres), num_positions, replace=False))]
    n = len(centres)
    valid = np.ones(n, bool)
    sweep = occlusion.make_sweep(model.apply_fn, patch_size=patch_px, batch_size=batch_size, score=score)
    with jax.default_matmul_precision("highest"):
      compiled = sweep.lower(model.params, image, centres, valid).compile()
    ours = compiled(model.params, image, centres, valid)
    target = None if score.kind == "expected_value" else int(ours.target)
    score_fn = reference.torch_score(score.kind, target=target, values=score.values)

    def check(heatmap, what, ours=ours):
      # 1e-4 of the largest heatmap value; where the drops are tiny next to the score itself (a random VGG's
      # logit barely moves under a 15 px patch), float32 rounding of the two forwards (~1e-6 of the score,
      # measured 4e-6 on VGG's logits) sets the floor instead.
      expected = np.asarray(ours.heatmap)
      scale = max(float(np.abs(expected).max()), 0.1 * abs(float(ours.score)))
      err = float(np.abs(np.asarray(heatmap) - expected).max() / scale)
      if err > 1e-4:
        raise AssertionError(f"{model.name}: {what} heatmap differs from ours by {err:.2e} of its largest value")
      return err

    row: dict[str, Any] = {"stride": stride, "num_patches": n, "grid": grid}

    def paper(ctr=centres, score_fn=score_fn):
      return reference.paper_occlusion(
        net, x, ctr, patch_size=patch_px, score_fn=score_fn, batch_size=batch_size, device=device
      )

    fns: dict[str, Callable[[], Any]] = {
      "ours": lambda c=compiled, ctr=centres, v=valid: c(model.params, image, ctr, v)
    }
    row["paper_err"] = check(paper(), "paper")
    fns["paper"] = paper
    row["captum"] = {}
    if grid and stride <= patch_px:
      for ppe in perturbations_per_eval:

        def captum(ppe=ppe, stride=stride, score_fn=score_fn):
          return reference.captum_occlusion(
            net, x.to(device), patch_size=patch_px, stride=stride, score_fn=score_fn, perturbations_per_eval=ppe
          ).cpu()

        row["captum"][ppe] = {"err": check(captum(), f"Captum (perturbations_per_eval={ppe})")}
        fns[f"captum_{ppe}"] = captum
    padded = -(-n // batch_size) * batch_size
    images = np.broadcast_to(image, (padded // batch_size, batch_size, *image.shape)).copy()
    images += rng.normal(scale=1e-3, size=images.shape).astype(np.float32)
    with jax.default_matmul_precision("highest"):
      fwd = _forward_program(model.apply_fn, batch_size).lower(model.params, images).compile()
    images_dev = jax.device_put(images)
    fns["jax_forward"] = lambda f=fwd, i=images_dev: f(model.params, i)
    batches = [torch_models.to_nchw(b).to(device) for b in images]

    def torch_forward(batches=batches):
      with torch.inference_mode():
        out = [net(b) for b in batches]
      sync()
      return out

    fns["torch_forward"] = torch_forward
    # Rounds of every method in turn (ours, paper, Captum..., forwards); the forwards time `padded` images and
    # are scaled to the sweep's `n`.
    for name in ("ours", "jax_forward", "torch_forward"):  # the PyTorch sweeps ran once in their checks
      jax.block_until_ready(fns[name]())
    times = interleaved_seconds(fns, repeats=repeats, warmup=0)
    for name in ("jax_forward", "torch_forward"):
      times[name] = [t * n / padded for t in times[name]]
    row["seconds"] = times
    med = {name: statistics.median(t) for name, t in times.items()}
    row["ours_s"], row["paper_s"] = med["ours"], med["paper"]
    row["jax_forward_s"], row["torch_forward_s"] = med["jax_forward"], med["torch_forward"]
    for ppe in row["captum"]:
      row["captum"][ppe]["s"] = med[f"captum_{ppe}"]
    best_captum = min(row["captum"], key=lambda ppe: row["captum"][ppe]["s"], default=None)
    row["captum_best_ppe"] = best_captum
    row["captum_best_s"] = row["captum"][best_captum]["s"] if best_captum is not None else None
    best_forward = [min(a, b) for a, b in zip(times["jax_forward"], times["torch_forward"])]
    # Medians of per-round ratios (> 1: ours is faster; `ours_vs_best_forward` is a throughput ratio, target 0.95).
    row["ours_vs_best_forward"] = median_ratio(best_forward, times["ours"])
    row["ours_vs_jax_forward"] = median_ratio(times["jax_forward"], times["ours"])
    row["ours_vs_torch_forward"] = median_ratio(times["torch_forward"], times["ours"])
    row["paper_over_ours"] = median_ratio(times["paper"], times["ours"])
    row["captum_over_ours"] = (
      median_ratio(times[f"captum_{best_captum}"], times["ours"]) if best_captum is not None else None
    )
    rows.append(row)
  return {
    "model": model.name,
    "input_shape": list(model.input_shape),
    "patch_size_px": patch_px,
    "batch_size": batch_size,
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_device": device,
    "rows": rows,
  }
