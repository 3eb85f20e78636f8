"""SentencePiece: training from a shard set, the tokenizer's fixed-length ids, round trips."""

import pickle

import data_helpers as h
import numpy as np
import pytest
import sentencepiece

from parti_jax import config as common
from parti_jax import text as text_lib
from parti_jax.data import pipeline, spm


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  root = tmp_path_factory.mktemp("spm")
  data = h.write_set(root / "set", h.image_records(30), num_shards=2)
  spm.main(["--data", data, "--out", str(root / "text"), "--vocab_size", "60"])
  return spm.Tokenizer(root / "text.model", 32)


def test_captions_round_trip(tokenizer):
  assert 10 < tokenizer.vocab_size <= 60
  for caption in h.CAPTIONS:
    ids = tokenizer.encode(caption)
    assert ids.shape == (32,) and ids.dtype == np.int32
    assert tokenizer.decode(ids) == caption
    n = int((ids != text_lib.PAD_ID).sum())
    assert ids[n - 1] == text_lib.END_ID and (ids[n:] == text_lib.PAD_ID).all()


def test_empty_captions_are_the_unconditional_input(tokenizer):
  want = np.array([text_lib.END_ID] + [text_lib.PAD_ID] * 31, np.int32)
  for caption in ("", "   "):
    np.testing.assert_array_equal(tokenizer.encode(caption), want)
  np.testing.assert_array_equal(tokenizer.unconditional, want)
  np.testing.assert_array_equal(text_lib.pad([], 32), want)


def test_long_captions_are_cut_exactly(tokenizer):
  caption = " ".join(h.CAPTIONS * 400)  # ~15,000 characters
  ids = tokenizer.encode(caption)
  assert (ids != text_lib.PAD_ID).all()
  full = tokenizer._sp.encode(caption)  # the whole caption, uncut
  np.testing.assert_array_equal(ids, full[:32])


def test_the_tokenizer_pickles_for_worker_processes(tokenizer):
  clone = pickle.loads(pickle.dumps(tokenizer))
  np.testing.assert_array_equal(clone.encode("a purple heart"), tokenizer.encode("a purple heart"))


def test_clean_caption_repairs_what_it_can():
  assert spm.clean_caption(b"caf\xc3\xa9  au\tlait\n") == ("café au lait", [])
  text, repairs = spm.clean_caption(b"caf\xe9 \xff")
  assert text == "caf\ufffd \ufffd" and repairs == ["caption_not_utf8"]
  text, repairs = spm.clean_caption("x" * 10_000)
  assert len(text) == spm.MAX_CAPTION_CHARS and repairs == ["caption_truncated"]
  assert spm.clean_caption(None) == ("", [])


def test_foreign_models_and_oversized_vocabularies_are_refused(tmp_path, tokenizer):
  sentencepiece.SentencePieceTrainer.train(
      sentence_iterator=iter(h.CAPTIONS * 10), model_prefix=str(tmp_path / "plain"),
      vocab_size=30, minloglevel=2)  # default ids: unk 0, bos 1, eos 2, no pad
  with pytest.raises(ValueError, match="expected pad/unk/end ids 0/1/2"):
    spm.Tokenizer(tmp_path / "plain.model", 8)
  c = common.tiny_model(common.base())
  c.data.spm_model = tokenizer.model_path
  c.model.text_vocab_size = 8
  with pytest.raises(common.ConfigError, match="more than model.text_vocab_size=8"):
    pipeline.tokenizer_of(c)


def test_bpe_keeps_whole_words_of_a_small_vocabulary(tmp_path):
  from parti_jax.shapes import scenes
  captions = [scenes.sample_scene(np.random.default_rng(i), scenes.Spec(), "train")[1]
              for i in range(1500)]
  spm.train(captions, tmp_path / "bpe", 128, model_type="bpe")
  tokenizer = spm.Tokenizer(tmp_path / "bpe.model", 16)
  # Every caption fits in 16 tokens: one per word, plus END.
  assert max(len(tokenizer.ids(c)) for c in captions) <= 13
