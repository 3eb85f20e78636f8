"""The least time a compiled step can take: its kernels' bytes and FLOPs at a chip's spec.

  from parti_jax import roofline
  r = roofline.of_hlo(compiled.as_text())
  r.seconds(peak_flops=989e12, bandwidth=4.8e12)   # no kernel faster than its roofline

Each kernel of the optimised program (a fusion, a custom call such as cuBLAS's or cuDNN's,
a copy) must at least move its bytes through HBM and do its matrix products' FLOPs; it takes
at least max(bytes / bandwidth, FLOPs / peak). Summed over the kernels, loop bodies once per
iteration, this bounds the step from below, hence MFU from above, before the program ever
runs: the planner (`python -m parti_jax.aot --topology h200-1`) reports it for GPUs, and
`benchmarks/profile_summary.py --roofline` sets it beside a measured trace, group by group.
It is a strict bound for a program of one device whose loops have trip counts the compiler
knows (as jax's scans do). Otherwise it is an estimate: a conditional counts its dearer
branch (the train step's update, not its skip); collectives that overlap computation are
added to it; and a loop whose trip count is not known (a `while_loop` on data, as the
sampler's whole generation) is counted once and reported in `loops_counted_once`.

Written here because XLA's own cost analysis, as JAX exposes it, counts a loop body once,
counts a fused read of one layer's slice of the stacked weights as the whole stack, and
does not count cuDNN's custom calls at all. What is counted:
- bytes: each kernel's operands and outputs, except that an operand a fusion only slices
  (a scanned layer's weights) counts as the slice, and an output written in place (a
  dynamic-update-slice or scatter into a donated buffer, as the KV cache) counts as the
  update;
- FLOPs: matrix products (dots, cuBLAS calls) and cuDNN's fused attention. Elementwise
  arithmetic is not priced: a kernel bound by its ALUs (threefry's random bits) looks
  cheaper here than it is, and so do products XLA writes as multiply-and-reduce fusions
  (a decode step's attention over its cache), though those are bound by their bytes.
Collectives are counted as the bytes they read and write on the chip, not as link time;
a cuBLAS call's workspace is not counted.
"""

import dataclasses
import json
import math
import re

# HLO instructions that run no kernel of their own.
_NO_KERNEL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
              "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain"}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\((.*)")
_ARRAY = re.compile(r"\b(pred|token|[a-z]+\d+\w*)\[([\d,]*)\]")
_SLICES = ("dynamic-slice", "slice", "gather")
_VIEWS = ("bitcast", "reshape")  # the same bytes under another shape


@dataclasses.dataclass(frozen=True)
class Kernel:
  name: str  # the HLO instruction
  opcode: str
  bytes: float  # read and written, per run
  flops: float  # matrix products, per run
  runs: int  # per step: the trip counts of the loops around it

  def seconds(self, peak_flops: float, bandwidth: float) -> float:
    """The least time of all its runs."""
    return self.runs * max(self.bytes / bandwidth, self.flops / peak_flops)


@dataclasses.dataclass(frozen=True)
class Roofline:
  kernels: list[Kernel]
  loops_counted_once: int = 0  # while loops whose trip count the compiler does not know

  @property
  def bytes(self) -> float:
    return sum(k.bytes * k.runs for k in self.kernels)

  @property
  def flops(self) -> float:
    return sum(k.flops * k.runs for k in self.kernels)

  def seconds(self, peak_flops: float, bandwidth: float) -> float:
    return sum(k.seconds(peak_flops, bandwidth) for k in self.kernels)


def array_bytes(shape: str) -> float:
  """Bytes of an HLO shape ("bf16[8,128]{1,0}", or a tuple of them)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    bits = 8 if dtype == "pred" else 0 if dtype == "token" else int(re.match(r"[a-z]+(\d+)",
                                                                            dtype)[1])
    total += math.prod(int(d) for d in dims.split(",") if d) * bits / 8
  return total


def split_computations(text: str) -> tuple[dict[str, str], str]:
  """HLO module text -> ({computation name: its text without ENTRY}, the entry's name)."""
  computations, entry, name, lines = {}, None, None, []
  for line in text.splitlines():
    if name is None and line.endswith("{") and not line.startswith((" ", "HloModule")):
      header = line.removeprefix("ENTRY ")
      name = header.split(" ", 1)[0].lstrip("%")
      entry = name if header != line else entry
      lines = [header]
    elif name is not None:
      lines.append(line)
      if line == "}":
        computations[name], name = "\n".join(lines), None
  return computations, entry


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  shape: str
  opcode: str
  operands: list[str]  # names
  attributes: str  # the rest of the line
  root: bool


def _arguments(rest: str) -> tuple[list[str], str]:
  """`a, b), attrs` -> ([operand names], attrs): up to the closing parenthesis."""
  depth, parts, current = 1, [], ""
  for i, char in enumerate(rest):
    depth += {"(": 1, "[": 1, "{": 1, ")": -1, "]": -1, "}": -1}.get(char, 0)
    if depth == 0:
      parts.append(current)
      return [p.split()[-1].lstrip("%") for p in parts if p.strip()], rest[i + 1:]
    if char == "," and depth == 1:
      parts.append(current)
      current = ""
    else:
      current += char
  return [], rest


def _parse(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  computations, entry = split_computations(text)
  parsed = {}
  for name, body in computations.items():
    instructions = []
    for line in body.splitlines()[1:]:
      m = _INSTRUCTION.match(re.sub(r"/\*.*?\*/", "", line))  # "/*index=5*/" in tuples
      if m:
        operands, attributes = _arguments(m[4])
        instructions.append(_Instruction(m[1], m[2], m[3], operands, attributes,
                                         line.lstrip().startswith("ROOT")))
    parsed[name] = instructions
  return parsed, entry


class _Program:
  def __init__(self, text: str):
    self.computations, self.entry = _parse(text)
    self.shapes = {(c, i.name): i.shape for c, body in self.computations.items() for i in body}

  def shape(self, computation: str, operand: str) -> str:
    return self.shapes.get((computation, operand), "")

  def called(self, instruction: _Instruction) -> str | None:
    m = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
    return m[1] if m and m[1] in self.computations else None

  # -- bytes

  def fusion_bytes(self, computation: str) -> float:
    """What a fusion reads and writes, given its fused computation."""
    body = self.computations[computation]
    users = {}
    for i in body:
      for position, operand in enumerate(i.operands):
        users.setdefault(operand, []).append((i, position))
    root = next(i for i in body if i.root)
    in_place = {root.operands[0]} if root.opcode in ("dynamic-update-slice", "scatter") else set()
    if root.opcode == "tuple":  # several outputs, some perhaps written in place
      by_name = {i.name: i for i in body}
      in_place = {by_name[o].operands[0] for o in root.operands
                  if by_name[o].opcode in ("dynamic-update-slice", "scatter")}
    read = 0.0
    for i in body:
      if i.opcode != "parameter":
        continue
      uses = users.get(i.name, [])
      if i.name in in_place and len(uses) == 1:
        continue  # the buffer written in place: only the update moves
      sliced = _sliced_bytes(i.name, users)
      read += min(sliced, array_bytes(i.shape)) if sliced is not None else array_bytes(i.shape)
    return read + self.written(computation, root)

  def written(self, computation: str, root: _Instruction) -> float:
    """Bytes a fusion writes, given the root of its fused computation."""
    if root.opcode == "tuple":
      by_name = {i.name: i for i in self.computations[computation]}
      return sum(self.written(computation, by_name[o]) for o in root.operands)
    if root.opcode == "dynamic-update-slice":
      return array_bytes(self.shape(computation, root.operands[1]))
    if root.opcode == "scatter":  # scatter(operand, indices, updates): the updates
      return array_bytes(self.shape(computation, root.operands[-1]))
    return _results_bytes(root)

  # -- FLOPs

  def flops(self, computation: str, i: _Instruction) -> float:
    if i.opcode == "dot":
      contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attributes)
      return self._product_flops(computation, i, contracting[1] if contracting else "")
    if i.opcode == "custom-call":
      target = re.search(r'custom_call_target="([^"]*)"', i.attributes)
      target = target[1] if target else ""
      if "fmha" in target:
        return self._attention_flops(computation, i, backward="Backward" in target)
      if re.search(r"gemm|matmul", target, re.I):
        config = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', i.attributes)
        dims = ",".join(json.loads(f"[{config[1]}]")) if config else ""
        return self._product_flops(computation, i, dims)
    called = self.called(i)
    return sum(self.flops(called, j) for j in self.computations[called]) if called else 0.0

  def _product_flops(self, computation, i, contracting: str) -> float:
    lhs = _ARRAY.search(self.shape(computation, i.operands[0]))
    out = _ARRAY.search(i.shape)  # the first array: a gemm's result comes before its workspace
    if not lhs or not out:
      return 0.0
    lhs_dims = [int(d) for d in lhs[2].split(",") if d]
    k = math.prod(lhs_dims[int(d)] for d in contracting.split(",") if d)
    return 2.0 * math.prod(int(d) for d in out[2].split(",") if d) * k

  def _attention_flops(self, computation, i, backward: bool) -> float:
    """cuDNN's fused attention: queries [B, S, H, D], keys [B, T, H, D]. Forward: two
    products of 2*B*S*T*H*D FLOPs (scores, then values); backward: five (the scores again,
    then the gradients of the probabilities, values, queries and keys)."""
    q, k = (_ARRAY.search(self.shape(computation, o)) for o in i.operands[:2])
    if not q or not k:
      return 0.0
    q_dims, k_dims = ([int(d) for d in a[2].split(",") if d] for a in (q, k))
    if len(q_dims) != 4 or len(k_dims) != 4:
      return 0.0
    # Skips the blocks above the diagonal (the backend config is JSON, spaced or not).
    causal = 0.5 if re.search(r'"mask_type":\s*"CAUSAL"', i.attributes) else 1.0
    return (10.0 if backward else 4.0) * causal * math.prod(q_dims) * k_dims[1]

  # -- the walk

  def kernels(self) -> list[Kernel]:
    out = []
    self.loops_counted_once = 0
    self._walk(self.entry, 1, out)
    return out

  def _walk(self, computation: str, runs: int, out: list[Kernel]) -> None:
    for i in self.computations[computation]:
      if i.opcode == "while":
        body = re.search(r"body=%?([\w.\-]+)", i.attributes)[1]
        known = re.search(r'"known_trip_count":\{"n":"(\d+)"', i.attributes)
        self.loops_counted_once += not known
        self._walk(body, runs * (int(known[1]) if known else 1), out)
      elif i.opcode == "conditional":
        # One branch runs: count the dearer (by bytes), as the module's docstring says.
        listed = re.search(r"branch_computations=\{([^}]*)\}", i.attributes)
        branches = (re.findall(r"[\w.\-]+", listed[1]) if listed else
                    re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", i.attributes))
        options = []
        for b in [b for b in branches if b in self.computations]:
          found = []
          self._walk(b, runs, found)
          options.append(found)
        out += max(options, key=lambda ks: sum(k.bytes * k.runs for k in ks), default=[])
      elif i.opcode == "call":
        m = re.search(r"to_apply=%?([\w.\-]+)", i.attributes)
        self._walk(m[1], runs, out)
      elif i.opcode in _NO_KERNEL or i.opcode.endswith("-done"):
        continue
      else:
        # An async fusion (fusion-start, as XLA:GPU schedules a scan's dynamic slices and
        # in-place updates) moves what its fused computation does, as a fusion would.
        called = self.called(i) if i.opcode in ("fusion", "fusion-start") else None
        out.append(Kernel(i.name, i.opcode,
                          self.fusion_bytes(called) if called else self.bytes(computation, i),
                          self.flops(computation, i), runs))

  def bytes(self, computation: str, i: _Instruction) -> float:
    """What an instruction other than a fusion reads and writes."""
    if i.opcode.endswith("-start") and i.shape.startswith("("):
      # An async start's shape holds its operands (or their buffers) and its results.
      return array_bytes(i.shape)
    return _results_bytes(i) + sum(array_bytes(self.shape(computation, o)) for o in i.operands)


def of_hlo(text: str) -> Roofline:
  """The kernels of an optimised HLO module (`compiled.as_text()`), with their loops' trip
  counts."""
  program = _Program(text)
  kernels = program.kernels()
  return Roofline(kernels, program.loops_counted_once)


def _results_bytes(i: _Instruction) -> float:
  """Bytes of what an instruction writes: its shape, less a library call's workspace."""
  if i.opcode == "custom-call" and i.shape.startswith("("):
    arrays = [m.group(0) for m in _ARRAY.finditer(i.shape)]
    if len(arrays) > 1 and re.match(r"[su]8\[", arrays[-1]):  # scratch, last by convention
      return sum(array_bytes(a) for a in arrays[:-1])
  return array_bytes(i.shape)


def _sliced_bytes(name: str, users: dict) -> float | None:
  """The bytes of `name` a fusion reads if every use of it (through bitcasts and reshapes)
  slices it, else None. A slice sliced again counts as the inner slice (a layer's slice of
  the stacked KV cache, of which a decode step's segment reads the first positions)."""
  uses = users.get(name, [])
  if not uses:
    return None
  total = 0.0
  for use, position in uses:
    if use.opcode in _SLICES and position == 0:
      inner = _sliced_bytes(use.name, users)
      total += array_bytes(use.shape) if inner is None else min(inner, array_bytes(use.shape))
    elif use.opcode in _VIEWS:
      inner = _sliced_bytes(use.name, users)
      if inner is None:
        return None
      total += inner
    else:
      return None
  return total
