"""A user's own Flax model, defined here, explained end to end through the library and the scripts."""

import json
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from canonsal_jax import config as config_lib
from canonsal_jax import models, pipeline

ROOT = pathlib.Path(__file__).resolve().parents[1]

USER_MODULE = textwrap.dedent(
  '''
  """A tiny face classifier in the user's own Flax NNX code."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx

  from canonsal_jax.models import CropSpec, FaceModel


  class TinyNet(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.head = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):  # [B, 32, 32, 3] -> [B, 2]
      return self.head(jnp.mean(jax.nn.relu(self.conv(x)), axis=(1, 2)))


  def build():
    graphdef, params = nnx.split(TinyNet(nnx.Rngs(0)))
    return FaceModel(
      name="tiny",
      labels=("left", "right"),
      input_shape=(32, 32, 3),
      apply_fn=lambda p, x: nnx.merge(graphdef, p)(x),
      params=params,
      preprocess_fn=lambda face: np.asarray(face, np.float32) / 127.5 - 1.0,
      crop=CropSpec("dlib_chip", 32, 0.2),
      score="log_odds",
    )


  def not_a_model():
    return 42
  '''
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
  (tmp_path / "my_face_model.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  yield tmp_path
  sys.modules.pop("my_face_model", None)


def test_user_model_through_the_library(user_module):
  model = models.load("my_face_model:build")
  assert model.name == "tiny" and model.labels == ("left", "right")
  config = config_lib.default_config()
  config.model = "my_face_model:build"
  config.occlusion.patch_size = 3.0
  config.occlusion.stride = 2
  result = pipeline.cis_image(config)
  assert result.occlusion.label in ("left", "right")
  assert np.isfinite(result.texture).all() and (result.weight > 0).sum() > 100
  assert np.abs(result.occlusion.heatmap).max() > 0


def test_a_setting_the_user_model_cannot_take_is_refused_before_any_photo_is_read(user_module, tmp_path):
  config = config_lib.default_config()
  config.model = "my_face_model:build"
  config.occlusion.patch_size = 33.0  # the table of built-in models cannot know this crop: checked once loaded
  photo = tmp_path / "not_read.png"
  with pytest.raises(
    config_lib.ConfigError,
    match=r"^--config\.occlusion\.patch_size=33: larger than the tiny model's 32 px crop; give an odd size up to 31",
  ):
    pipeline.explain_image(config, photo)
  config.occlusion.patch_size = 3.0
  config.occlusion.target = 2
  with pytest.raises(
    config_lib.ConfigError, match=r"^--config\.occlusion\.target=2: not a class index of this model \(0\.\.1, or -1\)"
  ):
    pipeline.cis_image(config, photo)


def test_bad_user_models_are_clear_errors(user_module):
  with pytest.raises(ValueError, match="not a canonsal_jax FaceModel"):
    models.load("my_face_model:not_a_model")
  with pytest.raises(ValueError, match="cannot import 'nothing'"):
    models.load("my_face_model:nothing")
  with pytest.raises(ValueError, match="cannot import"):
    models.load("no_such_module_xyz:build")


def test_user_model_from_a_file_path(tmp_path):
  (tmp_path / "face_model_file.py").write_text(USER_MODULE)
  model = models.load(f"{tmp_path / 'face_model_file.py'}:build")
  assert model.name == "tiny"
  with pytest.raises(ValueError, match=r"face_model_file\.py defines no function 'nothing'"):
    models.load(f"{tmp_path / 'face_model_file.py'}:nothing")
  with pytest.raises(ValueError, match=r"missing\.py does not exist"):
    models.load(f"{tmp_path / 'missing.py'}:build")
  (tmp_path / "broken.py").write_text("import no_such_module_xyz\n")
  with pytest.raises(ValueError, match=r"broken\.py fails to import \(ModuleNotFoundError"):
    models.load(f"{tmp_path / 'broken.py'}:build")


def test_registered_model_is_what_a_config_names(user_module):
  import my_face_model

  models.register("tiny_registered", my_face_model.build)
  config = config_lib.default_config()
  config.model = "tiny_registered"
  assert models.load_configured(config).name == "tiny"
  with pytest.raises(ValueError, match="is a built-in model's"):
    models.register("gender", my_face_model.build)


def _run_script(args, env=None):
  return subprocess.run(
    [sys.executable, str(ROOT / "scripts" / "occlusion.py"), *args],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )


@pytest.mark.slow
def test_user_model_through_the_script_by_file_path(tmp_path):
  """`--model=PATH.py:factory` needs no PYTHONPATH."""
  (tmp_path / "my_face_model.py").write_text(USER_MODULE)
  proc = _run_script(
    [
      f"--out_dir={tmp_path / 'out'}",
      f"--model={tmp_path / 'my_face_model.py'}:build",
      "--config.occlusion.patch_size=3",
      "--config.occlusion.stride=2",
    ]
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((tmp_path / "out" / "result.json").read_text())["model"] == "tiny"


@pytest.mark.slow
def test_onnx_model_through_the_script_with_its_card(tmp_path):
  """`--model=onnx:PATH --model_card=CARD`: dlib's gender network as a user's ONNX file, explained as the built-in
  port explains it (the same label)."""
  from benchmarks.baselines import face_nets
  from canonsal_jax import assets

  card = face_nets.dlib_onnx_card("gender").to_dict()
  (tmp_path / "card.json").write_text(json.dumps(card))
  model_path = tmp_path / "net.onnx"
  model_path.write_bytes(assets.path("gender-v1.onnx").read_bytes())
  common = ["--config.occlusion.stride=2"]
  proc = _run_script(
    [f"--out_dir={tmp_path / 'onnx'}", f"--model=onnx:{model_path}", f"--model_card={tmp_path / 'card.json'}", *common]
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  imported = json.loads((tmp_path / "onnx" / "result.json").read_text())
  assert imported["model"] == "gender_onnx"
  config = config_lib.default_config()
  config.occlusion.stride = 2
  port = pipeline.explain_image(config)
  assert imported["label"] == port.label
  # Without the flag the card is looked for beside the file, and its absence is one line naming the flag.
  proc = _run_script([f"--out_dir={tmp_path / 'nocard'}", f"--model=onnx:{model_path}"])
  assert proc.returncode == 1
  assert "net.json does not exist (give --model_card=PATH" in proc.stderr
