"""Input pipeline throughput on this machine, against what the tiny config's training eats.

  python benchmarks/input_pipeline.py [--images 512] [--batches 20] [--num_workers 0]

Makes a shard set of photo-like JPEGs (short side 256-512 px, quality 90, a caption of
10-20 words each), a SentencePiece model and token shards of them (copied up to 16k
records; built-in colour tokenizer, 4x4 grid and codebook 64 as in configs/parti_tiny.py),
then times:
  jpeg:   decode + resize + crop to 256 px + tokenize + batch (data.kind "images")
  tokens: read token shards + pad + caption dropout + batch (data.kind "tokens")
and runs benchmarks/train_throughput.py on configs/parti_tiny.py to get the examples/s a
tiny training run consumes. The last line printed is one JSON object.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from parti_jax import cli, tokenizers
from parti_jax import config as common
from parti_jax.data import encode, images, pipeline, records, spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("a photo of red blue green small large dog cat tree house car on the in with near "
         "under over beside two three sunny rainy street field river city old new painting "
         "of an astronaut riding horse").split()


def photo(rng: np.random.Generator) -> np.ndarray:
  """Smooth colour gradients plus noise: compresses like a photo, not like flat colour."""
  h, w = sorted(rng.integers(256, 513, 2))[::rng.choice([1, -1])]
  y, x = np.mgrid[0:h, 0:w] / max(h, w)
  channels = [np.sin(x * rng.uniform(2, 9) + y * rng.uniform(2, 9) + rng.uniform(0, 6))
              for _ in range(3)]
  base = (np.stack(channels, -1) + 1) * 110 + rng.normal(0, 12, (h, w, 3))
  return np.clip(base, 0, 255).astype(np.uint8)


def make_data(root: str, n: int, token_records: int = 16_384) -> dict:
  """JPEG shard set, SentencePiece model and token shards under `root`."""
  rng = np.random.default_rng(0)
  recs = []
  for i in range(n):
    caption = " ".join(rng.choice(WORDS, rng.integers(10, 21)))
    recs.append(dict(id=str(i), image=images.encode_jpeg(photo(rng), quality=90),
                     captions=[caption]))
  jpegs = os.path.join(root, "jpeg")
  records.write_shard_set(jpegs, "bench", "images", recs, 4, made_by={"by": __file__})
  spm_model = os.path.join(root, "spm")
  spm.train((r["captions"][0] for r in recs), spm_model, vocab_size=200)
  encoded = os.path.join(root, "encoded")
  encode.encode(jpegs, encoded, tokenizers.color(256, patch=64, levels=4),
                spm.Tokenizer(spm_model + ".model", 16), batch_size=32)
  # Token records are small and cheap to read, so the timing should not be dominated by a
  # tiny set: grain's index shuffle costs ~45,000/N microseconds per record for N records
  # (350 us at N=128, 7 us past 10,000). Copies of the encoded records make a 16k set.
  copies = max(1, token_records // n)
  token_recs = [dict(r, id=f"{r['id']}/{k}") for k in range(copies)
                for r in records.ShardSet.open(encoded).read_all()]
  tokens = os.path.join(root, "tokens")
  records.write_shard_set(tokens, "bench", "tokens", token_recs, 4, made_by={"by": __file__},
                          fields=encode.TOKEN_FIELDS)
  return dict(jpeg=jpegs, tokens=tokens, spm=spm_model + ".model",
              mean_jpeg_kb=float(np.mean([len(r["image"]) for r in recs]) / 1024))


def time_batches(config, batch_size: int, warmup: int, batches: int) -> float:
  it = iter(pipeline.dataset(config, train=True, global_batch=batch_size))
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  seconds = time.perf_counter() - start
  getattr(it, "close", lambda: None)()
  return batches * batch_size / seconds


def tiny_training_examples_per_s() -> dict:
  """Runs the train throughput benchmark on the tiny config; its examples/s and devices."""
  out = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--config",
                        "configs/parti_tiny.py", "--steps", "20"], cwd=ROOT, check=True,
                       capture_output=True, text=True)
  r = json.loads(out.stdout.strip().splitlines()[-1])
  return dict(examples_per_s=r["image_tokens_per_s"] / r["image_tokens"],
              num_devices=r["num_devices"], global_batch=r["global_batch"])


FLAGS = cli.Flags(__doc__)
FLAGS.integer("images", 512, "JPEGs in the image shard set.")
FLAGS.integer("batch_size", 32, "Examples per batch.")
FLAGS.integer("token_records", 16_384, "Size of the token set.")
FLAGS.integer("batches", 20, "Timed batches (after 3 warm-up).")
FLAGS.integer("num_threads", -1,
              "data.num_threads; -1: 8 for JPEGs, 0 for token records (the default).")
FLAGS.integer("num_workers", 0, "data.num_workers.")


def main(argv=None):
  a = FLAGS.parse(argv)
  cores = len(os.sched_getaffinity(0))
  with tempfile.TemporaryDirectory() as root:
    data = make_data(root, a.images, a.token_records)
    c = common.tiny_model(common.base())
    c.data.update(kind="images", train=data["jpeg"], spm_model=data["spm"], resolution=256,
                  num_threads=a.num_threads, num_workers=a.num_workers)
    jpeg = time_batches(c, a.batch_size, 3, a.batches)
    c.data.update(kind="tokens", train=data["tokens"], spm_model="")
    tokens = time_batches(c, a.batch_size, 3, a.batches * 10)
  train = tiny_training_examples_per_s()
  print(json.dumps(dict(
      cores=cores, num_threads=a.num_threads, num_workers=a.num_workers,
      mean_jpeg_kb=round(data["mean_jpeg_kb"], 1),
      jpeg_256px_images_per_s=round(jpeg, 1),
      jpeg_256px_images_per_s_per_core=round(jpeg / cores, 1),
      token_examples_per_s=round(tokens, 1), token_examples_per_s_per_core=round(tokens / cores, 1),
      tiny_training_examples_per_s=round(train["examples_per_s"], 1),
      tiny_training_devices=train["num_devices"],
      token_pipeline_over_tiny_training=round(tokens / train["examples_per_s"], 2),
      jpeg_pipeline_over_tiny_training=round(jpeg / train["examples_per_s"], 2))))


if __name__ == "__main__":
  cli.run(main)
