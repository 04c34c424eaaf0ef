"""Shared test set-up: a persistent JAX compilation cache and the asset cache, before any test imports JAX."""

import os
import pathlib

import pytest

from canonsal_jax import assets

# Compiled programs persist between runs (CI reuses them on the same machine); tiny programs are not worth it.
assets.enable_compilation_cache()

# Scripts run as subprocesses import this checkout's package, not another copy installed in the environment.
ROOT = pathlib.Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The workplace's shared folder (licensed assets such as the Surrey Face Model live there, never here)."""
  path = pathlib.Path(os.environ.get("CANONSAL_SHARED_DIR", SHARED))
  if not path.is_dir():
    pytest.skip(f"shared assets folder not found at {path}")
  return path
