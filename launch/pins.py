"""Checks that installed packages have the versions launch/constraints.txt pins.

  python launch/pins.py launch/constraints.txt jax jaxlib libtpu gcsfs

Prints `name=version ...` and exits 0 when every named package is installed at its pinned
version; names the mismatches and exits 1 otherwise. The TPU workers (launch/worker.sh) and
the Dockerfile run it after installing, so that a run never starts on another jax or libtpu
than the planner was validated with.
"""

import importlib.metadata as metadata
import sys

from packaging.utils import canonicalize_name


def pins(path: str) -> dict[str, str]:
  """{canonical name: version} of the `name==version` lines of a constraints file."""
  found = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.split("#", 1)[0].strip()
      if "==" in line:
        name, version = line.split("==", 1)
        found[canonicalize_name(name)] = version.strip()
  return found


def main(argv: list[str]) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  pinned, problems, seen = pins(argv[0]), [], []
  for name in argv[1:]:
    want = pinned.get(canonicalize_name(name))
    try:
      have = metadata.version(name)
    except metadata.PackageNotFoundError:
      have = None
    seen.append(f"{name}={have}")
    if have is None or (want is not None and have != want):
      problems.append(f"{name} {have or 'is not installed'}"
                      f"{f', {argv[0]} pins {want}' if want else ''}")
  print(" ".join(seen))
  for problem in problems:
    print(f"pins.py: {problem}", file=sys.stderr)
  return 1 if problems else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
