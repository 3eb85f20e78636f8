"""SentencePiece text: train a model on a shard set's captions; the tokenizer used everywhere.

  python -m parti_jax.data.spm --data DIR [--data DIR2 ...] --out PREFIX [--vocab_size 16000]

writes PREFIX.model and PREFIX.vocab (DIR and PREFIX may be in a bucket, gs://...). Ids: 0
pad, 1 unk, 2 end of text, then the pieces. Parti uses 16,000 pieces; small datasets ask for
fewer (a vocabulary larger than the data supports is shrunk by SentencePiece, and the size
it reached is printed).

`Tokenizer(path, length)` maps a caption to `length` int32 ids: the pieces, the end id,
then padding. Longer captions are cut at `length` ids. An empty or all-whitespace caption
maps to the unconditional input `[END, PAD, ...]`, the same input classifier-free
guidance dropout uses, so training and sampling agree on what "no text" means.
"""

import pathlib
import re
import sys
import tempfile
import unicodedata

import numpy as np
import sentencepiece as spm

from parti_jax import cli
from parti_jax import text as text_lib
from parti_jax.text import END_ID, PAD_ID, UNK_ID
# SentencePiece pieces are at most 16 characters, so the first `length` ids of a caption
# never depend on characters past 16 * length; cutting there first keeps tokenizing a
# 10,000-character caption as cheap as a short one without changing its ids.
MAX_PIECE_CHARS = 16
MAX_CAPTION_CHARS = 4096  # what ingest keeps of a caption


def clean_caption(raw, max_chars: int = MAX_CAPTION_CHARS) -> tuple[str, list[str]]:
  """A caption as text: (cleaned caption, list of repairs made).

  Bytes that are not UTF-8 are decoded with replacement characters; control characters
  and runs of whitespace become single spaces; very long captions are cut.
  """
  repairs = []
  if raw is None:
    return "", repairs
  if isinstance(raw, (bytes, bytearray)):
    try:
      raw = bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
      raw = bytes(raw).decode("utf-8", errors="replace")
      repairs.append("caption_not_utf8")
  text = unicodedata.normalize("NFC", str(raw))
  text = re.sub(r"[\s\x00-\x1f\x7f]+", " ", text).strip()
  if len(text) > max_chars:
    text = text[:max_chars].rstrip()
    repairs.append("caption_truncated")
  return text, repairs


def clean_captions(raw_captions) -> tuple[list[str], list[str]]:
  """Cleaned, non-empty, distinct captions and the set of repairs made, in order."""
  if isinstance(raw_captions, (str, bytes)):
    raw_captions = [raw_captions]
  captions, repairs = [], []
  for raw in raw_captions or ():
    text, fixes = clean_caption(raw)
    if text and text not in captions:
      captions.append(text)
      repairs += [f for f in fixes if f not in repairs]
  return captions, repairs


# A 16,000-piece model is ~0.5 MB and a 256,000-piece one a few MB; a larger file is refused
# before it is read.
MAX_MODEL_BYTES = 64 << 20


class Tokenizer:
  """Captions -> fixed-length int32 ids; picklable, so grain worker processes can hold it.

  A model file that is too large, empty, or not a SentencePiece model raises
  records.DataError naming it (a missing one FileNotFoundError).
  """

  def __init__(self, model_path, length: int):
    self.model_path = str(model_path)
    self.length = length
    from parti_jax.data import records  # as in captions_of: `import spm` stays light
    self._proto = records.read_limited(model_path, MAX_MODEL_BYTES, "a SentencePiece model")
    if not self._proto:  # SentencePiece takes empty bytes for "no model" and fails later
      raise records.DataError(f"{self.model_path} is empty, not a SentencePiece model")
    self._load()

  def _load(self):
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    except Exception as e:  # noqa: BLE001  RuntimeError today; whatever the library raises
      from parti_jax.data import records
      why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      raise records.DataError(f"{self.model_path} is not a SentencePiece model ({why}); "
                              "train one with `python -m parti_jax.data.spm`") from None
    if (self._sp.pad_id(), self._sp.unk_id(), self._sp.eos_id()) != (PAD_ID, UNK_ID, END_ID):
      raise ValueError(f"{self.model_path}: expected pad/unk/end ids {PAD_ID}/{UNK_ID}/{END_ID}, "
                       f"got {self._sp.pad_id()}/{self._sp.unk_id()}/{self._sp.eos_id()}; train "
                       "it with `python -m parti_jax.data.spm`")

  def __getstate__(self):
    return dict(model_path=self.model_path, length=self.length, _proto=self._proto)

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def unconditional(self) -> np.ndarray:
    return text_lib.unconditional(self.length)

  def ids(self, caption: str) -> list[int]:
    """Unpadded ids of a caption, end id included, at most `length` of them."""
    text = caption[:MAX_PIECE_CHARS * self.length].strip()
    ids = self._sp.encode(text) if text else []
    return (ids + [END_ID])[:self.length]

  def encode(self, caption: str) -> np.ndarray:
    return text_lib.pad(self.ids(caption), self.length)

  def decode(self, ids) -> str:
    ids = [int(i) for i in ids if int(i) not in (PAD_ID, END_ID)]
    return self._sp.decode(ids)


def train(captions, out_prefix, vocab_size: int = 16_000,
          max_sentences: int = 2_000_000, model_type: str = "unigram") -> int:
  """Trains a SentencePiece model on an iterable of captions; returns its size.

  Unigram is the default. On a small, repetitive vocabulary (the shapes captions) unigram
  training prunes to a few dozen pieces, most words spelled letter by letter; BPE keeps
  whole words there, so the demo asks for it.

  A prefix in a bucket: SentencePiece writes local files only, so the model is trained in a
  temporary directory and PREFIX.vocab, then PREFIX.model, are uploaded whole.
  """
  if "://" not in str(out_prefix):
    pathlib.Path(out_prefix).parent.mkdir(parents=True, exist_ok=True)
    return _train(captions, str(out_prefix), vocab_size, max_sentences, model_type)
  from parti_jax.data import buckets
  buckets.check_bucket(out_prefix)  # before the training, not after it
  with tempfile.TemporaryDirectory() as scratch:
    local = pathlib.Path(scratch) / "spm"  # our own scratch directory
    size = _train(captions, str(local), vocab_size, max_sentences, model_type)
    for suffix in (".vocab", ".model"):  # the model last: a reader finds both or neither
      buckets.write_bytes(f"{out_prefix}{suffix}", local.with_suffix(suffix).read_bytes())
  return size


def _train(captions, out_prefix: str, vocab_size: int, max_sentences: int,
           model_type: str) -> int:
  spm.SentencePieceTrainer.train(
      sentence_iterator=(c for c in captions if c.strip()),
      model_prefix=out_prefix, vocab_size=vocab_size, model_type=model_type,
      pad_id=PAD_ID, unk_id=UNK_ID, eos_id=END_ID, bos_id=-1,
      character_coverage=0.9995, input_sentence_size=max_sentences,
      shuffle_input_sentence=True, hard_vocab_limit=False,
      num_threads=2, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=f"{out_prefix}.model").get_piece_size()


def captions_of(directories):
  """Every caption of every record of the given shard sets (local or in buckets).

  The sets are opened here, so a missing one raises before training starts.
  """
  from parti_jax.data import buckets, records  # the CLI imports records only when it is used
  shard_sets = []
  for d in directories:
    buckets.check_bucket(d)
    shard_sets.append(records.ShardSet.open(d))
  return (caption for shard_set in shard_sets for record in shard_set.read_all()
          for caption in clean_captions(record.get("captions"))[0])


FLAGS = cli.Flags(__doc__)
FLAGS.strings("data", None, "Shard set directory (repeat the flag for several).", required=True)
FLAGS.string("out", None, "Output prefix: writes PREFIX.model, PREFIX.vocab.", required=True)
FLAGS.integer("vocab_size", 16_000, "Pieces to aim for.")
FLAGS.integer("max_sentences", 2_000_000, "Captions sampled for training.")
FLAGS.enum("model_type", "unigram", ["unigram", "bpe"], "SentencePiece model type.")


def main(argv=None):
  a = FLAGS.parse(argv)
  from parti_jax.data import records
  try:
    size = train(captions_of(a.data), a.out, a.vocab_size, a.max_sentences, a.model_type)
  except records.DataError as e:  # a shard set or bucket that cannot be read or written
    sys.exit(f"error: {e}")
  note = "" if size == a.vocab_size else f" (asked for {a.vocab_size}; the data supports fewer)"
  print(f"wrote {a.out}.model: {size} pieces{note}")


if __name__ == "__main__":
  cli.run(main)
