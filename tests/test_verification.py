"""Verification saliency with the identity model: references, the genuine-minus-impostor contrast, pair maps."""

import json
import pathlib

import numpy as np
import pytest

from canonsal_jax import config as config_lib
from canonsal_jax import datasets, faces, fileio, pipeline, runs, verification
from tests.tolerance import rounding_atol


@pytest.fixture(scope="module")
def photos():
  named = {pathlib.Path(p).stem.rsplit("_", 1)[-1]: p for p in datasets.builtin_dataset("photos")}
  return {k: named[k] for k in ("obama", "obama2", "biden")}


def _config(**occlusion):
  config = config_lib.default_config()
  config.model = "identity"
  config.occlusion.stride = 16  # ~100 occluded chips per face: enough to test, cheap on a 2-core CPU
  config.occlusion.update(occlusion)
  return config


@pytest.fixture(scope="module")
def embeddings(photos):
  config = _config()
  return {k: pipeline.embed_image(config, p) for k, p in photos.items()}


def _cos(a, b):
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_distances_decide_like_dlib(embeddings):
  same = np.linalg.norm(embeddings["obama"] - embeddings["obama2"])
  different = np.linalg.norm(embeddings["obama"] - embeddings["biden"])
  assert same < verification.DLIB_THRESHOLD < different


@pytest.mark.slow
def test_reference_and_contrast_scores_and_maps(photos, embeddings):
  """The probe's unoccluded score is its cosine to the reference; the contrast map is the difference of the two
  reference maps (drops are linear in the score), whether references come from the config or as targets."""
  config = _config()
  pixels = pipeline.load_input(photos["obama"], None)[1]
  face = pipeline.detect_face(config, pixels, "obama", None)
  ref, imp = embeddings["obama2"], embeddings["biden"]
  genuine = pipeline.explain_face(config, pixels, face, "obama", target=ref)
  impostor = pipeline.explain_face(config, pixels, face, "obama", target=imp)
  contrast = pipeline.explain_face(config, pixels, face, "obama", target=np.stack([ref, imp]))
  probe = embeddings["obama"]
  np.testing.assert_allclose(genuine.score, _cos(probe, ref), atol=1e-5)
  np.testing.assert_allclose(contrast.score, _cos(probe, ref) - _cos(probe, imp), atol=1e-5)
  assert contrast.score_kind == "cosine contrast"
  # Cosine scores lie in [-1, 1]: each of the three maps is off by at most the rounding of scores of 1.
  atol = rounding_atol(1.0)
  np.testing.assert_allclose(contrast.heatmap, genuine.heatmap - impostor.heatmap, atol=3 * atol)
  by_config = pipeline.explain_face(
    _config(reference=photos["obama2"], impostor=photos["biden"]), pixels, face, "obama"
  )
  np.testing.assert_allclose(by_config.heatmap, contrast.heatmap, atol=atol)
  self_map = pipeline.explain_face(config, pixels, face, "obama")
  np.testing.assert_allclose(self_map.score, 1.0, atol=1e-5)
  assert not np.allclose(self_map.heatmap, genuine.heatmap, atol=1e-3 * np.abs(genuine.heatmap).max())


@pytest.mark.slow
def test_pair_maps(photos, tmp_path):
  pair = verification.verify_pair(_config(), photos["obama"], photos["obama2"], impostor=photos["biden"])
  assert pair.same_person and pair.distance < pair.threshold
  assert pair.probe.occlusion.score_kind == "cosine contrast"
  assert pair.reference.occlusion.score_kind == "cosine"
  np.testing.assert_allclose(pair.reference.occlusion.score, pair.cosine, atol=1e-5)
  np.testing.assert_allclose(pair.probe.occlusion.score, pair.cosine - pair.impostor_cosine, atol=1e-5)
  summary = verification.write_pair(pair, tmp_path, render_size=96)
  for path in ("pair.png", "pair.json", "probe/cis.png", "probe/cis_texture.npz", "reference/cis.json"):
    assert (tmp_path / path).is_file(), path
  saved = json.loads((tmp_path / "pair.json").read_text())
  assert saved["same_person"] is True and saved["impostor"].endswith("biden.jpg")
  assert saved["distance"] == pytest.approx(summary["distance"])
  # One scale for both sides: over both crop heatmaps (covered pixels) and both canonical maps.
  shown = [np.abs(c.texture[c.weight > 0]).max() for c in (pair.probe, pair.reference)]
  shown += [np.abs(c.occlusion.heatmap[c.occlusion.count > 0]).max() for c in (pair.probe, pair.reference)]
  assert saved["shared_vmax"] == pytest.approx(max(shown))


def test_bad_settings_and_inputs(photos, tmp_path):
  config = _config(reference=photos["obama2"])
  config.model = "gender"
  with pytest.raises(ValueError, match="cosine score"):
    pipeline.explain_image(config, photos["obama"])
  with pytest.raises(ValueError, match=r"--config\.occlusion\.impostor=.*needs --config\.occlusion\.reference"):
    pipeline.explain_image(_config(impostor=photos["biden"]), photos["obama"])
  gender = _config()
  gender.model = "gender"
  with pytest.raises(ValueError, match="embedding model"):
    verification.verify_pair(gender, photos["obama"], photos["obama2"])
  blank = tmp_path / "blank.png"
  fileio.save_png(blank, np.full((200, 200, 3), 128, np.uint8))
  with pytest.raises(faces.NoFaceError, match=r"reference photo .*blank\.png"):
    pipeline.explain_image(_config(reference=str(blank)), photos["obama"])


@pytest.mark.slow
def test_identity_cms_against_a_reference(photos, tmp_path):
  """A dataset CMS of verification saliency: every face explained against one reference photo, batched."""
  config = _config(reference=photos["obama2"])
  config.cms.face_batch = 2
  acc = runs.run_cms(config, tmp_path, dataset=[photos["obama"], photos["biden"]])
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["images_accumulated"] == 2, summary["skipped"]
  assert acc.groups() == ["all"]  # an embedding model has no predicted class
  records = json.loads((tmp_path / "records.json").read_text())["records"]
  score = {pathlib.Path(r["name"]).name.rsplit("_", 1)[-1]: r["score"] for r in records}
  assert score["obama.jpg"] > score["biden.jpg"]  # cosine to the reference: the same person is closer
