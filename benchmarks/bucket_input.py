"""Reading token shards from a bucket, against what each host of a pod plan must read.

  python benchmarks/bucket_input.py [--records 16384] [--batches 40] [--threads 0,8,16]

Data in a bucket is read through a FUSE mount of it (gcsfuse on a pod, PARTI_GCS_MOUNT;
parti_jax.data.records). Here the bucket is the tests' GCS API emulator on loopback,
mounted with fsspec's FUSE server over gcsfs (tests/gcs.py): the figure is what the mount,
gcsfs and the pipeline cost per record, without the network's latency, which a real bucket
adds per read (read threads hide it: `data.num_threads`).

Demand: for every plan of docs/scaling.md, the rows of each global batch one host reads
(`sharding.rows_by_process` on the slice's hosts) divided by the step time the plan would
have at MFU 0.5 (the task's analytic `train_step_flops` over the chips' bf16 peak). The
last line printed is one JSON object: records/s per reading setting, and per plan the
records/s a host needs and the measured rate's multiple of it (the goal is 5x).
"""

import json
import os
import sys
import tempfile
import time

from parti_jax import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the emulator and its mount: tests/gcs.py

MFU = 0.5


def token_set(directory: str, n: int) -> None:
  """`n` token records shaped as the paper's (128 text ids, 32x32 codes of 8192) in 8 shards."""
  import numpy as np

  from parti_jax.data import encode, records
  rng = np.random.default_rng(0)
  recs = [dict(id=str(i), captions=["a caption"], extra={},
               text_tokens=[rng.integers(1, 16000, 40).tolist()],
               image_codes=rng.integers(0, 8192, 1024).astype(np.uint16).tobytes())
          for i in range(n)]
  records.write_shard_set(directory, "bench", "tokens", recs, 8, made_by={"by": __file__},
                          fields=encode.TOKEN_FIELDS,
                          tokens=dict(grid=32, codebook_size=8192, text_vocab_size=16000))


def records_per_s(spec: str, threads: int, batch: int, batches: int) -> float:
  from parti_jax import config as common
  from parti_jax.data import pipeline
  c = common.base()
  c.model.update(image_grid=32, codebook_size=8192, text_vocab_size=16000, text_len=128)
  c.data.update(kind="tokens", train=spec, num_threads=threads)
  it = iter(pipeline.dataset(c, train=True, global_batch=batch))
  for _ in range(3):
    next(it)
  start = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * batch / (time.perf_counter() - start)


def plan_demand() -> list[dict]:
  """Records/s one host must read for each plan of docs/scaling.md, at MFU 0.5."""
  import importlib.util

  from parti_jax import aot, flops, sharding, tasks, topologies
  spec = importlib.util.spec_from_file_location(  # writes docs/scaling.md, reads it back
      "scaling_table", os.path.join(ROOT, "scripts", "scaling_table.py"))
  scaling_table = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(scaling_table)
  demand = []
  for plan in scaling_table.read_plans():
    config, _ = scaling_table.load_config(plan["model"])
    config.mesh.update(plan["mesh"])
    devices = topologies.get(plan["topology"]).devices()
    layout = aot.input_layout(config, sharding.make_mesh(config, devices))
    peak, _ = flops.spec_peak_tflops(devices[0].device_kind)
    step_s = tasks.of(config).train_step_flops(config) / (plan["chips"] * peak * 1e12 * MFU)
    demand.append(dict(model=plan["model"], slice=plan["topology"], hosts=layout["hosts"],
                       rows_per_host=layout["rows_per_host"], step_s_at_mfu_half=round(step_s, 2),
                       records_per_s_per_host=round(layout["rows_per_host"] / step_s, 1)))
  return demand


FLAGS = cli.Flags(__doc__)
FLAGS.integer("records", 16_384, "Token records in each set (local and bucket).")
FLAGS.integer("batch_size", 64, "Examples per batch.")
FLAGS.integer("batches", 40, "Timed batches (after 3 warm-up).")
FLAGS.strings("threads", ["0", "8", "16"], "data.num_threads settings to time, "
              "comma-separated or repeated")


def main(argv=None):
  a = FLAGS.parse(argv)
  # cli's repeated flag keeps "0,8,16" whole: split it here.
  threads = [int(t) for v in a.threads for t in v.split(",") if t]
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import gcs
  with tempfile.TemporaryDirectory() as scratch, gcs.emulated_bucket(scratch):
    local = os.path.join(scratch, "local")
    token_set(local, a.records)
    remote = f"gs://{gcs.BUCKET}/bench"
    token_set(remote, a.records)
    with gcs.mounted_bucket(os.path.join(scratch, "mount")):
      rates = {f"{where}_threads_{t}": round(records_per_s(spec, t, a.batch_size, a.batches), 1)
               for where, spec in (("local", local), ("bucket", remote)) for t in threads}
  best = max(v for k, v in rates.items() if k.startswith("bucket"))
  plans = plan_demand()
  for plan in plans:
    plan["bucket_rate_over_demand"] = round(best / plan["records_per_s_per_host"], 1)
  print(json.dumps(dict(cores=len(os.sched_getaffinity(0)), records=a.records,
                        records_per_s=rates, plans=plans)))


if __name__ == "__main__":
  cli.run(main)
