"""Rival saliency methods carried through the canonical pipeline (a canonical Grad-CAM map, like for like)."""

import json

import numpy as np
import pytest

from canonsal_jax import attribution, faces, models, occlusion, outputs, pipeline, runs
from canonsal_jax import config as config_lib
from canonsal_jax.evidence import synthetic


def _config(explainer):
  config = config_lib.default_config()
  config.model = "gender"
  config.explainer = explainer
  config.attribution.num_masks = 64
  config.attribution.steps = 8
  return config


@pytest.mark.parametrize("explainer", ["grad_cam", "integrated_gradients"])
def test_rival_cis_is_the_method_carried_onto_the_texture(explainer):
  config = _config(explainer)
  result = pipeline.cis_image(config)  # the astronaut
  occ = result.occlusion
  assert occ.method == explainer and occ.num_patches == 0 and (occ.count == 1).all()
  model = models.load("gender")
  x = model.preprocess(occ.crop)[None]
  score = occlusion.Score.for_model(model)
  target = score.default_target(model.apply_fn(model.params, x)[0])
  settings = {"steps": 8, "baseline": pipeline.model_baseline(model, "black")} if explainer != "grad_cam" else {}
  want = np.asarray(attribution.attribute(explainer, model, model.params, x, score, target, **settings))[0]
  np.testing.assert_allclose(occ.heatmap, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  # The same texture sampler as the occlusion heatmap: carrying the map again gives the CIS texture.
  texture, weight = synthetic.crop_texture(result, occ.heatmap, occ.count > 0)
  np.testing.assert_array_equal(weight, result.weight)
  np.testing.assert_allclose(texture, result.texture, atol=1e-6 * np.abs(want).max())
  assert (result.weight > 0).sum() > 100 and np.abs(result.texture).max() > 0
  with pytest.raises(faces.NoFaceError):
    pipeline.cis_image(config, np.full((64, 64, 3), 128, np.uint8), name="grey")


def test_rival_cms_and_bad_explainer(tmp_path):
  config = _config("vanilla_gradient")
  config.cms.max_images = 3
  config.cms.save_textures = True
  acc = runs.run_cms(config, tmp_path, dataset="builtin:lfw")
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["images_seen"] == 3 and summary["face_batch"] == 0  # rivals go one face at a time
  assert acc.num_images("all") >= 2 and (tmp_path / "cms_all.png").is_file()
  # The saved per-image textures rebuild the CMS: sum(w * v / normaliser) / sum(w).
  records = [r for r in acc.records() if r["status"] == "ok"]
  textures, weights = outputs.load_textures(tmp_path, [r["index"] for r in records])
  norms = np.array([r["normaliser"] for r in records])[:, None, None]
  values = np.where(weights > 0, textures, 0.0).astype(np.float64)
  num, den = (weights * values / norms).sum(0), weights.astype(np.float64).sum(0)
  mean, valid = acc.mean("all")
  np.testing.assert_allclose(mean[valid], (num / np.where(den > 0, den, 1))[valid], rtol=1e-9, atol=1e-12)
  skipped = [r["index"] for r in acc.records() if r["status"] != "ok"]
  if skipped:
    with pytest.raises(FileNotFoundError, match="save_textures"):
      outputs.load_textures(tmp_path, skipped)
  with pytest.raises(ValueError, match=r"--config\.explainer=lime: must be one of occlusion, .*grad_cam"):
    pipeline.explain_image(_config("lime"))
