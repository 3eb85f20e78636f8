"""The ahead-of-time planner: slice names, the verdict, and real TPU compiles of a tiny config.

The compiles need libtpu (`pip install -e '.[tpu]'`) and are skipped without it.
"""

import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from conftest import load_config
from parti_jax import aot, topologies
from parti_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]')")


def test_slice_names_follow_cloud_tpu():
  v5p = topologies.get("v5p-256")  # v5p names count TensorCores: 128 chips
  assert (v5p.chips, v5p.topology, v5p.hbm_bytes) == (128, "v5:4x4x8", 95 * 2 ** 30)
  assert topologies.get("v4-8").topology == "v4:2x2x1"
  assert topologies.get("v4-1024").chips == 512
  assert topologies.get("v5e-16").topology == "v5e:4x4"  # v5e and v6e names count chips
  assert topologies.get("v5litepod-16") == topologies.get("v5e-16")
  assert topologies.get("v6e-256").topology == "v6e:16x16"


@pytest.mark.parametrize("name", ["v7-8", "v5p-6", "v4-3", "tpu"])
def test_unknown_slices_are_refused_with_the_known_ones(name):
  with pytest.raises(topologies.UnknownTopology, match="known: .*v5p-256"):
    topologies.get(name)


def test_verdict_names_the_overflow():
  gib = 2 ** 30
  memory = dict(arguments=2 * gib, outputs=2 * gib, aliased=2 * gib, temporaries=30 * gib,
                generated_code=0, total=32 * gib)
  assert aot.overflow(memory, 32 * gib) == []
  [message] = aot.overflow(memory, 16 * gib)
  assert "exceeds" in message and "16.00 GiB" in message and "temporaries 30.00 GiB" in message


@needs_libtpu
# The tests' persistent compilation cache (conftest) keeps executables it can load only
# onto real devices; for a compile-only TPU program it warns and compiles again.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_tiny_config_fits_a_small_slice_and_flops_agree():
  report = aot.plan(load_config("parti_tiny"), "v5e-8")
  assert report["fits"] and report["overflow"] == []
  assert report["mesh"] == dict(data=1, fsdp=8, tensor=1)
  memory = report["memory"]
  assert 0 < memory["total"] <= report["hbm_bytes"] == 16 * 2 ** 30
  # The state is donated: the new state reuses its buffers.
  assert memory["aliased"] > 0.9 * memory["arguments"] - 2 ** 16
  # Loop bodies (the scanned layers) counted per iteration: the compiler's FLOPs are the
  # analytic ones plus elementwise work and the masked half of causal attention. (Each
  # loop body counted once, as XLA's own total does, would give about 0.6.)
  ratio = report["compiler_flops_per_device"] / report["analytic_flops_per_device"]
  assert 1 - aot.FLOPS_TOLERANCE < ratio < 1 + aot.FLOPS_TOLERANCE, ratio


@needs_libtpu
def test_the_sampler_decode_step_plans_the_same_way():
  report = aot.plan(load_config("parti_tiny"), "v5e-8", mode="sample")
  assert report["mode"] == "sample" and report["fits"]
  assert 0 < report["memory"]["total"] <= report["hbm_bytes"]
  assert report["memory"]["aliased"] > 0  # the decoding state (the KV cache) is donated


@needs_libtpu
def test_the_plan_leaves_nothing_in_the_persistent_compilation_cache(tmp_path):
  """An executable for chips this host lacks cannot be read back from JAX's persistent cache
  (JAX warned, then compiled again): the planner writes none there."""
  cache = tmp_path / "cache"
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  done = subprocess.run([sys.executable, "-m", "parti_jax.aot", "--config=configs/parti_tiny.py",
                         "--topology=v5e-8", "--mode=sample", "--json"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert json.loads(done.stdout.splitlines()[-1])["fits"]
  assert not list(cache.glob("*-cache")), list(cache.iterdir())
  # The setting is the caller's again afterwards.
  was = jax.config.jax_persistent_cache_min_compile_time_secs
  assert aot.plan(load_config("parti_tiny"), "v5e-8", mode="sample")["fits"]
  assert jax.config.jax_persistent_cache_min_compile_time_secs == was


@needs_libtpu
def test_a_config_that_cannot_fit_exits_non_zero_naming_the_overflow():
  # A 16.8M-entry text vocabulary at width 512: 8.6B embedding parameters, over 100 GB
  # with their AdamW moments and gradients, on one v5e chip of 16 GiB. The compiler
  # refuses it, and the planner reports the compiler's sizes.
  done = subprocess.run(
      [sys.executable, "-m", "parti_jax.aot", "--config=configs/parti_tiny.py",
       "--topology=v5e-1", "--json", "--config.model.text_vocab_size=16777216",
       "--config.model.d_model=512"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == aot.DOES_NOT_FIT, done.stderr[-2000:]
  report = json.loads(done.stdout.splitlines()[-1])
  assert report["fits"] is False and report["chips"] == 1
  assert "HBM" in report["overflow"][0] and "G)" in report["overflow"][0], report["overflow"]


def test_refused_before_compiling():
  config = load_config("parti_tiny")
  config.mesh.tensor = 3
  with pytest.raises(config_lib.ConfigError, match="mesh"):
    aot.plan(config, "v5e-8")
  with pytest.raises(topologies.UnknownTopology):
    aot.plan(load_config("parti_tiny"), "v5e-12")


# ----------------------------------------------------------------------------- several slices

def test_the_data_axis_must_split_over_the_slices():
  config = load_config("parti_tiny")
  config.mesh.num_slices = 2  # mesh.data is 1: nothing to split across two slices
  with pytest.raises(config_lib.ConfigError, match="mesh.data=1 is not divisible by "
                     "mesh.num_slices=2"):
    config_lib.check(config, 8)
  config.mesh.data = 2
  assert config_lib.check(config, 8) == (2, 4, 1)


@needs_libtpu
def test_two_slices_put_the_data_axis_across_them():
  from parti_jax import sharding
  devices = topologies.get("v4-16").devices(num_slices=2)  # 2 x 8 chips, 2 hosts each
  assert sorted({d.slice_index for d in devices}) == [0, 1]
  config = load_config("parti_tiny")
  config.mesh.update(data=2, fsdp=-1, tensor=2, num_slices=2)
  mesh = sharding.make_mesh(config, devices)
  assert dict(mesh.shape) == dict(data=2, fsdp=4, tensor=2)
  # Each data index is one slice: fsdp and tensor never leave a slice.
  for i, block in enumerate(mesh.devices):
    assert {d.slice_index for d in block.flat} == {i}
  config.mesh.num_slices = 1  # jax.make_mesh cannot lay out several slices
  with pytest.raises(config_lib.ConfigError, match="set mesh.num_slices=2"):
    sharding.make_mesh(config, devices)


@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_tiny_config_plans_over_two_slices():
  config = load_config("parti_tiny")
  config.mesh.data = 2
  report = aot.plan(config, "v4-8", num_slices=2)
  assert report["fits"] and (report["num_slices"], report["chips"]) == (2, 8)
  assert report["mesh"] == dict(data=2, fsdp=4, tensor=1)
  assert config.mesh.num_slices == 1  # the caller's config is left as it was
  with pytest.raises(config_lib.ConfigError, match="mesh.num_slices=2"):
    aot.plan(load_config("parti_tiny"), "v4-8", num_slices=2)  # mesh.data=1


# ----------------------------------------------------------------------------- input layout

@needs_libtpu
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_a_tensor_axis_across_hosts_plans_replica_readers(capsys):
  # v5e-16: 16 chips on 4 hosts. tensor=8 spans two hosts, so each half of the global
  # batch (fsdp=2) is read, whole, by the 2 hosts of its tensor group.
  config = load_config("parti_tiny")
  config.model.num_heads = 8
  config.mesh.update(data=1, fsdp=2, tensor=8)
  report = aot.plan(config, "v5e-16")
  assert report["input_layout"] == dict(hosts=4, rows_per_host=4, row_sets=2, hosts_per_row=2,
                                        valid=True)
  assert report["fits"]
  aot.print_report(report, "parti_tiny")
  assert "each reads 4 of the 8 rows of a global batch; 2 row sets, each read by 2 hosts" in \
      capsys.readouterr().out


def _scaling_table():
  """scripts/scaling_table.py, which writes docs/scaling.md and reads its plans back."""
  spec = importlib.util.spec_from_file_location(
      "scaling_table", os.path.join(REPO, "scripts", "scaling_table.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@needs_libtpu
def test_every_plan_of_the_scaling_page_can_be_fed():
  """The loader's own layout functions, on each slice's hosts (4 chips per host on v4 and
  v5p, up to 8 on v5e and v6e): every plan feeds, and those whose model axes span hosts
  have replica hosts reading the same rows."""
  from parti_jax import sharding
  plans = _scaling_table().read_plans()
  assert len(plans) == 12
  replicas = {}
  for plan in plans:
    model, name = plan["model"], plan["topology"]
    config = load_config(f"parti_{model}")
    config.mesh.update(plan["mesh"])
    mesh = sharding.make_mesh(config, topologies.get(name).devices())
    layout = aot.input_layout(config, mesh)
    assert layout["valid"] and layout["rows_per_host"] * layout["row_sets"] == 8192
    replicas[model, name] = layout["hosts_per_row"]
  # The tensor axis spans hosts (4 chips each on v4), which read the same rows: 20B on
  # v4-1024 (tensor 8) over 4 hosts, on v4-512 (tensor 4) over 2.
  assert replicas["20b", "v4-1024"] == 4 and replicas["20b", "v4-512"] == 2
  assert replicas["20b", "v5p-256"] == 8
  assert replicas["350m", "v4-16"] == 1  # pure data parallelism: every host its own rows
  assert sum(r > 1 for r in replicas.values()) == 6


def test_rewriting_the_tpu_table_keeps_the_comparison_and_the_gpu_section(tmp_path):
  """The page's sections come from three runs of scripts/scaling_table.py (the TPU table,
  --compare, --gpus); each rewrites its own part and leaves the others as they are."""
  table = _scaling_table()
  page = str(tmp_path / "scaling.md")
  plan = dict(data=8, fsdp=1, tensor=1, remat="none", accum=64)
  report = dict(memory=dict(total=30 * 2 ** 30), compile_s=20.0,
                compiler_flops_per_device=0.93, analytic_flops_per_device=1.0)
  tpu_row = dict(model="350m", topology="v4-16", chips=8, hbm=32 * 2 ** 30, generation="v4",
                 compiles=1, plan=plan, report=report, tried=[dict(compile_s=20.0, total=1.0)])
  gpu_report = dict(report, roofline=dict(least_step_s=12.345, mfu_at_most=0.4))
  gpu_row = dict(tpu_row, topology="h100-8", hosts=1, generation=None, report=gpu_report)
  table.write_doc([tpu_row], page)
  table.write_section(table.gpu_lines([gpu_row]), table.GPUS_BEGIN, table.GPUS_END, page)
  candidate = table.Candidate(8, 1, 1, "none", 64)
  table.write_comparison([dict(model="350m", topology="v4-16", hbm=32 * 2 ** 30,
                               results=[(candidate, dict(report, fits=True))])], page)
  first = open(page).read()
  assert first.count("## NVIDIA GPUs") == first.count("## Attention and momentum") == 1
  assert "| 350m | h100-8 | 1 | (8, 1, 1) | none | 64 | 16 | 30.0 |" in first
  # GPU plans carry their roofline, in its own column: as many cells as the header has.
  gpu_lines = [line for line in first.splitlines() if "| h100-8 |" in line
               or line.startswith("| model | GPUs |")]
  assert "| 0.93 | 12.35, 0.40 | 20 |" in gpu_lines[1]
  assert gpu_lines[0].count("|") == gpu_lines[1].count("|")
  table.write_doc([dict(tpu_row, topology="v4-32", chips=16)], page)  # a new TPU table
  second = open(page).read()
  assert "| 350m | v4-32 | 16 |" in second and "| 350m | v4-16 | 8 |" not in second
  for section in ("## NVIDIA GPUs", "## Attention and momentum"):
    assert second.count(section) == 1
    assert second.index(section) < second.index("## Several slices")
  assert "| 350m | h100-8 | 1 | (8, 1, 1) | none | 64 | 16 | 30.0 |" in second
  # The plans read back are the TPU table's, not the GPU rows.
  assert [p["topology"] for p in table.read_plans(page)] == ["v4-32"]
