"""Benchmark suites: ratios measured in one process, compile time kept apart, medians of repeats.

Used by `benchmarks/benchmark.py` (run from the repository root as `python -m benchmarks.benchmark`); results go
to `BENCHMARKS.md` with the command that produced them. This package is not installed with `canonsal_jax`: its
PyTorch and eos comparisons need the `test` extra.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from canonsal_jax import assets, datasets, drill_down, fileio, incremental, models, occlusion, runs

_REPOSITORY = pathlib.Path(__file__).resolve().parents[1]

__all__ = [
  "cms_child",
  "cms_e2e",
  "drill_down_cms",
  "drill_down_vs_fine",
  "environment",
  "fit_scaling_vs_eos",
  "fit_vs_eos",
  "forward_vs_torch",
  "forward_xla_flags",
  "imported_vs_port",
  "incremental_vs_full",
  "interleaved_seconds",
  "map_fidelity",
  "median_ratio",
  "median_seconds",
  "precision_vs_highest",
  "sweep_vs_forward",
  "sweep_vs_torch",
  "texture_vs_eos",
  "vertex_centres",
]


def environment() -> dict[str, Any]:
  """What the numbers were measured on."""
  return {
    "jax": jax.__version__,
    "backend": jax.default_backend(),
    "devices": [str(d) for d in jax.devices()],
    "cpu_count": os.cpu_count(),
    "load_average": list(os.getloadavg()),  # other work on the machine while the numbers were taken
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
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
  method: str = "full",
) -> dict[str, Any]:
  """Times the occlusion sweep against a plain batched forward pass over the same number of images.

  `method` is `make_sweep`'s: "full" (default) measures the sweep's overhead over the forward passes it makes;
  "auto" or "incremental" the incremental sweep, which makes fewer.

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
    sweep = occlusion.make_sweep(model.apply_fn, patch_size=patch_px, batch_size=bs, score=score, method=method)
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

  The faces are `fit_accuracy.synthetic_faces` (random shape, expression, yaw within ±45°) of the Surrey Face Model
  in `model_dir`. Ours is one jitted call on the whole batch, compiled ahead with `.lower().compile()`;
  eos's is `fit_accuracy.eos_fit` (edge topology, contour landmarks, model contours, 5 iterations) in a Python loop
  over the faces, its model files loaded once beforehand. Both get all 68 landmarks. The accuracy of both on
  the same faces against the known truth comes along (pose and dense vertex errors).

  Returns:
    A dict with ``ours_ms_per_face`` and ``eos_ms_per_face`` (medians over repeats of the whole batch, divided
    by the batch size), ``ratio`` (ours / eos), ``compile_s``, and mean errors of both.
  """
  from canonsal_jax.evidence import fit_accuracy
  from canonsal_jax.morphable import fitting, sfm

  model = sfm.load_sfm(model_dir)
  truth = fit_accuracy.synthetic_faces(model, np.random.default_rng(seed), batch_size)
  landmarks = jax.device_put(truth["landmarks"])
  image_size = truth["image_size"]

  start = time.perf_counter()
  compiled = jax.jit(lambda m, lm: fitting.fit(m, lm, image_size=image_size)).lower(model, landmarks).compile()
  compile_s = time.perf_counter() - start
  ours_s = median_seconds(lambda: compiled(model, landmarks), repeats=repeats)
  result = compiled(model, landmarks)

  fit_accuracy.load_eos_model(model_dir)  # file loading is not part of a fit
  eos_fits: list[Any] = []

  def eos_batch():
    eos_fits[:] = [fit_accuracy.eos_fit(model_dir, face, image_size) for face in truth["landmarks"]]
    return eos_fits

  eos_s = median_seconds(eos_batch, repeats=eos_repeats, warmup=0)

  ours_errors = fit_accuracy.pose_and_dense_errors(
    model, truth, np.asarray(result.yaw_pitch_roll), np.asarray(jax.vmap(model.vertices)(result.alpha, result.beta))
  )
  eos_vertices = np.stack(
    [np.asarray(model.vertices(f.shape_coefficients, f.expression_coefficients)) for f in eos_fits]
  )
  eos_errors = fit_accuracy.pose_and_dense_errors(
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


def _torch_float32() -> Any:
  """PyTorch, with TF32 off for its matmuls and convolutions (full float32 on a GPU too, for parity checks)."""
  import torch

  torch.backends.cuda.matmul.allow_tf32 = False
  torch.backends.cudnn.allow_tf32 = False
  return torch


def _torch_forward(net: Any, batches: Sequence[Any], device: str) -> Callable[[], list[Any]]:
  """A plain PyTorch forward over ready-made batches on `device`, synchronised so that it can be timed."""
  import torch

  def forward():
    with torch.inference_mode():
      out = [net(b) for b in batches]
    if torch.device(device).type == "cuda":
      torch.cuda.synchronize()
    return out

  return forward


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
  ahead with `.lower().compile()` and runs `batch_size` occluded images per step, as do both plain forwards;
  it is `make_sweep`'s default, the incremental sweep for models with a layer graph, and then the full-forward
  sweep is timed beside it ("ours_full");
  the paper's procedure always batches 16 images (its published setting); Captum is timed at each
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
  torch = _torch_float32()

  from benchmarks.baselines import reference, torch_models

  if importlib.util.find_spec("captum") is None:
    perturbations_per_eval = ()
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

    def paper(ctr=centres, score_fn=score_fn):  # the paper's batches of 16, whatever `batch_size` ours uses
      return reference.paper_occlusion(net, x, ctr, patch_size=patch_px, score_fn=score_fn, device=device)

    fns: dict[str, Callable[[], Any]] = {
      "ours": lambda c=compiled, ctr=centres, v=valid: c(model.params, image, ctr, v)
    }
    if model.layer_graph is not None:  # "ours" is the default, the incremental sweep: the full one beside it
      full = occlusion.make_sweep(
        model.apply_fn, patch_size=patch_px, batch_size=batch_size, score=score, method="full"
      )
      with jax.default_matmul_precision("highest"):
        full = full.lower(model.params, image, centres, valid).compile()
      row["ours_full_err"] = check(full(model.params, image, centres, valid).heatmap, "full sweep")
      fns["ours_full"] = lambda c=full, ctr=centres, v=valid: c(model.params, image, ctr, v)
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
    fns["torch_forward"] = _torch_forward(net, [torch_models.to_nchw(b).to(device) for b in images], device)
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
    if "ours_full" in med:
      row["ours_full_s"] = med["ours_full"]
      row["full_vs_best_forward"] = median_ratio(
        [min(a, b) for a, b in zip(times["jax_forward"], times["torch_forward"])], times["ours_full"]
      )
      row["paper_over_full"] = median_ratio(times["paper"], times["ours_full"])
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
    "paper_batch_size": reference.PAPER_BATCH_SIZE,
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
    "torch_device": device,
    "rows": rows,
  }


# ------------------------------------------------------------------------------------------ texture vs eos


def _texture_program(size: int, max_box: int) -> Callable:
  """`(heatmaps[B, S, S], meshes[B, V, 3], uv_raster, triangles) -> (texture, weight, num_dropped)`, jitted:
  the crop z-buffer (`raster.rasterize`) and `canonical.to_texture`, vmapped over faces, as the pipeline runs them."""
  from canonsal_jax import canonical, raster

  def one(heatmap, mesh, uv_raster, triangles):
    frags = raster.rasterize(mesh, triangles, size, size, max_box=max_box)
    texture, weight = canonical.to_texture(heatmap, frags, mesh, uv_raster, triangles)
    return texture, weight, frags.num_dropped

  return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


def _eos_scene(eos: Any, vertices: np.ndarray, crop_xy: np.ndarray, size: int) -> tuple[Any, np.ndarray]:
  """eos's rendering parameters for a fitted mesh seen in a crop, and the mesh in crop x, y, depth under them.

  eos's scaled-orthographic pose comes from exact correspondences (model vertex -> our projection into the
  crop; its parameter struct has no constructor); the mesh is then projected with eos's own matrices (window
  transform x = (x_clip + 1) W / 2, y = H - (y_clip + 1) H / 2; depth in the same pixels), so both extractors
  see the same geometry.
  """
  ids = np.arange(0, len(vertices), 37)
  pose = eos.fitting.estimate_orthographic_projection_linear(
    [p.reshape(2, 1).astype(np.float32) for p in crop_xy[ids]],
    [np.r_[vertices[k], 1].astype(np.float32).reshape(4, 1) for k in ids],
    True,
    size,
  )
  params = eos.fitting.RenderingParameters(pose, size, size)
  modelview, projection = np.asarray(params.get_modelview()), np.asarray(params.get_projection())
  eye = np.c_[vertices, np.ones(len(vertices))] @ modelview.T
  clip = eye @ projection.T
  pixels_per_unit = size / 2 * projection[0, 0]
  xyd = np.stack([(clip[:, 0] + 1) * size / 2, size - (clip[:, 1] + 1) * size / 2, eye[:, 2] * pixels_per_unit], -1)
  return params, xyd.astype(np.float32)


def texture_vs_eos(
  model_dir: str | os.PathLike[str],
  *,
  crop_size: int = 128,
  texture_size: int = 0,
  crop_padding: float = 0.25,
  batch_sizes: Sequence[int] = (1, 16, 64),
  repeats: int = 5,
  photos: Sequence[Any] | None = None,
) -> dict[str, Any]:
  """Our texture extraction against eos's `extract_texture` on real fitted photos, same texture size.

  Every photo (`datasets.fit_test_photos`, or `photos`: objects with `name`, `image`, `landmarks_xy`, `image_size`) is
  fitted with `fitting.fit` on the Surrey Face Model in `model_dir`, cut to a `crop_size` "box" crop around its
  landmarks (`crop_padding` of the box width per side), and its grey crop (uint8) is pulled into the texture
  by both: ours is `raster.rasterize` (the crop's z-buffer) + `canonical.to_texture`, one jitted program
  vmapped over a batch of faces, compiled ahead; eos's is `eos.render.extract_texture` (its ray-cast vertex
  visibility + bilinear sampling, RGBA) one face at a time. Both see the same mesh (`_eos_scene`). Batches of
  more faces than photos repeat the photos. Batch 1 runs the photos one call each. All variants are timed in
  interleaved rounds.

  Agreement, per photo and pooled over all: `visibility_agreement` = share of the union of the texels either
  extractor sees that both see; `value_agreement` = share of the texels both see whose values agree to 1/255
  (eos truncates to uint8, so ours - eos is in [0, 1/255) where the two agree).

  Returns:
    A dict with the texture size, `ours_ms_per_face` per batch size, `eos_ms_per_face`, `eos_over_ours` per
    batch size (median of per-round ratios), the compile seconds and the agreement figures.
  """
  import eos

  from canonsal_jax import canonical, faces, raster
  from canonsal_jax.models.base import CropSpec
  from canonsal_jax.morphable import fitting, sfm

  model = sfm.load_sfm(model_dir)
  photos = datasets.fit_test_photos() if photos is None else list(photos)
  texture_size = texture_size or canonical.default_texture_size(crop_size, model)
  uvr = canonical.model_uv_raster(model, texture_size)
  triangles = np.asarray(model.triangles)
  texcoords = [np.array([u, 1 - v], np.float32).reshape(2, 1) for u, v in np.asarray(model.uv)]  # eos's v is down
  crop = CropSpec("box", crop_size, crop_padding)
  scenes = []
  for photo in photos:
    result = fitting.fit(model, np.asarray(photo.landmarks_xy, np.float32)[None], image_size=photo.image_size)
    vertices = np.asarray(model.vertices(result.alpha[0], result.beta[0]), np.float64)
    landmarks = np.asarray(photo.landmarks_xy, np.float64)
    face = faces.Face(
      box_xyxy=np.r_[landmarks.min(0), landmarks.max(0)],
      score=float("nan"),
      landmarks_xy=landmarks,
      landmarks5_xy=np.zeros((5, 2)),
    )
    crop_rgb, crop_from_image = faces.crop_face(photo.image, face, crop)
    crop_xy = faces.apply_affine(crop_from_image, np.asarray(result.vertices_xyd[0, :, :2], np.float64))
    params, xyd = _eos_scene(eos, vertices, crop_xy, crop_size)
    grey = np.asarray(np.rint(crop_rgb.astype(np.float64) @ [0.299, 0.587, 0.114]).clip(0, 255), np.uint8)
    mesh = eos.core.Mesh(
      [v.reshape(3, 1).astype(np.float32) for v in vertices], triangles.tolist(), texcoords=texcoords
    )
    scenes.append(
      {
        "name": photo.name,
        "params": params,
        "mesh": mesh,
        "rgba": np.ascontiguousarray(np.stack([grey, grey, grey, np.full_like(grey, 255)], -1)),
        "heatmap": grey.astype(np.float32) / np.float32(255.0),
        "xyd": xyd,
        "geometry_err_px": float(np.abs(xyd[:, :2] - crop_xy).max()),
      }
    )
  max_box = max(raster.required_box(s["xyd"], triangles, crop_size, crop_size) for s in scenes)
  program = _texture_program(crop_size, max_box)
  uvr_dev, tri_dev = jax.device_put(uvr), jax.device_put(triangles)

  def stacked(b: int) -> tuple[jax.Array, jax.Array]:
    picks = [scenes[i % len(scenes)] for i in range(b)]
    return (
      jax.device_put(np.stack([s["heatmap"] for s in picks])),
      jax.device_put(np.stack([s["xyd"] for s in picks])),
    )

  fns: dict[str, Callable[[], Any]] = {}
  faces_per_call: dict[str, int] = {}
  compile_s: dict[int, float] = {}
  compiled_by_size = {}
  for b in batch_sizes:
    start = time.perf_counter()
    compiled = program.lower(*stacked(b), uvr_dev, tri_dev).compile()
    compile_s[b] = time.perf_counter() - start
    compiled_by_size[b] = compiled
    if b == 1:
      singles = [(jax.device_put(s["heatmap"][None]), jax.device_put(s["xyd"][None])) for s in scenes]
      fns["ours_1"] = lambda c=compiled, singles=singles: [c(h, m, uvr_dev, tri_dev) for h, m in singles]
      faces_per_call["ours_1"] = len(scenes)
    else:
      args = stacked(b)
      fns[f"ours_{b}"] = lambda c=compiled, args=args: c(*args, uvr_dev, tri_dev)
      faces_per_call[f"ours_{b}"] = b

  def eos_all():
    return [eos.render.extract_texture(s["mesh"], s["params"], s["rgba"], texture_size) for s in scenes]

  fns["eos"] = eos_all
  faces_per_call["eos"] = len(scenes)
  times = interleaved_seconds(fns, repeats=repeats)
  per_face = {name: [t / faces_per_call[name] for t in ts] for name, ts in times.items()}

  # Agreement, on one unbatched call per photo; the batched programs must give the same textures.
  isos = eos_all()
  batched = {b: np.asarray(c(*stacked(b), uvr_dev, tri_dev)[0]) for b, c in compiled_by_size.items() if b > 1}
  rows = []
  pooled = {"either": 0, "both": 0, "values_agree": 0, "ours": 0, "eos": 0}
  batch_err = 0.0
  for i, (s, iso) in enumerate(zip(scenes, isos)):
    texture, weight, dropped = program(s["heatmap"][None], s["xyd"][None], uvr_dev, tri_dev)
    if int(dropped[0]):
      raise AssertionError(f"{s['name']}: {int(dropped[0])} triangles not rasterised at max_box {max_box}")
    for b, textures in batched.items():
      if i < b:
        batch_err = max(batch_err, float(np.abs(textures[i] - np.asarray(texture[0])).max()))
    texture, ours_seen = np.asarray(texture[0]), np.asarray(weight[0]) > 0
    iso = np.asarray(iso)
    theirs, theirs_seen = iso[..., 0] / 255.0, iso[..., 3] > 0
    both, either = ours_seen & theirs_seen, ours_seen | theirs_seen
    agree = np.abs(texture - theirs)[both] <= 1 / 255 + 1e-6
    counts = {
      "either": int(either.sum()),
      "both": int(both.sum()),
      "values_agree": int(agree.sum()),
      "ours": int(ours_seen.sum()),
      "eos": int(theirs_seen.sum()),
    }
    for k, v in counts.items():
      pooled[k] += v
    rows.append(
      {
        "name": s["name"],
        **counts,
        "visibility_agreement": counts["both"] / max(counts["either"], 1),
        "value_agreement": counts["values_agree"] / max(counts["both"], 1),
        "max_value_diff_255": float(255 * np.abs(texture - theirs)[both].max()) if both.any() else 0.0,
        "geometry_err_px": s["geometry_err_px"],
      }
    )
  eos_ms = 1e3 * statistics.median(per_face["eos"])
  ours = {b: 1e3 * statistics.median(per_face[f"ours_{b}"]) for b in batch_sizes}
  return {
    "crop_size": crop_size,
    "texture_size": texture_size,
    "max_box": max_box,
    "num_photos": len(scenes),
    "ours_ms_per_face": ours,
    "eos_ms_per_face": eos_ms,
    "eos_over_ours": {b: median_ratio(per_face["eos"], per_face[f"ours_{b}"]) for b in batch_sizes},
    "compile_s": compile_s,
    "batched_vs_single_max_diff": batch_err,
    "visibility_agreement": pooled["both"] / max(pooled["either"], 1),
    "value_agreement": pooled["values_agree"] / max(pooled["both"], 1),
    "texels_seen": {"ours": pooled["ours"], "eos": pooled["eos"], "both": pooled["both"]},
    "photos": rows,
    "seconds": times,
  }


# ------------------------------------------------------------------------------------------ end to end

# Main-thread stages of `runs.run_cms`'s summary ("stage_seconds_this_run"); "host_load_detect" is summed
# over the prefetch threads, overlapped with these.
_CMS_MAIN_STAGES = ("sweep", "fit", "texture", "accumulate", "checkpoint")
_CHILD_MARK = "CANONSAL_BENCH_RESULT "


def _first_run_cache(root: pathlib.Path) -> pathlib.Path:
  """A cache folder (`CANONSAL_CACHE_DIR`) as on a machine whose assets and converted weights are installed
  but which has run nothing yet: every entry of the user's cache folder linked in, except what a run leaves
  behind (the detections, the compiled programs and the canonical face's rasterisations), which starts empty."""
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  user_cache = assets.cache_dir()
  for entry in user_cache.iterdir() if user_cache.is_dir() else ():
    if entry.name not in ("detections", "jax_compilation_cache", "canonical"):
      (root / entry.name).symlink_to(entry)
  return root


def script_restarts(
  scripts: Sequence[str], *, out_dir: str | os.PathLike[str], repeats: int = 2, timeout_s: float = 600
) -> list[dict[str, Any]]:
  """Wall seconds of each script's run on the default photo, as a user starts it: a first run (no compiled
  programs and no detections cached), a second run (with the programs and detections the first left), and a
  run with the compilation cache off (`--compilation_cache=off`; the detections cached).

  Every run is a fresh process (Python, JAX and the weights load each time; the weights are already converted
  on disk, see `_first_run_cache`). The rounds interleave: cold, warm, off, then again from an empty cache;
  medians are reported.

  Args:
    scripts: names in `scripts/` without `.py` ("cis", "occlusion", "fit", ...).
    out_dir: scratch folder for the caches and the scripts' outputs.
    repeats: rounds.
    timeout_s: per run.

  Returns:
    Per script: "seconds" {"cold", "warm", "off"} medians, "warm_over_cold" (the median of the per-round
    ratios) and the per-round seconds.
  """
  results = []
  for script in scripts:
    times: dict[str, list[float]] = {"cold": [], "warm": [], "off": []}
    for r in range(repeats):
      cache = _first_run_cache(pathlib.Path(out_dir) / f"{script}_cache{r}")
      env = {**os.environ, "CANONSAL_CACHE_DIR": str(cache)}
      for kind, flag in (("cold", "default"), ("warm", "default"), ("off", "off")):
        command = [sys.executable, str(_REPOSITORY / "scripts" / f"{script}.py"), f"--compilation_cache={flag}"]
        outputs = pathlib.Path(out_dir) / f"{script}_{kind}{r}"
        shutil.rmtree(outputs, ignore_errors=True)  # a fresh folder, as a user's first run (no --overwrite)
        command.append(f"--out_dir={outputs}")
        start = time.perf_counter()
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False)
        times[kind].append(time.perf_counter() - start)
        if proc.returncode != 0:
          raise RuntimeError(f"{script} ({kind}) failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    results.append(
      {
        "script": script,
        "seconds": {k: statistics.median(v) for k, v in times.items()},
        "warm_over_cold": median_ratio(times["warm"], times["cold"]),
        "rounds": times,
      }
    )
  return results


def _child_result(code: str, env: dict[str, str], timeout_s: float, what: str) -> dict[str, Any]:
  """Runs `python -c code` (XLA flags must be set before JAX starts) and returns the JSON it printed after
  `_CHILD_MARK`; the child imports `benchmarks` from the repository root.

  Raises:
    RuntimeError: the child failed or printed no result (with the end of its stderr).
  """
  proc = subprocess.run(
    [sys.executable, "-c", code],
    env=env,
    cwd=_REPOSITORY,
    capture_output=True,
    text=True,
    timeout=timeout_s,
    check=False,
  )
  lines = [line for line in proc.stdout.splitlines() if line.startswith(_CHILD_MARK)]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(lines[-1].removeprefix(_CHILD_MARK))


def cms_child(spec: dict[str, Any]) -> dict[str, Any]:
  """One timed `runs.run_cms` in this process (run by `cms_e2e` in a subprocess; see there).

  A warm-up run on the first `warmup_images` files compiles every program (the compiled programs and the
  models stay cached in the process), then the timed run on `files` writes to a fresh folder.
  """
  import resource

  from canonsal_jax import assets, faces
  from canonsal_jax import config as config_lib

  assets.enable_compilation_cache()  # the warm-up's compilations persist between runs, as the scripts' do

  from canonsal_jax import pipeline

  config = config_lib.default_config()
  config.model = spec["model"]
  config.morphable_model = spec["morphable_model"]
  config.occlusion.stride = spec.get("stride", config.occlusion.stride)
  config.cms.face_batch = spec["face_batch"]
  config.cms.host_workers = spec["num_threads"]
  config.cms.host_pool = spec.get("host_pool", "threads")
  config.cms.checkpoint_every = spec["checkpoint_every"]
  out = pathlib.Path(spec["out_dir"])
  files = list(spec["files"])
  # run_cms starts one detector per host worker and run (dlib's are not shared between threads); its
  # 68-landmark predictor is a 100 MB file, so this set-up is part of "host_load_detect": measure it apart.
  start = time.perf_counter()
  faces.FaceDetector(config.detector)
  detector_init_s = time.perf_counter() - start
  # The detection cache of each run: the warm-up's own (it must not warm the timed run's), then the one given.
  folders = [spec.get("warmup_detections_dir"), spec.get("detections_dir")]
  caches = [faces.DetectionCache(f) if f else pipeline.detection_cache() for f in folders]
  start = time.perf_counter()
  pipeline.detection_cache = lambda: caches[0]
  runs.run_cms(config, out / "warmup", dataset=files[: spec["warmup_images"]])
  warmup_s = time.perf_counter() - start
  pipeline.detection_cache = lambda: caches[1]
  start = time.perf_counter()
  runs.run_cms(config, out / "timed", dataset=files)
  wall_s = time.perf_counter() - start
  summary = json.loads((out / "timed" / "summary.json").read_text())
  stages = summary["stage_seconds_this_run"]
  main = sum(stages.get(k, 0.0) for k in _CMS_MAIN_STAGES)
  return {
    "devices": jax.device_count(),
    "face_batch": spec["face_batch"],
    "images": len(files),
    "images_accumulated": summary["images_accumulated"],
    "warmup_s": warmup_s,
    "wall_s": wall_s,
    "seconds_this_run": summary["seconds_this_run"],
    "images_per_s": summary["images_per_second_this_run"],
    "stage_seconds": stages,
    "detector_init_s": detector_init_s,
    # Thread-seconds of decoding + detection per image, less one detector set-up per prefetch thread.
    "detect_s_per_image": (stages.get("host_load_detect", 0.0) - spec["num_threads"] * detector_init_s) / len(files),
    # Main-thread seconds the device stages waited for decoded, detected photos: the host on the critical path.
    "host_wait_s": stages.get("host_wait", 0.0),
    "host_share_of_wall": stages.get("host_wait", 0.0) / summary["seconds_this_run"],
    "detection_cache": summary["detection_cache_this_run"],
    "host": summary["host_this_run"],
    # run_cms's seconds not in a main-thread stage: set-up (models, programs from the process cache), waiting
    # for the prefetch threads (decoding + detection), the final checkpoint.
    "unattributed_s": summary["seconds_this_run"] - main,
    "batches": summary["batches_this_run"],
    "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }


def cms_e2e(
  *,
  devices: Sequence[int] = (1, 2, 4),
  face_batches: Sequence[int] = (1, 4, 8),
  max_images: int = 24,
  model: str = "gender",
  morphable_model: str = "default",
  num_threads: int = 2,
  out_dir: str | os.PathLike[str],
  files: Sequence[str] | None = None,
  timeout_s: float = 1800.0,
) -> dict[str, Any]:
  """Images/s of the whole CMS pipeline (`runs.run_cms`) with its per-stage seconds, peak memory, and
  scaling with forced CPU devices and `cms.face_batch`.

  Each configuration runs in its own subprocess (`XLA_FLAGS=--xla_force_host_platform_device_count=N` must be
  set before JAX starts) on the first `max_images` files of the default dataset (or `files`): the device
  counts at the last face batch, and the face batches at the first device count (a cross, not the full grid).
  Peak memory is the subprocess's `ru_maxrss`. Forced CPU devices share the machine's cores: on 2 cores, 4
  devices cannot run 4x the work.

  Returns:
    A dict with one result per configuration (`cms_child`'s) and the environment.
  """

  files = list(files) if files is not None else datasets.default_dataset()
  files = files[:max_images]
  runs = [(d, face_batches[-1]) for d in devices] + [(devices[0], fb) for fb in face_batches[:-1]]
  results = []
  for d, fb in runs:
    out = pathlib.Path(out_dir) / f"d{d}_fb{fb}"
    if out.exists():
      shutil.rmtree(out)
    spec = {
      "model": model,
      "morphable_model": morphable_model,
      "face_batch": fb,
      "num_threads": num_threads,
      "checkpoint_every": max_images,  # one checkpoint at the end: its cost is not what is measured
      "out_dir": str(out),
      "files": files,
      "warmup_images": fb * d,  # one full batch compiles every program
    }
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    env = {**os.environ, "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={d}".strip()}
    code = f"import json; from benchmarks import bench; print({_CHILD_MARK!r} + json.dumps(bench.cms_child({spec!r})))"
    results.append(_child_result(code, env, timeout_s, f"cms run with {d} devices, face_batch {fb}"))
  return {"model": model, "morphable_model": morphable_model, "num_threads": num_threads, "runs": results}


# The longest a warm-up task waits for the pool's other workers to start.
_WARMUP_TIMEOUT_S = 120.0


def _host_task(settings: Any, task: tuple[str, Any]) -> Any:
  """`host.load_and_detect`, or a warm-up `("warmup", folder, workers)`: it checks in (a file named after its
  worker) and waits until `workers` workers have, so no worker takes two warm-ups and every worker has started
  (its dlib models loaded) before the timed photos are handed out."""
  import threading

  from canonsal_jax import host

  if task[0] != "warmup":
    return host.load_and_detect(settings, task)
  _, folder, workers = task
  (pathlib.Path(folder) / f"{os.getpid()}_{threading.get_ident()}").touch()
  deadline = time.perf_counter() + _WARMUP_TIMEOUT_S
  while len(os.listdir(folder)) < workers:
    if time.perf_counter() > deadline:
      raise TimeoutError(f"{workers} host workers did not all start within {_WARMUP_TIMEOUT_S:.0f} s")
    time.sleep(0.005)
  return None


def host_detection_rate(
  files: Sequence[str],
  *,
  pools: Sequence[tuple[str, int]] = (("processes", 1), ("processes", 2), ("threads", 1), ("threads", 2)),
) -> list[dict[str, Any]]:
  """Decoding + detection alone (no device work): `runs.run_cms`'s host work over `files` in each pool, with no
  detection cache (every photo detected).

  Each pool first runs one warm-up task per worker (`_host_task`), so every worker has started and loaded
  dlib's models before the clock starts; then the photos are timed.

  Returns:
    Per pool: "startup_s" (the pool started to every worker ready), "seconds" and "images_per_s" over the photos.
  """
  import functools
  import tempfile

  from canonsal_jax import config as config_lib
  from canonsal_jax import host

  config = config_lib.default_config()
  host_settings = host.HostSettings(config, None)
  rows = []
  for kind, workers in pools:
    checked_in = tempfile.mkdtemp(prefix="canonsal_warmup_")
    tasks = [("warmup", checked_in, workers)] * workers + [(f, None) for f in files]
    start = time.perf_counter()
    with datasets.prefetch(
      tasks,
      functools.partial(_host_task, host_settings),
      num_workers=workers,
      pool=kind,
      initializer=host.start_host_worker,
      initargs=(host_settings,),
      depth=max(8, 2 * workers),
    ) as items:
      ready, failed = None, 0
      for item in items:
        if item.index == workers - 1:
          ready = time.perf_counter()
        failed += item.error is not None or (item.value is not None and item.value.error is not None)
    end = time.perf_counter()
    shutil.rmtree(checked_in)
    rows.append(
      {
        "pool": kind,
        "workers": workers,
        "images": len(files),
        "failed": failed,
        "startup_s": ready - start,
        "seconds": end - ready,
        "images_per_s": len(files) / (end - ready),
      }
    )
  return rows


def host_pipeline(
  *,
  max_images: int = 101,
  model: str = "gender",
  second_model: str = "age",
  second_stride: int = 4,
  face_batch: int = 8,
  out_dir: str | os.PathLike[str],
  dataset: str | None = None,
  timeout_s: float = 900.0,
) -> dict[str, Any]:
  """The host side of the main job (`datasets.default_dataset()`, the first `max_images` photos), measured in one
  run: detection alone in 1 and 2 worker processes and threads (`host_detection_rate`), then whole CMS runs
  (`cms_child`, each in its own process, programs compiled by a warm-up first), with their images/s and the
  share of wall time the device stages waited on the host:

  * cold: an empty detection cache, host work in 1 thread, 2 threads, 2 processes;
  * warm: the cache the 2-thread cold run filled, the same model again;
  * second model: `second_model` (stride `second_stride`) over the same warm cache, as an auditor's next run.

  Returns:
    "detection" (`host_detection_rate`'s rows), "runs" (`cms_child`'s results, each with "label"), and the
    ratios: "detect_2_over_1_processes", "detect_2_over_1_threads", "warm_over_cold" (images/s, 2 threads).
    `dataset` (a folder, list or glob) replaces the main job's photos.
  """
  files = (datasets.list_images(dataset) if dataset else datasets.default_dataset())[:max_images]
  root = pathlib.Path(out_dir)
  shutil.rmtree(root, ignore_errors=True)
  root.mkdir(parents=True)
  detection = host_detection_rate(files)
  rate = {(r["pool"], r["workers"]): r["images_per_s"] for r in detection}
  plan = [
    ("cold, 1 thread", model, 0, "threads", 1, "cold1"),
    ("cold, 2 threads", model, 0, "threads", 2, "cold2"),
    ("cold, 2 processes", model, 0, "processes", 2, "cold_processes"),
    ("warm, 2 threads", model, 0, "threads", 2, "cold2"),
    (f"warm, 2 threads, second model ({second_model})", second_model, second_stride, "threads", 2, "cold2"),
  ]
  results = []
  for label, name, stride, pool, workers, cache in plan:
    run_dir = root / label.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
    spec = {
      "model": name,
      "morphable_model": "default",
      "face_batch": face_batch,
      "num_threads": workers,
      "host_pool": pool,
      "checkpoint_every": max_images,
      "out_dir": str(run_dir),
      "files": files,
      "warmup_images": face_batch,
      "warmup_detections_dir": str(run_dir / "warmup_detections"),
      "detections_dir": str(root / f"detections_{cache}"),
      **({"stride": stride} if stride else {}),
    }
    code = f"import json; from benchmarks import bench; print({_CHILD_MARK!r} + json.dumps(bench.cms_child({spec!r})))"
    result = _child_result(code, dict(os.environ), timeout_s, f"cms run: {label}")
    results.append({"label": label, "pool": pool, "workers": workers, **result})
  cold2 = next(r for r in results if r["label"] == "cold, 2 threads")
  warm = next(r for r in results if r["label"] == "warm, 2 threads")
  return {
    "images": len(files),
    "model": model,
    "second_model": second_model,
    "detection": detection,
    "runs": results,
    "detect_2_over_1_processes": rate[("processes", 2)] / rate[("processes", 1)],
    "detect_2_over_1_threads": rate[("threads", 2)] / rate[("threads", 1)],
    "detect_processes_over_threads": rate[("processes", 2)] / rate[("threads", 2)],
    "warm_over_cold": warm["images_per_s"] / cold2["images_per_s"],
  }


# ------------------------------------------------------------------------------------------ fit vs eos, scaling


def fit_scaling_vs_eos(
  model_dir: str | os.PathLike[str],
  *,
  batch_sizes: Sequence[int] = (1, 16, 64, 256),
  repeats: int = 5,
  eos_faces: int = 16,
  single_faces: int = 8,
  photos: Sequence[Any] | None = (),
  seed: int = 0,
) -> dict[str, Any]:
  """Time per face of `fitting.fit` at several batch sizes against eos's full fit, with held-out errors.

  Faces are the first `b` of one pool of `fit_accuracy.synthetic_faces` (the Surrey Face Model in `model_dir`,
  500x500 images), so every batch size fits the same faces. Ours is one `fitting.fit` call per batch (its
  first call per batch size, which compiles, is timed apart as `compile_s`); batch 1 runs `single_faces` faces
  one call each. eos's full `fit_shape_and_pose`
  (`fit_accuracy.eos_fit`) runs the first `eos_faces` faces one by one (its cost per face does not depend on a
  batch). Both get all 68 landmarks for the timing; all are timed in interleaved rounds.

  Held-out error (`fit_accuracy.held_out_error`: 10 landmarks given weight 0, their distance to the fitted vertex
  over the outer-eye-corner distance): ours at each batch size over its `b` faces and over the first
  `eos_faces` (where eos's is measured too), and on `photos` (e.g. `datasets.fit_test_photos()`; one fit each, their
  image sizes differ) for both.

  Returns:
    A dict: per batch size `ours_ms_per_face`, `eos_over_ours` (median of per-round ratios of time per face),
    `compile_s`, `held_out_ours` (mean over its faces), `held_out_ours_on_eos_faces`; `eos_ms_per_face`,
    `held_out_eos_on_eos_faces`; `photos` per photo and their means.
  """
  from canonsal_jax.evidence import fit_accuracy
  from canonsal_jax.morphable import fitting, sfm
  from canonsal_jax.morphable.model import NUM_LANDMARKS

  model = sfm.load_sfm(model_dir)
  pool = fit_accuracy.synthetic_faces(
    model, np.random.default_rng(seed), max(max(batch_sizes), eos_faces, single_faces)
  )
  landmarks, image_size = pool["landmarks"], pool["image_size"]
  # `fitting.fit` itself (its jitted solver compiles once per batch size), so `fit_accuracy.held_out_error` below
  # reuses the compiled programs: the first call of each batch size, compilation included, is timed apart.
  fns: dict[str, Callable[[], Any]] = {}
  faces_per_call: dict[str, int] = {}
  compile_s: dict[int, float] = {}
  for b in batch_sizes:
    calls = [landmarks[i : i + 1] for i in range(single_faces)] if b == 1 else [landmarks[:b]]
    weights = np.ones((len(calls[0]), NUM_LANDMARKS), np.float32)
    fns[f"ours_{b}"] = lambda calls=calls, w=weights: [
      fitting.fit(model, lm, image_size=image_size, landmark_weights=w).vertices_xyd for lm in calls
    ]
    faces_per_call[f"ours_{b}"] = len(calls) * len(calls[0])
    start = time.perf_counter()
    jax.block_until_ready(fitting.fit(model, calls[0], image_size=image_size, landmark_weights=weights))
    compile_s[b] = time.perf_counter() - start
  fit_accuracy.load_eos_model(model_dir)  # file loading is not part of a fit
  fns["eos"] = lambda: [fit_accuracy.eos_fit(model_dir, face, image_size) for face in landmarks[:eos_faces]]
  faces_per_call["eos"] = eos_faces
  times = interleaved_seconds(fns, repeats=repeats)
  per_face = {name: [t / faces_per_call[name] for t in ts] for name, ts in times.items()}

  rows = []
  for b in batch_sizes:
    errors = fit_accuracy.held_out_error(model, landmarks[:b], image_size).ours.mean(1)  # [b]
    rows.append(
      {
        "batch_size": b,
        "ours_ms_per_face": 1e3 * statistics.median(per_face[f"ours_{b}"]),
        "eos_over_ours": median_ratio(per_face["eos"], per_face[f"ours_{b}"]),
        "compile_s": compile_s[b],
        "held_out_ours": float(errors.mean()),
        "held_out_ours_on_eos_faces": float(errors[:eos_faces].mean()) if b >= eos_faces else None,
        "held_out_ours_per_face": errors.tolist(),
      }
    )
  eos_errors = fit_accuracy.held_out_error(model, landmarks[:eos_faces], image_size, eos_model_dir=model_dir)
  photo_rows = []
  for photo in photos or ():
    err = fit_accuracy.held_out_error(
      model, np.asarray(photo.landmarks_xy, np.float32)[None], photo.image_size, eos_model_dir=model_dir
    )
    photo_rows.append({"name": photo.name, "ours": float(err.ours.mean()), "eos": float(err.eos.mean())})
  result = {
    "eos_faces": eos_faces,
    "eos_ms_per_face": 1e3 * statistics.median(per_face["eos"]),
    "held_out_eos_on_eos_faces": float(eos_errors.eos.mean()),
    "held_out_ours_on_eos_faces": float(eos_errors.ours.mean()),
    "rows": rows,
    "photos": photo_rows,
    "seconds": times,
  }
  if photo_rows:
    ours, theirs = np.array([r["ours"] for r in photo_rows]), np.array([r["eos"] for r in photo_rows])
    result.update(
      photos_ours_mean=float(ours.mean()),
      photos_eos_mean=float(theirs.mean()),
      photos_mean_ratio=float((ours / theirs).mean()),
    )
  return result


# ------------------------------------------------------------------------------------------ forward passes


def _jax_op_seconds(compiled: Any, args: Sequence[Any], *, calls: int, trace_dir: str) -> dict[str, float]:
  """Mean seconds per call of each XLA:CPU op (the thunks in a `jax.profiler` trace) of `compiled(*args)`."""
  import glob
  import gzip
  import re

  instructions = set(re.findall(r"^\s*(?:ROOT )?%([\w.-]+) = ", compiled.as_text(), re.MULTILINE))

  with jax.profiler.trace(trace_dir):
    for _ in range(calls):
      jax.block_until_ready(compiled(*args))
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  seconds: dict[str, float] = {}
  for e in events:
    name = e.get("name", "")
    # Thunk events carry the HLO instruction's name; the rest are Python, the runtime and the thread pool.
    if e.get("ph") == "X" and name in instructions:
      seconds[name] = seconds.get(name, 0.0) + e.get("dur", 0) * 1e-6 / calls
  return dict(sorted(seconds.items(), key=lambda kv: -kv[1]))


def _hlo_convolutions(hlo_text: str) -> dict[str, list[str]]:
  """Fusion name -> the convolutions (output and window) inside it, from a compiled program's HLO text."""
  import re

  calls = dict(re.findall(r"%([\w.]+) = [^\n]*? fusion\([^\n]*calls=%([\w.]+)", hlo_text))
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r"^%([\w.]+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
    elif m := re.search(r"= (f32\[[\d,]+\])[^ ]* convolution\([^)]*\), window=\{([^}]*)\}", line):
      bodies.setdefault(current, []).append(f"{m.group(1)} {m.group(2)}")
  return {fusion: bodies.get(body, []) for fusion, body in calls.items()}


def forward_vs_torch(
  model: models.FaceModel,
  *,
  batch_sizes: Sequence[int] = (8, 16, 32),
  repeats: int = 5,
  num_images: int = 256,
  profile_batch: int | None = 16,
  trace_dir: str | None = None,
) -> dict[str, Any]:
  """Plain forward passes of a ported model in JAX (XLA:CPU) and its PyTorch twin, per image, per batch size.

  `num_images` random inputs go through each framework in batches (JAX: one compiled `lax.map` program per
  batch size; PyTorch: `net(batch)` per batch under `torch.inference_mode()`), timed in interleaved rounds.
  With `profile_batch`, the seconds per op of one JAX forward at that batch size come along (XLA:CPU thunks
  from a `jax.profiler` trace, each fusion with the convolutions inside it, from the compiled HLO) and
  PyTorch's (`torch.profiler`, by op). `XLA_FLAGS` set before JAX starts (e.g. `--xla_cpu_use_onednn=true`)
  change the JAX side; `environment()` records them.

  Returns:
    A dict: per batch size JAX and PyTorch ms per image and `torch_over_jax` (median of per-round ratios, > 1:
    JAX is faster); `jax_ops` / `torch_ops` (ms per call, largest first) with `profile_batch`.
  """
  import tempfile

  import torch

  from benchmarks.baselines import torch_models

  net = torch_models.from_face_model(model)
  rng = np.random.default_rng(0)
  size = model.crop.size
  faces_u8 = rng.integers(0, 256, size=(num_images, size, size, 3), dtype=np.uint8)
  images = np.stack([model.preprocess(f) for f in faces_u8]).astype(np.float32)
  fns: dict[str, Callable[[], Any]] = {}
  rows = []
  for b in batch_sizes:
    n = num_images // b * b
    batched = jax.device_put(images[:n].reshape(n // b, b, *images.shape[1:]))
    compiled = _forward_program(model.apply_fn, b).lower(model.params, batched).compile()
    fns[f"jax_{b}"] = lambda c=compiled, x=batched: c(model.params, x)
    torch_batches = [torch_models.to_nchw(images[i : i + b]) for i in range(0, n, b)]

    def torch_forward(batches=torch_batches):
      with torch.inference_mode():
        return [net(x) for x in batches]

    fns[f"torch_{b}"] = torch_forward
    rows.append({"batch_size": b, "num_images": n})
  times = interleaved_seconds(fns, repeats=repeats)
  for row in rows:
    b, n = row["batch_size"], row["num_images"]
    row["jax_ms_per_image"] = 1e3 * statistics.median(times[f"jax_{b}"]) / n
    row["torch_ms_per_image"] = 1e3 * statistics.median(times[f"torch_{b}"]) / n
    row["torch_over_jax"] = median_ratio(times[f"torch_{b}"], times[f"jax_{b}"])
  result: dict[str, Any] = {
    "model": model.name,
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "torch_threads": torch.get_num_threads(),
    "rows": rows,
    "seconds": times,
  }
  if profile_batch:
    x = jax.device_put(images[:profile_batch])
    compiled = jax.jit(model.apply_fn).lower(model.params, x).compile()
    jax.block_until_ready(compiled(model.params, x))
    with tempfile.TemporaryDirectory() as tmp:
      ops = _jax_op_seconds(compiled, (model.params, x), calls=10, trace_dir=trace_dir or tmp)
    convs = _hlo_convolutions(compiled.as_text())
    result["jax_ops"] = [{"op": k, "ms": 1e3 * v, "convolutions": convs.get(k, [])} for k, v in ops.items()]
    xt = torch_models.to_nchw(images[:profile_batch])
    with torch.inference_mode():
      net(xt)
      with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(10):
          net(xt)
    averages = prof.key_averages(group_by_input_shape=True)
    result["torch_ops"] = sorted(
      (
        {"op": a.key, "input_shapes": str(a.input_shapes), "ms": a.self_cpu_time_total / 10 / 1e3}
        for a in averages
        if a.self_cpu_time_total > 0
      ),
      key=lambda r: -r["ms"],
    )[:20]
  return result


def forward_xla_flags(
  model_name: str,
  flag_sets: Sequence[str],
  *,
  batch_sizes: Sequence[int] = (8, 16, 32),
  repeats: int = 5,
  timeout_s: float = 1200.0,
) -> list[dict[str, Any]]:
  """`forward_vs_torch` of `models.load(model_name)` in one subprocess per `XLA_FLAGS` value (flags are read
  when JAX starts); PyTorch runs in each as the same-process baseline. Returns one result per flag set."""
  results = []
  for flag_set in flag_sets:
    env = {**os.environ, "XLA_FLAGS": flag_set}
    spec = {"model": model_name, "batch_sizes": list(batch_sizes), "repeats": repeats}
    code = (
      "import json; from canonsal_jax import models; from benchmarks import bench; s = "
      + repr(spec)
      + "; print("
      + repr(_CHILD_MARK)
      + " + json.dumps(bench.forward_vs_torch(models.load(s['model']), "
      "batch_sizes=s['batch_sizes'], repeats=s['repeats'], profile_batch=None)))"
    )
    results.append(_child_result(code, env, timeout_s, f"forward with XLA_FLAGS={flag_set!r}"))
  return results


def _random_crop_and_grid(
  model: models.FaceModel, patch_size: int | float, stride: int, num_positions: int | None, seed: int
) -> tuple[np.ndarray, int, np.ndarray]:
  """One random face crop (model input), the patch side in pixels and the `stride` grid of patches wholly
  inside, or `num_positions` random positions of it (sorted)."""
  rng = np.random.default_rng(seed)
  size = model.crop.size
  image = model.preprocess(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))
  patch_px = occlusion.resolve_patch_size(patch_size, model.crop.face_width)
  centres = occlusion.grid_centres(size, size, patch_size=patch_px, stride=stride)
  if num_positions is not None and num_positions < len(centres):
    centres = centres[np.sort(rng.choice(len(centres), num_positions, replace=False))]
  return image, patch_px, centres


def _drop_errors(
  drops: Mapping[str, np.ndarray], reference: str
) -> tuple[float, dict[str, float], dict[str, float], dict[str, float]]:
  """Each method's drops against `reference`'s: the largest |drop| of the reference, and per method the largest
  and mean |difference| over it and the Pearson correlation."""
  want = drops[reference]
  scale = float(np.abs(want).max())
  largest = {name: float(np.abs(d - want).max() / scale) for name, d in drops.items()}
  mean = {name: float(np.abs(d - want).mean() / scale) for name, d in drops.items()}
  corr = {name: float(np.corrcoef(d, want)[0, 1]) for name, d in drops.items()}
  return scale, largest, mean, corr


def incremental_vs_full(
  model: models.FaceModel,
  *,
  patch_size: int | float = 5,
  stride: int = 1,
  num_positions: int | None = None,
  batch_size: int = 16,
  approx_thresholds: Sequence[float] = (),
  repeats: int = 3,
  with_torch: bool = True,
  seed: int = 0,
  device: str = "cpu",
  more_batch_sizes: Sequence[int] = (),
  window_batch_size: int | None = None,
) -> dict[str, Any]:
  """Times the incremental occlusion sweep against the full-forward sweep (and PyTorch) on the same patches.

  One random face crop, constant baseline 0, the grid of `stride` (patches wholly inside), or `num_positions`
  random positions of it. Sweeps, all `make_sweep` at `batch_size`, compiled ahead (compile seconds reported
  apart): "full" (the model's own `apply_fn` on every occluded image), "full_graph" (the same, through the
  model's `LayerGraph`: the same ops as the incremental sweep, so their ratio is the windows' saving alone),
  "incremental" (exact) and "approx_<tau>" for each projective-field threshold. With `with_torch`, the
  paper's PyTorch procedure (`reference.paper_occlusion`, batch 16) and a plain PyTorch forward over the same
  number of ready-made images come along, where the model has a twin; `device` ("cpu", "cuda") is where it
  runs. Every sweep is compiled under ``jax.default_matmul_precision("highest")`` and PyTorch's TF32 is off, so
  the drop errors are float32 rounding on a GPU too. With `more_batch_sizes`, "full@B" and "incremental@B" run
  at each of those batches as well, and `best` compares each sweep at its fastest batch (a CPU's best batch is
  not the same for both). `window_batch_size` goes to every incremental sweep (`make_sweep`'s). All are timed
  in interleaved rounds; ratios are medians of per-round ratios.

  Returns:
    A dict with seconds (medians), `speedup` (method -> full / method, per-round median), compile seconds,
    each method's largest and mean drop error against "full" relative to the largest drop and the Pearson
    correlation of its drops with full's, the windows per layer, and `best` (per sweep its fastest batch, and
    `speedup`: per round, full's fastest time over incremental's fastest, median over rounds).
  """
  image, patch_px, centres = _random_crop_and_grid(model, patch_size, stride, num_positions, seed)
  n = len(centres)
  valid = np.ones(n, bool)
  score = occlusion.Score.for_model(model)
  graph = model.layer_graph
  if graph is None:
    raise ValueError(f"{model.name} has no layer graph")
  settings: dict[str, tuple[Callable, dict[str, Any]]] = {
    "full": (model.apply_fn, {"method": "full"}),
    "full_graph": (graph.apply, {"method": "full"}),
    "incremental": (model.apply_fn, {"method": "incremental", "window_batch_size": window_batch_size}),
  }
  for tau in approx_thresholds:
    settings[f"approx_{tau:g}"] = (
      model.apply_fn,
      {"method": "incremental", "approx_threshold": float(tau), "window_batch_size": window_batch_size},
    )
  batches = dict.fromkeys(settings, batch_size)
  for b in more_batch_sizes:
    settings[f"full@{b}"] = (model.apply_fn, {"method": "full"})
    settings[f"incremental@{b}"] = settings["incremental"]
    batches[f"full@{b}"] = batches[f"incremental@{b}"] = int(b)
  compiled, compile_s, results = {}, {}, {}
  for name, (fn, kwargs) in settings.items():
    sweep = occlusion.make_sweep(fn, patch_size=patch_px, batch_size=batches[name], score=score, **kwargs)
    start = time.perf_counter()
    with jax.default_matmul_precision("highest"):
      compiled[name] = sweep.lower(model.params, image, centres, valid).compile()
    compile_s[name] = time.perf_counter() - start
    results[name] = compiled[name](model.params, image, centres, valid)
  scale, errors, mean_errors, correlations = _drop_errors(
    {name: np.asarray(r.drops) for name, r in results.items()}, "full"
  )
  fns: dict[str, Callable[[], Any]] = {
    name: (lambda c=c: c(model.params, image, centres, valid)) for name, c in compiled.items()
  }
  torch_info = None
  if with_torch and importlib.util.find_spec("torch") is not None:
    torch = _torch_float32()

    from benchmarks.baselines import reference, torch_models

    try:
      net = torch_models.from_face_model(model).to(device)
    except ValueError:
      net = None
    if net is not None:
      x = torch_models.to_nchw(image[None])[0]
      target = None if score.kind == "expected_value" else int(results["full"].target)
      score_fn = reference.torch_score(score.kind, target=target, values=score.values)

      def paper():
        return reference.paper_occlusion(net, x, centres, patch_size=patch_px, score_fn=score_fn, device=device)

      heat = np.asarray(paper())
      want = np.asarray(results["full"].heatmap)
      batch = torch_models.to_nchw(np.broadcast_to(image, (batch_size, *image.shape)).copy()).to(device)
      fns["torch_paper"] = paper
      fns["torch_forward"] = _torch_forward(net, [batch] * (-(-n // batch_size)), device)
      torch_info = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device,
        "paper_heatmap_err": float(np.abs(heat - want).max() / max(float(np.abs(want).max()), 1e-12)),
      }
  times = interleaved_seconds(fns, repeats=repeats)
  best: dict[str, Any] = {}
  per_round: dict[str, list[float]] = {}  # each round's fastest time over the sweep's batches
  for method in ("full", "incremental"):
    names = [name for name in times if name.split("@")[0] == method]
    fastest = min(names, key=lambda name: statistics.median(times[name]))
    best[method] = {"batch_size": batches[fastest], "seconds": statistics.median(times[fastest])}
    per_round[method] = [min(ts) for ts in zip(*(times[name] for name in names), strict=True)]
  best["speedup"] = median_ratio(per_round["full"], per_round["incremental"])
  shapes = [a.shape[1:] for a in graph.activations(model.params, image[None])]
  the_plan = incremental.plan(graph, shapes, patch_size=patch_px)
  return {
    "model": model.name,
    "input_shape": list(model.input_shape),
    "patch_size_px": patch_px,
    "stride": stride,
    "num_patches": n,
    "batch_size": batch_size,
    "seconds": {name: statistics.median(t) for name, t in times.items()},
    "speedup": {name: median_ratio(times["full"], t) for name, t in times.items()},
    "speedup_vs_full_graph": {name: median_ratio(times["full_graph"], t) for name, t in times.items()},
    "compile_s": compile_s,
    "max_drop": scale,
    "drop_error": errors,
    "drop_mean_error": mean_errors,
    "drop_correlation": correlations,
    "torch": torch_info,
    "windows": the_plan.describe(),
    "window_batch_size": window_batch_size,
    "best": best,
  }


def precision_vs_highest(
  model: models.FaceModel,
  *,
  patch_size: int | float = 0.07,
  stride: int = 1,
  num_positions: int | None = None,
  batch_size: int = 256,
  precisions: Sequence[str] = ("default", "high"),
  method: str = "full",
  repeats: int = 3,
  seed: int = 0,
) -> dict[str, Any]:
  """The sweep compiled at lower matmul precisions (TF32, bf16 passes on a GPU) against "highest" (float32).

  On a GPU, XLA's default precision for float32 convolutions and matmuls is TF32 (about 10 mantissa bits), and
  occlusion drops are small differences of two scores, so rounding in the forward pass lands on the heatmap
  directly. One random face crop, constant baseline 0, the `stride` grid (or `num_positions` random positions
  of it); every precision timed in interleaved rounds.

  Returns:
    seconds per precision (medians), speed-up over "highest" (medians of per-round ratios), and each
    precision's drop error against "highest": largest and mean |difference| over the largest |drop|, and the
    Pearson correlation of the drops.
  """
  image, patch_px, centres = _random_crop_and_grid(model, patch_size, stride, num_positions, seed)
  valid = np.ones(len(centres), bool)
  score = occlusion.Score.for_model(model)
  sweep = occlusion.make_sweep(model.apply_fn, patch_size=patch_px, batch_size=batch_size, score=score, method=method)
  compiled, drops = {}, {}
  for name in ("highest", *precisions):
    with jax.default_matmul_precision(name):
      compiled[name] = sweep.lower(model.params, image, centres, valid).compile()
    drops[name] = np.asarray(compiled[name](model.params, image, centres, valid).drops)
  scale, errors, mean_errors, correlations = _drop_errors(drops, "highest")
  times = interleaved_seconds(
    {name: (lambda c=c: c(model.params, image, centres, valid)) for name, c in compiled.items()}, repeats=repeats
  )
  return {
    "model": model.name,
    "backend": jax.default_backend(),
    "method": method,
    "patch_size_px": patch_px,
    "num_patches": len(centres),
    "batch_size": batch_size,
    "max_drop": scale,
    "seconds": {name: statistics.median(t) for name, t in times.items()},
    "speedup": {name: median_ratio(times["highest"], t) for name, t in times.items()},
    "drop_error": errors,
    "drop_mean_error": mean_errors,
    "drop_correlation": correlations,
  }


def imported_vs_port(
  name: str,
  build: Callable[[], models.FaceModel],
  *,
  patch_size: int,
  stride: int = 1,
  num_positions: int | None = None,
  port: models.FaceModel | None = None,
  batch_size: int = 16,
  repeats: int = 5,
  seed: int = 0,
) -> dict[str, Any]:
  """An imported network's sweeps: import time, full and incremental sweep speed, against its hand port.

  `build()` makes the model (an ONNX import or a PyTorch export and import), timed as the import; the first
  full sweep is compiled and run after it ("file to first sweep"). One random crop, constant baseline 0, the
  `stride` grid of `patch_size` px patches (or `num_positions` random positions of it). Timed in interleaved
  rounds: the imported model's full and incremental sweeps, and with `port` the hand port's too.

  Returns:
    A dict with `import_s`, `first_sweep_s` (import, compile and first call of the full sweep), seconds per
    sweep, `speedup` (full over incremental, per side), `import_over_port` (the port's full-sweep time over the
    import's: above 1 the import is faster), and the imported sweeps' drop errors (incremental against full;
    full against the port's full), relative to the largest drop.
  """
  start = time.perf_counter()
  model = build()
  import_s = time.perf_counter() - start
  image, patch_px, centres = _random_crop_and_grid(port or model, patch_size, stride, num_positions, seed)
  valid = np.ones(len(centres), bool)
  score = occlusion.Score.for_model(port or model)
  subjects = {"imported": model} | ({"port": port} if port is not None else {})
  compiled, drops = {}, {}
  for side, m in subjects.items():
    for method in ("full", "incremental"):
      if method == "incremental" and m.layer_graph is None:
        continue
      sweep = occlusion.make_sweep(m.apply_fn, patch_size=patch_px, batch_size=batch_size, score=score, method=method)
      key = f"{side}_{method}"
      compiled[key] = sweep.lower(m.params, image, centres, valid).compile()
      drops[key] = np.asarray(compiled[key](m.params, image, centres, valid).drops)
      if key == "imported_full":
        first_sweep_s = time.perf_counter() - start
  side_params = {k: subjects[k.split("_")[0]].params for k in compiled}
  fns = {k: (lambda c=c, p=side_params[k]: c(p, image, centres, valid)) for k, c in compiled.items()}
  times = interleaved_seconds(fns, repeats=repeats)
  _, errors, _, _ = _drop_errors(drops, "imported_full")  # relative to the imported full sweep's largest drop
  result: dict[str, Any] = {
    "model": name,
    "num_patches": len(centres),
    "patch_size": patch_px,
    "batch_size": batch_size,
    "import_s": import_s,
    "first_sweep_s": first_sweep_s,
    "layer_graph": model.layer_graph is not None,
    "layer_graph_reason": getattr(model.apply_fn, "layer_graph_reason", ""),
    "seconds": {k: statistics.median(v) for k, v in times.items()},
    "speedup": {},
    "drop_error": {},
  }
  for side in subjects:
    if f"{side}_incremental" in times:
      result["speedup"][side] = median_ratio(times[f"{side}_full"], times[f"{side}_incremental"])
  if "imported_incremental" in drops:
    result["drop_error"]["incremental_vs_full"] = errors["imported_incremental"]
  if port is not None:
    result["import_over_port"] = median_ratio(times["port_full"], times["imported_full"])
    result["drop_error"]["import_vs_port"] = errors["port_full"]
  return result


def _real_crop(model: models.FaceModel, photo: str) -> np.ndarray:
  """The model input of the largest face of `photo`, cut as the pipeline cuts it."""
  from canonsal_jax import faces, fileio

  pixels = fileio.load_image(photo)
  crop, _ = faces.crop_face(pixels, faces.largest_face(pixels), model.crop)
  return model.preprocess(crop)


def _temp_bytes(compiled: Any) -> int:
  """A compiled program's temporaries (XLA's `memory_analysis`): its peak working memory beside arguments and
  outputs; 0 where the backend does not say."""
  analysis = compiled.memory_analysis()
  return int(getattr(analysis, "temp_size_in_bytes", 0) or 0) if analysis is not None else 0


def map_fidelity(exact: np.ndarray, approx: np.ndarray, valid: np.ndarray | None = None) -> dict[str, float]:
  """An approximate map against the exact one over `valid` (default all): the share of the exact map's top-10%
  (by |value|) in the approximation's top 10%, Pearson r, and the largest |difference| relative to the largest
  |value|."""
  valid = np.ones(exact.shape, bool) if valid is None else valid
  a, b = np.asarray(exact, np.float64)[valid], np.asarray(approx, np.float64)[valid]
  top = lambda m: np.abs(m) >= np.quantile(np.abs(m), 0.9)
  return {
    "top10_overlap": float((top(a) & top(b)).sum() / top(a).sum()),
    "pearson_r": float(np.corrcoef(a, b)[0, 1]),
    "max_error": float(np.abs(b - a).max() / np.abs(a).max()),
  }


def drill_down_vs_fine(
  model: models.FaceModel,
  *,
  patch_size: int | float,
  settings: Sequence[tuple[int, float, int, float]],
  photos: Sequence[str],
  stride: int = 1,
  batch_size: int = 16,
  repeats: int = 1,
  full_photos: int = 1,
  full_sample: int = 1,
  images: Sequence[np.ndarray] | None = None,
  save_dir: str | pathlib.Path | None = None,
  reference_dir: str | pathlib.Path | None = None,
  warmup: bool = True,
) -> dict[str, Any]:
  """Drill-down sweeps against the exact fine sweep on real face crops: speed, fidelity and peak memory.

  The fine grid is the `stride` grid of patches wholly inside the crop. The reference is the exact fine sweep
  by the model's default method (incremental where it has a layer graph, "exact" below); "full" is the
  full-forward fine sweep, timed on the first `full_photos` photos only (at stride 1 on the identity network one
  call takes minutes): the speed-up over it is the drill-down's over the exact sweep (all photos) times the exact
  sweep's over full (those photos). Each drill-down setting (`drill_down.Settings`' fields) runs on every photo;
  the methods are timed in interleaved rounds, ratios are medians of per-round ratios. Fidelity per photo
  (`map_fidelity`, and the share of pixels that are exact). Peak memory: XLA's compiled temporaries of each
  exact sweep, and for a drill-down the largest of its stage programs (the same `make_sweep` at the coarse
  lattice's, the middle budget's and a fine round's numbers of patches).

  Args:
    full_sample: time the full sweep against the exact one on every `full_sample`-th patch of the fine grid
      in raster order (with a step that does not divide the grid's rows, every part of the crop), cut to whole
      batches, instead of the whole grid: both sweeps' cost is a sum over their batches, so the ratio carries
      over, and the full sweep's whole-grid seconds are reported scaled by the grid's patches over the
      sample's. For a grid whose full sweep takes hours (the VGG-16-sized network at stride 1); 1 times the
      whole grid.
    images: model inputs to use instead of the photos' crops (a network without a face crop of its own, such
      as the VGG-16-sized one); `photos` then names them.
    save_dir: where to keep each photo's exact sweep (`<model>_<k>.npz`: drops per patch, centres, heatmap,
      coverage, the input's hash), so that other drill-down settings can be judged later without running the
      model again.
    reference_dir: a `save_dir` of an earlier run: the fidelity is judged against the exact maps kept there
      (same model name, grid, photos and inputs, checked before anything runs); the exact sweep is then timed
      only on the `full_sample` patches (the whole grid when that is 1), beside the full one, on every photo,
      and its whole-grid seconds scaled like the full sweep's. Not with `save_dir`.
    warmup: call each drill-down once before timing it (its stage programs compile on the first call). False
      times the first call, compiling included (a few seconds against a drill-down of minutes): for runs too
      long to make twice.

  Returns:
    A dict with, per setting, per-photo fidelity, the worst over photos, seconds (median), the speed-ups over
    the exact and the full sweep and the peak temporaries; the exact and full sweeps' seconds and temporaries.
  """
  size = model.crop.size
  patch_px = occlusion.resolve_patch_size(patch_size, model.crop.face_width)
  centres = occlusion.grid_centres(size, size, patch_size=patch_px, stride=stride)
  n = len(centres)
  valid = np.ones(n, bool)
  score = occlusion.Score.for_model(model)
  images = list(images) if images is not None else [_real_crop(model, photo) for photo in photos]
  exact_sweeps = {
    name: occlusion.make_sweep(model.apply_fn, patch_size=patch_px, batch_size=batch_size, score=score, method=method)
    for name, method in (("full", "full"), ("exact", "auto"))
  }
  sample = np.arange(0, n, max(1, full_sample))
  if len(sample) < n and len(sample) > batch_size:  # whole batches: a padded last batch costs a whole one
    sample = sample[: len(sample) // batch_size * batch_size]
  if reference_dir is not None and save_dir is not None:
    raise ValueError("give save_dir or reference_dir, not both: a reference run keeps no exact sweeps")
  kept = [  # checked before anything runs: a wrong folder should not cost a sweep of hours
    _kept_sweep(reference_dir, model.name, k, photo, image, centres, patch_px)
    for k, (photo, image) in enumerate(zip(photos, images, strict=True))
    if reference_dir is not None
  ]
  # Programs timed by name. With a reference, the exact sweep runs on the sample only.
  programs = {"full": sample} | ({"exact": np.arange(n)} if reference_dir is None else {})
  if len(sample) < n or reference_dir is not None:
    programs["exact_sample"] = sample
  compiled, temp_bytes, compile_s = {}, {}, {}
  for name, rows in programs.items():
    start = time.perf_counter()
    with jax.default_matmul_precision("highest"):
      sweep = exact_sweeps[name.removesuffix("_sample")]
      compiled[name] = sweep.lower(model.params, images[0], centres[rows], valid[rows]).compile()
    compile_s[name] = time.perf_counter() - start
    temp_bytes[name] = _temp_bytes(compiled[name])
  drills = {}
  settings = [drill_down.Settings(*s) for s in settings]
  for s in settings:
    key = drill_down_name(s)
    drills[key] = drill_down.make_drill_down_sweep(
      model.apply_fn, patch_size=patch_px, batch_size=batch_size, score=score, **s._asdict()
    )
    # Each stage's program, at its number of patches (a budget is at most the grid's; every round has one).
    sizes = {len(drill_down.coarse_subset(centres, s.coarse_every))}
    sizes |= {drill_down.budget(s.fine_fraction / s.fine_rounds, n)}
    sizes |= {drill_down.budget(s.middle_fraction, n)} if s.middle_every else set()
    stage = exact_sweeps["exact"]
    temp_bytes[key] = max(
      _temp_bytes(stage.lower(model.params, images[0], centres[:size], valid[:size]).compile())
      for size in {min(s, n) for s in sizes}
      if size
    )
  times: dict[str, list[float]] = {name: [] for name in (*programs, *drills)}
  paired: dict[str, list[float]] = {name: [] for name in drills}  # exact's time in the drill-down's rounds
  full_pairs: list[tuple[float, float]] = []
  rows: dict[str, list[dict[str, Any]]] = {name: [] for name in drills}
  full_pair = ("full", "exact_sample" if "exact_sample" in programs else "exact")
  exact_key = "exact" if reference_dir is None else "exact_sample"  # what the drill-downs are timed against
  for k, (photo, image) in enumerate(zip(photos, images, strict=True)):
    timed = {exact_key} | (set(full_pair) if k < full_photos else set())
    calls = {}
    for name in sorted(timed, key=list(programs).index):
      c, v = centres[programs[name]], valid[programs[name]]
      calls[name] = lambda image=image, name=name, c=c, v=v: compiled[name](model.params, image, c, v)
    for name, sweep in drills.items():
      calls[name] = lambda sweep=sweep, image=image: sweep(model.params, image, centres, valid)
      if warmup:
        jax.block_until_ready(calls[name]())  # compiles its stages
    results = {}
    for _ in range(repeats):
      seconds = {}
      for name, fn in calls.items():
        start = time.perf_counter()
        results[name] = jax.block_until_ready(fn())
        seconds[name] = time.perf_counter() - start
        times[name].append(seconds[name])
      for name in drills:
        paired[name].append(seconds[exact_key] * n / len(programs[exact_key]))
      if "full" in seconds:
        full_pairs.append((seconds["full"], seconds[full_pair[1]]))
    if reference_dir is not None:
      exact, covered = kept[k]
    else:
      exact = np.asarray(results["exact"].heatmap)
      covered = np.asarray(results["exact"].count) > 0
    if save_dir is not None:
      pathlib.Path(save_dir).mkdir(parents=True, exist_ok=True)
      fileio.save_npz_versioned(
        pathlib.Path(save_dir) / f"{model.name}_{k}.npz",
        _KEPT_SWEEP,
        _KEPT_SWEEP_VERSION,
        drops=np.asarray(results["exact"].drops),
        heatmap=exact,
        count=np.asarray(results["exact"].count),
        centres=centres,
        patch=patch_px,
        size=size,
        photo=pathlib.Path(photo).name,
        input_sha256=_array_sha256(image),
      )
    for name in drills:
      got = results[name]
      rows[name].append(
        {
          "photo": pathlib.Path(photo).name,
          **map_fidelity(exact, np.asarray(got.heatmap), covered),
          "exact_share": float(np.asarray(got.exact)[covered].mean()),
          "patches_run": int(np.asarray(got.ran).sum()),
        }
      )
  full_over_exact = statistics.median(f / e for f, e in full_pairs)
  per_setting = {}
  for s, name in zip(settings, drills, strict=True):
    over_exact = median_ratio(paired[name], times[name])
    per_setting[name] = {
      **s._asdict(),
      "photos": rows[name],
      "worst": {k: min(r[k] for r in rows[name]) for k in ("top10_overlap", "pearson_r", "exact_share")}
      | {"max_error": max(r["max_error"] for r in rows[name])},
      "patches_run": statistics.median(r["patches_run"] for r in rows[name]),
      "seconds": statistics.median(times[name]),
      "speedup_over_exact": over_exact,
      "speedup_over_full": over_exact * full_over_exact,
      "temp_bytes": temp_bytes[name],
    }
  return {
    "model": model.name,
    "patch_size": patch_px,
    "stride": stride,
    "num_patches": n,
    "batch_size": batch_size,
    "seconds": {  # a sample's seconds scaled to the grid
      "full": statistics.median(times["full"]) * n / len(sample),
      "exact": statistics.median(times[exact_key]) * n / len(programs[exact_key]),
    },
    "exact_from": str(reference_dir) if reference_dir is not None else "this run",
    "full_sample": len(sample),
    "full_over_exact": full_over_exact,
    "compile_s": compile_s,
    "temp_bytes": {"full": temp_bytes["full"], "exact": temp_bytes[exact_key]},  # at their programs' sizes
    "settings": per_setting,
  }


# What `drill_down_vs_fine(save_dir=)` keeps of an exact sweep, for `reference_dir=` (`fileio`'s versioned files).
_KEPT_SWEEP, _KEPT_SWEEP_VERSION = "exact_sweep", 1


def _array_sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a, np.float32).tobytes()).hexdigest()


def _kept_sweep(
  folder: str | pathlib.Path, name: str, k: int, photo: str, image: np.ndarray, centres: np.ndarray, patch: int
) -> tuple[np.ndarray, np.ndarray]:
  """`(exact map, covered)` of photo `k`'s kept exact sweep (`drill_down_vs_fine(save_dir=)`).

  Raises:
    ValueError: the file is missing or holds another grid's, photo's or input's sweep.
  """
  path = pathlib.Path(folder) / f"{name}_{k}.npz"
  try:
    kept = fileio.load_npz_versioned(path, _KEPT_SWEEP, _KEPT_SWEEP_VERSION)
  except fileio.FormatError as e:
    raise ValueError(f"{e} (keep exact sweeps with save_dir)") from None
  same = np.array_equal(kept["centres"], centres) and int(kept["patch"]) == patch
  same = same and str(kept["photo"]) == pathlib.Path(photo).name
  if not same or str(kept["input_sha256"]) != _array_sha256(image):
    raise ValueError(f"{path} is not this grid's exact sweep of {photo}")
  return kept["heatmap"], kept["count"] > 0


def drill_down_name(setting: Sequence) -> str:
  """A drill-down setting (`drill_down.Settings`' fields in order) as a short name."""
  every, fraction, middle, middle_fraction, rounds = drill_down.Settings(*setting)
  name = f"every{every}_{middle}at{middle_fraction:g}_{fraction:g}" if middle else f"every{every}_{fraction:g}"
  return name + (f"x{rounds}" if rounds > 1 else "")


def drill_down_cms(config: Any, settings: Sequence, *, dataset: str, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """The CMS of `config` over `dataset` with the exact sweep and with each drill-down setting: wall seconds of
  each run (`runs.run_cms`, one after the other in this process, compiled programs shared) and each drill-down
  CMS's fidelity to the exact one (`map_fidelity` of the "all" group's mean over the texels valid in both)."""
  import copy

  out = pathlib.Path(out_dir)
  results: dict[str, Any] = {"model": config.model, "stride": config.occlusion.stride, "dataset": dataset}
  maps = {}
  for setting in [drill_down.Settings(0, 0.0), *(drill_down.Settings(*s) for s in settings)]:  # 0: the exact sweep
    every = setting.coarse_every
    cfg = copy.deepcopy(config)
    dd = cfg.occlusion.drill_down
    dd.enabled = every > 0
    if every:
      dd.update(setting._asdict())
    name = drill_down_name(setting) if every else "exact"
    folder = out / name
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    acc = runs.run_cms(cfg, folder, dataset=dataset)
    seconds = time.perf_counter() - start
    maps[name] = acc.mean("all")
    results[name] = {"seconds": seconds, "images": acc.num_images("all")}
    if every:
      (want, ok_a), (got, ok_b) = maps["exact"], maps[name]
      results[name].update(map_fidelity(want, got, ok_a & ok_b))
      records = [r for r in acc.records() if r["status"] == "ok"]
      results[name]["exact_share"] = statistics.mean(r["sweep"]["exact_share"] for r in records)
      results[name]["speedup_over_exact"] = results["exact"]["seconds"] / seconds
  return results
