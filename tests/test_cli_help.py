"""Every command answers --help with its usage, never a traceback.

The commands are those the README and docs/*.md show (`python -m parti_jax...`), plus a fixed
list, so a command the docs name cannot be missing or broken unnoticed.
"""

import re
import subprocess
import sys

import pytest
from conftest import ROOT

FIXED = ["parti_jax.demo", "parti_jax.train", "parti_jax.sample", "parti_jax.aot",
         "parti_jax.inspect", "parti_jax.data.ingest", "parti_jax.data.encode",
         "parti_jax.data.spm", "parti_jax.data.shapes", "parti_jax.eval.fid",
         "parti_jax.eval.shapes", "parti_jax.convert.vgg16", "parti_jax.convert.inception"]

# `python -m parti_jax.data.encode ...`; a trailing full stop is not part of the name.
COMMAND = re.compile(r"python3?\s+-m\s+(parti_jax(?:\.[A-Za-z_][A-Za-z0-9_]*)*)")


def documented_commands() -> list[str]:
  """Modules run as `python -m parti_jax...` anywhere in README.md or docs/*.md."""
  pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
  return sorted({m for page in pages if page.exists() for m in COMMAND.findall(page.read_text())})


DOCUMENTED = documented_commands()
COMMANDS = sorted(set(FIXED) | set(DOCUMENTED))


def test_the_docs_commands_are_found():
  # Guards the regex: a pattern that matched nothing would silently test only FIXED.
  assert DOCUMENTED, "no `python -m parti_jax...` command found in README.md or docs/*.md"
  assert "parti_jax.train" in DOCUMENTED, DOCUMENTED


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage(module):
  run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  out = run.stdout + run.stderr
  assert "Traceback" not in out, out[-3000:]
  # Every command is on parti_jax.cli: the module docstring, then its flags.
  assert "\nflags:\n" in run.stdout and "python -m " + module in run.stdout, out[-3000:]
  assert run.returncode == 0, f"exit status {run.returncode}\n{out[-3000:]}"
