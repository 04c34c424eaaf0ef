"""The README's worked example, run as written: a user's PyTorch face classifier to its CMS over a folder."""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shutil

import pytest

torch = pytest.importorskip("torch")

from canonsal_jax import datasets  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


class MyFaceClassifier(torch.nn.Module):
  """A stand-in for the user's network: [B, 3, 64, 64] -> [B, 2]."""

  def __init__(self):
    super().__init__()
    self.features = torch.nn.Sequential(
      torch.nn.Conv2d(3, 8, 3, padding=1),
      torch.nn.ReLU(),
      torch.nn.MaxPool2d(2),
      torch.nn.Conv2d(8, 16, 3, padding=1),
      torch.nn.ReLU(),
    )
    self.head = torch.nn.Linear(16, 2)

  def forward(self, x):
    return self.head(self.features(x).mean(dim=(2, 3)))


def _example() -> str:
  text = (ROOT / "README.md").read_text()
  block = re.search(r"<!-- worked example: start -->\s*```python\n(.*?)```\s*<!-- worked example: end -->", text, re.S)
  assert block, "README.md has no worked example block"
  return block[1]


@pytest.mark.slow
def test_readme_worked_example_runs_as_written(tmp_path, monkeypatch):
  torch.manual_seed(0)
  torch.save(MyFaceClassifier().state_dict(), tmp_path / "my_classifier.pt")
  (tmp_path / "photos").mkdir()
  for path in datasets.files_of("builtin:photos")[:2]:
    shutil.copy(path, tmp_path / "photos")
  monkeypatch.chdir(tmp_path)
  code = _example()
  assert len(ast.parse(code).body) <= 10  # "about ten lines": statements (the formatter may wrap one)
  exec(compile(code, "README.md", "exec"), {"MyFaceClassifier": MyFaceClassifier})
  out = tmp_path / "out" / "glasses"
  summary = json.loads((out / "summary.json").read_text())
  records = json.loads((out / "records.json").read_text())
  assert summary["images_accumulated"] == 2, summary["skipped"]
  assert set(records["groups"]) <= {"all", "pred_glasses", "pred_no glasses"}, records["groups"]
  assert (out / "cms_all.png").stat().st_size > 0
