"""The canonicalisation check (no labels needed): one face rendered at several yaws, CIS maps compared across views.

A face is fitted with the 3DMM, textured from its photo and rendered at each yaw (`synthetic.render`); the whole
CIS pipeline runs on every render. Each view's map is compared with the reference view's (the first yaw), the
3-D way (CIS textures on texels both views see) and the 2-D way (heatmaps warped piecewise-affinely onto the
reference render's landmark template, `warp2d`). With `variants`, the same comparison is also made with the
render's true mesh and on the crops' luminance (registration alone, no model involved).

Example:
  Lines marked +SKIP are not run as doctests: it fits, renders and explains a face at each yaw (minutes).
  >>> from canonsal_jax import config as config_lib
  >>> rows = check(config_lib.default_config(), models=["gender"], yaws=[0.0, 20.0])  # doctest: +SKIP
  >>> summarise(rows)  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import numpy as np

from canonsal_jax import faces, fileio, pipeline
from canonsal_jax.evidence import synthetic, warp2d

__all__ = ["DEFAULT_YAWS", "Row", "Summary", "check", "check_face", "render_views", "summarise"]

# The reference view first, then both sides at 20 and 40 degrees: the yaws the README's table reports.
DEFAULT_YAWS = (0.0, -20.0, 20.0, -40.0, 40.0)


@dataclasses.dataclass(frozen=True)
class Row:
  """One view of one face compared with the reference view, for one face model and one kind of map.

  Attributes:
    face: the photo's name.
    model: the face model explained.
    what: "saliency", "saliency, true mesh", "luminance" or "luminance, true mesh".
    yaw: the view's yaw, degrees.
    fitted_yaw: the yaw the fitter found on the render, degrees.
    label: the model's label on the view.
    agreement: `synthetic.compare_views`' result (3-D and 2-D correlations and shares).
  """

  face: str
  model: str
  what: str
  yaw: float
  fitted_yaw: float
  label: str
  agreement: Any


@dataclasses.dataclass(frozen=True)
class Summary:
  """Per model, map and yaw over the faces: `three_d` and `two_d` are the Pearson r of each face, in order."""

  model: str
  what: str
  yaw: float
  three_d: tuple[float, ...]
  two_d: tuple[float, ...]

  @property
  def wins(self) -> int:
    """Faces where the 3-D path agreed better than the 2-D one."""
    return int(np.sum(np.asarray(self.three_d) > np.asarray(self.two_d)))


def render_views(
  config: ml_collections.ConfigDict,
  fit: pipeline.FaceFit,
  yaws: Sequence[float],
  detector: faces.FaceDetector,
  *,
  out_dir: str | pathlib.Path | None = None,
  log: Callable[[str], None] = print,
) -> dict[float, tuple[Any, faces.Face]]:
  """The fitted face, textured from its photo, rendered at each yaw: yaw -> (render, detected face).

  A yaw where neither the configured detector nor dlib's CNN finds a face is left out (and logged).
  """
  face = synthetic.textured_face(fit.model, fit.image, fit.fit)
  views = {}
  for yaw in yaws:
    view = synthetic.render(face, np.radians([yaw, 0.0, 0.0]), scale=float(fit.fit.scale) * synthetic.VIEW_ZOOM)
    found = detector.detect(view.image, upsample=config.upsample, adjust_threshold=config.detector_threshold)
    if not found:
      found = faces.default_detector("cnn").detect(view.image, upsample=config.upsample)
      log(f"{fit.name} yaw {yaw:+.0f}: {config.detector} found no face; cnn found {len(found)}")
    if found:
      views[yaw] = (view, found[0])
    if out_dir:
      stem = fit.name.replace("/", "_")
      fileio.save_png(pathlib.Path(out_dir) / f"render_{stem}_{fit.model.name}_yaw{yaw:+.0f}.png", view.image)
  return views


def check_face(
  config: ml_collections.ConfigDict,
  model_name: str,
  fit: pipeline.FaceFit,
  views: dict[float, tuple[Any, faces.Face]],
  yaws: Sequence[float],
  *,
  template_size: int = 128,
  variants: bool = True,
  log: Callable[[str], None] = print,
) -> list[Row]:
  """CIS of every view with one face model, each compared with the reference view's (`yaws[0]`).

  The reference view's predicted class is every view's target, so all views explain the same decision.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.model = model_name
  config.occlusion.target = -1
  start = time.perf_counter()
  results = {}
  for yaw, (view, found) in views.items():  # the reference first: its prediction is every view's target
    results[yaw] = pipeline.cis_face(config, view.image, found, f"{fit.name} yaw {yaw:+.0f}")
    if results[yaw].occlusion.target >= 0:
      config.occlusion.target = results[yaw].occlusion.target
  seconds = (time.perf_counter() - start) / max(len(results), 1)
  reference = results[yaws[0]]
  template = warp2d.make_template(reference.occlusion.face.landmarks_xy, template_size)
  log(f"{fit.name}: {fit.model.name} 3DMM, {model_name} model ({seconds:.1f} s per view), vs yaw {yaws[0]:+.0f}:")

  def maps_of(result, yaw):
    if not variants:
      return {"saliency": None}
    crop = result.occlusion.crop
    grey, ones = synthetic.luminance(crop), np.ones(crop.shape[:2], bool)
    heat, valid = result.occlusion.heatmap, result.occlusion.count > 0
    truth = views[yaw][0].vertices_xyd
    return {
      "saliency": None,
      "saliency, true mesh": (heat, valid, *synthetic.crop_texture(result, heat, valid, vertices_xyd=truth)),
      "luminance": (grey, ones, *synthetic.crop_texture(result, grey, ones)),
      "luminance, true mesh": (grey, ones, *synthetic.crop_texture(result, grey, ones, vertices_xyd=truth)),
    }

  reference_maps = maps_of(reference, yaws[0])
  rows = []
  for yaw, result in results.items():
    if yaw == yaws[0]:
      continue
    fitted = float(np.degrees(result.fit.fit.yaw_pitch_roll[0]))
    log(f"  yaw {yaw:+3.0f} (fitted {fitted:+5.1f}, label {result.occlusion.label}):")
    for what, maps in maps_of(result, yaw).items():
      pair = None if maps is None else (reference_maps[what], maps)
      a = synthetic.compare_views(reference, result, fit.model, template, maps=pair)
      rows.append(Row(fit.name, model_name, what, yaw, fitted, result.occlusion.label, a))
      log(
        f"    {what:20s} 3-D r {a.cis.pearson:.3f} (rho {a.cis.spearman:.3f}, n {a.cis.num_points}), face texels "
        f"r {a.cis_face.pearson:.3f}, in hull r {a.cis_hull.pearson:.3f} (rho {a.cis_hull.spearman:.3f}, n "
        f"{a.cis_hull.num_points}), both see {a.shared_share:.0%} | 2-D r "
        f"{a.warp.pearson:.3f} (rho {a.warp.spearman:.3f}, n {a.warp.num_points}), both cover {a.warp_share:.0%}"
      )
  return rows


def check(
  config: ml_collections.ConfigDict,
  *,
  models: Sequence[str],
  yaws: Sequence[float] = DEFAULT_YAWS,
  photos: Sequence[tuple[str | None, np.ndarray | None]] = ((None, None),),
  template_size: int = 128,
  variants: bool = True,
  out_dir: str | pathlib.Path | None = None,
  log: Callable[[str], None] = print,
) -> list[Row]:
  """The check on every photo `(name, pixels)` (`(None, None)`: the config's image) with every face model.

  A photo whose face or fit fails, or whose reference render has no detectable face, is skipped and logged.
  """
  yaws = [float(y) for y in yaws]
  detector = faces.default_detector(config.detector)
  rows = []
  for name, pixels in photos:
    try:
      fit = pipeline.fit_image(config, pixels, name=name)
    except (faces.NoFaceError, ValueError) as err:
      log(f"{name}: skipped ({err})")
      continue
    views = render_views(config, fit, yaws, detector, out_dir=out_dir, log=log)
    if yaws[0] not in views:
      log(f"{fit.name}: skipped (no face found in the reference render)")
      continue
    for model_name in models:
      rows += check_face(config, model_name, fit, views, yaws, template_size=template_size, variants=variants, log=log)
  return rows


def summarise(rows: Sequence[Row]) -> list[Summary]:
  """Per model, map and yaw (sorted), the faces' 3-D and 2-D Pearson r against the reference view."""
  groups: dict[tuple, list[Row]] = {}
  for row in rows:
    groups.setdefault((row.model, row.what, row.yaw), []).append(row)
  return [
    Summary(*key, tuple(r.agreement.cis.pearson for r in g), tuple(r.agreement.warp.pearson for r in g))
    for key, g in sorted(groups.items())
  ]
