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

`tfds_source.TfdsRecords` gives the grain pipeline the same records straight from TFDS.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import glob
import hashlib
import json
import os
import pathlib
import re
import shlex
import sys
import tarfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import tqdm

from parti_jax.data import images, records, spm, tfds_source
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
  image: pathlib.Path | None  # None: a caption entry whose image file does not exist
  captions: tuple = ()  # raw captions (str or bytes) from the captions file
  caption_file: pathlib.Path | None = None  # same-named .txt, read when the record is made
  problem: tuple[str, str] | None = None  # (reason, detail) found while listing


def folder_items(images_dir, captions_file=None) -> list[FolderItem]:
  """Every candidate record of a folder, sorted by id (the image's relative path)."""
  root = pathlib.Path(images_dir)
  if not root.is_dir():
    raise DataError(f"--images {root}: not a directory")
  files = _list_files(root, IMAGE_EXTENSIONS | {"txt"})
  image_ids = [f for f in files if not f.lower().endswith(".txt")]
  if captions_file is None:
    return _sidecar_items(root, image_ids, {f for f in files if f.lower().endswith(".txt")})
  entries, problems = _read_caption_file(pathlib.Path(captions_file), root)
  items, used = [], set()
  for rel in image_ids:
    keys = [k for k in (rel, rel.rsplit("/", 1)[-1]) if k in entries]
    used.update(keys)
    captions = tuple(c for k in dict.fromkeys(keys) for c in entries[k])
    items.append(FolderItem(rel, root / rel, captions))
  items += [FolderItem(key, None, tuple(entries[key])) for key in entries if key not in used]
  items += problems
  return sorted(items, key=lambda item: item.id)


def _list_files(root: pathlib.Path, extensions) -> list[str]:
  """Relative POSIX paths of the files under root with one of `extensions`, sorted."""
  found = []
  for directory, subdirs, files in os.walk(root):
    # Hidden files and folders are tool droppings (.DS_Store, ._x.jpg AppleDouble), not data.
    subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
    rel_dir = pathlib.Path(directory).relative_to(root).as_posix()
    for f in files:
      if not f.startswith(".") and f.rsplit(".", 1)[-1].lower() in extensions and "." in f:
        found.append(f if rel_dir == "." else f"{rel_dir}/{f}")
  return sorted(found)


def _sidecar_items(root: pathlib.Path, image_ids: list[str], texts: set) -> list[FolderItem]:
  items, used = [], set()
  for rel in image_ids:
    txt = rel.rsplit(".", 1)[0] + ".txt"
    if txt in texts:
      used.add(txt)
    items.append(FolderItem(rel, root / rel, caption_file=root / txt if txt in texts else None))
  # A caption file with no image beside it is a caption entry whose image is missing.
  items += [FolderItem(txt, None, caption_file=root / txt) for txt in texts - used]
  return sorted(items, key=lambda item: item.id)


def _read_caption_file(path: pathlib.Path, root: pathlib.Path):
  """{file key: [raw captions]} and FolderItems for lines that could not be read."""
  if not path.is_file():
    raise DataError(f"--captions {path}: no such file")
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json", ".ndjson"):
    rows = _jsonl_rows(path)
  elif suffix in (".tsv", ".txt", ".tab"):
    rows = _tsv_rows(path)
  else:
    raise DataError(f"--captions {path}: expected a .jsonl or .tsv file")
  entries, problems = collections.defaultdict(list), []
  for line_number, key, captions, problem in rows:
    if problem:
      problems.append(FolderItem(f"{path.name}:{line_number:09d}", None,
                                 problem=("undecodable_record", f"line {line_number}: {problem}")))
      continue
    entries[_file_key(key, root)].extend(captions)
  return entries, problems


def _file_key(key: str, root: pathlib.Path) -> str:
  """A caption entry's file as a relative POSIX path (or bare name) to match images."""
  key = key.strip().replace("\\", "/")
  for base in (root.absolute(), root.resolve()) if os.path.isabs(key) else ():
    if pathlib.Path(key).is_relative_to(base):
      return pathlib.Path(key).relative_to(base).as_posix()
  while key.startswith("./"):
    key = key[2:]
  return key


FILE_KEYS = ("file", "file_name", "filename", "image", "path")


def _jsonl_rows(path: pathlib.Path):
  """(line number, file key, raw captions, problem) for each non-empty line."""
  with open(path, "rb") as f:
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


def _tsv_rows(path: pathlib.Path):
  """(line number, file, [raw caption bytes], None); the first line may be a header."""
  with open(path, "rb") as f:
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
      lines = item.caption_file.read_bytes().splitlines()
    except OSError as e:
      raise BadRecord("missing_caption", f"{item.caption_file}: {e.strerror}") from None
    captions += [line for line in lines if line.strip()]
  if not captions:  # before reading the image: no caption, no need for its bytes
    raise BadRecord("missing_caption", "no caption entry for this image")
  try:
    data = item.image.read_bytes()
  except OSError as e:
    raise BadRecord("missing_image", f"{e.strerror}") from None
  return {"id": item.id, "image": data, "captions": captions}


# ------------------------------------------------------------------------------------------
# WebDataset source


def expand_tar_patterns(patterns) -> list[str]:
  """Tar paths from globs, brace ranges ({000..099}, {a,b}) and comma-separated lists."""
  paths, missing = [], []
  for pattern in patterns:
    for part in _split_top_level(pattern):
      for item in _expand_braces(part):
        if glob.has_magic(item):
          matched = sorted(glob.glob(item, recursive=True))
          missing += [] if matched else [item]
          paths += matched
        elif os.path.isfile(item):
          paths.append(item)
        else:
          missing.append(item)
  if missing:
    raise DataError(f"--tars: nothing found for {missing[:3]}"
                    f"{f' and {len(missing) - 3} more' if len(missing) > 3 else ''}")
  if not paths:
    raise DataError("--tars: no tar files given")
  return list(dict.fromkeys(paths))


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


def tar_samples(path, errors: list) -> Iterator[dict]:
  """Streams a tar's samples: {"key", "members": {ext: bytes, or None if cut off}}.

  A corrupt or truncated tar yields what was readable; the error goes to `errors`.
  """
  sample, count = None, 0
  try:
    with tarfile.open(path, mode="r|*") as tar:
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
    errors.append(f"{path}: unreadable after {count} samples: {type(e).__name__}: {e}")
  if sample is not None:
    yield sample


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

  paths = [str(pathlib.Path(images_dir).resolve())]
  paths += [str(pathlib.Path(captions_file).resolve())] if captions_file else []
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

  made_by = {"source": "webdataset", "paths": [os.path.abspath(p) for p in patterns],
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

  made_by = {"source": "tfds", "paths": [os.path.abspath(data_dir)] if data_dir else [],
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
  out = pathlib.Path(out)
  (out / STATS_DIR).mkdir(parents=True, exist_ok=True)
  k = plan.num_shards
  own = [s for s in range(k) if s % num_processes == process_index]
  done = {s for s in range(k) if _shard_path(out, name, s, k).exists()}
  todo = [s for s in own if s not in done]
  _remove_temps(out, [records.shard_name(name, s, k) for s in own])
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
      run_tally.add(_write_one(plan, out, name, s, max_pixels, num_threads, max_bad_fraction,
                               bar))
  if todo:
    print(f"this process wrote {len(todo)} shards:\n{run_tally.summary()}")
  return _finish(plan, out, name, command)


def _shard_path(out: pathlib.Path, name: str, shard: int, k: int) -> pathlib.Path:
  return out / records.shard_name(name, shard, k)


def _stats_path(out: pathlib.Path, name: str, shard: int, k: int) -> pathlib.Path:
  return out / STATS_DIR / (records.shard_name(name, shard, k).removesuffix(".array_record")
                            + ".json")


def _remove_temps(out: pathlib.Path, shard_names: list[str]) -> None:
  """Deletes temp files a killed run left for these shards or their stats.

  Only this process's own shards: another process may be writing its temp files now.
  """
  finals = set(shard_names) | {n.removesuffix(".array_record") + ".json" for n in shard_names}
  for directory in (out, out / STATS_DIR):
    for leftover in directory.iterdir():
      if records.is_temp_of(leftover.name, finals):
        leftover.unlink(missing_ok=True)


def _write_one(plan: Plan, out: pathlib.Path, name: str, shard: int, max_pixels: int,
               num_threads: int, max_bad_fraction: float, bar) -> records.Tally:
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
    records.atomic_write_text(_stats_path(out, name, shard, k), json.dumps(stats, indent=1))

  records.write_shard(_shard_path(out, name, shard, k), checked())
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


def _finish(plan: Plan, out: pathlib.Path, name: str, command: str) -> dict | None:
  """Writes metadata.json if every shard exists (any process may; the content is the same)."""
  k = plan.num_shards
  present = sum(_shard_path(out, name, s, k).exists() for s in range(k))
  if present < k:
    print(f"{present} of {k} shards done; metadata.json is written by the process that "
          "finds all of them done")
    others = {p.name.rsplit("-of-", 1)[-1] for p in out.glob(f"{glob.escape(name)}-*-of-*")
              if p.name.endswith(".array_record")} - {f"{k:05d}.array_record"}
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


def _read_stats(out: pathlib.Path, name: str, shard: int, k: int) -> dict:
  path = _stats_path(out, name, shard, k)
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    # A shard without its tally (copied in by hand, or stats deleted): count its records.
    count = records.num_records(_shard_path(out, name, shard, k))
    print(f"warning: {path} missing; counting {count} records in the shard itself")
    return {"tally": {"written": count}}


def _metadata_if_changed(out: pathlib.Path, name: str, counts, made_by, extra) -> dict:
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
  raw = a.set_name or pathlib.Path(a.out).resolve().name
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
