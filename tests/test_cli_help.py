"""Every command answers --help with its usage, never a traceback."""

import subprocess
import sys

import pytest
from conftest import ROOT

COMMANDS = ["parti_jax.demo", "parti_jax.train", "parti_jax.sample", "parti_jax.aot",
            "parti_jax.inspect", "parti_jax.data.ingest", "parti_jax.data.encode",
            "parti_jax.data.spm", "parti_jax.data.shapes", "parti_jax.eval.fid",
            "parti_jax.eval.shapes"]


@pytest.mark.parametrize("module", COMMANDS)
def test_help_prints_usage(module):
  run = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  out = run.stdout + run.stderr
  assert "Traceback" not in out, out[-3000:]
  # argparse prints "usage:"; absl's commands print their flags, with --helpfull.
  assert "usage:" in out or "--helpfull" in out, out[-3000:]
