"""`manifest`: one run per output folder, the same run resumes, --overwrite replaces; the scripts' one-line refusal."""

import json
import pathlib
import subprocess
import sys

import pytest

from canonsal_jax import assets, manifest
from canonsal_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _inputs(tmp_path, name="photo.jpg", content=b"pixels"):
  photo = tmp_path / name
  photo.write_bytes(content)
  return {"photo": {"path": str(photo), "sha256": assets.sha256_of(photo)}}


def _run(out, inputs, config=None, kind="occlusion", files=("result.json", "heatmap.npy"), **claim):
  """A run: claims `out`, writes `files`, finishes. Returns the manifest."""
  folder = manifest.claim(out, kind=kind, config=config or config_lib.default_config(), inputs=inputs, **claim)
  out.mkdir(parents=True, exist_ok=True)
  for name in files:
    (out / name).write_text(f"{kind} {inputs}")
  return folder.finish()


def _listing(folder):
  return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_records_its_command_config_versions_inputs_and_files(tmp_path):
  inputs = _inputs(tmp_path)
  out = tmp_path / "out"
  written = _run(out, inputs, command=["scripts/occlusion.py", "--out_dir=out"])
  saved = json.loads((out / manifest.MANIFEST).read_text())
  assert saved == written
  assert saved["format"] == "canonsal_jax.run_manifest" and saved["kind"] == "occlusion"
  assert saved["command"] == ["scripts/occlusion.py", "--out_dir=out"]
  assert saved["config"] == config_lib.default_config().to_dict()
  assert saved["inputs"] == inputs and len(saved["inputs"]["photo"]["sha256"]) == 64
  assert saved["files"] == ["heatmap.npy", "result.json"]
  assert "python" in saved["versions"] and "numpy" in saved["versions"]


def test_another_run_is_refused_naming_what_differs_and_nothing_is_written(tmp_path):
  out = tmp_path / "out"
  _run(out, _inputs(tmp_path))
  before = _listing(out)
  other_photo = _inputs(tmp_path, "other.jpg", b"other pixels")
  with pytest.raises(manifest.FolderInUseError) as error:
    manifest.claim(out, kind="occlusion", config=config_lib.default_config(), inputs=other_photo)
  assert str(error.value) == (
    f"--out_dir={out}: holds another run's outputs (other inputs; its manifest.json lists them); give --overwrite "
    "to replace them, or another folder"
  )
  config = config_lib.default_config()
  config.model, config.face = "age", "central"
  with pytest.raises(manifest.FolderInUseError, match=r"another config \(--config.face, --config.model\)"):
    manifest.claim(out, kind="occlusion", config=config, inputs=_inputs(tmp_path))
  with pytest.raises(manifest.FolderInUseError, match=r"\(a different kind of run: occlusion; "):
    manifest.claim(out, kind="cis", config=config_lib.default_config(), inputs=_inputs(tmp_path))
  assert _listing(out) == before


def test_the_same_run_may_run_again_and_a_cms_run_resumes(tmp_path):
  out = tmp_path / "cms"
  inputs = {"images": {"spec": "photos/", "count": 3, "sha256": "ab" * 32}}
  config = config_lib.default_config()
  first = manifest.claim(out, kind="cms", config=config, inputs=inputs)
  assert not first.resumed
  first.write()  # at its start, as the CMS script does; then killed after its first checkpoint
  out.joinpath("cms.npz").write_bytes(b"checkpoint")
  config.cms.max_images, config.cms.host_workers = 5, 1  # speed and time-boxing: still the same run
  again = manifest.claim(out, kind="cms", config=config, inputs=inputs)
  assert again.resumed and out.joinpath("cms.npz").read_bytes() == b"checkpoint"
  out.joinpath("cms_all.npy").write_bytes(b"map")
  assert again.finish()["files"] == ["cms.npz", "cms_all.npy"]
  config.cms.normalisation = "none"  # changes the maps: another run
  with pytest.raises(manifest.FolderInUseError, match=r"--config\.cms\.normalisation"):
    manifest.claim(out, kind="cms", config=config, inputs=inputs)


def test_overwrite_removes_the_previous_runs_files_and_keeps_the_rest(tmp_path, caplog):
  out = tmp_path / "out"
  _run(out, _inputs(tmp_path), files=("result.json", "heatmap_image.npy", "heatmap.npy"))
  out.joinpath("notes.txt").write_text("mine")
  other = _inputs(tmp_path, "other.jpg", b"other")
  with caplog.at_level("WARNING"):
    folder = manifest.claim(out, kind="occlusion", config=config_lib.default_config(), inputs=other, overwrite=True)
  assert sorted(_listing(out)) == ["notes.txt"]
  assert any("removed the previous run's 3 files (--overwrite)" in r.getMessage() for r in caplog.records)
  out.joinpath("result.json").write_text("new")
  assert folder.finish()["files"] == ["result.json"]


def test_outputs_without_a_manifest_are_refused_and_overwrite_removes_a_stale_checkpoint(tmp_path):
  out = tmp_path / "old"
  out.mkdir()
  (out / "cis.json").write_text("{}")
  (out / "cms.npz").write_bytes(b"someone else's checkpoint")
  config = config_lib.default_config()
  with pytest.raises(manifest.FolderInUseError, match=r"holds another run's outputs \(cis.json, cms.npz; no manifest"):
    manifest.claim(out, kind="cms", config=config, inputs={})
  manifest.claim(out, kind="cms", config=config, inputs={}, overwrite=True)
  assert not (out / "cms.npz").exists() and not (out / "cis.json").exists()


def test_a_folder_of_other_files_or_a_failed_run_is_free(tmp_path):
  out = tmp_path / "mixed"
  out.mkdir()
  (out / "README.txt").write_text("not a run's output")
  manifest.claim(out, kind="occlusion", config=config_lib.default_config(), inputs={}).write()  # then it failed
  other = config_lib.default_config()
  other.model = "age"
  assert not manifest.claim(out, kind="occlusion", config=other, inputs={}).resumed


def test_the_script_refuses_another_runs_folder_in_one_line(tmp_path):
  out = tmp_path / "out"
  _run(out, _inputs(tmp_path, "someone.jpg"))
  before = _listing(out)
  proc = subprocess.run(
    [sys.executable, str(ROOT / "scripts" / "occlusion.py"), f"--out_dir={out}", "--compilation_cache=off"],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip() == (
    f"error: --out_dir={out}: holds another run's outputs (other inputs; its manifest.json lists them); give "
    "--overwrite to replace them, or another folder"
  )
  assert _listing(out) == before


def test_run_inputs_hash_photos_references_and_model_files(tmp_path):
  from canonsal_jax import cli

  photo, model = tmp_path / "a.jpg", tmp_path / "net.onnx"
  photo.write_bytes(b"a")
  model.write_bytes(b"onnx")
  config = config_lib.default_config()
  config.model, config.occlusion.reference = f"onnx:{model}", str(photo)
  found = cli.run_inputs(config, {"photo": str(photo), "images": {"count": 2}})
  assert found["photo"]["sha256"] == found["reference"]["sha256"] == assets.sha256_of(photo)
  assert found["model_file"] == {"path": str(model), "sha256": assets.sha256_of(model)}
  assert found["images"] == {"count": 2} and "impostor" not in found
  assert sorted(found) == ["images", "model_file", "photo", "reference"]
