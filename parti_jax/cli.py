"""One flag system for every command: absl flags, a private set per command.

  FLAGS = cli.Flags(__doc__)
  FLAGS.string("out", None, "Output directory.", required=True)

  def main(argv=None):
    a = FLAGS.parse(argv)        # a.out, a.args (positional arguments)
    ...

  if __name__ == "__main__":
    cli.run(main)

Every command takes `--help`, and `--config` with `--config.FIELD=VALUE` overrides where it
reads a config (ml_collections' config flags). Why not absl's global FLAGS with `app.run`:
commands are also called in-process (by the demo, by tests, one after another), and on one
global flag set two commands that both define `--out` collide; `app.run` also reads only
`sys.argv`. So each command keeps its flag definitions and parses any argv into a fresh
`flags.FlagValues` (fresh because ml_collections registers the `--config.FIELD` override flags
from the argv it is given); a bad flag exits with status 2 and a one-line message.
"""

import sys
import types
from collections.abc import Callable, Sequence

from absl import flags, logging
from ml_collections import config_flags


class Flags:
  """A command's flags: its docstring as the usage, `--help` built in."""

  def __init__(self, usage: str):
    self.usage = usage
    self._definitions = []  # (define function, args, kwargs), replayed on every parse
    self._required = []

  def _define(self, define, name, *args, required=False, **kwargs):
    self._definitions.append((define, (name, *args), kwargs))
    if required:
      self._required.append(name)

  def _values(self, argv: list[str]) -> flags.FlagValues:
    values = flags.FlagValues()
    for define, args, kwargs in self._definitions:
      if define is config_flags.DEFINE_config_file:
        kwargs = dict(kwargs, sys_argv=argv)
      define(*args, flag_values=values, **kwargs)
    return values

  def string(self, name, default, help, **kwargs):
    self._define(flags.DEFINE_string, name, default, help, **kwargs)

  def integer(self, name, default, help, **kwargs):
    self._define(flags.DEFINE_integer, name, default, help, **kwargs)

  def float(self, name, default, help, **kwargs):
    self._define(flags.DEFINE_float, name, default, help, **kwargs)

  def bool(self, name, default, help, **kwargs):
    self._define(flags.DEFINE_bool, name, default, help, **kwargs)

  def enum(self, name, default, values, help, **kwargs):
    self._define(flags.DEFINE_enum, name, default, values, help, **kwargs)

  def strings(self, name, default, help, **kwargs):
    """A flag given once per value (`--x a --x b`); a value is never split (a prompt may
    hold commas)."""
    self._define(flags.DEFINE_multi_string, name, default, help, **kwargs)

  def config(self, name: str = "config", help: str = "Config file (configs/NAME.py); "
             "override fields with --config.FIELD=VALUE.", lock_config: bool = False):
    self._define(config_flags.DEFINE_config_file, name, None, help, lock_config=lock_config)

  def help_text(self) -> str:
    listed = self._values(["command"]).get_help(include_special_flags=False)
    # absl heads the list with the module that defined the flags: here always this one.
    listed = listed.replace(f"\n{__name__}:\n", "\n", 1)
    return f"{self.usage.strip()}\n\nflags:{listed}"

  def parse(self, argv: Sequence[str] | None = None) -> types.SimpleNamespace:
    """Flag values as attributes, positional arguments as `args`. argv excludes the program
    name (None: sys.argv[1:]). `--help` prints the usage and exits 0; a bad flag exits 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "--helpfull", "-?") for a in argv):
      print(self.help_text())
      raise SystemExit(0)
    try:
      values = self._values(["command", *argv])
      rest = values(["command", *argv])
      missing = [f"--{n}" for n in self._required if values[n].value is None]
      if missing:
        raise flags.Error(f"{', '.join(missing)} required")
    except (flags.Error, ValueError) as e:  # ValueError: a config file that cannot load
      print(f"error: {e}\n(--help for the usage)", file=sys.stderr)
      raise SystemExit(2) from None
    parsed = {n: values[n].value for n in values if "." not in n}
    for define, (name, *_), _ in self._definitions:  # which file each config came from
      if define is config_flags.DEFINE_config_file and parsed[name] is not None:
        parsed[f"{name}_file"] = config_flags.get_config_filename(values[name])
    return types.SimpleNamespace(**parsed, args=rest[1:])


def run(main: Callable[[list[str] | None], object]) -> None:
  """A command's `__main__`: `main(sys.argv[1:])`, with absl's global flags (which libraries
  such as absl logging and grain's workers consult) marked parsed at their defaults."""
  flags.FLAGS.mark_as_parsed()
  logging.use_absl_handler()
  result = main(sys.argv[1:])
  sys.exit(0 if result is None or not isinstance(result, int) else result)
