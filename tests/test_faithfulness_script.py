"""End-to-end: scripts/faithfulness.py on three faces against a small CMS made from other images."""

import csv
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from canonsal_jax import assets, canonical, cms, datasets, fileio, models, pipeline
from canonsal_jax.evidence import faithfulness, metrics

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "faithfulness.py"


def _test_images() -> list[str]:
  lfw = datasets.builtin_dataset("lfw")
  return [str(fileio.default_image_path()), lfw[1], lfw[2]]  # the astronaut, lfw_000, lfw_001


def _constant_cms(path: pathlib.Path, names: list[str]) -> None:
  """A CMS whose texture is 1 on the whole UV layout of the default 3DMM, "made" from images named `names`.

  Mapped back onto any face it is uniform on the face's front-facing mesh pixels: the face-mask control.
  """
  model3d = pipeline.load_morphable("default")
  size = canonical.default_texture_size(models.load("gender").crop.size, model3d)
  layout = (np.asarray(canonical.model_uv_raster(model3d, size).tri_id) >= 0).astype(np.float32)
  acc = cms.CMSAccumulator(cms.CMSSettings(size, normalisation="none"))
  for i, name in enumerate(names):
    acc.add(i, name, layout.copy(), layout, group="all", record={"prediction": "female", "score": 1.0})
  acc.save(path / "cms.npz")


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, CANONSAL_CACHE_DIR=str(assets.cache_dir()))
  env["JAX_COMPILATION_CACHE_DIR"] = str(assets.cache_dir() / "jax_compilation_cache")  # as conftest.py
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return subprocess.run([sys.executable, str(_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_overlapping_test_images_are_refused(tmp_path):
  images = _test_images()
  _constant_cms(tmp_path, ["/elsewhere/other.png", "/data/" + pathlib.Path(images[1]).name])
  with pytest.raises(faithfulness.OverlapError, match=r"lfw_000\.png"):
    faithfulness.check_disjoint(faithfulness.load_cms(tmp_path), images)
  faithfulness.check_disjoint(faithfulness.load_cms(tmp_path), [images[0], images[2]])  # disjoint: fine
  listing = tmp_path / "test.txt"
  listing.write_text("\n".join(images) + "\n")
  proc = _run(f"--images={listing}", f"--cms={tmp_path}", f"--out_dir={tmp_path / 'out'}")
  assert proc.returncode == 1
  assert "among the CMS's images" in proc.stderr and "lfw_000.png" in proc.stderr
  assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_faithfulness_script_writes_the_metric_table(tmp_path):
  images = _test_images()
  _constant_cms(tmp_path, [f"/elsewhere/face_{i}.png" for i in range(3)])
  listing = tmp_path / "test.txt"
  listing.write_text("\n".join(images) + "\n")
  out = tmp_path / "eval"
  proc = _run(
    f"--images={listing}",
    f"--cms={tmp_path / 'cms.npz'}",
    f"--out_dir={out}",
    "--methods=cms,occlusion,grad_cam",
    "--steps=8",
    "--max_images=3",
    "--config.occlusion.patch_size=3",
    "--config.occlusion.stride=2",
    "--protocol=all",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with (out / "metrics.csv").open() as f:
    rows = {row["method"]: row for row in csv.DictReader(f)}
  assert list(rows) == ["cms", "occlusion", "grad_cam", "face_mask", "gaussian"]
  assert [rows[m]["kind"] for m in rows] == ["method"] * 3 + ["control"] * 2
  table = json.loads((out / "metrics.json").read_text())
  assert len(table["images"]) + len(table["skipped"]) == 3 and len(table["images"]) >= 2
  for row in table["rows"]:
    for key in ("average_drop_pct", "deletion_auc_blur", "insertion_auc_constant", "mean_mass"):
      assert math.isfinite(row[key]), (row["method"], key)
    assert 0 <= row["average_drop_pct"] <= 100 and 0 <= row["win_pct"] <= 100
    # Every map hides the same mass (10% of the 32 x 32 crop) unless it has fewer positive pixels than that.
    assert row["mean_mass"] == pytest.approx(0.1 * 32 * 32, rel=1e-3)
  assert sum(row["win_pct"] for row in table["rows"]) == pytest.approx(100.0)
  # A constant CMS carried back is the face mask (up to back-facing mesh pixels), so it scores like it.
  by_method = {row["method"]: row for row in table["rows"]}
  assert by_method["cms"]["average_drop_pct"] == pytest.approx(by_method["face_mask"]["average_drop_pct"], abs=2.0)
  assert table["spearman_between_methods"]["grad_cam"]["grad_cam"] == pytest.approx(1.0)
  assert -1 <= by_method["grad_cam"]["randomisation_spearman"] <= 1
  assert isinstance(by_method["grad_cam"]["beats_controls"], bool) and by_method["gaussian"]["beats_controls"] is None
  assert rows["cms"]["drop_p_vs_cms_random"] == ""  # no randomised CMS given
  assert len(table["per_image"]["average_drop"]["cms"]) == len(table["images"])
  # The paper's table, beside it: the CMS against the three CAM methods, whatever --methods said.
  paper = table["paper"]
  assert [row["method"] for row in paper["rows"]] == list(faithfulness.PAPER_METHODS)
  assert paper["paper_as_published"] is False
  masses = [row["mean_mass"] for row in paper["rows"]]
  assert masses == pytest.approx([masses[0]] * 4, rel=1e-4)  # every map hides the CMS's own mass
  assert masses[0] > 0.1 * 32 * 32  # a uniform CMS on the face: the face's pixels, not a tenth of the crop
  for row in paper["rows"]:
    for figure in ("average_drop_pct", "increase_in_confidence_pct", "win_pct"):
      lo, hi = row[f"{figure}_ci"]
      assert 0 <= lo <= row[figure] <= hi <= 100, (row["method"], figure)
  assert sum(row["win_pct"] for row in paper["rows"]) == pytest.approx(100.0)
  raw = [c["p_value"] for c in paper["comparisons"]]
  assert len(raw) == 9  # Holm over the 9 tests, by definition: k-th smallest p times (9 - k), running max
  ranked = sorted(range(9), key=lambda i: raw[i])
  want = {i: min(1.0, max((9 - k) * raw[j] for k, j in enumerate(ranked[: r + 1]))) for r, i in enumerate(ranked)}
  assert [c["p_holm"] for c in paper["comparisons"]] == pytest.approx([want[i] for i in range(9)])
  assert len(paper["per_image"]["occluded_score"]["score_cam"]) == len(table["images"])
  # The other variant of the paper's protocol, for the defect's effect: the same maps, the same CMS mass.
  other = table["paper_other_variant"]
  assert other["paper_as_published"] is True and [r["mean_mass"] for r in other["rows"]] == pytest.approx(masses)
  # The headline: a blurred photo, every map (controls too) the same mass, five tested figures.
  headline = table["headline"]
  assert [row["method"] for row in headline["rows"]] == ["cms", "occlusion", "grad_cam", "face_mask", "gaussian"]
  assert headline["blur_sigma_px"] == pytest.approx(2.0) and "pixel space" in headline["substitute"]
  for row in headline["rows"]:
    assert row["mean_mass"] == pytest.approx(0.1 * 32 * 32, rel=1e-3)
    for figure in metrics.HEADLINE_FIGURES:
      lo, hi = row[f"{figure}_ci"]
      assert lo - 1e-9 <= row[figure] <= hi + 1e-9, (row["method"], figure)
  assert len(headline["comparisons"]) == 4 * 5
  with (out / "headline.csv").open() as f:
    assert [row["method"] for row in csv.DictReader(f)] == [row["method"] for row in headline["rows"]]
  assert "headline (hidden pixels become the crop blurred in pixel space" in proc.stdout
  with (out / "paper.csv").open() as f:
    paper_rows = list(csv.DictReader(f))
  assert [row["method"] for row in paper_rows] == list(faithfulness.PAPER_METHODS)
  assert paper_rows[0]["win_pct_finding"] == "" and paper_rows[1]["win_pct_finding"] in (
    "no difference shown",
    "cms better",
    "grad_cam better",
  )


def test_a_cms_of_another_model_or_3dmm_is_refused(tmp_path):
  from canonsal_jax import config as config_lib

  acc = cms.CMSAccumulator(cms.CMSSettings(8, normalisation="none"))
  acc.add(0, "/elsewhere/a.png", np.ones((8, 8), np.float32), np.ones((8, 8), np.float32))
  acc.save(tmp_path / "cms.npz")
  with pytest.raises(ValueError, match="has 8 px textures"):
    faithfulness.run_protocol(config_lib.default_config(), cms_path=tmp_path, images=_test_images()[:1])
  fileio.save_json(tmp_path / "summary.json", {"reproducibility": {"config": {"model": "age"}}})
  with pytest.raises(ValueError, match="made with model='age'"):
    faithfulness.run_protocol(config_lib.default_config(), cms_path=tmp_path, images=_test_images()[:1])


def test_randomised_model_keeps_the_architecture_and_changes_the_outputs():
  trained, random = models.load("gender"), faithfulness.randomised_gender()
  assert random.labels == trained.labels and random.input_shape == trained.input_shape
  assert models.load("canonsal_jax.evidence.faithfulness:randomised_gender").name == "gender_randomised0"
  x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  assert not np.allclose(np.asarray(random.logits(x)), np.asarray(trained.logits(x)), atol=1e-3)
  import jax

  for a, b in zip(jax.tree.leaves(trained.params), jax.tree.leaves(random.params)):
    assert a.shape == b.shape


@pytest.mark.slow
def test_paper_protocol_alone_as_published(tmp_path):
  images = _test_images()
  _constant_cms(tmp_path, [f"/elsewhere/face_{i}.png" for i in range(3)])
  out = tmp_path / "eval"
  proc = _run(
    f"--images={images[0]}",
    f"--cms={tmp_path}",
    f"--out_dir={out}",
    "--protocol=paper",
    "--paper_as_published",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (out / "metrics.csv").exists() and (out / "paper.csv").is_file()
  table = json.loads((out / "metrics.json").read_text())
  assert table["rows"] == [] and table["paper"]["paper_as_published"] is True
  assert table["settings"]["protocol"] == "paper" and len(table["images"]) == 1
  assert "as published" in proc.stdout and "cms better than every rival" not in proc.stdout  # one face: no claim
