"""A fake Google Cloud for the launch scripts' tests: gcloud, kubectl, xpk, docker and sleep
on PATH (cloud.py says how each answers), TPU VM workers as directories of this machine, and
what every fake was called with, in order."""

import json
import os
import pathlib
import signal
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOOLS = ("gcloud", "kubectl", "xpk", "docker")


class FakeCloud:
  """One fake cloud in `tmp`, scripted by `scenario` (see cloud.py and trainer.py)."""

  def __init__(self, tmp: pathlib.Path, **scenario):
    self.dir, bin_dir = tmp / "cloud", tmp / "bin"
    self.dir.mkdir()
    bin_dir.mkdir()
    (tmp / "tmp").mkdir()
    for tool in TOOLS:
      shim = bin_dir / tool
      shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{HERE / "cloud.py"}" {tool} "$@"\n')
      shim.chmod(0o755)
    (bin_dir / "sleep").symlink_to(HERE / "bin_sleep")
    self.scenario = scenario
    self.write_scenario()
    self.env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_CLOUD=str(self.dir),
                    FAKE_SYSTEM_PATH=os.environ["PATH"], FAKE_PYTHON=sys.executable,
                    TMPDIR=str(tmp / "tmp"))

  def write_scenario(self, **changes) -> None:
    self.scenario.update(changes)
    (self.dir / "scenario.json").write_text(json.dumps(self.scenario))

  def run(self, script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """launch/SCRIPT ARGS with the fakes on PATH; stdout and stderr are echoed for -s."""
    done = subprocess.run(["bash", str(ROOT / "launch" / script), *args], cwd=ROOT, env=self.env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    print(done.stdout, done.stderr, sep="\n")
    return done

  def gcloud(self, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["gcloud", *args], env=self.env, capture_output=True, text=True,
                          timeout=60, check=False)

  def calls(self, *tools: str) -> list[list[str]]:
    """[tool, *argv] of every call of these fakes (all when none are named), in order."""
    rows = [json.loads(line) for line in self.read("calls.jsonl").splitlines()]
    return [[r["tool"], *r["argv"]] for r in rows if not tools or r["tool"] in tools]

  def trainers(self, event: str | None = None) -> list[dict]:
    rows = [json.loads(line) for line in self.read("trainers.jsonl").splitlines()]
    return [r for r in rows if event is None or r["event"] == event]

  def worker_calls(self) -> list[str]:
    """'TIME S/W uv|python ARGS' lines: what ran on the workers (uv, the venv's python)."""
    return self.read("worker_calls.log").splitlines()

  def home(self, name: str, slice_index: int, worker: int) -> pathlib.Path:
    return self.dir / "vm" / name / f"slice-{slice_index}" / f"worker-{worker}"

  def read(self, name: str) -> str:
    path = self.dir / name
    return path.read_text() if path.exists() else ""

  def close(self) -> None:
    """Ends the fake trainers still running (they were started detached)."""
    exited = {r["pid"] for r in self.trainers("exit")}
    for r in self.trainers("start"):
      if r["pid"] not in exited:
        try:
          os.kill(r["pid"], signal.SIGKILL)
        except ProcessLookupError:
          pass
