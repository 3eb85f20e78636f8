"""The input pipeline: grain over shard sets (or a TFDS source) to global batches on the mesh.

One record flows through:
  source (index, raw) -> global seeded shuffle -> repeat (training) -> the rows of each
  global batch that this process's devices hold -> preprocess (decode, crop, tokenize,
  caption dropout; a bad record becomes a marker) -> count and drop bad records -> batch
  -> prefetch (threads or worker processes) -> jax Arrays sharded over the mesh's batch axes.

Global batch b holds the positions [b * B, (b + 1) * B) of one global order. A process
reads the rows its devices hold (`sharding.rows_by_process`): disjoint rows where the
batch axes span the processes, the same rows on every process that shares a batch shard
(a `tensor` axis across hosts), so replica hosts read and feed identical data.

Two kinds of data (`config.data.kind`):
  "images": image shards; a batch has `images` float32 [B, R, R, 3] in
            `config.data.value_range`, and `text_tokens` int32 [B, text_len] when a
            SentencePiece model is configured.
  "tokens": token shards (`python -m parti_jax.data.encode`); a batch has `text_tokens`
            and `image_tokens` int32 [B, image_grid**2], what the Parti task takes.
Every batch also has `mask` int32 [B] (0 for eval padding and, in eval, for bad records)
and `skipped` int32 [B, len(SKIP_REASONS)]: the bad records dropped just before each row,
so `batch["skipped"].sum(0)` counts them per reason across all processes.

The iterator state (grain's, plus our per-shard counts) is a small JSON-able dict:
restoring it, on a loader started at the same `Loader.start`, continues with exactly the
batches that would have come next. It belongs to one layout of processes;
`Loader.position` is the global one (the first position no process has read), from which
a run on another number of processes or global batch size starts (`Loader.start_at`).
"""

import dataclasses
import hashlib
import json
import time

import grain
import jax
import numpy as np
from absl import flags

from parti_jax import sharding
from parti_jax import text as text_lib
from parti_jax.data import images as image_lib
from parti_jax.data import records, spm
from parti_jax.data.sources import tfds

REASON_INDEX = {r: i for i, r in enumerate(records.SKIP_REASONS)}
TFDS_PREFIX = "tfds:"
# A shard's bad fraction is judged once this many of its records (or all of them) were read.
MIN_RECORDS_TO_JUDGE = 100
# data.reader_index="auto": from this many records on, readers keep their index on disk
# (in memory it would take ~2.6 GB per reader at the 19.6 bytes per record measured by
# benchmarks/reader_index_memory.py, and every worker process has its own).
OFFLOAD_INDEX_RECORDS = 2 ** 27
# File descriptors a process keeps free beside one per shard (sockets, logs, checkpoints).
SPARE_FILES = 512


def _reader_options(setting: str, num_records: int) -> dict | None:
  if setting == "offloaded" or (setting == "auto" and num_records >= OFFLOAD_INDEX_RECORDS):
    # ArrayRecord only prefetches the footer for an index it keeps in memory.
    return {"index_storage_option": "offloaded", "footer_prefetch_bytes": "0"}
  return None


class Source:
  """Random access to (index, raw record) pairs, optionally padded with (index, None).

  The index travels with the record so that, after shuffling, a bad record can still be
  traced to its shard; padding lets every process read the same number of eval batches.
  """

  def __init__(self, spec: str, data_config):
    if spec.startswith(TFDS_PREFIX):
      name, _, split = spec[len(TFDS_PREFIX):].partition("/")
      self._records = tfds.TfdsRecords(
          name, data_config.tfds_data_dir or None, split or "train",
          data_config.tfds_image_feature, data_config.tfds_caption_feature)
      self.shard_names = [spec]
      self.shard_counts = [len(self._records)]
      self.shard_set = None
    else:
      shard_set = records.ShardSet.open(spec)
      shard_set.verify_counts()  # a wrong count would surface as an unexplained read error
      counts = shard_set.meta["shard_counts"]
      # Readers stay open, one per shard (and per worker process).
      records.allow_open_files(len(counts) + SPARE_FILES, "data.train/data.eval " + spec)
      # "path[0:count]" hands ArrayRecord the counts just checked, so it does not open
      # every shard again to count it.
      self._records = grain.sources.ArrayRecordDataSource(
          [f"{records.readable_path(p)}[0:{c}]" for p, c in zip(shard_set.paths, counts)],
          reader_options=_reader_options(data_config.get("reader_index", "auto"), sum(counts)))
      self.shard_names = [str(p) for p in shard_set.paths]
      self.shard_counts = shard_set.meta["shard_counts"]
      self.shard_set = shard_set
    self.num_records = int(sum(self.shard_counts))
    self._length = self.num_records

  def pad_to(self, length: int) -> None:
    self._length = max(length, self.num_records)

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int):
    index = int(index)
    return index, (self._records[index] if index < self.num_records else None)

  def shard_of(self, index: int) -> int:
    return self.shard_set.shard_of(index) if self.shard_set else 0

  def record(self, index: int) -> dict:
    """One decoded record (for tools that need the whole record, e.g. encode)."""
    return records.as_record(self._records[index])


class BatchRows(grain.MapDataset):
  """The elements of `rows` in every global batch: (global position, element) pairs.

  Element i is row rows[i % k] of global batch i // k (k = len(rows)), counted from
  the global position `start`. grain's slicing deals disjoint strides to processes;
  a process here needs given rows of each batch, which replica processes share, so the
  mapping is ours. Positions are Python ints: data sets beyond 2^31 records are indexed
  exactly.
  """

  def __init__(self, parent: grain.MapDataset, global_batch: int, rows, start: int = 0):
    super().__init__(parent)
    self._batch, self._rows, self._start = global_batch, tuple(rows), start

  def __len__(self) -> int:
    return max(len(self._parent) - self._start, 0) // self._batch * len(self._rows)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    batch, row = divmod(index, len(self._rows))
    position = self._start + batch * self._batch + self._rows[row]
    return position, self._parent[position]

  def __str__(self) -> str:
    return f"BatchRows(global_batch={self._batch}, rows={len(self._rows)}, start={self._start})"


MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15


class Draws:
  """Uniform draws for one record, from a hash of (seed, position in the global stream).

  grain's `random_map` seeds a numpy Generator for every record, which costs as much as
  reading a token record; a record needs at most three draws, so they come from a
  SplitMix64 counter instead. Keyed on the position in the one global order (epoch
  included), a record's draws do not depend on how many processes read the data.
  """

  def __init__(self, seed: int, position: int):
    # The start is hashed, not just offset by the position: offsets of one step would
    # make a record's second draw its neighbour's first.
    self._state = _splitmix((_splitmix(seed & MASK64) + position * GOLDEN64) & MASK64)

  def random(self) -> float:
    self._state = (self._state + GOLDEN64) & MASK64
    return (_splitmix(self._state) >> 11) * 2.0 ** -53

  def integers(self, n: int) -> int:
    return min(int(self.random() * n), n - 1)


def _splitmix(z: int) -> int:
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
  return z ^ (z >> 31)


@dataclasses.dataclass
class Preprocess:
  """Raw record -> one example dict of fixed shapes; a bad record -> a masked marker."""
  kind: str
  train: bool
  resolution: int
  value_range: tuple[float, float]
  caption_dropout: float
  max_pixels: int
  tokenizer: spm.Tokenizer | None
  text_len: int
  text_vocab_size: int
  image_grid: int
  codebook_size: int
  shard_of: object  # index -> shard number
  seed: int

  def __call__(self, item) -> dict:
    position, (index, raw) = item  # position in the global order, record index
    rng = Draws(self.seed, position)
    example = dict(index=np.int64(index), position=np.int64(position),
                   shard=np.int32(self.shard_of(index)),
                   skipped=np.zeros(len(records.SKIP_REASONS), np.int32), mask=np.int32(0))
    if raw is None:  # eval padding: masked, not a bad record
      return self._blank(example)
    try:
      record = records.as_record(raw)
      try:
        example.update(self._tokens(record, rng) if self.kind == "tokens" else
                       self._images(record, rng))
      except (TypeError, ValueError, KeyError, IndexError, OverflowError, AttributeError) as e:
        # Fields of the wrong type or size (a foreign or damaged record) are bad records
        # too; what the code above checks by name gets a more specific reason.
        raise records.BadRecord("undecodable_record", f"{type(e).__name__}: {e}") from None
      example["mask"] = np.int32(1)
      return example
    except records.BadRecord as e:
      example["skipped"][REASON_INDEX[e.reason]] = 1
      return self._blank(example)

  def _blank(self, example: dict) -> dict:
    """Zeros of the right shapes for a masked row."""
    if self.kind == "tokens":
      example["image_tokens"] = np.zeros(self.image_grid ** 2, np.int32)
    else:
      example["images"] = np.zeros((self.resolution,) * 2 + (3,), np.float32)
    if self.kind == "tokens" or self.tokenizer is not None:
      example["text_tokens"] = text_lib.unconditional(self.text_len)
    return example

  def _caption_index(self, n: int, rng) -> int:
    return int(rng.integers(n)) if self.train else 0

  def _dropped(self, rng) -> bool:
    # Drawn for every record, whether or not it is used, so the random stream of a record
    # does not depend on its content.
    return self.train and rng.random() < self.caption_dropout

  def _images(self, record: dict, rng) -> dict:
    img = image_lib.open_image(record.get("image"), self.resolution, self.max_pixels)
    offset = rng.random() if self.train else None
    pixels = image_lib.square(img, self.resolution, offset)
    out = dict(images=image_lib.to_model_range(pixels, *self.value_range))
    if self.tokenizer is not None:
      captions = record.get("captions")
      captions = [captions] if isinstance(captions, (str, bytes)) else captions
      if not captions:
        raise records.BadRecord("missing_caption", "no captions field")
      caption, _ = spm.clean_caption(captions[self._caption_index(len(captions), rng)])
      dropped = self._dropped(rng)
      out["text_tokens"] = (self.tokenizer.unconditional if dropped
                            else self.tokenizer.encode(caption))
    return out

  def _tokens(self, record: dict, rng) -> dict:
    text, codes = record.get("text_tokens"), record.get("image_codes")
    if not text or codes is None:
      raise records.BadRecord("missing_tokens", "no text_tokens or image_codes")
    codes = np.frombuffer(bytes(codes), np.uint16).astype(np.int32)
    if codes.size != self.image_grid ** 2 or codes.max(initial=0) >= self.codebook_size:
      raise records.BadRecord(
          "missing_tokens", f"{codes.size} codes (max {codes.max(initial=0)}), expected "
          f"{self.image_grid ** 2} below {self.codebook_size}")
    ids = np.asarray(text[self._caption_index(len(text), rng)], np.int64)
    if ids.ndim != 1 or ids.size and (ids.min() < 0 or ids.max() >= self.text_vocab_size):
      raise records.BadRecord("missing_tokens", f"text ids outside [0, {self.text_vocab_size})")
    dropped = self._dropped(rng)
    text = text_lib.unconditional(self.text_len) if dropped else text_lib.pad(ids, self.text_len)
    return dict(text_tokens=text, image_tokens=codes)


class _CountBadIterator(grain.DatasetIterator):
  """Drops (training) or keeps masked (eval) bad records, counting them per shard.

  grain's own filter can stop on a global bad ratio, but cannot say which shard or why;
  this keeps per-shard tallies in the iterator state and names the shard when one goes
  over `max_bad_fraction`. A dropped record's reason is added to the next kept example's
  `skipped` row, so the counts reach the batch without extra state.
  """

  def __init__(self, parent, drop: bool, shard_names, shard_counts, max_bad_fraction: float):
    super().__init__(parent)
    self._drop = drop
    self._names, self._counts = shard_names, shard_counts
    self._max = max_bad_fraction
    self._seen = [0] * len(shard_names)
    self._bad = [0] * len(shard_names)

  def __next__(self):
    skipped = None
    while True:
      example = next(self._parent)
      shard = int(example.pop("shard"))
      if example["mask"] or not example["skipped"].any():  # good record or eval padding
        if example["mask"]:
          self._seen[shard] += 1
        if skipped is not None:
          example["skipped"] = example["skipped"] + skipped
        return example
      self._seen[shard] += 1
      self._bad[shard] += 1
      self._judge(shard, example["skipped"])
      if not self._drop:
        return example
      skipped = example["skipped"] if skipped is None else skipped + example["skipped"]

  def _judge(self, shard: int, reasons) -> None:
    seen, bad = self._seen[shard], self._bad[shard]
    if seen >= min(MIN_RECORDS_TO_JUDGE, self._counts[shard]) and bad > self._max * seen:
      reason = records.SKIP_REASONS[int(np.argmax(reasons))]
      raise records.DataError(
          f"{self._names[shard]}: {bad} of {seen} records read so far are bad (latest: "
          f"{reason}), over data.max_bad_fraction={self._max}. Check the shard, or raise "
          "the limit to train on what is readable.")

  def get_state(self):
    return dict(parent=self._parent.get_state(), seen=list(self._seen), bad=list(self._bad))

  def set_state(self, state):
    self._parent.set_state(state["parent"])
    self._seen, self._bad = list(state["seen"]), list(state["bad"])


class _CountBad(grain.IterDataset):

  def __init__(self, parent, **kwargs):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self):
    return _CountBadIterator(self._parent.__iter__(), **self._kwargs)


def check(config, train: bool = True) -> None:
  """Refuses a data config that cannot run, naming the field, before anything is read."""
  from parti_jax.config import ConfigError
  d, problems = config.data, []
  spec = d.train if train else d.eval
  if d.kind not in ("tokens", "images"):
    problems.append(f"data.kind={d.kind!r} is not 'tokens' or 'images'")
  if not spec:
    problems.append(f"data.{'train' if train else 'eval'} is empty: name a shard set directory "
                    "or tfds:NAME/SPLIT")
  if d.kind == "tokens" and spec.startswith(TFDS_PREFIX):
    problems.append("data.kind='tokens' reads token shards; a TFDS source holds images")
  if not 0.0 <= d.caption_dropout <= 1.0:
    problems.append(f"data.caption_dropout={d.caption_dropout} is not in [0, 1]")
  if not 0.0 <= d.max_bad_fraction < 1.0:
    # At 1.0 a set of nothing but bad records would be read forever, never a batch.
    problems.append(f"data.max_bad_fraction={d.max_bad_fraction} is not in [0, 1)")
  if d.resolution < 1:
    problems.append(f"data.resolution={d.resolution} must be positive")
  if d.get("reader_index", "auto") not in ("auto", "in_memory", "offloaded"):
    problems.append(f"data.reader_index={d.reader_index!r} is not 'auto', 'in_memory' or "
                    "'offloaded'")
  if d.kind == "tokens" and spec and not spec.startswith(TFDS_PREFIX):
    problems += _token_set_problems(spec, config.model)
  if problems:
    raise ConfigError("invalid data config:\n  " + "\n  ".join(problems))


def _token_set_problems(spec: str, m) -> list[str]:
  """Token shards made for another model shape would turn every record into a skip."""
  made = records.read_metadata(spec).get("tokens", {})
  problems = []
  for key, field, ok in (("grid", "image_grid", lambda a, b: a == b),
                         ("codebook_size", "codebook_size", lambda a, b: a <= b),
                         ("text_vocab_size", "text_vocab_size", lambda a, b: a <= b)):
    if key in made and not ok(made[key], m[field]):
      problems.append(f"model.{field}={m[field]} does not fit the token shards in {spec} "
                      f"({key} {made[key]})")
  return problems


def tokenizer_of(config) -> spm.Tokenizer | None:
  d = config.data
  if not d.spm_model:
    return None
  tokenizer = spm.Tokenizer(d.spm_model, config.model.text_len)
  if tokenizer.vocab_size > config.model.text_vocab_size:
    from parti_jax.config import ConfigError
    raise ConfigError(f"data.spm_model={d.spm_model} has {tokenizer.vocab_size} pieces, more "
                      f"than model.text_vocab_size={config.model.text_vocab_size}")
  return tokenizer


def dataset(config, train: bool, global_batch: int, rows=None, start: int = 0,
            source: Source | None = None) -> grain.IterDataset:
  """A grain dataset of the `rows` (default: all) of each `global_batch`-row batch.

  `start` is the global position of the first batch's row 0 (`Loader.start_at`).
  """
  d, m = config.data, config.model
  rows = range(global_batch) if rows is None else rows
  if source is None:  # a given source was checked when it was opened for this config
    check(config, train)
    source = Source(d.train if train else d.eval, d)
  if not train:  # whole batches, the last padded with masked rows
    source.pad_to(-(-source.num_records // global_batch) * global_batch)
  ds = grain.MapDataset.source(source)
  if train:
    # Shuffle before repeat: each epoch gets its own permutation of the whole set.
    ds = ds.shuffle(seed=config.seed).repeat(None)
  ds = BatchRows(ds, global_batch, rows, start)
  preprocess = Preprocess(
      kind=d.kind, train=train, resolution=d.resolution, value_range=tuple(d.value_range),
      caption_dropout=d.caption_dropout, max_pixels=d.max_pixels,
      tokenizer=tokenizer_of(config) if d.kind == "images" else None,
      # Text and code fields belong to the Parti model; the image tokenizer has none.
      text_len=m.get("text_len", 0), text_vocab_size=m.get("text_vocab_size", 0),
      image_grid=m.get("image_grid", 0), codebook_size=m.get("codebook_size", 0),
      shard_of=source.shard_of, seed=config.seed + 1)
  ds = ds.map(preprocess)
  threads = d.num_threads if d.num_threads >= 0 else (0 if d.kind == "tokens" else 8)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                            prefetch_buffer_size=max(2 * len(rows), 16)))
  it = _CountBad(it, drop=train, shard_names=source.shard_names,
                 shard_counts=source.shard_counts, max_bad_fraction=d.max_bad_fraction)
  it = it.batch(len(rows), drop_remainder=True)
  if d.num_workers > 0:
    # grain's worker processes read absl flags; our commands parse their own arguments,
    # so absl's flags are marked parsed (with their defaults) for them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=d.num_workers,
                                                     per_worker_buffer_size=d.prefetch_batches))
  elif d.prefetch_batches > 0:
    it = grain.experimental.ThreadPrefetchIterDataset(it, prefetch_buffer_size=d.prefetch_batches)
  return it


class Loader:
  """Global batches on the mesh from this process's grain iterator; checkpointable.

  `iterator` is the grain DatasetIterator (what an orbax checkpoint saves through
  `grain.checkpoint`); its state counts from the global position `start`. `position` is
  the global position after the last row this process read; `layout` names the reading
  layout those states belong to (parti_jax.checkpoints saves all three). `data_wait_s`
  adds up the time `__next__` waited for the host pipeline.
  """

  def __init__(self, config, mesh, train: bool = True, batch_size: int | None = None,
               source: Source | None = None):
    self.global_batch = batch_size or config.global_batch_size
    self._config, self._train = config, train
    self._sharding = sharding.batch_sharding(mesh, sharding.rules_of(config))
    by_process = sharding.rows_by_process(self._sharding, self.global_batch)
    sharding.check_input_layout(by_process, self.global_batch)  # as the planner checks it
    self.rows = by_process[jax.process_index()]
    self._local_row = {r: i for i, r in enumerate(self.rows)}
    self.layout = dict(process_count=jax.process_count(), global_batch=self.global_batch,
                       rows_digest=_digest(by_process))
    if source is None:  # a given source is reused (the eval set, checked once per run)
      check(config, train)
      source = Source(config.data.train if train else config.data.eval, config.data)
    self.source = source
    self.data_wait_s = 0.0
    self.start_at(0)

  def start_at(self, position: int) -> None:
    """Reads on from global `position` (a new iterator: per-shard tallies start again)."""
    self.close()
    self._dataset = dataset(self._config, self._train, self.global_batch, self.rows,
                            start=position, source=self.source)
    self.iterator = iter(self._dataset)
    self.start = self.position = position  # grain's state counts from `start`

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    start = time.perf_counter()
    local = next(self.iterator)
    self.data_wait_s += time.perf_counter() - start
    self.position = int(local.pop("position").max()) + 1
    return {k: self._global_array(v) for k, v in local.items()}

  def _global_array(self, local: np.ndarray) -> jax.Array:
    # Each device takes its rows from this process's rows (the same on replica processes);
    # unlike make_array_from_process_local_data this needs no contiguous block per process.
    def rows_for(index):
      first, stop, _ = index[0].indices(self.global_batch)
      i = self._local_row[first]
      return local[i:i + stop - first]
    return jax.make_array_from_callback((self.global_batch,) + local.shape[1:],
                                        self._sharding, rows_for)

  def close(self) -> None:
    close = getattr(getattr(self, "iterator", None), "close", None)
    if close:
      close()


def _digest(by_process: dict) -> str:
  return hashlib.sha256(json.dumps(sorted(by_process.items())).encode()).hexdigest()[:16]


def eval_batches(config, mesh, batch_size: int | None = None, source: Source | None = None):
  """One pass over `config.data.eval` as global batches (padding rows have mask 0)."""
  loader = Loader(config, mesh, train=False, batch_size=batch_size, source=source)
  try:
    yield from loader
  finally:
    loader.close()
