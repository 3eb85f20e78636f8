"""The benchmark scripts run end to end and report consistent figures."""

import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT


def _last_json(args):
  out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_throughput_reports_every_field_consistently(tmp_path):
  r = _last_json(["benchmarks/train_throughput.py", "--config", "configs/parti_tiny.py",
                  "--steps", "2", "--config.mesh.fsdp=2", "--config.mesh.data=-1",
                  "--hlo_out", str(tmp_path / "step.hlo")])
  for key in ("image_tokens_per_s", "model_tflops_per_s_per_device", "peak_tflops_per_device",
              "mfu", "device_kind", "num_devices", "global_batch", "d_model", "num_heads",
              "mlp_dim", "encoder_layers", "decoder_layers", "text_len", "image_tokens",
              "text_vocab", "image_vocab"):
    assert key in r, key
  assert r["num_devices"] == 8 and r["device_kind"] == "cpu"
  assert (r["global_batch"], r["d_model"], r["image_tokens"]) == (8, 64, 16)
  assert r["image_tokens_per_s"] == pytest.approx(8 * 16 / r["step_time_s"])
  assert r["mfu"] == pytest.approx(r["model_tflops_per_s_per_device"] / r["peak_tflops_per_device"])
  assert 0 < r["mfu"] < 1
  hlo = (tmp_path / "step.hlo").read_text()  # the step that was timed, compiled for 8 devices
  assert hlo.startswith("HloModule") and "num_partitions=8" in hlo


def test_benchmark_refuses_a_bad_config_with_the_field_named():
  out = subprocess.run(
      [sys.executable, "benchmarks/train_throughput.py", "--config", "configs/parti_tiny.py",
       "--config.global_batch_size=12"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode != 0
  assert "global_batch_size=12" in out.stderr


def test_lowering_time_of_a_deep_config_on_an_abstract_pod():
  r = _last_json(["benchmarks/lowering_time.py", "--config", "configs/parti_tiny.py",
                  "--num_devices", "64", "--decoder_layers", "3",
                  "--config.model.decoder_layers=32", "--config.global_batch_size=64",
                  "--platform", "cpu"])
  shallow, deep = r["runs"]
  assert (shallow["decoder_layers"], deep["decoder_layers"]) == (3, 32)
  # One scanned block, whatever the depth. (Both depths differ from the encoder's 2: a
  # stack as deep as the encoder would share a few helper functions with it.)
  assert deep["program_lines"] == shallow["program_lines"]


def test_two_processes_train_like_one(tmp_path):
  """2 processes x 2 devices (gloo) reach the loss of 1 process x 4 devices, same mesh."""
  bench = ["benchmarks/train_throughput.py", "--config", "configs/parti_tiny.py", "--steps", "3",
           "--config.mesh.data=2", "--config.mesh.fsdp=2"]
  single = subprocess.run(
      [sys.executable, *bench], cwd=ROOT, capture_output=True, text=True,
      env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4"))
  assert single.returncode == 0, single.stderr[-3000:]
  one = json.loads(single.stdout.strip().splitlines()[-1])
  multi = subprocess.run(
      [sys.executable, "launch/local.py", "--num_processes", "2", "--devices_per_process", "2",
       "--", sys.executable, *bench], cwd=ROOT, capture_output=True, text=True)
  assert multi.returncode == 0, multi.stdout[-3000:]
  reports = [l for l in multi.stdout.splitlines() if l.startswith("[0] {")]
  two = json.loads(reports[-1][len("[0] "):])
  assert (one["num_devices"], two["num_devices"]) == (4, 4)
  assert two["final_loss"] == pytest.approx(one["final_loss"], rel=1e-5)


def test_input_pipeline_benchmark_reports_consistent_figures():
  r = _last_json(["benchmarks/input_pipeline.py", "--images", "24", "--batches", "2",
                  "--batch_size", "8", "--token_records", "1024"])
  assert r["cores"] >= 1 and r["tiny_training_devices"] >= 1
  for kind in ("jpeg_256px_images", "token_examples"):
    assert r[f"{kind}_per_s"] > 0
    assert r[f"{kind}_per_s_per_core"] == pytest.approx(r[f"{kind}_per_s"] / r["cores"], abs=0.1)
  assert r["token_pipeline_over_tiny_training"] == pytest.approx(
      r["token_examples_per_s"] / r["tiny_training_examples_per_s"], rel=0.02)


def test_tokenizer_throughput_reports_encode_decode_and_train_step():
  r = _last_json(["benchmarks/tokenizer_throughput.py", "--config", "configs/vitvqgan_tiny.py",
                  "--steps", "2", "--config.global_batch_size=8"])
  assert (r["global_batch"], r["resolution"], r["grid"], r["num_devices"]) == (8, 32, 4, 8)
  assert r["encode_images_per_s"] == pytest.approx(8 / r["encode_s"])
  assert r["train_images_per_s"] == pytest.approx(8 / r["train_step_s"])
  assert r["losses"] == ["l2", "logit_laplace"]


def test_sampling_benchmark_reports_steps_floors_and_sjd_consistently(tmp_path):
  r = _last_json(["benchmarks/sampling.py", "--config", "configs/parti_tiny.py",
                  "--batch_sizes", "1,8", "--sjd_images", "8", "--reps", "1",
                  "--trace", str(tmp_path)])
  # The decode profile: one guided generation per batch size, summarised by operation group.
  profile = _last_json(["benchmarks/profile_summary.py", "--trace", str(tmp_path / "b8" / "trace"),
                        "--hlo", str(tmp_path / "b8" / "hlo.txt")])
  assert profile["groups"]["matmuls"]["ms"] > 0 and profile["groups"]["attention"]["ms"] > 0
  n = r["image_tokens"]
  assert [(run["batch"], run["guidance"]) for run in r["runs"]] == [
      (1, 1.0), (1, 3.0), (8, 1.0), (8, 3.0)]
  for run in r["runs"]:
    assert run["ms_per_step"] == pytest.approx(
        (run["generate_ms"] - run["prefill_ms"]) / n, rel=1e-6)
    assert run["step_over_floor"] == pytest.approx(run["ms_per_step"] / run["floor_ms_per_step"])
    rows = run["batch"] * (2 if run["guidance"] != 1.0 else 1)
    # 2 layers x rows x (keys, values) x 4 heads of 16 x float32 x (16 image + 16 text tokens)
    assert run["kv_cache_bytes_per_device"] * run["devices"] == 2 * rows * 2 * 64 * 4 * (16 + 16)
    # The filled floor: on average (16 + 1) / 2 image positions of the self-attention cache.
    assert run["filled_kv_cache_bytes_per_device"] * run["devices"] == pytest.approx(
        2 * rows * 2 * 64 * 4 * (8.5 + 16))
    assert run["step_over_filled_floor"] == pytest.approx(
        run["ms_per_step"] / run["filled_floor_ms_per_step"])
    assert run["filled_floor_ms_per_step"] < run["floor_ms_per_step"]
    assert run["xla_step_bytes"] > 0
    assert run["xla_step_bytes_over_floor_bytes"] == pytest.approx(
        run["xla_step_bytes"] / (run["weight_bytes"] + run["kv_cache_bytes_per_device"]))
    sjd = run["sjd"]
    assert 1 <= sjd["forwards_per_image"] <= n
    assert sjd["forward_ratio"] == pytest.approx(n / sjd["forwards_per_image"])
    tag = f"b{run['batch']}_{'guided' if run['guidance'] != 1.0 else 'unguided'}"
    assert r["goals"][f"step_over_floor_{tag}"] == run["step_over_floor"]
    assert r["goals"][f"step_over_filled_floor_{tag}"] == run["step_over_filled_floor"]


def test_sampling_benchmark_can_time_the_guided_step_alone():
  """--nounguided --sjd_images 0: one run per batch size, guided, and no SJD figures."""
  r = _last_json(["benchmarks/sampling.py", "--config", "configs/parti_tiny.py",
                  "--batch_sizes", "8", "--sjd_images", "0", "--reps", "1", "--nounguided",
                  "--config.model.scan_unroll=2"])
  assert [(run["batch"], run["guidance"]) for run in r["runs"]] == [(8, 3.0)]
  assert "sjd" not in r["runs"][0] and r["scan_unroll"] == 2
  assert sorted(r["goals"]) == ["step_over_filled_floor_b8_guided", "step_over_floor_b8_guided"]


def test_gpu_figures_script_keeps_to_its_time_budget_and_named_benchmarks(tmp_path):
  """With no time left every named benchmark is reported skipped, and only those."""
  out = subprocess.run(["bash", "benchmarks/gpu_figures.sh", str(tmp_path), "0", "tokenizer",
                        "train_xla"], cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.log", "train_xla.log"]
  assert (tmp_path / "tokenizer.log").read_text().startswith("== tokenizer: skipped")


@pytest.mark.parametrize("script", sorted(
    str(p.relative_to(ROOT)) for d in ("benchmarks", "scripts") for p in (ROOT / d).glob("*.py")))
def test_every_benchmark_and_script_answers_help(script):
  """All are on parti_jax.cli: the docstring, then the flags, and exit 0."""
  out = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert "flags:" in out.stdout, out.stdout[-3000:]
