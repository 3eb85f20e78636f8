"""The evaluators' one reader of a sample directory (`parti_jax.eval.read_samples`): what it
accepts, what it refuses, and that both evaluators (`eval.shapes`, `eval.alignment`) read
through it."""

import json

import pytest
from PIL import Image

from parti_jax import eval as eval_lib
from parti_jax.data import records
from parti_jax.eval import alignment
from parti_jax.eval import shapes


def write_samples(directory, meta) -> None:
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "samples.json").write_text(json.dumps(meta))


def entry(files, **more) -> dict:
  return dict(index=0, prompt="a red star", files=files, kept=list(range(len(files))), **more)


def test_a_sampler_directory_is_read(tmp_path):
  write_samples(tmp_path, dict(prompts=[entry(["0000_00.png", "0000_01.png"]),
                                        entry(["0001_00.png"], ranked=["0001_00.png"])]))
  entries = eval_lib.read_samples(tmp_path)
  assert [e["files"] for e in entries] == [["0000_00.png", "0000_01.png"], ["0001_00.png"]]
  assert alignment.sample_files(tmp_path)[0] == (
      "a red star", [tmp_path / "0000_00.png", tmp_path / "0000_01.png"])


OUTSIDE = ["../secret.png", "/etc/passwd", "sub/0.png", "..", ".", "", "a\0b.png", "0.png/"]


@pytest.mark.parametrize("name", OUTSIDE)
@pytest.mark.parametrize("field", ["files", "ranked", "upsampled"])
def test_a_name_out_of_the_directory_is_refused_naming_the_file(tmp_path, name, field):
  meta = entry(["0000_00.png"])
  meta[field] = [name]
  write_samples(tmp_path, dict(prompts=[meta]))
  with pytest.raises(eval_lib.SamplesError) as e:
    eval_lib.read_samples(tmp_path)
  message = str(e.value)
  assert str(tmp_path / "samples.json") in message and "prompt entry 0" in message
  assert repr(name) in message and "not a file name in the directory" in message


@pytest.mark.parametrize("meta, problem", [
    ("[1, 2", "is not JSON"),
    ([], "has no list of prompts"),
    (dict(prompts={}), "has no list of prompts"),
    (dict(prompts=[["a"]]), "prompt entry 0 has no prompt and list of files"),
    (dict(prompts=[dict(prompt=3, files=[])]), "prompt entry 0 has no prompt"),
    (dict(prompts=[entry("0000_00.png")]), "prompt entry 0 has no prompt and list of files"),
    (dict(prompts=[entry([7])]), "prompt entry 0: files is not a list of file names"),
    (dict(prompts=[entry(["a.png"], ranked="a.png")]), "ranked is not a list of file names"),
    (dict(prompts=[dict(entry(["a.png"]), kept=["0"])]), "kept is not a list of sample"),
    (dict(prompts=[entry([])]), "lists no images"),
])
def test_a_malformed_samples_json_is_refused_naming_the_problem(tmp_path, meta, problem):
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "samples.json").write_text(meta if isinstance(meta, str) else json.dumps(meta))
  with pytest.raises(eval_lib.SamplesError, match="samples.json") as e:
    eval_lib.read_samples(tmp_path)
  assert problem in str(e.value)


def test_a_missing_or_oversized_samples_json_is_refused(tmp_path):
  with pytest.raises(eval_lib.SamplesError, match="samples.json not found"):
    eval_lib.read_samples(tmp_path)
  with (tmp_path / "samples.json").open("wb") as f:
    f.truncate(records.MAX_METADATA_BYTES + 1)  # sparse: never read
  with pytest.raises(records.TooLarge, match=r"samples\.json: more than"):
    eval_lib.read_samples(tmp_path)


def test_both_evaluators_refuse_a_name_out_of_the_directory_in_one_line(tmp_path):
  samples = tmp_path / "samples"
  write_samples(samples, dict(prompts=[entry(["../outside.png"])]))
  Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")  # there, never read
  with pytest.raises(eval_lib.SamplesError, match="'../outside.png'"):
    shapes.samples_of(samples)
  with pytest.raises(eval_lib.SamplesError, match="'../outside.png'"):
    alignment.sample_files(samples)
  for main, more in ((shapes.main, []), (alignment.main, ["--model", str(tmp_path / "none")])):
    with pytest.raises(SystemExit) as e:  # refused before any model is looked for
      main(["--images", str(samples), *more])
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message
    assert str(samples / "samples.json") in message and "'../outside.png'" in message
