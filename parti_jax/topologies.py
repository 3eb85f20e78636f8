"""Cloud TPU slice names (v4-N, v5e-N, v5p-N, v6e-N) and their compile-only devices.

  python -c "from parti_jax import topologies; print(topologies.get('v5p-256'))"

A slice name counts TensorCores on v4 and v5p (two per chip, used as one "megacore"
device) and chips on v5e and v6e (one core each); either way JAX sees one device per
chip. `Slice.devices()` asks libtpu for abstract devices of that shape, against which
the TPU compiler can compile on a host without TPUs (see parti_jax.aot).
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
  """A slice name that is not in `names()`; the message lists the known ones."""


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
  return [f"{g}-{chips * spec.cores_per_name_unit}"
          for g, spec in GENERATIONS.items() for chips in spec.shapes]


def get(name: str) -> Slice:
  """The slice called `name` (v4-8 ... v4-8192, v5e-1 ... v5e-256, v5p-8 ..., v6e-1 ...)."""
  match = re.fullmatch(r"(v4|v5e|v5litepod|v5p|v6e)-(\d+)", name.strip().lower())
  generation = match and ALIASES.get(match[1], match[1])
  spec = GENERATIONS.get(generation)
  chips = int(match[2]) // spec.cores_per_name_unit if spec else 0
  if not spec or chips not in spec.shapes or int(match[2]) % spec.cores_per_name_unit:
    raise UnknownTopology(f"unknown TPU topology {name!r}; known: {', '.join(names())}")
  return Slice(f"{generation}-{match[2]}", generation, chips, spec.shapes[chips])
