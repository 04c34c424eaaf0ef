"""What runs write and read back: the per-image result folders, the CMS views and records, run summaries, the
saved per-image textures, and the merge of a multi-process run's checkpoints and summaries.

Every file is written atomically (`fileio`); the JSON summaries and the checkpoint-like files (`cis_texture.npz`,
`cms.npz`) carry a format name and version.

Example:
  Lines marked +SKIP are not run as doctests: it explains the astronaut and writes files (weights fetched on first use).
  >>> from canonsal_jax import config as config_lib, outputs, pipeline
  >>> result = pipeline.cis_image(config_lib.default_config())  # doctest: +SKIP
  >>> outputs.write_cis(result, "/tmp/cis")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import pathlib
import platform
from collections.abc import Sequence
from typing import Any

import numpy as np

from canonsal_jax import assets, canonical, cms, fileio, morphable, pipeline, raster, viz

__all__ = [
  "checkpoint_path",
  "load_textures",
  "merge_processes",
  "occlusion_overlay",
  "render_texture",
  "run_summary",
  "texture_path",
  "with_reproducibility",
  "write_cis",
  "write_cms",
  "write_fit",
  "write_occlusion",
]


_OUTPUT_FORMAT = "canonsal_jax.occlusion_result"


_OUTPUT_VERSION = 1


def occlusion_overlay(result: pipeline.OcclusionResult) -> np.ndarray:
  """`uint8 [H, W, 3]`: the photo with the heatmap over it, the crop with its heatmap, and the heatmap alone, on one
  colour scale, titled with the model, its score and the method."""
  covered = result.count > 0
  vmax = float(np.abs(result.heatmap[covered]).max()) if covered.any() else 1.0
  crop_heat = viz.colorize(result.heatmap, valid=covered, vmax=vmax)
  factor = max(1, 256 // result.crop.shape[0])
  crop_tile = viz.overlay(viz.upscale(result.crop, factor), viz.upscale(crop_heat, factor))
  inside = np.isfinite(result.heatmap_image)
  image_heat = viz.colorize(result.heatmap_image, valid=inside, vmax=vmax)
  image_tile = viz.overlay(result.image, image_heat, alpha=np.where(inside, 0.55, 0.0))
  if result.score_kind == "expected_value":
    what = f"expected value {result.score:.1f}"
  elif result.score_kind.startswith("cosine"):
    what = f"{result.score_kind} similarity {result.score:.3f}"  # to itself, a reference, or genuine - impostor
  else:
    what = f"{result.label} (p={result.probabilities[result.target]:.2f}), {result.score_kind} {result.score:.2f}"
  how = f"patch {result.patch_size}px stride {result.stride}" if result.method == "occlusion" else result.method
  title = f"{result.model}: {what} | {how} | {result.name}"
  return viz.panel([image_tile, crop_tile, viz.upscale(crop_heat, factor)], title)


def write_occlusion(result: pipeline.OcclusionResult, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Writes `heatmap.npy`, `count.npy`, `heatmap_image.npy`, `crop.png`, `overlay.png` and `result.json`.

  Every file is written atomically. Returns the JSON summary.
  """
  out = pathlib.Path(out_dir)
  summary = {
    "format": _OUTPUT_FORMAT,
    "version": _OUTPUT_VERSION,
    "name": result.name,
    "model": result.model,
    "label": result.label,
    "score_kind": result.score_kind,
    "target": result.target,
    "score": result.score,
    "probabilities": [float(p) for p in result.probabilities],
    "face_box_xyxy": [float(v) for v in result.face.box_xyxy],
    "crop_from_image": np.asarray(result.crop_from_image).tolist(),
    "patch_size_px": result.patch_size,
    "stride_px": result.stride,
    "num_patches": result.num_patches,
    "method": result.method,
    "uncovered_crop_pixels": int(np.sum(result.count == 0)),
  }
  fileio.save_npy(out / "heatmap.npy", result.heatmap)
  fileio.save_npy(out / "count.npy", result.count)
  fileio.save_npy(out / "heatmap_image.npy", result.heatmap_image)
  fileio.save_png(out / "crop.png", result.crop)
  fileio.save_png(out / "overlay.png", occlusion_overlay(result))
  fileio.save_json(out / "result.json", summary)
  return summary


def _visible_edges(vertices_xyd: np.ndarray, triangles: np.ndarray, height: int, width: int) -> np.ndarray:
  """`[K, 2, 2]` xy segments of the edges of the triangles visible in the image (z-buffered)."""
  box = raster.required_box(vertices_xyd[:, :2], triangles, height, width)
  frags = raster.rasterize(vertices_xyd, triangles, height, width, max_box=box)
  visible = np.unique(np.asarray(frags.tri_id))
  tris = triangles[visible[visible >= 0]]
  edges = np.concatenate([tris[:, [0, 1]], tris[:, [1, 2]], tris[:, [2, 0]]])
  edges = np.unique(np.sort(edges, axis=1), axis=0)
  return vertices_xyd[edges][:, :, :2]


def _fit_overlay(fit: pipeline.FaceFit) -> np.ndarray:
  from PIL import Image, ImageDraw

  height, width = fit.image.shape[:2]
  triangles = np.asarray(fit.model.triangles)
  canvas = Image.fromarray(fit.image)
  draw = ImageDraw.Draw(canvas, "RGBA")
  for (x0, y0), (x1, y1) in _visible_edges(np.asarray(fit.fit.vertices_xyd), triangles, height, width):
    draw.line([(x0, y0), (x1, y1)], fill=(255, 255, 255, 90), width=1)
  for colour, points in (((0, 220, 0, 255), fit.face.landmarks_xy), ((255, 40, 40, 255), fit.fit.landmarks_xy)):
    for x, y in points[np.all(np.isfinite(points), axis=1)]:
      draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
  yaw, pitch, roll = np.degrees(fit.fit.yaw_pitch_roll)
  title = (
    f"{fit.model.name} fit: yaw {yaw:.1f}, pitch {pitch:.1f}, roll {roll:.1f} deg | green: dlib landmarks, "
    f"red: model landmarks | {fit.name}"
  )
  return viz.panel([np.asarray(canvas)], title, height=max(320, min(height, 720)))


def write_fit(fit: pipeline.FaceFit, out_dir: str | pathlib.Path) -> dict[str, Any]:
  """Writes `mesh.obj` (fitted shape in model space, with UVs), `mesh_image.ply` (image coordinates: x, y
  pixels, y down, z = depth), `overlay.png` and `fit.json`, each atomically. Returns the JSON summary."""
  import trimesh

  out = pathlib.Path(out_dir)
  model = fit.model
  triangles = np.asarray(model.triangles)
  shape = np.asarray(model.vertices(fit.fit.alpha, fit.fit.beta))
  visual = trimesh.visual.TextureVisuals(uv=np.asarray(model.uv))
  obj = trimesh.Trimesh(shape, triangles, visual=visual, process=False).export(file_type="obj")
  fileio.write_atomic(out / "mesh.obj", obj.encode() if isinstance(obj, str) else obj)
  ply = trimesh.Trimesh(np.asarray(fit.fit.vertices_xyd), triangles, process=False).export(file_type="ply")
  fileio.write_atomic(out / "mesh_image.ply", ply)
  fileio.save_png(out / "overlay.png", _fit_overlay(fit))
  fitted = np.asarray(fit.fit.landmarks_xy)
  ok = np.all(np.isfinite(fitted), axis=1)
  err = np.linalg.norm(fitted[ok] - fit.face.landmarks_xy[ok], axis=1)
  summary = {
    "format": "canonsal_jax.fit_result",
    "version": 1,
    "name": fit.name,
    "morphable_model": model.name,
    "yaw_pitch_roll_deg": np.degrees(fit.fit.yaw_pitch_roll).tolist(),
    "scale_px_per_unit": float(fit.fit.scale),
    "translation_xy": np.asarray(fit.fit.translation).tolist(),
    "alpha": np.asarray(fit.fit.alpha).tolist(),
    "beta": np.asarray(fit.fit.beta).tolist(),
    "landmark_rms_px": float(np.sqrt(np.mean(err**2))),
    "face_box_xyxy": [float(v) for v in fit.face.box_xyxy],
  }
  fileio.save_json(out / "fit.json", summary)
  return summary


def render_texture(
  model3d: morphable.MorphableModel,
  texture: np.ndarray,
  weight: np.ndarray,
  size: int,
  vmax: float | None = None,
) -> np.ndarray:
  """`uint8 [size, size, 3]`: a `[T, T]` texture on the canonical face (`canonical.render_canonical`), a diverging
  scale when any value with data is negative; `vmax` (default: the largest |value| with data) fixes the scale."""
  data = weight > 0
  signed = bool(np.any(texture[data] < 0)) if data.any() else False
  if vmax is None:
    vmax = float(np.abs(texture[data]).max()) if data.any() else 1.0
  return canonical.render_canonical(model3d, texture, weight, size, vmax=vmax or 1.0, signed=signed)


def write_cis(result: pipeline.CISResult, out_dir: str | pathlib.Path, *, render_size: int = 256) -> dict[str, Any]:
  """Writes the occlusion outputs plus `cis_texture.npz` (texture and weight, versioned), `cis.png` (the
  occlusion overlay beside the CIS on the canonical face), `cis_mesh.ply` / `.glb` (the fitted mesh coloured
  by saliency) and `cis.json`."""
  out = pathlib.Path(out_dir)
  summary = write_occlusion(result.occlusion, out)
  model3d = result.fit.model
  fileio.save_npz_versioned(
    out / "cis_texture.npz", "canonsal_jax.cis_texture", 1, texture=result.texture, weight=result.weight
  )
  _write_saliency_mesh(result, out)
  render = render_texture(model3d, result.texture, result.weight, render_size)
  fileio.save_png(out / "cis.png", viz.panel([occlusion_overlay(result.occlusion), render], _cis_title(result)))
  summary.update(
    format="canonsal_jax.cis_result",
    version=1,
    morphable_model=model3d.name,
    texture_size=int(result.texture.shape[0]),
    texels_with_data=int(np.sum(result.weight > 0)),
    outside_mesh_share=result.outside_mesh_share,
    region_mass=result.region_mass,
    yaw_pitch_roll_deg=np.degrees(result.fit.fit.yaw_pitch_roll).tolist(),
    num_oversized_triangles=result.num_oversized,
  )
  fileio.save_json(out / "cis.json", summary)
  return summary


def _write_saliency_mesh(result: pipeline.CISResult, out: pathlib.Path) -> None:
  """The fitted mesh (model space) coloured by the CIS at each vertex's UV, as `cis_mesh.ply` and `.glb`.

  Vertices whose texel has no data are grey, as in the renders.
  """
  import trimesh

  model3d = result.fit.model
  size = result.texture.shape[0]
  uv = np.asarray(model3d.uv)
  col = np.clip(np.floor(uv[:, 0] * size), 0, size - 1).astype(int)
  row = np.clip(np.floor((1.0 - uv[:, 1]) * size), 0, size - 1).astype(int)
  values, seen = result.texture[row, col], result.weight[row, col] > 0
  colours = viz.colorize(values[None], valid=seen[None])[0]
  shape = np.asarray(model3d.vertices(result.fit.fit.alpha, result.fit.fit.beta))
  mesh = trimesh.Trimesh(shape, np.asarray(model3d.triangles), vertex_colors=colours, process=False)
  fileio.write_atomic(out / "cis_mesh.ply", mesh.export(file_type="ply"))
  fileio.write_atomic(out / "cis_mesh.glb", mesh.export(file_type="glb"))


def _cis_title(result: pipeline.CISResult) -> str:
  occ = result.occlusion
  what = f"{occ.label} ({occ.score_kind} {occ.score:.2f})" if occ.label else f"{occ.score_kind} {occ.score:.3f}"
  return (
    f"CIS | {occ.model}: {what} | {result.outside_mesh_share:.0%} of the saliency off the mesh | "
    f"{result.fit.model.name} | {occ.name}"
  )


def checkpoint_path(out: pathlib.Path, process_index: int, num_processes: int) -> pathlib.Path:
  """A CMS run's checkpoint: `cms.npz`, or `cms.process<i>.npz` for process i of a multi-process run."""
  return out / ("cms.npz" if num_processes == 1 else f"cms.process{process_index}.npz")


def texture_path(out_dir: str | pathlib.Path, index: int) -> pathlib.Path:
  """Where a CMS run with `config.cms.save_textures` keeps image `index`'s CIS texture and weight."""
  return pathlib.Path(out_dir) / "textures" / f"{int(index):06d}.npz"


def load_textures(out_dir: str | pathlib.Path, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The saved per-image CIS of a CMS run (`config.cms.save_textures`), for texel-level statistics.

  Args:
    out_dir: the run's folder.
    indices: image indices (e.g. the `index` of its accumulated records).

  Returns:
    `(textures, weights)`: float32 `[N, T, T]` each, in the order of `indices` (the values as accumulated,
    before the per-image normalisation).

  Raises:
    FileNotFoundError: an image's texture was not saved (the message names the file and the setting).
  """
  textures, weights = [], []
  for index in indices:
    path = texture_path(out_dir, index)
    if not path.is_file():
      raise FileNotFoundError(f"{path}: no saved texture for image {index}; run with --config.cms.save_textures")
    with np.load(path) as data:
      textures.append(data["texture"].astype(np.float32))
      weights.append(data["weight"].astype(np.float32))
  t = textures[0].shape if textures else (0, 0)
  return np.stack(textures) if textures else np.zeros((0, *t), np.float32), (
    np.stack(weights) if weights else np.zeros((0, *t), np.float32)
  )


def run_summary(
  acc: cms.CMSAccumulator,
  *,
  listed: int,
  resumed_with: int | None,
  processed: int,
  elapsed: float,
  timings: dict[str, float],
  num_batches: int,
  face_batch: int,
  detection_cache: dict[str, int] | None = None,
) -> dict[str, Any]:
  """A CMS run's `summary.json`: counts, every skipped input with its reason, per-stage times, and the detection
  cache's hits and misses this run (`{"hits": h, "misses": m}`; None when the cache is off)."""
  records = acc.records()
  skipped = [{"index": r["index"], "name": r["name"], "reason": r["reason"]} for r in records if r["status"] != "ok"]
  device_stages = ("sweep", "fit", "texture")
  return {
    "format": "canonsal_jax.cms_summary",
    "version": 1,
    "images_listed": listed,
    "images_seen": len(records),
    "images_accumulated": len(records) - len(skipped),
    "images_skipped": len(skipped),
    "skipped": skipped,
    "resumed_with": resumed_with,
    "processed_this_run": processed,
    "seconds_this_run": elapsed,
    "images_per_second_this_run": processed / elapsed if elapsed > 0 else None,
    "stage_seconds_this_run": timings,
    "face_batch": face_batch,
    "batches_this_run": num_batches,
    # Mean wall seconds of each device stage per batch (the first batch includes compilation).
    "stage_seconds_per_batch": {k: timings[k] / num_batches for k in device_stages if k in timings and num_batches},
    "groups": {group: acc.num_images(group) for group in acc.groups()},
    "detection_cache_this_run": detection_cache,
  }


def with_reproducibility(
  summary: dict[str, Any],
  config: Any,
  model: Any,
  model3d: morphable.MorphableModel,
  texture_size: int,
) -> dict[str, Any]:
  """`summary` with what reproduces the run: the config, the face and morphable models, asset hashes, versions."""
  return {
    **summary,
    "texture_size": texture_size,
    "reproducibility": {
      "config": config.to_dict(),
      "face_model": model.source,
      "morphable_model": model3d.name,
      "asset_sha256": {a.name: a.sha256 for a in assets.ASSETS.values()},
      "versions": _versions(),
      "note": "no randomness: detection, sweep, fit and accumulation are deterministic",
    },
  }


_PER_PROCESS_KEYS = ("processed_this_run", "seconds_this_run", "images_per_second_this_run", "stage_seconds_this_run")


def merge_processes(
  out: pathlib.Path, settings: cms.CMSSettings, num_processes: int, *, listed: int, elapsed: float, face_batch: int
) -> tuple[cms.CMSAccumulator, dict[str, Any]]:
  """Process 0's merge of every process's checkpoint and summary, after the barrier.

  `elapsed` is the job's wall time up to the merge; images/s are the job's (all processes' images over it).
  """
  merged = cms.merge(
    *(cms.CMSAccumulator.load(checkpoint_path(out, i, num_processes), settings=settings) for i in range(num_processes))
  )
  summaries = [json.loads((out / f"summary.process{i}.json").read_text()) for i in range(num_processes)]
  timings: dict[str, float] = {}
  for s in summaries:
    for k, v in s["stage_seconds_this_run"].items():
      timings[k] = timings.get(k, 0.0) + v
  summary = run_summary(
    merged,
    listed=listed,
    resumed_with=sum(s["resumed_with"] for s in summaries),
    processed=sum(s["processed_this_run"] for s in summaries),
    elapsed=elapsed,
    timings=timings,  # summed over processes: seconds of work, not of the job's wall time
    num_batches=sum(s["batches_this_run"] for s in summaries),
    face_batch=face_batch,
    detection_cache=_summed([s["detection_cache_this_run"] for s in summaries]),
  )
  summary.update(num_processes=num_processes, per_process=[{k: s[k] for k in _PER_PROCESS_KEYS} for s in summaries])
  return merged, summary


def _summed(counts: list[dict[str, int] | None]) -> dict[str, int] | None:
  """Per-process counters added key by key (None where every process had none)."""
  present = [c for c in counts if c is not None]
  return {k: sum(c[k] for c in present) for k in present[0]} if present else None


def _versions() -> dict[str, str]:
  import importlib.metadata

  found = {"python": platform.python_version()}
  for package in ("canonsal_jax", "jax", "jaxlib", "flax", "numpy", "dlib-bin", "scikit-image"):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def write_cms(
  acc: cms.CMSAccumulator,
  out_dir: str | pathlib.Path,
  model3d: morphable.MorphableModel,
  *,
  render_size: int = 256,
  min_count: int = 1,
) -> None:
  """Writes the CMS views and `records.json`.

  Per group: `cms_<group>.npy/.png` (the mean over the images that saw each texel; texels seen by fewer than
  `min_count` images are no data), `cms_<group>_valid.npy`, `cms_<group>_abs.npy/.png` (mean |saliency|: where
  occlusion moves the score either way) and `cms_<group>_sum.npy` (the paper's plain sum). Difference maps
  `cms_diff_<a>_vs_<b>.npy/.png` (diverging scale) for the pairs of `cms.comparisons`. Group renders of a kind
  share one colour scale, so they can be compared side by side.
  """
  out = pathlib.Path(out_dir)

  def safe(group: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)

  def write_views(views: dict[str, tuple[np.ndarray, np.ndarray]], suffix: str, with_valid: bool) -> None:
    shown = [np.abs(m[v]) for m, v in views.values() if v.any()]
    vmax = float(max(a.max() for a in shown)) if shown else 1.0
    for name, (values, valid) in views.items():
      fileio.save_npy(out / f"cms_{name}{suffix}.npy", values.astype(np.float32))
      if with_valid:
        fileio.save_npy(out / f"cms_{name}_valid.npy", valid)
      texture = np.where(valid, values, 0.0)
      fileio.save_png(
        out / f"cms_{name}{suffix}.png", render_texture(model3d, texture, valid.astype(np.float32), render_size, vmax)
      )

  groups = acc.groups()
  write_views({safe(g): acc.mean(g, min_count=min_count) for g in groups}, "", True)
  write_views({safe(g): acc.mean(g, min_count=min_count, kind="absolute") for g in groups}, "_abs", False)
  for g in groups:
    fileio.save_npy(out / f"cms_{safe(g)}_sum.npy", acc.plain_sum(g)[0].astype(np.float32))
  diffs = {
    f"diff_{safe(a)}_vs_{safe(b)}": acc.difference(a, b, min_count=min_count) for a, b in cms.comparisons(groups)
  }
  if diffs:
    write_views(diffs, "", False)
  fileio.save_json(
    out / "records.json",
    {"format": "canonsal_jax.cms_records", "version": 1, "groups": acc.groups(), "records": acc.records()},
  )
