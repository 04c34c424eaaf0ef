"""What every absl script shares (`scripts/`, `benchmarks/`, `tools/`): the `--config` flag, the common
overrides, flags made from an experiment's settings dataclass, the argument check, one-line errors.

Each script defines its own flags with these helpers and keeps its heavy imports inside `main`, so `--help` and
flag errors stay instant. The flags these helpers define are the script's own (its key flags, listed by
`--help`): `--config` (with `--list_config`), `--model` (with `--list_models`), `--morphable_model` and `--face`.

```python
from canonsal_jax import cli

_CONFIG = cli.define_config()  # --config=configs/default.py, any key overridable as --config.occlusion.stride=2
_OVERRIDES = cli.define_overrides(model=True, morphable_model=True)  # --model, --morphable_model
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Folder for the outputs.", required=True)


def main(argv):
  cli.start(argv, out_dirs=[_OUT_DIR])  # no positional arguments; a usable --out_dir; the compilation cache
  config = cli.resolve(_CONFIG, _OVERRIDES)  # every value checked before anything is loaded
  with cli.user_errors() as failed:
    result = ...  # a bad input raises one of cli.user_error_types()
  if failed:
    return 1


if __name__ == "__main__":
  cli.run(main)  # absl's app.run, with every command-line error as one line and exit status 1
```

Errors a user can act on are one `error: ...` line on stderr and exit status 1: a flag absl cannot parse, an
unknown config key, a bad value (naming its `--config.<key>` and what it accepts), an unusable output folder,
an unreadable photo, no face found (naming the detector settings to try). The resolved config and JAX's
platform notices are logged only at `-v 1`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.util
import logging as std_logging
import os
import pathlib
import re
import sys
import typing
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NoReturn

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from canonsal_jax import config as config_lib

__all__ = [
  "CONFIGS",
  "MODEL_FORMS",
  "claim_out_dir",
  "define_config",
  "define_overrides",
  "define_overwrite",
  "define_settings",
  "define_sfm",
  "list_models",
  "no_arguments",
  "resolve",
  "run",
  "run_inputs",
  "settings_from_flags",
  "start",
  "user_error_types",
  "user_errors",
]

# The repository's configs/ folder (the scripts run from a checkout).
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


# What `--model` accepts besides a built-in name, as `--list_models` and `--help` say it.
MODEL_FORMS = (
  ("onnx:PATH", "an ONNX face network (any framework's export), with its model card PATH.json or --model_card"),
  (
    "PATH.py:factory",
    "a function in a Python file returning a canonsal_jax FaceModel (JAX/Flax code, or "
    "models.from_torch for a PyTorch module)",
  ),
  ("package.module:factory", "the same function in an importable module"),
)

# A command-line error found while the flags were being defined (an unknown config key), said by `run`.
_REFUSED: list[str] = []


def define_config(default: str = "default.py") -> flags.FlagHolder:
  """`--config`: an ml_collections config file (locked: a misspelt key is an error, not a silent default), and
  `--list_config`, which prints its keys and values and exits.

  An override of a key the config does not have (`--config.occlusion.patch=5`) is refused by `run` in one line
  naming the key and the nearest real one.
  """
  path = str(CONFIGS / default)
  argv = sys.argv
  unknown = _unknown_overrides(argv, path)
  if unknown:
    _REFUSED.append(unknown[1])
    argv = [arg for arg in argv if arg != unknown[0]]
  holder = config_flags.DEFINE_config_file(
    "config",
    path,
    f"Configuration file (default: configs/{default}). --config.<key>=value overrides one key (e.g. "
    "--config.occlusion.stride=2); --list_config lists the keys and values, canonsal_jax/config.py says what each "
    "means.",
    lock_config=True,
    sys_argv=argv if unknown else None,
  )
  flags.declare_key_flag(holder)  # defined in ml_collections: made the script's own, listed by --help
  flags.DEFINE_flag(
    _ExitFlag(
      "list_config",
      "Print the config's keys with their values (as --config.<key>=value; those of any --config and overrides "
      "before this flag) and exit.",
      lambda: _list_config(holder),
    )
  )
  return holder


def define_overrides(
  *, model: bool = True, morphable_model: bool = True, face: bool = False, landmarks: bool = False
) -> dict[str, flags.FlagHolder]:
  """`--model` (with `--list_models`), `--morphable_model`, `--face` and/or `--landmarks`, shortcuts for
  `--config.model`, `--config.morphable_model`, `--config.face` and `--config.landmarks`."""
  holders = {}
  if model:
    holders["model"] = flags.DEFINE_string(
      "model",
      None,
      f"Face model (overrides config.model): {', '.join(config_lib.BUILTIN_MODELS)}, or "
      f"{', '.join(form for form, _ in MODEL_FORMS)}; --list_models describes them.",
    )
    holders["model_card"] = flags.DEFINE_string(
      "model_card", None, "The JSON model card of an onnx:PATH model (default: PATH.json beside it)."
    )
    flags.DEFINE_flag(_ExitFlag("list_models", "Print the models --model accepts and exit.", list_models))
  if face:
    holders["face"] = flags.DEFINE_string(
      "face",
      None,
      "Which detected face to explain (overrides config.face): largest (default), central (nearest the photo's "
      "centre), an index (0, 1, ...: faces numbered left to right, as result.json lists them) or a box "
      "x0,y0,x1,y1 in photo pixels (the face overlapping it most).",
    )
  if landmarks:
    holders["landmarks"] = flags.DEFINE_string(
      "landmarks",
      None,
      "Annotated 68-point landmarks that replace face detection (overrides config.landmarks): a CSV of rows "
      "image,x0,y0,x1,y1,...,x67,y67 (0-based pixels; an optional header), a 300-W .pts file, or a folder of "
      ".pts files named like the photos.",
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
# Flags defined by this module's helpers from here on belong to the script that calls them (its key flags, which
# its --help lists), not to this module.
flags.disclaim_key_flags()


class _ExitFlag(flags.BooleanFlag):
  """A boolean flag that, given, prints what `action` returns and exits 0 (as `--help` does, before required
  flags are checked)."""

  def __init__(self, name: str, help_text: str, action: Callable[[], str]):
    super().__init__(name, False, help_text)
    self._action = action

  def parse(self, argument: Any) -> None:
    if self._parse(argument):
      print(self._action())
      sys.exit(0)


def list_models() -> str:
  """What `--model` accepts: the built-in models (from a static table: nothing is loaded) and the other forms."""
  width = max(len(name) for name in config_lib.BUILTIN_MODELS)
  lines = ["built-in models (--model=NAME; weights fetched on first use):"]
  for name, info in config_lib.BUILTIN_MODELS.items():
    lines.append(f"  {name:{width}}  {info.crop_size} px face crop; outputs: {info.outputs}; score: {info.score}")
  lines.append("or your own model:")
  width = max(len(form) for form, _ in MODEL_FORMS)
  lines.extend(f"  {form:{width}}  {what}" for form, what in MODEL_FORMS)
  return "\n".join(lines)


def _list_config(holder: flags.FlagHolder) -> str:
  config = holder.value
  if not isinstance(config, ml_collections.ConfigDict):
    _exit_with(_unreadable(holder))
  lines = ["# --config.<key>=value overrides a key; canonsal_jax/config.py says what each means"]
  lines.extend(f"--config.{key}={config_lib.show(value)}" for key, value in config_lib.flat_items(config))
  return "\n".join(lines)


def _unreadable(holder: flags.FlagHolder) -> str:
  """What is wrong with a config file that ml_collections could not load (it keeps the error for later)."""
  path = config_flags.get_config_filename(flags.FLAGS[holder.name])
  missing = not pathlib.Path(path.partition(":")[0]).is_file()
  return f"--{holder.name}={path}: " + ("no such file" if missing else "cannot be loaded as a config file")


def _unknown_overrides(argv: Sequence[str], default: str) -> tuple[str, str] | None:
  """The first `--config.<key>` argument naming no key of the config it overrides, and the error saying so."""
  path = default
  for i, arg in enumerate(argv):
    if re.match(r"^--?config(=|$)", arg):
      path = arg.split("=", 1)[1] if "=" in arg else (argv[i + 1] if i + 1 < len(argv) else default)
  try:
    file, _, argument = path.partition(":")  # ml_collections' "file.py:argument" form
    spec = importlib.util.spec_from_file_location("_canonsal_config_keys", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(*([argument] if argument else []))
    leaves = [key for key, _ in config_lib.flat_items(config)]
  except Exception:  # a file that cannot be loaded is the --config flag's own error, said when it is parsed
    return None
  known = {".".join(key.split(".")[:n]) for key in leaves for n in range(1, key.count(".") + 2)}
  for arg in argv:
    match = re.match(r"^--?(?:no)?config\.([^=\[]+)(=|$)", arg)
    if match and match.group(1) not in known:
      key = match.group(1)
      close = difflib.get_close_matches(key, leaves, n=1)
      hint = f" (did you mean --config.{close[0]}?)" if close else ""
      return arg, f"--config.{key}: the config has no such key{hint}; --list_config lists the keys"
  return None


def run(main: Callable[[list[str]], int | None]) -> None:
  """`absl.app.run(main)`, with every command-line error as one `error: ...` line and exit status 1.

  Flags absl cannot parse (a misspelt flag, a missing required one, a value of the wrong type), an unknown config
  key and an `app.UsageError` from `main` (stray arguments, a bad value, an unusable output folder) print one
  line instead of a usage text or a traceback.
  """

  def main_with_errors(argv: list[str]) -> int | None:
    try:
      return main(argv)
    except app.UsageError as e:
      print(f"error: {e}", file=sys.stderr)
      return e.exitcode

  app.run(main_with_errors, flags_parser=_parse_flags)


def _parse_flags(argv: list[str]) -> list[str]:
  if _REFUSED:
    _exit_with(_REFUSED[0])
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _exit_with(f"{'; '.join(str(e).splitlines())} (--help lists the flags)")


def _exit_with(message: str) -> NoReturn:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(1)


def start(argv: list[str], *, out_dirs: Sequence[flags.FlagHolder] = ()) -> None:
  """What every script's `main` does first: refuse positional arguments, check that the output folders can be
  written (before any work), quiet JAX's platform notices below `-v 1`, then turn on JAX's persistent
  compilation cache (`--compilation_cache`), so a second run reuses the first run's compiled programs.

  Raises:
    app.UsageError: a positional argument, or an output folder that is a file or cannot be created.
  """
  no_arguments(argv)
  for holder in out_dirs:
    if holder.value is not None:
      _check_out_dir(f"--{holder.name}={holder.value}", pathlib.Path(holder.value))
  if logging.get_verbosity() < 1:  # "Unable to initialize backend 'tpu'", "An NVIDIA GPU may be present ..."
    std_logging.getLogger("jax._src.xla_bridge").setLevel(std_logging.ERROR)
  if _COMPILATION_CACHE.value != "off":
    from canonsal_jax import assets

    assets.enable_compilation_cache(None if _COMPILATION_CACHE.value == "default" else _COMPILATION_CACHE.value)


def _check_out_dir(flag: str, path: pathlib.Path) -> None:
  if path.exists() and not path.is_dir():
    raise app.UsageError(f"{flag}: is a file, not a folder")
  existing = next(p for p in (path.absolute(), *path.absolute().parents) if p.exists())
  if not existing.is_dir():
    raise app.UsageError(f"{flag}: cannot be created: {existing} is a file")
  if not os.access(existing, os.W_OK | os.X_OK):
    raise app.UsageError(f"{flag}: cannot be written: {existing} is not writable")


def define_overwrite() -> flags.FlagHolder:
  """`--overwrite`: let a run replace another run's outputs in its folder (`manifest.claim`)."""
  return flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace another run's outputs in the output folder (the files its manifest.json lists) instead of refusing. "
    "Rerunning the same run (same config and inputs) needs no --overwrite: a CMS run resumes.",
  )


def run_inputs(config: ml_collections.ConfigDict, photos: Mapping[str, Any] = ()) -> dict[str, Any]:
  """What a run reads, with each file's SHA-256, for its manifest: the `photos` given (role -> path, or a dict
  already describing them), the
  reference and impostor photos, a model file (`onnx:PATH`, `PATH.py:factory`) and its card, a labels CSV.
  A path that is not a file is recorded with no hash (the run says what is wrong with it)."""
  from canonsal_jax import assets

  model = config.model
  model_file = model[len("onnx:") :] if model.startswith("onnx:") else model.rpartition(":")[0]
  named = {
    **dict(photos),
    "reference": config.occlusion.reference,
    "impostor": config.occlusion.impostor,
    "model_file": model_file if model_file.endswith((".onnx", ".py")) or model.startswith("onnx:") else "",
    "model_card": config.model_card,
    "labels_csv": config.cms.labels_csv,
    "landmarks": config.landmarks,
  }
  found = {}
  for role, path in named.items():
    if isinstance(path, Mapping):  # already described (a dataset's photos as one digest)
      found[role] = dict(path)
    elif path:
      is_file = pathlib.Path(path).is_file()
      found[role] = {"path": str(path), "sha256": assets.sha256_of(path) if is_file else None}
  return found


def claim_out_dir(
  out_dir: flags.FlagHolder,
  overwrite: flags.FlagHolder,
  config: ml_collections.ConfigDict,
  *,
  kind: str,
  inputs: dict[str, Any],
) -> Any:
  """`manifest.claim` of the output folder, before anything is written: a `manifest.RunFolder` whose `finish`
  the script calls after writing.

  Raises:
    app.UsageError: the folder holds another run's outputs and `--overwrite` is off (one line, exit status 1).
  """
  from canonsal_jax import manifest

  try:
    return manifest.claim(
      out_dir.value, kind=kind, config=config, inputs=inputs, overwrite=overwrite.value, flag=f"--{out_dir.name}"
    )
  except manifest.FolderInUseError as e:
    raise app.UsageError(str(e)) from None


def no_arguments(argv: list[str]) -> None:
  """Refuses positional arguments (a forgotten `--` or `=` usually)."""
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")


def resolve(config_flag: flags.FlagHolder, overrides: Mapping[str, flags.FlagHolder]) -> ml_collections.ConfigDict:
  """The config with the override flags applied (a dotted key sets a nested one), checked by `config.validate`
  and logged at `-v 1`.

  Raises:
    app.UsageError: a bad value, naming the flag that set it (`--model=...` or `--config.<key>=...`) and what it
      accepts; a config file that cannot be read.
  """
  config = config_flag.value
  if not isinstance(config, ml_collections.ConfigDict):
    raise app.UsageError(_unreadable(config_flag))
  for key, holder in overrides.items():
    if holder.value is not None:
      *parents, leaf = key.split(".")
      node = config
      for parent in parents:
        node = node[parent]
      node[leaf] = holder.value
  try:
    config_lib.validate(config)
  except config_lib.ConfigError as e:
    holder = overrides.get(e.key)
    flag = f"--{holder.name}" if holder is not None and holder.value is not None else f"--config.{e.key}"
    raise app.UsageError(f"{flag}={config_lib.show(e.value)}: {e.reason}") from None
  logging.vlog(1, "config:\n%s", config)
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
