"""Writes a source's plan into a shard set, resumably and from any number of processes.

Every record is checked: the image must decode (`images.open_image`) and at least one
caption must be left after `spm.clean_caption`; the rest are skipped and counted by reason.
Records keep the image bytes exactly as stored in the source.

Processes P of N write the shards s with s % N == P, so several machines can write the same
plan on a shared filesystem. A shard file that exists is finished (written atomically, its
tally saved first under OUT/.stats/), so a rerun resumes; whichever process finds all shards
present writes metadata.json.

OUT may be in a bucket (gs://..., or whatever etils.epath reaches): a shard is written on
local disk (a folder of the temp dir named after OUT) and uploaded whole after its tally,
and metadata.json last, so a rerun resumes from the shards that are complete as it does on
a local disk.
"""

import collections
import concurrent.futures
import fnmatch
import functools
import glob
import json
import os

import numpy as np
import tqdm
from etils import epath

from parti_jax.data import buckets, images, records, sources, spm
from parti_jax.data.records import BadRecord, DataError
from parti_jax.data.sources import Job, Plan

DECODE_TARGET = 256  # JPEGs are checked at reduced size: a full decode proves no more
STATS_DIR = ".stats"
FIELDS = ("id", "image", "captions")
MAX_EXAMPLES = 3  # skipped records named per reason, to show what went wrong
# Web-scraped data loses a few records; losing most of a shard means something is wrong.
DEFAULT_MAX_BAD_FRACTION = 0.5


# ------------------------------------------------------------------------------------------
# Paths: on local disk or in a bucket


def _names_in(directory: epath.Path) -> set[str]:
  """The names in a directory, listed afresh: gcsfs answers iterdir from a listing cached
  earlier (without what other processes wrote since); glob lists the bucket again."""
  with buckets.reported(directory):
    if records.is_bucket(directory):
      return {p.name for p in directory.glob("*")}
    return set(os.listdir(directory))


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
# Writing shards


def write(plan: Plan, out, name: str, *, process_index: int = 0, num_processes: int = 1,
          max_pixels: int = images.DEFAULT_MAX_PIXELS, num_threads: int = 1,
          max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION, command: str = "",
          progress: bool = True) -> dict | None:
  """Writes this process's unfinished shards; returns the metadata once all K exist."""
  out = epath.Path(out)
  if not records.is_bucket(out):  # a bucket has no folders (and makedirs would make a bucket)
    (out / STATS_DIR).mkdir(parents=True, exist_ok=True)
  names = _names_in(out)  # in a bucket the first request: a missing bucket is named here
  k = plan.num_shards
  own = [s for s in range(k) if s % num_processes == process_index]
  done = {s for s in range(k) if records.shard_name(name, s, k) in names}
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
      run_tally.add(_write_one(plan, out, name, s, max_pixels, num_threads,
                               max_bad_fraction, bar))
  if todo:
    print(f"this process wrote {len(todo)} shards:\n{run_tally.summary()}")
  meta = _finish(plan, out, name, command)
  if meta is not None:  # the set is complete: nothing more will be staged for it
    records.remove_staging_dir(out)
  return meta


def _shard_path(out: epath.Path, name: str, shard: int, k: int) -> epath.Path:
  return out / records.shard_name(name, shard, k)


def _stats_path(out: epath.Path, name: str, shard: int, k: int) -> epath.Path:
  return out / STATS_DIR / (records.shard_name(name, shard, k).removesuffix(".array_record")
                            + ".json")


def _remove_temps(out: epath.Path, shard_names: list[str]):
  """Deletes temp files a killed run left for these shards (this process's own) or their
  stats (local disk only: in a bucket, stats are written whole)."""
  finals = set(shard_names) | {n.removesuffix(".array_record") + ".json" for n in shard_names}
  records.remove_temps(out, finals)
  if not records.is_bucket(out):
    records.remove_temps(out / STATS_DIR, finals)


def _write_one(plan: Plan, out: epath.Path, name: str, shard: int,
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
    fingerprint = sources.fingerprint_of(plan.fingerprint, max_pixels)  # changes the content
    stats = {"shard": shard, "num_shards": k, "fingerprint": fingerprint,
             "tally": tally.as_dict(), "examples": dict(examples), "errors": errors}
    stats_path = _stats_path(out, name, shard, k)
    with buckets.reported(stats_path):  # the first write to OUT: no permission to write shows here
      records.atomic_write_text(stats_path, json.dumps(stats, indent=1))

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
    return json.loads(records.read_limited(path, records.MAX_METADATA_BYTES, "a shard's tally"))
  except (OSError, ValueError, records.TooLarge):
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
