"""Machines the planner compiles for, by name, and their compile-only devices.

  python -c "from parti_jax import topologies; print(topologies.get('v5p-256'))"

Cloud TPU slices (v4-N, v5e-N, v5p-N, v6e-N): a slice name counts TensorCores on v4 and
v5p (two per chip, used as one "megacore" device) and chips on v5e and v6e (one core each);
either way JAX sees one device per chip. `Slice.devices()` asks libtpu for abstract devices
of that shape, against which the TPU compiler can compile on a host without TPUs.

NVIDIA GPU machines (a100-N, h100-N, h200-N): N GPUs, eight per host beyond one host (as
in DGX/HGX nodes). `GpuMachine.devices()` asks JAX's CUDA plugin for abstract devices of
that model, described to XLA's GPU compiler by a target config, so that it too compiles on
a host without the GPU (see parti_jax.aot).
"""

import dataclasses
import os
import re

GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Generation:
  compiler_name: str  # the prefix of libtpu's topology names ("v5" is v5p)
  cores_per_name_unit: int  # 2: the slice name counts TensorCores, two per chip
  hbm_bytes: int  # per chip
  shapes: dict  # chips -> chip grid


# Slices with a power-of-two number of chips; the grids are the shapes Cloud TPU gives.
_CUBES = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4),
          128: (4, 4, 8), 256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16),
          2048: (8, 16, 16), 4096: (16, 16, 16)}
_PLANES = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8),
           128: (8, 16), 256: (16, 16)}

GENERATIONS = {
    "v4": Generation("v4", 2, 32 * GIB, _CUBES),
    "v5e": Generation("v5e", 1, 16 * GIB, _PLANES),
    "v5p": Generation("v5", 2, 95 * GIB, _CUBES),
    "v6e": Generation("v6e", 1, 32 * GIB, _PLANES),
}
ALIASES = {"v5litepod": "v5e"}  # Cloud TPU's accelerator type for v5e slices


class UnknownTopology(ValueError):
  """A machine name that `get` does not know; the message lists the known ones."""


class NoCompiler(RuntimeError):
  """The machine is known, but the compiler for it is not installed here."""


class BadEnvironment(ValueError):
  """An environment variable the plan depends on has a value that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str  # as written in this project: v4-512, v5e-256, v5p-256, v6e-64
  generation: str
  chips: int
  grid: tuple[int, ...]

  @property
  def spec(self) -> Generation:
    return GENERATIONS[self.generation]

  @property
  def topology(self) -> str:
    """libtpu's name of the slice, e.g. "v5:4x4x8"."""
    return f"{self.spec.compiler_name}:{'x'.join(map(str, self.grid))}"

  @property
  def hbm_bytes(self) -> int:
    return self.spec.hbm_bytes

  def devices(self, num_slices: int = 1) -> list:
    """One compile-only device per chip, laid out as on the real slice; with num_slices > 1,
    that many such slices joined over DCN (devices carry their `slice_index`)."""
    # libtpu allows one process per machine unless told that this one only compiles.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies  # needs libtpu: pip install 'jax[tpu]'
    three_d = len(self.grid) == 3
    options = dict(chip_config_name="megacore" if three_d else "default",
                   chips_per_host_bounds=tuple(min(g, b) for g, b in
                                               zip(self.grid + (1,) * (3 - len(self.grid)),
                                                   (2, 2, 1))),
                   num_slices=num_slices)
    # Full-size tori have wrap-around links; the compiler plans collectives over them.
    if three_d and min(self.grid) >= 4:
      options["wrap"] = (True, True, True)
    elif not three_d and self.grid == (16, 16):
      options["wrap"] = (True, True, False)
    return topologies.get_topology_desc(
        platform="tpu", topology_name=self.topology, **options).devices


def names() -> list[str]:
  """The TPU slice names, then the GPU machines' patterns."""
  tpus = [f"{g}-{chips * spec.cores_per_name_unit}"
          for g, spec in GENERATIONS.items() for chips in spec.shapes]
  counts = ", ".join(map(str, GPU_COUNTS))
  return tpus + [f"{', '.join(f'{model}-N' for model in GPUS)} (N GPUs: {counts} or a "
                 f"multiple of {GPUS_PER_HOST})"]


def get(name: str) -> "Slice | GpuMachine":
  """The machine called `name`: a TPU slice (v4-8 ... v4-8192, v5e-1 ... v5e-256,
  v5p-8 ..., v6e-1 ...) or N GPUs of one model (h100-8, h200-1, a100-64, ...)."""
  key = name.strip().lower()
  gpu = re.fullmatch(r"([a-z]\d+)-(\d+)", key)
  if gpu and gpu[1] in GPUS and (int(gpu[2]) in GPU_COUNTS or
                                 int(gpu[2]) > 0 and int(gpu[2]) % GPUS_PER_HOST == 0):
    return GpuMachine(key, gpu[1], int(gpu[2]))
  match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", key)
  generation = match and ALIASES.get(match[1], match[1])
  spec = GENERATIONS.get(generation)
  chips = int(match[2]) // spec.cores_per_name_unit if spec else 0
  if not spec or chips not in spec.shapes or int(match[2]) % spec.cores_per_name_unit:
    raise UnknownTopology(f"unknown topology {name!r}; known: {', '.join(names())}")
  return Slice(f"{generation}-{match[2]}", generation, chips, spec.shapes[chips])


# ----------------------------------------------------------------------------- GPUs

@dataclasses.dataclass(frozen=True)
class Gpu:
  """What XLA's GPU compiler asks of the device it compiles for, from NVIDIA's data sheets
  (and what `nvidia-smi` and the CUDA runtime report on the cards)."""
  device_kind: str  # as the CUDA runtime names the card (JAX's device_kind)
  compute_capability: tuple[int, int]
  memory_bytes: int  # the card's total, as the CUDA runtime or nvidia-smi reports it
  sms: int  # streaming multiprocessors ("cores" to XLA)
  fp32_lanes_per_sm: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int
  l2_bytes: int
  clock_ghz: float
  bandwidth_bytes_per_s: float

  def target_config(self) -> str:
    """The card as a GpuTargetConfigProto in text form, for compiling without it."""
    major, minor = self.compute_capability
    dnn_major, dnn_minor, dnn_patch = _cudnn_version()
    # Hopper's wgmma instructions are in the "a" (architecture-specific) feature set.
    extension = "ACCELERATED_FEATURES" if major >= 9 else "NONE"
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  shared_memory_per_block: 49152 shared_memory_per_core: {self.shared_memory_per_sm}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  core_count: {self.sms} fpus_per_core: {self.fp32_lanes_per_sm}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  thread_dim_limit_x: 1024 thread_dim_limit_y: 1024 thread_dim_limit_z: 64
  memory_bandwidth: {int(self.bandwidth_bytes_per_s)} l2_cache_size: {self.l2_bytes}
  clock_rate_ghz: {self.clock_ghz} device_memory_size: {self.memory_bytes}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: {extension} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn_major} minor: {dnn_minor} patch: {dnn_patch} }}
device_description_str: "{self.device_kind}"
"""


GPUS = {
    "a100": Gpu("NVIDIA A100-SXM4-80GB", (8, 0), 85_100_068_864, 108, 64, 167_936, 166_912,
                40 * 2 ** 20, 1.41, 2.039e12),
    "h100": Gpu("NVIDIA H100 80GB HBM3", (9, 0), 84_942_979_072, 132, 128, 233_472, 232_448,
                50 * 2 ** 20, 1.98, 3.35e12),
    # nvidia-smi's total for an H200 SXM (143,771 MiB); the runtime's may be a little less.
    # benchmarks/gpu_figures.sh prints what JAX sees on the card.
    "h200": Gpu("NVIDIA H200", (9, 0), 143_771 * 2 ** 20, 132, 128, 233_472, 232_448,
                50 * 2 ** 20, 1.98, 4.8e12),
}
GPUS_PER_HOST = 8  # HGX/DGX nodes; smaller counts are one host's GPUs
GPU_COUNTS = (1, 2, 4)  # besides multiples of GPUS_PER_HOST
# JAX's allocator takes this share of a GPU's memory unless the environment says otherwise
# (jax_memory_fraction); a step fits only in that share.
DEFAULT_MEM_FRACTION = 0.75


def jax_memory_fraction(environ=os.environ) -> tuple[float, str]:
  """The share of a GPU's memory JAX's allocator will take, read as jaxlib reads it when it
  starts its GPU client (jaxlib/xla_client.py), and the setting it comes from."""
  if environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "").lower() == "platform":
    return 1.0, "XLA_PYTHON_CLIENT_ALLOCATOR=platform: no pool, the whole card"
  new, old = (environ.get(name, "") for name in
              ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION"))
  if new and old:  # JAX refuses to start with both
    raise BadEnvironment("XLA_CLIENT_MEM_FRACTION and XLA_PYTHON_CLIENT_MEM_FRACTION are "
                         "both set; JAX refuses that: unset the latter (deprecated)")
  name = "XLA_PYTHON_CLIENT_MEM_FRACTION" if old else "XLA_CLIENT_MEM_FRACTION"
  value = new or old
  if not value:  # empty is unset, as for JAX
    return DEFAULT_MEM_FRACTION, f"JAX's default ({name} unset)"
  try:
    fraction = float(value)
  except ValueError:
    fraction = -1.0
  if not 0 < fraction <= 1:
    raise BadEnvironment(f"{name}={value!r}: JAX's share of a GPU's memory is a number in "
                         "(0, 1]")
  return fraction, f"{name}={value}"


def _cudnn_version() -> tuple[int, int, int]:
  """The cuDNN the compiler is told the card has: the one installed here, with which JAX
  lowers the fused attention (else JAX's floor for CUDA 13)."""
  from importlib import metadata
  try:
    version = metadata.version("nvidia-cudnn-cu13")
  except metadata.PackageNotFoundError:
    return 9, 12, 0
  major, minor, patch = (version.split(".") + ["0", "0"])[:3]
  return int(major), int(minor), int(patch)


@dataclasses.dataclass(frozen=True)
class GpuMachine:
  name: str  # h100-8, h200-1, a100-64
  model: str
  chips: int  # GPUs, one JAX device each

  @property
  def spec(self) -> Gpu:
    return GPUS[self.model]

  @property
  def hosts(self) -> int:
    return max(1, self.chips // GPUS_PER_HOST)

  @property
  def topology(self) -> str:
    """The CUDA plugin's name of the layout: slices x hosts x GPUs per host."""
    return f"1x{self.hosts}x{self.chips // self.hosts}"

  @property
  def hbm_bytes(self) -> int:
    """What a step may use per GPU: JAX's share of its memory (jax_memory_fraction)."""
    return int(self.spec.memory_bytes * jax_memory_fraction()[0])

  def devices(self, num_slices: int = 1) -> list:
    """One compile-only device per GPU, numbered host by host as on the real machines."""
    # Hosts of GPUs are not grouped into slices: the hosts in the name are the machine.
    assert num_slices == 1, "GPU machines are one slice"
    from jax.experimental import topologies  # needs JAX's CUDA plugin (see parti_jax.aot)
    try:
      return topologies.get_topology_desc(
          "parti_jax", "cuda", target_config=self.spec.target_config(),
          topology=self.topology).devices
    except NotImplementedError as e:  # no plugin registered for "cuda"
      import jax
      raise NoCompiler(
          f"planning for {self.name} needs JAX's CUDA plugin and cuDNN (no GPU): pip install "
          f"'jax[cuda13-local]=={jax.__version__}' nvidia-cudnn-cu13; and, without a GPU's "
          "libraries, the CPU as JAX's platform (JAX_PLATFORMS=cpu, which `python -m "
          f"parti_jax.aot` sets), so that the plugin loads without checking them ({e})") from e
