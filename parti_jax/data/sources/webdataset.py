"""The webdataset source: tar shards as img2dataset writes them, read as streams.

A tar's members are grouped by key (the member name up to the first dot of its basename):
an image (jpg, jpeg, png or webp) plus a txt and/or a json ("caption" or "captions"). Tar
file j of T goes to shard j*K//T, by default one tar per shard. A damaged or truncated tar
gives the samples read before the damage, and an error that metadata.json keeps.

A tar is data from anywhere (docs/trust.md), so what it may cost is bounded: a member is read
into memory only if its header declares at most records.MAX_IMAGE_BYTES (an image) or
records.MAX_TEXT_BYTES (a txt or json); a larger one is passed over unread and its sample
skipped and counted. Compressed tars (gzip, bzip2, xz) are decompressed here, a block at a
time, and one that expands more than MAX_EXPANSION times its size stops as damaged (a
decompression bomb); so do extended headers over MAX_TEXT_BYTES, and a member whose declared
size runs past the end of the file.
"""

import bz2
import functools
import glob
import gzip
import json
import lzma
import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import NamedTuple

from etils import epath

from parti_jax.data import buckets, records, sources
from parti_jax.data.records import BadRecord, DataError

# Preference order when a sample holds several image members.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")


def plan(patterns, num_shards: int | None) -> sources.Plan:
  """The tars the patterns name (listed once) in K shards: by default one per tar."""
  tars = expand_tar_patterns(patterns)
  k = num_shards or len(tars)

  def jobs(shard, errors):
    for j in sources.shard_range(shard, len(tars), k):
      for sample in tar_samples(tars[j], errors):
        yield sample["key"], functools.partial(_raw_record, sample)

  made_by = {"source": "webdataset", "paths": [sources.absolute(p) for p in patterns],
             "num_tars": len(tars)}
  return sources.Plan("webdataset", len(tars), k, sources.fingerprint_of("webdataset", tars, k),
                      made_by, jobs, lambda s: None)


def expand_tar_patterns(patterns) -> list[str]:
  """Tar paths from globs, brace ranges ({000..099}, {a,b}) and comma-separated lists."""
  paths, missing = [], []
  for pattern in patterns:
    for part in _split_top_level(pattern):
      for item in _expand_braces(part):
        if glob.has_magic(item):
          matched = _glob_files(item)
          missing += [] if matched else [item]
          paths += matched
        elif _is_file(item):
          paths.append(item)
        else:
          missing.append(item)
  if missing:
    raise sources.not_found(missing[0], f"--tars: nothing found for {missing[:3]}"
                     f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
  if not paths:
    raise DataError("--tars: no tar files given")
  return list(dict.fromkeys(paths))


def _glob_files(pattern: str) -> list[str]:
  """The paths a glob matches, sorted; in a bucket through epath, which lists afresh."""
  if not records.is_bucket(pattern):
    return sorted(glob.glob(pattern, recursive=True))
  parts = pattern.split("/")
  first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
  if first < 3 or "**" in pattern:
    raise DataError(f"--tars {pattern}: in a bucket, patterns may not name the bucket or "
                    "use '**' (one listing per level: write '*/*')")
  base = epath.Path("/".join(parts[:first]))
  with buckets.reported(base):
    return sorted(str(p) for p in base.glob("/".join(parts[first:])))


def _is_file(path: str) -> bool:
  with buckets.reported(path):
    return epath.Path(path).is_file()


def _split_top_level(text: str) -> list[str]:
  """Splits on commas outside braces."""
  parts, depth, current = [], 0, ""
  for ch in text:
    depth += (ch == "{") - (ch == "}")
    if ch == "," and depth == 0:
      parts.append(current)
      current = ""
    else:
      current += ch
  return [p.strip() for p in parts + [current] if p.strip()]


def _expand_braces(text: str) -> list[str]:
  match = re.search(r"\{([^{}]*)\}", text)
  if not match:
    return [text]
  head, body, tail = text[:match.start()], match.group(1), text[match.end():]
  numeric = re.fullmatch(r"(\d+)\.\.(\d+)", body)
  if numeric:
    a, b = numeric.groups()
    choices = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
  elif "," in body:
    choices = body.split(",")
  else:
    return [text]
  return [out for c in choices for out in _expand_braces(head + c + tail)]


def _member_key(name: str) -> tuple[str, str] | None:
  """("dir/key", "ext") of a tar member: the key ends at the first dot of the basename."""
  while name.startswith(("./", "/")):
    name = name[1:] if name.startswith("/") else name[2:]
  directory, _, base = name.rpartition("/")
  if not base or base.startswith(".") or "." not in base:
    return None  # hidden files (._x.jpg from macOS tar) and extensionless members
  stem, _, ext = base.partition(".")
  return (f"{directory}/{stem}" if directory else stem), ext.lower()


WANTED_MEMBERS = frozenset(TAR_IMAGE_EXTENSIONS) | {"txt", "json"}
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error, lzma.LZMAError, RecursionError)
# Of those, what a damaged tar raises (the rest, from a bucket, are the bucket's failures).
# RecursionError: tarfile reads chained extended headers recursively.
TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError,
              RecursionError)
# A compressed tar of images barely shrinks; one of small text members maybe tenfold. Past
# the allowance, more than this many bytes out per byte in is a decompression bomb.
MAX_EXPANSION = 100
EXPANSION_ALLOWANCE = 64 << 20


class Oversized(NamedTuple):
  """A member passed over unread: its header declared more than the limit."""
  size: int
  limit: int


def _member_limit(ext: str) -> int:
  return records.MAX_IMAGE_BYTES if ext in TAR_IMAGE_EXTENSIONS else records.MAX_TEXT_BYTES


def tar_samples(path, errors: list) -> Iterator[dict]:
  """Streams a tar's samples: {"key", "members": {ext: bytes, None if cut off, or Oversized}}.

  A corrupt or truncated tar yields what was readable; the error goes to `errors`.
  """
  sample, count = None, 0
  try:
    # Read as a stream (mode "r|"): from a bucket too, a block at a time, never seeking.
    with _open_input(path) as stream, tarfile.open(
        fileobj=_TarStream(stream), mode="r|", tarinfo=_BoundedTarInfo) as tar:
      while (member := tar.next()) is not None:
        tar.members.clear()  # tarfile keeps every header it read; a stream needs none back
        parsed = _member_key(member.name) if member.isfile() else None
        if parsed is None:
          continue
        key, ext = parsed
        if sample is not None and sample["key"] != key:
          yield sample
          count += 1
          sample = None
        sample = sample or {"key": key, "members": {}}
        if ext in WANTED_MEMBERS and ext not in sample["members"]:
          if member.size > _member_limit(ext):  # tarfile passes over its data, unread
            sample["members"][ext] = Oversized(member.size, _member_limit(ext))
            continue
          sample["members"][ext] = None  # stays None if the data below is cut off
          sample["members"][ext] = tar.extractfile(member).read()
  except TAR_ERRORS as e:
    if records.is_bucket(path) and not isinstance(e, TAR_DAMAGE):
      # The bucket failed mid-stream (a reset connection): not a damaged tar, which a rerun
      # could never repair once its shard is finished.
      raise records.access_error(path, e) from e
    errors.append(f"{path}: unreadable after {count} samples: {type(e).__name__}: {e}")
  if sample is not None:
    yield sample


class TarRefused(tarfile.ReadError):
  """A tar read no further: past its end, a decompression bomb, a huge extended header."""


class _BoundedTarInfo(tarfile.TarInfo):
  """Headers whose data tarfile reads whole into memory (GNU long names, pax and sparse
  extended headers) are refused past records.MAX_TEXT_BYTES."""

  def _proc_member(self, tarfile_):
    extended = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE,
                tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE)
    if self.type in extended and self.size > records.MAX_TEXT_BYTES:
      raise TarRefused(f"an extended header of {self.size:,} bytes (over "
                       f"{records.MAX_TEXT_BYTES:,})")
    return super()._proc_member(tarfile_)


# (magic bytes, the decompressing reader over a file)
_COMPRESSED = ((b"\x1f\x8b", lambda f: gzip.GzipFile(fileobj=f, mode="rb")),
               (b"BZh", bz2.BZ2File), (b"\xfd7zXZ\x00", lzma.LZMAFile))


class _TarStream:
  """The tar in a file as tarfile's stream mode reads it, decompressed here if compressed.

  Here rather than by tarfile ("r|*"), whose bzip2 stream decompresses a block whole (a
  10 KB block may hold gigabytes), and so that the expansion can be bounded. And reading
  again after the end raises: tarfile passes over a member's data a block at a time and
  would go on asking for the blocks of a member declaring 50 GB long after the file ended.
  """

  def __init__(self, stream):
    self._source = _Counted(stream)
    opener = next((o for magic, o in _COMPRESSED if self._source.head.startswith(magic)), None)
    self._data = opener(self._source) if opener else self._source
    self._compressed = opener is not None
    self._produced, self._ended = 0, False

  def read(self, size=-1) -> bytes:
    if self._ended:
      raise TarRefused("unexpected end of data")
    try:
      data = self._data.read(size)
    except Exception as e:  # noqa: BLE001  each decompressor raises its own types
      if self._source.failure is not None or not self._compressed:
        raise  # the file could not be read: the caller tells a bucket's failure from damage
      raise TarRefused(f"compressed data is damaged ({type(e).__name__}: {e})") from e
    self._ended = not data and size != 0
    self._produced += len(data)
    if self._compressed and (self._produced > MAX_EXPANSION * self._source.count
                             + EXPANSION_ALLOWANCE):
      raise TarRefused(f"decompresses to more than {MAX_EXPANSION}x its "
                       f"{self._source.count:,} bytes read: a decompression bomb")
    return data


class _Counted:
  """A file's bytes as read, counted; `head`, its first bytes, is read first and given back."""

  def __init__(self, stream):
    self._stream, self.count, self.failure = stream, 0, None
    self.head = self._read(6)
    self._pending = self.head

  def _read(self, size: int) -> bytes:
    try:
      data = self._stream.read(size)
    except Exception as e:
      self.failure = e
      raise
    self.count += len(data)
    return data

  def read(self, size=-1) -> bytes:
    if not self._pending:
      return self._read(size)
    if 0 <= size <= len(self._pending):
      data, self._pending = self._pending[:size], self._pending[size:]
      return data
    data, self._pending = self._pending, b""
    return data + self._read(size - len(data) if size >= 0 else -1)


def _open_input(path):
  with sources.reading(path):
    return epath.Path(path).open("rb")


def _raw_record(sample: dict) -> dict:
  """A sample's image and captions as a raw record; raises BadRecord."""
  members = sample["members"]
  for ext, value in members.items():
    if isinstance(value, Oversized):
      reason = "image_too_large" if ext in TAR_IMAGE_EXTENSIONS else "undecodable_record"
      raise BadRecord(reason, f"{ext} member of {value.size:,} bytes, over the "
                      f"{value.limit:,} allowed: passed over unread")
  present = [ext for ext in TAR_IMAGE_EXTENSIONS if ext in members]
  image = next((members[ext] for ext in present if members[ext] is not None), None)
  if image is None and present:
    raise BadRecord("corrupt_image", "image member cut off (truncated tar)")
  captions = [members["txt"]] if members.get("txt") is not None else []
  if members.get("json") is not None:
    try:
      meta = json.loads(members["json"])
    except (ValueError, RecursionError):  # bad JSON, bad UTF-8, or nested past the stack
      meta = None
    captions += sources.json_captions(meta) if isinstance(meta, dict) else []
  return {"id": sample["key"], "image": image, "captions": captions}
