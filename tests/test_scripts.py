"""End-to-end: the real scripts on real photos in a temporary folder, and their one-line errors."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(script, *args, timeout=600):
  return subprocess.run(
    [sys.executable, str(ROOT / "scripts" / script), *args], capture_output=True, text=True, timeout=timeout
  )


def test_occlusion_script_on_the_astronaut(tmp_path):
  cache = tmp_path / "compiled"
  proc = _run(
    "occlusion.py",
    f"--out_dir={tmp_path}",
    "--config.occlusion.stride=2",
    "--config.occlusion.patch_size=3",
    "--config.outputs.heatmap_image=True",
    f"--compilation_cache={cache}",
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert any(cache.iterdir())  # the persistent compilation cache: the next run reuses these programs
  summary = json.loads((tmp_path / "result.json").read_text())
  assert summary["model"] == "gender" and summary["label"] == "female"
  assert summary["format"] == "canonsal_jax.occlusion_result" and summary["version"] == 1
  assert summary["num_faces"] == 1 and summary["face_index"] == 0 and summary["face_choice"] == "largest"
  heat = np.load(tmp_path / "heatmap.npy")
  count = np.load(tmp_path / "count.npy")
  assert heat.shape == count.shape == (32, 32)
  assert np.isfinite(heat).all() and np.abs(heat).max() > 0
  image_heat = np.load(tmp_path / "heatmap_image.npy")
  assert image_heat.shape == (512, 512)
  assert np.isnan(image_heat[0, 0]) and np.isfinite(image_heat[120, 220])  # corner outside the crop, face inside
  overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
  assert overlay.ndim == 3 and overlay.shape[2] == 3
  assert "female" in proc.stdout and "face 0 of 1 (largest)" in proc.stdout


@pytest.mark.parametrize(
  "args,expected",
  [
    (["--model=nope"], "--model=nope: must be a built-in model (gender, age, expression, identity)"),
    (["--config.occlusion.stride=0"], "--config.occlusion.stride=0: must be an integer >= 1"),
    (["--config.occlusion.patch_size=4"], "odd"),
  ],
)
def test_bad_flags_give_one_line_errors(tmp_path, args, expected):
  proc = _run("occlusion.py", f"--out_dir={tmp_path}", *args)
  assert proc.returncode != 0
  assert expected in proc.stderr
  assert "Traceback" not in proc.stderr


def test_stray_arguments_are_rejected(tmp_path):
  proc = _run("occlusion.py", f"--out_dir={tmp_path}", "stray")
  assert proc.returncode != 0 and "Unexpected arguments: stray" in proc.stderr


def test_no_face_and_corrupt_files_name_the_input(tmp_path):
  blank = tmp_path / "blank.png"
  Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(blank)
  proc = _run("occlusion.py", f"--out_dir={tmp_path / 'a'}", f"--image={blank}")
  assert proc.returncode == 1 and proc.stderr.splitlines() == [
    f"error: {blank}: no face found (160x120 px, hog detector, upsample=1, adjust_threshold=0.3); try "
    "--config.upsample=2 (smaller faces), --config.detector=cnn (harder faces, slower), a lower "
    "--config.detector_threshold (now 0.3; e.g. 0)"
  ]  # one line: no config dump, no platform notice, the settings to try
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  proc = _run("occlusion.py", f"--out_dir={tmp_path / 'b'}", f"--image={corrupt}")
  assert proc.returncode != 0 and "corrupt.jpg" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "b" / "result.json").exists()


@pytest.mark.slow
def test_fit_script_default_and_surrey(tmp_path, shared_dir):
  import trimesh

  for spec, vertices in (("default", None), (str(shared_dir / "assets" / "sfm"), 3448)):
    out = tmp_path / pathlib.Path(spec).name
    proc = _run("fit.py", f"--out_dir={out}", f"--morphable_model={spec}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((out / "fit.json").read_text())
    assert summary["landmark_rms_px"] < 4.0  # dlib's 68 points on a ~90 px face, fitted by the 3DMM
    assert all(abs(a) < 15 for a in summary["yaw_pitch_roll_deg"])  # the astronaut faces the camera
    mesh = trimesh.load(out / "mesh.obj", process=False)
    image_mesh = trimesh.load(out / "mesh_image.ply", process=False)
    assert len(mesh.vertices) == len(image_mesh.vertices)
    if vertices is not None:
      assert len(mesh.vertices) == vertices
    # The fitted mesh lies on the face: its image-space bounding box is inside dlib's box grown by half.
    x0, y0, x1, y1 = summary["face_box_xyxy"]
    lo, hi = image_mesh.vertices[:, :2].min(axis=0), image_mesh.vertices[:, :2].max(axis=0)
    w = x1 - x0
    assert lo[0] > x0 - w / 2 and hi[0] < x1 + w / 2 and hi[1] < y1 + w / 2
    assert lo[1] > y0 - 1.5 * w  # the default model's head reaches over the skull, the box stops at the brows
    assert (out / "overlay.png").stat().st_size > 0


def test_fit_script_missing_surrey_model_says_where(tmp_path):
  proc = _run("fit.py", f"--out_dir={tmp_path}", f"--morphable_model={tmp_path / 'nowhere'}")
  assert proc.returncode != 0 and "nowhere" in proc.stderr and "Traceback" not in proc.stderr
