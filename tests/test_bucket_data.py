"""Data in buckets: shard sets written to and read from gs:// (the emulator of tests/gcs.py,
its bucket mounted through FUSE as the pod launchers mount it with gcsfuse)."""

import numpy as np

import data_helpers as h
from gcs import gcs_emulator, gcs_mount, gs_dir, listing  # noqa: F401  (fixtures)
from parti_jax import config as common
from parti_jax.data import pipeline, records


def test_a_shard_set_in_a_bucket_is_written_whole_and_read_like_a_local_one(
    gcs_mount, gs_dir, tmp_path):
  local = h.write_set(tmp_path / "local", h.image_records(12), num_shards=3)
  remote = h.write_set(gs_dir / "set", h.image_records(12), num_shards=3)
  names = [p.name for p in listing(gs_dir / "set")]
  assert names == sorted([p.name for p in records.ShardSet.open(local).paths] + ["metadata.json"])
  shard_set = records.ShardSet.open(remote)
  shard_set.verify_counts()  # ArrayRecord opens each shard through the mount
  assert list(shard_set.read_all()) == list(records.ShardSet.open(local).read_all())
  config = common.tiny_model(common.base())
  config.data.update(kind="images", resolution=16, spm_model="")
  batches = []
  for path in (local, remote):
    config.data.update(train=str(path), eval=str(path))
    batches.append(list(pipeline.dataset(config, train=False, global_batch=4)))
  for a, b in zip(*batches):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
