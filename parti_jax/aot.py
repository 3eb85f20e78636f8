"""Plans a run before renting the machines: compiles the trainer's step for them, here.

  python -m parti_jax.aot --config configs/parti_20b.py --topology v4-512 \
      [--num_slices K] [--config.FIELD=VALUE ...] [--json]
  python -m parti_jax.aot --config configs/parti_350m.py --topology h100-8

No accelerator is needed, only its compiler: for a TPU slice libtpu (`pip install -e
'.[tpu]'`), for NVIDIA GPUs JAX's CUDA plugin and cuDNN (`pip install -e '.[gpu_plan]'`).
The compiler builds the program for abstract devices laid out as the named machine
(parti_jax.topologies). What is compiled is what `parti_jax.train` runs: the same jitted
step, shardings and donated state, so the memory the compiler reserves on each device is
the memory the run needs. On GPUs a step fits in the share of the memory JAX's allocator
takes (XLA_CLIENT_MEM_FRACTION, formerly XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default
0.75), read from this environment as the run would read it from its own.

Prints how the hosts read each global batch (a layout the input pipeline cannot feed is
refused), the per-device memory (arguments, outputs, temporaries, generated code, their
total against the chip's HBM), the compiler's FLOPs per step next to the analytic count
behind MFU, on GPUs the least time the compiled step can take at the card's spec (its
roofline, parti_jax.roofline) and so the highest MFU it can reach, the compile time and a
verdict. `--hlo_out FILE` keeps the compiled program's text for reading. Exit status: 0
fits, 1 does not fit (the sizes that overflow are named), 2 refused before compiling: the
config, the machine's name, the memory fraction, or no compiler for the machine installed
here.

Another program plugs in as a mode: MODES[name](config, mesh) returns a Program, the
jitted function and its abstract arguments (ShapeDtypeStructs with shardings).
"""

import functools
import json
import re
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import ml_collections

from parti_jax import cli, flops, optim, roofline, sharding, tasks, topologies
from parti_jax import config as config_lib
from parti_jax.data import records
from parti_jax.models import layers

FITS, DOES_NOT_FIT, REFUSED = 0, 1, 2
# Without remat, the compiler's count exceeds the analytic one by the elementwise work
# and the masked half of causal attention that the analytic count leaves out (a few
# percent at the paper's sizes, 7% on the tiny test config). Remat adds most of a
# forward: 1.27x the analytic count for 20B with remat=full.
FLOPS_TOLERANCE = 0.25


class Program(NamedTuple):
  fn: Any  # jitted, with its in/out shardings and donation
  args: tuple  # abstract arguments
  flops: float | None = None  # analytic FLOPs of one call, all devices together


def train_program(config: ml_collections.ConfigDict, mesh) -> Program:
  """The step `parti_jax.train` compiles, with the state and batch it is called with."""
  task = tasks.build(config, mesh)
  return Program(task.train_step, (task.setup.abstract_state(), task.setup.abstract_batch()),
                 task.step_flops)


def sample_program(config: ml_collections.ConfigDict, mesh,
                   attend_length: int | None = None) -> Program:
  """The sampler's decode step (`parti_jax.decoding`) for `global_batch_size` prompts with
  classifier-free guidance (twice the rows) and its full-length KV cache; the donated
  decoding state is what the cache costs per chip. Its self-attention reads the whole
  cache, as the generation's last segment does, or its first `attend_length` positions,
  as the segment ending there does."""
  from parti_jax import decoding  # the sampler's programs, only when asked
  step, args = decoding.decode_step_and_args(config, mesh, config.global_batch_size,
                                             decoding.Settings(),  # guided by default
                                             attend_length=attend_length)
  return Program(step, args)


MODES: dict[str, Callable[[ml_collections.ConfigDict, Any], Program]] = {
    "train": train_program, "sample": sample_program}


def _compile_uncached(lowered):
  """`lowered.compile()`, kept out of JAX's persistent compilation cache: an executable for
  chips this host does not have cannot be loaded back from it (a later plan read it, warned
  and compiled again). Its entries are written only after compiles that took at least
  `jax_persistent_cache_min_compile_time_secs`; turning the cache off instead would not do,
  since JAX decides once per process whether it uses the cache."""
  setting = "jax_persistent_cache_min_compile_time_secs"
  was = getattr(jax.config, setting)
  jax.config.update(setting, float("inf"))
  try:
    return lowered.compile()
  finally:
    jax.config.update(setting, was)


def plan(config: ml_collections.ConfigDict, topology: str, mode: str = "train",
         num_slices: int | None = None, hlo_out: str | None = None,
         attend_length: int | None = None) -> dict:
  """Compiles `mode` of `config` for the machine named `topology`; the report as a dict.

  `num_slices` such TPU slices joined over DCN (default: config.mesh.num_slices, which a
  number given here replaces); `hlo_out`, a path to write the compiled program's text to;
  `attend_length`, for mode "sample" only: the cache positions the step attends.
  Raises topologies.UnknownTopology and config_lib.ConfigError before compiling,
  topologies.NoCompiler where the machine's compiler is not installed,
  topologies.BadEnvironment for an unusable memory fraction.
  """
  if attend_length is not None and mode != "sample":
    raise config_lib.ConfigError(f"attend_length is the decode step's (--mode sample), "
                                 f"not the {mode} program's")
  machine = topologies.get(topology)
  gpu = isinstance(machine, topologies.GpuMachine)
  # On a GPU, JAX's share of the card: the environment is checked before anything is built.
  fraction, fraction_source = topologies.jax_memory_fraction() if gpu else (None, None)
  hbm_bytes = machine.hbm_bytes
  if num_slices is not None:
    config = config.copy_and_resolve_references()
    config.mesh.num_slices = num_slices
  slices = int(config.mesh.get("num_slices", 1))
  if gpu and slices != 1:
    raise config_lib.ConfigError(
        f"mesh.num_slices={slices}: slices are TPU pods joined over DCN; {machine.name} is "
        f"one machine of {machine.hosts} host(s) (set mesh.num_slices=1)")
  chips = machine.chips * slices
  config_lib.check(config, chips)  # before building the devices: names a wrong mesh first
  devices = machine.devices(slices)
  try:
    mesh = sharding.make_mesh(config, devices)
  except NotImplementedError as e:  # as on the slice itself: the trainer builds this mesh
    if gpu:  # GPUs are laid out in order, not on a torus
      raise config_lib.ConfigError(f"the mesh {dict(config.mesh)} cannot be laid out on "
                                   f"{machine.name}: {_first_line(e)}") from e
    raise config_lib.ConfigError(
        f"the mesh {dict(config.mesh)} cannot be laid out on the {machine.name} torus "
        f"{'x'.join(map(str, machine.grid))}: every mesh axis (the data axis divided by "
        f"mesh.num_slices) must be a product of torus dimensions ({_first_line(e)})") from e
  layout = input_layout(config, mesh) if mode == "train" else None
  make = MODES[mode]
  if attend_length is not None:
    make = functools.partial(make, attend_length=attend_length)
  try:
    program = make(config, mesh)
  except ValueError as e:  # an attend_length outside the cache
    raise config_lib.ConfigError(str(e)) from e
  report = dict(
      mode=mode, topology=machine.name, compiler_topology=machine.topology,
      num_slices=slices, chips=chips, platform="gpu" if gpu else "tpu",
      device_kind=devices[0].device_kind, hbm_bytes=hbm_bytes,
      # On a GPU, hbm_bytes is JAX's share (this fraction) of the card's memory.
      memory_fraction=fraction, memory_fraction_source=fraction_source, mesh=dict(mesh.shape),
      global_batch_size=config.global_batch_size,
      grad_accum_steps=config.get("grad_accum_steps", 1),
      # "auto" as the step is compiled for these devices.
      remat=layers.resolve_remat(config.model.get("remat", "none"), devices[0]),
      sequence_parallel=bool(config.model.get("sequence_parallel", True)),
      input_layout=layout, memory={}, overflow=[], attend_length=attend_length,
      argument_bytes_estimate=_argument_bytes(program.args),
      momentum_bytes_per_device=(
          _argument_bytes(optim.momentum_leaves(program.args[0].opt_state))
          if mode == "train" else None),
      analytic_flops_per_device=program.flops and program.flops / chips)
  lowered = program.fn.lower(*program.args)
  # Counted on the program as handed to XLA: in the TPU-optimised program batched matmuls
  # become dilated convolutions, which XLA's cost model counts at well above their cost.
  hlo = lowered.as_text(dialect="hlo")
  report["compiler_flops_per_device"] = loop_aware_flops(hlo) / chips
  # Pallas kernels (splash attention) are Mosaic custom calls in the program.
  report["mosaic_kernels"] = hlo.count('custom_call_target="tpu_custom_call"')
  # The sampler's decode step attends a few queries at a time with XLA's attention.
  report["attention"] = _attention(config, devices[0]) if mode == "train" else "xla"
  start = time.perf_counter()
  try:
    compiled = _compile_uncached(lowered)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    # The compiler refuses a program that cannot fit; its message says by how much.
    report.update(compile_s=time.perf_counter() - start, fits=False, overflow=[_first_line(e)])
    return report
  report["compile_s"] = time.perf_counter() - start
  text = compiled.as_text()
  if hlo_out:
    records.atomic_write_text(hlo_out, text)
  if gpu:  # cuDNN's fused attention (forward, backward): custom calls once partitioned
    report["cudnn_attention_kernels"] = text.count('custom_call_target="__cudnn$fmha')
    report["roofline"] = _roofline(text, machine.spec, report["analytic_flops_per_device"])
  report["memory"] = memory = _memory(compiled.memory_analysis())
  report["overflow"] = overflow(memory, hbm_bytes,
                                "JAX's share of a GPU's memory" if gpu else "the HBM of a chip")
  report["fits"] = not report["overflow"]
  return report


def _roofline(text: str, gpu: topologies.Gpu, analytic_flops: float | None) -> dict:
  """The compiled step's bytes and FLOPs per device, the least time they take at the
  card's spec, and the MFU that time would give."""
  peak = flops.spec_peak_tflops(gpu.device_kind)[0] * 1e12
  r = roofline.of_hlo(text)
  least = r.seconds(peak, gpu.bandwidth_bytes_per_s)
  return dict(bytes=r.bytes, flops=r.flops, kernel_runs=sum(k.runs for k in r.kernels),
              loops_counted_once=r.loops_counted_once,
              peak_flops=peak, bandwidth=gpu.bandwidth_bytes_per_s, least_step_s=least,
              mfu_at_most=analytic_flops / (least * peak) if analytic_flops else None)


def _attention(config, device) -> str | None:
  """The attention `model.attention_impl` gives on the slice's chips (None: a model without)."""
  m = config.model
  if "attention_impl" not in m:
    return None
  from parti_jax.models import layers  # the model code, only to resolve the name
  try:
    return layers.attention_impl(m, device)
  except (AttributeError, KeyError):  # widths per stack (ViT-VQGAN, the dual encoder)
    if device.platform != "tpu":  # on a GPU, cuDNN's applies to heads of some widths only
      return f"{m.attention_impl} (resolved per stack by its head width)"
    # On a TPU the choice does not depend on the head width.
    return layers.resolve_attention(m.attention_impl, m.get("dtype", "float32"), 0, device)


def input_layout(config: ml_collections.ConfigDict, mesh) -> dict:
  """Which rows of each global batch the trainer's loader reads on each host of the slice
  (compile-only devices know their host), refused (ConfigError) where it cannot be fed."""
  batch = sharding.batch_sharding(mesh, sharding.rules_of(config))
  rows = sharding.rows_by_process(batch, config.global_batch_size)
  return sharding.check_input_layout(rows, config.global_batch_size)


def overflow(memory: dict, hbm_bytes: int, budget: str = "the HBM of a chip") -> list[str]:
  """What does not fit in `budget`, `hbm_bytes` per device (empty when everything does)."""
  if memory["total"] <= hbm_bytes:
    return []
  parts = ", ".join(f"{k} {_gib(memory[k])}" for k in ("arguments", "outputs", "temporaries")
                    if memory[k])
  return [f"total {_gib(memory['total'])} exceeds {budget} ({_gib(hbm_bytes)}) by "
          f"{_gib(memory['total'] - hbm_bytes)}: {parts}"]


def _memory(stats) -> dict:
  """Per-device bytes from the compiler's buffer assignment."""
  m = dict(arguments=stats.argument_size_in_bytes, outputs=stats.output_size_in_bytes,
           aliased=stats.alias_size_in_bytes, temporaries=stats.temp_size_in_bytes,
           generated_code=stats.generated_code_size_in_bytes)
  # Donated arguments share their buffers with the outputs: count those bytes once.
  m["total"] = (m["arguments"] + m["outputs"] - m["aliased"] + m["temporaries"]
                + m["generated_code"])
  return m


def _argument_bytes(args) -> int:
  def shard(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return 8  # a replicated RNG key
    return sharding.shard_bytes(x.shape, x.dtype, x.sharding)
  return sum(shard(x) for x in jax.tree.leaves(args))


def _first_line(error: Exception) -> str:
  return str(error).strip().splitlines()[0]


def _gib(n: float) -> str:
  return f"{n / 2 ** 30:.2f} GiB"


# ----------------------------------------------------------------------------- FLOPs

_WHILE = re.compile(r" while\(.*condition=%?([\w.\-]+), body=%?([\w.\-]+)")
_CALLS = re.compile(r"(?:calls|to_apply|true_computation|false_computation)=%?([\w.\-]+)"
                    r"|branch_computations=\{([^}]*)\}")


def loop_aware_flops(hlo_text: str) -> float:
  """XLA's FLOPs of an HLO module, with every loop body counted once per iteration.

  XLA's cost analysis counts a while loop's body once, and the layers run in scanned
  loops (inside the micro-batch loop with gradient accumulation). So each loop body is
  costed on its own, by the same analysis, and multiplied by its trip count: the bound
  of the loop's `counter < N` condition (jax's scan), else 1.
  """
  from jaxlib import _hlo, _jax  # XLA's HLO parser and cost analysis
  text = re.sub(r", metadata=\{[^}]*\}", "", hlo_text)  # source locations: not needed
  computations, entry = roofline.split_computations(text)
  client = jax.devices("cpu")[0].client
  costs = {}

  def cost(name):  # XLA's count for one computation (its loops' bodies once)
    if name not in costs:
      module = "\n\n".join(("ENTRY " if n == name else "") + t for n, t in computations.items())
      module = _hlo.hlo_module_from_text("HloModule part\n\n" + module)
      costs[name] = _jax.hlo_module_cost_analysis(client, module).get("flops", 0.0)
    return costs[name]

  def trip_count(condition):
    bounds = re.findall(r"constant\((\d+)\)", computations[condition])
    lt = "direction=LT" in computations[condition]
    return int(bounds[0]) if lt and len(bounds) == 1 else 1

  def loops(name, seen):  # the while loops `name` runs, outside other loops' bodies
    found = []
    for line in computations[name].splitlines():
      if w := _WHILE.search(line):
        found.append(w.groups())
        continue
      for m in _CALLS.finditer(line):
        for callee in [m[1]] if m[1] else re.findall(r"[\w.\-]+", m[2]):
          if callee in computations and callee not in seen:
            seen.add(callee)
            found += loops(callee, seen)
    return found

  def counted(name):
    return cost(name) + sum(trip_count(c) * counted(b) - cost(b) for c, b in loops(name, {name}))

  return counted(entry)


# ----------------------------------------------------------------------------- report

def print_report(r: dict, config_name: str) -> None:
  gib = _gib
  slices = r.get("num_slices", 1)
  where = f"{slices} x {r['topology']} (over DCN)" if slices > 1 else r["topology"]
  gpu = r.get("platform") == "gpu"
  if gpu:  # JAX's share of the card
    memory = (f"{gib(r['hbm_bytes'])} of its memory each for JAX "
              f"({r['memory_fraction_source']}) (CUDA plugin topology")
  else:
    memory = f"{gib(r['hbm_bytes'])} HBM each (libtpu topology"
  mode = r["mode"]
  if r.get("attend_length"):
    mode += f", attending the cache's first {r['attend_length']} positions"
  print(f"{config_name} ({mode}) on {where}: {r['chips']} chips of "
        f"{r['device_kind']}, {memory} {r['compiler_topology']})")
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  micro = r["global_batch_size"] // r["grad_accum_steps"]
  per_chip = micro // (r["mesh"]["data"] * r["mesh"]["fsdp"])
  print(f"mesh {mesh}; global batch {r['global_batch_size']} in {r['grad_accum_steps']} "
        f"micro-batch(es) of {micro} ({per_chip} per chip); remat {r['remat']}")
  layout = r.get("input_layout")
  if layout:
    shared = (f"; {layout['row_sets']} row sets, each read by {layout['hosts_per_row']} hosts "
              "(a model axis spans hosts)" if layout["hosts_per_row"] > 1 else "")
    hosts = f"{layout['hosts']} host{'s' * (layout['hosts'] > 1)}"
    print(f"input: {hosts}, each reads {layout['rows_per_host']} of the "
          f"{r['global_batch_size']} rows of a global batch{shared}")
  m = r["memory"]
  if m:
    print("per-device memory:")
    for key, why in [("arguments", "state and batch"), ("outputs", "new state and metrics"),
                     ("aliased", "donated: arguments reused as outputs, counted once"),
                     ("temporaries", "activations, gradients, collectives"),
                     ("generated_code", "")]:
      sign = "-" if key == "aliased" else " "
      print(f"  {key.replace('_', ' '):<15}{sign}{gib(m[key]):>12}  {why}")
    print(f"  {'total':<15} {gib(m['total']):>12}  of {gib(r['hbm_bytes'])} "
          f"{'for JAX' if gpu else 'HBM'} ({100 * m['total'] / r['hbm_bytes']:.1f}%)")
  else:
    print(f"per-device memory: arguments {gib(r['argument_bytes_estimate'])} (from the shardings); "
          "the compiler stopped before planning the rest")
  if r.get("momentum_bytes_per_device"):
    print(f"optimizer momentum: {gib(r['momentum_bytes_per_device'])} per device (in the "
          "arguments)")
  compiler, analytic = r["compiler_flops_per_device"], r["analytic_flops_per_device"]
  if compiler and analytic:
    print(f"FLOPs per device and step: compiler {compiler:.3e} (XLA's count of the lowered "
          f"step), analytic {analytic:.3e} (MFU's); compiler / analytic {compiler / analytic:.2f}")
  if r.get("attention"):
    kernels = r.get("mosaic_kernels", 0)
    cudnn = r.get("cudnn_attention_kernels", 0)
    print(f"attention: {r['attention']}" + (f" ({kernels} Pallas kernel calls in the step)"
                                            if kernels else "")
          + (f" ({cudnn} cuDNN attention calls in the step)" if cudnn else ""))
  if r.get("roofline"):
    f = r["roofline"]
    mfu = f" (MFU at most {f['mfu_at_most']:.2f})" if f["mfu_at_most"] else ""
    print(f"roofline: {f['kernel_runs']} kernel runs move {f['bytes'] / 1e9:.1f} GB and do "
          f"{f['flops']:.3e} FLOPs of matrix products per device: at least "
          f"{1e3 * f['least_step_s']:.1f} ms at {f['bandwidth'] / 1e12:.2f} TB/s and "
          f"{f['peak_flops'] / 1e12:.0f} TFLOP/s{mfu}")
    if f["loops_counted_once"]:
      print(f"  ({f['loops_counted_once']} loop(s) of a trip count the compiler does not know "
            "counted once: the step takes longer)")
  print(f"compile time {r['compile_s']:.1f} s")
  if r["fits"]:
    print(f"verdict: fits, {gib(r['hbm_bytes'] - m['total'])} to spare per chip")
  else:
    print("verdict: does NOT fit: " + "; ".join(r["overflow"]))


FLAGS = cli.Flags(__doc__)
FLAGS.config()
FLAGS.string("topology", None, f"TPU slice or GPUs, one of: {', '.join(topologies.names())}")
FLAGS.enum("mode", "train", list(MODES), "Which program to plan.")
FLAGS.integer("num_slices", None, "Slices of --topology joined over DCN, the data axis split "
              "across them (default: the config's mesh.num_slices).")
FLAGS.bool("json", False, "Print one JSON object instead of the report.")
FLAGS.string("hlo_out", None, "Write the compiled program's HLO text to this path.")
FLAGS.integer("attend_length", None, "--mode sample: the decode step's self-attention reads "
              "the cache's first N positions, as the generation's segment ending at N does "
              "(default: the whole cache).")


def main(argv=None):
  f = FLAGS.parse(argv)
  # The host's own accelerators (if any) are not needed: only the compiler is.
  jax.config.update("jax_platforms", "cpu")
  config = f.config
  if config is None or not f.topology:
    sys.exit("error: --config and --topology are required")
  try:
    report = plan(config, f.topology, f.mode, f.num_slices, f.hlo_out, f.attend_length)
  except (topologies.UnknownTopology, topologies.NoCompiler, topologies.BadEnvironment,
          config_lib.ConfigError) as e:
    if f.json:
      print(json.dumps(dict(topology=f.topology, refused=str(e))))
    print(f"error: {e}", file=sys.stderr)
    sys.exit(REFUSED)
  if f.json:
    print(json.dumps(report))
  else:
    print_report(report, f.config_file)
  sys.exit(FITS if report["fits"] else DOES_NOT_FIT)


if __name__ == "__main__":
  cli.run(main)
