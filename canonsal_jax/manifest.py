"""Run folders: the manifest each run writes, and the check that keeps one folder to one run.

Every script's output folder gets a `manifest.json`: the command line, the config, the package versions, the
SHA-256 of the run's inputs (photos, reference photos, model files, a labels CSV; a dataset's photos as one
digest over every file) and the files the run wrote. `claim` is called before anything is loaded or written:

* an empty or new folder, or one holding only files that are no run's outputs, is the run's;
* a folder whose manifest says the same run (same kind, same inputs, same config apart from `RUN_INVARIANT_KEYS`,
  which change speed, not results) is the run's again: a CMS run resumes from its checkpoint, a per-image run
  rewrites its own files;
* a folder holding another run's outputs (another manifest, or a run's files without one) is refused with one
  line naming what differs, unless `overwrite`: then the files the previous manifest lists are removed (without
  a manifest, the run warns and writes over what it writes; other files stay).

Example:
  >>> import tempfile
  >>> from canonsal_jax import config as config_lib, manifest
  >>> out = tempfile.mkdtemp()
  >>> run = manifest.claim(out, kind="occlusion", config=config_lib.default_config(), inputs={})
  >>> sorted(run.finish())
  ['command', 'config', 'files', 'format', 'inputs', 'kind', 'version', 'versions']
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import platform
import sys
from collections.abc import Iterable, Mapping
from typing import Any

from absl import logging

from canonsal_jax import assets, fileio

__all__ = [
  "MANIFEST",
  "RUN_INVARIANT_KEYS",
  "FolderInUseError",
  "RunFolder",
  "claim",
  "digest_files",
  "versions",
]

MANIFEST = "manifest.json"
_FORMAT, _VERSION = "canonsal_jax.run_manifest", 1

# Config keys that change how fast a run goes or how it is cut into pieces, never what it computes: a resumed
# CMS run may change them (a time-boxed run's max_images, more threads, another batch size).
RUN_INVARIANT_KEYS = (
  "cms.max_images",
  "cms.host_pool",
  "cms.host_workers",
  "cms.prefetch",
  "cms.checkpoint_every",
  "cms.face_batch",
  "occlusion.batch_size",
  "attribution.batch_size",
  "detection_cache",
)

# Files that only a run writes: a folder holding one of them without a manifest holds a run's outputs.
_RUN_OUTPUTS = (
  "result.json",
  "cis.json",
  "fit.json",
  "pair.json",
  "summary.json",
  "records.json",
  "cms.npz",
  "heatmap.npy",
  "cis_texture.npz",
  "mesh.obj",
)


def _run_outputs(folder: pathlib.Path) -> list[str]:
  """The files in `folder` that only a run writes (`_RUN_OUTPUTS`, and a multi-process run's checkpoints and
  summaries), by name."""
  found = [n for n in _RUN_OUTPUTS if (folder / n).is_file()]
  found += sorted(p.name for pattern in ("cms.process*.npz", "summary.process*.json") for p in folder.glob(pattern))
  return found


class FolderInUseError(ValueError):
  """An output folder holds another run's outputs; the message names the folder, what differs, and `--overwrite`."""


def digest_files(paths: Iterable[str | os.PathLike[str]]) -> str:
  """One SHA-256 over files in order: each file's own SHA-256 (a dataset's photos, as a manifest records them)."""
  digest = hashlib.sha256()
  for path in paths:
    digest.update(bytes.fromhex(assets.sha256_of(path)))
  return digest.hexdigest()


def versions() -> dict[str, str]:
  """Python's and the main packages' versions (those installed)."""
  import importlib.metadata

  found = {"python": platform.python_version()}
  for package in ("canonsal_jax", "jax", "jaxlib", "flax", "numpy", "dlib-bin", "scikit-image"):
    try:
      found[package] = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
      pass
  return found


def _comparable(config: Any) -> dict[str, Any]:
  """The config as JSON values, keyed by dotted key, without the run-invariant keys."""
  flat: dict[str, Any] = {}

  def walk(node: Mapping[str, Any], prefix: str) -> None:
    for key, value in node.items():
      if isinstance(value, Mapping):
        walk(value, f"{prefix}{key}.")
      elif f"{prefix}{key}" not in RUN_INVARIANT_KEYS:
        flat[f"{prefix}{key}"] = value

  data = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  walk(json.loads(json.dumps(data, default=str)), "")
  return flat


def _snapshot(folder: pathlib.Path) -> dict[str, tuple[int, int]]:
  """`{relative path: (size, mtime_ns)}` of every file under `folder`."""
  if not folder.is_dir():
    return {}
  found = {}
  for path in folder.rglob("*"):
    if path.is_file():
      stat = path.stat()
      found[path.relative_to(folder).as_posix()] = (stat.st_size, stat.st_mtime_ns)
  return found


def _read(folder: pathlib.Path) -> dict[str, Any] | None:
  path = folder / MANIFEST
  if not path.is_file():
    return None
  try:
    data = json.loads(path.read_text())
  except (OSError, ValueError):
    return {}  # unreadable: a manifest all the same, of no run this one can be
  return data if isinstance(data, dict) else {}


def _differences(old: dict[str, Any], kind: str, config: dict[str, Any], inputs: dict[str, Any]) -> list[str]:
  """What makes a folder's manifest another run's: its kind, its inputs, the config keys that differ."""
  if old.get("format") != _FORMAT:
    return ["an unreadable manifest"]
  if old.get("kind") != kind:
    return [f"a different kind of run: {old.get('kind')}"]
  found = []
  if old.get("inputs") != inputs:
    found.append("other inputs")
  theirs = _comparable(old.get("config", {}))
  keys = sorted(k for k in set(theirs) | set(config) if theirs.get(k) != config.get(k))
  if keys:
    shown = ", ".join(f"--config.{k}" for k in keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    found.append(f"another config ({shown})")
  return found


def _inside(folder: pathlib.Path, name: str) -> pathlib.Path | None:
  """`folder / name` when it stays inside `folder` (a manifest's list is never trusted to point elsewhere)."""
  path = (folder / name).resolve()
  root = folder.resolve()
  return path if root in path.parents else None


class RunFolder:
  """A claimed output folder: `finish` writes its manifest with the files this run wrote.

  Attributes:
    path: the folder.
    resumed: whether the folder held this same run's outputs (a CMS run resumes from them).
  """

  def __init__(self, path, kind, command, config, inputs, before, previous_files, resumed):
    self.path = path
    self.resumed = resumed
    self._kind, self._command, self._config, self._inputs = kind, command, config, inputs
    self._before, self._previous = before, previous_files

  def manifest(self, files: list[str]) -> dict[str, Any]:
    """The manifest's content with `files`."""
    return {
      "format": _FORMAT,
      "version": _VERSION,
      "kind": self._kind,
      "command": self._command,
      "config": self._config,
      "versions": versions(),
      "inputs": self._inputs,
      "files": files,
    }

  def write(self, files: list[str] | None = None) -> None:
    """Writes the manifest now (a resumable run does at its start, so a killed run's folder is still its own)."""
    fileio.save_json(self.path / MANIFEST, self.manifest(sorted(files if files is not None else self._previous)))

  def finish(self) -> dict[str, Any]:
    """Writes `manifest.json` listing the files this run wrote (new or changed since `claim`), with those a
    resumed run's earlier runs wrote that are still there. Returns the manifest."""
    now = _snapshot(self.path)
    written = {name for name, stat in now.items() if self._before.get(name) != stat}
    kept = {name for name in self._previous if name in now}
    files = sorted((written | kept) - {MANIFEST})
    content = self.manifest(files)
    fileio.save_json(self.path / MANIFEST, content)
    return content


def _remove(folder: pathlib.Path, names: Iterable[str]) -> None:
  for name in names:
    path = _inside(folder, name)
    if path is not None and path.is_file():
      path.unlink()


def claim(
  out_dir: str | os.PathLike[str],
  *,
  kind: str,
  config: Any,
  inputs: dict[str, Any],
  overwrite: bool = False,
  command: list[str] | None = None,
  flag: str = "--out_dir",
) -> RunFolder:
  """Makes an output folder this run's, before anything is written (see the module docstring).

  Args:
    out_dir: the folder (created later by the writers if missing).
    kind: the run's kind ("occlusion", "cis", "fit", "verify", "cms").
    config: the run's config (a `ConfigDict` or a dict).
    inputs: what the run reads, with its SHA-256 (`assets.sha256_of`, `digest_files`), as JSON values.
    overwrite: replace another run's outputs instead of refusing.
    command: the command line (default `sys.argv`).
    flag: how the folder was given, for the message.

  Returns:
    The claimed folder; call `finish` when the run has written its outputs.

  Raises:
    FolderInUseError: the folder holds another run's outputs and `overwrite` is off (nothing is written).
  """
  folder = pathlib.Path(out_dir)
  comparable = _comparable(config)
  stored = json.loads(json.dumps(config.to_dict() if hasattr(config, "to_dict") else dict(config), default=str))
  old = _read(folder)
  previous: list[str] = []
  resumed = False
  if old is not None:
    listed = [n for n in old.get("files", []) if isinstance(n, str) and n != MANIFEST]
    present = [n for n in listed if (p := _inside(folder, n)) is not None and p.is_file()]
    present += [n for n in _run_outputs(folder) if n not in present]  # a killed run's checkpoint, say
    differs = _differences(old, kind, comparable, inputs)
    if not differs:
      previous, resumed = present, bool(present)
    elif present and not overwrite:
      raise FolderInUseError(
        f"{flag}={out_dir}: holds another run's outputs ({'; '.join(differs)}; its manifest.json lists them); "
        "give --overwrite to replace them, or another folder"
      )
    elif present:
      _remove(folder, present)
      (folder / MANIFEST).unlink()
      logging.warning("%s=%s: removed the previous run's %d files (--overwrite)", flag, out_dir, len(present))
  else:
    found = _run_outputs(folder)
    if found and not overwrite:
      raise FolderInUseError(
        f"{flag}={out_dir}: holds another run's outputs ({', '.join(found[:3])}{', ...' if len(found) > 3 else ''}; "
        "no manifest.json); give --overwrite to write over them, or another folder"
      )
    if found:
      _remove(folder, found)  # a checkpoint left there would be resumed
      logging.warning(
        "%s=%s: holds a run's outputs without a manifest; --overwrite: removed %s, replacing the other files this "
        "run writes and leaving the rest",
        flag,
        out_dir,
        ", ".join(found),
      )
  return RunFolder(
    folder,
    kind,
    list(sys.argv if command is None else command),
    stored,
    inputs,
    _snapshot(folder),
    previous,
    resumed,
  )
