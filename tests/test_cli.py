"""`cli`: flags made from a settings dataclass keep its defaults and types, and refuse a field they cannot make."""

import dataclasses

import pytest
from absl import flags

from canonsal_jax import cli


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
