"""The public API: every name in `__all__` exists, and importing the package has no side effects."""

import importlib
import subprocess
import sys

import pytest

import canonsal_jax
import canonsal_jax.evidence

_MODULES = [f"canonsal_jax.{m}" for m in canonsal_jax.__all__ if m != "__version__"]
_MODULES += [f"canonsal_jax.evidence.{m}" for m in canonsal_jax.evidence.__all__]


@pytest.mark.parametrize("module", _MODULES)
def test_all_names_exist(module):
  mod = importlib.import_module(module)
  for name in getattr(mod, "__all__", ()):
    assert hasattr(mod, name), f"{module}.__all__ names missing {name}"


def test_every_module_is_listed():
  """A new module is either named in its package's lazy `__all__` or private (its name starts with `_`)."""
  import pkgutil

  for package, listed in ((canonsal_jax, canonsal_jax.__all__), (canonsal_jax.evidence, canonsal_jax.evidence.__all__)):
    found = {m.name for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    found.discard("evidence")  # the core does not load its evidence: imported by name, never by the core
    assert found == set(listed) - {"__version__"}, package.__name__


def test_import_is_cheap_and_quiet():
  code = "import sys, canonsal_jax; assert 'jax' not in sys.modules and 'dlib' not in sys.modules; print('ok')"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
