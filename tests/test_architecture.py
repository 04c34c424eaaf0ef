"""The layers of docs/ARCHITECTURE.md, read from the source: the core never imports `evidence` or `benchmarks`,
evidence never imports `benchmarks`, and no module of the package shadows a standard-library module."""

import ast
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "canonsal_jax"


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports, at the top or inside a function (`from a import b` gives `a` and `a.b`)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module)
      found |= {f"{node.module}.{alias.name}" for alias in node.names}
  return found


def _layer(path: pathlib.Path) -> str:
  return "evidence" if "evidence" in path.relative_to(PACKAGE).parts else "core"


_FORBIDDEN = {
  "core": ("canonsal_jax.evidence", "benchmarks", "tools", "scripts"),
  "evidence": ("benchmarks", "tools", "scripts"),
}


def _violations(path: pathlib.Path) -> list[str]:
  banned = _FORBIDDEN[_layer(path)]
  return sorted(m for m in _imports(path) if any(m == b or m.startswith(b + ".") for b in banned))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
  assert not _violations(path), f"{path.relative_to(ROOT)} imports {_violations(path)} (see docs/ARCHITECTURE.md)"


def test_the_check_sees_function_level_imports(tmp_path):
  """The check itself: an import hidden inside a function of a core module is found."""
  core = tmp_path / "canonsal_jax" / "fake.py"
  core.parent.mkdir()
  core.write_text("def f():\n  from canonsal_jax.evidence import stats\n  import benchmarks.bench\n")
  global PACKAGE
  saved, PACKAGE = PACKAGE, tmp_path / "canonsal_jax"
  try:
    assert _violations(core) == ["benchmarks.bench", "canonsal_jax.evidence", "canonsal_jax.evidence.stats"]
  finally:
    PACKAGE = saved


def test_no_module_shadows_the_standard_library():
  names = {p.stem for p in PACKAGE.rglob("*.py")} | {p.name for p in PACKAGE.rglob("*") if p.is_dir()}
  assert not names & set(sys.stdlib_module_names)


def test_benchmarks_are_not_installed():
  """setup.py packages `canonsal_jax` and its sub-packages only: its `find_packages(include=...)`, read from the
  file and applied to this tree, finds the evidence and nothing outside the library."""
  from setuptools import find_packages

  calls = [
    node
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "find_packages"
  ]
  (include,) = [ast.literal_eval(k.value) for call in calls for k in call.keywords if k.arg == "include"]
  packages = find_packages(str(ROOT), include=include)
  assert "canonsal_jax.evidence" in packages
  assert not [p for p in packages if p.split(".")[0] != "canonsal_jax"], packages
  assert (ROOT / "benchmarks" / "__init__.py").is_file()  # a package of the repository, beside the library


def test_the_map_names_every_module():
  """docs/ARCHITECTURE.md names every module and sub-package of the library, so the map cannot fall behind."""
  text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
  missing = []
  for path in PACKAGE.rglob("*.py"):
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" or parts[-1].startswith("_"):
      continue
    top = parts[0]
    name = f"evidence.{parts[1]}" if top == "evidence" else (f"{top}/" if len(parts) > 1 else top)
    if f"`{name}`" not in text:
      missing.append(name)
  assert not missing, f"docs/ARCHITECTURE.md does not name {sorted(set(missing))}"
