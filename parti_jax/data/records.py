"""Shard sets: ArrayRecord shards of msgpack records plus one metadata.json.

A shard set is a directory:

  DIR/NAME-00000-of-00064.array_record   one msgpack-encoded dict per record
  DIR/metadata.json                      name, kind, record counts, fields, how it was made

Image records hold `id` (str), `image` (the file's bytes as stored: JPEG, PNG, ...),
`captions` (list of str) and optional `extra` (e.g. the shapes scene). Token records, made
by `parti_jax.data.encode`, hold `id`, `captions`, `text_tokens` (one list of ids per
caption) and `image_codes` (uint16 bytes, row-major grid), plus `extra`.

msgpack keeps bytes as bytes and str as str without base64 or a schema, and every
language reads it; ArrayRecord gives grain random access for a global shuffle.

Writes are atomic: a shard is written under a temporary name and renamed when complete,
so a killed writer never leaves a file that reads as a finished shard. A shard set may live
in a bucket (gs://..., through etils.epath): there a shard is written to local disk and
uploaded as one object, which appears only once whole (buckets have no rename), and
metadata.json is written last.

Reading shards in a bucket: ArrayRecord's readers need a file system, so a bucket mounted
with Cloud Storage FUSE (gcsfuse; the pod launchers mount the data's bucket) is read through
the mount: PARTI_GCS_MOUNT=ROOT names where buckets are mounted (ROOT/BUCKET/...). Without
it, gs:// paths go to ArrayRecord's own GCS reader as they are.
"""

import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import functools
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import time
import uuid

import msgpack
from array_record.python import array_record_module
from etils import epath

METADATA = "metadata.json"
FORMAT = "parti_jax.records/1"
# group_size 1: every record is its own chunk, so a random read decodes one record.
# Uncompressed: images are stored compressed already and token records are tiny.
WRITER_OPTIONS = "group_size:1,uncompressed"
VERIFY_THREADS = 32  # shards whose counts are checked at once

# Why a record was skipped. A fixed order, so counts travel as int vectors through the
# input pipeline and sum across processes; metrics name them `skipped/<reason>`.
SKIP_REASONS = (
    "undecodable_record",  # not a msgpack map: a corrupt or foreign record
    "missing_image",  # no image field / no image file / empty image
    "corrupt_image",  # bytes no image decoder accepts, or truncated
    "image_too_large",  # more pixels than the configured maximum
    "missing_caption",  # no caption where captions are required
    "missing_tokens",  # token record without text tokens or image codes of the right size
)


# What one input may cost (docs/trust.md): each far above any real file of its kind, so only
# a broken or hostile one meets it. A larger input is refused or skipped unread.
MAX_IMAGE_BYTES = 256 << 20  # an image file or tar member (a 100-megapixel JPEG is ~50 MB)
MAX_TEXT_BYTES = 1 << 20  # a caption line or .txt, a tar's txt or json member
MAX_METADATA_BYTES = 64 << 20  # metadata.json (shard counts and errors: ~1 MB per 50k shards)


class BadRecord(Exception):
  """A record that cannot be used; `reason` is one of SKIP_REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    assert reason in SKIP_REASONS, reason
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


class DataError(RuntimeError):
  """A dataset that cannot be read as asked; the message names the file or shard."""


class TooLarge(DataError):
  """A file larger than its kind may be (`read_limited`): broken or hostile, never read."""


def shard_name(name: str, index: int, num_shards: int) -> str:
  return f"{name}-{index:05d}-of-{num_shards:05d}.array_record"


def pack(record: dict) -> bytes:
  return msgpack.packb(record, use_bin_type=True)


def unpack(data: bytes) -> dict:
  """Decodes one record; raises BadRecord for anything that is not a msgpack map.

  msgpack bounds every length a record declares by the record's own size and its nesting
  by a fixed depth, so a hostile record costs no more than its bytes.
  """
  try:
    record = msgpack.unpackb(data, raw=False, unicode_errors="replace", strict_map_key=False)
  except Exception as e:  # msgpack raises several unrelated types for bad input
    raise BadRecord("undecodable_record", repr(e)[:200]) from None
  if not isinstance(record, dict):
    raise BadRecord("undecodable_record", f"a {type(record).__name__}, not a map")
  return record


def as_record(raw) -> dict:
  """A record from a source: msgpack bytes are decoded, dicts (TFDS) pass through.

  A TFDS element that could not be read arrives as a dict with an "error".
  """
  if isinstance(raw, bytes):
    return unpack(raw)
  if raw.get("error"):
    raise BadRecord("undecodable_record", raw["error"])
  return raw


GCS_MOUNT_VARIABLE = "PARTI_GCS_MOUNT"


def is_bucket(path) -> bool:
  return "://" in str(path)


def readable_path(path) -> str:
  """Where ArrayRecord reads `path`: through its bucket's FUSE mount under PARTI_GCS_MOUNT
  where that bucket is mounted, else the gs:// path itself (ArrayRecord's GCS reader)."""
  path = str(path)
  mount = os.environ.get(GCS_MOUNT_VARIABLE)
  if mount and path.startswith("gs://"):
    bucket, _, rest = path[len("gs://"):].partition("/")
    if os.path.ismount(os.path.join(mount, bucket)):
      return os.path.join(mount, bucket, rest)
  return path


def temp_path(path: pathlib.Path) -> pathlib.Path:
  """Where `path` is written before the rename that makes it final (hidden, unique)."""
  return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def is_temp_of(name: str, final_names) -> bool:
  """Whether a file name is a `temp_path` of one of `final_names`."""
  return (name.startswith(".") and name.endswith(".tmp")
          and name[1:].rsplit(".", 2)[0] in set(final_names))


def num_records(path) -> int:
  reader = array_record_module.ArrayRecordReader(readable_path(path))
  try:
    return reader.num_records()
  finally:
    reader.close()


def allow_open_files(needed: int, what: str) -> None:
  """Raises this process's open-file limit to `needed` if the hard limit allows it."""
  import resource
  soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
  if soft == resource.RLIM_INFINITY or soft >= needed:
    return
  if hard != resource.RLIM_INFINITY and hard < needed:
    raise DataError(f"{what}: needs {needed} open files (one reader per shard and some to "
                    f"spare) but the hard limit is {hard}; raise it (ulimit -Hn, or "
                    "/etc/security/limits.conf), or write the set in fewer shards")
  resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def atomic_write_text(path, text: str) -> None:
  """Readers see the old text or the new, never part of it."""
  atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path, data: bytes) -> None:
  """Readers see the old contents or the new, never part of them."""
  path = epath.Path(path)
  if is_bucket(path):
    path.write_bytes(data)  # an object is replaced whole when its upload completes
    return
  with atomic_output(path) as f:
    f.write(data)


@contextlib.contextmanager
def atomic_output(path):
  """A binary file whose contents replace `path` whole when the block ends; when it raises
  (a full disk, Ctrl-C) `path` stays as it was and nothing else is left behind.

  On a disk the file is a `temp_path` beside `path`, renamed into place; for a bucket it is
  an anonymous local file, uploaded when the block ends (an object appears only whole)."""
  path = epath.Path(path)
  if is_bucket(path):
    with tempfile.TemporaryFile() as f:
      yield f
      f.seek(0)
      _upload(f, path)
    return
  tmp = temp_path(pathlib.Path(path))
  try:
    with open(tmp, "wb") as f:  # our own temporary file, beside the user's path
      yield f
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def staging_dir(out) -> pathlib.Path | None:
  """Where shards bound for a bucket directory OUT are written before their upload: a local
  folder named after OUT, so that a rerun finds what a killed run left there, and only
  that. None for a local OUT, whose shards are written beside their final names."""
  out = epath.Path(out)
  if not is_bucket(out):
    return None
  digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
  return pathlib.Path(tempfile.gettempdir()) / "parti_jax_staging" / f"{out.name}-{digest}"


def remove_staging_dir(out) -> None:
  """Removes OUT's staging folder once nothing waits in it; one that still holds another
  process's file (or what a killed run of another process index left) stays for that one."""
  staging = staging_dir(out)
  if staging is not None:
    with contextlib.suppress(OSError):
      staging.rmdir()


def remove_temps(directory, final_names) -> None:
  """Deletes what killed writers left of `final_names` (only those: another process may be
  writing its own now): beside them on local disk; for a bucket directory, in its staging
  folder, since a bucket only ever holds whole objects."""
  staging = staging_dir(directory)
  local = epath.Path(directory) if staging is None else staging
  if not local.is_dir():
    return
  for leftover in local.iterdir():
    if is_temp_of(leftover.name, final_names):
      leftover.unlink(missing_ok=True)


class ShardWriter:
  """Writes one ArrayRecord shard under a temporary name; `close()` renames it into place.

  In a bucket the temporary file is local, in `staging_dir` of the shard's directory, and
  `close()` uploads it as the final object. Either way it is named as `temp_path` names it,
  so that `is_temp_of` finds what a killed writer left. Used as a context manager, a shard
  whose writing raised is deleted, never renamed.
  """

  def __init__(self, path):
    self.path = epath.Path(path)
    if is_bucket(self.path):
      staging = staging_dir(self.path.parent)
      staging.mkdir(parents=True, exist_ok=True)  # our own local folder, not a user path
      self._tmp = temp_path(staging / self.path.name)
    else:
      self._tmp = temp_path(pathlib.Path(self.path))
    self._writer = array_record_module.ArrayRecordWriter(str(self._tmp), WRITER_OPTIONS)
    self.count = 0

  def write(self, record: dict) -> None:
    self._writer.write(pack(record))
    self.count += 1

  def close(self) -> None:
    self._writer.close()
    if is_bucket(self.path):
      try:
        with open(self._tmp, "rb") as f:  # our own temp file
          _upload(f, self.path)
      finally:
        self._tmp.unlink(missing_ok=True)
      return
    with open(self._tmp, "rb") as f:  # on disk before the name says "finished"
      os.fsync(f.fileno())
    os.replace(self._tmp, self.path)

  def abort(self) -> None:
    self._writer.close()
    self._tmp.unlink(missing_ok=True)

  def __enter__(self):
    return self

  def __exit__(self, exc_type, *_):
    self.abort() if exc_type else self.close()


def _upload(source, path: epath.Path) -> None:
  """Copies an open local file to the object `path`, which exists only once all is sent.

  An fsspec file commits what it holds when closed, also when closed by `with` on an
  exception (an interrupt mid-copy would leave a cut-off object that reads as a finished
  shard): on an exception the upload is cancelled and the file marked closed unflushed.
  """
  out = path.open("wb")
  try:
    shutil.copyfileobj(source, out, 16 << 20)
  except BaseException:
    try:
      out.discard()  # cancels a resumable upload (GCS drops an unfinished one within a week)
    except Exception:  # noqa: BLE001  best effort: nothing is committed either way
      pass
    out.closed = True
    raise
  out.close()


def write_shard(path, records) -> int:
  """Writes `records` (dicts) to one ArrayRecord shard atomically; returns the count."""
  with ShardWriter(path) as writer:
    for record in records:
      writer.write(record)
  return writer.count


def write_metadata(directory, *, name: str, kind: str, shard_counts, fields, made_by: dict,
                   **extra) -> dict:
  meta = dict(format=FORMAT, name=name, kind=kind, num_shards=len(shard_counts),
              count=int(sum(shard_counts)), shard_counts=[int(c) for c in shard_counts],
              fields=list(fields), made_by=dict(made_by, time=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                            time.gmtime())),
              **extra)
  atomic_write_text(epath.Path(directory) / METADATA, json.dumps(meta, indent=1) + "\n")
  return meta


def write_shard_set(directory, name: str, kind: str, records, num_shards: int, made_by: dict,
                    fields=("id", "image", "captions"), **extra) -> dict:
  """Writes an in-memory list of records as `num_shards` contiguous shards + metadata."""
  directory = epath.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  records = list(records)
  bounds = [len(records) * i // num_shards for i in range(num_shards + 1)]
  names = [shard_name(name, i, num_shards) for i in range(num_shards)]
  remove_temps(directory, names)  # what a killed run left
  counts = [write_shard(directory / shard, records[a:b])
            for shard, a, b in zip(names, bounds, bounds[1:])]
  remove_staging_dir(directory)
  return write_metadata(directory, name=name, kind=kind, shard_counts=counts, fields=fields,
                        made_by=made_by, **extra)


def read_metadata(directory) -> dict:
  """A finished shard set's metadata.json, checked; its shards are not looked at (on a
  bucket that is one round trip, where `ShardSet.open` makes one per shard)."""
  path = epath.Path(directory) / METADATA
  if not exists(path):
    raise DataError(f"{path} not found: {directory} is not a finished shard set "
                    "(make one with `python -m parti_jax.data.ingest` or "
                    "`python -m parti_jax.data.shapes`)")
  try:
    meta = json.loads(read_limited(path, MAX_METADATA_BYTES, "a shard set's metadata.json"))
  except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; nested past the stack
    raise DataError(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None
  if not isinstance(meta, dict):
    raise DataError(f"{path} holds a JSON {type(meta).__name__}, not a shard set's metadata")
  if meta.get("format") != FORMAT:
    raise DataError(f"{path}: format {meta.get('format')!r:.80} is not {FORMAT!r}")
  problem = _metadata_problem(meta)
  if problem:
    raise DataError(f"{path}: {problem}; the file was edited or damaged (ingest writes it)")
  return meta


def _metadata_problem(meta: dict) -> str | None:
  """What is wrong with the fields ShardSet relies on, if anything."""
  name, counts, n = meta.get("name"), meta.get("shard_counts"), meta.get("num_shards")
  if (not isinstance(name, str) or not name or name.startswith(".") or "/" in name
      or "\\" in name):
    return f"name {name!r:.80} is not a file name prefix"
  if not isinstance(meta.get("kind"), str):
    return f"kind {meta.get('kind')!r:.80} is not a string"
  if not isinstance(counts, list) or not all(type(c) is int and c >= 0 for c in counts):
    return "shard_counts is not a list of record counts"
  if type(n) is not int or n != len(counts):  # bounds the shard paths made from it
    return f"num_shards {n!r:.40} is not the {len(counts)} shard_counts listed"
  if type(meta.get("count")) is not int or meta["count"] != sum(counts):
    return f"count {meta.get('count')!r:.40} is not the sum of shard_counts ({sum(counts)})"
  return None


def read_limited(path, limit: int, what: str) -> bytes:
  """A file's bytes, local or in a bucket; TooLarge naming it if it holds more than `limit`.

  Its size is checked first, and at most `limit` + 1 bytes are read whatever it says. A
  missing file raises FileNotFoundError, local or not (AccessError if its bucket is
  missing); a bucket's other failures raise AccessError.
  """
  path = epath.Path(path)
  try:
    with path.open("rb") as f:
      data = None if size_of(f) > limit else f.read(limit + 1)
  except Exception as e:  # noqa: BLE001  gcsfs, google-auth and requests raise their own types
    if not is_bucket(path) or isinstance(e, DataError):
      raise  # Python's own errors name the path
    if isinstance(e, FileNotFoundError) and bucket_exists(path):  # gcsfs's names a request
      raise FileNotFoundError(errno.ENOENT, "no such object", str(path)) from None
    raise access_error(path, e) from e
  if data is None or len(data) > limit:
    raise TooLarge(f"{path}: more than the {limit:,} bytes {what} may hold; refused "
                    "(see docs/trust.md)")
  return data


def size_of(file) -> int:
  """An open file's size, by seeking to its end (local files and gcsfs's know it without
  reading); 0 for one that cannot seek, whose reads are bounded instead."""
  if not file.seekable():
    return 0
  size = file.seek(0, os.SEEK_END)
  file.seek(0)
  return size


@dataclasses.dataclass(frozen=True)
class ShardSet:
  """A finished shard set on disk or in a bucket: its metadata and shard paths."""
  directory: epath.Path
  meta: dict

  @classmethod
  def open(cls, directory) -> "ShardSet":
    directory = epath.Path(directory)
    shard_set = cls(directory, read_metadata(directory))
    with concurrent.futures.ThreadPoolExecutor(VERIFY_THREADS) as pool:  # round trips
      found = list(pool.map(exists, shard_set.paths))
    missing = [p.name for p, there in zip(shard_set.paths, found) if not there]
    if missing:
      raise DataError(f"{directory}: {len(missing)} shard(s) listed in {METADATA} are missing, "
                      f"e.g. {missing[0]}")
    return shard_set

  def verify_counts(self) -> None:
    """Checks every shard holds the number of records metadata.json says.

    Each check opens a shard and reads its footer: a round trip on a bucket, so they run
    in parallel threads (the reads release the GIL).
    """
    paths = self.paths
    with concurrent.futures.ThreadPoolExecutor(min(VERIFY_THREADS, len(paths) or 1)) as pool:
      counts = list(pool.map(num_records, paths))
    for path, have, want in zip(paths, counts, self.meta["shard_counts"]):
      if have != want:
        raise DataError(f"{path}: {have} records, but {self.directory / METADATA} says {want}; "
                        "the shard was replaced or the metadata is stale")

  @property
  def kind(self) -> str:
    return self.meta["kind"]

  @property
  def paths(self) -> list[epath.Path]:
    n = self.meta["num_shards"]
    return [self.directory / shard_name(self.meta["name"], i, n) for i in range(n)]

  def __len__(self) -> int:
    return self.meta["count"]

  def shard_of(self, index: int) -> int:
    """The shard holding global record `index` (shards are concatenated in order)."""
    return bisect.bisect_right(self._starts, index) - 1

  @functools.cached_property
  def _starts(self) -> list[int]:
    starts, total = [], 0
    for c in self.meta["shard_counts"]:
      starts.append(total)
      total += c
    return starts

  def read_all(self):
    """Yields every record, decoded, in order (for small sets, tools and tests)."""
    for path in self.paths:
      reader = array_record_module.ArrayRecordReader(readable_path(path))
      try:
        for data in reader.read_all():
          yield unpack(data)
      finally:
        reader.close()


class AccessError(DataError):
  """A path that cannot be reached: no bucket, no permission, no credentials."""


def exists(path) -> bool:
  """`path.exists()`, with the bucket's own problems named instead of a library's trace."""
  try:
    return epath.Path(path).exists()
  except Exception as e:  # noqa: BLE001  gcsfs and google-auth raise their own types
    raise AccessError(access_problem(path, e)) from e


def access_problem(path, error: Exception) -> str:
  """One line saying why `path` cannot be reached, for the errors buckets give."""
  text, kind = str(error), type(error).__name__
  if ("DefaultCredentialsError" in kind or "credentials" in text.lower()
      or "anonymous caller" in text.lower()):  # gcsfs goes anonymous when it finds none
    why = ("no Google Cloud credentials were found: run `gcloud auth application-default "
           "login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service account key")
  elif isinstance(error, PermissionError) or "403" in text or "Forbidden" in text:
    why = ("permission denied: the account needs storage.objects.get/list (and create to "
           "write) on the bucket, e.g. roles/storage.objectAdmin")
  elif "bucket" in text.lower() and ("not exist" in text.lower() or "404" in text):
    why = "the bucket does not exist (or the name is misspelt)"
  else:
    why = f"{kind}: {text.strip().splitlines()[0][:300] if text.strip() else ''}"
  return f"{path}: {why}"


def bucket_exists(path) -> bool:
  """Whether the bucket of a gs:// (or other ://) path exists; True for a local path."""
  if not is_bucket(path):
    return True
  scheme, rest = str(path).split("://", 1)
  try:
    return epath.Path(f"{scheme}://{rest.split('/', 1)[0]}").exists()
  except Exception as e:  # noqa: BLE001  gcsfs and google-auth raise their own types
    raise AccessError(access_problem(path, e)) from e


def access_error(path, error: Exception) -> AccessError:
  """`access_problem` as an AccessError. gcsfs answers a listing in a missing bucket with a
  FileNotFoundError naming only a URL: whether the bucket is there tells what it means."""
  if isinstance(error, FileNotFoundError) and not bucket_exists(path):
    return AccessError(f"{path}: the bucket does not exist (or the name is misspelt)")
  return AccessError(access_problem(path, error))


class Tally:
  """Counts of written, skipped (by reason) and repaired (by kind) records."""

  def __init__(self, d: dict | None = None):
    d = d or {}
    self.written = d.get("written", 0)
    self.skipped = collections.Counter(d.get("skipped", {}))
    self.repaired = collections.Counter(d.get("repaired", {}))

  def add(self, other: "Tally") -> None:
    self.written += other.written
    self.skipped.update(other.skipped)
    self.repaired.update(other.repaired)

  def as_dict(self) -> dict:
    return dict(written=self.written, skipped=dict(sorted(self.skipped.items())),
                repaired=dict(sorted(self.repaired.items())))

  def summary(self) -> str:
    lines = [f"records written: {self.written}",
             f"records skipped: {sum(self.skipped.values())}"]
    lines += [f"  {reason}: {n}" for reason, n in sorted(self.skipped.items())]
    if self.repaired:
      lines.append(f"records repaired: {sum(self.repaired.values())}")
      lines += [f"  {kind}: {n}" for kind, n in sorted(self.repaired.items())]
    return "\n".join(lines)
