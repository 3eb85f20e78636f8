"""The planner on NVIDIA GPUs: XLA's GPU compiler, through JAX's CUDA plugin, compiles the
trainer's step and the sampler's decode step for H100s and H200s on this CPU host.

The compiles need the plugin and cuDNN (`pip install -e '.[gpu_plan]'`, part of the test
extras) and are skipped without them.
"""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from conftest import ROOT, load_config
from helpers import whole_cache_copies
from parti_jax import aot, sharding, topologies
from parti_jax import config as config_lib

# The tests' persistent compilation cache (conftest) keeps executables it can load only onto
# real devices; for a compile-only GPU program it warns and compiles again.
pytestmark = pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec("jax_plugins.xla_cuda13") is None
    or importlib.util.find_spec("nvidia.cudnn") is None,
    reason="JAX's CUDA plugin or cuDNN is not installed (pip install -e '.[gpu_plan]')")


@pytest.fixture(autouse=True)
def jax_default_memory_share(monkeypatch):
  """Each test starts from JAX's default share of a card, whatever the shell sets."""
  for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
               "XLA_PYTHON_CLIENT_ALLOCATOR"):
    monkeypatch.delenv(name, raising=False)


def tiny_bf16():
  config = load_config("parti_tiny")
  config.model.dtype = "bfloat16"  # cuDNN's fused attention wants 16-bit matmuls
  return config


def test_gpu_machines_are_hosts_of_eight(monkeypatch):
  one = topologies.get("h200-1")
  assert (one.chips, one.hosts, one.topology) == (1, 1, "1x1x1")
  two_hosts = topologies.get("H100-16")
  assert (two_hosts.name, two_hosts.hosts, two_hosts.topology) == ("h100-16", 2, "1x2x8")
  # A step may use JAX's share of the card: 75% unless the environment says otherwise.
  assert one.hbm_bytes == int(0.75 * topologies.GPUS["h200"].memory_bytes)
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
  assert one.hbm_bytes == int(0.95 * topologies.GPUS["h200"].memory_bytes)


@pytest.mark.parametrize("environ, fraction", [
    ({}, 0.75), ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ""}, 0.75),  # empty is unset, for JAX too
    ({"XLA_CLIENT_MEM_FRACTION": "0.9"}, 0.9), ({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".5"}, 0.5),
    ({"XLA_PYTHON_CLIENT_ALLOCATOR": "platform", "XLA_CLIENT_MEM_FRACTION": "0.5"}, 1.0),
])
def test_jax_share_of_the_card_is_read_as_jax_reads_it(environ, fraction):
  assert topologies.jax_memory_fraction(environ)[0] == fraction


@pytest.mark.parametrize("environ, message", [
    ({"XLA_PYTHON_CLIENT_MEM_FRACTION": "0"}, "XLA_PYTHON_CLIENT_MEM_FRACTION='0'"),
    ({"XLA_CLIENT_MEM_FRACTION": "1.5"}, "XLA_CLIENT_MEM_FRACTION='1.5'"),
    ({"XLA_CLIENT_MEM_FRACTION": "most"}, "in \\(0, 1\\]"),
    ({"XLA_CLIENT_MEM_FRACTION": "0.9", "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"}, "both set"),
])
def test_an_unusable_memory_share_is_refused_naming_it(monkeypatch, environ, message):
  for name, value in environ.items():
    monkeypatch.setenv(name, value)
  with pytest.raises(topologies.BadEnvironment, match=message):
    aot.plan(tiny_bf16(), "h200-1")


def test_the_command_exits_2_with_the_reason_in_json(monkeypatch, capsys):
  monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "none")
  with pytest.raises(SystemExit) as exit_:
    aot.main(["aot", "--config=configs/parti_tiny.py", "--topology=h100-8", "--json"])
  assert exit_.value.code == aot.REFUSED
  out = json.loads(capsys.readouterr().out.splitlines()[-1])
  assert out["topology"] == "h100-8" and "XLA_CLIENT_MEM_FRACTION='none'" in out["refused"]


@pytest.mark.parametrize("name", ["h100-3", "h100-12", "h300-8", "h100-0"])
def test_unknown_gpu_machines_are_refused_with_the_known_ones(name):
  with pytest.raises(topologies.UnknownTopology, match="known: .*h100-N"):
    topologies.get(name)


def test_gpu_machines_are_not_slices():
  config = load_config("parti_tiny")
  config.mesh.update(data=2, num_slices=2)
  with pytest.raises(config_lib.ConfigError, match="mesh.num_slices=2.*h100-16"):
    aot.plan(config, "h100-16")


@needs_cuda_plugin
@pytest.mark.parametrize("machine, kind", [("h100-8", "NVIDIA H100 80GB HBM3"),
                                           ("a100-16", "NVIDIA A100-SXM4-80GB")])
def test_each_gpu_model_gives_its_compiler_devices(machine, kind):
  devices = topologies.get(machine).devices()
  assert [d.device_kind for d in devices] == [kind] * topologies.get(machine).chips
  assert [d.process_index for d in devices] == [i // 8 for i in range(len(devices))]


@needs_cuda_plugin
def test_tiny_parti_compiles_for_8_gpus_with_cudnn_attention():
  machine = "h100-8"
  report = aot.plan(tiny_bf16(), machine)
  assert report["platform"] == "gpu" and report["device_kind"] == "NVIDIA H100 80GB HBM3"
  assert report["mesh"] == dict(data=1, fsdp=8, tensor=1) and report["fits"]
  # `auto` picks cuDNN on these devices; the compiled step calls its kernel forward and
  # backward for the encoder's, the decoder's and the cross-attention, and forward once more
  # under remat `dots` (`auto` on a GPU), which keeps matrix products only: cuDNN's call is
  # recomputed in the backward pass.
  assert report["attention"] == "cudnn" and report["remat"] == "dots"
  assert report["cudnn_attention_kernels"] == 9
  memory = report["memory"]
  card = topologies.GPUS[machine.split("-")[0]].memory_bytes
  assert 0 < memory["total"] <= report["hbm_bytes"] == int(0.75 * card)
  assert memory["aliased"] > 0.9 * memory["arguments"] - 2 ** 16  # the state is donated


@needs_cuda_plugin
def test_xla_attention_on_a_gpu_has_no_cudnn_kernel_and_its_flops_agree():
  config = tiny_bf16()
  config.model.attention_impl = "xla"
  report = aot.plan(config, "h100-1")
  assert report["attention"] == "xla" and report["cudnn_attention_kernels"] == 0
  # cuDNN's kernels are custom calls XLA does not count; without them, the compiler's
  # count meets the analytic one as on a TPU.
  ratio = report["compiler_flops_per_device"] / report["analytic_flops_per_device"]
  assert 1 - aot.FLOPS_TOLERANCE < ratio < 1 + aot.FLOPS_TOLERANCE, ratio


@needs_cuda_plugin
def test_the_sampler_plans_on_a_gpu_and_too_small_a_share_does_not_fit(monkeypatch):
  report = aot.plan(tiny_bf16(), "h200-1", mode="sample")
  assert report["fits"] and report["memory"]["aliased"] > 0  # the donated KV cache
  # A few queries per step: XLA's attention, whatever the training step uses.
  assert report["attention"] == "xla" and report["cudnn_attention_kernels"] == 0
  # The same step against a share of the card smaller than it needs.
  monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "1e-6")
  report = aot.plan(tiny_bf16(), "h200-1", mode="sample")
  assert report["fits"] is False and report["memory_fraction"] == 1e-6
  assert "exceeds JAX's share of a GPU's memory" in report["overflow"][0]


@needs_cuda_plugin
def test_a_tensor_axis_within_each_host_and_fsdp_across_two_hosts():
  config = tiny_bf16()
  config.mesh.update(data=1, fsdp=2, tensor=8)
  config.model.update(num_heads=8, mlp_dim=256)  # the tensor axis splits heads and MLP
  report = aot.plan(config, "h100-16")
  assert report["chips"] == 16 and report["fits"]
  # Each host's eight GPUs hold the tensor axis (over NVLink); the two hosts each read
  # their own half of every batch.
  layout = report["input_layout"]
  assert (layout["hosts"], layout["rows_per_host"], layout["hosts_per_row"]) == (2, 4, 1)
  devices = topologies.get("h100-16").devices()
  mesh = sharding.make_mesh(config, devices)
  for row in mesh.devices.reshape(-1, 8):  # (data x fsdp) rows of the tensor axis
    assert len({d.process_index for d in row}) == 1


@needs_cuda_plugin
def test_the_gpu_decode_step_updates_the_kv_cache_in_place():
  """The sampler's decode step as the GPU compiler builds it: the caches are donated and
  written where they lie (scatter fusions into the cache buffers), never copied whole."""
  config = tiny_bf16()
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config, topologies.get("h200-1").devices(), training=False)
  copies, aliased, cache_bytes = whole_cache_copies(config, mesh, 8)
  assert aliased >= cache_bytes > 0
  assert copies == [], copies[:3]


@needs_cuda_plugin
def test_the_plan_bounds_the_step_time_by_its_roofline(tmp_path):
  """The planner's least step time on the card (parti_jax.roofline), the program it priced
  kept with --hlo_out, and the same figure from benchmarks/profile_summary.py --roofline."""
  hlo = tmp_path / "step.hlo"
  report = aot.plan(tiny_bf16(), "h200-1", hlo_out=str(hlo))
  r = report["roofline"]
  spec = topologies.GPUS["h200"]
  assert (r["bandwidth"], r["peak_flops"]) == (spec.bandwidth_bytes_per_s, 989e12)
  assert 0 < r["mfu_at_most"] < 1
  assert r["loops_counted_once"] == 0  # the layers' scans have trip counts the compiler knows
  # Its products are the model's: within the planner's tolerance of the analytic count
  # (cuDNN's attention included, which XLA's own count leaves out).
  ratio = r["flops"] / report["analytic_flops_per_device"]
  assert 1 - aot.FLOPS_TOLERANCE < ratio < 1 + aot.FLOPS_TOLERANCE, ratio
  assert "__cudnn$fmha" in hlo.read_text()
  # The decoder's dense causal mask reaches cuDNN as its causal mask type, not as a bias.
  assert re.search(r'"mask_type":\s*"CAUSAL"', hlo.read_text())
  done = subprocess.run(
      [sys.executable, "benchmarks/profile_summary.py", "--hlo", str(hlo), "--roofline", "h200"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  summary = json.loads(done.stdout.strip().splitlines()[-1])
  assert summary["total_ms"] == pytest.approx(1e3 * r["least_step_s"], rel=1e-6)
  assert summary["groups"]["matmuls"]["ms"] > 0 and summary["groups"]["attention"]["ms"] > 0

  # Parti's default remat, `auto`, is `dots` on a GPU (BENCHMARKS.md, the 350M roofline and
  # the card's figures): the step keeps only the matrix products' outputs for the backward
  # pass and recomputes the elementwise work in the backward's own kernels, so it moves
  # fewer bytes than without remat.
  assert tiny_bf16().model.remat == "auto" and report["remat"] == "dots"
  config = tiny_bf16()
  config.model.remat = "none"
  assert aot.plan(config, "h200-1")["roofline"]["bytes"] > r["bytes"]


@needs_cuda_plugin
def test_a_decode_step_attending_half_the_cache_reads_half_its_self_attention_cache():
  """The generation's segments (parti_jax.decoding) as the GPU compiler builds them: a step
  whose self-attention reads the cache's first 8 of 16 positions moves, by the roofline,
  at least half the self-attention cache's bytes fewer than a whole-cache step: the other
  half is not read. (More: the scores over fewer positions are smaller too, and at the tiny
  model's shapes the compiler fuses the shorter attention differently.)"""
  config = tiny_bf16()
  whole = aot.plan(config, "h200-1", mode="sample")
  half = aot.plan(config, "h200-1", mode="sample", attend_length=8)
  assert half["attend_length"] == 8 and whole["attend_length"] is None
  m, rows = config.model, 2 * config.global_batch_size  # guided: twice the rows
  self_cache = 2 * m.decoder_layers * rows * 16 * m.d_model * 2  # keys and values, bf16
  saved = whole["roofline"]["bytes"] - half["roofline"]["bytes"]
  assert saved >= self_cache / 2, (saved, self_cache)
  with pytest.raises(config_lib.ConfigError, match="attend_length=17 is outside"):
    aot.plan(config, "h200-1", mode="sample", attend_length=17)
  with pytest.raises(config_lib.ConfigError, match="--mode sample"):
    aot.plan(config, "h200-1", attend_length=8)


@needs_cuda_plugin
def test_remat_still_recomputes_with_every_layer_unrolled():
  """`model.scan_unroll` = the stacks' depth leaves no loop between the forward and the
  backward pass. Remat must still recompute there: without the barrier (prevent_cse), XLA
  merged the recomputed forward into the first one, and `dots` compiled to the program
  without remat."""
  plans = {}
  for remat in ("none", "dots"):
    config = tiny_bf16()
    config.model.update(remat=remat, scan_unroll=config.model.decoder_layers)
    assert config.model.encoder_layers == config.model.decoder_layers
    plans[remat] = aot.plan(config, "h200-1")
  none, dots = plans["none"], plans["dots"]
  # cuDNN's attention, counted once per layer now: the encoder's self-attention and the
  # decoder's self- and cross-attention, forward and backward, 2 layers each (12 calls);
  # `dots` keeps only matrix products, so it calls the forward kernels again (6 more).
  assert none["cudnn_attention_kernels"] == 12
  assert dots["cudnn_attention_kernels"] == 18
  assert dots["roofline"]["flops"] > none["roofline"]["flops"]
  assert dots["memory"]["temporaries"] < none["memory"]["temporaries"]
