"""Shared test set-up: a persistent JAX compilation cache and the asset cache, before any test imports JAX."""

import os
import pathlib

import jax
import pytest

from canonsal_jax import assets

# Compiled programs persist between runs (CI reuses them on the same machine); tiny programs are not worth it.
jax.config.update("jax_compilation_cache_dir", str(assets.cache_dir() / "jax_compilation_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> pathlib.Path:
  """The workplace's shared folder (licensed assets such as the Surrey Face Model live there, never here)."""
  path = pathlib.Path(os.environ.get("CANONSAL_SHARED_DIR", SHARED))
  if not path.is_dir():
    pytest.skip(f"shared assets folder not found at {path}")
  return path
