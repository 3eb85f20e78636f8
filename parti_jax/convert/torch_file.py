"""Read a PyTorch checkpoint file (`torch.save` of a state dict) into numpy, without torch.

Written by hand because torch is not a dependency of the package and no library we use reads
these files: the converters must run on any machine that can run parti_jax. Both formats
`torch.save` has written are read:
  * the zip format (torch >= 1.6): `*/data.pkl` plus one raw file per storage in `*/data/`;
  * the legacy format (older files, e.g. torchvision's VGG-16 and pytorch-fid's Inception):
    consecutive pickles (magic, protocol, system info, the object, storage keys), then each
    storage as an 8-byte element count followed by its raw bytes.

A weights file is data, never code (docs/trust.md). Every pickle in it goes through an
unpickler that builds only tensors and plain containers (the legacy header's and the key
list's: no class at all) and refuses anything else, so a file cannot run code. What a file
may cost is bounded before it is spent: each pickle's length, every size the file declares
(element counts, zip members) against the bytes the file really has, zip members' expansion,
and the bytes the rebuilt tensors may take. Any refusal is a TorchFileError naming the file.
"""
import collections
import io
import math
import pickle
import zipfile

import numpy as np
from etils import epath

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# A state dict's pickle holds names, shapes and storage keys, never weights: a few MB for
# the largest models. The legacy header pickles are a number, a number and a small dict.
MAX_PICKLE_BYTES = 64 << 20
MAX_HEADER_PICKLE_BYTES = 64 << 10
# torch.save stores zip members unpacked; a re-zipped file's floats shrink by a few percent.
# A member may expand this much (members of at most MIN_RATIO_CHECKED bytes go unchecked),
# and all members read together this much over the archive's size: far past any real file,
# far short of a zip bomb's thousandfold.
MAX_COMPRESSION_RATIO = 100
MIN_RATIO_CHECKED = 64 << 10
# Tensors are copied out of their storages. Views share storages (tied weights share one),
# so the copies may exceed the stored bytes, by at most this factor plus the allowance.
MAX_COPY_FACTOR = 4
COPY_ALLOWANCE = 64 << 20

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class TorchFileError(ValueError):
  """The file is not a PyTorch state dict this reader understands."""


class _Refused(Exception):
  """Raised while reading; `load` turns it into a TorchFileError naming the file."""


class _Frozen:
  """Pickle's BUILD opcode sets an object's state: the reader's own objects refuse it."""

  def __setstate__(self, state):
    raise _Refused(f"the pickle sets the state of a {type(self).__name__.lstrip('_')}")


class _StorageType(_Frozen):
  def __init__(self, name):
    self.name = name
    dtype = _STORAGE_DTYPES.get(name)
    if dtype is None:
      raise _Refused(f"unsupported tensor storage type {name}")
    if dtype == "bfloat16":
      import ml_dtypes  # a jax dependency
      dtype = ml_dtypes.bfloat16
    self.dtype = np.dtype(dtype)


class _Storage(_Frozen):
  """A storage the pickle names; its bytes are read once the pickle is done."""

  def __init__(self, key: str, dtype: np.dtype):
    self.key, self.dtype = key, dtype


class _Tensor(_Frozen):
  """A strided view of a storage, copied out once every storage is read."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not isinstance(storage, _Storage):
    raise _Refused(f"a tensor over a {type(storage).__name__}, not a storage")
  ints = [offset, *size, *stride] if isinstance(size, tuple) and isinstance(stride, tuple) else []
  if (not ints or len(size) != len(stride)
      or not all(type(i) is int and i >= 0 for i in ints)):  # noqa: E721  bool is no size
    raise _Refused(f"a tensor with offset {offset!r:.40}, size {size!r:.80}, stride "
                   f"{stride!r:.80}: not a tensor's geometry")
  return _Tensor(storage, offset, size, stride)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
  """Builds tensors (as `_Tensor`s) and plain containers; refuses every other class."""

  def __init__(self, file, check_pid):
    super().__init__(file)
    self.storages = {}  # key -> _Storage
    self._check_pid = check_pid

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise _Refused(f"the file holds a {module}.{name}, not only tensors")

  def persistent_load(self, pid):
    # ("storage", storage type, key, location, numel[, view metadata (legacy)])
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
      raise _Refused(f"a persistent id {pid!r:.100} that names no tensor storage")
    self._check_pid(pid)
    storage_type, key = pid[1], pid[2]
    storage = self.storages.setdefault(key, _Storage(key, storage_type.dtype))
    if storage.dtype != storage_type.dtype:
      raise _Refused(f"storage {key!r} is named as both {storage.dtype} and {storage_type.dtype}")
    return storage


class _NoClassUnpickler(pickle.Unpickler):
  """For the pickles that hold numbers, strings and containers only."""

  def find_class(self, module, name):
    raise _Refused(f"the header holds a {module}.{name}; a torch.save header holds no class")

  def persistent_load(self, pid):
    raise _Refused("the header holds a persistent id; a torch.save header holds none")


class _Bounded:
  """The next `limit` bytes of a file, for one pickle: reading past them is refused before
  anything is read (pickle sizes its reads by what the pickle declares)."""

  def __init__(self, file, limit: int, what: str):
    self._file, self._left, self._limit, self._what = file, limit, limit, what

  def _spend(self, n: int) -> None:
    if n is None or n < 0 or n > self._left:
      raise _Refused(f"{self._what} is longer than {self._limit:,} bytes")
    self._left -= n

  def read(self, n=-1) -> bytes:
    self._spend(n)
    return self._file.read(n)

  def readinto(self, buffer) -> int:
    self._spend(len(buffer))
    return self._file.readinto(buffer)

  def readline(self) -> bytes:
    line = self._file.readline(self._left + 1)
    self._spend(len(line))
    return line


def _size_of(file) -> int:
  position = file.seek(0, 2)
  file.seek(0)
  return position


def _read_zip(file, size: int) -> tuple[object, dict]:
  """(the unpickled object, {key: storage array}) of a zip-format file."""
  with zipfile.ZipFile(file) as archive:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
      raise _Refused("a zip file without data.pkl is not a torch.save file")
    prefix = pickles[0][: -len("data.pkl")]
    budget = _ZipBudget(size)
    infos = {info.filename: info for info in archive.infolist()}
    order = infos.get(f"{prefix}byteorder")
    if order is not None and budget.read(archive, order, 16) != b"little":
      raise _Refused("a big-endian file; this reader reads little-endian storages")
    data_pkl = budget.read(archive, infos[pickles[0]], MAX_PICKLE_BYTES)
    unpickler = _StateDictUnpickler(io.BytesIO(data_pkl), lambda pid: None)
    obj = unpickler.load()
    members = {}
    for key in unpickler.storages:  # every size is checked before any storage is read
      info = infos.get(f"{prefix}data/{key}")
      if info is None:
        raise _Refused(f"storage {key!r} is named in data.pkl but not in the archive")
      budget.check(info)
      members[key] = info
    arrays = {}
    for key, info in members.items():
      raw = archive.read(info)
      itemsize = unpickler.storages[key].dtype.itemsize
      if len(raw) % itemsize:
        raise _Refused(f"storage {key!r} holds {len(raw)} bytes, not whole elements")
      arrays[key] = np.frombuffer(raw, dtype=unpickler.storages[key].dtype)
  return obj, arrays


class _ZipBudget:
  """What reading a zip's members may cost: each member's declared sizes against the
  archive's real size and the compression ratio; all members read, against the archive.
  Overlapping members (one compressed block named by many entries) are caught by the sum."""

  def __init__(self, archive_size: int):
    self.archive_size, self.compressed, self.expanded = archive_size, 0, 0

  def check(self, info: zipfile.ZipInfo, limit: int | None = None) -> None:
    name, packed, unpacked = info.filename, info.compress_size, info.file_size
    if limit is not None and unpacked > limit:
      raise _Refused(f"member {name} declares {unpacked:,} bytes, over the {limit:,} allowed")
    if packed > self.archive_size:
      raise _Refused(f"member {name} declares {packed:,} bytes in an archive of "
                     f"{self.archive_size:,}")
    if unpacked > MIN_RATIO_CHECKED and unpacked > MAX_COMPRESSION_RATIO * packed:
      raise _Refused(f"member {name} expands {packed:,} bytes to {unpacked:,}, more than "
                     f"{MAX_COMPRESSION_RATIO}x: a zip bomb")
    self.compressed += packed
    self.expanded += unpacked
    if self.compressed > self.archive_size:
      raise _Refused(f"members declare more bytes than the archive's {self.archive_size:,}: "
                     "overlapping members (a zip bomb)")
    if self.expanded > MAX_COMPRESSION_RATIO * self.archive_size + MIN_RATIO_CHECKED:
      raise _Refused(f"members expand to more than {MAX_COMPRESSION_RATIO}x the archive's "
                     f"{self.archive_size:,} bytes: a zip bomb")

  def read(self, archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    self.check(info, limit)
    return archive.read(info)  # zipfile stops at the declared size


def _read_legacy(file, size: int) -> tuple[object, dict]:
  """(the unpickled object, {key: storage array}) of a legacy-format file."""

  def header(what):
    return _NoClassUnpickler(_Bounded(file, MAX_HEADER_PICKLE_BYTES, what)).load()

  try:
    magic = header("the magic number")
  except Exception as e:  # noqa: BLE001  pickle raises many types for bytes that are no pickle
    why = str(e) if isinstance(e, _Refused) else "no zip archive, no legacy magic"
    raise _Refused(f"not a PyTorch file ({why})") from None
  if type(magic) is not int or magic != _LEGACY_MAGIC:  # noqa: E721
    raise _Refused("not a PyTorch file (no zip archive, no legacy magic)")
  protocol = header("the protocol version")
  if protocol != _LEGACY_PROTOCOL:
    raise _Refused(f"legacy protocol {protocol!r:.40}; this reader reads {_LEGACY_PROTOCOL}")
  system = header("the system info")
  if not isinstance(system, dict) or system.get("little_endian") is False:
    raise _Refused("a big-endian file or one without system info; this reader reads "
                   "little-endian storages")

  def check_pid(pid):
    if len(pid) > 5 and pid[5] is not None:
      raise _Refused("storage views (torch < 0.4 files) are not supported")

  unpickler = _StateDictUnpickler(_Bounded(file, MAX_PICKLE_BYTES, "the object pickle"),
                                  check_pid)
  obj = unpickler.load()
  keys = _NoClassUnpickler(_Bounded(file, MAX_PICKLE_BYTES, "the storage key list")).load()
  if (not isinstance(keys, list) or not all(isinstance(k, str) for k in keys)
      or sorted(keys) != sorted(unpickler.storages)):
    raise _Refused("the storage key list does not match the storages the pickle names")
  arrays = {}
  for key in keys:
    dtype = unpickler.storages[key].dtype
    count = file.read(8)
    if len(count) != 8:
      raise _Refused(f"cut off before storage {key!r}")
    numel = int.from_bytes(count, "little", signed=True)
    left = size - file.tell()
    if numel < 0 or numel * dtype.itemsize > left:  # checked before anything is allocated
      raise _Refused(f"storage {key!r} declares {numel:,} elements of {dtype.itemsize} "
                     f"bytes, but only {left:,} bytes follow")
    arrays[key] = np.frombuffer(file.read(numel * dtype.itemsize), dtype=dtype)
  return obj, arrays


def _tensors(obj):
  """The distinct `_Tensor`s in an unpickled object. A pickle may share a container many
  times over (a list of lists of the same list...): each object is visited once."""
  seen, stack = set(), [obj]
  while stack:
    item = stack.pop()
    if id(item) in seen:
      continue
    seen.add(id(item))
    if isinstance(item, _Tensor):
      yield item
    elif isinstance(item, dict):
      stack += item.values()
    elif isinstance(item, (list, tuple)):
      stack += item


def _copy_out(tensor: _Tensor, arrays: dict) -> np.ndarray:
  """A tensor's strided view of its storage, bounds checked, copied to a contiguous array."""
  storage = arrays[tensor.storage.key]
  offset, size, stride = tensor.offset, tensor.size, tensor.stride
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= len(storage):  # as_strided would read past the storage's memory
    raise _Refused(f"a tensor of size {size} reaches element {last:,} of storage "
                   f"{tensor.storage.key!r}, which holds {len(storage):,}")
  if not size:
    return np.array(storage[offset])
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride))
  return np.ascontiguousarray(view)


def _materialize(obj, arrays: dict):
  """The object with its tensors copied out, once their total size is known to fit.

  Shared objects are rebuilt once and stay shared, so the result is no larger than the
  pickle made it, however often the pickle refers to one container.
  """
  stored = sum(a.nbytes for a in arrays.values())
  wanted = sum(math.prod(t.size) * t.storage.dtype.itemsize for t in _tensors(obj))
  if wanted > MAX_COPY_FACTOR * stored + COPY_ALLOWANCE:
    raise _Refused(f"its tensors would take {wanted:,} bytes out of {stored:,} stored "
                   f"(more than {MAX_COPY_FACTOR}x)")
  done = {}

  def resolve(item):
    if id(item) in done:
      return done[id(item)]
    if isinstance(item, _Tensor):
      out = _copy_out(item, arrays)
    elif isinstance(item, dict):
      out = type(item)((k, resolve(v)) for k, v in item.items())
    elif isinstance(item, (list, tuple)):
      out = type(item)(resolve(v) for v in item)
    else:
      return item
    done[id(item)] = out
    return out

  return resolve(obj)


def load(path) -> dict[str, np.ndarray]:
  """The state dict in a `torch.save` file as {name: numpy array}.

  A file saved from a whole checkpoint dict (`{"state_dict": ...}` or `{"model": ...}`) is
  unwrapped to the state dict inside. A file this reader refuses raises TorchFileError
  naming it; one that cannot be opened raises OSError.
  """
  path = epath.Path(path)
  try:
    with path.open("rb") as file:
      size = _size_of(file)
      if zipfile.is_zipfile(file):
        obj, arrays = _read_zip(file, size)
      else:
        file.seek(0)
        obj, arrays = _read_legacy(file, size)
      obj = _materialize(obj, arrays)
  except OSError:
    raise
  except _Refused as e:
    raise TorchFileError(f"{path}: {e}") from None
  except Exception as e:  # noqa: BLE001  pickle and zipfile raise many types for bad bytes
    raise TorchFileError(f"{path}: not a torch.save file this reader understands "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
  for key in ("state_dict", "model"):
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  if not isinstance(obj, dict):
    raise TorchFileError(f"{path} holds a {type(obj).__name__}, not a state dict")
  out = {}
  for name, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise TorchFileError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    out[name] = value
  return out
