"""Hostile inputs, made here, for every reader of user files (docs/trust.md): each is refused
with the project's own error naming the file (or skipped and counted where the reader skips
and counts), never runs the code a pickle asks for, and costs a few seconds and under
MEMORY_BOUND_MB of peak memory. Huge files are sparse (a hole, no space on disk); bombs repeat
one compressed block, so each is quick to make."""

import bz2
import contextlib
import gzip
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib

import data_helpers as h
import numpy as np
import pytest
from PIL import Image, features

from parti_jax import runs, sampling
from parti_jax.convert import torch_file
from parti_jax.data import images, ingest, records, spm
from parti_jax.eval import fid, inception
from parti_jax.eval import shapes as eval_shapes
from parti_jax.models import perceptual

MEMORY_BOUND_MB = 200
GB = 1 << 30


def _status_mb(field: str) -> int:
  with open("/proc/self/status") as f:  # the test process's own accounting, not a user path
    return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) // 1024


@contextlib.contextmanager
def bounded(megabytes: int = MEMORY_BOUND_MB):
  """Asserts that the block grows peak RSS by under `megabytes` (Linux: the peak, VmHWM, is
  reset first; elsewhere nothing is checked). No time bound: a timing belongs in a
  benchmark, and a 1 GB caption line is read through, which takes seconds on a busy machine."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    before = _status_mb("VmRSS")
  except OSError:
    before = None
  yield
  if before is not None:
    growth = _status_mb("VmHWM") - before
    assert growth < megabytes, f"peak RSS grew by {growth} MB"


def sparse_file(path, size: int, head: bytes = b"", tail: bytes = b""):
  """A file of `size` bytes that takes no space: `head`, a hole of zeros, `tail`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "wb") as f:  # the test's own temporary file
    f.write(head)
    f.truncate(size - len(tail))
    f.seek(size - len(tail))
    f.write(tail)
  return path


# --- Pickles that would run code


class OpensMarker:
  """Unpickled by plain pickle, this creates `marker`: a hostile file's side effect."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return open, (self.marker, "w")


class RunsShell(OpensMarker):
  def __reduce__(self):
    return os.system, (f"touch '{self.marker}'",)


PAYLOADS = [OpensMarker, RunsShell]


@pytest.mark.parametrize("payload", PAYLOADS)
def test_the_payloads_run_code_under_plain_pickle(tmp_path, payload):
  """So that the tests below, where the marker never appears, mean something."""
  marker = tmp_path / "marker"
  result = pickle.loads(pickle.dumps(payload(marker), 2))
  if hasattr(result, "close"):
    result.close()
  assert marker.exists()


# --- torch.save files, written opcode by opcode (torch is not needed)

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


# Pickle opcodes: GLOBAL module.name, BINUNICODE, BININT, a MARKed TUPLE of ints.
_global = lambda module, name: b"c" + module.encode() + b"\n" + name.encode() + b"\n"
_str = lambda text: b"X" + struct.pack("<I", len(text.encode())) + text.encode()
_int = lambda value: b"J" + struct.pack("<i", value)
_tuple = lambda values: b"(" + b"".join(_int(v) for v in values) + b"t"


def state_dict_pickle(tensors: dict) -> bytes:
  """The pickle torch.save writes for {name: (storage key, numel, offset, size, stride)} of
  float32 tensors: an OrderedDict of _rebuild_tensor_v2 calls on persistent storage ids."""
  out = b"\x80\x02" + _global("collections", "OrderedDict") + b")R("
  for name, (key, numel, offset, size, stride) in tensors.items():
    pid = (b"(" + _str("storage") + _global("torch", "FloatStorage") + _str(key) + _str("cpu")
           + _int(numel) + b"tQ")
    hooks = _global("collections", "OrderedDict") + b")R"
    out += (_str(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid
            + _int(offset) + _tuple(size) + _tuple(stride) + b"\x89" + hooks + b"tR")
  return out + b"u."


def legacy_bytes(**parts) -> bytes:
  """A legacy-format torch.save file: five pickles then the storages; `parts` replaces any
  of magic, protocol, system, obj, keys and storages by raw bytes."""
  system = {"protocol_version": 1001, "little_endian": True,
            "type_sizes": {"short": 2, "int": 4, "long": 4}}
  layout = dict(magic=pickle.dumps(LEGACY_MAGIC, 2), protocol=pickle.dumps(1001, 2),
                system=pickle.dumps(system, 2), obj=pickle.dumps({}, 2),
                keys=pickle.dumps([], 2), storages=b"")
  layout.update(parts)
  return b"".join(layout.values())


def one_tensor(numel: int, size=None, stride=(1,)) -> dict:
  return dict(obj=state_dict_pickle({"w": ("0", numel, 0, size or (numel,), stride)}),
              keys=pickle.dumps(["0"], 2))


def zip_bytes(members) -> bytes:
  """A zip archive written field by field: members are (name, data, method, size, crc) and
  may add the compressed size they declare, so that a member can hold a deflate stream made
  here (a bomb) rather than by zipfile, or declare sizes its data does not have."""
  out, central = b"", b""
  for name, data, method, size, crc, *packed in members:
    n, packed = name.encode(), packed[0] if packed else len(data)
    central += struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0, crc,
                           packed, size, len(n), 0, 0, 0, 0, 0, len(out)) + n
    out += struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0, crc, packed, size,
                       len(n), 0) + n + data
  end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central),
                    len(out), 0)
  return out + central + end


def stored(name: str, data: bytes):
  return name, data, zipfile.ZIP_STORED, len(data), zlib.crc32(data)


def deflate_bomb(size: int) -> bytes:
  """A raw deflate stream of `size` zero bytes, made from one block repeated: each block is
  flushed to a byte boundary with no reference back, so copies follow one another."""
  chunk = 16 << 20
  assert size % chunk == 0
  c = zlib.compressobj(9, zlib.DEFLATED, -15)
  block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
  return block * (size // chunk) + c.flush()


def test_the_handmade_files_are_what_torch_writes(tmp_path):
  """The writers above make files the reader accepts, so refusals below are about the harm."""
  weights = np.arange(4, dtype=np.float32)
  path = tmp_path / "legacy.pth"
  path.write_bytes(legacy_bytes(**one_tensor(4),
                                storages=struct.pack("<q", 4) + weights.tobytes()))
  np.testing.assert_array_equal(torch_file.load(path)["w"], weights)
  zipped = tmp_path / "zip.pth"
  zipped.write_bytes(zip_bytes([stored("archive/data.pkl", one_tensor(4)["obj"]),
                                stored("archive/data/0", weights.tobytes())]))
  np.testing.assert_array_equal(torch_file.load(zipped)["w"], weights)
  head = zlib.decompressobj(-15).decompress(deflate_bomb(32 << 20), 1 << 20)
  assert head == bytes(1 << 20)


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("position", ["magic", "protocol", "system", "obj", "keys", "zip"])
def test_a_code_running_pickle_anywhere_in_a_torch_file_never_runs(tmp_path, position,
                                                                    payload):
  marker, path = tmp_path / "marker", tmp_path / "evil.pth"
  evil = pickle.dumps(payload(marker), 2)
  path.write_bytes(zip_bytes([stored("archive/data.pkl", evil)]) if position == "zip"
                   else legacy_bytes(**{position: evil}))
  with bounded(), pytest.raises(torch_file.TorchFileError,
                                match=r"evil\.pth: .*holds a (io\.open|posix\.system)"):
    torch_file.load(path)
  assert not marker.exists()


@pytest.mark.parametrize("converter", ["vgg16", "inception"])
def test_the_converters_refuse_a_code_running_file_with_one_line(tmp_path, converter):
  """What a user who downloaded the wrong file sees: one error line, no traceback, no file."""
  marker, path, out = tmp_path / "marker", tmp_path / "evil.pth", tmp_path / "out.npz"
  path.write_bytes(legacy_bytes(obj=pickle.dumps(RunsShell(marker), 2)))
  flag = "--vgg16" if converter == "vgg16" else "--pytorch_fid"
  result = subprocess.run(
      [sys.executable, "-m", f"parti_jax.convert.{converter}", flag, str(path), "--out", str(out)],
      capture_output=True, text=True, timeout=120, check=False)
  assert result.returncode == 1, result.stderr
  assert re.fullmatch(r"error: .*evil\.pth: .*holds a posix\.system.*\n", result.stderr)
  assert not marker.exists() and not out.exists()


def _shared_lists():
  nested = []
  for _ in range(64):  # 2**64 paths to the innermost list, 64 lists in the pickle
    nested = [nested, nested]
  return nested


# BINBYTES8 of 8 GB followed by a few bytes: pickle would ask the file for all of them.
HUGE_PICKLE = b"\x80\x04\x8e" + struct.pack("<Q", 8 * GB) + b"tiny"
LEGACY_CASES = {  # name: (the file's parts, what the refusal says)
    "storage_past_the_file": (dict(one_tensor(4), storages=struct.pack("<q", 10**15) + bytes(16)),
                              r"storage '0' declares 1,000,000,000,000,000 elements of 4 bytes, "
                              r"but only 16 bytes follow"),
    "tensor_past_its_storage": (dict(one_tensor(4, size=(1_000_000,)),
                                     storages=struct.pack("<q", 4) + bytes(16)), "reaches"),
    "huge_magic": (dict(magic=HUGE_PICKLE), "not a PyTorch file"),
    "huge_object": (dict(obj=HUGE_PICKLE), ""),
    "huge_keys": (dict(keys=HUGE_PICKLE), ""),
    "shared_lists": (dict(obj=pickle.dumps({"w": _shared_lists()}, 2)), "entry 'w' is a list"),
}


@pytest.mark.parametrize("case", LEGACY_CASES)
def test_a_lying_legacy_file_is_refused_before_allocating(tmp_path, case):
  parts, message = LEGACY_CASES[case]
  path = tmp_path / "liar.pth"
  path.write_bytes(legacy_bytes(**parts))
  with bounded(), pytest.raises(torch_file.TorchFileError, match=r"liar\.pth: .*" + message):
    torch_file.load(path)


ZIP_CASES = {  # name: (members, what the refusal says)
    "bomb": (lambda: [stored("archive/data.pkl", one_tensor(512 << 20)["obj"]),  # 2 GB in 2 MB
                      ("archive/data/0", deflate_bomb(2 * GB), zipfile.ZIP_DEFLATED, 2 * GB, 0)],
             r"member archive/data/0 expands .* zip bomb"),
    "past_the_archive": (lambda: [stored("archive/data.pkl", one_tensor(GB - 1)["obj"]),
                                  ("archive/data/0", bytes(16), 0, 4 * GB - 4, 0, 4 * GB - 4)],
                         r"member archive/data/0 declares 4,294,967,292 bytes in an archive of"),
    "fat_data_pkl": (lambda: [("archive/data.pkl", b"\x80\x02}.", 0, 100 << 20, 0, 4)],
                     r"member archive/data\.pkl declares 104,857,600 bytes, over the"),
}


@pytest.mark.parametrize("case", ZIP_CASES)
def test_zip_members_are_refused_by_their_declared_sizes_before_reading(tmp_path, case):
  members, message = ZIP_CASES[case]
  path = tmp_path / "liar.pth"
  path.write_bytes(zip_bytes(members()))
  with bounded(), pytest.raises(torch_file.TorchFileError, match=r"liar\.pth: " + message):
    torch_file.load(path)


# --- webdataset tars


def tar_header(name: str, size: int, kind=tarfile.REGTYPE) -> bytes:
  info = tarfile.TarInfo(name)
  info.size, info.type = size, kind
  return info.tobuf(format=tarfile.GNU_FORMAT)  # GNU: sizes past 8 GB in base 256


def tar_member(name: str, data: bytes) -> bytes:
  return tar_header(name, len(data)) + data + bytes(-len(data) % tarfile.BLOCKSIZE)


def good_sample() -> bytes:
  return (tar_member("000000.png", h.encoded(h.rgb(8, 8), "PNG"))
          + tar_member("000000.txt", b"a good sample"))


def ingest_(capsys, *argv) -> dict:
  """Runs the ingest command here, keeping every bad record; returns its metadata."""
  meta = ingest.main([str(a) for a in argv] + ["--max_bad_fraction", "1", "--no_progress"])
  capsys.readouterr()
  return meta


@pytest.mark.parametrize("name, kind, skipped, message", [
    ("000001.jpg", tarfile.REGTYPE, {"image_too_large": 1}, "unexpected end of data"),
    ("000001.bin", tarfile.REGTYPE, {"missing_image": 1}, "unexpected end of data"),
    ("././@PaxHeader", tarfile.XHDTYPE, {}, "an extended header of 50,000,000,000 bytes"),
    ("././@LongLink", tarfile.GNUTYPE_LONGNAME, {}, "an extended header of 50,000,000,000 bytes"),
])
def test_a_tar_header_declaring_50_gb_is_passed_over_unread(tmp_path, capsys, name, kind,
                                                             skipped, message):
  tar = tmp_path / "big.tar"
  tar.write_bytes(good_sample() + tar_header(name, 50 * 10**9, kind) + b"\xff" * 1000)
  with bounded():
    meta = ingest_(capsys, "webdataset", "--tars", tar, "--out", tmp_path / "out")
  assert meta["tally"]["written"] == 1 and meta["tally"]["skipped"] == skipped
  assert len(meta["source_errors"]) == 1
  assert "big.tar" in meta["source_errors"][0] and message in meta["source_errors"][0]


@pytest.mark.parametrize("compress, suffix", [(gzip.compress, "gz"), (bz2.compress, "bz2")])
def test_a_compressed_tar_bomb_stops_within_its_expansion_bound(tmp_path, capsys, compress,
                                                                suffix):
  # Compressed files may be concatenated: 800 copies of 16 MB of zeros, a 100 GB member's
  # data, 12.5 GB of tar in a few MB (gzip) or 40 KB (bzip2, 45 bytes a copy).
  tar = tmp_path / f"bomb.tar.{suffix}"
  tar.write_bytes(compress(good_sample() + tar_header("000001.jpg", 100 * GB))
                  + compress(bytes(16 << 20), 9) * 800)
  with bounded():
    meta = ingest_(capsys, "webdataset", "--tars", tar, "--out", tmp_path / "out")
  assert meta["tally"]["written"] == 1
  assert meta["tally"]["skipped"] == {"image_too_large": 1}
  assert len(meta["source_errors"]) == 1
  assert "decompression bomb" in meta["source_errors"][0]


# --- Image folders and captions files


def test_huge_folder_files_and_caption_lines_are_skipped_and_counted(tmp_path, capsys):
  src, png = tmp_path / "images", h.encoded(h.rgb(8, 8), "PNG")
  src.mkdir()
  for name in ("a", "b", "c", "d"):
    (src / f"{name}.png").write_bytes(png)
  sparse_file(src / "huge.png", 2 * GB, head=png)  # an image file of 2 GB
  line = lambda name: json.dumps({"file": f"{name}.png", "caption": f"a {name}"}).encode()
  captions = sparse_file(tmp_path / "captions.jsonl", GB,  # a 1 GB line between two
                         head=line("a") + b"\n" + line("huge") + b"\n{\"file\": \"b.png\", ",
                         tail=b"\"caption\": \"x\"}\n" + line("c") + b"\n")
  with bounded():
    meta = ingest_(capsys, "folder", "--images", src, "--captions", captions,
                   "--out", tmp_path / "jsonl")
  assert meta["tally"]["written"] == 2  # a.png and c.png
  assert meta["tally"]["skipped"] == {"image_too_large": 1, "missing_caption": 2,
                                      "undecodable_record": 1}

  captions = sparse_file(tmp_path / "captions.tsv", GB, head=b"file\tcaption\nb.png\t",
                         tail=b"\na.png\ta red square\n")
  with bounded():
    meta = ingest_(capsys, "folder", "--images", src, "--captions", captions,
                   "--out", tmp_path / "tsv")
  assert meta["tally"]["written"] == 1  # a.png; b.png's line is the long one
  assert meta["tally"]["skipped"] == {"missing_caption": 4, "undecodable_record": 1}

  # Same-named .txt captions: a 2 GB one skips its image, read no further than the limit.
  sparse_file(src / "d.txt", 2 * GB, head=b"a caption")
  (src / "a.txt").write_bytes(b"a fine caption")
  with bounded():
    meta = ingest_(capsys, "folder", "--images", src, "--out", tmp_path / "txt")
  assert meta["tally"]["written"] == 1
  assert meta["tally"]["skipped"] == {"missing_caption": 3, "undecodable_record": 1}


# --- Image bytes


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(width: int, height: int, extra: bytes = b"", rows: bytes | None = None) -> bytes:
  """An RGB PNG written chunk by chunk: a header may declare any size over any data."""
  rows = bytes((3 * width + 1) * height) if rows is None else rows
  return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                               0, 0, 0))
          + extra + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b""))


@pytest.mark.parametrize("bomb, reason, pillow_limit", [
    (lambda: png_bytes(100_000, 100_000, rows=bytes(100)), "image_too_large", None),  # 10 Gpx
    (lambda: png_bytes(8, 8, extra=_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(
        bytes(200 << 20), 9))), "corrupt_image", None),  # 200 MB of text in 200 KB
    # Pillow's own bomb error, where something set its limit (ours is then 10**12 pixels)
    (lambda: png_bytes(100, 100), "image_too_large", 1000),
], ids=["pixels", "text_chunk", "pillows_limit"])
def test_a_png_bomb_is_skipped_undecoded(bomb, reason, pillow_limit, monkeypatch):
  if pillow_limit:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
  with bounded(), pytest.raises(records.BadRecord, match=reason):
    images.open_image(bomb(), max_pixels=10**12 if pillow_limit else images.DEFAULT_MAX_PIXELS)


ANIMATED = ["GIF", "PNG", "TIFF"] + (["WEBP"] if features.check_module("webp") else [])


@pytest.mark.parametrize("fmt", ANIMATED)
def test_only_the_first_frame_of_an_animation_is_decoded(fmt, monkeypatch):
  frames = [Image.new("RGB", (600, 600), (200, 0, 0))]
  frames += [Image.new("RGB", (600, 600), (0, 0, 200)) for _ in range(20)]
  buf = io.BytesIO()
  frames[0].save(buf, fmt, save_all=True, append_images=frames[1:],
                 **({"compression": "tiff_deflate"} if fmt == "TIFF" else {}))
  kind = type(Image.open(io.BytesIO(buf.getvalue())))
  asked, seek = [], kind.seek

  def spy(self, frame):
    asked.append(frame)
    return seek(self, frame)

  monkeypatch.setattr(kind, "seek", spy)
  with bounded():
    img = images.open_image(buf.getvalue())
  assert all(frame == 0 for frame in asked), asked
  assert img.getpixel((300, 300))[0] > 150  # the first frame's red


def test_a_record_declaring_billions_of_items_is_undecodable():
  for data in (b"\xdd\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xffab", b"\x91" * 100_000):
    with bounded(), pytest.raises(records.BadRecord, match="undecodable_record"):
      records.unpack(data)


# --- SentencePiece models


@pytest.mark.parametrize("content", ["garbage", "zeros", "empty", "huge"])
def test_a_sentencepiece_model_that_is_not_one_is_refused(tmp_path, content):
  path = tmp_path / "text.model"
  if content == "huge":
    sparse_file(path, 4 * GB)
  else:
    path.write_bytes({"garbage": np.random.default_rng(0).bytes(4096),
                      "zeros": bytes(1000), "empty": b""}[content])
  with bounded(), pytest.raises(records.DataError, match=r"text\.model"):
    spm.Tokenizer(path, 16)


# --- JSON: a shard set's metadata.json, a run's config.json


def _good_metadata(tmp_path) -> bytes:
  (tmp_path / "reference").mkdir()
  records.write_metadata(tmp_path / "reference", name="set", kind="images", shard_counts=[2, 1],
                         fields=("id", "image", "captions"), made_by={"source": "test"})
  return (tmp_path / "reference" / records.METADATA).read_bytes()


JSON_FILES = {  # which: (file name, its good bytes, the reader of its directory, the error)
    "metadata": ("metadata.json", _good_metadata, records.read_metadata, records.DataError),
    "config": ("config.json", lambda _: json.dumps({"model": {"d_model": 64}}).encode(),
               runs.read_config, runs.RunError),
}
edit = lambda **fields: lambda good: json.dumps(dict(json.loads(good), **fields)).encode()
BAD_JSON = {
    "truncated": lambda good: good[:len(good) // 2],
    "malformed": lambda good: b'{"format": "parti_jax.records/1", "name": }',
    "not_utf8": lambda good: b"\xff\xfe\x00" + good,
    "a_list": lambda good: b"[1, 2, 3]",
    "deeply_nested": lambda good: b"[" * 200_000 + b"]" * 200_000,
    "huge": None,  # 2 GB
    "metadata_path_in_name": edit(name="../../etc/x"),
    "metadata_trillion_shards": edit(num_shards=10**12),  # as many shard paths to make
    "config_bad_rules": edit(sharding_rules=[1, 2]),
}


# Every case for both files, but a case named after one file for that file only.
@pytest.mark.parametrize("which, case", [
    (which, case) for which in JSON_FILES for case in BAD_JSON
    if case.split("_")[0] not in set(JSON_FILES) - {which}])
def test_a_bad_json_file_is_refused_naming_it(tmp_path, which, case):
  name, good, read, error = JSON_FILES[which]
  good, path = good(tmp_path), tmp_path / "dir" / name
  if case == "huge":
    sparse_file(path, 2 * GB, head=good[:-2])
  else:
    path.parent.mkdir()
    path.write_bytes(BAD_JSON[case](good))
  with bounded(), pytest.raises(error, match=rf"dir/{re.escape(name)}"):
    read(tmp_path / "dir")
  path.write_bytes(good)
  read(tmp_path / "dir")  # the good file reads


# --- Weight .npz files

WEIGHT_READERS = {
    "perceptual": (perceptual.load_weights, perceptual.PerceptualWeightsError,
                   "conv1_1/kernel.npy"),
    "inception": (inception.load_weights, inception.InceptionWeightsError,
                  "Conv2d_1a_3x3/kernel.npy"),
}


@pytest.mark.parametrize("case", ["pickle", "member_bomb", "huge"])
@pytest.mark.parametrize("reader", WEIGHT_READERS)
def test_a_hostile_npz_is_refused_unread(tmp_path, reader, case):
  load, error, member = WEIGHT_READERS[reader]
  path, marker = tmp_path / "evil.npz", tmp_path / "marker"
  if case == "pickle":  # an object array, which allow_pickle=True would unpickle
    np.savez(path, format_version=np.array(1), payload=np.array([OpensMarker(marker)], object))
    message = "unreadable"
  elif case == "member_bomb":  # 1 GB declared and deflated into 1 MB
    path.write_bytes(zip_bytes([(member, deflate_bomb(GB), zipfile.ZIP_DEFLATED, GB, 0)]))
    message = f"member {member} declares 1,073,741,824 bytes"
  else:
    sparse_file(path, 8 * GB, head=b"PK\x03\x04")
    message = "holds more than"
  with bounded(), pytest.raises(error, match=rf"evil\.npz:? {message}"):
    load(path)
  assert not marker.exists()


# --- What the sampler and the evaluations read


def test_a_huge_prompts_file_is_refused_unread(tmp_path):
  path = sparse_file(tmp_path / "prompts.txt", 8 * GB, head=b"a red star\n")
  with bounded(), pytest.raises(sampling.SampleError, match=r"prompts\.txt: more than"):
    sampling.read_prompts(path)


def test_fid_skips_an_image_file_larger_than_any_image_unread(tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  Image.new("RGB", (8, 8), "red").save(folder / "a.png")
  sparse_file(folder / "b.png", 8 * GB, head=b"\x89PNG\r\n\x1a\n")
  image_set = fid.ImageSet(folder)
  with bounded():
    assert image_set.pixels(0, 8).shape == (8, 8, 3)
    assert image_set.pixels(1, 8) is None  # skipped and counted by fid.accumulate


def test_the_shapes_evaluator_refuses_a_huge_sample_unread(tmp_path):
  (tmp_path / "samples.json").write_text(json.dumps(
      {"prompts": [{"prompt": "a red star", "files": ["0.png"]}]}))
  sparse_file(tmp_path / "0.png", 8 * GB, head=b"\x89PNG\r\n\x1a\n")
  with bounded(), pytest.raises(records.TooLarge, match=r"0\.png: more than"):
    eval_shapes.samples_of(tmp_path)
