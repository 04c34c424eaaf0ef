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
  proc = _run("occlusion.py", f"--out_dir={tmp_path}", "--config.occlusion.stride=2", "--config.occlusion.patch_size=3")
  assert proc.returncode == 0, proc.stderr[-2000:]
  summary = json.loads((tmp_path / "result.json").read_text())
  assert summary["model"] == "gender" and summary["label"] == "female"
  assert summary["format"] == "canonsal_jax.occlusion_result" and summary["version"] == 1
  heat = np.load(tmp_path / "heatmap.npy")
  count = np.load(tmp_path / "count.npy")
  assert heat.shape == count.shape == (32, 32)
  assert np.isfinite(heat).all() and np.abs(heat).max() > 0
  image_heat = np.load(tmp_path / "heatmap_image.npy")
  assert image_heat.shape == (512, 512)
  assert np.isnan(image_heat[0, 0]) and np.isfinite(image_heat[120, 220])  # corner outside the crop, face inside
  overlay = np.asarray(Image.open(tmp_path / "overlay.png"))
  assert overlay.ndim == 3 and overlay.shape[2] == 3
  assert "female" in proc.stdout


@pytest.mark.parametrize(
  "args,expected",
  [
    (["--model=nope"], "Unknown model 'nope'; known models: gender, age, expression"),
    (["--config.occlusion.stride=0"], "stride"),
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
  assert proc.returncode != 0 and "blank.png" in proc.stderr and "no face" in proc.stderr
  corrupt = tmp_path / "corrupt.jpg"
  corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  proc = _run("occlusion.py", f"--out_dir={tmp_path / 'b'}", f"--image={corrupt}")
  assert proc.returncode != 0 and "corrupt.jpg" in proc.stderr and "Traceback" not in proc.stderr
  assert not (tmp_path / "b" / "result.json").exists()
