"""Where a step's device time goes: a jax.profiler trace summarised by operation group.

  python benchmarks/profile_summary.py --trace DIR [--hlo FILE ...] [--top 15] [--json]
  python benchmarks/profile_summary.py --capture DIR --config configs/parti_350m.py \
      --config.global_batch_size=64 --steps 3      # traces 3 train steps, then summarises
  python benchmarks/profile_summary.py --hlo FILE --roofline h200   # no trace: the least
      # time of each group at the card's spec (FILE: `python -m parti_jax.aot --hlo_out`)

Prints the device time of each group (matmuls, attention, layer norms, loss, optimizer,
random bits, collectives, copies, other) and the top operations, then one JSON object.
`--capture DIR` first runs the config's train step (synthetic tokens, one warm-up step)
under `jax.profiler.trace(DIR/trace)` and writes its compiled HLO to DIR/hlo.txt.

`--roofline GPU` (a100, h100, h200; `auto` with --capture: the card traced) prices each
kernel of the compiled HLO at the card's spec, the least time its bytes and FLOPs take
(parti_jax.roofline), and sums that by the same groups: with a trace, next to the measured
time per run of the program (the trace holds --steps runs: by default 3 with --capture, 1
with --trace), so that each group's share of the card's speed shows; without one, as a
forecast.

What decides an operation's group is what the program says about it: its HLO opcode (a dot,
a copy, an all-reduce, a fusion around a dot) and the Python functions that made it (the
stack frames XLA keeps in each instruction's metadata: `LayerNorm.__call__`,
`Attention.attend`, `apply_gradients`, `chunked_cross_entropy`, ...), read from the
compiled HLO text (--hlo). Without it only opcodes and the names in the trace are used.

What a trace holds differs by platform. On GPU and TPU each chip has a device plane
(`/device:GPU:0`) whose "XLA Ops" line holds one event per operation run: device time
proper, with the op's JAX name (`tf_op`) as well. A CPU trace has host threads only:
XLA:CPU's operations run as thunks on its worker threads, named by HLO instruction
(`hlo_op`) and nested inside their loops and conditionals, which are left out so that no
time counts twice. On 8 simulated CPU devices sharing one host's cores, collectives include
the devices waiting for each other, so their share says little there.
"""

import collections
import json
import re
import sys
import time

from etils import epath

from parti_jax import cli, flops, roofline, topologies

MAX_TRACE_BYTES = 4 << 30  # an xplane.pb of a few steps of a big model is tens of MB
MAX_HLO_BYTES = 1 << 30

GROUPS = ("matmuls", "attention", "layer norms", "loss", "optimizer", "random bits",
          "collectives", "copies", "other")
# Control flow: on a CPU its event spans the operations inside it, which are counted.
_CONTAINERS = {"while", "conditional", "call", "async-start", "async-done"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute",
                "all-to-all", "send", "recv")
_COPIES = ("copy", "transpose", "bitcast", "dynamic-update-slice", "copy-start", "copy-done")
# Python functions (innermost first in an op's stack) and the group they put it in.
_FUNCTIONS = [
    (("Attention.attend", "dot_product_attention"), "attention"),
    (("LayerNorm.__call__",), "layer norms"),
    (("chunked_cross_entropy", "loss_and_accuracy", "per_row_loss_and_accuracy", "logits",
      "Parti._logits"), "loss"),
    (("apply_gradients",), "optimizer"),
]
# Frames in installed libraries (flax's LayerNorm internals, optax's transforms), which
# jax 0.11 keeps in the HLO's stack frames and jax 0.10 left out: the innermost of the
# program's own functions says where an operation comes from.
_LIBRARY = re.compile(r"(site|dist)-packages/(?!parti_jax/)|^<frozen |/lib/python3\.\d+/(?!site-)")
# GPU library kernels in a command buffer, where only the kernel's name tells what it is:
# cuDNN's fused attention (forward, backward and its helper kernels).
_ATTENTION_KERNELS = re.compile(r"sdpa|flash|fmha|cudnn", re.I)
_RANDOM = re.compile(r"random_bits|threefry|_bernoulli|_uniform|rng_bit_generator|"
                     r"rng-bit-generator|random_wrap|random_fold_in|random_split")


class Instruction(collections.namedtuple("Instruction", "opcode op_name functions matmul")):
  """What the HLO says about one instruction: opcode, JAX name, the Python functions
  that made it (innermost first), whether it is or fuses a matrix product."""


def parse_hlo(text: str) -> dict[str, Instruction]:
  """Compiled HLO text -> {instruction name: Instruction} (every computation's)."""
  names, files = _table(text, "FunctionNames"), _table(text, "FileNames")
  locations = {k: (re.search(r"function_name_id=(\d+)", v)[1],
                   re.search(r"file_name_id=(\d+)", v)[1])
               for k, v in _table(text, "FileLocations").items()}
  frames = {k: (int(re.search(r"file_location_id=(\d+)", v)[1]),
                int(re.search(r"parent_frame_id=(\d+)", v)[1]))
            for k, v in _table(text, "StackFrames").items()}

  def functions(frame):
    out, seen = [], set()
    while frame in frames and frame not in seen:
      seen.add(frame)
      location, parent = frames[frame]
      name, file = locations.get(str(location), ("", ""))
      if not _LIBRARY.search(files.get(file, "")):
        out.append(names.get(name, "").strip('"'))
      # The table names a frame's parent by the parent's key plus one: read so, every chain
      # ends at the program's entry point (read as the key itself, a frame would be its own
      # parent and a layer norm's chain would stop at the norm).
      frame = parent - 1
    return tuple(out)

  frames = {int(k): v for k, v in frames.items()}
  computations, current = collections.defaultdict(set), None
  raw = {}
  for line in text.splitlines():
    if header := re.match(r"(?:ENTRY )?%?([\w.\-]+) \(.*\{$", line):
      current = header[1]
      continue
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\((.*)", line)
    if not m:
      continue
    name, opcode, rest = m.groups()
    computations[current].add(opcode)
    called = re.search(r"calls=%?([\w.\-]+)", rest)
    op_name = re.search(r'op_name="([^"]*)"', rest)
    frame = re.search(r"stack_frame_id=(\d+)", rest)
    target = re.search(r'custom_call_target="([^"]*)"', rest)
    raw[name] = (opcode, op_name[1] if op_name else "", int(frame[1]) if frame else None,
                 called[1] if called else None, target[1] if target else "")
  out = {}
  for name, (opcode, op_name, frame, called, target) in raw.items():
    inner = computations.get(called, set()) if called else set()
    matmul = (opcode in ("dot", "convolution") or bool(inner & {"dot", "convolution"})
              or bool(re.search(r"gemm|cublas|matmul", target, re.I)))
    out[name] = Instruction(opcode, op_name, functions(frame) if frame else (), matmul)
  return out


def _table(text: str, title: str) -> dict[str, str]:
  """A section of the HLO text's stack-frame tables: {id: rest of its line}."""
  lines = text.splitlines()
  try:
    start = lines.index(title) + 1
  except ValueError:
    return {}
  table = {}
  for line in lines[start:]:
    if not re.match(r"\d+ ", line):
      break
    key, value = line.split(" ", 1)
    table[key] = value
  return table


def group_of(op: str, instruction: Instruction | None, jax_name: str = "") -> str:
  """The group of the operation named `op` (its HLO name) given what the HLO says of it."""
  opcode = instruction.opcode if instruction else re.sub(r"\.\d+$", "", op)
  names = " ".join(filter(None, [jax_name, instruction and instruction.op_name, op]))
  functions = instruction.functions if instruction else ()
  if _RANDOM.search(names):
    return "random bits"
  # What an operation does comes before where it was made: an all-gather of a layer norm's
  # scale is communication, a copy in the optimizer a copy.
  if opcode.startswith(_COLLECTIVES) or op.startswith(_COLLECTIVES):
    return "collectives"
  if opcode.startswith(_COPIES) or re.match(r"(wrapped_)?copy|memcpy|memset", op, re.I):
    return "copies"
  if instruction is None and _ATTENTION_KERNELS.search(op):
    return "attention"  # a cuDNN attention kernel, named by the library, not the HLO
  # The innermost of the program's functions only: the most specific place. An outer one
  # holds more than its group (Attention.attend also runs the output projection, a matmul).
  for function in functions[:1]:
    for known, group in _FUNCTIONS:
      if function in known:
        return group
  for known, group in _FUNCTIONS:
    if any(k in names for k in known):
      return group
  if (instruction and instruction.matmul) or opcode in ("dot", "convolution") \
      or re.search(r"gemm|cublas|matmul|nvjet|cutlass|xmma", op, re.I):
    return "matmuls"
  return "other"


# ----------------------------------------------------------------------------- the trace

def trace_file(directory: epath.Path) -> epath.Path:
  """The newest *.xplane.pb under a jax.profiler trace directory."""
  # jax.profiler writes DIR/plugins/profile/RUN/HOST.xplane.pb; RUN sorts by time.
  found = sorted([*directory.glob("plugins/profile/*/*.xplane.pb"),
                  *directory.glob("*.xplane.pb")], key=lambda p: (p.parent.name, p.name))
  if not found:
    sys.exit(f"error: no *.xplane.pb under {directory} (a jax.profiler trace directory)")
  return found[-1]


def op_events(path: epath.Path) -> tuple[str, list[tuple[str, str, float]]]:
  """(where the times come from, [(HLO op or kernel name, JAX name, duration in ns)])."""
  from jax.profiler import ProfileData  # jax's own reader of the XSpace protobuf
  size = path.stat().length
  if size > MAX_TRACE_BYTES:
    sys.exit(f"error: {path} is {size} bytes, more than the {MAX_TRACE_BYTES} read")
  data = ProfileData.from_serialized_xspace(path.read_bytes())
  planes = list(data.planes)
  device = [p for p in planes if p.name.startswith("/device:") and "CUSTOM" not in p.name]
  events = []
  for plane in device:
    lines = list(plane.lines)
    ops = [line for line in lines if line.name == "XLA Ops"]
    for line in ops:  # TPU: one event per HLO operation
      for e in line.events:
        stats = dict(e.stats)
        events.append((str(stats.get("hlo_op", e.name)), str(stats.get("tf_op", "")),
                       float(e.duration_ns)))
    if ops:
      continue
    # GPU: one line per CUDA stream, one event per kernel, copy or memset. Inside a command
    # buffer (a CUDA graph, XLA's default for runs of kernels) `hlo_op` names the buffer,
    # not the operation: the kernel's own name says more (XLA names a fusion's kernel after
    # the fusion; cuBLAS and cuDNN kernels after what they do).
    for line in lines:
      if not line.name.startswith("Stream"):
        continue
      for e in line.events:
        op = str(dict(e.stats).get("hlo_op", ""))
        events.append((e.name if not op or op.startswith("command_buffer") else op, "",
                       float(e.duration_ns)))
  if device:
    return "device planes (XLA Ops, or GPU streams' kernels)", events
  for plane in planes:
    if plane.name != "/host:CPU":
      continue
    for line in plane.lines:
      for e in line.events:
        stats = dict(e.stats)
        op = stats.get("hlo_op")
        if op is None or e.name.startswith("end: "):
          continue
        if re.sub(r"\.\d+$", "", str(op)) in _CONTAINERS:
          continue
        events.append((str(op), "", float(e.duration_ns)))
  return "host threads (XLA:CPU thunks)", events


def hlo_name(op: str, hlo: dict[str, Instruction]) -> str:
  """The HLO instruction a GPU kernel ran for, where its name says ("loop_add_fusion_11" is
  XLA's kernel of fusion "loop_add_fusion.11"); else the name as it is."""
  if op in hlo:
    return op
  dotted = re.sub(r"_(\d+)$", r".\1", op)
  return dotted if dotted in hlo else op


def summarise(events, hlo: dict[str, Instruction], top: int = 15) -> dict:
  by_group, by_op = collections.Counter(), collections.Counter()
  group_of_op = {}
  for op, jax_name, ns in events:
    op = hlo_name(op, hlo)
    if op not in group_of_op:
      group_of_op[op] = group_of(op, hlo.get(op), jax_name)
    by_group[group_of_op[op]] += ns
    by_op[op] += ns
  total = sum(by_group.values())
  share = lambda ns: ns / total if total else 0.0
  return dict(
      total_ms=total / 1e6, operations=len(by_op),
      groups={g: dict(ms=by_group[g] / 1e6, share=share(by_group[g])) for g in GROUPS},
      top=[dict(op=op, group=group_of_op[op], ms=ns / 1e6, share=share(ns),
                jax_name=(hlo[op].op_name if op in hlo else ""))
           for op, ns in by_op.most_common(top)])


def print_summary(s: dict, source: str, what: str = "device time") -> None:
  print(f"{what} {s['total_ms']:.1f} ms over {s['operations']} operations, from {source}")
  print(f"{'group':<12} {'ms':>10} {'share':>7}")
  for g, v in sorted(s["groups"].items(), key=lambda kv: -kv[1]["ms"]):
    print(f"{g:<12} {v['ms']:>10.2f} {100 * v['share']:>6.1f}%")
  print(f"\ntop {len(s['top'])} operations:")
  for t in s["top"]:
    print(f"  {t['op'][:40]:<40} {t['group']:<12} {t['ms']:>9.2f} ms {100 * t['share']:>5.1f}%"
          f"  {t['jax_name'][-60:]}")


# ----------------------------------------------------------------------------- roofline

def gpu_spec(name: str) -> topologies.Gpu:
  """A card of topologies.GPUS by model (h200) or by JAX's device_kind ("NVIDIA H200")."""
  if name.lower() in topologies.GPUS:
    return topologies.GPUS[name.lower()]
  kind = name.lower()
  for model, spec in topologies.GPUS.items():
    # SXM cards only: a PCIe H100 or a GH200 has other bandwidths.
    if f"nvidia {model}" in kind and "pcie" not in kind:
      return spec
  sys.exit(f"error: --roofline {name}: not one of {', '.join(topologies.GPUS)}")


def roofline_events(r: roofline.Roofline, gpu: topologies.Gpu) -> list[tuple[str, str, float]]:
  """[(HLO op name, "", least ns of all its runs)] of a compiled program on `gpu`."""
  peak = flops.spec_peak_tflops(gpu.device_kind)[0] * 1e12
  return [(k.name, "", 1e9 * k.seconds(peak, gpu.bandwidth_bytes_per_s)) for k in r.kernels]


def print_efficiency(measured: dict, least: dict, steps: int) -> None:
  """Per group: the least time per step against the measured time per step."""
  print(f"\n{'group':<12} {'measured ms':>12} {'least ms':>9} {'least/measured':>15}")
  for g in GROUPS:
    ms, floor = measured["groups"][g]["ms"] / steps, least["groups"][g]["ms"]
    if ms or floor:
      print(f"{g:<12} {ms:>12.2f} {floor:>9.2f} {floor / ms if ms else float('nan'):>15.2f}")


# ----------------------------------------------------------------------------- capture

def capture(config, out: epath.Path, steps: int) -> None:
  """A trace of `steps` train steps of `config` (after a warm-up) and its compiled HLO."""
  import jax
  sys.path.insert(0, str(epath.Path(__file__).parent))
  from train_throughput import synthetic_batch  # the throughput benchmark's random tokens
  from parti_jax import sharding, tasks
  task = tasks.build(config, sharding.make_mesh(config))
  state = task.setup.init_state()
  batch = synthetic_batch(task.setup, config.global_batch_size)
  compiled = task.train_step.lower(state, batch).compile()
  out.mkdir(parents=True, exist_ok=True)
  (out / "hlo.txt").write_text(compiled.as_text())
  state, metrics = task.train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  with jax.profiler.trace(str(out / "trace")):
    for _ in range(steps):
      state, metrics = task.train_step(state, batch)
    jax.block_until_ready(metrics)
  print(f"traced {steps} steps in {time.perf_counter() - start:.2f} s to {out / 'trace'}")


FLAGS = cli.Flags(__doc__)
FLAGS.config()
FLAGS.string("trace", None, "A jax.profiler trace directory to summarise.")
FLAGS.strings("hlo", [], "Compiled HLO text of a traced program (once per file).")
FLAGS.string("capture", None, "Trace --steps train steps of --config into this directory "
             "first (DIR/trace, DIR/hlo.txt), then summarise them.")
FLAGS.integer("steps", None, "Runs of the program in the trace: with --capture, the train "
              "steps traced (default 3); with --trace, how many it holds (default 1).")
FLAGS.integer("top", 15, "Operations listed.")
FLAGS.string("roofline", None, "Price the --hlo program's kernels at this GPU's spec (a100, "
             "h100, h200; auto: the card --capture ran on) and sum them by group.")


def main(argv=None):
  a = FLAGS.parse(argv)
  trace, hlo_files = a.trace, list(a.hlo)
  gpu = a.roofline
  steps = a.steps or (3 if a.capture else 1)
  spec = gpu_spec(gpu) if gpu and gpu != "auto" else None  # a wrong name before any run
  if a.capture:
    if a.config is None:
      sys.exit("error: --capture needs --config")
    capture(a.config, epath.Path(a.capture), steps)
    trace, hlo_files = str(epath.Path(a.capture) / "trace"), [str(epath.Path(a.capture) / "hlo.txt")]
    if gpu == "auto":
      import jax
      gpu = jax.devices()[0].device_kind
  if gpu == "auto":
    sys.exit("error: --roofline auto needs --capture (name the GPU: a100, h100 or h200)")
  if not trace and not gpu:
    sys.exit("error: --trace DIR (or --capture DIR --config FILE, or --hlo FILE --roofline "
             "GPU) is required")
  if gpu and len(hlo_files) != 1:
    sys.exit("error: --roofline prices one program: give one --hlo FILE")
  hlo, texts = {}, []
  for f in hlo_files:
    path = epath.Path(f)
    if not path.exists():
      sys.exit(f"error: --hlo {f} does not exist")
    if path.stat().length > MAX_HLO_BYTES:
      sys.exit(f"error: --hlo {f} is larger than {MAX_HLO_BYTES} bytes")
    texts.append(path.read_text())
    hlo.update(parse_hlo(texts[-1]))
  least = None
  if gpu:
    spec = spec or gpu_spec(gpu)
    r = roofline.of_hlo(texts[0])
    least = summarise(roofline_events(r, spec), hlo, a.top)
    least["loops_counted_once"] = r.loops_counted_once
    source = (f"the roofline of {hlo_files[0]} on an {spec.device_kind} "
              f"({spec.bandwidth_bytes_per_s / 1e12:.2f} TB/s, "
              f"{flops.spec_peak_tflops(spec.device_kind)[0]:.0f} TFLOP/s)")
    if r.loops_counted_once:
      source += (f"; {r.loops_counted_once} loop(s) of a trip count the compiler does not "
                 "know counted once (price one step of such a program instead)")
    if not trace:
      print_summary(least, source, "least time")
      print(json.dumps(dict(source=source, **least)))
      return
  directory = epath.Path(trace)
  if not directory.is_dir():
    sys.exit(f"error: --trace {trace} is not a directory")
  source, events = op_events(trace_file(directory))
  if not events:
    sys.exit(f"error: the trace under {trace} holds no XLA operations")
  s = summarise(events, hlo, a.top)
  print_summary(s, source)
  if least:
    print_efficiency(s, least, steps)
  print(json.dumps(dict(source=source, **s, roofline=least)))


if __name__ == "__main__":
  cli.run(main)
