"""Token shards: run an image tokenizer over an image shard set on the device mesh.

  python -m parti_jax.data.encode --data DIR --out OUT --spm PREFIX.model \\
      [--tokenizer color] [--resolution 32] [--text_len 128] [--batch_size 64]

Every process reads its part of DIR with the evaluation pipeline (centre crop, in order),
the tokenizer runs jitted on the mesh with the batch sharded over the batch axes, and each
process writes its own output shards; process 0 writes metadata.json when all are done.
A token record keeps the source record's `id`, `captions` and `extra`, adds `text_tokens`
(unpadded SentencePiece ids of every caption, end id included) and `image_codes` (uint16
bytes of the grid, row-major). Training reads them with `config.data.kind = "tokens"`.

`--tokenizer` names an image tokenizer as `parti_jax.tokenizers` reads it: `color` (built
in, `color:patch=8,levels=4`), `vitvqgan:RUN_DIR` or `MODULE:FUNCTION`.

DIR, OUT and the SentencePiece model may be in buckets (gs://...). A shard in a bucket is
staged in a local folder named after OUT (`records.staging_dir`) and uploaded whole when it
is finished; metadata.json is written after all shards. A rerun encodes everything again (it
does not resume), replacing the shards, and removes an earlier metadata.json before it
replaces the first one: a run killed part-way leaves no shard that reads as finished (each
is renamed into place, or uploaded, once whole) and no metadata.json, and the rerun deletes
the temporary files it left beside OUT's shards or in OUT's staging folder.
"""

import sys

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from parti_jax import cli, distributed, sharding, tokenizers
from parti_jax import text as text_lib
from parti_jax import config as common
from parti_jax.data import buckets, pipeline, records, spm

TOKEN_FIELDS = ("id", "captions", "text_tokens", "image_codes", "extra")


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in global order.

  They are the rows this process fed in: `make_array_from_process_local_data` places a
  process's rows on its own devices, in order.
  """
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def token_record(record: dict, codes: np.ndarray, text_tokenizer: spm.Tokenizer) -> dict:
  captions, _ = spm.clean_captions(record.get("captions"))
  return dict(id=str(record.get("id", "")), captions=captions,
              text_tokens=[text_tokenizer.ids(c) for c in captions] or [[text_lib.END_ID]],
              image_codes=codes.astype(np.uint16).tobytes(), extra=record.get("extra") or {})


def encode(data_dir, out_dir, tokenizer: tokenizers.ImageTokenizer, text_tokenizer: spm.Tokenizer,
           batch_size: int = 64, shards_per_process: int = 1, mesh=None,
           made_by: dict | None = None) -> dict | None:
  """Writes the token shard set; returns its metadata on process 0 (None elsewhere)."""
  if tokenizer.codebook_size > 2 ** 16:
    raise ValueError(f"codebook of {tokenizer.codebook_size} codes: token shards store uint16")
  for path in (data_dir, out_dir):  # before any work
    buckets.check_bucket(path)
  out_dir = epath.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)  # nothing to make in a bucket
  config = common.base()
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.data.update(kind="images", eval=str(data_dir), resolution=tokenizer.resolution,
                     num_threads=8)
  config.model.update(text_len=text_tokenizer.length)
  mesh = mesh or sharding.make_mesh(config)
  batch_size = -(-batch_size // mesh.size) * mesh.size  # whole rows on every device
  loader = pipeline.Loader(config, mesh, train=False, batch_size=batch_size)
  source = loader.source  # the whole records, for the fields batches do not carry
  batch_spec = sharding.batch_sharding(mesh, sharding.rules_of(config))
  run = jax.jit(tokenizer.encode, out_shardings=batch_spec)
  count_skipped = jax.jit(lambda s: s.sum(0), out_shardings=NamedSharding(mesh, P()))

  p, n = jax.process_index(), jax.process_count()
  name = source.shard_set.meta["name"]
  total = n * shards_per_process
  names = [records.shard_name(name, p * shards_per_process + j, total)
           for j in range(shards_per_process)]
  records.remove_temps(out_dir, names)  # what a killed run left of this process's shards
  writers = [records.ShardWriter(out_dir / shard) for shard in names]
  skipped = np.zeros(len(records.SKIP_REASONS), np.int64)
  num_batches = -(-len(source) // batch_size)
  written = 0
  try:
    for batch in tqdm(loader, total=num_batches, desc="encode", unit="batch",
                      disable=p != 0):
      codes = local_rows(run(tokenizer.params, batch["images"]))
      skipped += np.asarray(count_skipped(batch["skipped"]))
      for index, mask, row in zip(local_rows(batch["index"]), local_rows(batch["mask"]), codes):
        if mask:
          writers[written % shards_per_process].write(
              token_record(source.record(int(index)), row, text_tokenizer))
          written += 1
  except BaseException:
    for w in writers:
      w.abort()
    raise
  finally:
    loader.close()
  with buckets.reported(out_dir):  # in a bucket, each shard is uploaded here
    # A rerun replaces a finished set's shards: the old metadata.json goes first, so that a
    # set killed while its shards are replaced never reads as finished.
    if p == 0:
      (out_dir / records.METADATA).unlink(missing_ok=True)
    distributed.barrier("encode_old_metadata_removed")
    for w in writers:
      w.close()
  records.remove_staging_dir(out_dir)  # this process's shards are all uploaded
  # Every process's counts, in shard order, without reading a shard back (which, in a
  # bucket, would go through a FUSE mount that may not see a new object yet).
  counts = multihost_utils.process_allgather(np.array([w.count for w in writers])).reshape(-1)
  if p != 0:
    return None
  return records.write_metadata(
      out_dir, name=name, kind="tokens", shard_counts=counts, fields=TOKEN_FIELDS,
      made_by=made_by or {}, source=str(data_dir),
      skipped={r: int(c) for r, c in zip(records.SKIP_REASONS, skipped) if c},
      tokens=dict(tokenizer=tokenizer.name, resolution=tokenizer.resolution, grid=tokenizer.grid,
                  codebook_size=tokenizer.codebook_size, text_len=text_tokenizer.length,
                  text_vocab_size=text_tokenizer.vocab_size,
                  spm_model=text_tokenizer.model_path))


def _text_tokenizer(model_path, length: int) -> spm.Tokenizer:
  try:
    return spm.Tokenizer(model_path, length)
  except FileNotFoundError as e:
    raise records.DataError(f"--spm {model_path}: {e.strerror or e}") from None


FLAGS = cli.Flags(__doc__)
FLAGS.string("data", None, "Image shard set directory.", required=True)
FLAGS.string("out", None, "Output token shard set directory.", required=True)
FLAGS.string("spm", None, "SentencePiece model (PREFIX.model).", required=True)
FLAGS.string("tokenizer", "color", "color[:patch=8,levels=4], vitvqgan:RUN_DIR or "
             "MODULE:FUNCTION (parti_jax.tokenizers).")
FLAGS.integer("resolution", 256, "For the colour or a MODULE:FUNCTION tokenizer; a ViT-VQGAN "
              "uses its own.")
FLAGS.integer("text_len", 128, "Text tokens per caption.")
FLAGS.integer("batch_size", 64, "Global batch.")
FLAGS.integer("shards_per_process", 1, "Output shards each process writes.")


def main(argv=None):
  a = FLAGS.parse(argv)
  distributed.initialize()
  try:
    meta = encode(a.data, a.out, tokenizers.load(a.tokenizer, a.resolution),
                  _text_tokenizer(a.spm, a.text_len), a.batch_size, a.shards_per_process,
                  made_by=dict(command=" ".join(sys.argv)))
  except (records.DataError, tokenizers.TokenizerError) as e:  # data, bucket or tokenizer
    sys.exit(f"error: {e}")
  if meta:
    skipped = sum(meta["skipped"].values())
    print(f"wrote {meta['count']} token records in {meta['num_shards']} shard(s) to {a.out}; "
          f"skipped {skipped}" + (f" ({meta['skipped']})" if skipped else ""))


if __name__ == "__main__":
  cli.run(main)
