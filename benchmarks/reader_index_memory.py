"""Memory an ArrayRecord reader holds per record, with its index in memory or offloaded.

  python benchmarks/reader_index_memory.py [--records 2000000]

Writes one shard of N tiny records as the project writes shards (group_size 1), then,
in a fresh process for each `data.reader_index` setting, opens a reader the way the input
pipeline does (parti_jax.data.pipeline._reader_options), reads three records and reports
the growth of the process's resident memory divided by N. The last line printed is one
JSON object.
"""

import json
import os
import subprocess
import sys
import tempfile

from parti_jax import cli

MEASURE = """
import sys, psutil
from array_record.python import array_record_module
from parti_jax.data import pipeline
path, n, setting = sys.argv[1], int(sys.argv[2]), sys.argv[3]
options = pipeline._reader_options(setting, pipeline.OFFLOAD_INDEX_RECORDS if setting ==
                                   "offloaded" else 0) or {}
process = psutil.Process()
before = process.memory_info().rss
reader = array_record_module.ArrayRecordReader(
    path, ",".join(["readahead_buffer_size:0"] + [f"{k}:{v}" for k, v in options.items()]))
reader.read([n - 1]); reader.read([0]); reader.read([n // 2])
print((process.memory_info().rss - before) / n)
"""


FLAGS = cli.Flags(__doc__)
FLAGS.integer("records", 2_000_000, "Records in the shard.")


def main(argv=None):
  a = FLAGS.parse(argv)
  from parti_jax.data import records
  with tempfile.TemporaryDirectory() as scratch:
    path = os.path.join(scratch, "index-00000-of-00001.array_record")
    with records.ShardWriter(path) as writer:
      for i in range(a.records):
        writer.write(dict(i=i))  # a few bytes each: the index, not the data, is measured
    bytes_per_record = {
        setting: round(float(subprocess.run(
            [sys.executable, "-c", MEASURE, path, str(a.records), setting], check=True,
            capture_output=True, text=True).stdout.strip().splitlines()[-1]), 2)
        for setting in ("in_memory", "offloaded")}
  print(json.dumps(dict(records=a.records, bytes_per_record=bytes_per_record)))


if __name__ == "__main__":
  cli.run(main)
