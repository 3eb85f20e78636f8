"""The webdataset source: tar shards as img2dataset writes them, read as streams.

A tar's members are grouped by key (the member name up to the first dot of its basename):
an image (jpg, jpeg, png or webp) plus a txt and/or a json ("caption" or "captions"). Tar
file j of T goes to shard j*K//T, by default one tar per shard. A damaged or truncated tar
gives the samples read before the damage, and an error that metadata.json keeps.
"""

import functools
import glob
import gzip
import json
import re
import tarfile
import zlib
from collections.abc import Iterator

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
TAR_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)
# Of those, what a damaged tar raises (the rest, from a bucket, are the bucket's failures).
TAR_DAMAGE = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def tar_samples(path, errors: list) -> Iterator[dict]:
  """Streams a tar's samples: {"key", "members": {ext: bytes, or None if cut off}}.

  A corrupt or truncated tar yields what was readable; the error goes to `errors`.
  """
  sample, count = None, 0
  try:
    # Read as a stream (mode "r|"): from a bucket too, a block at a time, never seeking.
    with _open_input(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
      for member in tar:
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


def _open_input(path):
  with sources.reading(path):
    return epath.Path(path).open("rb")


def _raw_record(sample: dict) -> dict:
  """A sample's image and captions as a raw record; raises BadRecord."""
  members = sample["members"]
  present = [ext for ext in TAR_IMAGE_EXTENSIONS if ext in members]
  image = next((members[ext] for ext in present if members[ext] is not None), None)
  if image is None and present:
    raise BadRecord("corrupt_image", "image member cut off (truncated tar)")
  captions = [members["txt"]] if members.get("txt") is not None else []
  if members.get("json") is not None:
    try:
      meta = json.loads(members["json"])
    except ValueError:
      meta = None
    captions += sources.json_captions(meta) if isinstance(meta, dict) else []
  return {"id": sample["key"], "image": image, "captions": captions}
