"""Ingest: user image-text data -> a shard set (ArrayRecord shards + metadata.json).

usage:
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

`sources.tfds.TfdsRecords` gives the grain pipeline the same records straight from TFDS.
"""

import os
import re
import shlex
import sys

from etils import epath

from parti_jax import cli
from parti_jax.data import images, records, shard_writer
from parti_jax.data.records import DataError
from parti_jax.data.sources import folder, tfds, webdataset

# Each source's own flags, and the one it requires besides --out. One flag set serves all
# three, so a flag of another source is refused here (as separate subcommands did).
SOURCE_FLAGS = {"folder": ("images", "captions"), "webdataset": ("tars",),
                "tfds": ("data_dir", "split", "image_feature", "caption_feature")}
REQUIRED = {"folder": "images", "webdataset": "tars", "tfds": "name"}
# The tfds flags default to None so that one given to another source shows; these fill in.
TFDS_DEFAULTS = {"split": "train", "image_feature": "image", "caption_feature": "caption"}
# Options that differ between processes or machines but not in what is written; left
# out of made_by so that every process writes the same metadata.json.
PER_PROCESS_OPTIONS = ("--process_index", "--num_processes", "--num_threads", "--no_progress",
                       "--nono_progress")
VALUELESS_OPTIONS = ("--no_progress", "--nono_progress")  # bool flags: no value follows

FLAGS = cli.Flags(__doc__)
FLAGS.string("out", None, "Output directory of the shard set (required).")
FLAGS.string("name", None, "tfds: the TFDS dataset name (required); folder, webdataset: the "
             "same as --set_name.")
FLAGS.string("set_name", None, "Shard file name prefix (default: the name of --out).")
FLAGS.string("images", None, "folder: directory of images (recursive; required).")
FLAGS.string("captions", None, "folder: captions .jsonl or .tsv (default: same-named .txt).")
FLAGS.strings("tars", None, "webdataset: tar files (required): globs, {000..099} ranges, or "
              "comma-separated lists; more may follow as arguments")  # absl adds: or repeat it
FLAGS.string("data_dir", None, "tfds: TFDS data_dir (default: TFDS's).")
FLAGS.string("split", None, "tfds: the split (default: train).")
FLAGS.string("image_feature", None, "tfds: the image feature (default: image).")
FLAGS.string("caption_feature", None, "tfds: the caption feature, 'a/b' if nested "
             "(default: caption).")
FLAGS.integer("num_shards", None, "K (default: 1 per 10,000 records; for webdataset, 1 per "
              "tar).")
FLAGS.integer("process_index", None, "This process's index (default: $PARTI_PROCESS_ID, "
              "else 0).")
FLAGS.integer("num_processes", None, "Processes writing the set (default: "
              "$PARTI_NUM_PROCESSES, else 1).")
FLAGS.integer("max_pixels", images.DEFAULT_MAX_PIXELS,
              "Images with more pixels are skipped as image_too_large.")
FLAGS.float("max_bad_fraction", shard_writer.DEFAULT_MAX_BAD_FRACTION,
            "A shard with more skipped records than this stops the ingest.")
FLAGS.integer("num_threads", min(8, os.cpu_count() or 1), "Threads reading and checking "
              "records.")
FLAGS.bool("no_progress", False, "No progress bar.")


def _env_int(name: str, default: int) -> int:
  value = os.environ.get(name)
  return int(value) if value not in (None, "") else default


def _source(a) -> str:
  """The source named by the first argument, its flags checked as its subcommand did."""
  if not a.args:
    raise SystemExit("error: the following arguments are required: source")
  source, extra = a.args[0], a.args[1:]
  if source not in SOURCE_FLAGS:
    choices = ", ".join(repr(s) for s in SOURCE_FLAGS)
    raise SystemExit(f"error: argument source: invalid choice: {source!r} (choose from "
                     f"{choices})")
  missing = [f"--{f}" for f in (REQUIRED[source], "out") if getattr(a, f) is None]
  if missing:
    raise SystemExit(f"error: the following arguments are required: {', '.join(missing)}")
  if source == "webdataset":
    a.tars += extra  # `--tars DIR/*.tar` unquoted: the shell's list follows the flag
  elif extra:
    raise SystemExit(f"error: unrecognized arguments: {' '.join(extra)}")
  for other, names in SOURCE_FLAGS.items():
    given = [f"--{n}" for n in names if other != source and getattr(a, n) is not None]
    if given:
      raise SystemExit(f"error: {', '.join(given)}: a flag of the {other} source, not {source}")
  if source != "tfds" and a.name is not None and a.set_name is not None:
    raise SystemExit(f"error: --name and --set_name are the same flag for {source}; give one")
  return source


def _plan(source: str, a):
  if source == "folder":
    return folder.plan(a.images, a.captions, a.num_shards)
  if source == "webdataset":
    return webdataset.plan(a.tars, a.num_shards)
  option = {f: default if getattr(a, f) is None else getattr(a, f)
            for f, default in TFDS_DEFAULTS.items()}
  return tfds.plan(a.name, a.data_dir, option["split"], option["image_feature"],
                   option["caption_feature"], a.num_shards)


def _command(argv: list[str]) -> str:
  """The command line without per-process options, as recorded in metadata.json."""
  kept, skip_value = [], False
  for arg in argv:
    if skip_value:
      skip_value = False
      continue
    # absl also reads -flag for --flag.
    option = "--" + arg.split("=", 1)[0].lstrip("-") if arg.startswith("-") else arg
    if option in PER_PROCESS_OPTIONS:
      skip_value = "=" not in arg and option not in VALUELESS_OPTIONS
      continue
    kept.append(arg)
  return " ".join(["python -m parti_jax.data.ingest"] + [shlex.quote(a) for a in kept])


def _set_name(out: str, given: str | None) -> str:
  out_name = (epath.Path(out).name if records.is_bucket(out)
              else os.path.basename(os.path.realpath(out)))
  raw = given or out_name
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw).strip("._-") or "data"


def main(argv=None) -> dict | None:
  """Runs the command; returns the set's metadata once all of its shards exist, else None."""
  argv = list(sys.argv[1:] if argv is None else argv)
  a = FLAGS.parse(argv)
  source = _source(a)
  process_index = (a.process_index if a.process_index is not None
                   else _env_int("PARTI_PROCESS_ID", 0))
  num_processes = (a.num_processes if a.num_processes is not None
                   else _env_int("PARTI_NUM_PROCESSES", 1))
  if not 0 <= process_index < num_processes:
    raise SystemExit(f"error: --process_index {process_index} is not in [0, {num_processes})")
  if a.num_shards is not None and a.num_shards < 1:
    raise SystemExit("error: --num_shards must be at least 1")
  set_name = a.set_name if source == "tfds" else a.set_name or a.name
  return shard_writer.write(
      _plan(source, a), a.out, _set_name(a.out, set_name), process_index=process_index,
      num_processes=num_processes, max_pixels=a.max_pixels, num_threads=a.num_threads,
      max_bad_fraction=a.max_bad_fraction, command=_command(argv), progress=not a.no_progress)


if __name__ == "__main__":
  try:
    cli.run(main)
  except DataError as e:  # the data's or a bucket's problem, said in one line
    sys.exit(f"error: {e}")
