"""User paths in buckets (gs://...): what went wrong said in one line naming the path.

Every user path goes through etils.epath, which reaches a bucket through gcsfs. Its errors
name a request, not the path (`FileNotFoundError: b/BUCKET/o`), and a missing bucket reads
like a missing file. The commands check the buckets of their paths before slow work
(`check_bucket`), and read or write user files through `read_bytes` / `reported`, which turn
the client's errors into `records.AccessError` (one line: the path and the cause).
Local paths pass through untouched: their errors are Python's own, which name the path.
"""

import contextlib
import errno

from etils import epath

from parti_jax.data import records

MISSING = "the bucket does not exist (or the name is misspelt)"


def check_bucket(path) -> None:
  """Raises AccessError naming `path` if its bucket is missing or cannot be reached."""
  # gcsfs asks for the bucket's metadata, and lists it where that is not allowed
  # (roles/storage.objectAdmin has no storage.buckets.get): absent only if missing.
  if not records.bucket_exists(path):
    raise records.AccessError(f"{path}: {MISSING}")


@contextlib.contextmanager
def reported(path):
  """Errors of a bucket's client inside become one AccessError naming `path`.

  Wrap only the reads and writes of `path`: any other error inside would be named after it.
  """
  try:
    yield
  except records.DataError:
    raise
  except Exception as e:  # noqa: BLE001  gcsfs, google-auth and requests raise their own types
    if not records.is_bucket(path):
      raise
    raise records.access_error(path, e) from e


def read_bytes(path) -> bytes:
  """A file's bytes. A missing one raises FileNotFoundError naming it, local or not (or
  AccessError, if its bucket is missing); other bucket errors raise AccessError."""
  path = epath.Path(path)
  if not records.is_bucket(path):
    return path.read_bytes()
  try:
    return path.read_bytes()
  except FileNotFoundError:
    check_bucket(path)
    raise FileNotFoundError(errno.ENOENT, "no such object", str(path)) from None
  except Exception as e:  # noqa: BLE001  gcsfs, google-auth and requests raise their own types
    raise records.access_error(path, e) from e


def read_text(path) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes(path, data: bytes) -> None:
  """Writes a file whole (a bucket object appears when its upload completes)."""
  with reported(path):
    records.atomic_write_bytes(path, data)


def exists(path) -> bool:
  """`records.exists`, with a missing bucket said as such rather than False."""
  check_bucket(path)
  return records.exists(path)
