"""The grain input pipeline: resume, process coverage, bad records, global arrays, tokens."""

import subprocess
import sys

import data_helpers as h
import grain
import numpy as np
import pytest
from conftest import ROOT

from parti_jax import config as common
from parti_jax import sharding, tokenizers
from parti_jax import text as text_lib
from parti_jax.data import encode as encode_lib
from parti_jax.data import images, pipeline, records, spm
from parti_jax.data.sources import tfds

REASONS = records.SKIP_REASONS


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  model = h.spm_model(root)
  image_set = h.write_set(root / "images", h.image_records(40), num_shards=2)
  token_set = root / "tokens"
  encode_lib.encode(image_set, token_set, tokenizers.color(32),
                    spm.Tokenizer(model, 16), batch_size=16)
  return dict(root=root, spm=model, images=image_set, tokens=str(token_set))


def config_for(data, kind="tokens", **fields):
  c = common.tiny_model(common.base())
  c.data.update(kind=kind, train=data.get(kind, ""), eval=data.get(kind, ""), resolution=32, num_threads=2,
                spm_model=data["spm"] if kind == "images" else "")
  c.data.update(fields)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("kind,workers", [("tokens", 0), ("images", 0), ("images", 2)])
def test_restored_iterator_continues_with_the_same_batches(data, kind, workers):
  c = config_for(data, kind, num_workers=workers)
  ds = pipeline.dataset(c, train=True, global_batch=4)
  it = iter(ds)
  take(it, 7)  # 28 of the 40 records, from both shards
  state = it.get_state()
  expected = take(it, 15)  # crosses the epoch boundary at record 40
  it2 = iter(pipeline.dataset(c, train=True, global_batch=4))
  it2.set_state(state)
  assert_same_batches(take(it2, 15), expected)
  for i in (it, it2):
    getattr(i, "close", lambda: None)()


def test_epochs_are_complete_and_reshuffled(data):
  it = iter(pipeline.dataset(config_for(data), train=True, global_batch=5))
  epochs = [np.concatenate([b["index"] for b in take(it, 8)]) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(40))
  assert list(epochs[0]) != list(epochs[1])


@pytest.mark.parametrize("train", [True, False])
def test_processes_read_their_rows_of_each_global_batch(data, train):
  """Disjoint rows read disjoint records that cover the data; shared rows, the same ones."""
  c = config_for(data)
  def read(rows):
    batches = take(iter(pipeline.dataset(c, train=train, global_batch=8, rows=rows)), 5)
    assert all(len(b["index"]) == len(rows) for b in batches)
    return batches
  halves = [read(range(0, 4)), read(range(4, 8))]  # 5 global batches of 8: one epoch of 40
  seen = [{int(i) for b in part for i, m in zip(b["index"], b["mask"]) if m} for part in halves]
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(40))
  assert_same_batches(read(range(4, 8)), halves[1])  # a replica process reads the same rows
  whole = read(range(8))
  for k in whole[0]:
    for b, first, second in zip(whole, *halves):
      np.testing.assert_array_equal(b[k], np.concatenate([first[k], second[k]]), err_msg=k)


def test_eval_is_finite_padded_and_the_same_on_every_process(data, tmp_path):
  path = h.write_set(tmp_path / "odd", h.image_records(13), num_shards=3)
  c = config_for(data, "images", eval=path)
  counts, indices = [], []
  for rows in (range(0, 4), range(4, 8)):
    batches = list(pipeline.dataset(c, train=False, global_batch=8, rows=rows))
    counts.append(len(batches))
    indices += [int(i) for b in batches for i, m in zip(b["index"], b["mask"]) if m]
    again = list(pipeline.dataset(c, train=False, global_batch=8, rows=rows))
    assert_same_batches(batches, again)  # centre crop, first caption: deterministic
  assert counts == [2, 2]  # 13 records padded to 2 global batches of 8, 4 rows each
  assert sorted(indices) == list(range(13))


def test_global_batches_are_sharded_over_the_batch_axes(data):
  c = config_for(data)
  mesh = sharding.make_mesh(c.copy_and_resolve_references())
  c.global_batch_size = 16
  loader = pipeline.Loader(c, mesh)
  host = next(iter(pipeline.dataset(c, train=True, global_batch=16)))
  batch = next(loader)
  np.testing.assert_array_equal(host.pop("position"), np.arange(16))  # global batch 0
  assert loader.position == 16
  assert batch.keys() == host.keys()
  for k, v in batch.items():
    assert v.shape[0] == 16 and v.sharding.spec[0] == ("data", "fsdp"), k
    np.testing.assert_array_equal(np.asarray(v), host[k])
  assert batch["image_tokens"].shape == (16, c.model.image_grid ** 2)
  loader.close()


def test_token_shards_hold_the_tokenizer_codes_of_the_centre_crop(data):
  tokens = records.ShardSet.open(data["tokens"])
  assert tokens.kind == "tokens" and len(tokens) == 40
  assert tokens.meta["tokens"]["grid"] == 4 and tokens.meta["tokens"]["codebook_size"] == 64
  source = {r["id"]: r for r in records.ShardSet.open(data["images"]).read_all()}
  tok = spm.Tokenizer(data["spm"], 16)
  encode = tokenizers.color(32).encode
  for r in list(tokens.read_all())[:5]:
    img = images.square(images.open_image(source[r["id"]]["image"]), 32)
    want = np.asarray(encode(None, images.to_model_range(img, -1, 1)[None]))[0]
    np.testing.assert_array_equal(np.frombuffer(r["image_codes"], np.uint16), want)
    assert r["captions"] == source[r["id"]]["captions"]
    assert r["text_tokens"] == [tok.ids(c) for c in r["captions"]]
    assert all(c.startswith(tok.decode(t)) for c, t in zip(r["captions"], r["text_tokens"]))


@pytest.mark.parametrize("p,expect", [(0.0, "never"), (1.0, "always")])
def test_caption_dropout_gives_the_unconditional_input(data, p, expect):
  for kind in ("tokens", "images"):
    b = next(iter(pipeline.dataset(config_for(data, kind, caption_dropout=p), True, 8)))
    unconditional = (b["text_tokens"] == text_lib.pad([], 16)).all(axis=1)
    assert unconditional.all() if expect == "always" else not unconditional.any()


def test_images_are_cropped_and_scaled_to_the_model_range(data):
  c = config_for(data, "images", value_range=(0.0, 1.0), resolution=24)
  b = next(iter(pipeline.dataset(c, True, 4)))
  assert b["images"].shape == (4, 24, 24, 3) and b["images"].dtype == np.float32
  assert 0.0 <= b["images"].min() and b["images"].max() <= 1.0 and b["images"].std() > 0.1


def bad_set(tmp_path):
  """Every awkward image and caption, plus records missing fields and non-records."""
  recs, want_skipped = [], np.zeros(len(REASONS), int)
  for name, (data, reason) in h.odd_images().items():
    recs.append(dict(id=name, image=data, captions=["a red circle"]))
    if reason:
      want_skipped[REASONS.index(reason)] += 1
  for name, caption in h.odd_captions().items():
    recs.append(dict(id=f"caption_{name}", image=h.encoded(h.rgb(8, 8), "PNG"),
                     captions=[caption]))
  recs += [dict(id="no_image", captions=["x"]), dict(id="no_captions", image=recs[0]["image"])]
  want_skipped[REASONS.index("missing_image")] += 1
  want_skipped[REASONS.index("missing_caption")] += 1
  path = tmp_path / "bad"
  path.mkdir()
  # One shard: the records, then one that is not msgpack at all.
  from array_record.python import array_record_module
  w = array_record_module.ArrayRecordWriter(str(path / records.shard_name("test", 0, 1)),
                                            records.WRITER_OPTIONS)
  for r in recs:
    w.write(records.pack(r))
  w.write(b"\xc1\xc1 not msgpack")
  w.close()
  records.write_metadata(path, name="test", kind="images", shard_counts=[len(recs) + 1],
                         fields=["id", "image", "captions"], made_by={})
  want_skipped[REASONS.index("undecodable_record")] += 1
  return str(path), [r["id"] for r in recs] + ["not_msgpack"], want_skipped


def test_bad_records_are_skipped_and_counted_by_reason(data, tmp_path):
  path, ids, want = bad_set(tmp_path)
  n, good = len(ids), len(ids) - want.sum()
  c = config_for(data, "images", train=path, eval=path, max_bad_fraction=0.9)
  # Eval: one pass, bad records kept as masked rows, so the counts are exact.
  rows = [r for batch in pipeline.dataset(c, train=False, global_batch=4) for r in
          zip(batch["index"], batch["mask"], batch["skipped"], batch["images"],
              batch["text_tokens"])]
  rows = [r for r in rows if r[0] < n]
  np.testing.assert_array_equal(sum(r[2] for r in rows), want)
  assert sum(r[1] for r in rows) == good
  by_id = {ids[r[0]]: r for r in rows}
  upright = by_id["exif_rotated_jpeg"][3]  # 20 x 40 upright, blue on top after rotation
  assert upright[2, 16, 2] > 0.5 and upright[2, 16, 0] < -0.5
  np.testing.assert_allclose(by_id["png_16bit"][3], 128 / 127.5 - 1, atol=0.02)
  np.testing.assert_allclose(by_id["rgba_png"][3], 1.0, atol=0.01)  # transparent -> white
  unconditional = text_lib.pad([], 16)
  for name in ("caption_empty", "caption_whitespace"):
    np.testing.assert_array_equal(by_id[name][4], unconditional)
  assert (by_id["caption_not_utf8"][4] != unconditional).any()
  assert by_id["caption_huge"][4].min() > 0  # cut to 16 ids, no padding


def test_training_skips_stay_counted_in_the_batches(data, tmp_path):
  path, ids, want = bad_set(tmp_path)
  c = config_for(data, "images", train=path, max_bad_fraction=0.9)
  it = iter(pipeline.dataset(c, train=True, global_batch=2))
  total = sum(b["skipped"].sum(0) for b in take(it, (len(ids) - want.sum()) // 2 * 3))
  assert (total >= 2 * want).all() and total.sum() > 0  # 3 epochs read, at least 2 complete


def test_too_many_bad_records_stop_the_run_naming_the_shard(data, tmp_path):
  recs = h.image_records(10)
  for r in recs[:4]:
    r["image"] = b"broken"
  path = h.write_set(tmp_path / "mostly_bad", recs, num_shards=1)
  c = config_for(data, "images", train=path, max_bad_fraction=0.2)
  with pytest.raises(records.DataError, match=r"mostly_bad/test-00000-of-00001.*max_bad_fraction"):
    take(iter(pipeline.dataset(c, train=True, global_batch=2)), 10)


def test_bad_data_configs_are_refused_naming_the_field(data):
  with pytest.raises(common.ConfigError, match="data.kind='pixels'"):
    c = config_for(data)
    c.data.kind = "pixels"
    pipeline.dataset(c, True, 2)
  with pytest.raises(common.ConfigError, match="data.caption_dropout=1.5"):
    pipeline.dataset(config_for(data, caption_dropout=1.5), True, 2)
  with pytest.raises(common.ConfigError, match="data.train is empty"):
    pipeline.dataset(config_for(data, train=""), True, 2)
  with pytest.raises(records.DataError, match="metadata.json not found"):
    pipeline.dataset(config_for(data, train=str(data["root"])), True, 2)


def test_two_processes_encode_like_one(data, tmp_path):
  """2 processes x 2 devices (gloo): each reads its part, builds global batches from its
  rows and writes its own shard; together they hold exactly the one-process records."""
  out = tmp_path / "tokens2"
  run = subprocess.run(
      [sys.executable, "launch/local.py", "--num_processes", "2", "--devices_per_process", "2",
       "--", sys.executable, "-m", "parti_jax.data.encode", "--data", data["images"],
       "--out", str(out), "--spm", data["spm"], "--resolution", "32", "--text_len", "16",
       "--batch_size", "8"], cwd=ROOT, capture_output=True, text=True)
  assert run.returncode == 0, run.stdout[-3000:]
  two = records.ShardSet.open(out)
  assert two.meta["num_shards"] == 2 and all(c > 0 for c in two.meta["shard_counts"])
  by_id = lambda s: {r["id"]: r for r in s.read_all()}  # noqa: E731
  assert by_id(two) == by_id(records.ShardSet.open(data["tokens"]))


def test_a_tfds_source_is_read_directly(data, tmp_path):
  h.prepare_tfds(tmp_path)
  c = config_for(data, "images", train="tfds:ingest_tiny_captions/train",
                 eval="tfds:ingest_tiny_captions/train", tfds_data_dir=str(tmp_path))
  batches = list(pipeline.dataset(c, train=False, global_batch=4))
  rows = [(int(i), img, text) for b in batches
          for i, m, img, text in zip(b["index"], b["mask"], b["images"], b["text_tokens"]) if m]
  assert sorted(i for i, _, _ in rows) == list(range(6))
  tok = spm.Tokenizer(data["spm"], 16)
  source = tfds.TfdsRecords("ingest_tiny_captions", str(tmp_path), "train", "image", "caption")
  for i, img, text in rows:
    record = source[i]
    want = images.square(images.open_image(record["image"]), 32)
    np.testing.assert_allclose(img, images.to_model_range(want, -1, 1), atol=1e-6)
    np.testing.assert_array_equal(text, tok.encode(spm.clean_caption(record["captions"][0])[0]))
  c.data.tfds_image_feature = "no_such_feature"
  with pytest.raises(records.DataError, match="no feature 'no_such_feature'"):
    pipeline.dataset(c, train=True, global_batch=4)


@pytest.mark.parametrize("kind", ["tokens", "images"])
def test_random_choices_do_not_depend_on_the_number_of_processes(data, kind):
  """Crops, captions and dropout are drawn per position in the global order."""
  c = config_for(data, kind, caption_dropout=0.5)
  one = next(iter(pipeline.dataset(c, train=True, global_batch=20)))
  two = [next(iter(pipeline.dataset(c, train=True, global_batch=20, rows=range(r, r + 10))))
         for r in (0, 10)]
  for key in one:
    np.testing.assert_array_equal(one[key][:10], two[0][key])
    np.testing.assert_array_equal(one[key][10:], two[1][key])
  dropped = (one["text_tokens"] == text_lib.pad([], 16)).all(axis=1).mean()
  assert 0.15 < dropped < 0.85  # 20 draws at p = 0.5


def test_a_restored_process_iterator_keeps_its_part_and_its_bad_record_tallies(data, tmp_path):
  path, ids, _ = bad_set(tmp_path)
  c = config_for(data, "images", train=path, max_bad_fraction=0.9)
  make = lambda: iter(pipeline.dataset(c, True, 4, rows=[2, 3]))  # noqa: E731
  it = make()
  take(it, 5)
  state = it.get_state()
  assert sum(state["bad"]) > 0 and sum(state["seen"]) >= 10  # tallies travel in the state
  expected = take(it, 12)
  again = make()
  again.set_state(state)
  assert_same_batches(take(again, 12), expected)
  assert again.get_state()["bad"] == it.get_state()["bad"]


def test_damaged_fields_are_bad_records_not_crashes(data, tmp_path):
  good = next(records.ShardSet.open(data["tokens"]).read_all())
  damaged = [dict(good, image_codes=good["image_codes"][:-1]),  # odd number of bytes
             dict(good, text_tokens=[5, 6, 7]),  # a flat list
             dict(good, text_tokens=[[2 ** 40]]),  # beyond int32
             dict(good, text_tokens=[[300]]),  # beyond the text vocabulary (256)
             dict(good, image_codes="not bytes")]
  path = h.write_set(tmp_path / "damaged", [good] + damaged, num_shards=1, kind="tokens")
  c = config_for(data, train=path, eval=path, max_bad_fraction=0.9)
  batch = next(iter(pipeline.dataset(c, train=False, global_batch=6)))
  assert list(batch["mask"]) == [1, 0, 0, 0, 0, 0]
  assert batch["skipped"].sum() == 5
  images = h.image_records(1) + [
            dict(id="a", image="a str", captions=["x"]), dict(id="b", image=b"x", captions=7),
            dict(id="c", image=h.encoded(h.rgb(8, 8), "PNG"), captions={"x": 1})]
  path = h.write_set(tmp_path / "damaged_images", images, num_shards=1)
  c = config_for(data, "images", train=path, eval=path, max_bad_fraction=0.99)
  batch = next(iter(pipeline.dataset(c, train=False, global_batch=4)))
  assert list(batch["mask"]) == [1, 0, 0, 0] and batch["skipped"].sum() == 3


def test_shards_that_disagree_with_their_metadata_are_named(data, tmp_path):
  path = tmp_path / "stale"
  h.write_set(path, h.image_records(6), num_shards=2)
  records.write_shard(path / records.shard_name("test", 1, 2), h.image_records(2))
  c = config_for(data, "images", train=str(path))
  with pytest.raises(records.DataError, match="test-00001-of-00002.array_record: 2 records, "
                     "but .*metadata.json says 3"):
    pipeline.dataset(c, train=True, global_batch=2)


def test_token_shards_made_for_another_model_are_refused(data):
  c = config_for(data)
  c.model.image_grid = 8
  with pytest.raises(common.ConfigError, match="model.image_grid=8 does not fit the token "
                     "shards .*grid 4"):
    pipeline.dataset(c, train=True, global_batch=2)
  c = config_for(data)
  c.model.codebook_size = 32
  with pytest.raises(common.ConfigError, match="model.codebook_size=32"):
    pipeline.dataset(c, train=True, global_batch=2)


def test_draws_are_uniform_and_keyed_on_seed_and_position():
  u = np.array([pipeline.Draws(7, i).random() for i in range(4000)])
  assert 0.0 <= u.min() and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.02
  assert np.histogram(u, bins=10, range=(0, 1))[0].min() > 300  # 400 expected per bin
  assert pipeline.Draws(7, 3).random() == pipeline.Draws(7, 3).random()
  # A record's later draws are not its neighbour's earlier ones.
  first, second = pipeline.Draws(7, 10), pipeline.Draws(7, 11)
  a = [first.random() for _ in range(3)]
  b = [second.random() for _ in range(3)]
  assert not set(a) & set(b)
  assert pipeline.Draws(7, 3).random() != pipeline.Draws(8, 3).random()
  ints = [pipeline.Draws(1, i).integers(3) for i in range(300)]
  assert set(ints) == {0, 1, 2}


class _Huge:
  """A source of 2^33 records that are all bad (no data needed): only the index arithmetic
  runs, as for a Parti-scale set of billions of pairs."""
  num_records = 2 ** 33
  shard_names, shard_counts = ["huge"], [2 ** 33]

  def __len__(self):
    return self.num_records

  def __getitem__(self, index):
    return int(index), b"\xc1"  # not msgpack: a bad record

  def shard_of(self, index):
    return 0

  def pad_to(self, length):
    assert length == self.num_records  # 2^33 is a whole number of batches of 4


def test_positions_and_indices_beyond_two_to_the_31(data):
  c = config_for(data, max_bad_fraction=0.5)
  # Evaluation keeps bad records as masked rows, so every position shows.
  (batch,) = list(pipeline.dataset(c, train=False, global_batch=4, rows=[2, 3],
                                   start=2 ** 33 - 4, source=_Huge()))
  assert list(batch["position"]) == [2 ** 33 - 2, 2 ** 33 - 1] and batch["mask"].sum() == 0
  assert list(batch["index"]) == [2 ** 33 - 2, 2 ** 33 - 1]
  start = 3 * 2 ** 33 - 4  # training: the end of the third epoch
  rows = pipeline.BatchRows(grain.MapDataset.source(_Huge()).shuffle(seed=0).repeat(None), 8,
                            [6, 7], start=start)
  positions, indices = zip(*[(p, i) for p, (i, _) in (rows[k] for k in range(6))])
  assert positions == (start + 6, start + 7, start + 14, start + 15, start + 22, start + 23)
  assert all(0 <= i < 2 ** 33 for i in indices) and max(indices) > 2 ** 32
  assert len(set(indices)) == 6


def test_offloaded_reader_indices_read_the_same_batches(data):
  """data.reader_index="offloaded" (for sets too large for indices in memory) changes
  where readers keep each shard's index, not what they read."""
  batches = [take(iter(pipeline.dataset(config_for(data, reader_index=where), train=True,
                                        global_batch=8)), 6)
             for where in ("in_memory", "offloaded")]
  assert_same_batches(*batches)
  with pytest.raises(common.ConfigError, match="data.reader_index='disk'"):
    pipeline.dataset(config_for(data, reader_index="disk"), True, 8)


OPEN_FILES = """
import resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))
from parti_jax.data import pipeline, records
import ml_collections
try:
  pipeline.Source(sys.argv[1], ml_collections.ConfigDict(dict(reader_index="auto")))
except records.DataError as e:
  print("refused:", e)
print("soft limit", resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


@pytest.mark.parametrize("hard,expected", [(4096, "soft limit 514"), (300, "refused:")])
def test_the_open_file_limit_is_raised_for_one_reader_per_shard_or_refused(
    data, hard, expected, tmp_path):
  path = h.write_set(tmp_path / "two", h.image_records(4), num_shards=2)
  run = subprocess.run([sys.executable, "-c", OPEN_FILES.format(soft=64, hard=hard), path],
                       capture_output=True, text=True, cwd=ROOT)
  assert expected in run.stdout, run.stdout + run.stderr[-2000:]
  if hard == 300:
    assert "needs 514 open files" in run.stdout and "hard limit is 300" in run.stdout
