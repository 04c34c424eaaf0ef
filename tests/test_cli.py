"""`cli`: flags made from a settings dataclass keep its defaults and types, and refuse a field they cannot make;
every command-line error of a script is one line naming what to change; `--help` and the listings show the way."""

import dataclasses
import pathlib
import subprocess
import sys
from unittest import mock

import pytest
from absl import app, flags

from canonsal_jax import cli
from canonsal_jax import config as config_lib


@dataclasses.dataclass(frozen=True)
class _Settings:
  regions: tuple[str, ...] = ("nose", "chin")
  seeds: tuple[int, ...] = (0, 1)
  steps: int = 200
  rate: float = 3e-3
  labels: str = "shuffled"
  verbose: bool = False
  hidden: float = 0.5  # not made a flag: keeps its default


_HELP = {"regions": "r", "seeds": "s", "steps": "n", "rate": "lr", "labels": "l", "verbose": "v"}


def test_defaults_come_from_the_dataclass():
  values = flags.FlagValues()
  holders = cli.define_settings(_Settings, _HELP, flag_values=values)
  values(["prog"])
  assert cli.settings_from_flags(_Settings, holders) == _Settings()
  assert values["seeds"].default == ["0", "1"] and values["steps"].default == 200


def test_flags_set_the_fields_with_their_types():
  values = flags.FlagValues()
  holders = cli.define_settings(_Settings, _HELP, flag_values=values)
  values(["prog", "--regions=forehead", "--seeds=3,4,5", "--steps=7", "--rate=0.1", "--labels=balanced", "--verbose"])
  got = cli.settings_from_flags(_Settings, holders)
  assert got == _Settings(("forehead",), (3, 4, 5), 7, 0.1, "balanced", True)
  assert isinstance(got.seeds[0], int) and isinstance(got.regions, tuple)


def test_a_field_of_another_type_is_refused():
  @dataclasses.dataclass(frozen=True)
  class Odd:
    pair: dict = dataclasses.field(default_factory=dict)

  with pytest.raises(TypeError, match=r"Odd\.pair"):
    cli.define_settings(Odd, {"pair": "p"}, flag_values=flags.FlagValues())


# Command-line errors, run as the user runs them. Each is checked before JAX is imported: a run takes ~0.5 s.
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _script(name: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, str(ROOT / "scripts" / name), *args], capture_output=True, text=True, timeout=120
  )


def _one_line_error(proc: subprocess.CompletedProcess) -> str:
  """The single stderr line of a refused command (no config dump, no traceback, no usage text), exit status 1."""
  assert proc.returncode == 1, proc.stderr[-2000:]
  lines = proc.stderr.splitlines()
  assert len(lines) == 1, proc.stderr[-2000:]
  assert lines[0].startswith("error: ")
  return lines[0].removeprefix("error: ")


_FRACTION = "or a fraction of the face width below 1 (the paper's 0.07)"


@pytest.mark.parametrize(
  "args,message",
  [
    (
      ["--config.occlusion.patch=5"],
      "--config.occlusion.patch: the config has no such key (did you mean --config.occlusion.patch_size?); "
      "--list_config lists the keys",
    ),
    (
      ["--config=configs/age.py", "--config.occlusion.strde=2"],
      "--config.occlusion.strde: the config has no such key (did you mean --config.occlusion.stride?); "
      "--list_config lists the keys",
    ),
    (
      ["--config.occlusion.patch_size=-3"],
      f"--config.occlusion.patch_size=-3: must be positive: an odd number of crop pixels (3, 5, ...) {_FRACTION}",
    ),
    (
      ["--config.occlusion.patch_size=4"],
      f"--config.occlusion.patch_size=4: a size in pixels must be an odd integer (3 or 5) {_FRACTION}",
    ),
    (
      ["--config.occlusion.patch_size=500"],
      f"--config.occlusion.patch_size=500: larger than the gender model's 32 px crop; give an odd size up to 31 "
      f"{_FRACTION}",
    ),
    (
      ["--model=age", "--config.occlusion.patch_size=65"],
      "--config.occlusion.patch_size=65: larger than the age model's 64 px crop; give an odd size up to 63 "
      f"{_FRACTION}",
    ),
    (
      ["--config.occlusion.baseline=grey"],
      "--config.occlusion.baseline=grey: must be one of black, white, mean, blur (black and white: that pixel colour "
      "run through the model's preprocessing; mean: the crop's mean colour; blur: the crop blurred) or a number (a "
      "constant in model input space)",
    ),
    (
      ["--model=nope"],
      "--model=nope: must be a built-in model (gender, age, expression, identity) or package.module:factory, "
      "PATH.py:factory or onnx:PATH (--list_models describes them)",
    ),
    (["--config=configs/nope.py"], "--config=configs/nope.py: no such file"),
    (["--nope"], "Unknown command line flag 'nope' (--help lists the flags)"),
    (["stray"], "Unexpected arguments: stray"),
  ],
)
def test_command_line_errors_are_one_line(tmp_path, args, message):
  assert _one_line_error(_script("occlusion.py", f"--out_dir={tmp_path / 'out'}", *args)) == message
  assert not (tmp_path / "out").exists()


def test_an_out_dir_that_cannot_be_a_folder_is_one_line(tmp_path):
  file = tmp_path / "taken"
  file.write_text("")
  assert _one_line_error(_script("cis.py", f"--out_dir={file}")) == f"--out_dir={file}: is a file, not a folder"
  message = _one_line_error(_script("fit.py", f"--out_dir={file / 'sub'}"))
  assert message == f"--out_dir={file / 'sub'}: cannot be created: {file} is a file"


def test_a_missing_required_flag_is_one_line():
  message = _one_line_error(_script("cis.py"))
  assert message == "flag --out_dir=None: Flag --out_dir must have a value other than None. (--help lists the flags)"


def test_list_models_needs_no_other_flag_and_loads_nothing():
  proc = _script("cis.py", "--list_models")
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0] == "built-in models (--model=NAME; weights fetched on first use):"
  assert lines[1] == "  gender      32 px face crop; outputs: female, male; score: log_odds"
  assert [line.split()[0] for line in lines[1:5]] == ["gender", "age", "expression", "identity"]
  assert lines[5] == "or your own model:"
  assert [line.split()[0] for line in lines[6:] if not line.startswith("    ")] == [
    "onnx:PATH",
    "PATH.py:factory",
    "package.module:factory",
  ]


def test_list_config_prints_every_key_as_an_override():
  proc = _script("occlusion.py", "--config=configs/age.py", "--config.occlusion.stride=3", "--list_config")
  assert proc.returncode == 0 and proc.stderr == "", proc.stderr
  lines = proc.stdout.splitlines()
  assert lines[0].startswith("# --config.<key>=value overrides a key")
  assert "--config.model=age" in lines and "--config.occlusion.stride=3" in lines
  assert "--config.occlusion.patch_size=0.07" in lines and "--config.cms.dataset=''" in lines
  keys = [key for key, _ in config_lib.flat_items(config_lib.default_config())]
  assert [line.split("=")[0] for line in lines[1:]] == [f"--config.{key}" for key in keys]


@pytest.mark.parametrize("name", ["cis.py", "occlusion.py", "fit.py", "cms.py", "verify.py", "faithfulness.py"])
def test_help_lists_the_scripts_main_flags(name):
  proc = _script(name, "--help")
  wanted = {"--config", "--list_config", "--out_dir"}
  wanted |= {"--model", "--list_models"} if name != "fit.py" else set()
  wanted |= {"--morphable_model"} if name != "occlusion.py" else set()
  listed = {flag for flag in wanted if f"\n  {flag}: " in proc.stdout or f"\n  --[no]{flag[2:]}: " in proc.stdout}
  assert listed == wanted, proc.stdout
  assert f"python scripts/{name}" in proc.stdout  # the docstring's examples


# In-process: the pieces behind the messages.


def test_resolve_names_the_flag_that_set_a_bad_value():
  values = flags.FlagValues()
  model = flags.DEFINE_string("model", None, "m", flag_values=values)
  values(["prog", "--model=nope"])
  with pytest.raises(app.UsageError, match=r"^--model=nope: must be a built-in model"):
    cli.resolve(mock.Mock(value=config_lib.default_config()), {"model": model})
  config = config_lib.default_config()
  config.occlusion.stride = 0
  with pytest.raises(app.UsageError, match=r"^--config\.occlusion\.stride=0: must be an integer >= 1"):
    cli.resolve(mock.Mock(value=config), {})


def test_resolve_sets_a_nested_key_from_a_script_flag():
  values = flags.FlagValues()
  images = flags.DEFINE_string("images", None, "i", flag_values=values)
  values(["prog", "--images=builtin:photos"])
  holder = mock.Mock(value=config_lib.default_config())
  assert cli.resolve(holder, {"cms.dataset": images}).cms.dataset == "builtin:photos"
