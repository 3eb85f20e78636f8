"""The sample command: files written, prompts files, per-prompt seeds, clear errors."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sampling_helpers import tiny_run

from parti_jax import decoding, sample, sampling


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return tiny_run(tmp_path_factory)


TSV = ("Prompt\tCategory\tChallenge\tNote\n"
       "a red circle\tShapes\tBasic\t\n"
       "a cat on a mat\tAnimals\tBasic\t\n"
       "two blue squares\tShapes\tQuantity\t\n"
       "   \tShapes\tBasic\tan empty prompt is skipped\n"
       + "a very long prompt about " + "many green triangles " * 12 + "\tShapes\tComplex\t\n")


def test_the_command_writes_images_grids_and_a_report(workdir, tmp_path, capsys):
  prompts = tmp_path / "prompts.tsv"
  prompts.write_text(TSV)
  out = tmp_path / "out"
  sample.main(["--workdir", str(workdir), "--prompts", str(prompts), "--category", "shapes",
               "--num_samples", "3", "--out", str(out), "--sjd", "--seed", "7",
               "--top_k", "32"])
  captured = capsys.readouterr()
  assert "wrote 9 images of 3 prompts" in captured.out
  assert "prompt 2 is longer than 16 text tokens; truncated" in captured.err
  report = json.loads((out / "samples.json").read_text())
  assert [p["prompt"][:16] for p in report["prompts"]] == [
      "a red circle", "two blue squares", "a very long prom"]
  assert [p["truncated"] for p in report["prompts"]] == [False, False, True]
  assert report["settings"]["sjd_window"] == 16 and report["settings"]["top_k"] == 32
  defaults = decoding.Settings()  # the command samples at the project's defaults
  assert report["settings"]["guidance"] == defaults.guidance and report["decoding"] == "sjd"
  assert report["settings"]["temperature"] == defaults.temperature
  assert report["seed"] == 7 and report["step"] == 150 and report["batch_size"] == 16
  for key in ("load_s", "compile_s", "sample_s", "images_per_s", "forwards_per_batch"):
    assert report["timings"][key] > 0, key
  assert report["timings"]["forwards_per_batch"] <= 16
  for entry in report["prompts"]:
    assert entry["prompt_id"] == decoding.prompt_id(entry["prompt"])
    assert len(entry["files"]) == 3
    for name in entry["files"]:
      assert Image.open(out / name).size == (32, 32)
    assert Image.open(out / entry["grid"]).size == (64, 64)  # 3 images, 2 a row


def test_a_prompt_and_seed_give_the_same_image_whatever_else_is_sampled(workdir):
  run = sampling.load_run(workdir)
  settings = decoding.Settings(guidance=3.0)
  a = sampling.generate(run, ["a red circle", "two blue squares"], settings, 4, seed=1,
                      batch_size=8, progress=False)
  # 12 rows: a batch of 8 and a padded one, each prompt elsewhere than before.
  b = sampling.generate(run, ["a purple heart", "two blue squares", "a red circle"], settings,
                      4, seed=1, batch_size=8, progress=False)
  assert a["timings"]["compile_s"] > 0 and b["timings"]["compile_s"] == 0  # compiled once
  np.testing.assert_array_equal(a["images"][0], b["images"][2])
  np.testing.assert_array_equal(a["images"][1], b["images"][1])
  c = sampling.generate(run, ["a red circle"], settings, 4, seed=2, batch_size=8, progress=False)
  assert not np.array_equal(a["images"][0], c["images"][0])


def test_prompts_files(tmp_path):
  tsv = tmp_path / "p.tsv"
  tsv.write_text(TSV)
  assert sampling.read_prompts(tsv, challenge="basic") == ["a red circle", "a cat on a mat"]
  assert len(sampling.read_prompts(tsv)) == 4  # the empty one skipped
  text = tmp_path / "p.txt"
  text.write_text("a red circle\n\n  two blue squares  \n")
  assert sampling.read_prompts(text) == ["a red circle", "two blue squares"]
  with pytest.raises(sampling.SampleError, match="filter a TSV with a Prompt column"):
    sampling.read_prompts(text, category="Shapes")
  with pytest.raises(sampling.SampleError, match="no prompts in .* after filtering"):
    sampling.read_prompts(tsv, category="Vehicles")


def test_clear_errors(workdir, tmp_path):
  def error(*args):
    source = [] if "--prompts" in args else ["--prompt", "a red circle"]
    with pytest.raises(SystemExit) as e:
      sample.main(["--workdir", str(workdir), *source, "--out", str(tmp_path / "out"), *args])
    return str(e.value)

  assert "no checkpoint at step 7; it has steps [150]" in error("--step", "7")
  fresh = tmp_path / "fresh"
  fresh.mkdir()
  shutil.copy(workdir / "config.json", fresh / "config.json")
  assert f"{fresh} has no checkpoint" in error("--workdir", str(fresh))
  assert "no config.json; not a training run" in error("--workdir", str(tmp_path))
  spm_model = str(workdir.parent / "spm.model")
  message = error("--tokenizer", "color:patch=8,levels=5", "--spm", spm_model)
  assert "(4x4 codes of 125) does not match the model (4x4 codes of 64)" in message
  message = error("--tokenizer", "color:patch=4", "--spm", spm_model)
  assert "(8x8 codes of 64) does not match the model" in message
  assert "cannot read the prompts file" in error("--prompts", str(tmp_path / "missing.txt"))
  binary = tmp_path / "binary.txt"
  binary.write_bytes(b"\xff\xfe\x00 not text \xc3")
  assert "cannot read the prompts file" in error("--prompts", str(binary))
