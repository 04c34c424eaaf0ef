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
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from canonsal_jax import assets, canonical, cms, fileio, manifest, morphable, pipeline, raster, viz

__all__ = [
  "RENDER_SIZE",
  "canonical_panel",
  "checkpoint_path",
  "cis_figure",
  "cms_figure",
  "describe",
  "face_record",
  "fit_figure",
  "load_textures",
  "merge_processes",
  "occlusion_figure",
  "occlusion_summary",
  "photo_panels",
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
_FIGURES = viz.FigureSettings()  # png at 150 dpi (`config.figures`)
RENDER_SIZE = 512  # side of canonical-face renders in figures, pixels (`config.cis.render_size`)


def _what(result: pipeline.OcclusionResult) -> str:
  """The prediction and score, for titles."""
  if result.score_kind == "expected_value":
    return f"expected value {result.score:.1f}"
  if result.is_embedding:  # to itself, a reference, or genuine - impostor
    distance = f", distance {result.distances[0]:.3f}" if result.distances else ""
    return f"{result.score_kind} similarity {result.score:.3f}{distance}"
  return f"{result.label} (p={result.probabilities[result.target]:.2f}), {result.score_kind} {result.score:.2f}"


def _how(result: pipeline.OcclusionResult) -> str:
  if result.method != "occlusion":
    return result.method
  how = f"patch {result.patch_size} px, stride {result.stride}"
  if result.sweep["mode"] == "drill_down":
    how += f", drill-down ({result.sweep['exact_share']:.0%} exact)"
  return how


def _scale_of(results: Sequence[pipeline.OcclusionResult], textures: Sequence[tuple[np.ndarray, np.ndarray]] = ()):
  """One scale over the crop heatmaps (covered pixels) and textures (texels with data) a figure shows."""
  maps = [r.heatmap for r in results] + [t for t, _ in textures]
  valid = [r.count > 0 for r in results] + [w > 0 for _, w in textures]
  return viz.make_scale(maps, valid=valid, unit=viz.unit_label([r.score_kind for r in results]))


def photo_panels(axes: Sequence[Any], result: pipeline.OcclusionResult, scale: viz.Scale, prefix: str = "") -> list:
  """Draws the photo (greyscale, the map's contours, the crop's outline), and, when given a second and third axes,
  the model crop with the contours and the heatmap on the crop. Returns the key's entries these panels need."""
  inside = np.isfinite(result.heatmap_image)
  viz.show_photo(axes[0], result.image, f"{prefix}photo")
  viz.draw_contours(axes[0], result.heatmap_image, inside, scale)
  viz.draw_crop_outline(axes[0], inside)
  handles = [viz.crop_outline_handle()] if 0 < inside.sum() < inside.size else []
  handles += _face_boxes(axes[0], result.face, result.detection)
  covered = result.count > 0
  size = result.crop.shape[0]
  if len(axes) == 3:
    viz.show_photo(axes[1], result.crop, f"{prefix}model crop ({size} px)")
    viz.draw_contours(axes[1], result.heatmap, covered, scale)
  viz.show_map(axes[-1], result.heatmap, covered, scale, f"{prefix}heatmap on the crop")
  if not covered.all():
    handles.append(viz.no_data_handle(f"no data: {np.sum(~covered)} crop pixels no patch covered"))
  return handles


def _face_boxes(ax: Any, face: Any, detection: Any) -> list:
  """The face explained (and the other faces found) as boxes on the photo; the key's entries for them."""
  if detection is None:
    return viz.draw_face_boxes(ax, [face.box_xyxy], 0)
  return viz.draw_face_boxes(ax, [f.box_xyxy for f in detection.faces], detection.index)


def face_record(face: Any, detection: Any) -> dict[str, Any]:
  """The faces a result's JSON records: the chosen face's box, and with a `faces.Detection` every face found
  (`faces`: index, box, score, numbered left to right as `config.face` counts them), `face_index` and
  `face_choice`."""
  record = {"face_box_xyxy": [float(v) for v in face.box_xyxy]}
  if detection is not None:
    record.update(num_faces=len(detection.faces), **detection.summary())
  return record


def occlusion_summary(result: pipeline.OcclusionResult) -> dict[str, Any]:
  """`result.json`'s content. A classifier's result has its label, explained class and probabilities; an
  embedding model's (cosine score) has none of these (a descriptor has no classes), but its similarity (`score`)
  and descriptor distance (`distance`: Euclidean, to the reference or, for self-similarity, to itself: 0;
  `impostor_distance` with an impostor)."""
  summary: dict[str, Any] = {
    "format": _OUTPUT_FORMAT,
    "version": _OUTPUT_VERSION,
    "name": result.name,
    "model": result.model,
  }
  if result.is_embedding:
    summary.update(score_kind=result.score_kind, score=result.score)
    if result.distances:
      summary["distance"] = result.distances[0]
    if len(result.distances) > 1:
      summary["impostor_distance"] = result.distances[1]
  else:
    summary.update(
      label=result.label,
      score_kind=result.score_kind,
      target=result.target,
      score=result.score,
      probabilities=[float(p) for p in result.probabilities],
    )
  summary.update(
    **face_record(result.face, result.detection),
    crop_from_image=np.asarray(result.crop_from_image).tolist(),
    patch_size_px=result.patch_size,
    stride_px=result.stride,
    num_patches=result.num_patches,
    method=result.method,
    sweep=result.sweep,
    uncovered_crop_pixels=int(np.sum(result.count == 0)),
  )
  return summary


def describe(summary: dict[str, Any]) -> str:
  """A result's prediction and face for the console, from its JSON summary: `male (log_odds 2.345)` for a
  classifier, `cosine similarity 0.912, distance 0.402` for an embedding model, then which face of how many.

  Example:
    >>> describe({"score_kind": "cosine", "score": 1.0, "distance": 0.0, "num_faces": 1, "face_index": 0,
    ...           "face_choice": "largest"})
    'cosine similarity 1.000, distance 0.000; face 0 of 1 (largest)'
  """
  if "label" in summary:
    what = f"{summary['label']} ({summary['score_kind']} {summary['score']:.3f})"
  else:
    what = f"{summary['score_kind']} similarity {summary['score']:.3f}"
    if "distance" in summary:
      what += f", distance {summary['distance']:.3f}"
  if "num_faces" in summary:
    what += f"; face {summary['face_index']} of {summary['num_faces']} ({summary['face_choice']})"
  return what


def occlusion_figure(result: pipeline.OcclusionResult, *, settings: viz.FigureSettings = _FIGURES) -> Figure:
  """`overlay.png`: the photo and the model crop in grey with the heatmap's contours, and the heatmap on the crop,
  on one colour scale (`viz`), titled with the model, its prediction and score, the method and the input's name."""
  fig, axes = viz.new_figure(3, settings=settings)
  scale = _scale_of([result])
  handles = photo_panels(list(axes[0]), result, scale)
  viz.add_colorbar(fig, axes, scale)
  viz.add_key(fig, handles)
  viz.set_title(fig, f"{result.model}: {_what(result)} | {_how(result)} | {viz.short_name(result.name)}")
  return fig


def write_occlusion(
  result: pipeline.OcclusionResult,
  out_dir: str | pathlib.Path,
  *,
  settings: viz.FigureSettings = _FIGURES,
  heatmap_image: bool = False,
) -> dict[str, Any]:
  """Writes `heatmap.npy`, `count.npy`, `crop.png`, `overlay.png` (`occlusion_figure`, in `settings.format`:
  `overlay.svg` / `.pdf` on request), `result.json` (`occlusion_summary`), for a drill-down sweep `exact.npy`
  (bool `[S, S]`: the pixels whose value is the exact sweep's) and, with `heatmap_image`
  (`config.outputs.heatmap_image`), `heatmap_image.npy`: the heatmap at the photo's size.

  Every file is written atomically. Returns the JSON summary.
  """
  out = pathlib.Path(out_dir)
  summary = occlusion_summary(result)
  fileio.save_npy(out / "heatmap.npy", result.heatmap)
  fileio.save_npy(out / "count.npy", result.count)
  if result.sweep["mode"] == "drill_down":
    fileio.save_npy(out / "exact.npy", np.asarray(result.exact, bool))
  if heatmap_image:
    fileio.save_npy(out / "heatmap_image.npy", result.heatmap_image)
  fileio.save_png(out / "crop.png", result.crop)
  viz.save_figure(occlusion_figure(result, settings=settings), out, "overlay", settings)
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


def fit_figure(fit: pipeline.FaceFit, *, settings: viz.FigureSettings = _FIGURES) -> Figure:
  """The fit's `overlay.png`: the photo with the fitted mesh's visible edges, dlib's landmarks and the model's."""
  from matplotlib.collections import LineCollection

  height, width = fit.image.shape[:2]
  fig, axes = viz.new_figure(1, settings=settings, panel_inches=5.0)
  ax = axes[0, 0]
  viz.show_photo(ax, fit.image, "photo with the fitted mesh", grey=False)
  edges = _visible_edges(np.asarray(fit.fit.vertices_xyd), np.asarray(fit.model.triangles), height, width)
  ax.add_collection(LineCollection(edges, colors="white", alpha=0.35, linewidths=0.5, label="mesh (visible edges)"))
  for colour, points, label in (
    ("lime", fit.face.landmarks_xy, "dlib landmarks"),
    ("red", fit.fit.landmarks_xy, "model landmarks"),
  ):
    ok = points[np.all(np.isfinite(points), axis=1)]
    ax.scatter(ok[:, 0], ok[:, 1], s=8, c=colour, edgecolors="black", linewidths=0.4, label=label)
  handles = ax.get_legend_handles_labels()[0]  # the mesh and the landmarks, before the boxes
  handles += _face_boxes(ax, fit.face, fit.detection)
  ax.set(xlim=(-0.5, width - 0.5), ylim=(height - 0.5, -0.5))
  viz.add_key(fig, handles)
  yaw, pitch, roll = np.degrees(fit.fit.yaw_pitch_roll)
  viz.set_title(
    fig,
    f"{fit.model.name} fit: yaw {yaw:.1f}, pitch {pitch:.1f}, roll {roll:.1f} deg | {viz.short_name(fit.name)}",
  )
  return fig


def write_fit(
  fit: pipeline.FaceFit, out_dir: str | pathlib.Path, *, settings: viz.FigureSettings = _FIGURES
) -> dict[str, Any]:
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
  viz.save_figure(fit_figure(fit, settings=settings), out, "overlay", settings)
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
    **face_record(fit.face, fit.detection),
  }
  fileio.save_json(out / "fit.json", summary)
  return summary


def render_texture(
  model3d: morphable.MorphableModel,
  texture: np.ndarray,
  weight: np.ndarray,
  size: int,
  vmax: float | None = None,
  signed: bool | None = None,
) -> np.ndarray:
  """`uint8 [size, size, 3]`: a `[T, T]` texture on the canonical face (`canonical.render_canonical`), a diverging
  scale when any value with data is negative (or `signed`); `vmax` (default: the largest |value| with data)
  fixes the scale."""
  data = weight > 0
  if signed is None:
    signed = bool(np.any(texture[data] < 0)) if data.any() else False
  if vmax is None:
    vmax = float(np.abs(texture[data]).max()) if data.any() else 1.0
  return canonical.render_canonical(model3d, texture, weight, size, vmax=vmax or 1.0, signed=signed)


def canonical_panel(
  ax: Any,
  model3d: morphable.MorphableModel,
  texture: np.ndarray,
  weight: np.ndarray,
  size: int,
  scale: viz.Scale,
  title: str,
  no_data: str,
) -> list:
  """Draws a texture on the canonical face on the figure's scale in `ax`; returns the key's entry for its no-data
  (hatched grey: texels without data, and the capped eye sockets), or none when every face pixel has data."""
  rgb = render_texture(model3d, texture, weight, size, vmax=scale.vmax, signed=scale.signed)
  viz.show_photo(ax, rgb, title, grey=False)
  sample = canonical.sample_canonical(model3d, texture, weight, size)
  return [viz.no_data_handle(no_data, hatched=True)] if np.any(sample.face & (sample.weight <= 0)) else []


def cis_figure(
  result: pipeline.CISResult, *, render_size: int = RENDER_SIZE, settings: viz.FigureSettings = _FIGURES
) -> Figure:
  """`cis.png`: photo and model crop (grey, with the heatmap's contours), the heatmap on the crop, and the CIS on
  the canonical face, all on one colour scale with its unit and a key for what has no data."""
  occ = result.occlusion
  fig, axes = viz.new_figure(4, settings=settings)
  scale = _scale_of([occ], [(result.texture, result.weight)])
  handles = photo_panels(list(axes[0, :3]), occ, scale)
  handles += canonical_panel(
    axes[0, 3],
    result.fit.model,
    result.texture,
    result.weight,
    render_size,
    scale,
    "canonical face (CIS)",
    "no data: texels not seen in the photo",
  )
  axes[0, 3].set_xlabel(f"{result.outside_mesh_share:.0%} of the saliency off the mesh", fontsize=9)
  viz.add_colorbar(fig, axes, scale)
  viz.add_key(fig, handles)
  viz.set_title(
    fig, f"CIS | {occ.model}: {_what(occ)} | {_how(occ)} | {result.fit.model.name} | {viz.short_name(occ.name)}"
  )
  return fig


def write_cis(
  result: pipeline.CISResult,
  out_dir: str | pathlib.Path,
  *,
  render_size: int = RENDER_SIZE,
  settings: viz.FigureSettings = _FIGURES,
  heatmap_image: bool = False,
) -> dict[str, Any]:
  """Writes the occlusion outputs plus `cis_texture.npz` (texture and weight, versioned), `cis.png` (`cis_figure`,
  in `settings.format`), `cis_mesh.ply` / `.glb` (the fitted mesh coloured by saliency) and `cis.json`."""
  out = pathlib.Path(out_dir)
  summary = write_occlusion(result.occlusion, out, settings=settings, heatmap_image=heatmap_image)
  model3d = result.fit.model
  fileio.save_npz_versioned(
    out / "cis_texture.npz", "canonsal_jax.cis_texture", 1, texture=result.texture, weight=result.weight
  )
  _write_saliency_mesh(result, out)
  viz.save_figure(cis_figure(result, render_size=render_size, settings=settings), out, "cis", settings)
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
  host: dict[str, Any] | None = None,
) -> dict[str, Any]:
  """A CMS run's `summary.json`: counts, every skipped input with its reason, per-stage times, the detection
  cache's hits and misses this run (`{"hits": h, "misses": m}`; None when the cache is off), and the host side
  (`host`: images whose annotated landmarks replaced detection, the decoding and detecting workers)."""
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
    "host_this_run": host,
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
      "versions": manifest.versions(),
      "note": "no randomness: detection, sweep, fit and accumulation are deterministic",
    },
  }


_PER_PROCESS_KEYS = (
  "processed_this_run",
  "seconds_this_run",
  "images_per_second_this_run",
  "stage_seconds_this_run",
  "host_this_run",
)


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
    host={"annotated": sum((s.get("host_this_run") or {}).get("annotated", 0) for s in summaries)},
  )
  summary.update(num_processes=num_processes, per_process=[{k: s[k] for k in _PER_PROCESS_KEYS} for s in summaries])
  return merged, summary


def _summed(counts: list[dict[str, int] | None]) -> dict[str, int] | None:
  """Per-process counters added key by key (None where every process had none)."""
  present = [c for c in counts if c is not None]
  return {k: sum(c[k] for c in present) for k in present[0]} if present else None


def cms_figure(
  model3d: morphable.MorphableModel,
  values: np.ndarray,
  valid: np.ndarray,
  scale: viz.Scale,
  title: str,
  *,
  no_data: str,
  render_size: int = RENDER_SIZE,
  settings: viz.FigureSettings = _FIGURES,
) -> Figure:
  """`cms_<view>.png`: a CMS view (`[T, T]` values, `valid` bool) on the canonical face, on `scale` (shared by the
  views of a kind so they can be compared), with the colour bar and the no-data key (`no_data` its text)."""
  fig, axes = viz.new_figure(1, settings=settings, panel_inches=4.5)
  texture = np.where(valid, values, 0.0).astype(np.float32)
  handles = canonical_panel(
    axes[0, 0], model3d, texture, valid.astype(np.float32), render_size, scale, "canonical face", no_data
  )
  viz.add_colorbar(fig, axes, scale)
  viz.add_key(fig, handles)
  viz.set_title(fig, title)
  return fig


def write_cms(
  acc: cms.CMSAccumulator,
  out_dir: str | pathlib.Path,
  model3d: morphable.MorphableModel,
  *,
  render_size: int = RENDER_SIZE,
  min_count: int = 1,
  settings: viz.FigureSettings = _FIGURES,
) -> None:
  """Writes the CMS views and `records.json`.

  Per group: `cms_<group>.npy/.png` (the mean over the images that saw each texel; texels seen by fewer than
  `min_count` images are no data), `cms_<group>_valid.npy`, `cms_<group>_abs.npy/.png` (mean |saliency|: where
  occlusion moves the score either way) and `cms_<group>_sum.npy` (the paper's plain sum). Difference maps
  `cms_diff_<a>_vs_<b>.npy/.png` (diverging scale) for the pairs of `cms.comparisons`. The figures
  (`cms_figure`, in `settings.format`) of a kind share one colour scale, so they can be compared side by side;
  their colour bar names the score kind of the accumulated records and the per-image normalisation.
  """
  out = pathlib.Path(out_dir)
  records = acc.records()
  kinds = [r["score_kind"] for r in records if r["status"] == "ok" and r.get("score_kind")]
  normalisation = acc.settings.normalisation
  seen_by = "image" if min_count == 1 else f"{min_count} images"
  no_data = f"no data: texels {'no image saw' if min_count == 1 else f'seen by fewer than {seen_by}'}"

  def safe(group: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in group)

  def write_views(
    views: dict[str, tuple[str, np.ndarray, np.ndarray]], suffix: str, unit: str, with_valid: bool, signed=None
  ) -> None:
    maps, masks = [m for _, m, _ in views.values()], [v for _, _, v in views.values()]
    scale = viz.make_scale(maps, valid=masks, unit=unit, signed=signed)
    for name, (title, values, valid) in views.items():
      fileio.save_npy(out / f"cms_{name}{suffix}.npy", values.astype(np.float32))
      if with_valid:
        fileio.save_npy(out / f"cms_{name}_valid.npy", valid)
      fig = cms_figure(
        model3d, values, valid, scale, title, no_data=no_data, render_size=render_size, settings=settings
      )
      viz.save_figure(fig, out, f"cms_{name}{suffix}", settings)

  groups = acc.groups()
  count = {g: acc.num_images(g) for g in groups}
  unit = viz.unit_label(kinds, normalisation)
  write_views(
    {safe(g): (f"CMS, mean over {count[g]} images | group {g}", *acc.mean(g, min_count=min_count)) for g in groups},
    "",
    unit,
    True,
  )
  write_views(
    {
      safe(g): (
        f"CMS of |saliency|, mean over {count[g]} images | group {g}",
        *acc.mean(g, min_count=min_count, kind="absolute"),
      )
      for g in groups
    },
    "_abs",
    viz.unit_label(kinds, normalisation, absolute=True),
    False,
  )
  for g in groups:
    fileio.save_npy(out / f"cms_{safe(g)}_sum.npy", acc.plain_sum(g)[0].astype(np.float32))
  diffs = {
    f"diff_{safe(a)}_vs_{safe(b)}": (
      f"CMS difference: {a} ({count[a]} images) minus {b} ({count[b]})",
      *acc.difference(a, b, min_count=min_count),
    )
    for a, b in cms.comparisons(groups)
  }
  if diffs:
    write_views(diffs, "", f"A minus B: {unit}", False, signed=True)
  fileio.save_json(
    out / "records.json",
    {"format": "canonsal_jax.cms_records", "version": 1, "groups": acc.groups(), "records": acc.records()},
  )
