"""Sources of image-text data for ingest, each as a plan of shards to write.

A source lists its inputs (files, tars, a dataset's elements) once, up front, and returns a
`Plan`: how many input units there are (items, or tar files), how many shards K they go to,
and `jobs(shard, errors)`, the records of one shard as (record id, load) pairs. `load()`
reads one raw record, dict(id, image, captions) with the image bytes as stored, or raises
`records.BadRecord`, which the writer counts by reason. Input unit i of n goes to shard
i*K//n (`shard_range`), so every process that lists the same inputs makes the same plan
and can write any of its shards; the plan's fingerprint says whether they did.

`shard_writer.write` consumes a plan: it checks every record, writes the shards it owns,
resumes from the ones present and writes metadata.json once all exist.

Sources (one module each):
  folder      images under a directory, captions from a JSONL or TSV file or .txt files
  webdataset  tar shards as img2dataset writes them, read as streams
  tfds        a TFDS dataset prepared in array_record format, without TensorFlow; its
              `TfdsRecords` also gives the grain pipeline the same records directly

This module holds what they share: the plan, the shard assignment, and reading an input
path that may be in a bucket.
"""

import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator

from etils import epath

from parti_jax.data import records
from parti_jax.data.records import DataError

RECORDS_PER_SHARD = 10_000  # default shard size for folder and tfds sources

Job = tuple[str, Callable[[], dict]]  # (record id, loads the raw record or raises BadRecord)


@dataclasses.dataclass
class Plan:
  """What to write: K shards, each from a block of input units (items or tar files)."""
  kind: str
  num_units: int
  num_shards: int
  fingerprint: str  # the same on every process that lists the same inputs
  made_by: dict
  jobs: Callable[[int, list], Iterator[Job]]  # (shard, errors) -> jobs of that shard
  shard_size: Callable[[int], int | None]  # records in a shard, if known before reading


def shard_range(shard: int, num_items: int, num_shards: int) -> range:
  """The items i with i * num_shards // num_items == shard: a contiguous block."""
  def start(s):
    return -(-s * num_items // num_shards)
  return range(start(shard), start(shard + 1))


def default_num_shards(num_items: int) -> int:
  return max(1, -(-num_items // RECORDS_PER_SHARD))


def fingerprint_of(*parts) -> str:
  """A short hash of JSON-able parts: equal inputs and options give equal fingerprints."""
  h = hashlib.sha256()
  for part in parts:
    h.update(json.dumps(part, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------
# Input paths: on local disk or in a bucket


@contextlib.contextmanager
def reading(path):
  """Reading one input: "not found" stays the input's own problem, reported or counted as
  on local disk; in a bucket the rest (permission, credentials) stops the ingest."""
  try:
    yield
  except FileNotFoundError:
    raise
  except Exception as e:  # noqa: BLE001
    if not records.is_bucket(path) or isinstance(e, DataError):
      raise
    raise records.access_error(path, e) from e


def not_found(path, message: str) -> DataError:
  """The error for an input that is not there, or for the bucket it names not being there."""
  if records.bucket_exists(path):
    return DataError(message)
  return records.access_error(path, FileNotFoundError(str(path)))


def absolute(path, resolve: bool = False) -> str:
  """A path as metadata.json records it: in a bucket as given, on local disk absolute."""
  if records.is_bucket(path):
    return str(epath.Path(path))
  return os.path.realpath(path) if resolve else os.path.abspath(path)


def json_captions(entry: dict) -> list:
  """The "caption" and "captions" values of a JSON object as a list of raw captions."""
  found = []
  for value in (entry.get("caption"), entry.get("captions")):
    values = value if isinstance(value, list) else [value]
    found += [v if isinstance(v, str) else str(v) for v in values
              if v is not None and not isinstance(v, (dict, list))]
  return found
