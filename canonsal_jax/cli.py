"""What the absl scripts in `scripts/` share: the `--config` flag, the common overrides, one-line errors.

Each script defines its own flags with these helpers and keeps its heavy imports inside `main`, so `--help` and
flag errors stay instant.

```python
from canonsal_jax import cli

_CONFIG = cli.define_config()  # --config=configs/default.py, any key overridable as --config.occlusion.stride=2
_OVERRIDES = cli.define_overrides(model=True, morphable_model=True)  # --model, --morphable_model


def main(argv):
  cli.no_arguments(argv)
  config = cli.resolve(_CONFIG, _OVERRIDES)
  with cli.user_errors() as failed:
    result = ...  # a bad input raises one of cli.USER_ERRORS
  if failed:
    return 1
```
"""

from __future__ import annotations

import contextlib
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

__all__ = ["CONFIGS", "define_config", "define_overrides", "no_arguments", "resolve", "user_error_types", "user_errors"]

# The repository's configs/ folder (the scripts run from a checkout).
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def define_config(default: str = "default.py") -> flags.FlagHolder:
  """`--config`: an ml_collections config file (locked: a misspelt key is an error, not a silent default)."""
  return config_flags.DEFINE_config_file(
    "config", str(CONFIGS / default), f"Configuration file (default: configs/{default}).", lock_config=True
  )


def define_overrides(*, model: bool = True, morphable_model: bool = True) -> dict[str, flags.FlagHolder]:
  """`--model` and/or `--morphable_model`, shortcuts for `--config.model` / `--config.morphable_model`."""
  holders = {}
  if model:
    holders["model"] = flags.DEFINE_string(
      "model", None, "Face model: a registry name or package.module:factory (overrides config.model)."
    )
  if morphable_model:
    holders["morphable_model"] = flags.DEFINE_string(
      "morphable_model", None, '"default" or the folder of a Surrey Face Model copy (overrides config).'
    )
  return holders


def no_arguments(argv: list[str]) -> None:
  """Refuses positional arguments (a forgotten `--` or `=` usually)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")


def resolve(config_flag: flags.FlagHolder, overrides: dict[str, flags.FlagHolder]) -> ml_collections.ConfigDict:
  """The config with the override flags applied, logged."""
  config = config_flag.value
  for key, holder in overrides.items():
    if holder.value is not None:
      config[key] = holder.value
  logging.info("config:\n%s", config)
  return config


def user_error_types() -> tuple[type[BaseException], ...]:
  """Errors that mean bad input or settings (a message for the user, not a traceback)."""
  from canonsal_jax import faces, fileio

  return (ValueError, FileNotFoundError, fileio.ImageError, fileio.FormatError, faces.NoFaceError)


@contextlib.contextmanager
def user_errors() -> Iterator[list[Any]]:
  """Turns a user error inside the block into one `error: ...` line on stderr; the yielded list is then
  non-empty (the error), so the script can `return 1`."""
  failed: list[Any] = []
  try:
    yield failed
  except user_error_types() as e:
    print(f"error: {e}", file=sys.stderr)
    failed.append(e)
