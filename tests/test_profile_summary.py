"""benchmarks/profile_summary.py on a CPU trace of two tiny train steps: every group the
model has is found, shares add up, and what the HLO adds over the trace's names alone."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "profile_summary.py"


def summary(*args):
  done = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  return done.stdout, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def captured(tmp_path_factory):
  """Two traced steps of the tiny Parti with dropout (random bits) and Adafactor."""
  out = tmp_path_factory.mktemp("profile")
  text, s = summary("--capture", str(out), "--config", "configs/parti_tiny.py", "--steps", "2",
                    "--config.model.dropout_rate=0.1", "--config.optimizer.name=adafactor",
                    "--config.model.loss_chunk=4")
  return out, text, s


def test_every_group_of_the_step_is_found_and_the_shares_add_up(captured):
  """And without the HLO, only collectives and copies, which the trace names as such."""
  out, text, s = captured
  assert (out / "hlo.txt").is_file() and list((out / "trace").glob("plugins/profile/*/*.xplane.pb"))
  assert s["source"] == "host threads (XLA:CPU thunks)" and s["total_ms"] > 0
  groups = s["groups"]
  for group in ("matmuls", "attention", "layer norms", "loss", "optimizer", "random bits",
                "collectives", "copies"):
    assert groups[group]["ms"] > 0, (group, groups)
  assert sum(g["share"] for g in groups.values()) == pytest.approx(1.0)
  assert sum(g["ms"] for g in groups.values()) == pytest.approx(s["total_ms"])
  assert len(s["top"]) == 15 and s["top"][0]["ms"] >= s["top"][-1]["ms"]
  assert "random bits" in text and "layer norms" in text  # the printed table

  # Without the HLO only the trace's names group the operations (one test: one capture).
  with_hlo = s
  _, s = summary("--trace", str(out / "trace"))
  assert s["total_ms"] == pytest.approx(with_hlo["total_ms"])
  # Collectives and copies are named so in the trace; the model's places need the HLO.
  assert s["groups"]["collectives"]["ms"] > 0 and s["groups"]["copies"]["ms"] > 0
  for group in ("attention", "layer norms", "optimizer"):
    assert s["groups"][group]["ms"] == 0


def test_the_roofline_sits_beside_the_measured_groups(captured):
  """--roofline prices the traced program's kernels (here at an H200's spec: only the
  arithmetic is checked) and prints, group by group, the least time against the measured."""
  out, _, measured = captured
  text, s = summary("--trace", str(out / "trace"), "--hlo", str(out / "hlo.txt"),
                    "--roofline", "h200")
  assert s["total_ms"] == pytest.approx(measured["total_ms"])  # the same trace, read again
  least = s["roofline"]
  assert least["total_ms"] > 0 and least["groups"]["matmuls"]["ms"] > 0
  assert sum(g["ms"] for g in least["groups"].values()) == pytest.approx(least["total_ms"])
  assert "least/measured" in text
  # Alone, the roofline needs no trace; `auto` names the card only when one was traced.
  _, alone = summary("--hlo", str(out / "hlo.txt"), "--roofline", "h200")
  assert alone["total_ms"] == pytest.approx(least["total_ms"])
  done = subprocess.run([sys.executable, str(SCRIPT), "--hlo", str(out / "hlo.txt"),
                         "--roofline", "auto"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 1 and "--roofline auto needs --capture" in done.stderr


def test_a_directory_without_a_trace_is_refused_in_one_line(tmp_path):
  done = subprocess.run([sys.executable, str(SCRIPT), "--trace", str(tmp_path)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 1
  assert done.stderr.strip().splitlines()[-1] == \
      f"error: no *.xplane.pb under {tmp_path} (a jax.profiler trace directory)"


H200_TRACE = ROOT / "tests" / "data" / "h200_trace"


def test_a_gpu_trace_groups_its_kernels_by_what_they_ran(tmp_path):
  """A real trace of one tiny bf16 train step on an H200 (jax 0.11.2, cuDNN attention;
  tests/data/h200_trace/README.md). XLA:GPU runs most kernels inside command buffers, where
  the trace names the buffer, not the operation: kernels are grouped by their own names
  (XLA's fusions mapped back to the compiled HLO, cuDNN's attention and cuBLAS by name)."""
  import lzma
  run = tmp_path / "trace" / "plugins" / "profile" / "2026_12_04_17_06_21"
  run.mkdir(parents=True)
  (run / "vm.xplane.pb").write_bytes(
      lzma.decompress((H200_TRACE / "tiny_step.xplane.pb.xz").read_bytes()))
  hlo = tmp_path / "hlo.txt"
  hlo.write_bytes(lzma.decompress((H200_TRACE / "tiny_step.hlo.txt.xz").read_bytes()))

  _, alone = summary("--trace", str(tmp_path / "trace"))
  assert alone["source"].startswith("device planes") and alone["total_ms"] > 0
  groups = alone["groups"]
  # By kernel name alone: cuDNN's fused attention, cuBLAS's and Triton's products, copies.
  for group in ("attention", "matmuls", "copies"):
    assert groups[group]["ms"] > 0, (group, groups)
  assert sum(g["ms"] for g in groups.values()) == pytest.approx(alone["total_ms"])

  text, s = summary("--trace", str(tmp_path / "trace"), "--hlo", str(hlo), "--roofline", "h200")
  assert s["total_ms"] == pytest.approx(alone["total_ms"])  # the same kernels, regrouped
  # With the HLO, fusion kernels are found as its instructions, and their stack frames
  # (jax 0.11 keeps flax's and optax's own frames inside ours) name the layer norms and
  # the optimizer's update.
  for group in ("layer norms", "optimizer"):
    assert s["groups"][group]["ms"] > 0 and groups[group]["ms"] == 0, group
  assert s["groups"]["other"]["ms"] < groups["other"]["ms"]
  assert any(t["op"].startswith("loop_") and "." in t["op"] for t in s["top"])  # HLO names
  # The roofline of the traced program: its scans' async in-place writes (fusion-start)
  # cost a layer's slice, so the least time stays under the measured one.
  least = s["roofline"]
  assert 0 < least["total_ms"] < s["total_ms"]
  assert "least/measured" in text


def test_an_instructions_functions_are_its_whole_stack_of_the_programs_own_frames():
  """parse_hlo follows each frame to its parent up to the entry point, and leaves out the
  libraries' frames (jax 0.11 keeps flax's and optax's): a layer norm on the card is made by
  `LayerNorm.__call__` inside the model, not by flax's `_normalize` alone."""
  import importlib.util
  import lzma
  spec = importlib.util.spec_from_file_location("profile_summary", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  hlo = module.parse_hlo(
      lzma.decompress((H200_TRACE / "tiny_step.hlo.txt.xz").read_bytes()).decode())
  norms = [i for i in hlo.values() if i.functions[:1] == ("LayerNorm.__call__",)]
  assert norms and all("Parti.__call__" in i.functions for i in norms)
  updates = [i for i in hlo.values() if i.functions[:1] == ("apply_gradients",)]
  assert updates and all("train_step" in i.functions for i in updates)
  assert not any(f in ("_normalize", "scale_by_adam.<locals>.update_fn")
                 for i in hlo.values() for f in i.functions)
