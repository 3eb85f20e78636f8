"""The folder source: images under a directory, with their captions.

Captions come from a JSONL file ({"file": ..., "caption": ... or "captions": [...]}), a TSV
file (file, caption; header optional; one row per caption) or, without one, a same-named
.txt next to each image (one caption per non-empty line). A record's id is its image's path
relative to the directory; a caption entry without an image, or a line of the captions file
that cannot be read, is an item of its own that the writer counts as skipped.

What a file may cost is bounded (docs/trust.md): a captions-file line longer than
records.MAX_TEXT_BYTES is never held whole (it is read past in blocks and counted as an
undecodable_record); a .txt over that size, or an image file over records.MAX_IMAGE_BYTES,
skips its record, read no further than the limit.
"""

import collections
import dataclasses
import functools
import json
import os
import pathlib

from etils import epath

from parti_jax.data import buckets, records, sources
from parti_jax.data.records import BadRecord, DataError

IMAGE_EXTENSIONS = frozenset({"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"})


@dataclasses.dataclass(frozen=True)
class FolderItem:
  """One candidate record of a folder: an image file and/or a caption entry."""
  id: str
  image: epath.Path | None  # None: a caption entry whose image file does not exist
  captions: tuple = ()  # raw captions (str or bytes) from the captions file
  caption_file: epath.Path | None = None  # same-named .txt, read when the record is made
  problem: tuple[str, str] | None = None  # (reason, detail) found while listing


def plan(images_dir, captions_file, num_shards: int | None) -> sources.Plan:
  """The folder's items (listed once) in K shards: by default one per 10,000 items."""
  items = list_items(images_dir, captions_file)
  k = num_shards or sources.default_num_shards(len(items))

  def jobs(shard, errors):
    del errors  # problems found while listing are items of their own
    for i in sources.shard_range(shard, len(items), k):
      yield items[i].id, functools.partial(_raw_record, items[i])

  paths = [sources.absolute(images_dir, resolve=True)]
  paths += [sources.absolute(captions_file, resolve=True)] if captions_file else []
  return sources.Plan("folder", len(items), k,
                      sources.fingerprint_of("folder", [i.id for i in items], k),
                      {"source": "folder", "paths": paths}, jobs,
                      lambda s: len(sources.shard_range(s, len(items), k)))


def list_items(images_dir, captions_file=None) -> list[FolderItem]:
  """Every candidate record of a folder, sorted by id (the image's relative path)."""
  root = epath.Path(images_dir)
  with buckets.reported(root):
    is_dir = root.is_dir()
  if not is_dir:
    raise sources.not_found(root, f"--images {root}: not a directory")
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
    raise sources.not_found(path, f"--captions {path}: no such file")
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
  for number, line in _lines(path):
    if line is None:
      yield number, None, None, f"longer than {records.MAX_TEXT_BYTES:,} bytes"
      continue
    if not line.strip():
      continue
    try:
      entry = json.loads(line)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; nested past the stack
      yield number, None, None, f"not JSON ({str(e)[:80]})"
      continue
    key = next((entry[k] for k in FILE_KEYS if isinstance(entry, dict)
                and isinstance(entry.get(k), str)), None)
    if key is None:
      yield number, None, None, f"no {FILE_KEYS[0]!r} field"
      continue
    yield number, key, sources.json_captions(entry), None


def _lines(path: epath.Path, limit: int = records.MAX_TEXT_BYTES, block: int = 1 << 20):
  """(line number, line bytes) of a file, or (number, None) for a line over `limit` bytes,
  which is never held whole: the file is read in blocks, and what is held of a line is
  dropped once it passes the limit. (Not readline(limit): 8 KB at a time, it takes seconds
  to pass a gigabyte.)"""
  number, held, too_long = 0, b"", False
  with path.open("rb") as f:
    while data := f.read(block):
      held += data
      start = 0
      while (end := held.find(b"\n", start)) >= 0:
        number += 1
        yield number, None if too_long or end - start > limit else held[start:end + 1]
        start, too_long = end + 1, False
      held = held[start:]
      if len(held) > limit:  # a line past the limit, its end not yet read
        held, too_long = b"", True
  if held or too_long:  # the last line, without a newline
    yield number + 1, None if too_long else held


HEADER_FIELDS = ("file", "filename", "file_name", "image", "image_file", "path", "name", "key",
                 "caption", "captions", "text")


def _tsv_rows(path: epath.Path):
  """(line number, file, [raw caption bytes], None); the first line may be a header."""
  for number, line in _lines(path):
    if line is None:
      yield number, None, None, f"longer than {records.MAX_TEXT_BYTES:,} bytes"
      continue
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


def _raw_record(item: FolderItem) -> dict:
  """Reads one folder item's files into a raw record; raises BadRecord."""
  if item.problem:
    raise BadRecord(*item.problem)
  if item.image is None:
    raise BadRecord("missing_image", "caption entry without an image file")
  captions = list(item.captions)
  if item.caption_file is not None:
    try:
      text = _input_bytes(item.caption_file, records.MAX_TEXT_BYTES)
    except OSError as e:
      raise BadRecord("missing_caption", f"{item.caption_file}: {_why(e)}") from None
    if text is None:
      raise BadRecord("undecodable_record", f"{item.caption_file}: larger than "
                      f"{records.MAX_TEXT_BYTES:,} bytes")
    captions += [line for line in text.splitlines() if line.strip()]
  if not captions:  # before reading the image: no caption, no need for its bytes
    raise BadRecord("missing_caption", "no caption entry for this image")
  try:
    data = _input_bytes(item.image, records.MAX_IMAGE_BYTES)
  except OSError as e:
    raise BadRecord("missing_image", _why(e)) from None
  if data is None:
    raise BadRecord("image_too_large", f"a file larger than {records.MAX_IMAGE_BYTES:,} bytes")
  return {"id": item.id, "image": data, "captions": captions}


def _input_bytes(path: epath.Path, limit: int) -> bytes | None:
  """A file's bytes, or None if it holds more than `limit` (no more than that is read)."""
  with sources.reading(path), path.open("rb") as f:
    data = None if records.size_of(f) > limit else f.read(limit + 1)
  return data if data is not None and len(data) <= limit else None


def _why(error: OSError) -> str:
  return str(error.strerror or "No such file or directory")  # gcsfs names only the URL
