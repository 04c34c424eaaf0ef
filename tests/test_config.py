"""`config`: every shipped config is valid; `validate` checks every key and names it, with what it accepts; the
allowed values and the built-in models' table agree with the library they stand for."""

import importlib.util
import pathlib

import ml_collections
import pytest

from canonsal_jax import attribution, cms, datasets, faces, models, occlusion, pipeline, viz
from canonsal_jax import config as config_lib
from canonsal_jax.models import dlib_resnet, fer

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
  spec = importlib.util.spec_from_file_location(f"_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_lib.validate(module.get_config())


def test_every_key_has_a_check():
  keys = [key for key, _ in config_lib.flat_items(config_lib.default_config())]
  assert sorted(keys) == sorted(config_lib._CHECKS), "add a check for each new key to config._CHECKS"


def test_allowed_values_are_the_librarys():
  assert config_lib.DETECTORS == faces.DETECTOR_KINDS
  assert config_lib.SCORE_KINDS == models.SCORE_KINDS
  assert set(config_lib.BASELINES) == set(occlusion.BASELINES) | set(pipeline._NAMED_BASELINES)
  assert config_lib.REDUCTIONS == occlusion.REDUCTIONS
  assert config_lib.ATTRIBUTION_METHODS == tuple(attribution.METHODS)
  assert config_lib.NORMALISATIONS == cms.NORMALISATIONS
  assert config_lib.HOST_POOLS == datasets.HOST_POOLS
  assert config_lib.FIGURE_FORMATS == viz.FORMATS  # one tuple: viz reads it from config


def test_the_builtin_models_table_is_the_registry():
  assert tuple(config_lib.BUILTIN_MODELS) == models.BUILTIN
  table = config_lib.BUILTIN_MODELS
  assert table["expression"].crop_size == fer.INPUT_SIZE and table["identity"].crop_size == dlib_resnet.CHIP_SIZE
  assert table["expression"].outputs == ", ".join(fer.LABELS)
  assert str(dlib_resnet.EMBEDDING_DIM) in table["identity"].outputs
  for name in ("gender", "age"):  # dlib's ONNX models: their crop and labels come with the weights
    model = models.load(name)
    assert model.crop.size == table[name].crop_size and table[name].score.startswith(model.score)
  assert table["gender"].outputs == ", ".join(models.load("gender").labels)
  assert table["age"].outputs.startswith(f"{len(models.load('age').labels)} age bins")


def _config(key, value):
  """The default config with one value set (of any type: a config file may give a number where the default is text)."""
  config = ml_collections.ConfigDict(config_lib.default_config().to_dict(), type_safe=False)
  *parents, leaf = key.split(".")
  node = config
  for parent in parents:
    node = node[parent]
  node[leaf] = value
  return config


_FACE = "must be largest or central, a face index (0, 1, ...: left to right) or a box x0,y0,x1,y1 in photo pixels"
_PATCH = "or a fraction of the face width below 1 (the paper's 0.07)"


@pytest.mark.parametrize(
  "key,value,message",
  [
    ("occlusion.patch_size", -3.0, f"must be positive: an odd number of crop pixels (3, 5, ...) {_PATCH}"),
    ("occlusion.patch_size", 4.0, f"a size in pixels must be an odd integer (3 or 5) {_PATCH}"),
    ("occlusion.patch_size", 2.5, f"a size in pixels must be an odd integer (1 or 3) {_PATCH}"),
    ("occlusion.patch_size", 500.0, f"larger than the gender model's 32 px crop; give an odd size up to 31 {_PATCH}"),
    ("occlusion.stride", 0, "must be an integer >= 1 (the patch grid's step, crop pixels)"),
    ("occlusion.batch_size", 0, "must be an integer >= 1 (occluded images per forward pass)"),
    ("attribution.batch_size", 0, "must be an integer >= 1 (inputs per forward pass)"),
    ("occlusion.reduce", "max", "must be one of mean, sum"),
    ("detector", "mtcnn", "must be one of hog, cnn (dlib's HOG detector, or its CNN: slower, finds harder faces)"),
    ("upsample", -1, "must be an integer >= 0 (image pyramid upsampling; more finds smaller faces)"),
    ("cms.normalisation", "l2", "must be one of none, max_abs, sum_abs"),
    ("figures.dpi", 10, "must be an integer in [20, 1200] (dots per inch)"),  # the range viz.FigureSettings takes
    ("explainer", "lime", f"must be one of occlusion, {', '.join(attribution.METHODS)}"),
    ("occlusion.impostor", "b.jpg", "needs --config.occlusion.reference (the genuine photo) too"),
    ("face", "biggest", _FACE),
    ("face", "-1", _FACE),
    ("face", "1,2,3", _FACE),
    ("face", "10,10,5,20", "a box x0,y0,x1,y1 needs x1 > x0 and y1 > y0 (left, top, right, bottom in photo pixels)"),
    ("outputs.heatmap_image", "yes", "must be True or False"),
    ("occlusion.drill_down.enabled", 1, "must be True or False"),
    (
      "occlusion.drill_down.coarse_every",
      0,
      "must be an integer >= 1 (the coarse lattice: every n-th row and column of patch centres; 1 runs the whole "
      "grid in stage 1)",
    ),
    (
      "occlusion.drill_down.fine_fraction",
      1.5,
      "must be a number in [0, 1] (the fine stage's budget, a share of the grid's patches)",
    ),
    (
      "occlusion.drill_down.middle_every",
      -1,
      "must be an integer >= 0 (a middle stage's lattice, strictly between 1 and coarse_every; 0: no middle stage)",
    ),
    (
      "occlusion.drill_down.middle_every",
      2,  # the default coarse lattice is every 2nd: no room for a middle one
      "must be 0 (no middle stage) or lie strictly between 1 and occlusion.drill_down.coarse_every=2",
    ),
    (
      "occlusion.drill_down.middle_fraction",
      "0.1",
      "must be a number in [0, 1] (the middle stage's budget, a share of the grid's patches)",
    ),
    (
      "occlusion.drill_down.fine_rounds",
      0,
      "must be an integer >= 1 (the fine budget's rounds, each picking on the map with the drops of the rounds "
      "before it)",
    ),
  ],
)
def test_a_bad_value_names_its_key_and_what_it_takes(key, value, message):
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(_config(key, value))
  assert str(error.value) == f"--config.{key}={config_lib.show(value)}: {message}"
  assert error.value.key == key and error.value.value == value


@pytest.mark.parametrize("key", ["occlusion.baseline", "attribution.baseline"])
def test_a_bad_baseline_lists_every_accepted_one(key):
  with pytest.raises(config_lib.ConfigError, match=rf"^--config\.{key}=grey: must be one of black, white, mean, blur "):
    config_lib.validate(_config(key, "grey"))
  for good in ("white", "blur", "0.5", -1.0, [0.1, 0.2, 0.3]):
    config_lib.validate(_config(key, good))


def test_a_model_is_a_builtin_name_or_a_factory():
  with pytest.raises(config_lib.ConfigError, match=r"^--config\.model=nope: must be a built-in model \(gender, age, "):
    config_lib.validate(_config("model", "nope"))
  for spec in ("identity", "my.module:build", "onnx:model.onnx", "model.py:build"):
    config_lib.validate(_config("model", spec))


def test_a_patch_fraction_and_an_odd_patch_within_the_crop_are_fine():
  for size in (0.07, 0.5, 1.0, 31.0):
    config_lib.validate(_config("occlusion.patch_size", size))
  identity = _config("model", "identity")
  identity.occlusion.patch_size = 149.0  # within its 150 px crop
  config_lib.validate(identity)
  identity.occlusion.patch_size = 151.0
  with pytest.raises(
    config_lib.ConfigError, match="larger than the identity model's 150 px crop; give an odd size up to 149"
  ):
    config_lib.validate(identity)


def test_a_baseline_given_as_text_is_a_number():
  model = models.load("gender")
  assert pipeline.model_baseline(model, "0.5") == 0.5
  with pytest.raises(ValueError, match="black, white, mean, blur"):
    pipeline.model_baseline(model, "grey")


def test_face_accepts_a_rule_an_index_or_a_box():
  assert config_lib.FACE_RULES == faces.FACE_RULES
  for value, parsed in [
    ("largest", "largest"),
    ("central", "central"),
    ("2", 2),
    (3, 3),
    ("1,2,30.5,40", (1, 2, 30.5, 40)),
  ]:
    config_lib.validate(_config("face", value))
    assert config_lib.parse_face(value) == parsed


def test_drill_down_needs_the_mean_of_the_covering_patches():
  config = _config("occlusion.reduce", "sum")
  config_lib.validate(config)  # a sum is fine for the exact sweep
  config.occlusion.drill_down.enabled = True
  with pytest.raises(
    config_lib.ConfigError,
    match=r"^--config.occlusion.reduce=sum: must be mean with --config.occlusion.drill_down.enabled=True",
  ):
    config_lib.validate(config)
