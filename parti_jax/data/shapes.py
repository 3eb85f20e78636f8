"""Writes the built-in compositional "shapes" dataset: colored shapes with grammar captions.

  python -m parti_jax.data.shapes --out DIR --num N [--resolution 32] [--num_validation V]
      [--num_heldout H] [--seed S] [--num_shards K] [--heldout_pairs red:star,blue:heart]
      [--heldout_triples circle:above:triangle] [--lattice L]
      [--train_kinds single:1,count:1,binding:1,relation:1]

writes three shard sets, DIR/train, DIR/validation and DIR/heldout (DIR may be in a bucket,
gs://...), of PNG images with one caption each. Scenes hold 1 to 4 non-overlapping objects
(6 shapes, 8 colors, 2 sizes) on a grey background, anywhere or (`--lattice N`) with each
object's square on multiples of N pixels; captions come from a fixed grammar of four kinds
(single, count, binding, relation). Train draws the kinds with the weights of
`--train_kinds`; validation and heldout draw them equally. The held-out (color, shape) pairs
and (object, relation, object) triples appear only in the heldout split. The same arguments
write the same shard bytes, whatever `--workers`.

The domain itself (grammar, held-out rules, sampling, rendering) is the library
`parti_jax.shapes`; this command only reads flags and calls `parti_jax.shapes.dataset.write`.
"""

import sys

from etils import epath

from parti_jax import cli
from parti_jax.data import records
from parti_jax.shapes import dataset, scenes
from parti_jax.shapes.vocabulary import KINDS, RELATIONS

FLAGS = cli.Flags(__doc__)
FLAGS.string("out", None, "Writes OUT/train, OUT/validation, OUT/heldout.", required=True)
FLAGS.integer("num", None, "Training records.", required=True)
FLAGS.integer("resolution", 32, "Image side in pixels.")
FLAGS.integer("num_validation", None, "Validation records (default max(num // 10, 1)).")
FLAGS.integer("num_heldout", None, "Held-out records (default max(num // 10, 1)).")
FLAGS.integer("seed", 0, "Random seed.")
FLAGS.integer("num_shards", 1, "Shards per split.")
FLAGS.integer("workers", None, "Rendering processes (default: one per CPU); the bytes do not "
              "depend on it.")
FLAGS.string("heldout_pairs", "red:star,blue:heart",
             "color:shape,... never seen in train ('' for none).")
FLAGS.string("heldout_triples", "circle:above:triangle",
             "object:relation:object,... with object 'circle' or 'red_circle'; relations "
             f"{', '.join(RELATIONS)} ('' for none).")
FLAGS.integer("lattice", 0, "Put objects on multiples of this many pixels (0: anywhere).")
FLAGS.string("train_kinds", ",".join(f"{k}:1" for k in KINDS),
             "kind:weight,... how often train draws each kind (unnamed: never); validation "
             "and heldout draw all equally.")


def _split_list(text: str, parts: int, what: str) -> tuple:
  """"a:b,c:d" -> (("a", "b"), ("c", "d")); underscores stand for spaces ("red_circle")."""
  items = []
  for item in filter(None, (s.strip() for s in text.split(","))):
    fields = tuple(f.strip().replace("_", " ") for f in item.split(":"))
    if len(fields) != parts:
      raise ValueError(f"{what} {item!r} needs {parts} ':'-separated parts")
    items.append(fields)
  return tuple(items)


def main(argv=None):
  a = FLAGS.parse(argv)
  # Every bad value or combination is refused before anything is rendered.
  try:
    spec = scenes.Spec(a.resolution, _split_list(a.heldout_pairs, 2, "held-out pair"),
                       _split_list(a.heldout_triples, 3, "held-out triple"), a.lattice,
                       _split_list(a.train_kinds, 2, "train kind"))
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  if a.num_heldout and not (spec.heldout_pairs or spec.heldout_triples):
    raise SystemExit("error: --num_heldout > 0 needs --heldout_pairs or --heldout_triples")
  workers = dataset.available_cpus() if a.workers is None else a.workers
  if workers < 1:
    raise SystemExit(f"error: --workers={workers}: needs at least 1")
  try:
    result = dataset.write(a.out, spec, a.num, a.num_validation, a.num_heldout, a.seed,
                           a.num_shards, workers=workers)
  except records.DataError as e:  # a bucket that is missing or cannot be written
    sys.exit(f"error: {e}")
  for split, count in result["counts"].items():
    print(f"{epath.Path(a.out) / split}: {count} records in {result['shards'][split]} "
          "shard(s)")
  total = sum(result["counts"].values())
  print(f"rendered {total} images at {spec.resolution}x{spec.resolution} in "
        f"{result['seconds']:.2f} s: {result['images_per_second']:.0f} images/s")


if __name__ == "__main__":
  cli.run(main)
