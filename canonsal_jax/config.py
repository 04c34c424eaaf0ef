"""The default configuration: every key the library and scripts read, with its meaning, and `validate`.

`configs/*.py` files start from `default_config()` and override what differs; scripts load them with
`ml_collections.config_flags` and `lock_config=True`, so a misspelt key is an error, not a silent default.
`validate` checks every value before anything is loaded or detected; its errors name the key as the
command-line override that sets it (``--config.occlusion.patch_size=-3: ...``), which is also its path here.

Example:
  >>> from canonsal_jax import config as config_lib
  >>> cfg = config_lib.default_config()
  >>> config_lib.validate(cfg)
  >>> cfg.occlusion.patch_size = 4
  >>> config_lib.validate(cfg)
  Traceback (most recent call last):
  ...
  canonsal_jax.config.ConfigError: --config.occlusion.patch_size=4: a size in pixels must be an odd integer (3 or 5)...
"""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import ml_collections

__all__ = [
  "ATTRIBUTION_METHODS",
  "BASELINES",
  "BUILTIN_MODELS",
  "DETECTORS",
  "FACE_RULES",
  "NORMALISATIONS",
  "REDUCTIONS",
  "SCORE_KINDS",
  "BuiltinModel",
  "ConfigError",
  "default_config",
  "flat_items",
  "parse_face",
  "show",
  "validate",
]


class BuiltinModel(NamedTuple):
  """What a built-in model takes and gives, known without loading it (`--list_models`, the crop check)."""

  crop_size: int  # the side of the model's face crop, pixels
  outputs: str
  score: str  # its natural score (`config.occlusion.score` = "")


# The registry of `canonsal_jax.models` (tests/test_config.py checks that the two agree).
BUILTIN_MODELS = {
  "gender": BuiltinModel(32, "female, male", "log_odds"),
  "age": BuiltinModel(64, "81 age bins, 0.25 to 80 years", "expected_value (the expected age)"),
  "expression": BuiltinModel(64, "angry, disgust, fear, happy, sad, surprise, neutral", "log_softmax"),
  "identity": BuiltinModel(150, "a 128-d face descriptor", "cosine (similarity to a reference)"),
}
# The values the library accepts, here so that a config is checked before JAX or dlib is imported; each equals its
# library home (tests/test_config.py): faces.DETECTOR_KINDS, models.SCORE_KINDS, occlusion.BASELINES and
# REDUCTIONS (with "black" and "white", which `pipeline` resolves), attribution.METHODS, cms.NORMALISATIONS,
# datasets.HOST_POOLS.
DETECTORS = ("hog", "cnn")
SCORE_KINDS = ("logit", "log_softmax", "log_odds", "probability", "expected_value", "cosine")
BASELINES = ("black", "white", "mean", "blur")
REDUCTIONS = ("mean", "sum")
ATTRIBUTION_METHODS = (
  "vanilla_gradient",
  "integrated_gradients",
  "grad_cam",
  "grad_cam_plus_plus",
  "score_cam",
  "rise",
)
NORMALISATIONS = ("none", "max_abs", "sum_abs")
HOST_POOLS = ("processes", "threads")  # datasets.HOST_POOLS
FIGURE_FORMATS = ("png", "svg", "pdf")  # what `viz.save_figure` writes (viz reads both from here)
FIGURE_DPI = (20, 1200)  # the dots per inch a figure may have, inclusive


def default_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # The face model: a built-in name (canonsal_jax.models.names()), onnx:PATH, PATH.py:factory,
  # package.module:factory, or a name given to canonsal_jax.models.register.
  config.model = "gender"
  config.model_card = ""  # an onnx:PATH model's JSON card; "" looks for PATH.json beside the file

  # Face detection (dlib HOG; "cnn" uses dlib's mmod detector).
  config.detector = "hog"
  config.upsample = 1  # detector image pyramid upsampling; raise it for small faces
  # Added to the detector's threshold (dlib's adjust_threshold). dlib's own default is 0; at upsample 1 the
  # HOG detector finds a weak false face (score 0.12) on the astronaut's suit, nearly as large as her face
  # (score 1.16). Lower this for hard images (profiles, blur), raise it if false faces win.
  config.detector_threshold = 0.3
  # Keep every photo's detections and landmarks in the cache folder (`faces.DetectionCache`, keyed by the
  # pixels and the detector settings), so a second run over the same photos, with any model, detects nothing.
  config.detection_cache = True
  # Which detected face is explained (`faces.choose_face`; the outputs list every face found with its index):
  # "largest" (the largest box), "central" (the box centre closest to the photo's centre), an integer INDEX
  # (faces numbered left to right by box centre, as result.json lists them), or a box "x0,y0,x1,y1" in photo
  # pixels (the detected face that overlaps it most, by IoU).
  config.face = "largest"
  # Annotated 68-point landmarks that replace detection (`datasets.read_landmarks`): a CSV of rows
  # `image,x0,y0,...,x67,y67` (0-based image pixels), a 300-W `.pts` file or a folder of them named like the
  # photos. Annotated photos are not detected; a CMS run detects the others. "" = detect every photo.
  config.landmarks = ""

  # The 3D morphable model: "default" (built from CC0 MakeHuman assets at first use) or the folder of a
  # Surrey Face Model copy (sfm_shape_3448.bin and its companions; non-commercial licence, never bundled).
  config.morphable_model = "default"

  config.occlusion = ml_collections.ConfigDict()
  # Patch side: odd crop pixels if >= 1 (e.g. 3), a fraction of the face width if < 1. The paper uses 15 px
  # patches on a 224 px face, about 7% of its width (0.07: 1 px on the gender model's 32 px chip, 3 px on
  # the 64 px age and expression crops).
  config.occlusion.patch_size = 0.07
  config.occlusion.stride = 1
  # "black" / "white" (that pixel colour run through the model's preprocessing, the paper's black square),
  # a float constant in model input space, "mean" (the crop's per-channel mean) or "blur".
  config.occlusion.baseline = "black"
  config.occlusion.batch_size = 16  # occluded images per forward pass (16 is the fastest on a 2-core CPU)
  config.occlusion.reduce = "mean"  # "mean" or "sum" of the drops of the patches covering a pixel
  # Score: "" for the model's natural score (gender: log-odds, age: expected age, expression: log-softmax),
  # else one of canonsal_jax.models.SCORE_KINDS.
  config.occlusion.score = ""
  config.occlusion.target = -1  # class index to explain; -1 = the unoccluded prediction
  config.occlusion.contrast = -1  # a second class index: explain score(target) - score(contrast); -1 = none
  # Verification saliency (embedding models such as `identity`, cosine score): a photo of the person the face is
  # compared with; the drop in cosine similarity to its descriptor is explained. "" = self-identity (the
  # unoccluded face's own descriptor). With an impostor photo too, cos(genuine) - cos(impostor) is explained:
  # what makes the face this person rather than that one.
  config.occlusion.reference = ""
  config.occlusion.impostor = ""
  # Adaptive drill-down (`canonsal_jax.drill_down`): a coarse sweep over every `coarse_every`-th row and column
  # of the patch grid, then the fine grid's patches where the coarse map is salient, `fine_fraction` of the grid
  # at most. Pixels all of whose patches ran get exactly the fine sweep's value, the rest the mean of their
  # patches' drops, estimated where a patch did not run; the outputs say which and how many. Off (the exact
  # sweep) by default: BENCHMARKS.md gives its speed and fidelity.
  config.occlusion.drill_down = ml_collections.ConfigDict()
  config.occlusion.drill_down.enabled = False
  config.occlusion.drill_down.coarse_every = 2  # the coarse lattice: every 2nd row and column of patch centres
  config.occlusion.drill_down.fine_fraction = 0.3  # the fine stage's budget, a share of the grid's patches
  # Optionally a middle stage between the two: `middle_fraction` of the grid on every `middle_every`-th row and
  # column (0: none; else strictly between 1 and coarse_every), where the estimated map is salient.
  config.occlusion.drill_down.middle_every = 0
  config.occlusion.drill_down.middle_fraction = 0.0
  # The fine budget in this many rounds, each picking on the map with the drops of the rounds before it.
  config.occlusion.drill_down.fine_rounds = 1

  # What makes the crop heatmap: "occlusion" (the paper's method), or a rival from canonsal_jax.attribution
  # ("vanilla_gradient", "integrated_gradients", "grad_cam", "grad_cam_plus_plus", "score_cam", "rise"), carried
  # through the same canonical pipeline so comparisons are like for like (a canonical Grad-CAM map). Rivals
  # explain the same score and target as `occlusion` (config.occlusion.score / target / contrast / reference).
  config.explainer = "occlusion"
  config.attribution = ml_collections.ConfigDict()
  config.attribution.baseline = "black"  # integrated gradients' start, Score-CAM's and RISE's fill (as occlusion)
  config.attribution.steps = 32  # integrated gradients: quadrature nodes
  config.attribution.num_masks = 2000  # RISE: random masks
  config.attribution.seed = 0  # RISE: mask seed
  config.attribution.batch_size = 16  # inputs per forward pass

  # Canonical Image Saliency: the crop heatmap carried onto the 3DMM's texture through the fitted mesh.
  config.cis = ml_collections.ConfigDict()
  config.cis.texture_size = 0  # texture side in texels; 0 = what the model crop resolves on this 3DMM's UV layout
  config.cis.cosine_weight = False  # weight texels by cos(view angle), so grazing views count less
  config.cis.render_size = 512  # side of the canonical face render in figures, pixels (shown at ~3.4 in, 150 dpi)

  # Canonical Model Saliency over a dataset.
  config.cms = ml_collections.ConfigDict()
  # A folder, a .txt list or a glob of photos; "builtin:lfw" (the astronaut and scikit-image's 100 LFW face
  # crops, upscaled) or "builtin:photos" (9 real colour photos); "" = "builtin:lfw".
  config.cms.dataset = ""
  config.cms.min_count = 1  # written maps show texels seen by at least this many images (the rest: no data)
  config.cms.normalisation = "max_abs"  # per-image normaliser: "none", "max_abs" or "sum_abs" (see cms.py)
  config.cms.group_by_prediction = True  # also one CMS per predicted class (classifiers; not an expected age)
  config.cms.checkpoint_every = 8  # images between atomic checkpoints (a resumed run equals an uninterrupted one)
  config.cms.max_images = 0  # process at most this many new images in this run (0 = all); rerun to go on
  # Host workers decoding photos and detecting faces ahead of the device stages: "processes" (spawned; each photo
  # is copied back) or "threads" (dlib releases the GIL while it detects). On the 2-core machine of BENCHMARKS.md
  # ("The host pipeline") 2 processes detect 1.84x as fast as 1, 2 threads 1.47x as fast as 1, and a whole run
  # with 2 processes beats one with 2 threads. How many (0 = the cores this process may use); how many photos
  # ahead of the device at most (0 = max(8, 2 x workers, 2 x the faces of one device batch); bounds host memory).
  config.cms.host_pool = "processes"
  config.cms.host_workers = 0
  config.cms.prefetch = 0
  # Faces per device in the batched device programs (sweep, fit, rasterisation, texture sampling): a batch holds
  # face_batch x local devices faces, the last one padded. 0 = one face at a time through `cis_face`.
  config.cms.face_batch = 8
  # A CSV of true labels, rows `path_or_basename,label` (paths relative to the CSV's folder): adds the groups
  # "label_<label>", and "correct" / "misclassified" (prediction equal to the label, case-insensitive). "" = none.
  config.cms.labels_csv = ""
  # Also keep each accumulated image's CIS texture and weight as textures/<index>.npz (for texel-level
  # permutation tests and report examples; ~T*T*8 bytes per image before compression).
  config.cms.save_textures = False

  # What the per-image runs write besides their summaries and figures.
  config.outputs = ml_collections.ConfigDict()
  # heatmap_image.npy: the crop heatmap carried back onto the photo, float32 at the photo's size (96 MB for a
  # 6000x4000 photo; NaN outside the crop). heatmap.npy (crop size) and result.json's crop_from_image hold it too.
  config.outputs.heatmap_image = False

  # Figures (overlay.png, cis.png, pair.png, cms_<group>.png; `canonsal_jax.viz`): one colour scale per figure
  # with a colour bar naming the unit, labelled panels, a key for no data.
  config.figures = ml_collections.ConfigDict()
  config.figures.dpi = 150  # dots per inch (png; the pixel size of maps embedded in svg/pdf)
  config.figures.format = "png"  # "png", or vector "svg" / "pdf" (the same names with that suffix)
  return config


class ConfigError(ValueError):
  """A config value that cannot work: the message names the key (as ``--config.<key>=<value>``) and what it takes.

  Attributes:
    key: the dotted key, e.g. "occlusion.patch_size".
    value: the value refused.
    reason: what is wrong and what the key accepts.
  """

  def __init__(self, key: str, value: Any, reason: str):
    super().__init__(f"--config.{key}={show(value)}: {reason}")
    self.key, self.value, self.reason = key, value, reason

  def __reduce__(self):
    return type(self), (self.key, self.value, self.reason)


def show(value: Any) -> str:
  """A config value as it is written on the command line (``3`` for 3.0, ``''`` for an empty string)."""
  if isinstance(value, float) and value.is_integer():
    return str(int(value))
  if isinstance(value, str):
    return value or "''"
  return str(value)


def flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> list[tuple[str, Any]]:
  """`(dotted key, value)` of every leaf of a config, sorted by key."""
  items = []
  for key, value in sorted(config.items()):
    if isinstance(value, ml_collections.ConfigDict):
      items.extend(flat_items(value, f"{prefix}{key}."))
    else:
      items.append((f"{prefix}{key}", value))
  return items


def _is_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _share(meaning: str) -> Callable[[Any], str | None]:
  def check(value: Any) -> str | None:
    return None if _is_number(value) and 0 <= value <= 1 else f"must be a number in [0, 1]{meaning}"

  return check


def _integer(minimum: int, meaning: str = "") -> Callable[[Any], str | None]:
  def check(value: Any) -> str | None:
    return None if _is_int(value) and value >= minimum else f"must be an integer >= {minimum}{meaning}"

  return check


def _one_of(values: tuple[str, ...], meaning: str = "") -> Callable[[Any], str | None]:
  def check(value: Any) -> str | None:
    if isinstance(value, str) and value in values:
      return None
    return f"must be one of {', '.join(map(show, values))}{meaning}"

  return check


def _flag(value: Any) -> str | None:
  return None if isinstance(value, bool) else "must be True or False"


def _text(value: Any) -> str | None:
  return None if isinstance(value, str) else "must be a string"


def _number(value: Any) -> str | None:
  return None if _is_number(value) else "must be a finite number"


def _baseline(value: Any) -> str | None:
  if isinstance(value, str):
    try:
      float(value)
      return None if math.isfinite(float(value)) else _BASELINE_VALUES
    except ValueError:
      return None if value in BASELINES else _BASELINE_VALUES
  if isinstance(value, (list, tuple)):
    return None if value and all(_is_number(v) for v in value) else _BASELINE_VALUES
  return None if _is_number(value) else _BASELINE_VALUES


_BASELINE_VALUES = (
  f"must be one of {', '.join(BASELINES)} (black and white: that pixel colour run through the model's "
  "preprocessing; mean: the crop's mean colour; blur: the crop blurred) or a number (a constant in model input space)"
)


def _model(value: Any) -> str | None:
  if isinstance(value, str) and (value in BUILTIN_MODELS or ":" in value):
    return None
  # A name given to `canonsal_jax.models.register` (that module is loaded by then; not imported here, which keeps
  # validation free of JAX).
  registry = sys.modules.get("canonsal_jax.models")
  if isinstance(value, str) and registry is not None and value in registry.names():
    return None
  return (
    f"must be a built-in model ({', '.join(BUILTIN_MODELS)}) or package.module:factory, PATH.py:factory or "
    "onnx:PATH (--list_models describes them)"
  )


FACE_RULES = ("largest", "central")  # faces.FACE_RULES


def parse_face(value: Any) -> str | int | tuple[float, float, float, float]:
  """`config.face` as `faces.choose_face` takes it: a rule name, an index, or a box `(x0, y0, x1, y1)`.

  Raises:
    ValueError: the value is none of these (the message says what the key accepts).
  """
  accepts = (
    f"must be {' or '.join(FACE_RULES)}, a face index (0, 1, ...: left to right) or a box x0,y0,x1,y1 in photo pixels"
  )
  if _is_int(value) and value >= 0:
    return int(value)
  if not isinstance(value, str):
    raise ValueError(accepts)
  text = value.strip()
  if text in FACE_RULES:
    return text
  if text.isdigit():
    return int(text)
  parts = text.split(",")
  if len(parts) == 4:
    try:
      box = tuple(float(v) for v in parts)
    except ValueError:
      raise ValueError(accepts) from None
    if not all(math.isfinite(v) for v in box):
      raise ValueError(accepts)
    if box[2] <= box[0] or box[3] <= box[1]:
      raise ValueError("a box x0,y0,x1,y1 needs x1 > x0 and y1 > y0 (left, top, right, bottom in photo pixels)")
    return box
  raise ValueError(accepts)


def _face(value: Any) -> str | None:
  try:
    parse_face(value)
  except ValueError as e:
    return str(e)
  return None


def _patch_size(value: Any, model: str) -> str | None:
  fraction = "or a fraction of the face width below 1 (the paper's 0.07)"
  crop = BUILTIN_MODELS[model].crop_size if model in BUILTIN_MODELS else None
  if not _is_number(value) or value <= 0:
    return f"must be positive: an odd number of crop pixels (3, 5, ...) {fraction}"
  if crop is not None and value > crop:
    return f"larger than the {model} model's {crop} px crop; give an odd size up to {crop - 1 + crop % 2} {fraction}"
  if value >= 1 and (value != int(value) or int(value) % 2 == 0):
    below = 2 * math.floor((value - 1) / 2) + 1
    return f"a size in pixels must be an odd integer ({below} or {below + 2}) {fraction}"
  return None


# One check per key of `default_config()` (tests/test_config.py keeps the two in step): the reason a value is
# refused, or None. Keys that depend on others (the patch against the model's crop) are checked in `validate`.
_CHECKS: dict[str, Callable[[Any], str | None]] = {
  "model": _model,
  "model_card": lambda v: (
    None if isinstance(v, str) else "must be the path of a JSON model card, or '' (beside the model)"
  ),
  "detector": _one_of(DETECTORS, " (dlib's HOG detector, or its CNN: slower, finds harder faces)"),
  "upsample": _integer(0, " (image pyramid upsampling; more finds smaller faces)"),
  "detector_threshold": _number,
  "detection_cache": _flag,
  "face": _face,
  "landmarks": _text,
  "morphable_model": lambda v: None if isinstance(v, str) and v else 'must be "default" or a Surrey Face Model folder',
  "occlusion.patch_size": lambda v: None,  # in `validate`: it depends on the model's crop
  "occlusion.stride": _integer(1, " (the patch grid's step, crop pixels)"),
  "occlusion.baseline": _baseline,
  "occlusion.batch_size": _integer(1, " (occluded images per forward pass)"),
  "occlusion.reduce": _one_of(REDUCTIONS),
  "occlusion.score": _one_of(("", *SCORE_KINDS), " ('': the model's own score)"),
  "occlusion.target": _integer(-1, " (a class index; -1: the predicted class)"),
  "occlusion.contrast": _integer(-1, " (a second class index; -1: none)"),
  "occlusion.reference": _text,
  "occlusion.impostor": _text,
  "occlusion.drill_down.enabled": _flag,
  "occlusion.drill_down.coarse_every": _integer(
    1, " (the coarse lattice: every n-th row and column of patch centres; 1 runs the whole grid in stage 1)"
  ),
  "occlusion.drill_down.fine_fraction": _share(" (the fine stage's budget, a share of the grid's patches)"),
  "occlusion.drill_down.middle_every": _integer(
    0, " (a middle stage's lattice, strictly between 1 and coarse_every; 0: no middle stage)"
  ),
  "occlusion.drill_down.middle_fraction": _share(" (the middle stage's budget, a share of the grid's patches)"),
  "occlusion.drill_down.fine_rounds": _integer(
    1, " (the fine budget's rounds, each picking on the map with the drops of the rounds before it)"
  ),
  "explainer": _one_of(("occlusion", *ATTRIBUTION_METHODS)),
  "attribution.baseline": _baseline,
  "attribution.steps": _integer(1),
  "attribution.num_masks": _integer(1),
  "attribution.seed": _integer(0),
  "attribution.batch_size": _integer(1, " (inputs per forward pass)"),
  "cis.texture_size": _integer(0, " (texels; 0: what the model's crop resolves)"),
  "cis.cosine_weight": _flag,
  "cis.render_size": _integer(1, " (pixels)"),
  "cms.dataset": _text,
  "cms.min_count": _integer(1),
  "cms.normalisation": _one_of(NORMALISATIONS),
  "cms.group_by_prediction": _flag,
  "cms.checkpoint_every": _integer(1, " (images)"),
  "cms.max_images": _integer(0, " (0: all)"),
  "cms.host_pool": _one_of(HOST_POOLS, " (where photos are decoded and faces detected)"),
  "cms.host_workers": _integer(0, " (0: this host's cores)"),
  "cms.prefetch": _integer(0, " (photos ahead of the device; 0: automatic)"),
  "cms.face_batch": _integer(0, " (faces per device; 0: one at a time)"),
  "cms.labels_csv": _text,
  "cms.save_textures": _flag,
  "outputs.heatmap_image": _flag,
  "figures.dpi": lambda v: (
    None
    if _is_int(v) and FIGURE_DPI[0] <= v <= FIGURE_DPI[1]
    else f"must be an integer in [{FIGURE_DPI[0]}, {FIGURE_DPI[1]}] (dots per inch)"
  ),
  "figures.format": _one_of(FIGURE_FORMATS, " (png, or vector svg / pdf)"),
}


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every value of a config before anything is loaded, detected or computed.

  Every script calls it on its resolved config, and the library's entry points (`pipeline.explain_image`,
  `cis_image`, `fit_image`, `runs.run_cms`, `verification.verify_pair`) on theirs. What needs the model itself
  (a user's model's crop, its class count) is checked where the model is loaded, with the same kind of message.

  Raises:
    ConfigError: the first bad value, naming its key, the value and what the key accepts.
  """
  values = dict(flat_items(config))
  for key, check in _CHECKS.items():
    reason = check(values[key])
    if reason is not None:
      raise ConfigError(key, values[key], reason)
  reason = _patch_size(values["occlusion.patch_size"], values["model"])
  if reason is not None:
    raise ConfigError("occlusion.patch_size", values["occlusion.patch_size"], reason)
  middle, coarse = values["occlusion.drill_down.middle_every"], values["occlusion.drill_down.coarse_every"]
  if middle and not 1 < middle < coarse:
    raise ConfigError(
      "occlusion.drill_down.middle_every",
      middle,
      f"must be 0 (no middle stage) or lie strictly between 1 and occlusion.drill_down.coarse_every={coarse}",
    )
  if values["occlusion.drill_down.enabled"] and values["occlusion.reduce"] != "mean":
    raise ConfigError(
      "occlusion.reduce",
      values["occlusion.reduce"],
      "must be mean with --config.occlusion.drill_down.enabled=True (a sum over the patches that ran is not "
      "comparable between exact and coarse pixels)",
    )
  if values["occlusion.impostor"] and not values["occlusion.reference"]:
    raise ConfigError(
      "occlusion.impostor", values["occlusion.impostor"], "needs --config.occlusion.reference (the genuine photo) too"
    )
