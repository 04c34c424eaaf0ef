"""What every absl script shares (`scripts/`, `benchmarks/`, `tools/`): the `--config` flag, the common
overrides, flags made from an experiment's settings dataclass, the argument check, one-line errors.

Each script defines its own flags with these helpers and keeps its heavy imports inside `main`, so `--help` and
flag errors stay instant.

```python
from canonsal_jax import cli

_CONFIG = cli.define_config()  # --config=configs/default.py, any key overridable as --config.occlusion.stride=2
_OVERRIDES = cli.define_overrides(model=True, morphable_model=True)  # --model, --morphable_model


def main(argv):
  cli.start(argv)  # no positional arguments; the persistent compilation cache
  config = cli.resolve(_CONFIG, _OVERRIDES)
  with cli.user_errors() as failed:
    result = ...  # a bad input raises one of cli.user_error_types()
  if failed:
    return 1
```
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
import sys
import typing
from collections.abc import Iterator
from typing import Any

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

__all__ = [
  "CONFIGS",
  "define_config",
  "define_overrides",
  "define_settings",
  "define_sfm",
  "no_arguments",
  "resolve",
  "settings_from_flags",
  "start",
  "user_error_types",
  "user_errors",
]

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
      "model",
      None,
      "Face model (overrides config.model): a built-in name, onnx:PATH, PATH.py:factory or package.module:factory.",
    )
    holders["model_card"] = flags.DEFINE_string(
      "model_card", None, "The JSON model card of an onnx:PATH model (default: PATH.json beside it)."
    )
  if morphable_model:
    holders["morphable_model"] = flags.DEFINE_string(
      "morphable_model", None, '"default" or the folder of a Surrey Face Model copy (overrides config).'
    )
  return holders


def define_sfm(*, required: bool = False) -> flags.FlagHolder:
  """`--morphable_model` for scripts without a config: the folder of the user's Surrey Face Model copy."""
  return flags.DEFINE_string(
    "morphable_model", None, "The folder of a Surrey Face Model copy (sfm_shape_3448.bin, ...).", required=required
  )


# Flag definers by a settings field's type; lists become tuples of the element type in `settings_from_flags`.
_DEFINERS = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string, bool: flags.DEFINE_bool}


def define_settings(
  settings_type: type, help_texts: dict[str, str], *, flag_values: flags.FlagValues = flags.FLAGS
) -> dict[str, flags.FlagHolder]:
  """One flag per named field of a settings dataclass, its default the dataclass's (one source of defaults).

  Args:
    settings_type: a dataclass whose fields have defaults.
    help_texts: field name -> the flag's help; only these fields become flags. `int`, `float`, `str` and `bool`
      fields give flags of that type; `tuple[T, ...]` fields give comma-separated lists.
    flag_values: where the flags are defined (absl's global `FLAGS` by default).

  Raises:
    TypeError: a named field has another type.
  """
  fields = {f.name: f for f in dataclasses.fields(settings_type)}
  hints = typing.get_type_hints(settings_type)
  holders = {}
  for name, help_text in help_texts.items():
    kind, default = hints[name], fields[name].default
    if typing.get_origin(kind) is tuple:
      holders[name] = flags.DEFINE_list(name, [str(v) for v in default], help_text, flag_values=flag_values)
    elif kind in _DEFINERS:
      holders[name] = _DEFINERS[kind](name, default, help_text, flag_values=flag_values)
    else:
      raise TypeError(f"{settings_type.__name__}.{name}: no flag for type {kind}")
  return holders


def settings_from_flags(settings_type: type, holders: dict[str, flags.FlagHolder]) -> Any:
  """The settings dataclass with the flags' values (lists converted to tuples of the field's element type)."""
  hints = typing.get_type_hints(settings_type)
  values = {}
  for name, holder in holders.items():
    kind = hints[name]
    if typing.get_origin(kind) is tuple:
      element = typing.get_args(kind)[0]
      values[name] = tuple(element(v) for v in holder.value)
    else:
      values[name] = holder.value
  return settings_type(**values)


_COMPILATION_CACHE = flags.DEFINE_string(
  "compilation_cache",
  "default",
  'JAX\'s persistent compilation cache: "default" (in the cache folder), a folder, or "off".',
)


def start(argv: list[str]) -> None:
  """What every script's `main` does first: refuse positional arguments, then turn on JAX's persistent
  compilation cache (`--compilation_cache`), so a second run reuses the first run's compiled programs."""
  no_arguments(argv)
  if _COMPILATION_CACHE.value != "off":
    from canonsal_jax import assets

    assets.enable_compilation_cache(None if _COMPILATION_CACHE.value == "default" else _COMPILATION_CACHE.value)


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
