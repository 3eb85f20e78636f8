"""Ingest: user image-text data -> a shard set (ArrayRecord shards + metadata.json).

  python -m parti_jax.data.ingest folder --images DIR [--captions FILE.jsonl|FILE.tsv] --out OUT
  python -m parti_jax.data.ingest webdataset --tars 'DIR/{00000..00099}.tar' --out OUT
  python -m parti_jax.data.ingest tfds --name NAME --data_dir DIR --split train \\
      --image_feature image --caption_feature caption --out OUT

Shards are OUT/NAME-0000i-of-0000K.array_record; NAME is --name (--set_name for tfds,
where --name is the dataset), by default the name of OUT.

Sources:
  folder      images under DIR (recursive), captions from a JSONL file
              ({"file": ..., "caption": ... or "captions": [...]}), a TSV file (file, caption;
              header optional; one row per caption) or, without --captions, a same-named
              .txt next to each image (one caption per non-empty line).
  webdataset  tar shards as img2dataset writes them: members grouped by key, an image
              (jpg/jpeg/png/webp) plus a txt and/or json ("caption" or "captions").
  tfds        a TFDS dataset prepared in array_record format; TensorFlow is not needed.

Every record is checked: the image must decode (`images.open_image`) and at least one
caption must be left after `spm.clean_caption`; the rest are skipped and counted by reason.
Records keep the image bytes exactly as stored in the source.

Input item i of n goes to shard i*K//n (a tar file j of T to shard j*K//T). Processes
`--process_index P --num_processes N` (or PARTI_PROCESS_ID / PARTI_NUM_PROCESSES) write
the shards s with s % N == P, so several machines can run the same command on a shared
filesystem. A shard file that exists is finished (written atomically, its tally saved
first under OUT/.stats/), so a rerun resumes; whichever process finds all shards present
writes metadata.json.

Any path may be in a bucket (gs://..., or whatever etils.epath reaches): inputs are listed
afresh and read as streams; a shard is written on local disk (a folder of the temp dir named
after OUT) and uploaded whole after its tally, and metadata.json last, so a rerun resumes
from the shards that are complete as it does on a local disk.

`tfds_source.TfdsRecords` gives the grain pipeline the same records straight from TFDS.
"""

import argparse
import collections
import concurrent.futures
import contextlib
import dataclasses
import fnmatch
import functools
import glob
import gzip
import hashlib
import json
import os
import pathlib
import re
import shlex
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tqdm
from etils import epath

from parti_jax.data import buckets, images, records, spm, tfds_source
from parti_jax.data.records import BadRecord, DataError

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})
# Preference order when a webdataset sample holds several image members.
TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
RECORDS_PER_SHARD = 10_000  # default shard size for folder and tfds sources
DECODE_TARGET = 256  # JPEGs are checked at reduced size: a full decode proves no more
STATS_DIR = ".stats"
FIELDS = ("id", "image", "captions")
MAX_EXAMPLES = 3  # skipped records named per reason, to show what went wrong
# Web-scraped data loses a few records; losing most of a shard means something is wrong.
DEFAULT_MAX_BAD_FRACTION = 0.5
# Options that differ between processes or machines but not in what is written; left
# out of made_by so that every process writes the same metadata.json.
PER_PROCESS_OPTIONS = ("--process_index", "--num_processes", "--num_threads", "--no_progress")

Job = tuple[str, Callable[[], dict]]  # (record id, loads the raw record or raises BadRecord)


# ------------------------------------------------------------------------------------------
# Shard assignment


def shard_range(shard: int, num_items: int, num_shards: int) -> range:
  """The items i with i * num_shards // num_items == shard: a contiguous block."""
  def start(s):
    return -(-s * num_items // num_shards)
  return range(start(shard), start(shard + 1))


def default_num_shards(num_items: int) -> int:
  return max(1, -(-num_items // RECORDS_PER_SHARD))


# ------------------------------------------------------------------------------------------
# Paths: on local disk or in a bucket


@contextlib.contextmanager
def _reading(path):
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


def _not_found(path, message: str) -> DataError:
  """The error for an input that is not there, or for the bucket it names not being there."""
  if records.bucket_exists(path):
    return DataError(message)
  return records.access_error(path, FileNotFoundError(str(path)))


def _absolute(path, resolve: bool = False) -> str:
  """A path as metadata.json records it: in a bucket as given, on local disk absolute."""
  if records.is_bucket(path):
    return str(epath.Path(path))
  return os.path.realpath(path) if resolve else os.path.abspath(path)


def _names_in(directory: epath.Path) -> set[str]:
  """The names in a directory, listed afresh: gcsfs answers iterdir from a listing cached
  earlier (without what other processes wrote since); glob lists the bucket again."""
  with buckets.reported(directory):
    if records.is_bucket(directory):
      return {p.name for p in directory.glob("*")}
    return set(os.listdir(directory))


def _staging_dir(out: epath.Path) -> pathlib.Path | None:
  """Where shards bound for a bucket are written before their upload: a local folder named
  after OUT, so that a rerun finds what a killed run left there, and only that. None for a
  local OUT, whose shards are written beside their final names."""
  if not records.is_bucket(out):
    return None
  digest = hashlib.sha256(str(out).encode()).hexdigest()[:16]
  return pathlib.Path(tempfile.gettempdir()) / "parti_jax_ingest" / f"{out.name}-{digest}"


# ------------------------------------------------------------------------------------------
# Checking one record


def check_record(raw: dict, max_pixels: int = images.DEFAULT_MAX_PIXELS) -> tuple[dict, list]:
  """A raw record (id, image, captions) -> (record to write, repairs); raises BadRecord.

  The image stays the stored bytes (an array, from a TFDS Tensor feature, becomes PNG);
  captions are cleaned, and empty or repeated ones dropped.
  """
  if raw.get("image") is None:
    raise BadRecord("missing_image", "no image")
  captions, repairs = spm.clean_captions(raw.get("captions"))
  if not captions:
    raise BadRecord("missing_caption", "no non-empty caption")
  data = _image_bytes(raw["image"], max_pixels)
  # File and member names may hold bytes that are not UTF-8 (surrogate escapes in str).
  record_id = os.fsencode(str(raw["id"])).decode("utf-8", "replace")
  return {"id": record_id, "image": data, "captions": captions}, repairs


def _image_bytes(image, max_pixels: int) -> bytes:
  """The bytes to store: a file's bytes as they are (once they decode), arrays as PNG."""
  if isinstance(image, np.ndarray) and image.dtype.kind in "OSV" and image.size == 1:
    image = image.item()  # bytes held in a numpy scalar array
  img = images.open_image(image, target=DECODE_TARGET, max_pixels=max_pixels)
  return images.encode_png(np.asarray(img)) if isinstance(image, np.ndarray) else bytes(image)


# ------------------------------------------------------------------------------------------
# Folder source


@dataclasses.dataclass(frozen=True)
class FolderItem:
  """One candidate record of a folder: an image file and/or a caption entry."""
  id: str
  image: epath.Path | None  # None: a caption entry whose image file does not exist
  captions: tuple = ()  # raw captions (str or bytes) from the captions file
  caption_file: epath.Path | None = None  # same-named .txt, read when the record is made
  problem: tuple[str, str] | None = None  # (reason, detail) found while listing


def folder_items(images_dir, captions_file=None) -> list[FolderItem]:
  """Every candidate record of a folder, sorted by id (the image's relative path)."""
  root = epath.Path(images_dir)
  with buckets.reported(root):
    is_dir = root.is_dir()
  if not is_dir:
    raise _not_found(root, f"--images {root}: not a directory")
  files = _list_files(root, IMAGE_EXTENSIONS | {"txt"})
  image_ids = [f for f in files if not f.lower().endswith(".txt")]
  if captions_file is None:
    return _sidecar_items(root, image_ids, {f for f in files if f.lower().endswith(".txt")})
  entries, problems = _read_caption_file(epath.Path(captions_file), root)
  items, used = [], set()
  for rel in image_ids:
    keys = [k for k in (rel, rel.rsplit("/", 1)[-1]) if k in entries]
    used.update(keys)
    captions = tuple(c for k in dict.fromkeys(keys) for c in entries[k])
    items.append(FolderItem(rel, root / rel, captions))
  items += [FolderItem(key, None, tuple(entries[key])) for key in entries if key not in used]
  items += problems
  return sorted(items, key=lambda item: item.id)


def _list_files(root: epath.Path, extensions) -> list[str]:
  """Relative POSIX paths of the files under root with one of `extensions`, sorted.

  Hidden files and folders are tool droppings (.DS_Store, ._x.jpg AppleDouble), not data.
  """
  found = _bucket_files(root) if records.is_bucket(root) else _local_files(root)
  return sorted(f for f in found if _has_extension(f.rsplit("/", 1)[-1], extensions))


def _has_extension(file_name: str, extensions) -> bool:
  return (not file_name.startswith(".") and "." in file_name
          and file_name.rsplit(".", 1)[-1].lower() in extensions)


def _local_files(root: epath.Path) -> list[str]:
  """Relative POSIX paths of the files under a local root, outside hidden folders."""
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    rel_dir = pathlib.Path(directory).relative_to(os.fspath(root)).as_posix()
    found += [f if rel_dir == "." else f"{rel_dir}/{f}" for f in files]
  return found


MAX_FOLDER_DEPTH = 32  # levels of subfolders listed under --images in a bucket


def _bucket_files(root: epath.Path) -> list[str]:
  """Relative paths of the objects under a root in a bucket, outside hidden folders.

  A bucket holds object names, not folders, and epath refuses '**' there: each level is one
  glob ('*', '*/*', ...), listed afresh; a name with names below it is a folder.
  """
  prefix, names = str(root) + "/", set()
  for depth in range(1, MAX_FOLDER_DEPTH + 2):
    with buckets.reported(root):
      level = {str(p).removeprefix(prefix) for p in root.glob("/".join(["*"] * depth))}
    if not level:
      break
    if depth > MAX_FOLDER_DEPTH:
      raise DataError(f"--images {root}: folders nested deeper than {MAX_FOLDER_DEPTH} levels")
    names |= level
  folders = {name.rsplit("/", 1)[0] for name in names if "/" in name}
  return [name for name in names if name not in folders
          and not any(part.startswith(".") for part in name.split("/")[:-1])]


def _sidecar_items(root: epath.Path, image_ids: list[str], texts: set) -> list[FolderItem]:
  items, used = [], set()
  for rel in image_ids:
    txt = rel.rsplit(".", 1)[0] + ".txt"
    if txt in texts:
      used.add(txt)
    items.append(FolderItem(rel, root / rel, caption_file=root / txt if txt in texts else None))
  # A caption file with no image beside it is a caption entry whose image is missing.
  items += [FolderItem(txt, None, caption_file=root / txt) for txt in texts - used]
  return sorted(items, key=lambda item: item.id)


def _read_caption_file(path: epath.Path, root: epath.Path):
  """{file key: [raw captions]} and FolderItems for lines that could not be read."""
  with buckets.reported(path):
    is_file = path.is_file()
  if not is_file:
    raise _not_found(path, f"--captions {path}: no such file")
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json", ".ndjson"):
    rows = _jsonl_rows(path)
  elif suffix in (".tsv", ".txt", ".tab"):
    rows = _tsv_rows(path)
  else:
    raise DataError(f"--captions {path}: expected a .jsonl or .tsv file")
  entries, problems = collections.defaultdict(list), []
  with buckets.reported(path):  # the file is streamed: a bucket's errors may come at any line
    for line_number, key, captions, problem in rows:
      if problem:
        problems.append(FolderItem(f"{path.name}:{line_number:09d}", None, problem=(
            "undecodable_record", f"line {line_number}: {problem}")))
        continue
      entries[_file_key(key, root)].extend(captions)
  return entries, problems


def _file_key(key: str, root: epath.Path) -> str:
  """A caption entry's file as a relative POSIX path (or bare name) to match images."""
  key = key.strip().replace("\\", "/")
  if records.is_bucket(root) and key.startswith(f"{root}/"):  # a full gs:// name
    return key.removeprefix(f"{root}/")
  local_root = pathlib.Path(os.fspath(root))  # a local root: pathlib's absolute(), not epath's
  for base in (local_root.absolute(), local_root.resolve()) if os.path.isabs(key) else ():
    if pathlib.Path(key).is_relative_to(base):
      return pathlib.Path(key).relative_to(base).as_posix()
  while key.startswith("./"):
    key = key[2:]
  return key


FILE_KEYS = ("file", "file_name", "filename", "image", "path")


def _jsonl_rows(path: epath.Path):
  """(line number, file key, raw captions, problem) for each non-empty line."""
  with path.open("rb") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        entry = json.loads(line)
      except ValueError as e:  # bad JSON or bad UTF-8
        yield number, None, None, f"not JSON ({str(e)[:80]})"
        continue
      key = next((entry[k] for k in FILE_KEYS if isinstance(entry, dict)
                  and isinstance(entry.get(k), str)), None)
      if key is None:
        yield number, None, None, f"no {FILE_KEYS[0]!r} field"
        continue
      yield number, key, _json_captions(entry), None


def _json_captions(entry: dict) -> list:
  """The "caption" and "captions" values of a JSON object as a list of raw captions."""
  found = []
  for value in (entry.get("caption"), entry.get("captions")):
    values = value if isinstance(value, list) else [value]
    found += [v if isinstance(v, str) else str(v) for v in values
              if v is not None and not isinstance(v, (dict, list))]
  return found


HEADER_FIELDS = ("file", "filename", "file_name", "image", "image_file", "path", "name", "key",
                 "caption", "captions", "text")


def _tsv_rows(path: epath.Path):
  """(line number, file, [raw caption bytes], None); the first line may be a header."""
  with path.open("rb") as f:
    for number, line in enumerate(f, 1):
      line = line.rstrip(b"\r\n")
      if not line.strip():
        continue
      name, _, caption = line.partition(b"\t")
      # File names are decoded as the filesystem does, so odd bytes still match a file.
      key = os.fsdecode(name.strip())
      if number == 1 and _looks_like_header(key, caption):
        continue
      yield number, key, [caption] if caption.strip() else [], None


def _looks_like_header(first: str, second: bytes) -> bool:
  return (first.lower() in HEADER_FIELDS
          or second.strip().decode("utf-8", "replace").lower() in HEADER_FIELDS)


def _folder_raw(item: FolderItem) -> dict:
  """Reads one folder item's files into a raw record; raises BadRecord."""
  if item.problem:
    raise BadRecord(*item.problem)
  if item.image is None:
    raise BadRecord("missing_image", "caption entry without an image file")
  captions = list(item.captions)
  if item.caption_file is not None:
    try:
      lines = _input_bytes(item.caption_file).splitlines()
    except OSError as e:
      raise BadRecord("missing_caption", f"{item.caption_file}: {_why(e)}") from None
    captions += [line for line in lines if line.strip()]
  if not captions:  # before reading the image: no caption, no need for its bytes
    raise BadRecord("missing_caption", "no caption entry for this image")
  try:
    data = _input_bytes(item.image)
  except OSError as e:
    raise BadRecord("missing_image", _why(e)) from None
  return {"id": item.id, "image": data, "captions": captions}


def _input_bytes(path: epath.Path) -> bytes:
  with _reading(path):
    return path.read_bytes()


def _why(error: OSError) -> str:
  return str(error.strerror or "No such file or directory")  # gcsfs names only the URL


# ------------------------------------------------------------------------------------------
# WebDataset source


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
    raise _not_found(missing[0], f"--tars: nothing found for {missing[:3]}"
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
  with _reading(path):
    return epath.Path(path).open("rb")


def _sample_raw(sample: dict) -> dict:
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
    captions += _json_captions(meta) if isinstance(meta, dict) else []
  return {"id": sample["key"], "image": image, "captions": captions}


# ------------------------------------------------------------------------------------------
# Sources as shard plans


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


def _fingerprint(*parts) -> str:
  h = hashlib.sha256()
  for part in parts:
    h.update(json.dumps(part, sort_keys=True, default=str).encode())
  return h.hexdigest()[:16]


def folder_plan(images_dir, captions_file, num_shards: int | None) -> Plan:
  items = folder_items(images_dir, captions_file)
  k = num_shards or default_num_shards(len(items))

  def jobs(shard, errors):
    del errors  # problems found while listing are items of their own
    for i in shard_range(shard, len(items), k):
      yield items[i].id, functools.partial(_folder_raw, items[i])

  paths = [_absolute(images_dir, resolve=True)]
  paths += [_absolute(captions_file, resolve=True)] if captions_file else []
  return Plan("folder", len(items), k, _fingerprint("folder", [i.id for i in items], k),
              {"source": "folder", "paths": paths}, jobs,
              lambda s: len(shard_range(s, len(items), k)))


def webdataset_plan(patterns, num_shards: int | None) -> Plan:
  tars = expand_tar_patterns(patterns)
  k = num_shards or len(tars)

  def jobs(shard, errors):
    for j in shard_range(shard, len(tars), k):
      for sample in tar_samples(tars[j], errors):
        yield sample["key"], functools.partial(_sample_raw, sample)

  made_by = {"source": "webdataset", "paths": [_absolute(p) for p in patterns],
             "num_tars": len(tars)}
  return Plan("webdataset", len(tars), k, _fingerprint("webdataset", tars, k), made_by, jobs,
              lambda s: None)


def tfds_plan(name, data_dir, split, image_feature, caption_feature, num_shards) -> Plan:
  source = tfds_source.TfdsRecords(name, data_dir, split, image_feature, caption_feature)
  n = len(source)
  k = num_shards or default_num_shards(n)

  def jobs(shard, errors):
    del errors
    for i in shard_range(shard, n, k):
      yield str(i), lambda i=i: records.as_record(source[i])

  made_by = {"source": "tfds", "paths": [_absolute(data_dir)] if data_dir else [],
             "tfds_name": name, "split": split, "image_feature": image_feature,
             "caption_feature": caption_feature}
  return Plan("tfds", n, k, _fingerprint("tfds", name, split, n, image_feature, caption_feature,
                                          k), made_by, jobs, lambda s: len(shard_range(s, n, k)))


# ------------------------------------------------------------------------------------------
# Writing shards


def ingest(plan: Plan, out, name: str, *, process_index: int = 0, num_processes: int = 1,
           max_pixels: int = images.DEFAULT_MAX_PIXELS, num_threads: int = 1,
           max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, command: str = "",
           progress: bool = True) -> dict | None:
  """Writes this process's unfinished shards; returns the metadata once all K exist."""
  out = epath.Path(out)
  staging = _staging_dir(out)
  if staging is None:  # a bucket has no folders to make (and makedirs would make a bucket)
    (out / STATS_DIR).mkdir(parents=True, exist_ok=True)
  names = _names_in(out)  # in a bucket the first request: a missing bucket is named here
  if staging is not None:
    staging.mkdir(parents=True, exist_ok=True)  # our own local folder, not a user path
  k = plan.num_shards
  own = [s for s in range(k) if s % num_processes == process_index]
  done = {s for s in range(k) if records.shard_name(name, s, k) in names}
  todo = [s for s in own if s not in done]
  _remove_temps(out, staging, [records.shard_name(name, s, k) for s in own])
  print(f"{plan.kind}: {plan.num_units} inputs -> {k} shards in {out}; process "
        f"{process_index} of {num_processes} writes {len(own)} of them")
  if done:
    print(f"resuming: {len(done)} of {k} shards already done; {len(todo)} left for this process")
  run_tally = records.Tally()
  sizes = [plan.shard_size(s) for s in todo]
  total = None if None in sizes else sum(sizes)
  with tqdm.tqdm(total=total, unit=" records", disable=not (progress and todo),
                 mininterval=1.0) as bar:
    for s in todo:
      run_tally.add(_write_one(plan, out, staging, name, s, max_pixels, num_threads,
                               max_bad_fraction, bar))
  if todo:
    print(f"this process wrote {len(todo)} shards:\n{run_tally.summary()}")
  meta = _finish(plan, out, name, command)
  if staging is not None and meta is not None:
    # The set is complete: nothing will be staged for it. A folder still holding a killed
    # run's file of another process index is left (rmdir fails) for that one's rerun.
    with contextlib.suppress(OSError):
      staging.rmdir()
  return meta


def _shard_path(out: epath.Path, name: str, shard: int, k: int) -> epath.Path:
  return out / records.shard_name(name, shard, k)


def _stats_path(out: epath.Path, name: str, shard: int, k: int) -> epath.Path:
  return out / STATS_DIR / (records.shard_name(name, shard, k).removesuffix(".array_record")
                            + ".json")


def _remove_temps(out: epath.Path, staging: pathlib.Path | None, shard_names: list[str]):
  """Deletes temp files a killed run left for these shards or their stats: beside them on
  local disk; for a bucket, in the local staging folder (a bucket only holds whole objects).

  Only this process's own shards: another process may be writing its temp files now.
  """
  finals = set(shard_names) | {n.removesuffix(".array_record") + ".json" for n in shard_names}
  for directory in (out, out / STATS_DIR) if staging is None else (staging,):
    for leftover in directory.iterdir():
      if records.is_temp_of(leftover.name, finals):
        leftover.unlink(missing_ok=True)


def _write_one(plan: Plan, out: epath.Path, staging: pathlib.Path | None, name: str, shard: int,
               max_pixels: int, num_threads: int, max_bad_fraction: float,
               bar) -> records.Tally:
  tally, errors = records.Tally(), []
  examples = collections.defaultdict(list)
  k = plan.num_shards

  def checked():
    outcomes = _ordered_map(functools.partial(_run_job, max_pixels=max_pixels),
                            plan.jobs(shard, errors), num_threads)
    for record_id, record, reason, detail, repairs in outcomes:
      bar.update(1)
      if record is None:
        tally.skipped[reason] += 1
        if len(examples[reason]) < MAX_EXAMPLES:
          examples[reason].append(f"{record_id}: {detail}")
        continue
      tally.written += 1
      tally.repaired.update(repairs)
      yield record
    # Still inside write_shard, before it renames the shard into place: a shard file
    # that exists therefore always has its tally beside it, and a shard that is mostly
    # unreadable is never written (raising here makes write_shard discard it).
    skipped = sum(tally.skipped.values())
    if skipped > max_bad_fraction * (skipped + tally.written):
      reasons = ", ".join(f"{r} {n}" for r, n in tally.skipped.most_common())
      raise DataError(
          f"shard {shard} of {k} ({_shard_path(out, name, shard, k).name}): {skipped} of "
          f"{skipped + tally.written} records skipped ({reasons}; e.g. "
          f"{'; '.join(next(iter(examples.values())))}), over --max_bad_fraction="
          f"{max_bad_fraction}. A wrong feature name or file layout is the usual cause.")
    fingerprint = _fingerprint(plan.fingerprint, max_pixels)  # max_pixels changes the content
    stats = {"shard": shard, "num_shards": k, "fingerprint": fingerprint,
             "tally": tally.as_dict(), "examples": dict(examples), "errors": errors}
    stats_path = _stats_path(out, name, shard, k)
    with buckets.reported(stats_path):  # the first write to OUT: no permission to write shows here
      records.atomic_write_text(stats_path, json.dumps(stats, indent=1))

  records.write_shard(_shard_path(out, name, shard, k), checked(), staging)
  for error in errors:
    tqdm.tqdm.write(f"warning: {error}")
  return tally


def _run_job(job: Job, max_pixels: int):
  """(id, record or None, skip reason, detail, repairs); never raises BadRecord."""
  record_id, load = job
  try:
    record, repairs = check_record(load(), max_pixels)
    return record_id, record, None, "", repairs
  except BadRecord as e:
    return record_id, None, e.reason, str(e).removeprefix(f"{e.reason}: "), []


def _ordered_map(fn, items, num_threads: int):
  """map(fn, items) on a thread pool, in order, with a bounded number in flight.

  Decoding images and reading files release the GIL, so threads give real parallelism;
  the bound keeps a streamed tar from being read into memory ahead of the writer.
  """
  if num_threads <= 1:
    yield from map(fn, items)
    return
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    pending = collections.deque()
    for item in items:
      pending.append(pool.submit(fn, item))
      if len(pending) >= 4 * num_threads:
        yield pending.popleft().result()
    while pending:
      yield pending.popleft().result()


def _finish(plan: Plan, out: epath.Path, name: str, command: str) -> dict | None:
  """Writes metadata.json if every shard exists (any process may; the content is the same)."""
  k = plan.num_shards
  names = _names_in(out)  # afresh: other processes may have written shards meanwhile
  present = sum(records.shard_name(name, s, k) in names for s in range(k))
  if present < k:
    print(f"{present} of {k} shards done; metadata.json is written by the process that "
          "finds all of them done")
    others = {n.rsplit("-of-", 1)[-1] for n in names
              if fnmatch.fnmatchcase(n, f"{glob.escape(name)}-*-of-*")
              and n.endswith(".array_record")} - {f"{k:05d}.array_record"}
    if others:
      print(f"warning: {out} also holds shards of a set with another shard count; if the "
            "processes listed different inputs, give them all the same --num_shards")
    return None
  stats = [_read_stats(out, name, s, k) for s in range(k)]
  fingerprints = {st["fingerprint"] for st in stats if st.get("fingerprint")}
  if len(fingerprints) > 1:
    raise DataError(f"{out}: shards were made from different inputs or options (fingerprints "
                    f"{sorted(fingerprints)}); delete {out} and run again")
  total = records.Tally()
  for st in stats:
    total.add(records.Tally(st["tally"]))
  made_by = dict(plan.made_by, command=command)
  extra = {"tally": total.as_dict()}
  errors = [e for st in stats for e in st.get("errors", [])]
  if errors:
    extra["source_errors"] = errors
  meta = _metadata_if_changed(out, name, [st["tally"]["written"] for st in stats], made_by,
                              extra)
  print(f"shard set complete: {out} ({total.written} records in {k} shards)\n{total.summary()}")
  _print_examples(stats)
  return meta


def _read_stats(out: epath.Path, name: str, shard: int, k: int) -> dict:
  path = _stats_path(out, name, shard, k)
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    # A shard without its tally (copied in by hand, or stats deleted): count its records.
    count = records.num_records(_shard_path(out, name, shard, k))
    print(f"warning: {path} missing; counting {count} records in the shard itself")
    return {"tally": {"written": count}}


def _metadata_if_changed(out: epath.Path, name: str, counts, made_by, extra) -> dict:
  """Writes metadata.json unless one with the same content (but its time) is there."""
  path = out / records.METADATA
  try:
    old = json.loads(path.read_text())
  except (OSError, ValueError):
    old = None
  if old is not None:
    old_made_by = dict(old.get("made_by", {}))
    old_made_by.pop("time", None)
    same = (old.get("name") == name and old.get("kind") == "images"
            and old.get("shard_counts") == list(counts) and old_made_by == made_by
            and all(old.get(key) == value for key, value in extra.items())
            and old.get("fields") == list(FIELDS))
    if same:
      return old
  return records.write_metadata(out, name=name, kind="images", shard_counts=counts,
                                fields=FIELDS, made_by=made_by, **extra)


def _print_examples(stats) -> None:
  merged = collections.defaultdict(list)
  for st in stats:
    for reason, lines in (st.get("examples") or {}).items():
      merged[reason] += lines[:MAX_EXAMPLES - len(merged[reason])]
  for reason, lines in sorted(merged.items()):
    print(f"e.g. {reason}: " + "; ".join(lines))
  for st in stats:
    for error in st.get("errors", []):
      print(f"source error: {error}")


# ------------------------------------------------------------------------------------------
# Command line


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else default


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m parti_jax.data.ingest",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="source", required=True)
  folder = sub.add_parser("folder", help="a directory of images with captions")
  folder.add_argument("--images", required=True, help="directory of images (recursive)")
  folder.add_argument("--captions", help="captions .jsonl or .tsv (default: same-named .txt)")
  web = sub.add_parser("webdataset", help="img2dataset-style tar shards")
  web.add_argument("--tars", nargs="+", required=True,
                   help="tar files: globs, {000..099} ranges, or comma-separated lists")
  tf = sub.add_parser("tfds", help="a TFDS dataset prepared in array_record format")
  tf.add_argument("--name", dest="tfds_name", required=True, help="TFDS dataset name")
  tf.add_argument("--data_dir", help="TFDS data_dir (default: TFDS's)")
  tf.add_argument("--split", default="train")
  tf.add_argument("--image_feature", default="image")
  tf.add_argument("--caption_feature", default="caption")
  for s, name_flags in ((folder, ("--name", "--set_name")), (web, ("--name", "--set_name")),
                        (tf, ("--set_name",))):
    s.add_argument("--out", required=True, help="output directory of the shard set")
    s.add_argument(*name_flags, dest="set_name",
                   help="shard file name prefix (default: the name of --out)")
    s.add_argument("--num_shards", type=int, help="K (default: 1 per 10,000 records; "
                   "for webdataset, 1 per tar)")
    s.add_argument("--process_index", type=int, default=_env_int("PARTI_PROCESS_ID", 0))
    s.add_argument("--num_processes", type=int, default=_env_int("PARTI_NUM_PROCESSES", 1))
    s.add_argument("--max_pixels", type=int, default=images.DEFAULT_MAX_PIXELS,
                   help="images with more pixels are skipped as image_too_large")
    s.add_argument("--max_bad_fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help="a shard with more skipped records than this stops the ingest")
    s.add_argument("--num_threads", type=int, default=min(8, os.cpu_count() or 1))
    s.add_argument("--no_progress", action="store_true", help="no progress bar")
  return p


def _command(argv: list[str]) -> str:
  """The command line without per-process options, as recorded in metadata.json."""
  kept, skip_value = [], False
  for arg in argv:
    if skip_value:
      skip_value = False
      continue
    option = arg.split("=", 1)[0]
    if option in PER_PROCESS_OPTIONS:
      skip_value = "=" not in arg and option != "--no_progress"
      continue
    kept.append(arg)
  return " ".join(["python -m parti_jax.data.ingest"] + [shlex.quote(a) for a in kept])


def _set_name(a) -> str:
  out_name = (epath.Path(a.out).name if records.is_bucket(a.out)
              else os.path.basename(os.path.realpath(a.out)))
  raw = a.set_name or out_name
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._-") or "data"


def main(argv=None) -> dict | None:
  argv = list(sys.argv[1:] if argv is None else argv)
  p = _parser()
  a = p.parse_args(argv)
  if not 0 <= a.process_index < a.num_processes:
    p.error(f"--process_index {a.process_index} is not in [0, {a.num_processes})")
  if a.num_shards is not None and a.num_shards < 1:
    p.error("--num_shards must be at least 1")
  if a.source == "folder":
    plan = folder_plan(a.images, a.captions, a.num_shards)
  elif a.source == "webdataset":
    plan = webdataset_plan(a.tars, a.num_shards)
  else:
    plan = tfds_plan(a.tfds_name, a.data_dir, a.split, a.image_feature, a.caption_feature,
                     a.num_shards)
  return ingest(plan, a.out, _set_name(a), process_index=a.process_index,
                num_processes=a.num_processes, max_pixels=a.max_pixels,
                num_threads=a.num_threads, max_bad_fraction=a.max_bad_fraction,
                command=_command(argv), progress=not a.no_progress)


if __name__ == "__main__":
  try:
    main()
  except DataError as e:
    sys.exit(f"error: {e}")
