"""Shapes shard sets: records rendered from sampled scenes, written as three splits (train,
validation, heldout), and read back with the spec they were made with.

A record is {"id", "image" (PNG bytes), "captions" ([caption]), "extra" ({"scene"})}; each
has its own random stream, so a split's bytes depend only on the spec, the seed and the
record's index, never on how many processes render it.
"""

import concurrent.futures
import functools
import multiprocessing
import os
import time

import numpy as np
import tqdm
from etils import epath

from parti_jax.data import buckets, images, records
from parti_jax.shapes import render, scenes
from parti_jax.shapes.vocabulary import BACKGROUND, COLORS, RELATIONS, SHAPES, SIZES

FIELDS = ("id", "image", "captions", "extra")
RENDER_CHUNK = 256  # records a rendering worker takes at a time (smaller splits: in process)
# The command that writes shapes shard sets, as the metadata's "made_by" names it.
TOOL = "parti_jax.data.shapes"


def make_record(spec: scenes.Spec, split: str, seed: int, index: int) -> dict:
  """Record `index` of a split; its own random stream, so any prefix of a split is stable."""
  rng = np.random.default_rng((seed, scenes.SPLITS.index(split), index))
  scene, caption = scenes.sample_scene(rng, spec, split)
  return {"id": f"shapes-{split}-{index:07d}",
          "image": images.encode_png(render.render_scene(scene, spec.resolution)),
          "captions": [caption], "extra": {"scene": scene}}


def available_cpus() -> int:
  """CPUs this process may run on (a container's or a job's share, where the OS tells)."""
  if hasattr(os, "sched_getaffinity"):  # Linux; macOS has only the machine's count
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def make_split(spec: scenes.Spec, split: str, num: int, seed: int = 0, progress: bool = False,
               workers: int = 1) -> list[dict]:
  """`num` records of `split`, the same bytes for the same arguments (any `workers`).

  With `workers` > 1 the records are rendered in that many processes: each record has its
  own random stream, so who renders it does not change its bytes.
  """
  bar = functools.partial(tqdm.tqdm, total=num, desc=f"rendering {split}", unit="img",
                          disable=not progress)
  one = functools.partial(make_record, spec, split, seed)
  if workers <= 1 or num < 2 * RENDER_CHUNK:
    return [one(i) for i in bar(range(num))]
  # "spawn": a fresh interpreter per worker, safe even where the caller has started JAX's
  # threads (fork would copy them); the module imports in well under a second.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
    return list(bar(pool.map(one, range(num), chunksize=RENDER_CHUNK)))


def write(out_dir, spec: scenes.Spec, num: int, num_validation: int | None = None,
          num_heldout: int | None = None, seed: int = 0, num_shards: int = 1,
          progress: bool = True, workers: int = 1) -> dict:
  """Writes OUT/train, OUT/validation and OUT/heldout; returns counts and render speed.

  Validation and heldout default to max(num // 10, 1) records (heldout to none where the
  spec holds nothing out); DIR may be in a bucket (gs://...).
  """
  out_dir = epath.Path(out_dir)
  buckets.check_bucket(out_dir)  # before rendering anything
  default = max(num // 10, 1)
  has_heldout = bool(spec.heldout_pairs or spec.heldout_triples)
  if num_heldout is None:
    num_heldout = default if has_heldout else 0
  counts = {"train": num,
            "validation": default if num_validation is None else num_validation,
            "heldout": num_heldout}
  seconds, shards = 0.0, {}
  for split, count in counts.items():
    start = time.perf_counter()
    recs = make_split(spec, split, count, seed, progress, workers)
    seconds += time.perf_counter() - start
    # Never an empty shard: a split smaller than num_shards gets one shard per record.
    shards[split] = max(1, min(num_shards, count))
    with buckets.reported(out_dir / split):  # a bucket's errors as one line
      records.write_shard_set(out_dir / split, f"shapes-{split}", "images", recs,
                              shards[split], **_set_metadata(spec, split, num, seed))
  total = sum(counts.values())
  return {"counts": counts, "shards": shards, "seconds": seconds,
          "images_per_second": total / seconds if seconds else float("nan")}


def _set_metadata(spec: scenes.Spec, split: str, num: int, seed: int) -> dict:
  """What a split's metadata.json says of how it was made (`spec_of` reads it back)."""
  return dict(
      made_by={"tool": TOOL, "num": num, "seed": seed}, fields=FIELDS,
      split=split, resolution=spec.resolution, seed=seed, background=list(BACKGROUND),
      colors={k: list(v) for k, v in COLORS.items()}, shapes=list(SHAPES),
      sizes=dict(SIZES), relations=list(RELATIONS),
      heldout_pairs=[list(p) for p in spec.heldout_pairs],
      heldout_triples=[list(t) for t in spec.heldout_triples], lattice=spec.lattice,
      train_kinds=dict(spec.train_kinds))


def spec_of(shard_set: records.ShardSet) -> scenes.Spec:
  """The held-out compositions (and resolution, lattice) a shapes shard set was made with."""
  meta = shard_set.meta
  return scenes.Spec(meta.get("resolution", 32), meta.get("heldout_pairs", ()),
                     meta.get("heldout_triples", ()), meta.get("lattice", 0))


def shard_items(directory) -> tuple[list, scenes.Spec]:
  """(caption, rendered image) pairs of a shapes shard set, and its held-out spec."""
  shard_set = records.ShardSet.open(directory)
  items = [(r["captions"][0], np.asarray(images.rgb_array(images.open_image(r["image"]))))
           for r in shard_set.read_all()]
  return items, spec_of(shard_set)
