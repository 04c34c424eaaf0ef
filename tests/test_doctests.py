"""The docstring examples of every module run as doctests; an example that cannot run here says why."""

import doctest
import importlib
import pathlib
import pkgutil

import pytest

import canonsal_jax

_MODULES = ["canonsal_jax", *sorted(m.name for m in pkgutil.walk_packages(canonsal_jax.__path__, "canonsal_jax."))]
_REASON = "Lines marked +SKIP are not run as doctests: "


def _tests(name: str) -> list[doctest.DocTest]:
  return [t for t in doctest.DocTestFinder().find(importlib.import_module(name), name) if t.examples]


@pytest.mark.parametrize("name", [m for m in _MODULES if _tests(m)])
def test_examples_run(name, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # an example that writes relative paths writes here
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  report: list[str] = []
  for test in _tests(name):
    runner.run(test, out=report.append)
  assert runner.failures == 0, "".join(report)


@pytest.mark.parametrize("name", _MODULES)
def test_skipped_examples_say_why(name):
  for test in _tests(name):
    if any(example.options.get(doctest.SKIP) for example in test.examples):
      assert _REASON in test.docstring, f"{test.name}: an example is skipped without a reason ({_REASON}...)"


def test_every_example_is_found():
  """The finder sees the examples of every module that has `>>>` in its source (none hides from the runner)."""
  root = pathlib.Path(canonsal_jax.__file__).parent
  with_examples = {
    ".".join(("canonsal_jax", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
    for p in root.rglob("*.py")
    if ">>> " in p.read_text()
  }
  assert with_examples == {m for m in _MODULES if _tests(m)}
