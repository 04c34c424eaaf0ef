"""The public API: every name in `__all__` exists, and importing the package has no side effects."""

import importlib
import subprocess
import sys

import pytest

import canonsal_jax


@pytest.mark.parametrize("module", [m for m in canonsal_jax.__all__ if m != "__version__"])
def test_all_names_exist(module):
  mod = importlib.import_module(f"canonsal_jax.{module}")
  for name in getattr(mod, "__all__", ()):
    assert hasattr(mod, name), f"canonsal_jax.{module}.__all__ names missing {name}"


def test_import_is_cheap_and_quiet():
  code = "import sys, canonsal_jax; assert 'jax' not in sys.modules and 'dlib' not in sys.modules; print('ok')"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
