"""Evaluation of generated images: FID (`parti_jax.eval.fid`) on Inception-v3 features,
compositional accuracy on the shapes domain (`eval.shapes`), image-text alignment
(`eval.alignment`); and `read_samples`, the reader of a sample directory they share."""

import json

from etils import epath

from parti_jax.data import records

SAMPLES_JSON = "samples.json"  # what `python -m parti_jax.sample` writes last (sampling._write)
NAME_LISTS = ("files", "ranked", "upsampled")  # entry fields that name files of the directory


class SamplesError(ValueError):
  """A sample directory that cannot be read; the message names its samples.json and why."""


def read_samples(directory) -> list[dict]:
  """The prompt entries of DIR/samples.json (a `python -m parti_jax.sample` output), checked
  as data (docs/trust.md): at most records.MAX_METADATA_BYTES read; each entry a `prompt`
  and a list of `files`; every file name (`files`, `ranked`, `upsampled`) a plain name of a
  file in DIR, never a path out of it; `kept`, if there, sample numbers. SamplesError (or
  records.TooLarge) names the file and the problem."""
  index = epath.Path(directory) / SAMPLES_JSON
  try:
    meta = json.loads(records.read_limited(index, records.MAX_METADATA_BYTES, SAMPLES_JSON))
  except FileNotFoundError:
    raise SamplesError(f"{index} not found: not a sampler output directory") from None
  except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
    raise SamplesError(f"{index} is not JSON ({type(e).__name__})") from None
  entries = meta.get("prompts") if isinstance(meta, dict) else None
  if not isinstance(entries, list):
    raise SamplesError(f"{index} has no list of prompts: not written by parti_jax.sample")
  for i, entry in enumerate(entries):
    check_entry(entry, f"{index}: prompt entry {i}")
  if not any(entry["files"] for entry in entries):
    raise SamplesError(f"{index} lists no images")
  return entries


def check_entry(entry, where: str) -> None:
  """One prompt entry of samples.json, or SamplesError saying `where` and what is wrong."""
  if not isinstance(entry, dict) or not isinstance(entry.get("prompt"), str) \
      or not isinstance(entry.get("files"), list):
    raise SamplesError(f"{where} has no prompt and list of files")
  for field in NAME_LISTS:
    names = entry.get(field, [])
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
      raise SamplesError(f"{where}: {field} is not a list of file names")
    for name in names:
      if not is_plain_name(name):
        raise SamplesError(f"{where} names {name[:80]!r}, which is not a file name in the "
                           "directory")
  kept = entry.get("kept", [])
  if not isinstance(kept, list) or not all(type(s) is int for s in kept):
    raise SamplesError(f"{where}: kept is not a list of sample numbers")


def is_plain_name(name: str) -> bool:
  """A file of the directory itself: no separator, no `.` or `..`, nothing empty. A name
  is data, so it may never lead out of the directory it is listed in."""
  return bool(name) and "\0" not in name and name == epath.Path(name).name \
      and name not in (".", "..")
