"""The CMS job over several devices and several processes gives the CMS of one device and one process.

Both run `scripts/cms.py` in subprocesses: forced CPU devices must be set before JAX starts, and a
`jax.distributed` job needs one process per member (two local processes, gloo collectives on the CPU).
"""

import os
import pathlib
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

from canonsal_jax import assets, cms, datasets, runs
from canonsal_jax import config as config_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
_FAST = ["--config.occlusion.patch_size=3", "--config.occlusion.stride=2", "--config.cms.face_batch=1"]


def _env(**extra: str) -> dict[str, str]:
  env = dict(os.environ, **extra)
  env["CANONSAL_CACHE_DIR"] = str(assets.cache_dir())
  env["JAX_COMPILATION_CACHE_DIR"] = str(assets.cache_dir() / "jax_compilation_cache")  # as conftest.py
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return env


def _cms_command(folder: pathlib.Path, out: pathlib.Path, *flags: str) -> list[str]:
  return [sys.executable, str(ROOT / "scripts" / "cms.py"), f"--images={folder}", f"--out_dir={out}", *_FAST, *flags]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """The astronaut (512 px) and three LFW crops (222 px): two image sizes, so two fit calls per batch."""
  folder = tmp_path_factory.mktemp("photos")
  for i, path in enumerate(datasets.builtin_dataset("lfw")[:4]):
    shutil.copy(path, folder / f"{i:02d}{pathlib.Path(path).suffix}")
  return folder


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
  """The single-process, single-device run (this process has one CPU device)."""
  config = config_lib.default_config()
  config.occlusion.patch_size = 3.0
  config.occlusion.stride = 2
  config.cms.face_batch = 1
  return runs.run_cms(config, tmp_path_factory.mktemp("reference"), dataset=str(dataset))


@pytest.mark.slow
def test_four_devices_give_the_one_device_cms(dataset, reference, tmp_path):
  env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=4")
  proc = subprocess.run(_cms_command(dataset, tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "CpuDevice(id=3)" in proc.stderr  # the script logs the local devices
  sharded = cms.CMSAccumulator.load(tmp_path / "cms.npz")
  assert reference.num_images("all") == sharded.num_images("all") == 4
  assert sharded.groups() == reference.groups()
  for group in reference.groups():
    (want, want_valid), (got, got_valid) = reference.mean(group), sharded.mean(group)
    np.testing.assert_array_equal(got_valid, want_valid)
    # Each device runs the same per-device program (face_batch faces), so this is expected bit for bit; the
    # tolerance, 1e-6 of the largest value, is the bound the multi-device design promises.
    np.testing.assert_allclose(got[got_valid], want[want_valid], rtol=0, atol=1e-6 * np.abs(want[want_valid]).max())


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_merge_into_the_single_process_cms(dataset, reference, tmp_path):
  coordinator = f"127.0.0.1:{_free_port()}"
  procs = [
    subprocess.Popen(
      _cms_command(dataset, tmp_path, "--num_processes=2", f"--process_id={i}", f"--coordinator={coordinator}"),
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  parts = [cms.CMSAccumulator.load(tmp_path / f"cms.process{i}.npz") for i in range(2)]
  assert parts[0].done_indices() == {0, 2} and parts[1].done_indices() == {1, 3}  # strided shards
  merged = cms.CMSAccumulator.load(tmp_path / "cms.npz")
  assert merged.done_indices() == reference.done_indices()
  assert merged.groups() == reference.groups()
  for group in reference.groups():
    for got, want in zip(merged.sums(group), reference.sums(group)):
      np.testing.assert_array_equal(got, want)  # exact: same per-device programs, exact sums
  assert (tmp_path / "cms_all.png").is_file() and (tmp_path / "summary.json").is_file()
