"""The data commands and tools on bucket paths (gs://, the emulator of tests/gcs.py, its
bucket FUSE-mounted as the pod launchers mount it with gcsfuse).

The chain a user runs on a pod: shapes -> SentencePiece -> colour-code token shards, all in
a bucket, give the records the same commands give on local disk; the tiny config trains from
the bucket's token shards with its work directory in the bucket, resumes, and samples with a
prompts file and an output directory there, which the evaluation tools read back. A bucket
that does not exist is said in one line naming the path.
"""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import load_config
from gcs import gcs_emulator, gcs_mount, listing, new_dir  # noqa: F401  (fixtures)
from parti_jax import sample
from parti_jax import train as trainer
from parti_jax.data import encode, records, shapes, spm
from parti_jax.eval import fid
from parti_jax.eval import shapes as shapes_eval

MISSING = "gs://parti-jax-no-such-bucket/data"


def make_data(root) -> None:
  """Shapes at 32 px -> SentencePiece -> colour-code token shards under `root` (a local or
  gs:// directory), by the commands a user runs."""
  shapes.main(["--out", f"{root}/shapes", "--num", "96", "--num_validation", "8",
               "--num_heldout", "0", "--num_shards", "2", "--workers", "1"])
  spm.main(["--data", f"{root}/shapes/train", "--out", f"{root}/spm", "--vocab_size", "128"])
  encode.main(["--data", f"{root}/shapes/train", "--out", f"{root}/tokens",
               "--spm", f"{root}/spm.model", "--resolution", "32", "--text_len", "16",
               "--batch_size", "32", "--shards_per_process", "2"])


@pytest.fixture(scope="module")
def data(gcs_mount, tmp_path_factory):
  """The same chain on local disk and in the bucket: {"local": path, "bucket": gs path}."""
  local, bucket = tmp_path_factory.mktemp("local_chain"), new_dir()
  make_data(local)
  make_data(bucket)
  return {"local": local, "bucket": bucket}


def comparable(meta: dict) -> dict:
  """Metadata without what names where and when it was made."""
  meta = {k: v for k, v in meta.items() if k not in ("made_by", "source")}
  if "tokens" in meta:
    meta["tokens"] = {k: v for k, v in meta["tokens"].items() if k != "spm_model"}
  return meta


@pytest.mark.parametrize("shard_set", ["shapes/train", "shapes/validation", "tokens"])
def test_the_data_commands_write_to_a_bucket_what_they_write_locally(data, shard_set):
  local = records.ShardSet.open(data["local"] / shard_set)
  remote = records.ShardSet.open(data["bucket"] / shard_set)
  remote.verify_counts()
  assert comparable(remote.meta) == comparable(local.meta)
  assert list(remote.read_all()) == list(local.read_all())
  # Whole objects and the metadata: no temporary names left in the bucket.
  assert [p.name for p in listing(remote.directory)] == sorted(
      [p.name for p in remote.paths] + [records.METADATA])
  assert not records.staging_dir(remote.directory).exists()  # nor a local folder they waited in


def test_sentencepiece_model_and_vocabulary_are_uploaded_whole(data):
  assert (data["bucket"] / "spm.vocab").read_text() == (data["local"] / "spm.vocab").read_text()
  # The model's bytes hold the path it was trained at (a scratch file for a bucket).
  remote, local = (spm.Tokenizer(d / "spm.model", 16) for d in (data["bucket"], data["local"]))
  assert remote.vocab_size == local.vocab_size
  assert [remote.decode([i]) for i in range(3, remote.vocab_size)] == [
      local.decode([i]) for i in range(3, local.vocab_size)]
  tokens = records.ShardSet.open(data["bucket"] / "tokens").meta["tokens"]
  assert tokens["spm_model"] == f"{data['bucket']}/spm.model"  # what the sampler finds


def steps_saved(workdir) -> list[int]:
  """Finished steps (orbax writes STEP/commit_success.txt last on a bucket)."""
  return sorted(int(p.parent.name) for p in listing(workdir / "checkpoints", "*/*")
                if p.name == "commit_success.txt")


def test_the_tiny_config_trains_from_the_bucket_resumes_and_samples_there(data, capsys):
  root = new_dir()
  workdir = root / "run"
  config = load_config("parti_tiny")
  config.data.train = str(data["bucket"] / "tokens")
  config.num_train_steps = 4
  config.train.update(log_every=2, checkpoint_every=2, eval_every=0)
  trainer.train(config, workdir, stop_after_step=2)
  assert steps_saved(workdir) == [2]
  trainer.train(config, workdir)
  assert f"resumed from {workdir / 'checkpoints' / '2'}" in capsys.readouterr().err
  assert steps_saved(workdir) == [2, 4]

  prompts, out = root / "prompts.txt", root / "samples"
  prompts.write_text("a red circle\n\ntwo blue squares\n")
  sample.main(["--workdir", str(workdir), "--prompts", str(prompts), "--num_samples", "2",
               "--out", str(out), "--batch_size", "8"])
  assert "wrote 4 images of 2 prompts" in capsys.readouterr().out
  report = json.loads((out / "samples.json").read_text())
  assert report["step"] == 4 and report["workdir"] == str(workdir)
  for entry in report["prompts"]:
    for name in entry["files"]:
      with (out / name).open("rb") as f:
        assert Image.open(f).size == (32, 32)

  # The evaluation tools read the bucket's samples and shard sets, and write there.
  shapes_eval.main(["--images", str(out), "--out", str(root / "report.json")])
  assert json.loads((root / "report.json").read_text())["counts"]["all"] == 4
  assert len(fid.ImageSet(out)) == 6  # 4 samples and 2 grids
  local, remote = (fid.ImageSet(d / "shapes" / "validation")
                   for d in (data["local"], data["bucket"]))
  assert len(remote) == len(local) == 8
  for i in (0, 7):
    np.testing.assert_array_equal(remote.pixels(i, 16), local.pixels(i, 16))


@pytest.mark.parametrize("command, argv", [
    (shapes.main, ["--out", MISSING, "--num", "8", "--workers", "1"]),
    (spm.main, ["--data", f"{MISSING}/train", "--out", "spm_not_written"]),
    (encode.main, ["--data", f"{MISSING}/train", "--out", "tokens_not_written",
                   "--spm", f"{MISSING}/spm.model"]),
    (sample.main, ["--workdir", f"{MISSING}/run", "--prompt", "a red circle",
                   "--out", "samples_not_written"]),
    (sample.main, ["--workdir", f"{MISSING}/run", "--prompts", f"{MISSING}/prompts.txt",
                   "--out", "samples_not_written"]),
    (shapes_eval.main, ["--images", f"{MISSING}/samples"]),
])
def test_a_bucket_that_does_not_exist_is_one_line_naming_the_path(gcs_emulator, command, argv,
                                                                  tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # where the local paths above would be written
  with pytest.raises(SystemExit) as exit_:
    command(argv)
  message = str(exit_.value.code)
  assert message.startswith("error: ") and "\n" not in message, message
  assert MISSING in message and "does not exist" in message, message
  assert not list(tmp_path.iterdir())  # it stopped before writing anything


def test_a_missing_bucket_is_named_by_the_libraries_too(gcs_emulator):
  with pytest.raises(records.AccessError, match=f"{MISSING}: the bucket does not exist"):
    fid.ImageSet(MISSING)
  with pytest.raises(records.AccessError, match=f"{MISSING}/spm.model.*does not exist"):
    spm.Tokenizer(f"{MISSING}/spm.model", 16)
  with pytest.raises(FileNotFoundError, match="spm.model"):  # a bucket that exists
    spm.Tokenizer(f"{new_dir()}/spm.model", 16)
  with pytest.raises(records.AccessError, match=f"{MISSING}/spm.*does not exist"):
    spm.train(iter(()), f"{MISSING}/spm")  # before training
