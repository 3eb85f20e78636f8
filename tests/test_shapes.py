"""The shapes dataset: captions that parse back, held-out splits, geometry, pixels, the CLI."""

import collections
import concurrent.futures
import json

import numpy as np
import pytest

from parti_jax.data import images, records
from parti_jax.data import shapes as shapes_command
from parti_jax.shapes import dataset, grammar, layout, render, scenes, vocabulary

SPEC = scenes.Spec()
LATTICE = scenes.Spec(lattice=4)


def sample_scenes(split: str, num: int, seed: int = 0, spec: scenes.Spec = SPEC):
  rng = np.random.default_rng(seed)
  return [scenes.sample_scene(rng, spec, split) for _ in range(num)]


def nearest_color(pixel) -> str:
  """The palette name (or "background") closest to an RGB pixel."""
  palette = dict(vocabulary.COLORS, background=vocabulary.BACKGROUND)
  dist = {k: np.abs(np.subtract(v, pixel, dtype=np.int64)).sum() for k, v in palette.items()}
  return min(dist, key=dist.get)


def relation_scene(first, relation, second, centers=((8.0, 16.0), (24.0, 16.0))):
  """A hand-built relation scene of small objects named "color shape"."""
  objs = []
  for name, (x, y) in zip((first, second), centers):
    color, shape = name.split()
    half = vocabulary.SIZES["small"] * 32 / 2
    objs.append({"color": color, "shape": shape, "size": "small", "center": [x, y],
                 "bbox": [x - half, y - half, x + half, y + half]})
  fields = {"kind": "relation", "relation": relation,
            "objects": [{"color": o["color"], "shape": o["shape"]} for o in objs]}
  return {"kind": "relation", "resolution": 32, "caption_fields": fields, "objects": objs}


@pytest.mark.parametrize("split", ["train", "heldout"])
@pytest.mark.parametrize("spec", [SPEC, LATTICE], ids=["anywhere", "lattice"])
def test_captions_parse_back_into_their_scenes(split, spec):
  samples = sample_scenes(split, 600, spec=spec)
  kinds = collections.Counter(scene["kind"] for scene, _ in samples)
  assert set(kinds) == set(vocabulary.KINDS), kinds
  if split == "train":
    assert min(kinds.values()) > 100, kinds  # kinds are drawn uniformly
  for scene, caption in samples:
    fields = grammar.parse_caption(caption)
    assert fields == scene["caption_fields"], caption
    assert grammar.format_caption(fields) == caption
    assert scenes.caption_matches_scene(caption, scene), (caption, scene)
    n = len(scene["objects"])
    assert 1 <= n <= 4
    assert n == {"single": 1, "count": fields.get("count"), "binding": 2,
                 "relation": 2}[scene["kind"]]
    for desc, obj in zip(fields["objects"], scene["objects"]):
      assert desc["color"] == obj["color"] and desc["shape"] == obj["shape"]
  sized = [c for _, c in samples if any(w in c.split() for w in vocabulary.SIZES)]
  assert 0 < len(sized) < len(samples)  # size words come and go


def test_captions_of_other_scenes_do_not_match():
  samples = sample_scenes("train", 300, seed=1)
  for (scene, caption), (other, _) in zip(samples, samples[1:] + samples[:1]):
    words = caption.split()
    # Recolor the first object: no object in the scene has the new color and shape.
    i = next(i for i, w in enumerate(words) if w in vocabulary.COLORS)
    recolored = " ".join(words[:i] + [next(c for c in vocabulary.COLORS if c != words[i])]
                          + words[i + 1:])
    assert not scenes.caption_matches_scene(recolored, scene), (recolored, scene)
    if scene["kind"] == "relation":
      rel = scene["caption_fields"]["relation"]
      flipped = caption.replace(f" {vocabulary.RELATIONS[rel]} ",
                                f" {vocabulary.RELATIONS[vocabulary.CONVERSE[rel]]} ")
      assert not scenes.caption_matches_scene(flipped, scene), flipped
    if scene["kind"] == "count":
      n = scene["caption_fields"]["count"]
      other_n = vocabulary.NUMBERS[2 if n != 2 else 3]
      recounted = caption.replace(vocabulary.NUMBERS[n], other_n)
      assert not scenes.caption_matches_scene(recounted, scene)
    # Another scene with a different number of objects never matches.
    if len(other["objects"]) != len(scene["objects"]):
      assert not scenes.caption_matches_scene(caption, other), (caption, other)
  assert not scenes.caption_matches_scene("a red circle", samples[0][0] | {"objects": []})
  assert not scenes.caption_matches_scene("not a caption at all", samples[0][0])


def test_parse_caption_examples_and_errors():
  assert grammar.parse_caption("a large blue square") == {
      "kind": "single", "objects": [{"size": "large", "color": "blue", "shape": "square"}]}
  assert grammar.parse_caption("three yellow stars") == {
      "kind": "count", "count": 3, "objects": [{"color": "yellow", "shape": "star"}]}
  assert grammar.parse_caption("a red circle and an orange heart")["kind"] == "binding"
  fields = grammar.parse_caption("a red circle to the left of a small blue square")
  assert fields == {"kind": "relation", "relation": "left", "objects": [
      {"color": "red", "shape": "circle"},
      {"size": "small", "color": "blue", "shape": "square"}]}
  for bad in ("", "a red", "a red circle and", "two red circle", "a red circles",
              "a red circle near a blue square", "a pink circle", "a red circle extra"):
    with pytest.raises(ValueError):
      grammar.parse_caption(bad)


def test_same_seed_same_bytes():
  spec = scenes.Spec(resolution=32)
  a = dataset.make_split(spec, "train", 24, seed=5)
  b = dataset.make_split(spec, "train", 24, seed=5)
  assert [r["image"] for r in a] == [r["image"] for r in b]
  assert [records.pack(r) for r in a] == [records.pack(r) for r in b]
  c = dataset.make_split(spec, "train", 24, seed=6)
  assert [r["image"] for r in a] != [r["image"] for r in c]
  # Records have their own random streams: a shorter split is a prefix of a longer one.
  assert [records.pack(r) for r in dataset.make_split(spec, "train", 10, seed=5)] == [
      records.pack(r) for r in a[:10]]
  validation = dataset.make_split(spec, "validation", 24, seed=5)
  assert [r["captions"] for r in validation] != [r["captions"] for r in a]


def test_worker_processes_render_the_same_bytes(monkeypatch):
  pools = []

  class CountedPool(concurrent.futures.ProcessPoolExecutor):
    def __init__(self, *args, **kwargs):
      pools.append(args[0] if args else kwargs.get("max_workers"))
      super().__init__(*args, **kwargs)

  monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", CountedPool)
  spec = scenes.Spec(resolution=32, lattice=8)
  num = 2 * dataset.RENDER_CHUNK + 3  # enough for the worker pool, with a short last chunk
  parallel = dataset.make_split(spec, "train", num, seed=3, workers=2)
  assert pools == [2]  # rendered by two real worker processes
  assert [records.pack(r) for r in parallel] == [
      records.pack(r) for r in dataset.make_split(spec, "train", num, seed=3)]
  assert pools == [2]  # one worker, the default: in this process


def test_train_kinds_weigh_train_only():
  spec = scenes.Spec(train_kinds=[("relation", "3"), ("binding", 1)])
  assert spec.train_kinds == (("single", 0.0), ("count", 0.0), ("binding", 1.0),
                              ("relation", 3.0))
  train = collections.Counter(scene["kind"] for scene, _ in sample_scenes("train", 400, spec=spec))
  assert set(train) == {"binding", "relation"}
  assert 2.4 < train["relation"] / train["binding"] < 3.8  # 3 up to sampling noise
  # Validation keeps every kind at a quarter, whatever train draws.
  validation = collections.Counter(
      s["kind"] for s, _ in sample_scenes("validation", 400, spec=spec))
  assert set(validation) == set(vocabulary.KINDS)
  assert all(70 < n < 130 for n in validation.values()), validation
  assert np.allclose(scenes.Spec().kind_probabilities("train"), 0.25)
  for bad in ([("single", -1)], [("single", "many")], [("pairs", 1)],
              [("single", 1), ("single", 2)], [("single", 0), ("count", 0)],
              [("single", float("inf"))]):
    with pytest.raises(ValueError, match="train kind"):
      scenes.Spec(train_kinds=bad)


def _shows_pair(scene, pairs):
  return any((o["color"], o["shape"]) in pairs for o in scene["objects"])


def test_train_and_validation_never_show_heldout_compositions():
  pairs = set(SPEC.heldout_pairs)
  for split in ("train", "validation"):
    for scene, _ in sample_scenes(split, 1500, seed=2):
      assert not scenes.is_heldout(scene, SPEC)
      assert not _shows_pair(scene, pairs), scene
      if scene["kind"] == "relation":
        a, b = (o["shape"] for o in scene["objects"])
        rel = scene["caption_fields"]["relation"]
        # Neither "a circle above a triangle" nor "a triangle below a circle".
        assert (a, rel, b) != ("circle", "above", "triangle"), scene
        assert (a, rel, b) != ("triangle", "below", "circle"), scene


def test_heldout_split_shows_only_heldout_compositions():
  seen = collections.Counter()
  for scene, caption in sample_scenes("heldout", 400, seed=3):
    assert scenes.is_heldout(scene, SPEC), caption
    for pair in SPEC.heldout_pairs:
      seen[pair] += any((o["color"], o["shape"]) == pair for o in scene["objects"])
    if scene["kind"] == "relation":
      shapes = tuple(o["shape"] for o in scene["objects"])
      seen["triple"] += (shapes == ("circle", "triangle")
                         and scene["caption_fields"]["relation"] == "above")
  assert all(seen[k] > 30 for k in [*SPEC.heldout_pairs, "triple"]), seen


def test_is_heldout_rules():
  assert scenes.is_heldout(relation_scene("red star", "left", "blue square"), SPEC)
  assert scenes.is_heldout(relation_scene("green circle", "above", "blue triangle",
                                     ((16, 8), (16, 24))), SPEC)
  # The converse wording shows the same picture, so it is held out too.
  assert scenes.is_heldout(relation_scene("blue triangle", "below", "green circle",
                                     ((16, 24), (16, 8))), SPEC)
  assert not scenes.is_heldout(relation_scene("green circle", "left", "blue triangle"), SPEC)
  assert not scenes.is_heldout(relation_scene("green triangle", "above", "blue circle",
                                         ((16, 8), (16, 24))), SPEC)
  specific = scenes.Spec(heldout_pairs=[], heldout_triples=[("red circle", "left", "square")])
  assert scenes.is_heldout(relation_scene("red circle", "left", "blue square"), specific)
  assert not scenes.is_heldout(relation_scene("blue circle", "left", "red square"), specific)
  assert not scenes.is_heldout(relation_scene("red star", "left", "blue square"), specific)
  for scene, _ in sample_scenes("heldout", 50, spec=specific):
    assert scene["kind"] == "relation" and scene["objects"][0]["color"] == "red"
  with pytest.raises(ValueError):
    scenes.Spec(heldout_pairs=[("pink", "star")])
  with pytest.raises(ValueError):
    scenes.Spec(heldout_triples=[("circle", "near", "square")])
  with pytest.raises(ValueError):
    scenes.sample_scene(np.random.default_rng(0),
                        scenes.Spec(heldout_pairs=(), heldout_triples=()), "heldout")


@pytest.mark.parametrize("spec", [SPEC, LATTICE], ids=["anywhere", "lattice"])
def test_relation_geometry_holds(spec):
  samples = [s for s, _ in sample_scenes("train", 800, seed=4, spec=spec)
             if s["kind"] == "relation"]
  assert len(samples) > 120
  for scene in samples:
    a, b = scene["objects"]
    rel = scene["caption_fields"]["relation"]
    (ax, ay), (bx, by) = a["center"], b["center"]
    dx, dy = {"left": (bx - ax, by - ay), "right": (ax - bx, ay - by),
              "above": (by - ay, bx - ax), "below": (ay - by, ax - bx)}[rel]
    assert dx >= 0.2 * scene["resolution"], scene  # a clear margin along the axis
    assert dx >= 2 * abs(dy), scene  # and the axis dominates
    assert layout.relation_holds(a, b, rel, scene["resolution"])
    assert not layout.relation_holds(a, b, vocabulary.CONVERSE[rel], scene["resolution"])


@pytest.mark.parametrize("spec", [SPEC, scenes.Spec(lattice=8)], ids=["anywhere", "lattice"])
def test_binding_captions_name_objects_in_reading_order(spec):
  """Top to bottom; left to right when the tops are within READING_ROW of each other."""
  row = layout.READING_ROW * spec.resolution
  seen = collections.Counter()
  for split in ("train", "heldout"):
    for scene, caption in sample_scenes(split, 500, seed=12, spec=spec):
      if scene["kind"] != "binding":
        continue
      a, b = scene["objects"]
      named = [(o["color"], o["shape"]) for o in grammar.parse_caption(caption)["objects"]]
      assert named == [(a["color"], a["shape"]), (b["color"], b["shape"])], caption
      (ax0, ay0, *_), (bx0, by0, *_) = a["bbox"], b["bbox"]
      if abs(ay0 - by0) <= row:
        assert ax0 < bx0, (caption, scene)
        seen["same row"] += 1
      else:
        assert ay0 < by0, (caption, scene)
        seen["rows"] += 1
  assert min(seen.values()) > 20, seen  # both cases occur
  # The helper itself: a row groups objects by their tops, then reads left to right.
  boxes = {"p": [20, 0.5], "q": [2, 2], "r": [10, 0]}  # x0, y0 at 32 px: q is 2 px low
  objs = [{"name": k, "bbox": [x, y, x + 5, y + 5]} for k, (x, y) in boxes.items()]
  assert [o["name"] for o in layout.reading_order(objs, 32)] == ["q", "r", "p"]
  objs[1]["bbox"] = [2, 8, 7, 13]  # q a row lower
  assert [o["name"] for o in layout.reading_order(objs, 32)] == ["r", "p", "q"]


def test_objects_inside_apart_and_drawn_where_stored():
  """Each object's pixels sit in its stored box, centred on its stored centre."""
  r = 64
  spec = scenes.Spec(resolution=r)
  for scene, _ in sample_scenes("train", 150, seed=5, spec=spec):
    objs = scene["objects"]
    for i, o in enumerate(objs):
      x0, y0, x1, y1 = o["bbox"]
      assert 0 <= x0 < x1 <= r and 0 <= y0 < y1 <= r
      for p in objs[i + 1:]:
        px0, py0, px1, py1 = p["bbox"]
        assert x1 <= px0 or px1 <= x0 or y1 <= py0 or py1 <= y0, (o, p)
      alone = render.render_scene(dict(scene, objects=[o]))
      ys, xs = np.nonzero(np.any(alone != vocabulary.BACKGROUND, axis=-1))
      assert xs.min() >= x0 - 1 and xs.max() <= x1 and ys.min() >= y0 - 1 and ys.max() <= y1
      # The box is tight: the drawn shape reaches (nearly) every side of it.
      assert xs.min() <= x0 + 1 and xs.max() >= x1 - 2 and ys.min() <= y0 + 1
      assert ys.max() >= y1 - 2, o
      if o["shape"] in ("circle", "square", "diamond"):  # symmetric: centroid is centre
        channel = np.argmax(np.abs(np.subtract(vocabulary.COLORS[o["color"]],
                                               vocabulary.BACKGROUND)))
        cover = np.abs(alone[..., channel].astype(float) - vocabulary.BACKGROUND[channel])
        yy, xx = np.mgrid[:r, :r] + 0.5
        centroid = (cover * xx).sum() / cover.sum(), (cover * yy).sum() / cover.sum()
        assert np.allclose(centroid, o["center"], atol=0.3), (centroid, o)


def test_lattice_objects_show_the_same_patches_everywhere():
  """On a 4 px lattice each object's square starts on a multiple of 4, inside the image, and
  an object's 4x4 patches are the same pixels wherever it stands."""
  looks = {}  # (color, shape, size) -> the patches of its square
  places = collections.defaultdict(set)
  for scene, _ in sample_scenes("train", 400, seed=11, spec=LATTICE):
    for o in scene["objects"]:
      side = vocabulary.SIZES[o["size"]] * 32
      corner = np.subtract(o["center"], side / 2)
      assert np.allclose(corner, np.round(corner / 4) * 4, atol=1e-3), o
      assert (corner >= -1e-3).all() and (corner + side <= 32 + 1e-3).all(), o
      x, y = (int(round(v)) for v in corner)
      reach = -(-int(np.ceil(side)) // 4) * 4  # whole patches covering the square
      alone = render.render_scene(dict(scene, objects=[o]))
      padded = np.pad(alone, ((0, reach), (0, reach), (0, 0)), constant_values=128)
      key = (o["color"], o["shape"], o["size"])
      crop = padded[y:y + reach, x:x + reach]
      assert (looks.setdefault(key, crop) == crop).all(), o
      places[key].add((x, y))
  assert max(len(v) for v in places.values()) > 5  # the same object seen in many places
  anywhere = [o["center"] for scene, _ in sample_scenes("train", 50, seed=11)
              for o in scene["objects"]]
  assert len({tuple(c) for c in anywhere}) > 0.9 * len(anywhere)  # lattice 0: anywhere
  with pytest.raises(ValueError, match="lattice 12"):
    scenes.Spec(lattice=12)


def test_sizes_are_distinguishable():
  small, large = [], []
  for scene, _ in sample_scenes("train", 300, seed=6):
    for o in scene["objects"]:
      side = max(o["bbox"][2] - o["bbox"][0], o["bbox"][3] - o["bbox"][1])
      (small if o["size"] == "small" else large).append(side / scene["resolution"])
  # The evaluator splits sizes at the midpoint: at 32 px that leaves over 1.5 px either side.
  assert max(small) * 1.25 < min(large)
  assert (min(large) - max(small)) / 2 * 32 > 1.5
  assert 0.3 < min(small) and max(large) < 0.5


@pytest.mark.parametrize("resolution", [32, 64])
def test_pixel_colors_match_names_on_grey(resolution):
  spec = scenes.Spec(resolution=resolution)
  for scene, caption in sample_scenes("train", 200, seed=7, spec=spec) + sample_scenes(
      "heldout", 40, seed=7, spec=spec):
    pixels = render.render_scene(scene, resolution)
    assert pixels.shape == (resolution, resolution, 3) and pixels.dtype == np.uint8
    covered = np.zeros((resolution, resolution), bool)
    for o in scene["objects"]:
      x, y = (int(v) for v in o["center"])
      assert nearest_color(pixels[y, x]) == o["color"], (caption, o, pixels[y, x])
      x0, y0, x1, y1 = o["bbox"]
      covered[max(int(y0) - 1, 0):int(y1) + 2, max(int(x0) - 1, 0):int(x1) + 2] = True
    assert (pixels[~covered] == vocabulary.BACKGROUND).all(), caption


@pytest.mark.parametrize("resolution", [16, 32, 64, 100])
def test_every_resolution(resolution):
  spec = scenes.Spec(resolution=resolution)
  for split in scenes.SPLITS:
    for rec in dataset.make_split(spec, split, 12, seed=8):
      img = images.open_image(rec["image"])
      assert img.size == (resolution, resolution)
      scene = rec["extra"]["scene"]
      assert scene["resolution"] == resolution
      assert scenes.caption_matches_scene(rec["captions"][0], scene)
      assert all(0 <= v <= resolution for o in scene["objects"] for v in o["bbox"])
  with pytest.raises(ValueError):
    scenes.Spec(resolution=8)


def test_render_at_another_resolution_scales_the_scene():
  scene, _ = sample_scenes("train", 1, seed=9)[0]
  big = render.render_scene(scene, 128)
  assert big.shape == (128, 128, 3)
  for o in scene["objects"]:
    x, y = (int(v * 4) for v in o["center"])
    assert nearest_color(big[y, x]) == o["color"]


def test_scenes_are_msgpack_friendly():
  for rec in dataset.make_split(SPEC, "train", 20, seed=10):
    assert records.unpack(records.pack(rec)) == rec

    def plain(v):
      if isinstance(v, dict):
        return all(isinstance(k, str) and plain(x) for k, x in v.items())
      if isinstance(v, list):
        return all(plain(x) for x in v)
      return type(v) in (str, int, float)

    assert plain(rec["extra"]["scene"])


def test_cli_writes_three_readable_shard_sets(tmp_path, capsys):
  out = tmp_path / "shapes"
  shapes_command.main([
      "--out", str(out), "--num", "40", "--resolution", "24", "--seed", "3",
      "--num_shards", "2", "--num_heldout", "7", "--heldout_pairs", "green:square",
      "--heldout_triples", "red_circle:left:star,heart:below:diamond", "--lattice", "2"])
  spec = scenes.Spec(24, (("green", "square"),),
                     (("red circle", "left", "star"), ("heart", "below", "diamond")))
  expected = {"train": 40, "validation": 4, "heldout": 7}
  for split, count in expected.items():
    shard_set = records.ShardSet.open(out / split)
    recs = list(shard_set.read_all())
    assert len(recs) == len(shard_set) == count
    assert shard_set.kind == "images" and shard_set.meta["num_shards"] == 2
    meta = json.loads((out / split / records.METADATA).read_text())
    assert meta["split"] == split and meta["resolution"] == 24 and meta["seed"] == 3
    assert meta["lattice"] == 2
    assert meta["heldout_pairs"] == [["green", "square"]]
    assert meta["heldout_triples"][0] == ["red circle", "left", "star"]
    assert set(meta["colors"]) == set(vocabulary.COLORS)
    assert meta["shapes"] == list(vocabulary.SHAPES)
    assert meta["fields"] == ["id", "image", "captions", "extra"]
    assert len({r["id"] for r in recs}) == count
    for rec in recs:
      assert images.open_image(rec["image"]).size == (24, 24)
      scene = rec["extra"]["scene"]
      assert scenes.caption_matches_scene(rec["captions"][0], scene)
      assert scenes.is_heldout(scene, spec) == (split == "heldout")
      for o in scene["objects"]:  # square corners on the 2 px lattice
        corner = np.subtract(o["center"], vocabulary.SIZES[o["size"]] * 24 / 2)
        assert np.allclose(corner, np.round(corner / 2) * 2, atol=1e-3)
  printed = capsys.readouterr().out
  assert "images/s" in printed and "40 records" in printed


def test_cli_train_kinds(tmp_path, capsys):
  shapes_command.main(["--out", str(tmp_path), "--num", "30", "--num_validation", "40",
                       "--train_kinds", "relation:1"])
  train = records.ShardSet.open(tmp_path / "train")
  assert {r["extra"]["scene"]["kind"] for r in train.read_all()} == {"relation"}
  assert train.meta["train_kinds"] == {"single": 0, "count": 0, "binding": 0, "relation": 1}
  validation = records.ShardSet.open(tmp_path / "validation").read_all()
  assert {r["extra"]["scene"]["kind"] for r in validation} == set(vocabulary.KINDS)
  with pytest.raises(SystemExit):
    shapes_command.main(["--out", str(tmp_path), "--num", "5", "--train_kinds", "relation:-1"])
  with pytest.raises(SystemExit):
    shapes_command.main(["--out", str(tmp_path), "--num", "5", "--train_kinds", "relation"])
  capsys.readouterr()


def test_cli_defaults(tmp_path, capsys):
  shapes_command.main(["--out", str(tmp_path), "--num", "25"])
  counts = {s: len(records.ShardSet.open(tmp_path / s)) for s in scenes.SPLITS}
  assert counts == {"train": 25, "validation": 2, "heldout": 2}
  rec = next(records.ShardSet.open(tmp_path / "train").read_all())
  assert images.open_image(rec["image"]).size == (32, 32)
  with pytest.raises(SystemExit):
    shapes_command.main(["--out", str(tmp_path), "--num", "5", "--heldout_pairs", "pink:star"])
  with pytest.raises(SystemExit):
    shapes_command.main(["--out", str(tmp_path), "--num", "5", "--heldout_triples", "circle:above"])
  capsys.readouterr()
