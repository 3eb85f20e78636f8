"""Token shards: run an image tokenizer over an image shard set on the device mesh.

  python -m parti_jax.data.encode --data DIR --out OUT --spm PREFIX.model \\
      [--tokenizer color] [--resolution 32] [--text_len 128] [--batch_size 64]

Every process reads its part of DIR with the evaluation pipeline (centre crop, in order),
the tokenizer runs jitted on the mesh with the batch sharded over the batch axes, and each
process writes its own output shards; process 0 writes metadata.json when all are done.
A token record keeps the source record's `id`, `captions` and `extra`, adds `text_tokens`
(unpadded SentencePiece ids of every caption, end id included) and `image_codes` (uint16
bytes of the grid, row-major). Training reads them with `config.data.kind = "tokens"`.

Tokenizers (`--tokenizer`):
  vitvqgan:RUN_DIR       a ViT-VQGAN trained with `python -m parti_jax.train` (its latest
                         checkpoint; its own resolution)
  color                  built in: each PATCHxPATCH patch becomes its mean colour quantized
                         to LEVELS per channel (codebook LEVELS**3); `color:patch=8,levels=4`
  MODULE:FUNCTION        FUNCTION(resolution=R) returning an `ImageTokenizer`
The built-in one needs no training, so token shards (and the Parti trainer on them) can be
made and tested before an image tokenizer has been trained.

DIR, OUT and the SentencePiece model may be in buckets (gs://...). A shard in a bucket is
uploaded whole when it is finished, and metadata.json after every shard. A rerun encodes
everything again (it does not resume), replacing the shards.
"""

import argparse
import dataclasses
import importlib
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from parti_jax import config as common
from parti_jax import distributed, sharding
from parti_jax.data import buckets, pipeline, records, spm

TOKEN_FIELDS = ("id", "captions", "text_tokens", "image_codes", "extra")


@dataclasses.dataclass(frozen=True)
class ImageTokenizer:
  """`encode(params, images [B, R, R, 3] in [-1, 1]) -> codes int32 [B, grid * grid]`.

  `params` (None for the colour tokenizer) are passed to the jitted `encode` as an
  argument, so a large model's weights stay sharded arrays, not compiled-in constants.
  """
  encode: Callable[[Any, jax.Array], jax.Array]
  resolution: int
  grid: int
  codebook_size: int
  name: str
  params: Any = None


def color_tokenizer(resolution: int, patch: int = 8, levels: int = 4) -> ImageTokenizer:
  if resolution % patch:
    raise ValueError(f"resolution {resolution} is not a multiple of the patch size {patch}")
  grid = resolution // patch

  def encode(params, images):
    del params
    b = images.shape[0]
    patches = images.reshape(b, grid, patch, grid, patch, 3).mean(axis=(2, 4))
    q = jnp.clip(jnp.round((patches + 1) / 2 * (levels - 1)), 0, levels - 1).astype(jnp.int32)
    return (q[..., 0] * levels * levels + q[..., 1] * levels + q[..., 2]).reshape(b, grid * grid)

  return ImageTokenizer(encode, resolution, grid, levels ** 3, f"color:patch={patch},levels={levels}")


def vitvqgan_tokenizer(workdir, mesh=None) -> ImageTokenizer:
  """The ViT-VQGAN trained in `workdir` (its config.json and latest checkpoint)."""
  from parti_jax import vqgan_train  # the model only when it is asked for
  try:
    setup, params = vqgan_train.load_run(workdir, mesh)
  except (ValueError, FileNotFoundError) as e:
    raise ValueError(f"--tokenizer=vitvqgan:{workdir}: {e}") from None
  m = setup.config.model
  return ImageTokenizer(lambda p, images: setup.model(p).encode(images), m.resolution,
                        m.resolution // m.patch_size, m.codebook_size, f"vitvqgan:{workdir}",
                        params)


def load_tokenizer(spec: str, resolution: int) -> ImageTokenizer:
  name, _, args = spec.partition(":")
  if name == "vitvqgan":
    return vitvqgan_tokenizer(args)
  if name == "color":
    kwargs = dict(kv.split("=") for kv in args.split(",") if kv)
    return color_tokenizer(resolution, **{k: int(v) for k, v in kwargs.items()})
  try:
    factory = getattr(importlib.import_module(name), args)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"--tokenizer={spec}: cannot load {args!r} from module {name!r} ({e})") from None
  return factory(resolution=resolution)


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
              text_tokens=[text_tokenizer.ids(c) for c in captions] or [[spm.END_ID]],
              image_codes=codes.astype(np.uint16).tobytes(), extra=record.get("extra") or {})


def encode(data_dir, out_dir, tokenizer: ImageTokenizer, text_tokenizer: spm.Tokenizer,
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
  writers = [records.ShardWriter(out_dir / records.shard_name(name, p * shards_per_process + j,
                                                              total))
             for j in range(shards_per_process)]
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
    for w in writers:
      w.close()
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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="image shard set directory")
  p.add_argument("--out", required=True, help="output token shard set directory")
  p.add_argument("--spm", required=True, help="SentencePiece model (PREFIX.model)")
  p.add_argument("--tokenizer", default="color", help="'color[:patch=8,levels=4]' or MODULE:FUNCTION")
  p.add_argument("--resolution", type=int, default=256,
                 help="for the colour or a MODULE:FUNCTION tokenizer; a ViT-VQGAN uses its own")
  p.add_argument("--text_len", type=int, default=128)
  p.add_argument("--batch_size", type=int, default=64, help="global batch")
  p.add_argument("--shards_per_process", type=int, default=1)
  a = p.parse_args(argv)
  distributed.initialize()
  try:
    meta = encode(a.data, a.out, load_tokenizer(a.tokenizer, a.resolution),
                  _text_tokenizer(a.spm, a.text_len), a.batch_size, a.shards_per_process,
                  made_by=dict(command=" ".join(sys.argv)))
  except records.DataError as e:  # data or a bucket that cannot be read or written
    sys.exit(f"error: {e}")
  if meta:
    skipped = sum(meta["skipped"].values())
    print(f"wrote {meta['count']} token records in {meta['num_shards']} shard(s) to {a.out}; "
          f"skipped {skipped}" + (f" ({meta['skipped']})" if skipped else ""))


if __name__ == "__main__":
  main()
