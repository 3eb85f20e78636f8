"""Model folders: export, the folder's layout, samples equal to the run's bit for bit, sharded
loads, init_from a folder, and incomplete or mismatched folders refused naming the file."""

import json
import shutil

import jax
import numpy as np
import pytest
import safetensors.numpy
from conftest import load_config
from sampling_helpers import STEPS, tiny_run

from parti_jax import decoding, export, model_folder, runs, sample, sampling
from parti_jax import train as trainer

PROMPTS = ["a red circle", "two blue squares"]
SHARD_BYTES = 300_000  # the tiny model's 1 MB in four files, to exercise the index


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def folder(workdir, tmp_path_factory):
  out = tmp_path_factory.mktemp("export") / "tiny_parti"
  model_folder.export(workdir, out, max_shard_bytes=SHARD_BYTES, progress=False)
  return out


def test_the_folder_holds_sharded_weights_configs_spm_and_a_card(workdir, folder):
  manifest = json.loads((folder / "model.json").read_text())
  assert manifest["format_version"] == model_folder.FORMAT_VERSION and manifest["step"] == STEPS
  stage = manifest["stages"]["model"]
  assert len(stage["weights"]) == 4 and stage["index"] == "model/model.safetensors.index.json"
  assert stage["weights"][0] == "model/model-00001-of-00004.safetensors"
  index = json.loads((folder / stage["index"]).read_text())
  run, params = runs.load(workdir)
  names = model_folder.flat_names(jax.device_get(params))
  assert set(index["weight_map"]) == set(names)
  assert index["metadata"]["total_size"] == stage["bytes"] == sum(v.nbytes for v in names.values())
  for file in stage["weights"]:  # every file at most the limit, or a lone larger tensor
    tensors = safetensors.numpy.load_file(folder / file)
    assert sum(t.nbytes for t in tensors.values()) <= SHARD_BYTES or len(tensors) == 1
    for name, tensor in tensors.items():
      np.testing.assert_array_equal(tensor, names[name])
      assert index["weight_map"][name] == file.split("/")[1]
  for name, size in manifest["files"].items():
    assert (folder / name).stat().st_size == size, name
  assert not list(folder.rglob("*.py")) and not list(folder.rglob("*.pkl"))
  config = json.loads((folder / "model" / "config.json").read_text())
  assert config == json.loads((workdir / "config.json").read_text())
  assert (folder / "spm.model").read_bytes() == (workdir.parent / "spm.model").read_bytes()
  assert manifest["stages"]["image_tokenizer"]["spec"] == "color:patch=8,levels=4"
  card = (folder / "README.md").read_text()
  assert f"step {STEPS}" in card and "257,024 parameters" in card
  assert "1,000 examples" in card and "training at step 150: accuracy" in card
  assert "--model tiny_parti" in card and "--config.init_from=tiny_parti" in card


def test_samples_from_the_folder_equal_samples_from_the_run(workdir, folder, tmp_path):
  settings = decoding.Settings(sjd_window=16)
  from_run = sampling.generate(sampling.load_run(workdir), PROMPTS, settings, 4, seed=3,
                               progress=False)
  from_folder = sampling.generate(sampling.load_model(folder), PROMPTS, settings, 4, seed=3,
                                  progress=False)
  for a, b in zip(from_run["images"], from_folder["images"]):
    np.testing.assert_array_equal(a, b)
  assert len({a.tobytes() for a in from_run["images"][0]}) > 1  # not one image repeated
  # The command, on the folder alone: the run moved away, so orbax has nothing to read.
  moved = tmp_path / "moved"
  shutil.copytree(folder, moved)
  root = workdir.parent  # the run, its token shards and SentencePiece model
  parked = root.with_name(root.name + "_parked")
  root.rename(parked)
  try:
    sample.main(["--model", str(moved), "--prompt", PROMPTS[0], "--num_samples", "4",
                 "--seed", "3", "--sjd", "--out", str(tmp_path / "out")])
  finally:
    parked.rename(root)
  report = json.loads((tmp_path / "out" / "samples.json").read_text())
  assert report["step"] == STEPS and report["workdir"] == str(moved)
  from PIL import Image
  for s in range(4):
    image = np.asarray(Image.open(tmp_path / "out" / f"0000_{s:02d}.png"))
    np.testing.assert_array_equal(image, from_run["images"][0][s])


def test_a_two_device_load_equals_a_one_device_load(workdir, folder):
  opened = model_folder.open_folder(folder)
  _, _, one = model_folder.load_stage(opened, "model", mesh_axes=dict(data=1, fsdp=1, tensor=1),
                                      devices=jax.devices()[:1])
  _, setup, two = model_folder.load_stage(opened, "model",
                                          mesh_axes=dict(data=1, fsdp=1, tensor=2),
                                          devices=jax.devices()[:2])
  kernel = two["decoder"]["blocks"]["mlp"]["up"]["kernel"]
  assert len(kernel.sharding.device_set) == 2
  assert kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 2  # really split
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(one), jax.device_get(two))
  _, from_run = runs.load(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(one), jax.device_get(from_run))


def test_a_vitvqgan_tokenizer_travels_as_weights(workdir, tmp_path):
  from helpers import vitvqgan_run
  vitvqgan_run(tmp_path / "tokenizer")
  spec = f"vitvqgan:{tmp_path / 'tokenizer'}"
  out = tmp_path / "folder"
  export.main(["--workdir", str(workdir), "--out", str(out), "--tokenizer", spec])
  stage = json.loads((out / "model.json").read_text())["stages"]["image_tokenizer"]
  assert stage["task"] == "vitvqgan" and stage["weights"] == ["image_tokenizer/model.safetensors"]
  assert stage["source"] == dict(spec=spec, step=0)
  shutil.rmtree(tmp_path / "tokenizer")  # the folder needs nothing of it now
  settings = decoding.Settings()
  from_folder = sampling.generate(sampling.load_model(out), PROMPTS[:1], settings, 2,
                                  progress=False)
  vitvqgan_run(tmp_path / "tokenizer")  # the same random weights again
  from_run = sampling.generate(sampling.load_run(workdir, tokenizer=spec), PROMPTS[:1],
                               settings, 2, progress=False)
  np.testing.assert_array_equal(from_folder["images"][0], from_run["images"][0])
  assert from_folder["images"][0].shape == (2, 32, 32, 3)


def test_init_from_a_model_folder(workdir, folder, tmp_path):
  config = load_config("parti_tiny")
  config.data.train = str(workdir.parent / "tokens")
  config.init_from = str(folder)
  config.num_train_steps = 1
  config.train.update(log_every=1, eval_every=0, checkpoint_every=1)
  setup = trainer.tasks.of(config).Setup(config)
  loaded = runs.load_init_params(str(folder), setup.sharded_abstract_params())
  _, from_run = runs.load(workdir)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded), jax.device_get(from_run))
  summary = trainer.train(config, tmp_path / "tuned", devices=jax.devices()[:1])
  # The trained model's loss, not a fresh one's (ln 64 = 4.16 over the codebook).
  assert summary["loss"] < 2.0


def copy_of(folder, tmp_path):
  target = tmp_path / "copy"
  shutil.copytree(folder, target)
  return target


def refusal(path) -> str:
  with pytest.raises(sampling.SampleError) as e:
    sampling.load_model(path)
  return str(e.value)


def rewrite_manifest(folder, edit):
  manifest = json.loads((folder / "model.json").read_text())
  edit(manifest)
  (folder / "model.json").write_text(json.dumps(manifest))


def test_incomplete_or_mismatched_folders_are_refused_naming_the_file(folder, tmp_path):
  broken = copy_of(folder, tmp_path)
  second = broken / "model" / "model-00002-of-00004.safetensors"
  second.unlink()
  assert f"{second} is missing: the folder is incomplete" in refusal(broken)

  broken = copy_of(folder, tmp_path / "cut")
  third = broken / "model" / "model-00003-of-00004.safetensors"
  third.write_bytes(third.read_bytes()[:1000])
  assert f"{third} holds 1,000 bytes, but model.json says" in refusal(broken)

  broken = copy_of(folder, tmp_path / "version")
  rewrite_manifest(broken, lambda m: m.update(format_version=2))
  message = refusal(broken)
  assert f"{broken / 'model.json'}: format version 2, but this parti_jax reads version 1" \
      in message

  broken = copy_of(folder, tmp_path / "nomanifest")
  (broken / "model.json").unlink()
  assert f"{broken / 'model.json'} is missing: not a model folder" in refusal(broken)
  with pytest.raises(SystemExit, match="model.json is missing"):
    sample.main(["--model", str(broken), "--prompt", "a red circle", "--out",
                 str(tmp_path / "out")])

  # Another model's config: the tensors no longer fit, and the file holding one is named.
  broken = copy_of(folder, tmp_path / "config")
  config = json.loads((broken / "model" / "config.json").read_text())
  config["model"]["mlp_dim"] = 128
  (broken / "model" / "config.json").write_text(json.dumps(config))
  rewrite_manifest(broken, lambda m: m["files"].update(
      {"model/config.json": (broken / "model" / "config.json").stat().st_size}))
  message = refusal(broken)
  assert ".safetensors: parameter decoder.blocks.mlp" in message
  assert "is F32 [2, 256, 64]; the model needs F32 [2, 128, 64]" in message

  # A parameter the index does not map.
  broken = copy_of(folder, tmp_path / "index")
  index_path = broken / "model" / "model.safetensors.index.json"
  index = json.loads(index_path.read_text())
  name = sorted(index["weight_map"])[0]
  del index["weight_map"][name]
  index_path.write_text(json.dumps(index))
  rewrite_manifest(broken, lambda m: m["files"].update(
      {"model/model.safetensors.index.json": index_path.stat().st_size}))
  assert f"{index_path}: no parameter {name}" in refusal(broken)

  # A file larger than its tensors can take is refused unread (docs/trust.md).
  broken = copy_of(folder, tmp_path / "large")
  first = broken / "model" / "model-00001-of-00004.safetensors"
  first.write_bytes(first.read_bytes() + b"\0" * (2 << 20))
  rewrite_manifest(broken, lambda m: m["files"].update(
      {"model/model-00001-of-00004.safetensors": first.stat().st_size}))
  assert f"{first}: {first.stat().st_size:,} bytes, more than the" in refusal(broken)

  # Garbage where a safetensors file should be.
  broken = copy_of(folder, tmp_path / "garbage")
  first = broken / "model" / "model-00001-of-00004.safetensors"
  first.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\0" * 100)
  rewrite_manifest(broken, lambda m: m["files"].update(
      {"model/model-00001-of-00004.safetensors": first.stat().st_size}))
  assert f"{first}: not a readable safetensors file" in refusal(broken)


def test_export_refuses_what_it_cannot_write(workdir, folder, tmp_path):
  with pytest.raises(SystemExit, match="already holds a model folder"):
    export.main(["--workdir", str(workdir), "--out", str(folder)])
  with pytest.raises(SystemExit, match="is code, which a folder does not carry"):
    export.main(["--workdir", str(workdir), "--out", str(tmp_path / "x"), "--tokenizer",
                 "json:loads"])
  with pytest.raises(SystemExit, match="no checkpoint at step 3"):
    export.main(["--workdir", str(workdir), "--out", str(tmp_path / "x"), "--step", "3"])
  with pytest.raises(SystemExit, match="has no best checkpoint"):
    export.main(["--workdir", str(workdir), "--out", str(tmp_path / "x"), "--step", "best"])
  with pytest.raises(SystemExit, match="--step='last' is not a step"):
    export.main(["--workdir", str(workdir), "--out", str(tmp_path / "x"), "--step", "last"])
  assert not (tmp_path / "x" / "model.json").exists()


def test_an_export_cut_short_after_model_json_is_finished_by_running_it_again(
    workdir, tmp_path, monkeypatch):
  from parti_jax import model_card
  out, card = tmp_path / "cut", model_card.text

  def cut_short(*args, **kwargs):
    raise KeyboardInterrupt  # Ctrl-C while the card (or the preview before it) is made

  monkeypatch.setattr(model_card, "text", cut_short)
  with pytest.raises(KeyboardInterrupt):
    model_folder.export(workdir, out, progress=False)
  assert (out / "model.json").exists() and not (out / "README.md").exists()
  weights = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}

  monkeypatch.setattr(model_card, "text", card)
  said = []
  model_folder.export(workdir, out, progress=False, log=said.append)
  assert said[0].startswith(f"finishing the export of {workdir / 'checkpoints'}")
  assert f"step {STEPS}" in (out / "README.md").read_text()
  assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")} == weights  # kept
  with pytest.raises(model_folder.FolderError, match="already holds a model folder"):
    model_folder.export(workdir, out, progress=False)

  (out / "README.md").unlink()  # cut short again, but model.json names another checkpoint
  manifest = json.loads((out / "model.json").read_text())
  manifest["source"]["checkpoint"] = "elsewhere/checkpoints/7"
  (out / "model.json").write_text(json.dumps(manifest))
  with pytest.raises(model_folder.FolderError,
                     match="holds an unfinished export of elsewhere/checkpoints/7, not of"):
    model_folder.export(workdir, out, progress=False)
