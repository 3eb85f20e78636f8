"""Writes launch/constraints.txt: every package a TPU worker installs, pinned to this machine's.

  python launch/lock.py           # rewrite launch/constraints.txt
  python launch/lock.py --check   # exit 1 if it differs from what this machine would write

The planner (`python -m parti_jax.aot`) was validated here with these jax, jaxlib and libtpu,
so the pods run them too: launch/tpu_pod.sh installs the package with `-c` this file, and the
Dockerfile installs it with `-r` (then the package with --no-deps). Run it after changing the
installed versions, on Linux x86_64 with the Python the workers use (3.11), so that the
platform markers resolve as they will there.

The requirements are read from setup.py (install_requires and the `tpu` extra), not from the
installed metadata, which can be older than setup.py for an editable install; each is followed
through the installed distributions' own requirements. A requirement that is not installed here
is reported and left unpinned.
"""

import argparse
import importlib.metadata as metadata
import os
import pathlib
import sys
from unittest import mock

import setuptools
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = pathlib.Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "launch" / "constraints.txt"
EXTRAS = ("tpu",)
HEADER = """\
# Every package a TPU worker installs, pinned to what the planner and the tests ran with:
# written by `python launch/lock.py` (do not edit by hand; rerun it after an upgrade).
# launch/tpu_pod.sh installs with `-c` this file, the Dockerfile with `-r` it.
"""


def setup_requirements() -> list[Requirement]:
  """install_requires and the EXTRAS of setup.py, as setup.py says today."""
  captured = {}
  with mock.patch.object(setuptools, "setup", lambda **kw: captured.update(kw)):
    code = compile((ROOT / "setup.py").read_text(), "setup.py", "exec")
    cwd = pathlib.Path.cwd()
    try:
      os.chdir(ROOT)  # setup.py reads README.md relative to the working directory
      exec(code, {"__name__": "__main__"})  # pylint: disable=exec-used
    finally:
      os.chdir(cwd)
  names = list(captured["install_requires"])
  for extra in EXTRAS:
    names += captured["extras_require"][extra]
  return [Requirement(r) for r in names]


def closure(roots: list[Requirement]) -> tuple[dict[str, str], list[str]]:
  """{name: installed version} of the roots and everything they require; and the missing."""
  pinned, missing, todo, seen = {}, [], list(roots), set()
  while todo:
    req = todo.pop()
    extras = frozenset(req.extras)
    key = (canonicalize_name(req.name), extras)
    if key in seen:
      continue
    seen.add(key)
    try:
      dist = metadata.distribution(req.name)
    except metadata.PackageNotFoundError:
      missing.append(str(req))
      continue
    pinned[canonicalize_name(dist.metadata["Name"])] = dist.version
    for text in dist.requires or ():
      sub = Requirement(text)
      # The sub-requirement applies without an extra, or with one the parent was asked for.
      wanted = [""] + sorted(extras)
      if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in wanted):
        todo.append(sub)
  return pinned, missing


def render(pinned: dict[str, str]) -> str:
  return HEADER + "".join(f"{name}=={version}\n" for name, version in sorted(pinned.items()))


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--check", action="store_true", help="compare instead of writing")
  args = parser.parse_args()
  pinned, missing = closure(setup_requirements())
  pinned.pop("parti-jax", None)
  for req in missing:
    print(f"lock.py: {req} is not installed here; left unpinned", file=sys.stderr)
  text = render(pinned)
  if args.check:
    if OUTPUT.read_text() != text:
      print(f"{OUTPUT} differs from this machine's packages: run python launch/lock.py",
            file=sys.stderr)
      return 1
    return 0
  OUTPUT.write_text(text)
  print(f"wrote {len(pinned)} pins to {OUTPUT}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
