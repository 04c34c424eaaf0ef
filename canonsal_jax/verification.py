"""Verification saliency: why a face model says two photos show the same person (or not).

For an embedding model (`identity`: dlib's ResNet descriptor), the probe's occlusion score is the cosine
similarity of the occluded probe's descriptor to the reference photo's descriptor, so a pixel is salient where
hiding it makes the probe look less like the reference. Both sides are explained, each against the other, and
carried onto the canonical face, so the two maps can be compared texel by texel. With an impostor photo, the
probe's score is ``cos(probe, reference) - cos(probe, impostor)``: what makes the probe this person rather than
that one.

```python
from canonsal_jax import config as config_lib, verification

config = config_lib.default_config()
config.model = "identity"
pair = verification.verify_pair(config, "probe.jpg", "reference.jpg")
verification.write_pair(pair, "out/")  # pair.png, pair.json, probe/ and reference/ CIS outputs
```
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import ml_collections
import numpy as np
from matplotlib.figure import Figure

from canonsal_jax import config as config_lib
from canonsal_jax import faces, fileio, models, outputs, pipeline, viz

__all__ = ["DLIB_THRESHOLD", "PairResult", "pair_figure", "pair_scale", "verify_pair", "write_pair"]

# dlib's decision rule for its ResNet descriptor: two faces are the same person when the Euclidean distance of
# their descriptors is below 0.6 (99.38% on LFW, as published by dlib's author).
DLIB_THRESHOLD = 0.6
_FIGURES = viz.FigureSettings()


@dataclasses.dataclass(frozen=True)
class PairResult:
  """A verification decision and both sides' canonical saliency.

  Attributes:
    probe: the probe's CIS, explained against the reference (or reference vs impostor).
    reference: the reference's CIS, explained against the probe.
    impostor_name: the impostor photo's name ("" = none).
    cosine: cosine similarity of the two unoccluded descriptors.
    distance: their Euclidean distance (dlib's metric).
    same_person: `distance < threshold`.
    threshold: the decision threshold used.
    impostor_cosine: cosine similarity of probe and impostor (NaN = no impostor).
  """

  probe: pipeline.CISResult
  reference: pipeline.CISResult
  impostor_name: str
  cosine: float
  distance: float
  same_person: bool
  threshold: float
  impostor_cosine: float


def _cos(a: np.ndarray, b: np.ndarray) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def verify_pair(
  config: ml_collections.ConfigDict,
  probe: str | pathlib.Path | np.ndarray,
  reference: str | pathlib.Path | np.ndarray,
  *,
  impostor: str | pathlib.Path | np.ndarray | None = None,
  names: tuple[str | None, str | None, str | None] = (None, None, None),
  threshold: float = DLIB_THRESHOLD,
) -> PairResult:
  """Explains a verification decision on both photos (the largest face of each).

  Args:
    config: the configuration; `config.model` must be an embedding model with a cosine score (`identity`).
      Its `occlusion.reference`/`impostor` keys are ignored: the photos here are the references.
    probe, reference: file paths or `uint8 [H, W, 3]` arrays.
    impostor: optionally a photo of someone else: the probe's map then explains the contrast.
    names: names for array inputs, in errors and outputs (probe, reference, impostor).
    threshold: the Euclidean distance below which the model's descriptors mean "same person".

  Raises:
    ValueError: the model has no cosine score, or non-finite outputs; faces.NoFaceError / fileio.ImageError naming
      the photo at fault.
  """
  config_lib.validate(config)
  model = models.load_configured(config)
  if model.score != "cosine":
    raise ValueError(f"verification needs an embedding model with a cosine score (identity), not {model.name!r}")
  config = ml_collections.ConfigDict(config.to_dict())
  config.occlusion.reference, config.occlusion.impostor = "", ""
  config.occlusion.score = "cosine"
  loaded = [pipeline.load_input(image, name) for image, name in zip((probe, reference), names[:2])]
  # `config.face` picks the probe's face; the reference photo's is its largest.
  detections = [
    pipeline.detect_faces(config, pixels, name, None, face=face)
    for (name, pixels), face in zip(loaded, (None, "largest"), strict=True)
  ]
  found = [d.face for d in detections]
  probe_emb, ref_emb = (pipeline.embed_face(model, pixels, face, name) for (name, pixels), face in zip(loaded, found))
  impostor_name, impostor_cos, probe_target = "", float("nan"), ref_emb
  if impostor is not None:
    impostor_name, imp_pixels = pipeline.load_input(impostor, names[2])
    imp_face = pipeline.detect_face(config, imp_pixels, impostor_name, None, face="largest")
    imp_emb = pipeline.embed_face(model, imp_pixels, imp_face, impostor_name)
    impostor_cos = _cos(probe_emb, imp_emb)
    probe_target = np.stack([ref_emb, imp_emb])  # [2, K]: the score becomes the cosine contrast
  probe_cis, ref_cis = (
    _with_detection(pipeline.cis_face(config, pixels, d.face, name, target=target), d)
    for (name, pixels), d, target in zip(loaded, detections, (probe_target, probe_emb))
  )
  distance = float(np.linalg.norm(probe_emb - ref_emb))
  return PairResult(
    probe=probe_cis,
    reference=ref_cis,
    impostor_name=impostor_name,
    cosine=_cos(probe_emb, ref_emb),
    distance=distance,
    same_person=distance < threshold,
    threshold=float(threshold),
    impostor_cosine=impostor_cos,
  )


def pair_scale(result: PairResult) -> viz.Scale:
  """The colour scale both sides of a pair share: over both crop heatmaps (covered pixels) and both canonical maps
  (texels with data); its unit names both sides' score kinds."""
  sides = (result.probe, result.reference)
  return viz.make_scale(
    [c.occlusion.heatmap for c in sides] + [c.texture for c in sides],
    valid=[c.occlusion.count > 0 for c in sides] + [c.weight > 0 for c in sides],
    unit=viz.unit_label([c.occlusion.score_kind for c in sides]),
  )


def pair_figure(
  result: PairResult, *, render_size: int = outputs.RENDER_SIZE, settings: viz.FigureSettings = _FIGURES
) -> Figure:
  """`pair.png`: a row per side, labelled "probe" and "reference": the photo in grey with the map's contours, the
  heatmap on the crop, and the map on the canonical face; all six panels on one colour scale (`pair_scale`, one
  colour bar), with a key for the crop outline and what has no data."""
  sides = {"probe": result.probe, "reference": result.reference}
  fig, axes = viz.new_figure(3, 2, settings=settings)
  scale = pair_scale(result)
  handles: dict[str, Any] = {}
  for row, (key, cis) in enumerate(sides.items()):
    occ = cis.occlusion
    found = outputs.photo_panels(list(axes[row, :2]), occ, scale, prefix=f"{key}: ")
    found += outputs.canonical_panel(
      axes[row, 2], cis.fit.model, cis.texture, cis.weight, render_size, scale, f"{key}: canonical face",
      "no data: texels not seen in the photo",
    )  # fmt: skip
    axes[row, 0].set_ylabel(f"{key}\n{viz.short_name(occ.name)}", fontsize=11)
    axes[row, 2].set_xlabel(f"{occ.score_kind} {occ.score:.3f}", fontsize=9)
    handles.update({h.get_label(): h for h in found})  # one entry per kind of mark
  viz.add_colorbar(fig, axes, scale)
  viz.add_key(fig, list(handles.values()))
  verdict = "same person" if result.same_person else "different people"
  title = (
    f"{result.probe.occlusion.model}: {verdict} (distance {result.distance:.3f}, threshold {result.threshold}, "
    f"cosine {result.cosine:.3f}) | probe {viz.short_name(result.probe.occlusion.name)} | reference "
    f"{viz.short_name(result.reference.occlusion.name)}"
  )
  if result.impostor_name:
    title += (
      f" | probe map: genuine minus impostor {viz.short_name(result.impostor_name)} "
      f"(cosine {result.impostor_cosine:.3f})"
    )
  viz.set_title(fig, title)
  return fig


def _with_detection(result: pipeline.CISResult, detection: faces.Detection) -> pipeline.CISResult:
  """A side's CIS with every face found in its photo (recorded in its outputs, drawn in the figures)."""
  return dataclasses.replace(
    result,
    occlusion=dataclasses.replace(result.occlusion, detection=detection),
    fit=dataclasses.replace(result.fit, detection=detection),
  )


def write_pair(
  result: PairResult,
  out_dir: str | pathlib.Path,
  *,
  render_size: int = outputs.RENDER_SIZE,
  settings: viz.FigureSettings = _FIGURES,
) -> dict[str, Any]:
  """Writes `pair.png` (`pair_figure`, in `settings.format`), `pair.json`, and each side's CIS outputs under
  `probe/` and `reference/`."""
  out = pathlib.Path(out_dir)
  sides = {"probe": result.probe, "reference": result.reference}
  summaries = {
    key: outputs.write_cis(cis, out / key, render_size=render_size, settings=settings) for key, cis in sides.items()
  }
  viz.save_figure(pair_figure(result, render_size=render_size, settings=settings), out, "pair", settings)
  vmax = pair_scale(result).vmax
  summary = {
    "format": "canonsal_jax.verification_pair",
    "version": 1,
    "model": result.probe.occlusion.model,
    "probe": summaries["probe"],
    "reference": summaries["reference"],
    "impostor": result.impostor_name,
    "cosine": result.cosine,
    "distance": result.distance,
    "threshold": result.threshold,
    "same_person": result.same_person,
    "impostor_cosine": None if np.isnan(result.impostor_cosine) else result.impostor_cosine,
    "shared_vmax": vmax,  # the end of the colour scale both sides share (crop heatmaps and canonical maps)
  }
  fileio.save_json(out / "pair.json", summary)
  return summary
