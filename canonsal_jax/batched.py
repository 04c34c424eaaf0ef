"""Batched device programs of a dataset run: faces in batches through the sweep, the 3DMM fit and the texture
sampler, one compiled program per stage for the padded batch size, faces split over the local devices.

`FaceBatcher` is what `runs.run_cms` calls per batch; the per-face drivers of `pipeline` compute the same
things one face at a time (and are what a rival explainer uses).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import PartitionSpec as P

from canonsal_jax import canonical, drill_down, faces, models, morphable, occlusion, pipeline, raster

__all__ = ["FaceBatcher", "FaceOutcome"]


@dataclasses.dataclass(frozen=True)
class FaceOutcome:
  """What a CMS run keeps of one face's CIS."""

  label: str
  score: float
  score_kind: str
  texture: np.ndarray  # [T, T] float32
  weight: np.ndarray  # [T, T] float32
  outside_mesh_share: float
  region_mass: dict[str, float]
  sweep: dict[str, Any] = dataclasses.field(default_factory=lambda: {"mode": "exact"})  # `pipeline.sweep_record`

  @classmethod
  def from_cis(cls, result: pipeline.CISResult) -> FaceOutcome:
    occ = result.occlusion
    return cls(
      occ.label,
      occ.score,
      occ.score_kind,
      result.texture,
      result.weight,
      result.outside_mesh_share,
      result.region_mass,
      occ.sweep,
    )


_FACES = "faces"  # the mesh axis that batches of faces are split over


def _over_faces(fn: Callable, devices: tuple[jax.Device, ...], batched: tuple[bool, ...]) -> Callable:
  """`jax.jit(fn)` with the leading (face) axis of the `batched` arguments and of every output split over
  `devices` by `shard_map` (each device runs `fn` on its share of the faces; no collectives)."""
  if len(devices) == 1:
    return jax.jit(fn)
  mesh = jax.sharding.Mesh(np.asarray(devices), (_FACES,))
  specs = tuple(P(_FACES) if b else P() for b in batched)
  # No collectives inside, so nothing for the varying-axis check to guard; and it rejects the rasteriser's scans,
  # whose carries start replicated (a constant z-buffer) and come out varying over faces.
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=P(_FACES), check_vma=False))


@functools.lru_cache(maxsize=16)
def _batched_sweep(
  apply_fn: Callable,
  patch_size: int,
  batch_size: int,
  baseline,
  score,
  reduce: str,
  devices: tuple,
  has_target: bool,
  drill: tuple[drill_down.Settings, int, int] | None = None,
) -> Callable:
  """`sweep(params, images[B, S, S, C], centres, valid, *target) -> SweepResult` with a leading face axis: the
  per-image sweep of `occlusion.make_sweep` (on one device: faces, not patches, are split) vmapped over faces.

  With `drill` = `(drill_down.Settings, crop side, stride)`, the per-image sweep is
  `drill_down.make_drill_down_sweep`'s (a `DrillDownResult` per face): its lattice is found on the host
  from the grid of that crop side and stride (the `centres` and `valid` given must be that grid's), and each
  face's later stages run the patches its own estimated map picks, the faces one after another (`lax.map`)."""
  settings = drill[0] if drill is not None else None
  single = pipeline.cached_sweep(apply_fn, patch_size, batch_size, baseline, score, reduce, settings, devices[:1])
  if drill is not None:
    _, size, stride = drill
    grid = occlusion.grid_centres(size, size, patch_size=patch_size, stride=stride)

  def sweep(params, images, centres, valid, *target):
    if drill is not None:  # the grid as host constants: the drill-down finds its lattice in numpy
      del centres, valid
      centres, valid = grid, np.ones(len(grid), bool)
    one = lambda image: single(params, image, centres, valid, target[0] if target else None)
    if drill is not None:
      # One face after another: each face's fine stage occludes its own patches, and under vmap those positions
      # become a batch axis that turns the incremental sweep's windows into gathers.
      return jax.lax.map(one, images)
    return jax.vmap(one)(images)

  return _over_faces(sweep, devices, (False, True, False, False) + (False,) * has_target)


def _face_texture(
  vertices_xyd, crop_from_image, heatmap, count, triangles, uv_raster, *, size, cosine_weight, max_box, max_oversized
):
  """One face's CIS texture and weight, its off-mesh share and the crop rasteriser's counters (vmapped)."""
  mesh = canonical.mesh_to_crop(vertices_xyd, crop_from_image)
  frags = raster.rasterize(mesh, triangles, size, size, max_box=max_box, max_oversized=max_oversized)
  valid = count > 0
  texture, weight = canonical.to_texture(
    heatmap, frags, mesh, uv_raster, triangles, valid_heatmap=valid, cosine_weight=cosine_weight
  )
  outside = canonical.outside_mesh_share(heatmap, frags, valid)
  return texture, weight, outside, frags.num_oversized, frags.num_dropped


@functools.lru_cache(maxsize=8)
def _batched_texture(size: int, face_width: float, cosine_weight: bool, devices: tuple) -> Callable:
  max_box, max_oversized = canonical.crop_raster_bounds(face_width)
  one = functools.partial(
    _face_texture, size=size, cosine_weight=cosine_weight, max_box=max_box, max_oversized=max_oversized
  )
  return _over_faces(jax.vmap(one, in_axes=(0, 0, 0, 0, None, None)), devices, (True,) * 4 + (False,) * 2)


def _pad_rows(rows: Sequence[np.ndarray], size: int) -> np.ndarray:
  """Stacks `rows` and pads to `size` with copies of the first (the padded results are thrown away)."""
  return np.stack(list(rows) + [rows[0]] * (size - len(rows)))


class FaceBatcher:
  """Runs batches of detected faces through the sweep, the 3DMM fit and the texture sampler: one compiled
  program per stage for the padded batch size, faces split over the local devices."""

  def __init__(self, config: ml_collections.ConfigDict, timings: dict[str, float]):
    self.timings = timings
    self.model = models.load_configured(config)
    self.model3d = pipeline.load_morphable(config.morphable_model)
    self.plan = pipeline.sweep_plan(config, self.model)
    occ = config.occlusion
    self.devices = tuple(jax.local_devices())
    # `face_batch` faces per device: each device runs the same program whatever their number, so a face's
    # result does not depend on how many devices share the batch.
    self.per_device = int(config.cms.face_batch)
    self.batch = self.per_device * len(self.devices)
    baseline = pipeline.model_baseline(self.model, occ.baseline)
    args = (self.model.apply_fn, self.plan.patch_size, int(occ.batch_size), baseline, self.plan.score, occ.reduce)
    drill = None
    if self.plan.drill_down is not None:
      drill = (self.plan.drill_down, self.model.crop.size, self.plan.stride)
    self.sweep = _batched_sweep(*args, self.devices, self.plan.target is not None, drill)
    self.texture_size = config.cis.texture_size or canonical.default_texture_size(self.model.crop.size, self.model3d)
    self.uv_raster = canonical.model_uv_raster(self.model3d, self.texture_size)
    self.regions = canonical.region_labels(self.model3d, self.texture_size)
    crop = self.model.crop
    self.texture = _batched_texture(crop.size, crop.face_width, bool(config.cis.cosine_weight), self.devices)

  def _fit(self, landmarks: list[np.ndarray], sizes: list[tuple[int, int]]) -> np.ndarray:
    """`[n, V, 3]` fitted vertices, `face_batch` faces per call of `morphable.fit`'s compiled program.

    Faces of one image size share a call (`morphable.fit` takes one image size: it sets the solver's numerical
    frame). The calls run on the default device: `fit` is jitted inside, and one executable per device would
    be compiled once per device for a small share of the work.
    """
    calls = []
    for size in dict.fromkeys(sizes):
      idx = [i for i, s in enumerate(sizes) if s == size]
      for start in range(0, len(idx), self.per_device):
        part = idx[start : start + self.per_device]
        batch = _pad_rows([landmarks[i] for i in part], self.per_device)
        calls.append((part, morphable.fit(self.model3d, batch, image_size=size).vertices_xyd))  # async dispatch
    out: list[Any] = [None] * len(landmarks)
    for part, vertices in calls:
      vertices = np.asarray(vertices)
      for j, i in enumerate(part):
        out[i] = vertices[j]
    return np.stack(out)

  def __call__(self, faces_in: Sequence[tuple[str, np.ndarray, faces.Face]]) -> list[FaceOutcome | str]:
    """Outcomes of up to `self.batch` faces `(name, pixels, face)`, in order; a failed face gives its reason."""
    clock = pipeline.StageClock(self.timings)
    model, plan = self.model, self.plan
    outcomes: list[Any] = [None] * len(faces_in)
    crops: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i, (_, pixels, face) in enumerate(faces_in):
      try:
        crops[i] = faces.crop_face(pixels, face, model.crop)
      except ValueError as e:
        outcomes[i] = f"{type(e).__name__}: {e}"
    if not crops:
      return outcomes
    ok = list(crops)
    images = _pad_rows([np.asarray(model.preprocess(crops[i][0]), np.float32) for i in ok], self.batch)
    target = () if plan.target is None else (plan.target,)
    swept = jax.device_get(self.sweep(model.params, images, plan.centres, plan.valid, *target))
    # face -> (row in the batch, label, unoccluded score, how its heatmap was made)
    predicted: dict[int, tuple[int, str, float, dict[str, Any]]] = {}
    for j, i in enumerate(ok):
      try:
        one = occlusion.check_finite(jax.tree.map(lambda a, j=j: a[j], swept), faces_in[i][0])
      except ValueError as e:
        outcomes[i] = f"{type(e).__name__}: {e}"
      else:
        label = pipeline.predicted_label(model, plan.score, one)[0]
        predicted[i] = (j, label, float(one.score), pipeline.sweep_record(plan, one))
    clock.lap("sweep")

    ok = list(predicted)
    if not ok:
      return outcomes
    vertices = self._fit([faces_in[i][2].landmarks_xy for i in ok], [faces_in[i][1].shape[:2] for i in ok])
    fitted = []
    for k, i in enumerate(ok):
      if np.all(np.isfinite(vertices[k])):
        fitted.append(k)
      else:
        outcomes[i] = f"ValueError: {faces_in[i][0]}: the 3DMM fit diverged (non-finite vertices)"
    clock.lap("fit")
    if not fitted:
      return outcomes

    rows = [predicted[ok[k]][0] for k in fitted]
    texture, weight, outside, oversized, dropped = jax.device_get(
      self.texture(
        _pad_rows([vertices[k] for k in fitted], self.batch),
        _pad_rows([np.asarray(crops[ok[k]][1], np.float32) for k in fitted], self.batch),
        _pad_rows([swept.heatmap[r] for r in rows], self.batch),
        _pad_rows([swept.count[r] for r in rows], self.batch),
        self.model3d.triangles,
        self.uv_raster,
      )
    )
    kind = plan.score.kind + (" contrast" if plan.score.contrast else "")
    for m, k in enumerate(fitted):
      i = ok[k]
      try:
        raster.check_complete(
          raster.Fragments(tri_id=None, bary=None, depth=None, num_oversized=oversized[m], num_dropped=dropped[m])
        )
      except ValueError as e:
        outcomes[i] = f"{type(e).__name__}: {e}"
        continue
      tex, wgt = np.asarray(texture[m], np.float32), np.asarray(weight[m], np.float32)
      _, label, score, how = predicted[i]
      outcomes[i] = FaceOutcome(
        label, score, kind, tex, wgt, float(outside[m]), canonical.region_shares(tex, wgt, self.regions), how
      )
    clock.lap("texture")
    return outcomes
