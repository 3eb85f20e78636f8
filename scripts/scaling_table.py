"""Finds by compiling a sharding of each Parti size that fits several TPU slices: docs/scaling.md.

  python scripts/scaling_table.py [--rows 20b:v4-1024,3b:v5p-128] [--max_compiles 3] \
      [--out docs/scaling.md]
  python scripts/scaling_table.py --gpus [--rows 20b:h100-64]   # only the GPU section

For each (model, slice) row the search runs over the mesh (data, fsdp, tensor), the
remat policy and the number of micro-batches (grad_accum_steps) at the paper's global
batch of 8192. Compiling for a large slice takes minutes on a CPU, so candidates are
not all compiled: an analytic estimate of the memory per chip ranks them, and the
planner (`python -m parti_jax.aot --json`, in a subprocess) compiles the best-ranked
candidate expected to fit. A candidate that does not fit corrects the estimate (by the
ratio of the compiler's activation memory to the estimated one) before the next pick.

Ranking (lower is better; a rough model of step time, documented in docs/scaling.md):
recomputation (none 1, dots and qkv_up 1.15, full 4/3) x per-micro-batch cost (FSDP gathers the
weights for every micro-batch; small micro-batches use the matrix units less well)
x tensor-parallel communication.
With --gpus the same search runs for NVIDIA GPU machines (GPU_ROWS), compiled by XLA's GPU
compiler through JAX's CUDA plugin, against JAX's default share of each card's memory, and
rewrites only the page's GPU section.
Each compile's report is cached (--cache, one JSON line per compile, keyed by the candidate
and a hash of the package's and configs' sources), so a rerun of the same code only compiles
what it has not seen.
"""

import dataclasses
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # only the compilers are used, no accelerator

from parti_jax import cli, sharding, topologies  # noqa: E402
from parti_jax import config as config_lib  # noqa: E402

GLOBAL_BATCH = 8192
# The 20B rows first: the paper trained 20B on 1024 TPU v4 chips (v4-2048); v4-1024 is half.
ROWS = [
    ("20b", "v4-1024"), ("20b", "v4-512"), ("350m", "v4-16"), ("350m", "v5e-16"),
    ("750m", "v5p-16"), ("750m", "v6e-16"), ("3b", "v4-128"), ("3b", "v5e-64"),
    ("3b", "v5p-64"), ("20b", "v5p-256"), ("20b", "v6e-256"), ("20b", "v5e-256"),
]
# NVIDIA machines of 8 GPUs per host (HGX/DGX), as a SLURM cluster gives them
# (launch/slurm.sh): each size on one host where it fits, and 20B on 8 and 32 hosts.
GPU_ROWS = [
    ("350m", "h100-8"), ("350m", "h200-8"), ("750m", "h100-8"), ("3b", "h100-8"),
    ("3b", "h200-8"), ("20b", "h100-64"), ("20b", "h200-64"), ("20b", "h100-256"),
]
# qkv_up redoes the out and down projections: 6 of a decoder layer's 14 d_model^2 of matmuls
# per token, a third of a forward pass (the step: three), so about 1 + 0.43 / 3.
RECOMPUTE = {"none": 1.0, "dots": 1.15, "qkv_up": 1.15, "full": 4 / 3}
HEADROOM = 0.9  # pick candidates whose (corrected) estimate leaves 10% of HBM free ...
PLAN_MAX = 0.95  # ... and keep a plan only if the compiler leaves 5% free (runtime buffers)
DEFAULT_CACHE = "/tmp/parti_jax_scaling_cache.jsonl"


@dataclasses.dataclass(frozen=True)
class Candidate:
  data: int
  fsdp: int
  tensor: int
  remat: str
  accum: int
  attention: str = "auto"  # model.attention_impl
  momentum: str = ""  # optimizer.momentum_dtype ("": the config's)
  sequence_parallel: bool = True  # model.sequence_parallel

  @property
  def overrides(self) -> list[str]:
    return [f"--config.mesh.data={self.data}", f"--config.mesh.fsdp={self.fsdp}",
            f"--config.mesh.tensor={self.tensor}", f"--config.model.remat={self.remat}",
            f"--config.grad_accum_steps={self.accum}",
            f"--config.global_batch_size={GLOBAL_BATCH}",
            f"--config.model.attention_impl={self.attention}",
            f"--config.model.sequence_parallel={self.sequence_parallel}"] + (
                [f"--config.optimizer.momentum_dtype={self.momentum}"] if self.momentum else [])


def load_config(model: str):
  path = os.path.join(REPO, "configs", f"parti_{model}.py")
  spec = importlib.util.spec_from_file_location(f"parti_{model}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(), path


def num_params(m) -> float:
  """Parameters of the encoder-decoder (embeddings and norms included, roughly)."""
  d, f = m.d_model, m.mlp_dim
  attention, mlp = 4 * d * d, 2 * d * f
  vocab = config_lib.round_up(m.text_vocab_size) + config_lib.round_up(m.codebook_size + 1)
  return (m.encoder_layers * (attention + mlp) + m.decoder_layers * (2 * attention + mlp)
          + vocab * d + (m.text_len + m.image_grid ** 2) * d)


def estimate(config, c: Candidate) -> tuple[float, float]:
  """(state + gradient bytes, activation bytes) per chip: a rough model to rank by."""
  m, p = config.model, num_params(config.model)
  shards = c.fsdp * c.tensor
  optimizer = 2 if config.optimizer.name == "adafactor" else 8  # bytes per parameter
  state = p * (4 + optimizer) / shards
  grads = p * 4 / shards * (2 if c.accum > 1 else 1)  # + the running sum of micro-batches
  d, f, t = m.d_model, m.mlp_dim, c.tensor
  s = t if c.sequence_parallel else 1  # shards of the residual stream's length
  text, image = m.text_len, m.image_grid ** 2
  vocab = config_lib.round_up(m.codebook_size + 1)
  # Bytes kept per token and layer for the backward pass (bfloat16 activations):
  dots = 2 * (4 * d / t + 4 * d / s + f / t)  # matmul outputs and the residual stream
  kept = {"full": 2 * d / s, "dots": dots,
          "qkv_up": 2 * (4 * d / t + f / t + d / s),  # q, k, v, attention, MLP hidden, stream
          "none": dots + 2 * (6 * d + 2 * f / t) + 10 * m.num_heads / t * (image + text)}
  working = 2 * (kept["none"] - kept["full"])  # one layer rematerialised at a time
  per_example = (m.encoder_layers * text + m.decoder_layers * image) * kept[c.remat]
  per_example += image * (working if c.remat != "none" else 0) + 3 * 4 * image * vocab / t
  micro = GLOBAL_BATCH / (c.data * c.fsdp * c.accum)
  return state + grads, micro * per_example


def score(c: Candidate) -> float:
  micro = GLOBAL_BATCH / (c.data * c.fsdp * c.accum)
  gathers = 1 + (0.9 / micro if c.fsdp > 1 else 0)  # all-gathers per micro-batch
  small = 1 + 0.1 / micro
  return RECOMPUTE[c.remat] * gathers * small * (1 + 0.05 * math.log2(c.tensor)) + 1e-4 * c.accum


def candidates(config, machine) -> list[Candidate]:
  """Every mesh, remat policy and micro-batch count the config checks and the machine's
  layout accepts (a TPU's torus; on GPUs the tensor axis stays within a host's 8, as
  `tensor` is at most 8)."""
  found, chips, devices = [], machine.chips, machine.devices()
  powers = [2 ** i for i in range(int(math.log2(chips)) + 1)]
  for tensor in (1, 2, 4, 8):
    for fsdp in powers:
      if chips % (tensor * fsdp):
        continue
      data = chips // (tensor * fsdp)
      trial = config.copy_and_resolve_references()
      trial.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
      try:  # the trainer's mesh: each axis a product of the torus's dimensions
        sharding.make_mesh(trial, devices)
      except (NotImplementedError, config_lib.ConfigError):
        continue
      for accum in [2 ** i for i in range(int(math.log2(GLOBAL_BATCH)) + 1)]:
        if GLOBAL_BATCH % (data * fsdp * accum):
          continue
        for remat in RECOMPUTE:
          c = Candidate(data, fsdp, tensor, remat, accum)
          trial = config.copy_and_resolve_references()
          trial.mesh.update(data=data, fsdp=fsdp, tensor=tensor)
          trial.grad_accum_steps, trial.global_batch_size = accum, GLOBAL_BATCH
          try:
            config_lib.check(trial, chips)
          except config_lib.ConfigError:
            continue
          found.append(c)
  return found


def compile_candidate(model: str, topology: str, c: Candidate, timeout: int, cache: str) -> dict:
  """The planner's JSON report (cached by model, slice and candidate)."""
  # The budget is in the key: on GPUs it is JAX's share of the card, from the environment.
  budget = topologies.get(topology).hbm_bytes
  key = json.dumps([model, topology, dataclasses.asdict(c), source_version(), budget])
  seen = _read_cache(cache)
  if key in seen:
    return seen[key]
  _, path = load_config(model)
  command = [sys.executable, "-m", "parti_jax.aot", f"--config={path}", f"--topology={topology}",
             "--json", *c.overrides]
  print(f"  compiling {model} on {topology}: {c}", flush=True)
  start = time.perf_counter()
  try:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1]) if lines else dict(
        fits=False, overflow=[done.stderr.strip().splitlines()[-1][:300]])
  except subprocess.TimeoutExpired:
    report = dict(fits=False, overflow=[f"compile timed out after {timeout} s"])
  report["wall_s"] = time.perf_counter() - start
  print(f"  -> fits={report.get('fits')} total="
        f"{report.get('memory', {}).get('total', 0) / 2**30:.1f} GiB, "
        f"{report['wall_s']:.0f} s", flush=True)
  with open(cache, "a") as f:
    f.write(json.dumps([key, report]) + "\n")
  return report


def source_version() -> str:
  """A hash of the package's and the configs' sources: a cached report is of this code."""
  digest = hashlib.sha256()
  for path in sorted(glob.glob(os.path.join(REPO, "parti_jax", "**", "*.py"), recursive=True)
                     + glob.glob(os.path.join(REPO, "configs", "*.py"))):
    with open(path, "rb") as f:
      digest.update(os.path.relpath(path, REPO).encode() + b"\0" + f.read())
  return digest.hexdigest()[:16]


def _read_cache(cache: str) -> dict:
  if not os.path.exists(cache):
    return {}
  with open(cache) as f:
    return dict(json.loads(line) for line in f if line.strip())


def search(model: str, topology: str, max_compiles: int, timeout: int, cache: str) -> dict:
  config, _ = load_config(model)
  machine = topologies.get(topology)
  ranked = sorted(candidates(config, machine), key=score)
  correction, tried, reports, best = {}, [], [], None
  while len(tried) < max_compiles:
    def expected(c):
      fixed, activations = estimate(config, c)
      return fixed + activations * correction.get(c.remat, correction.get("any", 1.0))
    pick = next((c for c in ranked if c not in tried and expected(c) <= HEADROOM * machine.hbm_bytes
                 and (best is None or score(c) < score(best[0]))), None)
    if pick is None:
      break
    tried.append(pick)
    report = compile_candidate(model, topology, pick, timeout, cache)
    reports.append(report)
    fixed, activations = estimate(config, pick)
    measured = report.get("memory", {}).get("total") or refused_total(report, machine)
    if measured:
      ratio = max(measured - fixed, 0.05 * measured) / activations
      correction[pick.remat] = correction["any"] = ratio
    if report.get("fits") and measured <= PLAN_MAX * machine.hbm_bytes:
      best = (pick, report)
  return dict(model=model, topology=topology, chips=machine.chips, hbm=machine.hbm_bytes,
              generation=getattr(machine, "generation", None), compiles=len(tried),
              hosts=getattr(machine, "hosts", None),
              plan=dataclasses.asdict(best[0]) if best else None,
              report=best[1] if best else None,
              tried=[dict(compile_s=r.get("compile_s") or r.get("wall_s", 0),
                          total=r.get("memory", {}).get("total")) for r in reports])


def refused_total(report: dict, machine) -> float | None:
  """Memory per chip of a program the compiler refused, from its message (else None)."""
  if report.get("fits") or not report.get("overflow"):
    return None
  units = dict(K=2 ** 10, M=2 ** 20, G=2 ** 30, T=2 ** 40)
  sizes = re.findall(r"\(([\d.]+)([KMGT])\)", report["overflow"][0])
  if not sizes:  # not a memory refusal (e.g. a timeout): count it as far over
    return 2 * machine.hbm_bytes
  temporaries = float(sizes[0][0]) * units[sizes[0][1]]
  return temporaries + report.get("argument_bytes_estimate", 0)


# ----------------------------------------------------------------------------- comparison

# Two plans the search found before splash attention and sequence parallelism (XLA's
# attention, bfloat16 momentum), fixed here so that the comparison does not move with the
# table: each compiled with XLA's attention or the splash kernel and with bfloat16 or int8
# momentum, at the plan's micro-batches and at half as many (twice the examples per chip):
# does the saving buy fewer micro-batches? Then the remat policy that keeps only what the
# tensor axis splits ("qkv_up"), at fewer still, and one compile without sequence
# parallelism (where the plan has a tensor axis to split over).
COMPARE_PLANS = {
    ("350m", "v5e-16"): dict(mesh=dict(data=16, fsdp=1, tensor=1), remat="none", accum=256),
    ("20b", "v4-512"): dict(mesh=dict(data=4, fsdp=8, tensor=8), remat="dots", accum=32),
}
COMPARE_ROWS = list(COMPARE_PLANS)
# (attention, momentum, divide the plan's micro-batches by, remat policy: "" the plan's,
# sequence parallelism), in the order compiled: the telling ones first.
COMPARE_VARIANTS = [("splash", "bfloat16", 1, "", True), ("xla", "bfloat16", 1, "", True),
                    ("splash", "bfloat16", 2, "", True), ("splash", "int8", 2, "", True),
                    ("xla", "int8", 1, "", True), ("splash", "int8", 2, "qkv_up", True),
                    ("splash", "int8", 4, "qkv_up", True), ("xla", "int8", 2, "qkv_up", True),
                    ("splash", "int8", 2, "qkv_up", False)]
COMPARE_BEGIN, COMPARE_END = "<!-- comparison: begin -->", "<!-- comparison: end -->"


def compare(model: str, topology: str, timeout: int, cache: str, max_compiles: int) -> dict:
  """The row's plan (COMPARE_PLANS) compiled in up to `max_compiles` of COMPARE_VARIANTS."""
  if (model, topology) not in COMPARE_PLANS:
    raise ValueError(f"--compare has plans for {', '.join(map(':'.join, COMPARE_PLANS))} only; "
                     f"got {model}:{topology}")
  plan, tpu = COMPARE_PLANS[model, topology], topologies.get(topology)
  results = []
  for attention, momentum, fewer, remat, split in COMPARE_VARIANTS[:max_compiles]:
    if not split and plan["mesh"]["tensor"] == 1:
      continue  # no tensor axis: the same program either way
    c = Candidate(**plan["mesh"], remat=remat or plan["remat"], accum=plan["accum"] // fewer,
                  attention=attention, momentum=momentum, sequence_parallel=split)
    results.append((c, compile_candidate(model, topology, c, timeout, cache)))
  return dict(model=model, topology=topology, chips=tpu.chips, hbm=tpu.hbm_bytes,
              results=results)


def gib(n: float) -> str:
  return f"{n / 2 ** 30:.1f}"


def comparison_lines(rows: list[dict]) -> list[str]:
  lines = [
      COMPARE_BEGIN,
      "## Attention and momentum",
      "",
      "Generated by `python scripts/scaling_table.py --compare`. Two plans the search found",
      "before splash attention and sequence parallelism (mesh, remat policy, micro-batches),",
      "each compiled with XLA's attention (which writes every",
      "head's score matrix) or the Pallas splash kernel (`model.attention_impl`; `auto` is",
      "splash on TPUs), and with the first moment in bfloat16 or int8",
      "(`optimizer.momentum_dtype`), at the plan's micro-batches and at fewer; with the",
      "residual stream's length split over the tensor axis (`model.sequence_parallel`, on by",
      "default; the same program where tensor is 1) or whole on every tensor shard. Fits: the",
      f"compiler leaves at least {1 - PLAN_MAX:.0%} of HBM free.",
      "",
      "| model | slice | attention | momentum | sequence parallel | remat | micro-batches "
      "| per chip | memory / chip (GiB) | momentum / chip (GiB) | fits "
      "| compiler / analytic FLOPs | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for row in rows:
    for c, rep in row["results"]:
      micro = GLOBAL_BATCH // (c.data * c.fsdp * c.accum)
      total = rep.get("memory", {}).get("total")
      fits = bool(rep.get("fits")) and total is not None and total <= PLAN_MAX * row["hbm"]
      flops = (f"{rep['compiler_flops_per_device'] / rep['analytic_flops_per_device']:.2f}"
               if rep.get("compiler_flops_per_device") else "")
      momentum = rep.get("momentum_bytes_per_device") or 0
      lines.append(
          f"| {row['model']} | {row['topology']} | {c.attention} | {c.momentum} "
          f"| {'yes' if c.sequence_parallel else 'no'} | {c.remat} "
          f"| {c.accum} "
          f"| {micro} | {gib(total) if total else _refused(rep)} | "
          f"{momentum / 2 ** 30:.2f} | {'yes' if fits else 'no'} | {flops} | "
          f"{rep.get('compile_s') or rep.get('wall_s', 0):.0f} |")
  lines += ["", "Momentum / chip: the first moment's bytes per chip (int8 values and their",
            "block scales, sharded like the parameters). XLA's cost analysis does not look",
            "inside Pallas kernels: with splash, the compiler's FLOPs leave attention out,",
            "hence below 1.", COMPARE_END]
  return lines


def _refused(report: dict) -> str:
  """A compiler's refusal in a few words: the temporaries it needed, if it says."""
  found = re.search(r"temporaries \(([\d.]+)G\)", " ".join(report.get("overflow", [])))
  return f"refused: temporaries {found[1]} GiB" if found else "refused"


def write_comparison(rows: list[dict], path: str) -> None:
  """Writes (or replaces) the comparison section of the page, leaving the rest as it is."""
  write_section(comparison_lines(rows), COMPARE_BEGIN, COMPARE_END, path)


def write_section(lines: list[str], begin: str, end: str, path: str) -> None:
  """Puts `lines` (from `begin` to `end`) in the page: where they were, else before
  "## Several slices"; the rest of the page stays as it is."""
  with open(path) as f:
    text = f.read()
  section = "\n".join(lines)
  if begin in text:
    head, rest = text.split(begin, 1)
    text = head + section + rest.split(end, 1)[1]
  else:
    marker = "\n## Several slices"
    head, rest = text.split(marker, 1)
    text = head + section + "\n" + marker + rest
  with open(path, "w") as f:
    f.write(text)


def sections(path: str) -> list[str]:
  """The generated sections (comparison, GPUs) of the page at `path`, markers included, to
  carry over when the TPU table is rewritten."""
  if not os.path.exists(path):
    return []
  with open(path) as f:
    text = f.read()
  return [begin + text.split(begin, 1)[1].split(end, 1)[0] + end
          for begin, end in ((COMPARE_BEGIN, COMPARE_END), (GPUS_BEGIN, GPUS_END))
          if begin in text]


# ----------------------------------------------------------------------------- GPUs

GPUS_BEGIN, GPUS_END = "<!-- gpus: begin -->", "<!-- gpus: end -->"


def gpu_lines(rows: list[dict]) -> list[str]:
  fraction = topologies.DEFAULT_MEM_FRACTION
  lines = [
      GPUS_BEGIN,
      "## NVIDIA GPUs",
      "",
      "Generated by `python scripts/scaling_table.py --gpus`: the same search for machines of",
      "NVIDIA GPUs, eight per host, compiled on a CPU host by XLA's GPU compiler through JAX's",
      "CUDA plugin (`python -m parti_jax.aot --topology h100-N`; the cards are described to",
      "it by their target configs in `parti_jax/topologies.py`), with the configs' defaults:",
      "cuDNN's fused attention (what `auto` picks there) and bfloat16 momentum. The tensor",
      "axis stays inside a host (NVLink); fsdp and data span hosts. The memory budget is",
      f"JAX's default share of a card, {fraction:.0%} (`XLA_CLIENT_MEM_FRACTION`; a",
      "run that raises it fits more per micro-batch), and a plan is kept if the compiler",
      f"leaves at least {1 - PLAN_MAX:.0%} of that free.",
      "",
      "The roofline column is the least time the compiled step can take on the card, each",
      "kernel's bytes at its memory bandwidth and its matrix products at its bf16 peak",
      "(`parti_jax/roofline.py`), and the highest MFU that leaves. The search does not rank",
      "by it: the ranking's recomputation costs are a model of FLOPs, and on GPUs remat can",
      "move fewer bytes than keeping the activations. Compiled again with remat `dots` at",
      "the same mesh and micro-batches, every plan below has as high a ceiling or higher",
      "(350M on 8 H200s: 0.55 instead of 0.37; BENCHMARKS.md, \"The step's roofline\"):",
      "try `--config.model.remat=dots` first, and measure step time on the machine",
      "(`train.profile_steps`) before committing to a plan.",
      "",
      "| model | GPUs | hosts | mesh (data, fsdp, tensor) | remat | micro-batches | per GPU "
      "| memory / GPU (GiB) | JAX's share (GiB) | compiler / analytic FLOPs "
      "| roofline: least step (s), MFU at most | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  lines += plan_lines(rows, "hosts", roofline=True)
  lines += ["", "The compiler's FLOPs leave out cuDNN's attention (custom calls XLA does not",
            "count) and add what remat recomputes. Candidates tried (compile time on the",
            "2-core host that generated this section, and memory per GPU):", ""]
  return lines + tried_lines(rows) + [GPUS_END]


def plan_lines(rows: list[dict], count: str, roofline: bool = False) -> list[str]:
  """One table line per row: its plan, or how many compiles found none; `count` is the
  third column ("chips" of a TPU slice, "hosts" of a GPU machine); `roofline` adds the
  planner's least step time and MFU bound (GPU plans)."""
  lines = []
  for r in rows:
    if not r["plan"]:
      lines.append(f"| {r['model']} | {r['topology']} | {r[count]} | no plan fitted in "
                   f"{r['compiles']} compiles | | | | | {gib(r['hbm'])} | |"
                   + " |" * roofline + " |")
      continue
    p, rep = r["plan"], r["report"]
    micro = GLOBAL_BATCH // (p["data"] * p["fsdp"] * p["accum"])
    ratio = (f"{rep['compiler_flops_per_device'] / rep['analytic_flops_per_device']:.2f}"
             if rep.get("compiler_flops_per_device") else "")
    bound = ""
    if roofline and rep.get("roofline"):
      f = rep["roofline"]
      mfu = f", {f['mfu_at_most']:.2f}" if f.get("mfu_at_most") else ""
      bound = f" {f['least_step_s']:.2f}{mfu} |"
    elif roofline:
      bound = " |"
    lines.append(
        f"| {r['model']} | {r['topology']} | {r[count]} | ({p['data']}, {p['fsdp']}, "
        f"{p['tensor']}) | {p['remat']} | {p['accum']} | {micro} | {gib(rep['memory']['total'])} "
        f"| {gib(r['hbm'])} | {ratio} |{bound} {rep['compile_s']:.0f} |")
  return lines


def tried_lines(rows: list[dict]) -> list[str]:
  """One line per row: each candidate's compile time and memory per device."""
  lines = []
  for r in rows:
    times = ", ".join(f"{t['compile_s']:.0f} s " + (f"({gib(t['total'])} GiB)" if t["total"]
                                                    else "(refused by the compiler)")
                      for t in r["tried"])
    lines.append(f"- {r['model']} on {r['topology']}: {times or 'none'}")
  return lines


# ----------------------------------------------------------------------------- document

PAPER_20B_CHIPS = 1024  # TPU v4 chips the paper trained 20B on (16-stage pipelines x 64)


def read_plans(path: str = os.path.join(REPO, "docs", "scaling.md")) -> list[dict]:
  """The plans of a page `write_doc` wrote: model, slice, chips and mesh (data, fsdp,
  tensor) of each row that has one (the planner's tests and benchmarks/bucket_input.py)."""
  with open(path) as f:  # the repository's own page
    text = f.read()
  return [dict(model=m[1], topology=m[2], chips=int(m[3]),
               mesh=dict(zip(("data", "fsdp", "tensor"), map(int, m[4].split(",")))),
               remat=m[5], accum=int(m[6]))
          for m in re.finditer(r"^\| (\w+) \| (v\w+-\d+) \| (\d+) \| \(([\d, ]+)\) \| (\w+) \| "
                               r"(\d+) \|", text, re.MULTILINE)]


def write_doc(rows: list[dict], path: str) -> None:
  lines = [
      "# Scaling Parti on TPU slices and NVIDIA GPUs",
      "",
      "Generated by `python scripts/scaling_table.py` (do not edit by hand). Every plan below",
      "was compiled on a CPU host, for the named slice, by the TPU compiler through",
      "`python -m parti_jax.aot`, which compiles the trainer's own step (same function,",
      "shardings and donated state): the memory is the compiler's buffer plan per chip.",
      "Each is compiled with the configs' defaults otherwise: `model.attention_impl=auto`",
      "(the Pallas splash kernel on TPUs), sequence parallelism over the tensor axis, and",
      "bfloat16 momentum (int8 takes about half its bytes: the comparison below).",
      "",
      f"All rows train at the paper's global batch of {GLOBAL_BATCH}. Slice names are Cloud",
      "TPU's: v4-N and v5p-N count TensorCores (two per chip), v5e-N and v6e-N count chips.",
      "",
      "- mesh: `--config.mesh.data/fsdp/tensor`; micro-batches: `--config.grad_accum_steps`;",
      "  per chip: examples each chip computes per micro-batch.",
      "- memory / chip: arguments + outputs - donated + temporaries + generated code.",
      "- compiler / analytic FLOPs: XLA's FLOPs of the step (loop bodies counted per",
      "  iteration) over the analytic count behind MFU. Above 1 by what remat recomputes",
      "  (a layer's last matmul is not: remat=full gives about 1.25, not 4/3), the causal",
      "  half of attention that the dense mask computes anyway, and elementwise work; below",
      "  it by attention, which XLA's count does not see inside the splash kernel.",
      "",
      "| model | slice | chips | mesh (data, fsdp, tensor) | remat | micro-batches | per chip "
      "| memory / chip (GiB) | HBM (GiB) | compiler / analytic FLOPs | compile (s) |",
      "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  lines += plan_lines(rows, "chips")
  v4_20b = [r for r in rows if r["model"] == "20b" and r["generation"] == "v4" and r["plan"]]
  if v4_20b:
    fewest = min(v4_20b, key=lambda r: r["chips"])
    lines += ["", f"The paper trained 20B at this batch on {PAPER_20B_CHIPS} TPU v4 chips with "
              "pipelining; here it fits on", f"{fewest['chips']} v4 chips ({fewest['topology']}), "
              f"{PAPER_20B_CHIPS // fewest['chips']}x fewer, with FSDP and tensor parallelism."]
  lines += [
      "",
      "## Several slices",
      "",
      "`--config.mesh.num_slices=K` trains on K slices of one topology joined over the",
      "data-centre network (DCN), which is much slower than the ICI links inside a slice. The",
      "mesh splits only the data axis across the slices (`mesh.data` must be a multiple of K);",
      "fsdp and tensor stay inside each slice, because they communicate in every layer (fsdp",
      "gathers the weights, tensor parallelism reduces activations). What crosses DCN is data",
      "parallelism's all-reduce of the gradients: once per step, or once per micro-batch with",
      "`grad_accum_steps` > 1, because the trainer reduces each micro-batch's gradients into",
      "the parameters' layout inside its accumulation loop (in the compiled step for 2 x v4-8,",
      "these all-reduces are the only transfers between slices).",
      "",
      "Several slices pay when the model fits one slice with 1/K of the global batch (plan it:",
      "`python -m parti_jax.aot --topology v4-512 --num_slices 2 --config.mesh.data=2 ...`)",
      "and a step's compute is long next to that all-reduce, which moves about the gradients'",
      "bytes (4 per parameter) in and out of every slice: many examples per chip and few",
      "micro-batches. A model that does not fit one slice does not fit several; and where one",
      "slice of K times the chips is available, it keeps every transfer on ICI.",
      "",
      "## How the plans were chosen",
      "",
      "Each candidate (mesh, remat policy, micro-batches) that the config checks accept is",
      "ranked by a rough model of step time: recomputation (none 1, dots and qkv_up 1.15,",
      "full 4/3),",
      "times 1 + 0.9 / (examples per chip per micro-batch) when FSDP gathers the weights",
      "again for every micro-batch, times 1 + 0.1 / (examples per chip per micro-batch) for",
      "the matrix units' efficiency, times 1 + 0.05 log2(tensor) for tensor-parallel",
      "communication. An analytic estimate of the memory per chip skips candidates expected",
      f"to use more than {HEADROOM:.0%} of HBM; the best-ranked remaining one is compiled.",
      f"A plan is kept if the compiler leaves at least {1 - PLAN_MAX:.0%} of HBM free; one that",
      "does not corrects the estimate before the next pick, and a kept plan is followed by",
      "better-ranked candidates while compiles remain (at most 3 per row). The",
      "ranking is a heuristic; measure step time on the slice (`train.profile_steps`) before",
      "a long run.",
      "",
      "## Compile time of every candidate tried",
      "",
      "Seconds on the 2-core host that generated this page, and the memory per chip.",
      "",
  ]
  lines += tried_lines(rows)
  # The comparison and the GPU section, which other runs generate, stay before "Several
  # slices", where write_section puts them.
  at = lines.index("## Several slices")
  lines[at:at] = [line for section in sections(path) for line in (section, "")]
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")


FLAGS = cli.Flags(__doc__)
FLAGS.string("rows", "", "model:slice,... (default: all rows).")
FLAGS.integer("max_compiles", 3, "Compiles per row.")
FLAGS.integer("timeout", 3600, "Seconds per compile.")
FLAGS.string("out", os.path.join(REPO, "docs", "scaling.md"), "The page written.")
FLAGS.string("cache", DEFAULT_CACHE, "Compile reports, one per line.")
FLAGS.bool("gpus", False, "Search the NVIDIA GPU rows instead (GPU_ROWS, or --rows) and "
           "rewrite only the page's GPU section.")
FLAGS.bool("compare", False, "Compile the attention and momentum comparison instead "
           "(COMPARE_ROWS, up to --max_compiles variants each) and rewrite only its section.")


def main(argv=None):
  args = FLAGS.parse(argv)
  given = [tuple(r.split(":")) for r in args.rows.split(",")] if args.rows else None
  if args.compare:
    rows = given or COMPARE_ROWS
    results = []
    for model, topology in rows:
      print(f"{model} on {topology}", flush=True)
      results.append(compare(model, topology, args.timeout, args.cache, args.max_compiles))
      write_comparison(results, args.out)
    print(f"wrote the comparison into {args.out}")
    return
  if args.gpus:
    # The page's budget is JAX's default share of a card, whatever this shell sets.
    for name in ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_ALLOCATOR"):
      os.environ.pop(name, None)
    rows = given or GPU_ROWS
    results = []
    for model, topology in rows:
      print(f"{model} on {topology}", flush=True)
      results.append(search(model, topology, args.max_compiles, args.timeout, args.cache))
      write_section(gpu_lines(results), GPUS_BEGIN, GPUS_END, args.out)
    print(f"wrote the GPU section into {args.out}")
    return
  rows = given or ROWS
  results = []
  for model, topology in rows:
    print(f"{model} on {topology}", flush=True)
    results.append(search(model, topology, args.max_compiles, args.timeout, args.cache))
    write_doc(results, args.out)  # after every row: a long run shows its progress
  print(f"wrote {args.out}")


if __name__ == "__main__":
  cli.run(main)
