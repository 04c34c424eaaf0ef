"""`batched.FaceBatcher` through `runs.run_cms`: faces through the sweep, the fit and the texture sampler in batches
equal the per-image path; true-label groups."""

import json
import shutil

import numpy as np
import pytest

from canonsal_jax import batched, datasets, runs
from canonsal_jax import config as config_lib


def _fast_config(face_batch: int):
  config = config_lib.default_config()
  config.occlusion.patch_size = 3.0
  config.occlusion.stride = 2
  config.cms.checkpoint_every = 1
  config.cms.face_batch = face_batch
  return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """The astronaut (512 px), three LFW crops (222 px) and a corrupt file, with a labels CSV."""
  folder = tmp_path_factory.mktemp("photos")
  lfw = datasets.builtin_dataset("lfw")
  for i, name in enumerate(["a_astronaut.png", "b_lfw0.png", "c_lfw1.png", "d_lfw2.png"]):
    shutil.copy(lfw[i], folder / name)
  (folder / "e_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
  labels = folder.parent / f"{folder.name}_labels.csv"
  # By base name, by path (relative to the CSV), a label in another case; d_lfw2 is not labelled.
  labels.write_text(f"# image,label\na_astronaut.png,Female\n{folder.name}/b_lfw0.png,male\nc_lfw1.png,female\n")
  return folder, labels


@pytest.fixture(scope="module")
def cms_runs(dataset, tmp_path_factory):
  folder, labels = dataset
  out = tmp_path_factory.mktemp("runs")
  per_image = runs.run_cms(_fast_config(0), out / "per_image", dataset=str(folder))
  config = _fast_config(3)  # 4 faces: one full batch and one padded
  config.cms.labels_csv = str(labels)
  batcher = batched.FaceBatcher(config, {})  # the run's compiled programs, from their caches
  programs = {"sweep": batcher.sweep, "texture": batcher.texture}
  before = {k: f._cache_size() for k, f in programs.items()}
  in_batches = runs.run_cms(config, out / "batched", dataset=str(folder))
  compiled = {k: f._cache_size() - before[k] for k, f in programs.items()}
  return per_image, in_batches, out, compiled


@pytest.mark.slow
def test_batched_cms_equals_per_image(cms_runs):
  per_image, in_batches, out, _ = cms_runs
  summary = json.loads((out / "batched" / "summary.json").read_text())
  assert summary["images_accumulated"] == 4 and summary["images_skipped"] == 1
  assert summary["face_batch"] == 3 and summary["batches_this_run"] == 2
  assert set(summary["stage_seconds_per_batch"]) == {"sweep", "fit", "texture"}
  assert summary["images_per_second_this_run"] > 0
  a = {r["index"]: r for r in per_image.records()}
  b = {r["index"]: r for r in in_batches.records()}
  assert a.keys() == b.keys() and all(a[i]["status"] == b[i]["status"] for i in a)
  assert all(a[i].get("prediction") == b[i].get("prediction") for i in a)
  for group in per_image.groups():
    (mean_a, valid_a), (mean_b, valid_b) = per_image.mean(group), in_batches.mean(group)
    np.testing.assert_array_equal(valid_a, valid_b)
    # Not bit for bit: batching changes float rounding upstream of the exact sums. The model's forward pass on
    # a batch of faces rounds differently from one face (scores move by ~1e-6), and so does the fitter's batched
    # solve (vertices move by 1e-5 to 5e-4 px between batch sizes 1 and 4 or 8). Measured here: ~6e-6 of the
    # largest value. Not a general bound: such a move can flip a texel on a visibility boundary (seen on 1 of 88
    # faces of builtin:lfw, 3e-3 of the largest value of "all"). What is exact is the device and process count
    # at a fixed face_batch (tests/test_distributed.py).
    peak = np.abs(mean_a[valid_a]).max()
    np.testing.assert_allclose(mean_b[valid_b], mean_a[valid_a], rtol=0, atol=5e-5 * peak)


@pytest.mark.slow
def test_batched_programs_compile_once(cms_runs):
  compiled = cms_runs[3]  # two batches of 3 faces (one padded) went through each stage: at most one new program
  assert compiled["sweep"] <= 1 and compiled["texture"] <= 1, compiled


@pytest.mark.slow
def test_true_label_groups(cms_runs):
  _, in_batches, out, _ = cms_runs
  records = {r["name"].rsplit("/", 1)[-1]: r for r in in_batches.records()}
  assert records["a_astronaut.png"]["true_label"] == "Female"
  assert records["b_lfw0.png"]["true_label"] == "male"  # matched by its path relative to the CSV
  assert records["d_lfw2.png"]["true_label"] is None
  assert records["e_corrupt.jpg"]["true_label"] is None and records["e_corrupt.jpg"]["status"] == "skipped"
  groups = set(in_batches.groups())
  assert {"label_Female", "label_male", "label_female"} <= groups
  labelled = [r for r in records.values() if r["status"] == "ok" and r["true_label"] is not None]
  for r in labelled:
    correct = r["prediction"].casefold() == r["true_label"].casefold()  # "Female" matches "female"
    assert ("correct" if correct else "misclassified") in r["groups"]
  assert sum(in_batches.num_images(g) for g in ("correct", "misclassified") if g in groups) == len(labelled) == 3
  assert "correct" not in records["d_lfw2.png"]["groups"] and "misclassified" not in records["d_lfw2.png"]["groups"]
  assert (out / "batched" / "cms_label_Female.npy").is_file()


def test_read_labels_rejects_bad_rows(tmp_path):
  bad = tmp_path / "labels.csv"
  bad.write_text("a.png,x,extra\n")
  with pytest.raises(ValueError, match=r"labels\.csv:1"):
    datasets.read_labels(bad)
  bad.write_text("a.png,x\na.png,y\n")
  with pytest.raises(ValueError, match="two labels"):
    datasets.read_labels(bad)
