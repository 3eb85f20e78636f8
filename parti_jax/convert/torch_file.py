"""Read a PyTorch checkpoint file (`torch.save` of a state dict) into numpy, without torch.

Written by hand because torch is not a dependency of the package and no library we use reads
these files: the converters must run on any machine that can run parti_jax. Both formats
`torch.save` has written are read:
  * the zip format (torch >= 1.6): `*/data.pkl` plus one raw file per storage in `*/data/`;
  * the legacy format (older files, e.g. torchvision's VGG-16 and pytorch-fid's Inception):
    consecutive pickles (magic, protocol, system info, the object, storage keys), then each
    storage as an 8-byte element count followed by its raw bytes.
Only tensors and plain containers are rebuilt; any other class in the pickle is refused, so a
weights file cannot run code.
"""
import collections
import io
import pickle
import zipfile

import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class TorchFileError(ValueError):
  """The file is not a PyTorch state dict this reader understands."""


class _StorageType:
  def __init__(self, name):
    self.name = name
    dtype = _STORAGE_DTYPES.get(name)
    if dtype is None:
      raise TorchFileError(f"unsupported tensor storage type {name}")
    if dtype == "bfloat16":
      import ml_dtypes  # a jax dependency
      dtype = ml_dtypes.bfloat16
    self.dtype = np.dtype(dtype)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """A strided view of the flat storage, copied to a contiguous array."""
  if isinstance(storage, _LazyStorage):
    return _LazyTensor(storage, (offset, size, stride))
  if not size:
    return np.array(storage[offset])
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
  return np.ascontiguousarray(view)


def _rebuild_parameter(data, *unused):
  return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name.endswith("Storage"):
      return _StorageType(name)
    raise TorchFileError(f"the file holds a {module}.{name}, not only tensors")

  def persistent_load(self, pid):
    return self._load_storage(pid)


def _read_zip(path) -> dict:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pickles:
      raise TorchFileError(f"{path}: a zip file without data.pkl is not a torch.save file")
    prefix = pickles[0][: -len("data.pkl")]

    def load_storage(pid):
      # ("storage", storage_type, key, location, numel)
      storage_type, key = pid[1], pid[2]
      raw = archive.read(f"{prefix}data/{key}")
      return np.frombuffer(raw, dtype=storage_type.dtype)

    return _Unpickler(io.BytesIO(archive.read(pickles[0])), load_storage).load()


def _read_legacy(path) -> dict:
  with open(path, "rb") as f:
    magic = pickle.load(f)
    if magic != _LEGACY_MAGIC:
      raise TorchFileError(f"{path} is not a PyTorch file (no zip archive, no legacy magic)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # system info (endianness, type sizes)
    storages = {}  # key -> (dtype, array filled after the object pickle)

    def load_storage(pid):
      # ("storage", storage_type, key, location, numel, view_metadata)
      storage_type, key = pid[1], pid[2]
      if len(pid) > 5 and pid[5] is not None:
        raise TorchFileError(f"{path}: storage views (torch < 0.4 files) are not supported")
      if key not in storages:
        storages[key] = [storage_type.dtype, None]
      return _LazyStorage(storages, key)

    obj = _Unpickler(f, load_storage).load()
    keys = pickle.load(f)
    for key in keys:
      numel = int(np.frombuffer(f.read(8), dtype="<i8")[0])
      dtype = storages[key][0]
      storages[key][1] = np.frombuffer(f.read(numel * dtype.itemsize), dtype=dtype)
  return _resolve(obj)


class _LazyStorage:
  """A legacy storage whose bytes follow the object pickle; tensors are rebuilt afterwards."""

  def __init__(self, storages, key):
    self.storages, self.key = storages, key
    self.dtype = storages[key][0]


class _LazyTensor:
  def __init__(self, storage, args):
    self.storage, self.args = storage, args


def _resolve(obj):
  if isinstance(obj, _LazyTensor):
    return _rebuild_tensor(obj.storage.storages[obj.storage.key][1], *obj.args)
  if isinstance(obj, dict):
    return type(obj)((k, _resolve(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_resolve(v) for v in obj)
  return obj


def load(path) -> dict[str, np.ndarray]:
  """The state dict in a `torch.save` file as {name: numpy array}.

  A file saved from a whole checkpoint dict (`{"state_dict": ...}` or `{"model": ...}`) is
  unwrapped to the state dict inside.
  """
  path = str(path)
  if zipfile.is_zipfile(path):
    obj = _read_zip(path)
  else:
    obj = _read_legacy(path)
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
