"""Ingest: folders, tar shards and TFDS datasets become shard sets; bad inputs are counted."""

import collections
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import data_helpers as h
from conftest import ROOT
import numpy as np
import pytest
from PIL import Image

from parti_jax.data import images, ingest, records, shard_writer, sources, spm
from parti_jax.data.sources import tfds, webdataset



def rgb(size=(12, 8), color=(200, 40, 40)) -> Image.Image:
  return Image.new("RGB", size, color)


def noise(size=(48, 32), seed=0) -> Image.Image:
  pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
  return Image.fromarray(pixels)


def write(path, data) -> bytes:
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(data if isinstance(data, bytes) else data.encode())
  return path.read_bytes()


def run(capsys, *argv):
  """Runs the CLI in this process; returns (its return value, what it printed)."""
  argv = [str(a) for a in argv]
  if "--max_bad_fraction" not in argv:  # these small sets are mostly bad on purpose
    argv += ["--max_bad_fraction", "1"]
  result = ingest.main(argv + ["--no_progress"])
  return result, capsys.readouterr().out


def read(out) -> dict:
  return {r["id"]: r for r in records.ShardSet.open(out).read_all()}


def test_shard_ranges_are_the_contiguous_blocks_of_i_times_k_over_n():
  for n in range(25):
    for k in range(1, 7):
      got = [i for s in range(k) for i in sources.shard_range(s, n, k)]
      assert got == list(range(n))
      for s in range(k):
        assert all(i * k // n == s for i in sources.shard_range(s, n, k))
  assert sources.default_num_shards(0) == 1
  assert sources.default_num_shards(10_001) == 2


def test_folder_with_jsonl_captions(tmp_path, capsys):
  src = tmp_path / "images"
  a = write(src / "a.png", h.encoded(rgb(), "PNG"))
  b = write(src / "sub" / "b.jpg", h.encoded(noise(), "JPEG"))
  write(src / "c.png", h.encoded(rgb(color=(0, 0, 9)), "PNG"))  # no caption entry
  write(src / "e.png", h.encoded(rgb(color=(0, 9, 0)), "PNG"))  # entry without a caption
  write(src / ".hidden.png", b"tool dropping, not an image")
  lines = [{"file": "a.png", "caption": "a red square"},
           {"file": "sub/b.jpg", "captions": ["a noisy photo", "  ", "a noisy photo", "noise"]},
           {"file": "a.png", "caption": "second caption of a"},
           {"file": "gone.png", "caption": "its image does not exist"},
           {"file": "e.png"},
           {"caption": "no file field"}]
  text = "\n".join(json.dumps(x) for x in lines[:4]) + "\nnot json {\n\n"
  text += "\n".join(json.dumps(x) for x in lines[4:]) + "\n"
  write(tmp_path / "captions.jsonl", text)
  out = tmp_path / "out"
  meta, printed = run(capsys, "folder", "--images", src, "--captions", tmp_path / "captions.jsonl",
                      "--out", out, "--name", "pets", "--num_shards", "2")

  got = read(out)
  assert sorted(got) == ["a.png", "sub/b.jpg"]
  assert got["a.png"]["captions"] == ["a red square", "second caption of a"]
  assert got["a.png"]["image"] == a
  assert got["sub/b.jpg"]["captions"] == ["a noisy photo", "noise"]
  assert got["sub/b.jpg"]["image"] == b
  assert sorted(p.name for p in out.glob("*.array_record")) == [
      "pets-00000-of-00002.array_record", "pets-00001-of-00002.array_record"]
  on_disk = json.loads((out / "metadata.json").read_text())
  assert on_disk["count"] == meta["count"] == 2 and on_disk["num_shards"] == 2
  assert on_disk["kind"] == "images" and on_disk["fields"] == ["id", "image", "captions"]
  assert on_disk["tally"] == {"written": 2, "repaired": {}, "skipped": {
      "missing_caption": 2, "missing_image": 1, "undecodable_record": 2}}
  assert on_disk["made_by"]["source"] == "folder"
  assert "--no_progress" not in on_disk["made_by"]["command"]
  assert "records written: 2" in printed and "missing_image: 1" in printed


def test_folder_with_tsv_captions(tmp_path, capsys):
  src = tmp_path / "images"
  x = write(src / "x.jpg", h.encoded(noise(seed=1), "JPEG"))
  z = write(src / "deep" / "z.png", h.encoded(rgb(color=(1, 2, 3)), "PNG"))
  write(src / "w.png", h.encoded(rgb(), "PNG"))
  write(tmp_path / "caps.tsv", b"filename\tcaption\r\n"
        b"x.jpg\tfirst caption\r\n"
        b"x.jpg\tsecond\tcaption with a tab\r\n"
        b"z.png\tmatched by its bare name\n"
        b"w.png\t   \n"
        b"deep/z.png\tcaf\xe9 in latin-1\n"
        b"nothing.png\tno such file\n")
  out = tmp_path / "tsv_set"
  run(capsys, "folder", "--images", src, "--captions", tmp_path / "caps.tsv", "--out", out)

  got = read(out)
  assert sorted(got) == ["deep/z.png", "x.jpg"]
  assert got["x.jpg"]["captions"] == ["first caption", "second caption with a tab"]
  assert got["x.jpg"]["image"] == x
  assert got["deep/z.png"]["captions"] == ["caf\ufffd in latin-1", "matched by its bare name"]
  assert got["deep/z.png"]["image"] == z
  meta = records.ShardSet.open(out).meta
  assert meta["name"] == "tsv_set" and meta["num_shards"] == 1
  assert meta["tally"]["skipped"] == {"missing_caption": 1, "missing_image": 1}
  assert meta["tally"]["repaired"] == {"caption_not_utf8": 1}


def test_folder_with_txt_captions(tmp_path, capsys):
  src = tmp_path / "images"
  p = write(src / "p.jpg", h.encoded(noise(seed=2), "JPEG"))
  write(src / "p.txt", b"one\n\n  two \r\nthree\n")
  write(src / "q.png", h.encoded(rgb(), "PNG"))  # no .txt
  write(src / "lonely.txt", b"an image that is not there")
  out = tmp_path / "txt"
  run(capsys, "folder", "--images", src, "--out", out)

  got = read(out)
  assert list(got) == ["p.jpg"]
  assert got["p.jpg"]["captions"] == ["one", "two", "three"] and got["p.jpg"]["image"] == p
  meta = records.ShardSet.open(out).meta
  assert meta["tally"]["skipped"] == {"missing_caption": 1, "missing_image": 1}
  assert meta["shard_counts"] == [1]


def make_tar(path, samples, gz=False) -> bytes:
  """samples: [(member name, bytes)]; returns the tar file's bytes."""
  with tarfile.open(path, "w:gz" if gz else "w") as tar:
    for name, data in samples:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return path.read_bytes()


def test_webdataset_tars(tmp_path, capsys):
  jpg, png = h.encoded(noise(seed=3), "JPEG"), h.encoded(rgb(), "PNG")
  webp = h.encoded(rgb(color=(5, 6, 7)), "WEBP")
  make_tar(tmp_path / "data-000.tar", [
      ("000000.jpg", jpg), ("000000.txt", b"a jpeg sample"),
      ("000001.png", png), ("000001.json", json.dumps({"caption": "a png", "url": "u"}).encode()),
      ("000002.txt", b"my image is missing"),
      ("000003.jpg", jpg),
      ("000004.webp", webp), ("000004.txt", b"zero"),
      ("000004.json", json.dumps({"captions": ["one", "two", "zero"]}).encode()),
      ("000005.jpg", jpg), ("000005.json", b'{"caption": null, "status": "success"}')])
  whole = make_tar(tmp_path / "data-001.tar", [
      (f"10000{i}.{ext}", data) for i in range(4)
      for ext, data in (("jpg", h.encoded(noise(seed=10 + i), "JPEG")), ("txt", b"cut %d" % i))])
  with tarfile.open(tmp_path / "data-001.tar") as tar:
    cut = tar.getmember("100002.jpg").offset_data + 100  # in the middle of 100002's image
  (tmp_path / "data-001.tar").write_bytes(whole[:cut])
  make_tar(tmp_path / "data-002.tar.gz", [("sub/200000.png", png), ("sub/200000.txt", b"gz")],
           gz=True)
  out = tmp_path / "web"
  meta, printed = run(capsys, "webdataset", "--tars", str(tmp_path / "data-*.tar*"), "--out", out)

  got = read(out)
  assert sorted(got) == ["000000", "000001", "000004", "100000", "100001", "sub/200000"]
  assert got["000000"]["image"] == jpg and got["000000"]["captions"] == ["a jpeg sample"]
  assert got["000001"]["image"] == png and got["000001"]["captions"] == ["a png"]
  assert got["000004"]["image"] == webp and got["000004"]["captions"] == ["zero", "one", "two"]
  assert got["100001"]["captions"] == ["cut 1"]
  assert got["sub/200000"]["captions"] == ["gz"]
  assert meta["shard_counts"] == [3, 2, 1]
  assert meta["tally"]["skipped"] == {"corrupt_image": 1, "missing_caption": 2,
                                      "missing_image": 1}
  assert len(meta["source_errors"]) == 1 and "data-001.tar" in meta["source_errors"][0]
  assert "unexpected end of data" in printed


def test_tar_patterns_expand_globs_braces_and_lists(tmp_path):
  for i in range(3):
    (tmp_path / f"s-{i:03d}.tar").write_bytes(b"")
  d = str(tmp_path)
  assert webdataset.expand_tar_patterns([f"{d}/s-{{000..001}}.tar,{d}/s-002.tar"]) == [
      f"{d}/s-000.tar", f"{d}/s-001.tar", f"{d}/s-002.tar"]
  assert webdataset.expand_tar_patterns([f"{d}/s-002.tar", f"{d}/s-*.tar"]) == [
      f"{d}/s-002.tar", f"{d}/s-000.tar", f"{d}/s-001.tar"]
  with pytest.raises(records.DataError, match="nothing found"):
    webdataset.expand_tar_patterns([f"{d}/missing-*.tar"])


# ------------------------------------------------------------------------------------------
# TFDS


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return h.prepare_tfds(data_dir)


def test_tfds_cli_reads_a_prepared_dataset_without_its_builder(tfds_dir, tmp_path):
  out = tmp_path / "from_tfds"
  # A fresh interpreter has no IngestTinyCaptions class: TFDS reads the prepared files.
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "parti_jax.data.ingest", "tfds", "--name", "ingest_tiny_captions",
       "--data_dir", str(tfds_dir), "--split", "train", "--image_feature", "image",
       "--caption_feature", "caption", "--out", str(out), "--num_shards", "2", "--no_progress"],
      check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = read(out)
  assert len(got) == 5 and set(got) < {str(i) for i in range(6)}  # ids: indices in the split
  # TFDS shuffles examples when it prepares them; the caption says which one a record is.
  by_caption = {r["captions"][0]: r for r in got.values()}
  assert sorted(by_caption) == [f"tfds caption {i}" for i in (0, 1, 2, 4, 5)]
  for i in (0, 1, 2, 4, 5):
    assert by_caption[f"tfds caption {i}"]["image"] == h.tfds_png(i)  # stored bytes, as they are
  meta = records.ShardSet.open(out).meta
  assert meta["shard_counts"] == [3, 2]
  assert meta["tally"]["skipped"] == {"missing_caption": 1}
  assert meta["made_by"]["tfds_name"] == "ingest_tiny_captions"


def test_tfds_tensor_images_and_sequence_captions(tfds_dir, tmp_path, capsys):
  out = tmp_path / "pixels"
  run(capsys, "tfds", "--name", "ingest_tiny_captions", "--data_dir", tfds_dir,
      "--image_feature", "pixels", "--caption_feature", "alt", "--out", out)
  got = read(out)
  assert len(got) == 6
  for record in got.values():
    i = int(record["captions"][0].split()[-1])
    assert record["captions"] == [f"alt {i}", f"other {i}"]
    np.testing.assert_array_equal(np.asarray(images.open_image(record["image"])),
                                  h.tfds_pixels(i))


def test_tfds_records_gives_random_access_for_the_pipeline(tfds_dir):
  source = tfds.TfdsRecords("ingest_tiny_captions", str(tfds_dir), "train", "image", "caption")
  assert len(source) == 6
  copy = pickle.loads(pickle.dumps(source))  # grain workers receive a pickled copy
  for index in range(6):
    record = copy[index]
    captions = [spm.clean_caption(c)[0] for c in record["captions"]]
    assert record["id"] == str(index)
    if captions != [""]:
      i = int(captions[0].split()[-1])
      assert captions == [f"tfds caption {i}"] and record["image"] == h.tfds_png(i)
  pixels = tfds.TfdsRecords("ingest_tiny_captions", str(tfds_dir), "train[2:]", "pixels", "alt")
  assert len(pixels) == 4
  i = int(spm.clean_caption(pixels[0]["captions"][0])[0].split()[-1])
  np.testing.assert_array_equal(pixels[0]["image"], h.tfds_pixels(i))


def test_tfds_wrong_feature_names_the_available_ones(tfds_dir, tmp_path, capsys):
  with pytest.raises(records.DataError) as e:
    run(capsys, "tfds", "--name", "ingest_tiny_captions", "--data_dir", tfds_dir,
        "--image_feature", "picture", "--out", tmp_path / "x")
  message = str(e.value)
  assert "no feature 'picture'" in message
  assert all(name in message for name in ("image", "caption", "pixels", "alt"))
  with pytest.raises(records.DataError, match="not text"):
    tfds.TfdsRecords("ingest_tiny_captions", str(tfds_dir), "train", "image", "pixels")
  with pytest.raises(records.DataError, match="not found"):
    tfds.TfdsRecords("no_such_dataset_here", str(tmp_path), "train", "image", "caption")


# ------------------------------------------------------------------------------------------
# Bad inputs


def test_every_kind_of_bad_input_is_converted_or_counted(tmp_path, capsys):
  src, kept, want_skipped = tmp_path / "images", {}, collections.Counter()
  for name, (data, reason) in h.odd_images().items():
    file = f"{name}.{'jpg' if 'jpeg' in name else 'png'}"
    write(src / file, data)
    write(src / f"{name}.txt", f"a {name} image")
    if reason:
      want_skipped[reason] += 1
    else:
      kept[file] = data
  for name, caption in h.odd_captions().items():
    file = f"caption_{name}.png"
    write(src / file, h.encoded(h.rgb(8, 8), "PNG"))
    write(src / f"caption_{name}.txt", caption)
    if name in ("empty", "whitespace"):
      want_skipped["missing_caption"] += 1
    else:
      kept[file] = (src / file).read_bytes()
  out = tmp_path / "bad"
  meta, printed = run(capsys, "folder", "--images", src, "--out", out)

  got = read(out)
  assert sorted(got) == sorted(kept)
  for name, data in kept.items():
    assert got[name]["image"] == data  # stored as given, even when it needed converting
  assert images.open_image(got["exif_rotated_jpeg.jpg"]["image"]).size == (20, 40)  # upright
  assert got["caption_not_utf8.png"]["captions"] == ["caf\ufffd \ufffd red circle"]
  assert len(got["caption_huge.png"]["captions"][0]) <= spm.MAX_CAPTION_CHARS
  assert meta["tally"] == {"written": len(kept), "skipped": dict(sorted(want_skipped.items())),
                           "repaired": {"caption_not_utf8": 1, "caption_truncated": 1}}
  assert "e.g. corrupt_image" in printed


def test_images_over_max_pixels_are_skipped(tmp_path, capsys):
  src = tmp_path / "images"
  write(src / "big.png", h.encoded(rgb((300, 200)), "PNG"))
  write(src / "small.jpg", h.encoded(noise((10, 10)), "JPEG"))
  for stem in ("big", "small"):
    write(src / f"{stem}.txt", f"a {stem} one")
  meta, _ = run(capsys, "folder", "--images", src, "--out", tmp_path / "o", "--max_pixels",
                "10000")
  assert list(read(tmp_path / "o")) == ["small.jpg"]
  assert meta["tally"]["skipped"] == {"image_too_large": 1}


# ------------------------------------------------------------------------------------------
# Several processes, resuming


def test_processes_split_shards_and_a_rerun_resumes(tmp_path, capsys, monkeypatch):
  src = tmp_path / "images"
  for i in range(6):
    write(src / f"img{i}.png", h.encoded(rgb(color=(i, 0, 0)), "PNG"))
    write(src / f"img{i}.txt", f"image number {i}")
  out = tmp_path / "par"
  argv = ["folder", "--images", src, "--out", out, "--num_shards", "4"]
  names = [records.shard_name("par", s, 4) for s in range(4)]

  meta, printed = run(capsys, *argv, "--num_processes", "2", "--process_index", "0")
  assert meta is None and not (out / "metadata.json").exists()
  assert [(out / n).exists() for n in names] == [True, False, True, False]
  assert "2 of 4 shards done" in printed

  stale = [out / f".{names[1]}.0123abcd.tmp", out / ".stats" / f".{names[1][:-13]}.json.ab.tmp"]
  for path in stale:
    path.write_bytes(b"left by a killed run")
  monkeypatch.setenv("PARTI_PROCESS_ID", "1")
  monkeypatch.setenv("PARTI_NUM_PROCESSES", "2")
  meta, printed = run(capsys, *argv)
  assert all((out / n).exists() for n in names) and not any(p.exists() for p in stale)
  assert meta["count"] == 6 and meta["shard_counts"] == [2, 1, 2, 1]
  assert meta["tally"] == {"written": 6, "skipped": {}, "repaired": {}}
  assert "--process_index" not in meta["made_by"]["command"]
  assert [r["id"] for r in records.ShardSet.open(out).read_all()] == [
      f"img{i}.png" for i in range(6)]

  stale = out / f".{names[0]}.feed.tmp"
  stale.write_bytes(b"left by a killed run")
  paths = [out / n for n in names] + [out / "metadata.json"] + sorted((out / ".stats").iterdir())
  before = [p.stat().st_mtime_ns for p in paths]
  meta, printed = run(capsys, *argv, "--process_index", "0")
  assert "resuming: 4 of 4 shards already done" in printed
  assert [p.stat().st_mtime_ns for p in paths] == before
  assert not stale.exists() and meta["count"] == 6


def test_processes_that_listed_different_inputs_are_caught(tmp_path, capsys):
  src = tmp_path / "images"
  for i in range(4):
    write(src / f"img{i}.png", h.encoded(rgb(color=(0, i, 0)), "PNG"))
    write(src / f"img{i}.txt", f"image {i}")
  out = tmp_path / "changed"
  argv = ["folder", "--images", src, "--out", out, "--num_shards", "2", "--num_processes", "2"]
  run(capsys, *argv, "--process_index", "0")
  write(src / "img9.png", h.encoded(rgb(), "PNG"))  # arrives before process 1 lists the folder
  write(src / "img9.txt", "late")
  with pytest.raises(records.DataError, match="different inputs"):
    run(capsys, *argv, "--process_index", "1")
  assert not (out / "metadata.json").exists()


def test_two_processes_ingest_at_the_same_time(tmp_path):
  src = tmp_path / "images"
  for i in range(12):
    write(src / f"img{i:02d}.png", h.encoded(h.rgb(16, 16, i), "PNG"))
    write(src / f"img{i:02d}.txt", f"picture {i}")
  out = tmp_path / "together"
  command = [sys.executable, "-m", "parti_jax.data.ingest", "folder", "--images", str(src),
             "--out", str(out), "--num_shards", "4", "--num_processes", "2", "--no_progress"]
  running = [subprocess.Popen(command + ["--process_index", str(p)], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for p in range(2)]
  outputs = [p.communicate(timeout=120)[0] for p in running]
  assert [p.returncode for p in running] == [0, 0], outputs
  meta = records.ShardSet.open(out).meta
  assert meta["count"] == 12 and meta["num_shards"] == 4
  assert sorted(r["id"] for r in records.ShardSet.open(out).read_all()) == [
      f"img{i:02d}.png" for i in range(12)]


def test_a_failure_inside_a_shard_leaves_no_shard_and_a_rerun_completes(tmp_path, capsys,
                                                                      monkeypatch):
  src = tmp_path / "images"
  for i in range(6):
    write(src / f"img{i}.png", h.encoded(h.rgb(8, 8, i), "PNG"))
    write(src / f"img{i}.txt", f"image {i}")
  out = tmp_path / "crash"
  argv = ["folder", "--images", src, "--out", out, "--num_shards", "2", "--num_threads", "1"]
  real, calls = shard_writer.check_record, []

  def dies_on_the_fifth(*args, **kwargs):  # as if the machine went away mid-shard
    calls.append(1)
    if len(calls) == 5:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(shard_writer, "check_record", dies_on_the_fifth)
  with pytest.raises(KeyboardInterrupt):
    run(capsys, *argv)
  names = sorted(p.name for p in out.iterdir())
  assert records.shard_name("crash", 0, 2) in names  # finished before the failure
  assert records.shard_name("crash", 1, 2) not in names  # never reads as complete
  assert not [n for n in names if n.endswith(".tmp")] and "metadata.json" not in names
  monkeypatch.setattr(shard_writer, "check_record", real)
  meta, printed = run(capsys, *argv)
  assert "resuming: 1 of 2 shards already done" in printed and meta["count"] == 6


def test_a_mostly_unreadable_shard_stops_the_ingest_naming_it(tmp_path, capsys):
  src = tmp_path / "images"
  for i in range(4):
    write(src / f"img{i}.png", b"not a png" if i else h.encoded(h.rgb(8, 8), "PNG"))
    write(src / f"img{i}.txt", f"image {i}")
  out = tmp_path / "broken"
  with pytest.raises(records.DataError, match=r"shard 0 of 1 \(broken-00000-of-00001"
                     r".array_record\): 3 of 4 records skipped \(corrupt_image 3"):
    run(capsys, "folder", "--images", src, "--out", out, "--max_bad_fraction", "0.5")
  assert not (out / records.shard_name("broken", 0, 1)).exists()


def test_file_names_that_are_not_utf8_are_kept(tmp_path, capsys):
  src = tmp_path / "images"
  name = os.fsdecode(b"caf\xe9")
  write(src / f"{name}.png", h.encoded(h.rgb(8, 8), "PNG"))
  write(src / f"{name}.txt", "a cafe")
  meta, _ = run(capsys, "folder", "--images", src, "--out", tmp_path / "names")
  (record,) = records.ShardSet.open(tmp_path / "names").read_all()
  assert record["id"] == "caf\ufffd.png" and meta["count"] == 1
