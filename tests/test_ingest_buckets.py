"""Ingest with buckets (gs://, on the emulator of tests/gcs.py): a folder, a captions file and
tar shards read from a bucket, a shard set written to one, a killed ingest resumed, and a
bucket that does not exist named in one line.

Shards in the bucket are read back from a local copy of their objects' bytes (ArrayRecord
needs a file system; on a pod it reads through the bucket's FUSE mount, which
test_bucket_data.py covers), so these tests need no FUSE.
"""

import json
import signal
import subprocess
import sys
import tarfile
import uuid

import data_helpers as h
from conftest import ROOT
from etils import epath
from gcs import gcs_emulator, gs_dir, listing  # noqa: F401  (fixtures)
import pytest
from test_ingest import make_tar, noise, rgb, run, write

from parti_jax.data import records


def image_folder(root) -> None:
  """Images in a subfolder and a hidden one, captions as JSONL, TSV and same-named .txt."""
  for i in range(6):
    sub = "sub/" if i % 2 else ""
    write(root / f"{sub}img{i}.png", h.encoded(h.rgb(8, 8, i), "PNG"))
    write(root / f"{sub}img{i}.txt", f"picture {i}\nalso {i}")
  write(root / "noise.jpg", h.encoded(noise(seed=4), "JPEG"))  # no caption
  write(root / "broken.png", b"not a png")
  write(root / "broken.txt", "corrupt")
  write(root / ".cache" / "hidden.png", h.encoded(rgb(), "PNG"))
  write(root / ".cache" / "hidden.txt", "tool dropping, not data")
  lines = [{"file": "img0.png", "caption": "zero"}, {"file": "sub/img1.png", "captions": ["one"]},
           {"file": "noise.jpg", "caption": "noise"}, {"file": "gone.png", "caption": "none"}]
  write(root.parent / "captions.jsonl", "\n".join(map(json.dumps, lines)) + "\nnot json\n")


def tars(root) -> None:
  """Two plain tars, one cut off mid-image, and a gzipped one with members in a subfolder."""
  root.mkdir(parents=True)
  jpg = h.encoded(noise(seed=3), "JPEG")
  make_tar(root / "data-000.tar", [("000000.jpg", jpg), ("000000.txt", b"a jpeg"),
                                   ("000001.png", h.encoded(rgb(), "PNG")),
                                   ("000001.json", b'{"caption": "a png"}'),
                                   ("000002.txt", b"no image")])
  whole = make_tar(root / "data-001.tar", [(f"10000{i}.{ext}", data) for i in range(3) for ext,
                                           data in (("jpg", jpg), ("txt", b"cut %d" % i))])
  with tarfile.open(root / "data-001.tar") as tar:
    cut = tar.getmember("100002.jpg").offset_data + 100  # in the middle of 100002's image
  (root / "data-001.tar").write_bytes(whole[:cut])
  make_tar(root / "data-002.tar.gz", [("sub/2.png", h.encoded(rgb(), "PNG")),
                                      ("sub/2.txt", b"gz")], gz=True)


def upload(local_dir, bucket_dir) -> None:
  for path in sorted(local_dir.rglob("*")):
    if path.is_file():
      (bucket_dir / path.relative_to(local_dir).as_posix()).write_bytes(path.read_bytes())


def local_copy(bucket_set, tmp_path) -> records.ShardSet:
  """A shard set in the bucket, checked where it is, then copied object by object."""
  copy = tmp_path / f"copy-{uuid.uuid4().hex[:6]}"
  copy.mkdir()
  for path in [bucket_set / records.METADATA] + records.ShardSet.open(bucket_set).paths:
    (copy / path.name).write_bytes(path.read_bytes())
  return records.ShardSet.open(copy)


def assert_same_sets(a: records.ShardSet, b: records.ShardSet) -> None:
  assert list(a.read_all()) == list(b.read_all())
  for key in ("name", "count", "shard_counts", "tally"):
    assert a.meta[key] == b.meta[key], key
  assert len(a.meta.get("source_errors", [])) == len(b.meta.get("source_errors", []))


def staged_leftovers(out) -> list[str]:
  """What is in the local folder where shards for OUT are staged before their upload."""
  staging = records.staging_dir(epath.Path(out))
  return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


def test_a_local_folder_ingested_into_a_bucket_is_the_set_a_local_ingest_writes(
    gs_dir, tmp_path, capsys):
  image_folder(tmp_path / "images")
  argv = ["folder", "--images", tmp_path / "images", "--captions", tmp_path / "captions.jsonl",
          "--name", "pets", "--num_shards", "3"]
  run(capsys, *argv, "--out", tmp_path / "local")
  meta, printed = run(capsys, *argv, "--out", gs_dir / "pets")

  assert f"shard set complete: {gs_dir / 'pets'}" in printed and meta["count"] == 3
  local = records.ShardSet.open(tmp_path / "local")
  assert_same_sets(local_copy(gs_dir / "pets", tmp_path), local)
  shards = [p.name for p in local.paths]
  assert [p.name for p in listing(gs_dir / "pets")] == sorted(
      [".stats", "metadata.json"] + shards)
  assert [p.name for p in listing(gs_dir / "pets" / ".stats")] == [
      n.replace(".array_record", ".json") for n in shards]
  assert staged_leftovers(gs_dir / "pets") == []  # uploaded, then deleted (and the folder)


def test_a_folder_a_captions_file_and_tars_in_a_bucket_give_the_local_records(
    gs_dir, tmp_path, capsys):
  image_folder(tmp_path / "in" / "images")
  tars(tmp_path / "in" / "tars")
  upload(tmp_path / "in", gs_dir / "in")
  local, bucket = tmp_path / "in", gs_dir / "in"
  for captions in ("captions.jsonl", None):  # a captions file, then same-named .txt files
    name = "jsonl" if captions else "txt"
    for root, out in ((local, tmp_path / name), (bucket, gs_dir / name)):
      given = ["--captions", root / captions] if captions else []
      run(capsys, "folder", "--images", root / "images", *given, "--out", out,
          "--num_shards", "2")
    from_bucket = local_copy(gs_dir / name, tmp_path)
    assert_same_sets(from_bucket, records.ShardSet.open(tmp_path / name))
    assert len(from_bucket) == (3 if captions else 6)  # not the hidden folder's image

  run(capsys, "webdataset", "--tars", local / "tars/data-*.tar*", "--out", tmp_path / "w")
  meta, printed = run(capsys, "webdataset", "--out", gs_dir / "w", "--tars",
                      f"{bucket}/tars/data-{{000..001}}.tar,{bucket}/tars/*.gz")
  assert_same_sets(local_copy(gs_dir / "w", tmp_path), records.ShardSet.open(tmp_path / "w"))
  assert meta["shard_counts"] == [2, 2, 1] and meta["made_by"]["num_tars"] == 3
  assert f"{bucket}/tars/data-001.tar: unreadable after 2 samples" in printed


# Runs the ingest CLI and SIGKILLs it right after the tally of its third shard is written:
# the shard is then written on local disk, but not uploaded.
KILLED_AFTER_THIRD_TALLY = """
import os, signal, sys
from parti_jax.data import ingest, records
real, written = records.atomic_write_text, []
def write_then_die(path, text):
  real(path, text)
  written.append(path)
  if len(written) == 3:
    os.kill(os.getpid(), signal.SIGKILL)
records.atomic_write_text = write_then_die
ingest.main(sys.argv[1:])
"""


def test_a_killed_ingest_to_a_bucket_resumes_to_the_records_of_a_clean_run(
    gs_dir, tmp_path, capsys):
  for i in range(8):
    write(tmp_path / "images" / f"img{i}.png", h.encoded(h.rgb(8, 8, i), "PNG"))
    write(tmp_path / "images" / f"img{i}.txt", f"image {i}")
  out = gs_dir / "resumed"
  argv = ["folder", "--images", tmp_path / "images", "--num_shards", "4", "--no_progress"]
  killed = subprocess.run([sys.executable, "-c", KILLED_AFTER_THIRD_TALLY, *map(str, argv),
                           "--out", str(out), "--num_threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  names = [records.shard_name("resumed", s, 4) for s in range(4)]
  assert [p.name for p in listing(out)] == [".stats"] + names[:2]  # no metadata.json
  assert len(listing(out / ".stats")) == 3  # shard 2's tally, without its shard
  assert [records.is_temp_of(n, names[2:3]) for n in staged_leftovers(out)] == [True]

  # The rerun, as two processes one after the other: process 1 finds shard 1 done and
  # writes shard 3; process 0 removes what the killed run left and writes shard 2.
  meta, printed = run(capsys, *argv, "--out", out, "--num_processes", "2", "--process_index", "1")
  assert meta is None and "resuming: 2 of 4 shards already done" in printed
  meta, printed = run(capsys, *argv, "--out", out, "--num_processes", "2", "--process_index", "0")
  assert "resuming: 3 of 4 shards already done; 1 left" in printed and meta["count"] == 8
  assert staged_leftovers(out) == []
  run(capsys, *argv, "--out", tmp_path / "resumed")  # a clean run, on local disk
  assert_same_sets(local_copy(out, tmp_path), records.ShardSet.open(tmp_path / "resumed"))


def test_an_upload_cut_off_leaves_no_object_that_would_read_as_a_finished_shard(
    gs_dir, monkeypatch):
  def copy_part_then_stop(source, out, length):  # as if Ctrl-C came in the middle
    out.write(source.read(100))
    raise KeyboardInterrupt

  monkeypatch.setattr(records.shutil, "copyfileobj", copy_part_then_stop)
  with pytest.raises(KeyboardInterrupt):
    records.write_shard(gs_dir / records.shard_name("cut", 0, 1), h.image_records(3))
  assert listing(gs_dir) == []


def one_line_naming(path: str, message: str, prefix: str = "") -> bool:
  return (message.startswith(f"{prefix}{path}: ") and "\n" not in message
          and "bucket does not exist" in message)


def test_a_bucket_that_does_not_exist_is_named_in_one_line(gcs_emulator, tmp_path, capsys):
  missing = f"gs://no-such-bucket-{uuid.uuid4().hex[:8]}"
  image_folder(tmp_path / "images")
  cli = subprocess.run([sys.executable, "-m", "parti_jax.data.ingest", "folder", "--images",
                        str(tmp_path / "images"), "--out", f"{missing}/set", "--no_progress"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert cli.returncode == 1 and one_line_naming(f"{missing}/set", cli.stderr.strip(), "error: ")
  assert not epath.Path(missing).exists()  # not made on the way
  assert not records.staging_dir(epath.Path(f"{missing}/set")).exists()  # nor a local folder

  for argv, path in [(["folder", "--images", f"{missing}/images"], f"{missing}/images"),
                     (["folder", "--images", tmp_path / "images", "--captions",
                       f"{missing}/c.jsonl"], f"{missing}/c.jsonl"),
                     (["webdataset", "--tars", f"{missing}/t/*.tar"], f"{missing}/t"),
                     (["webdataset", "--tars", f"{missing}/t/0.tar"], f"{missing}/t/0.tar")]:
    with pytest.raises(records.AccessError) as e:
      run(capsys, *argv, "--out", tmp_path / "out")
    assert one_line_naming(path, str(e.value))


def test_an_anonymous_caller_is_told_about_credentials():
  from gcsfs.retry import HttpError  # what gcsfs raises when it found no credentials
  error = HttpError({"code": 401, "message": "Anonymous caller does not have "
                     "storage.objects.list access to the Google Cloud Storage bucket."})
  assert "no Google Cloud credentials were found" in records.access_problem("gs://b/x", error)
