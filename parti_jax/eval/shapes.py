"""Compositional evaluation on the shapes domain: does each image show what its prompt says?

  python -m parti_jax.eval.shapes --images SAMPLES_DIR [--out report.json]
  python -m parti_jax.eval.shapes --shards data/shapes/validation      # the detector on renders
  python -m parti_jax.eval.shapes --shards data/shapes/validation --reconstruct vitvqgan:RUN

A deterministic detector (`parti_jax.shapes.judge`) finds the objects in each image and checks
them against the prompt, parsed with the dataset's grammar: kinds, colors, shapes, sizes the
prompt names, counts and relations. Accuracy is reported overall and per kind (single object,
counting, color binding, spatial relation), separately for seen and held-out compositions.

Input: a sampler output directory (its `samples.json` lists each prompt with its PNGs), or
`--shards` with an image shard set of the shapes dataset (ground truth: the detector's own
check); either, and `--out`, may be in a bucket (gs://...). Images are judged at their own
resolution. With `--reconstruct TOKENIZER` (an image tokenizer spec of
`parti_jax.tokenizers`, such as vitvqgan:RUN_DIR) the renders are first encoded and decoded
by that tokenizer: the score of its reconstructions is roughly the most a Parti model that
generates its codes can reach.
"""

import concurrent.futures
import json
import sys

import numpy as np
import tqdm
from etils import epath

from parti_jax import cli
from parti_jax import eval as eval_lib
from parti_jax.data import buckets, records
from parti_jax.data import images as image_lib
from parti_jax.shapes import dataset, judge, scenes

READ_THREADS = 16  # sample PNGs read at once (in a bucket, each is a round trip)

FLAGS = cli.Flags(__doc__)
FLAGS.string("images", None, "A sampler output directory (with samples.json).")
FLAGS.string("shards", None, "A shapes image shard set (ground-truth renders).")
FLAGS.string("heldout_from", None, "A shapes shard set whose metadata names the held-out "
             "compositions (default: the dataset's defaults).")
FLAGS.string("reconstruct", None, "With --shards: judge the renders after a round trip "
             "through this image tokenizer, e.g. vitvqgan:RUN_DIR (what its codes can show at "
             "best).")
FLAGS.string("out", None, "Also write the report (JSON) here.")
FLAGS.enum("pick", "all", ["all", "first", "best"], "With --images: judge every sample (all), "
           "each prompt's first sample (first), or its reranked best (best: sampled with "
           "--rerank).")


def samples_of(directory, pick: str = "all") -> tuple[list, scenes.Spec | None]:
  """(prompt, image) pairs of a sampler output directory (its samples.json): every sample of
  each prompt (`pick="all"`), its first (`"first"`: sample 0, what sampling one image per
  prompt gives) or its reranker's best (`"best"`)."""
  directory = epath.Path(directory)
  index = directory / eval_lib.SAMPLES_JSON
  entries = eval_lib.read_samples(directory)  # checked: names only of files in directory
  if pick == "best" and not all("ranked" in entry for entry in entries):
    raise ValueError(f"{index}: no reranker ranks, so no best sample to judge "
                     "(sample with --rerank RUN)")
  names = lambda entry: dict(all=entry["files"], first=entry["files"][:1],
                             best=entry.get("ranked", [])[:1])[pick]
  if pick == "first" and not all(entry.get("kept", [0]).count(0) for entry in entries):
    raise ValueError(f"{index}: sample 0 of some prompts was not kept (--keep); sample with "
                     "--keep 0 to judge first samples")
  files = [(entry["prompt"], directory / name) for entry in entries for name in names(entry)]
  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    read = lambda path: records.read_limited(path, records.MAX_IMAGE_BYTES, "a sample image")
    pngs = list(pool.map(read, [path for _, path in files]))
  items = [(prompt, np.asarray(image_lib.rgb_array(image_lib.open_image(png))))
           for (prompt, _), png in zip(files, pngs)]
  return items, None


def reconstruct(items, tokenizer: str, batch_size: int = 50) -> list:
  """The (prompt, image) items with each image replaced by its round trip through the image
  tokenizer `tokenizer` (codes, then pixels, rounded to 8 bits as the sampler saves)."""
  # JAX and the model only when a tokenizer is asked for: the detector needs neither.
  from parti_jax import tokenizers
  if not items:
    raise ValueError(f"--reconstruct={tokenizer}: no renders to reconstruct")
  resolution = items[0][1].shape[0]
  try:
    tok = tokenizers.load(tokenizer, resolution)
  except tokenizers.TokenizerError as e:  # its message names the spec
    raise ValueError(f"--reconstruct: {e}") from None
  if tok.resolution != resolution:
    raise ValueError(f"--reconstruct={tokenizer}: the tokenizer takes {tok.resolution} px "
                     f"images, the renders are {resolution} px")
  pixels = np.stack([image for _, image in items])
  outs = []
  for start in tqdm.trange(0, len(pixels), batch_size, desc="reconstructing", unit="batch"):
    chunk = pixels[start:start + batch_size]
    padded = np.concatenate([chunk, np.zeros((batch_size - len(chunk), *chunk.shape[1:]),
                                             chunk.dtype)])  # one compiled shape
    outs.append(tok.reconstruct(padded)[:len(chunk)])
  return [(prompt, image) for (prompt, _), image in zip(items, np.concatenate(outs))]


def main(argv=None):
  a = FLAGS.parse(argv)
  if bool(a.images) == bool(a.shards):
    raise SystemExit("error: give one of --images (samples) and --shards (renders)")
  if a.reconstruct and not a.shards:
    raise SystemExit("error: --reconstruct needs --shards (renders to reconstruct)")
  try:
    for path in filter(None, (a.shards, a.images, a.heldout_from, a.out)):
      buckets.check_bucket(path)  # before reading or judging anything
    items, spec = dataset.shard_items(a.shards) if a.shards else samples_of(a.images, a.pick)
    if a.reconstruct:
      items = reconstruct(items, a.reconstruct)
    if a.heldout_from:
      spec = dataset.spec_of(records.ShardSet.open(a.heldout_from))
  except (FileNotFoundError, ValueError, KeyError, records.DataError) as e:
    sys.exit(f"error: {e}")
  report = judge.evaluate(items, spec or scenes.Spec())
  text = json.dumps({k: v for k, v in report.items() if k != "judged"})
  if a.out:
    try:
      buckets.write_bytes(a.out, json.dumps(report, indent=1).encode())
    except records.DataError as e:  # a bucket's problem, named
      sys.exit(f"error: {e}")
  print(text)


if __name__ == "__main__":
  cli.run(main)
