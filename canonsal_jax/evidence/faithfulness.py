"""The paper's faithfulness protocol on a test set: the CMS mapped back onto each face, against rivals and controls.

`run_protocol` takes a CMS (built by `runs.run_cms` from other images: overlap by name is refused) and a list of
test photos. For each face it fits the 3DMM (`pipeline.fit_image`), cuts the model's crop, and makes one map per
method on that crop:

* "cms": the CMS texture carried back through the face's fitted mesh (`canonical.from_texture`);
* "occlusion": the face's own occlusion heatmap (the sweep `pipeline.model_sweep` builds from the config);
* any `attribution.METHODS` name ("grad_cam", "vanilla_gradient", ...), explaining the model's natural score;

and the controls: "face_mask" (uniform on the mesh's pixels), "gaussian" (centred), and, given the CMS of the
same architecture with re-initialised weights
(`scripts/cms.py --model=canonsal_jax.evidence.faithfulness:randomised_gender`), "cms_random".

Three protocols (`PROTOCOLS`, `metrics` explains them):

* "blur" (the headline, no method's home ground): every map, methods and controls, hides the same mass
  (`metrics.HEADLINE_MASS` of the crop), and hidden pixels become a copy of the photo blurred in pixel space
  (`metrics.pixel_blur`, sigma `metrics.HEADLINE_BLUR_SHARE` of the crop side), which no method uses as its
  own baseline; deletion and insertion run on the same blurred photo. `metrics.headline_table` gives the five
  figures with bootstrap intervals and Holm-corrected paired tests of the CMS against every other map.
* "mass" (ours, the extended table): all maps are scored by `metrics.make_mass_protocol` (Average Drop %,
  % Increase in Confidence, Win %, every map hiding the same mass) and by deletion/insertion AUC on both
  substrates; each method's per-image Average Drop and blurred deletion AUC are tested against each control
  (`metrics.compare_with_controls`), and model randomisation is reported as the mean Spearman correlation
  between a method's maps with the trained and with re-initialised weights (`metrics.randomise_params`; for
  "cms" against "cms_random" when given).
* "paper" (the paper's table, as its released code computes it): the CMS against Grad-CAM, Grad-CAM++ and
  Score-CAM (`PAPER_METHODS`, whatever `methods` says) by `metrics.make_paper_protocol`, with bootstrap
  intervals and Holm-corrected paired tests of the CMS against each rival (`metrics.paper_table`); the
  published 8-bit wrap-around only with `paper_as_published`.
* "both": "mass" and "paper" (the pair the first version offered); "all": the three.

The score is the softmax probability of the class predicted on the unaltered crop; for an embedding model
(score "cosine", the identity model) it is the cosine similarity of the embedding to the unaltered crop's own
(1 unaltered), so a drop is ``max(0, 1 - cos)``. With the paper's protocol both variants are computed: the
corrected one (or the published one, with `paper_as_published`) as "paper", the other as
"paper_other_variant", so a report can say how much the published wrap-around changes the table.

Example:
  Lines marked +SKIP are not run as doctests: it needs a CMS run and test photos (minutes).
  >>> table = run_protocol(config, cms_path="/tmp/cms", images="builtin:photos", methods=("cms", "grad_cam"))
  ... # doctest: +SKIP
  >>> write_evaluation(table, "/tmp/eval")  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import dataclasses
import io as stdio
import json
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from canonsal_jax import attribution, canonical, cms, datasets, faces, fileio, models, occlusion, pipeline, raster
from canonsal_jax.evidence import metrics

__all__ = [
  "CONTROLS",
  "METHODS",
  "PAPER_METHODS",
  "PROTOCOLS",
  "OverlapError",
  "check_disjoint",
  "load_cms",
  "protocol_score",
  "randomised",
  "randomised_age",
  "randomised_expression",
  "randomised_gender",
  "run_protocol",
  "summary_text",
  "write_evaluation",
]

METHODS = ("cms", "occlusion", *attribution.METHODS)
CONTROLS = ("face_mask", "gaussian", "cms_random")
# The methods of the paper's table (John et al. 2021), the CMS first (the reference of its tests).
PAPER_METHODS = ("cms", "grad_cam", "grad_cam_plus_plus", "score_cam")
PROTOCOLS = (*metrics.PROTOCOLS, "both", "all")
# Which drop protocols each `protocol` setting runs.
_RUNS = {**{p: {p} for p in metrics.PROTOCOLS}, "both": {"mass", "paper"}, "all": set(metrics.PROTOCOLS)}
# Level of the per-image tests against the controls (`beats_controls`).
ALPHA = 0.05
_FORMAT = "canonsal_jax.faithfulness"
_VERSION = 3  # 2: the "paper" table; "rows" empty when only the paper's protocol ran; 3: "headline"
# Columns of the CSV table, in order.
_COLUMNS = (
  "method",
  "kind",
  "average_drop_pct",
  "increase_in_confidence_pct",
  "win_pct",
  "deletion_auc_constant",
  "insertion_auc_constant",
  "deletion_auc_blur",
  "insertion_auc_blur",
  "mean_mass",
  "randomisation_spearman",
  "drop_p_vs_face_mask",
  "drop_p_vs_gaussian",
  "drop_p_vs_cms_random",
  "deletion_blur_p_vs_face_mask",
  "deletion_blur_p_vs_gaussian",
  "deletion_blur_p_vs_cms_random",
  "beats_controls",
  "num_images",
  "num_excluded",
)
_PARTS = ("", "_low", "_high", "_p_holm", "_finding")
# Columns of the paper's CSV table, in order.
_PAPER_COLUMNS = (
  "method",
  *(f"{figure}{part}" for figure in metrics.PAPER_FIGURES for part in _PARTS),
  "mean_mass",
  "num_images",
  "num_excluded",
)
# Columns of the headline CSV table, in order.
_HEADLINE_COLUMNS = (
  "method",
  "kind",
  *(f"{figure}{part}" for figure in metrics.HEADLINE_FIGURES for part in _PARTS),
  "mean_mass",
  "num_images",
  "num_excluded",
)


class OverlapError(ValueError):
  """Test images that the CMS was built from (the protocol needs disjoint sets)."""


def load_cms(path: str | pathlib.Path) -> cms.CMSAccumulator:
  """A CMS accumulator from a run folder (its `cms.npz`) or the `.npz` itself."""
  path = pathlib.Path(path)
  return cms.CMSAccumulator.load(path / "cms.npz" if path.is_dir() else path)


def randomised(name: str, seed: int = 0) -> models.FaceModel:
  """A registered face model with every weight layer re-initialised (`metrics.randomise_params`, `seed`).

  Its CMS is the model-randomisation control: the factories below make it a model name that `scripts/cms.py`
  takes, e.g. ``--model=canonsal_jax.evidence.faithfulness:randomised_gender``; give that run to `run_protocol` as
  `cms_random_path`.
  """
  model = models.load(name)
  return dataclasses.replace(
    model,
    name=f"{model.name}_randomised{seed}",
    params=metrics.randomise_params(model.params, jax.random.key(seed)),
    source=f"{model.source} (weights re-initialised layer by layer, seed {seed})",
  )


def randomised_gender() -> models.FaceModel:
  """`randomised("gender")`: for ``--model=canonsal_jax.evidence.faithfulness:randomised_gender``."""
  return randomised("gender")


def randomised_age() -> models.FaceModel:
  """`randomised("age")`."""
  return randomised("age")


def randomised_expression() -> models.FaceModel:
  """`randomised("expression")`."""
  return randomised("expression")


def _check_made_with(
  path: str | pathlib.Path, acc: cms.CMSAccumulator, config, model, model3d, *, randomised_control: bool = False
) -> None:
  """Raises ValueError if the CMS was made with another face model or 3DMM than `config` names.

  Reads the run's `summary.json` beside the checkpoint when there is one; always checks the texture size.
  """
  path = pathlib.Path(path)
  summary = (path if path.is_dir() else path.parent) / "summary.json"
  if summary.is_file():
    made = json.loads(summary.read_text()).get("reproducibility", {}).get("config", {})
    want = {"model": config.model, "morphable_model": config.morphable_model}
    if randomised_control:  # the same architecture, weights re-initialised
      want["model"] = f"{__name__}:randomised_{config.model}"
    for key, value in want.items():
      if key in made and made[key] != value:
        raise ValueError(f"the CMS at {path} was made with {key}={made[key]!r}, not {value!r}")
  expected = config.cis.texture_size or canonical.default_texture_size(model.crop.size, model3d)
  if acc.texture_size != expected:
    raise ValueError(
      f"the CMS at {path} has {acc.texture_size} px textures; {model.name} on {model3d.name} makes {expected} px ones "
      "(another face model, 3DMM or config.cis.texture_size?)"
    )


def _keys(name: str) -> set[str]:
  p = pathlib.Path(name)
  return {str(p.resolve()), p.name}


def check_disjoint(acc: cms.CMSAccumulator, files: Sequence[str]) -> None:
  """Raises `OverlapError` if any test image is one the CMS accumulated (same resolved path or file name)."""
  used: dict[str, str] = {}
  for rec in acc.records():
    if rec["status"] == "ok":
      for key in _keys(rec["name"]):
        used[key] = rec["name"]
  clash = {f: used[k] for f in files for k in sorted(_keys(f)) if k in used}
  if clash:
    shown = ", ".join(f"{f!r} (CMS: {c!r})" for f, c in list(clash.items())[:10])
    raise OverlapError(
      f"{len(clash)} test images are among the CMS's images (same path or file name); the protocol needs the "
      f"CMS built from other images: {shown}"
    )


def _crop_raster_box(mesh: np.ndarray, triangles: np.ndarray, size: int) -> int:
  """The exact fast-path box for this mesh, rounded up to a multiple of 8 so few programs get compiled."""
  box = raster.required_box(mesh, triangles, size, size)
  return int(-(-box // 8) * 8)


def _finite_mean(values: Any) -> float:
  """Mean of the finite entries (NaN when none: e.g. rank correlations with a map constant on the face)."""
  v = np.asarray(values, np.float64)
  v = v[np.isfinite(v)]
  return float(v.mean()) if v.size else float("nan")


def _method_maps(
  names: Sequence[str], model: models.FaceModel, params: Any, x: np.ndarray, sweep_fn: Callable, settings: dict
) -> dict[str, np.ndarray]:
  """Maps [B, S, S] of the non-canonical methods ("occlusion" and attribution rivals) with `params`."""
  score = occlusion.Score.for_model(model)
  out = {}
  for name in names:
    if name == "occlusion":
      out[name] = np.stack([sweep_fn(params, xi) for xi in x])
    else:
      out[name] = np.asarray(attribution.attribute(name, model, params, x, score, **settings.get(name, {})))
  return out


def run_protocol(
  config: ml_collections.ConfigDict,
  *,
  cms_path: str | pathlib.Path,
  images: str | Sequence[str],
  methods: Sequence[str] = ("cms", "occlusion", "grad_cam", "vanilla_gradient"),
  max_images: int = 0,
  group: str = "all",
  cms_random_path: str | pathlib.Path | None = None,
  mass: float = metrics.DEFAULT_MASS,
  protocol_baseline: Any = 0.0,
  steps: int = metrics.DEFAULT_STEPS,
  method_settings: dict[str, dict[str, Any]] | None = None,
  protocol: str = "all",
  paper_as_published: bool = False,
  seed: int = 0,
  progress: Callable[[int, int, str], None] | None = None,
) -> dict[str, Any]:
  """Runs the faithfulness protocol on test images; returns the table and per-image values (JSON-ready).

  Args:
    config: the configuration the CMS was made with (model, morphable model, occlusion settings, detector).
    cms_path: the CMS run folder or its `cms.npz`.
    images: the test photos: a folder, a .txt list, a glob, "builtin:<name>" or a list of paths.
    methods: names from `METHODS`.
    max_images: use at most this many test images that have a face (0: all).
    group: the CMS group to map back ("all", "pred_female", ...).
    cms_random_path: the CMS of the same architecture with re-initialised weights (the model-randomisation
      control), or None.
    mass: each map's mass in the drop protocol (share of the crop, `metrics.scale_to_mass`).
    protocol_baseline: what maps blend towards in the drop protocol, model input space (0: the paper's).
    steps: deletion/insertion steps.
    method_settings: keyword settings per attribution method, e.g. {"rise": {"num_masks": 500}}.
    protocol: one of `PROTOCOLS` (module docstring).
    paper_as_published: the paper's protocol keeps its published 8-bit wrap-around (`metrics.explanation_images`).
    seed: seeds the randomised weights and the statistics.
    progress: called as `progress(done, total, name)` per test image.

  Returns:
    {"rows": one dict per method and control (the CSV's columns; empty without the mass protocol), "per_image":
    {...}, "headline": `metrics.headline_table`'s dict with "per_image" values (with the "blur" protocol),
    "paper" and "paper_other_variant": `metrics.paper_table`'s dicts with "per_image" scores (with the paper's
    protocol: the variant `paper_as_published` chose, and the other), "images":
    [...], "skipped": [...], "settings": {...}}.

  Raises:
    OverlapError: a test image is one of the CMS's.
    ValueError: an unknown method, or a CMS group that does not exist.
  """
  unknown = [m for m in methods if m not in METHODS]
  if unknown:
    raise ValueError(f"unknown methods {unknown}; known: {', '.join(METHODS)}")
  if protocol not in PROTOCOLS:
    raise ValueError(f"protocol {protocol!r} is not one of {PROTOCOLS}")
  runs = _RUNS[protocol]
  run_blur, run_mass, run_paper = "blur" in runs, "mass" in runs, "paper" in runs
  methods = list(methods) if (run_mass or run_blur) else []
  settings = dict(method_settings or {})
  acc = load_cms(cms_path)
  if isinstance(images, str) and images.startswith("builtin:"):
    files = datasets.builtin_dataset(images.removeprefix("builtin:"))
  else:
    files = datasets.list_images(images)
  check_disjoint(acc, files)
  cms_mean, cms_valid = acc.mean(group)
  textures = {"cms": (np.nan_to_num(cms_mean), cms_valid.astype(np.float32))}
  if cms_random_path is not None:
    random_acc = load_cms(cms_random_path)
    check_disjoint(random_acc, files)
    mean_r, valid_r = random_acc.mean(group)
    textures["cms_random"] = (np.nan_to_num(mean_r), valid_r.astype(np.float32))

  model = models.load_configured(config)
  model3d = pipeline.load_morphable(config.morphable_model)
  _check_made_with(cms_path, acc, config, model, model3d)
  if cms_random_path is not None:
    _check_made_with(cms_random_path, random_acc, config, model, model3d, randomised_control=True)
  score = protocol_score(model)
  triangles, uv = np.asarray(model3d.triangles), np.asarray(model3d.uv)
  size = model.crop.size
  sweep, patch_size, _ = pipeline.model_sweep(model, config.occlusion)
  centres = occlusion.grid_centres(size, size, patch_size=patch_size, stride=int(config.occlusion.stride))
  valid_centres = np.ones(len(centres), bool)
  sweep_fn = lambda params, xi: np.asarray(sweep(params, xi, centres, valid_centres).heatmap)
  detector = faces.default_detector(config.detector)

  # Faces: fit, crop, canonical maps.
  names, inputs, crops, crop_maps, crop_valid, masks, skipped = [], [], [], {}, {}, [], []
  start = time.perf_counter()
  limit = max_images if max_images > 0 else len(files)
  for k, path in enumerate(files):
    if len(names) >= limit:
      break
    try:
      fit = pipeline.fit_image(config, path, detector=detector)
      crop, crop_from_image = faces.crop_face(fit.image, fit.face, model.crop)
    except (ValueError, FileNotFoundError, fileio.ImageError) as e:
      skipped.append({"name": path, "reason": f"{type(e).__name__}: {e}"})
      continue
    mesh = np.asarray(canonical.mesh_to_crop(fit.fit.vertices_xyd, crop_from_image))
    box = _crop_raster_box(mesh, triangles, size)
    for key, (texture, weight) in textures.items():
      value, ok = canonical.from_texture(texture, weight, mesh, triangles, uv, size, max_box=box, max_oversized=0)
      crop_maps.setdefault(key, []).append(np.asarray(value))
      crop_valid.setdefault(key, []).append(np.asarray(ok))
    masks.append(np.asarray(metrics.face_mask(mesh, triangles, size, max_box=box, max_oversized=0)))
    names.append(path)
    crops.append(crop)
    inputs.append(np.asarray(model.preprocess(crop), np.float32))
    if progress is not None:
      progress(k + 1, len(files), path)
  if not names:
    raise ValueError(f"no test image had a usable face ({len(skipped)} skipped)")
  x = np.stack(inputs)

  # Every map [B, S, S]; each rival's maps made once for both protocols.
  rivals = [m for m in dict.fromkeys([*methods, *(PAPER_METHODS if run_paper else ())]) if m != "cms"]
  made = _method_maps(rivals, model, model.params, x, sweep_fn, settings)
  cms_map, cms_valid = np.stack(crop_maps["cms"]), np.stack(crop_valid["cms"]).astype(bool)
  table: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "rows": []}
  run_settings: dict[str, Any] = {
    "protocol": protocol,
    "cms": str(cms_path),
    "cms_random": None if cms_random_path is None else str(cms_random_path),
    "cms_group": group,
    "cms_images": acc.num_images(group),
    "model": model.name,
    "morphable_model": model3d.name,
    "method_settings": settings,
    "seed": seed,
    "score": _SCORE_TEXT[score.kind],
  }
  if run_mass or run_blur:
    maps: dict[str, np.ndarray] = {}
    valid: dict[str, np.ndarray] = {}
    if "cms" in methods:
      maps["cms"], valid["cms"] = cms_map, cms_valid
    maps.update({m: made[m] for m in methods if m != "cms"})
    maps["face_mask"] = np.stack(masks)
    maps["gaussian"] = np.broadcast_to(np.asarray(metrics.centred_gaussian(size)), x.shape[:3])
    if "cms_random" in crop_maps:
      maps["cms_random"] = np.stack(crop_maps["cms_random"])
      valid["cms_random"] = np.stack(crop_valid["cms_random"])
    for name in maps:
      valid.setdefault(name, np.ones(x.shape[:3], bool))
  if run_blur:
    table["headline"] = _headline_evaluation(
      model, np.stack(crops), x, maps, valid, names, score=score, steps=steps, seed=seed
    )
  if run_mass:
    found, mass_settings = _mass_evaluation(
      config,
      model,
      x,
      maps,
      valid,
      names,
      sweep_fn,
      settings,
      score=score,
      mass=mass,
      baseline=protocol_baseline,
      steps=steps,
      seed=seed,
    )
    table.update(found)
    run_settings.update(mass_settings)
  if run_paper:
    paper_maps = {"cms": cms_map, **{m: made[m] for m in PAPER_METHODS if m != "cms"}}
    for key, as_published in (("paper", paper_as_published), ("paper_other_variant", not paper_as_published)):
      table[key] = _paper_evaluation(
        model, np.stack(crops), paper_maps, cms_valid, names, score=score, paper_as_published=as_published, seed=seed
      )
  table.update(images=names, skipped=skipped, settings={**run_settings, "seconds": time.perf_counter() - start})
  return table


def _mass_evaluation(
  config: ml_collections.ConfigDict,
  model: models.FaceModel,
  x: np.ndarray,
  maps: dict[str, np.ndarray],
  valid: dict[str, np.ndarray],
  names: list[str],
  sweep_fn: Callable,
  settings: dict,
  *,
  score: occlusion.Score,
  mass: float,
  baseline: Any,
  steps: int,
  seed: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
  """The mass protocol's tables of `maps` (methods, then controls; [B, S, S] each): (entries, settings)."""
  order = list(maps)
  others = [m for m in order if m not in CONTROLS and m != "cms"]
  # Drop protocol.
  protocol = metrics.make_mass_protocol(model.apply_fn, score=score, baseline=baseline, mass=mass)
  result = protocol(model.params, x, np.stack([maps[m] for m in order]), np.stack([valid[m] for m in order]))
  summary = metrics.protocol_summary(result, order)
  original = np.asarray(result.original, np.float64)
  drops = np.where(
    original > 0, np.maximum(original - np.asarray(result.occluded), 0) / np.where(original > 0, original, 1), np.nan
  )

  # Deletion / insertion on both substrates.
  constant = pipeline.model_baseline(model, config.occlusion.baseline)
  curves = {
    "constant": metrics.make_deletion_insertion(
      model.apply_fn, score=score, steps=steps, substrate="constant", constant=constant
    ),
    "blur": metrics.make_deletion_insertion(model.apply_fn, score=score, steps=steps, substrate="blur"),
  }
  auc: dict[str, dict[str, np.ndarray]] = {m: {} for m in order}
  for substrate, fn in curves.items():
    for m in order:
      r = fn(model.params, x, maps[m], valid[m])
      auc[m][f"deletion_auc_{substrate}"] = np.asarray(r.deletion_auc, np.float64)
      auc[m][f"insertion_auc_{substrate}"] = np.asarray(r.insertion_auc, np.float64)

  # Controls: per-image tests; model randomisation.
  present = [c for c in CONTROLS if c in maps]
  vs_drop = metrics.compare_with_controls({m: drops[i] for i, m in enumerate(order)}, present, seed=seed)
  vs_del = metrics.compare_with_controls(
    {m: auc[m]["deletion_auc_blur"] for m in order}, present, higher_is_better=False, seed=seed
  )
  randomised = metrics.randomise_params(model.params, jax.random.key(seed))
  random_maps = _method_maps(others, model, randomised, x, sweep_fn, settings)
  if "cms" in maps and "cms_random" in maps:
    random_maps["cms"] = maps["cms_random"]
  rand_rho = {m: _finite_mean(metrics.spearman(maps[m], random_maps[m], valid[m])) for m in random_maps}
  rows = []
  for m in order:
    s = summary[m]
    rows.append(
      {
        "method": m,
        "kind": "control" if m in CONTROLS else "method",
        "average_drop_pct": s["average_drop_pct"],
        "increase_in_confidence_pct": s["increase_in_confidence_pct"],
        "win_pct": s["win_pct"],
        **{k: float(np.mean(v)) for k, v in auc[m].items()},
        "mean_mass": s["mean_mass"],
        "randomisation_spearman": rand_rho.get(m, float("nan")),
        **{f"drop_p_vs_{c}": vs_drop.get(m, {}).get(c, {}).get("p_value", float("nan")) for c in present},
        **{f"deletion_blur_p_vs_{c}": vs_del.get(m, {}).get(c, {}).get("p_value", float("nan")) for c in present},
        # Average Drop higher than every control's on the same images (one-sided p <= ALPHA each).
        "beats_controls": None
        if m in CONTROLS
        else all(vs_drop[m][c]["p_value"] <= ALPHA and vs_drop[m][c]["mean_difference"] > 0 for c in present),
        "num_images": s["num_images"],
        "num_excluded": s["num_excluded"],
      }
    )
  spearman_between = {
    a: {b: _finite_mean(metrics.spearman(maps[a], maps[b], valid[a] & valid[b])) for b in order} for a in order
  }
  entries = {
    "rows": rows,
    "pairwise_win_pct": {m: summary[m]["pairwise_win_pct"] for m in order},
    "spearman_between_methods": spearman_between,
    "vs_controls": {"average_drop": vs_drop, "deletion_auc_blur": vs_del},
    "per_image": {
      "names": names,
      "original_score": original.tolist(),
      "target": np.asarray(result.target).tolist(),
      "average_drop": {m: drops[i].tolist() for i, m in enumerate(order)},
      **{key: {m: auc[m][key].tolist() for m in order} for key in next(iter(auc.values()))},
    },
  }
  return entries, {
    "direction": "higher average drop and win %, lower increase in confidence and deletion AUC, higher "
    "insertion AUC: the map found what the model needs",
    "mass": mass,
    "mass_rule": "clipped: every map hides the same mass after clipping to [0, 1]",
    "protocol_baseline": baseline,
    "deletion_steps": steps,
    "constant_substrate": constant,
  }


def protocol_score(model: models.FaceModel) -> occlusion.Score:
  """What the protocols measure on `model`: the predicted class's probability, or an embedding's self-similarity.

  A classifier (any score kind but "cosine", the age model's expected value included: its classes are age bins)
  is scored by the softmax probability of the class predicted on the unaltered crop, as the paper does; an
  embedding model by the cosine similarity to the unaltered crop's own embedding (`Score("cosine")`, target
  the unaltered output: 1 unaltered).
  """
  return occlusion.Score("cosine" if model.score == "cosine" else "probability")


# What each protocol score is, in words (tables and reports).
_SCORE_TEXT = {
  "probability": "softmax probability of the class predicted on the unaltered crop",
  "cosine": "cosine similarity of the embedding to the unaltered crop's own (1 unaltered)",
}


def _headline_evaluation(
  model: models.FaceModel,
  crops: np.ndarray,
  x: np.ndarray,
  maps: dict[str, np.ndarray],
  valid: dict[str, np.ndarray],
  names: list[str],
  *,
  score: occlusion.Score,
  steps: int,
  seed: int,
) -> dict[str, Any]:
  """The headline table (`metrics.headline_table`) of `maps` (methods, then controls; [B, S, S] each)."""
  order = list(maps)
  sigma = metrics.headline_blur_sigma(crops.shape[1])
  blurred = metrics.pixel_blur(crops, sigma=sigma)
  substitute = np.stack([np.asarray(model.preprocess(c), np.float32) for c in blurred])
  protocol = metrics.make_mass_protocol(model.apply_fn, score=score, mass=metrics.HEADLINE_MASS)
  result = protocol(
    model.params, x, np.stack([maps[m] for m in order]), np.stack([valid[m] for m in order]), substitute=substitute
  )
  curves_fn = metrics.make_deletion_insertion(model.apply_fn, score=score, steps=steps)
  curves = [curves_fn(model.params, x, maps[m], valid[m], substitute=substitute) for m in order]
  reference = "cms" if "cms" in order else order[0]
  table = metrics.headline_table(result, curves, order, reference=reference, seed=seed)
  for row in table["rows"]:
    row["kind"] = "control" if row["method"] in CONTROLS else "method"
  occluded = np.asarray(result.occluded, np.float64)
  table.update(
    score=_SCORE_TEXT[score.kind],
    substitute=f"the crop blurred in pixel space, Gaussian sigma {sigma:.3g} px ({metrics.HEADLINE_BLUR_SHARE:g} "
    "of the crop side), 8-bit, read through the model's preprocessing",
    blur_sigma_px=sigma,
    mass=metrics.HEADLINE_MASS,
    deletion_steps=steps,
    per_image={
      "names": names,
      "original_score": np.asarray(result.original, np.float64).tolist(),
      "occluded_score": {m: occluded[i].tolist() for i, m in enumerate(order)},
      "deletion_auc": {m: np.asarray(c.deletion_auc, np.float64).tolist() for m, c in zip(order, curves)},
      "insertion_auc": {m: np.asarray(c.insertion_auc, np.float64).tolist() for m, c in zip(order, curves)},
    },
  )
  return table


def _paper_evaluation(
  model: models.FaceModel,
  crops: np.ndarray,
  maps: dict[str, np.ndarray],
  cms_valid: np.ndarray,
  names: list[str],
  *,
  score: occlusion.Score,
  paper_as_published: bool,
  seed: int,
) -> dict[str, Any]:
  """The paper's table (`metrics.paper_table`) of the `PAPER_METHODS` maps [B, S, S] on uint8 crops [B, S, S, 3]."""
  order = list(PAPER_METHODS)
  valid = np.stack([cms_valid if m == "cms" else np.ones(cms_valid.shape, bool) for m in order])
  protocol = metrics.make_paper_protocol(
    model.apply_fn, model.preprocess, score=score, paper_as_published=paper_as_published
  )
  result = protocol(model.params, crops, np.stack([maps[m] for m in order]), valid)
  table = metrics.paper_table(result, order, reference="cms", seed=seed)
  occluded = np.asarray(result.occluded, np.float64)
  table.update(
    paper_as_published=paper_as_published,
    score=_SCORE_TEXT[score.kind],
    per_image={
      "names": names,
      "original_score": np.asarray(result.original, np.float64).tolist(),
      "target": np.asarray(result.target).tolist(),
      "occluded_score": {m: occluded[i].tolist() for i, m in enumerate(order)},
      "mass": np.asarray(result.mass, np.float64)[0].tolist(),
    },
  )
  return table


def _tested_lines(tested: dict[str, Any], digits: int) -> list[str]:
  lines = []
  for row in tested["rows"]:
    figures = "  ".join(
      f"{k} {row[k]:.{digits}g} [{row[k + '_ci'][0]:.{digits}g}, {row[k + '_ci'][1]:.{digits}g}]"
      for k in tested["figures"]
    )
    kind = f" ({row['kind']})" if "kind" in row else ""
    lines.append(f"{row['method']:>22}{kind}: {figures}")
  lines += [f"  {figure}: {claim['statement']}" for figure, claim in tested["claims"].items()]
  return lines


def summary_text(table: dict[str, Any]) -> str:
  """The tables of `run_protocol` as lines of text: the headline, the extended table, the paper's."""
  lines = []
  if "headline" in table:
    lines.append(f"headline (hidden pixels become {table['headline']['substitute']}):")
    lines += _tested_lines(table["headline"], 3)
  if table["rows"]:
    lines.append("extended (every map the same mass, a constant substitute):")
  for row in table["rows"]:
    lines.append(
      f"{row['method']:>22} ({row['kind']}): drop {row['average_drop_pct']:6.2f}%  increase "
      f"{row['increase_in_confidence_pct']:5.1f}%  win {row['win_pct']:5.1f}%  deletion(blur) "
      f"{row['deletion_auc_blur']:.3f}  insertion(blur) {row['insertion_auc_blur']:.3f}"
    )
  if "paper" in table:
    published = table["paper"]["paper_as_published"]
    lines.append("the paper's protocol" + (", as published (8-bit wrap-around):" if published else ":"))
    lines += _tested_lines(table["paper"], 4)
  return "\n".join(lines)


def _csv_text(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> bytes:
  buffer = stdio.StringIO()
  writer = csv.DictWriter(buffer, fieldnames=columns, restval="", extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
  return buffer.getvalue().encode("utf-8")


def _paper_rows(paper: dict[str, Any]) -> list[dict[str, Any]]:
  """A tested table (the paper's, the headline) flattened for its CSV: intervals as low/high, each rival's
  corrected test and finding."""
  tests = {(c["rival"], c["figure"]): c for c in paper["comparisons"]}
  rows = []
  for row in paper["rows"]:
    flat = {k: v for k, v in row.items() if not k.endswith("_ci")}
    for figure in paper.get("figures", metrics.PAPER_FIGURES):
      flat[f"{figure}_low"], flat[f"{figure}_high"] = row[f"{figure}_ci"]
      test = tests.get((row["method"], figure))
      if test is not None:
        flat[f"{figure}_p_holm"], flat[f"{figure}_finding"] = test["p_holm"], test["finding"]
    rows.append(flat)
  return rows


def write_evaluation(table: dict[str, Any], out_dir: str | pathlib.Path) -> list[pathlib.Path]:
  """Writes the evaluation's tables atomically and returns the files written.

  `headline.csv`: the headline (blurred photo) table, one row per method and control: the five figures with their
  interval ends, each other map's Holm-corrected test against the CMS and the finding (when it ran).
  `metrics.csv`: the mass protocol's table, one row per method and control (when it ran). `paper.csv`: the
  paper's table, one row per method: the figures with their interval ends, and for each rival the
  Holm-corrected p-value of its test against the CMS and the finding (when it ran). `metrics.json`: everything.
  """
  out = pathlib.Path(out_dir)
  written = []
  if table["rows"]:
    fileio.write_atomic(out / "metrics.csv", _csv_text(_COLUMNS, table["rows"]))
    written.append(out / "metrics.csv")
  if "headline" in table:
    fileio.write_atomic(out / "headline.csv", _csv_text(_HEADLINE_COLUMNS, _paper_rows(table["headline"])))
    written.append(out / "headline.csv")
  if "paper" in table:
    fileio.write_atomic(out / "paper.csv", _csv_text(_PAPER_COLUMNS, _paper_rows(table["paper"])))
    written.append(out / "paper.csv")
  fileio.save_json(out / "metrics.json", table)
  return [*written, out / "metrics.json"]
