"""A user's own Flax model, defined here, explained end to end through the library and the scripts."""

import json
import os
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


@pytest.mark.slow
def test_user_model_through_the_script(user_module, tmp_path):
  env = dict(os.environ, PYTHONPATH=f"{user_module}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "occlusion.py"),
      f"--out_dir={tmp_path / 'out'}",
      "--model=my_face_model:build",
      "--config.occlusion.patch_size=3",
      "--config.occlusion.stride=2",
    ],
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.loads((tmp_path / "out" / "result.json").read_text())["model"] == "tiny"
