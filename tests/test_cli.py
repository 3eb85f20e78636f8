"""parti_jax.cli, the one flag system: each command's own flags, parsed from any argv."""

import pytest
from conftest import ROOT

from parti_jax import cli


def flags_of():
  f = cli.Flags("Usage: python -m example --out DIR [FILES...]")
  f.string("out", None, "Where to write (100% of it).", required=True)
  f.integer("count", 3, "How many.")
  f.bool("no_progress", False, "No progress bar.")
  f.strings("prompt", None, "A prompt; repeat the flag for several.")
  f.config()
  return f


def test_flags_parse_values_positionals_and_config_overrides():
  f = flags_of()
  a = f.parse(["--out", "o", "first", "--count=5", "--no_progress", "--prompt", "a, b",
               "--prompt", "c", "--config", str(ROOT / "configs" / "parti_tiny.py"),
               "--config.seed=7", "second"])
  assert (a.out, a.count, a.no_progress, a.args) == ("o", 5, True, ["first", "second"])
  assert a.prompt == ["a, b", "c"]  # never split at commas
  assert a.config.seed == 7 and a.config_file.endswith("parti_tiny.py")
  # A second parse starts from the defaults: nothing carries over from the first.
  b = f.parse(["--out", "p"])
  assert (b.out, b.count, b.no_progress, b.prompt, b.config, b.args) == ("p", 3, False, None,
                                                                         None, [])


def test_two_commands_with_the_same_flag_names_live_side_by_side():
  one, two = flags_of(), flags_of()  # absl's global FLAGS would refuse the second --out
  assert one.parse(["--out", "1"]).out == "1" and two.parse(["--out", "2"]).out == "2"


@pytest.mark.parametrize("argv, message", [
    ([], "--out required"),
    (["--out", "o", "--count", "many"], "count"),
    (["--out", "o", "--nonsense"], "nonsense"),
])
def test_a_bad_command_line_exits_2_with_a_message(argv, message, capsys):
  with pytest.raises(SystemExit) as stop:
    flags_of().parse(argv)
  assert stop.value.code == 2
  assert message in capsys.readouterr().err


def test_help_prints_the_usage_and_every_flag(capsys):
  with pytest.raises(SystemExit) as stop:
    flags_of().parse(["--out", "o", "--help"])
  assert stop.value.code == 0
  out = capsys.readouterr().out
  assert out.startswith("Usage: python -m example") and "100% of it" in out
  for flag in ("--out:", "--count:", "--[no]no_progress:", "--prompt:", "--config:"):
    assert flag in out
