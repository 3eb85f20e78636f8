"""The Inception-v3 network FID is measured with: images -> 2048-d pool features.

This is the network of pytorch-fid (and of the original TensorFlow FID): the 2015-12-05
TensorFlow Inception graph, laid out as torchvision's Inception-v3 with four kinds of mixed
block changed to match TensorFlow:
  Mixed_5b..5d, Mixed_6b..6e, Mixed_7b  their pool branch averages only the pixels inside
                                         the image (padding does not count as zeros);
  Mixed_7c                               its pool branch takes a 3x3 max, not an average.
Every convolution is followed by batch norm (inference mode, eps 1e-3) and a ReLU; the
features are the global average of the last block, before the classifier. Inputs are
resized to 299x299 bilinearly without antialiasing (what pytorch-fid does with
`F.interpolate`, so the numbers are comparable with its numbers) and scaled to [-1, 1].

Weights come from an `.npz` written by `python -m parti_jax.convert.inception` (nothing is
downloaded). Its arrays, float32 unless noted:
  format_version       int, currently 1
  LAYER/kernel         [kh, kw, in, out] (HWIO)
  LAYER/bn_scale       [out]  batch norm's weight (gamma)
  LAYER/bn_bias        [out]  batch norm's bias (beta)
  LAYER/bn_mean        [out]  running mean
  LAYER/bn_var         [out]  running variance
for every LAYER in `LAYERS`, named as pytorch-fid's modules are (e.g. `Conv2d_1a_3x3`,
`Mixed_5b.branch1x1`). `load_weights` folds each batch norm into its convolution and
returns the flat dict {`LAYER/kernel`, `LAYER/bias`} that `features` takes.

The weights are a plain dict of arrays, not an NNX module: the network is never trained,
so it needs no optimizer state, checkpoint entry or sharding rules. Pass the dict as an
argument of the jitted function (`jax.jit(features)(weights, images)`): closed over, its
~90 MB would be baked into the compiled program as constants, slowing every compilation.
"""

import dataclasses
import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

FORMAT_VERSION = 1
FEATURES = 2048
INPUT_SIZE = 299
BATCH_NORM_EPS = 1e-3
BATCH_NORM_FIELDS = ("bn_scale", "bn_bias", "bn_mean", "bn_var")


class InceptionWeightsError(ValueError):
  """The weights file is missing, not an `.npz`, or lacks or mis-shapes an array."""


@dataclasses.dataclass(frozen=True)
class Conv:
  """One convolution + batch norm + ReLU (pytorch-fid's `BasicConv2d`)."""
  in_channels: int
  out_channels: int
  kernel: tuple[int, int]
  stride: int
  padding: tuple[int, int]


def _layer_table() -> dict[str, Conv]:
  layers = {}

  def conv(name, cin, cout, kernel=1, stride=1, padding=0):
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
    layers[name] = Conv(cin, cout, pair(kernel), stride, pair(padding))

  conv("Conv2d_1a_3x3", 3, 32, 3, stride=2)
  conv("Conv2d_2a_3x3", 32, 32, 3)
  conv("Conv2d_2b_3x3", 32, 64, 3, padding=1)
  conv("Conv2d_3b_1x1", 64, 80)
  conv("Conv2d_4a_3x3", 80, 192, 3)
  for block, cin, pool in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    conv(f"{block}.branch1x1", cin, 64)
    conv(f"{block}.branch5x5_1", cin, 48)
    conv(f"{block}.branch5x5_2", 48, 64, 5, padding=2)
    conv(f"{block}.branch3x3dbl_1", cin, 64)
    conv(f"{block}.branch3x3dbl_2", 64, 96, 3, padding=1)
    conv(f"{block}.branch3x3dbl_3", 96, 96, 3, padding=1)
    conv(f"{block}.branch_pool", cin, pool)
  conv("Mixed_6a.branch3x3", 288, 384, 3, stride=2)
  conv("Mixed_6a.branch3x3dbl_1", 288, 64)
  conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3, padding=1)
  conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3, stride=2)
  for block, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    conv(f"{block}.branch1x1", 768, 192)
    conv(f"{block}.branch7x7_1", 768, c7)
    conv(f"{block}.branch7x7_2", c7, c7, (1, 7), padding=(0, 3))
    conv(f"{block}.branch7x7_3", c7, 192, (7, 1), padding=(3, 0))
    conv(f"{block}.branch7x7dbl_1", 768, c7)
    conv(f"{block}.branch7x7dbl_2", c7, c7, (7, 1), padding=(3, 0))
    conv(f"{block}.branch7x7dbl_3", c7, c7, (1, 7), padding=(0, 3))
    conv(f"{block}.branch7x7dbl_4", c7, c7, (7, 1), padding=(3, 0))
    conv(f"{block}.branch7x7dbl_5", c7, 192, (1, 7), padding=(0, 3))
    conv(f"{block}.branch_pool", 768, 192)
  conv("Mixed_7a.branch3x3_1", 768, 192)
  conv("Mixed_7a.branch3x3_2", 192, 320, 3, stride=2)
  conv("Mixed_7a.branch7x7x3_1", 768, 192)
  conv("Mixed_7a.branch7x7x3_2", 192, 192, (1, 7), padding=(0, 3))
  conv("Mixed_7a.branch7x7x3_3", 192, 192, (7, 1), padding=(3, 0))
  conv("Mixed_7a.branch7x7x3_4", 192, 192, 3, stride=2)
  for block, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    conv(f"{block}.branch1x1", cin, 320)
    conv(f"{block}.branch3x3_1", cin, 384)
    conv(f"{block}.branch3x3_2a", 384, 384, (1, 3), padding=(0, 1))
    conv(f"{block}.branch3x3_2b", 384, 384, (3, 1), padding=(1, 0))
    conv(f"{block}.branch3x3dbl_1", cin, 448)
    conv(f"{block}.branch3x3dbl_2", 448, 384, 3, padding=1)
    conv(f"{block}.branch3x3dbl_3a", 384, 384, (1, 3), padding=(0, 1))
    conv(f"{block}.branch3x3dbl_3b", 384, 384, (3, 1), padding=(1, 0))
    conv(f"{block}.branch_pool", cin, 192)
  return layers


# Every convolution, by pytorch-fid's module name, in the order the network runs them.
LAYERS = _layer_table()


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """The shape of every array of the `.npz` file (but `format_version`), by key."""
  shapes = {}
  for name, c in LAYERS.items():
    shapes[f"{name}/kernel"] = (*c.kernel, c.in_channels, c.out_channels)
    for field in BATCH_NORM_FIELDS:
      shapes[f"{name}/{field}"] = (c.out_channels,)
  return shapes


def fold_batch_norm(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The file's arrays -> {LAYER/kernel, LAYER/bias} with batch norm folded in (float32).

  In inference mode batch norm is a per-channel affine map after a bias-free convolution,
  so it becomes the convolution's kernel (scaled per output channel) and a bias.
  """
  weights = {}
  for name in LAYERS:
    get = lambda field: np.asarray(arrays[f"{name}/{field}"], np.float64)
    scale = get("bn_scale") / np.sqrt(get("bn_var") + BATCH_NORM_EPS)
    weights[f"{name}/kernel"] = (get("kernel") * scale).astype(np.float32)
    weights[f"{name}/bias"] = (get("bn_bias") - get("bn_mean") * scale).astype(np.float32)
  return weights


def load_weights(path) -> dict[str, np.ndarray]:
  """The folded weights of a file written by `parti_jax.convert.inception`, checked key by key.

  The file is data (docs/trust.md): never unpickled, and no larger than its expected arrays
  may be, whole or member by member, before any array is read.
  """
  path = epath.Path(path)
  how = "make it with `python -m parti_jax.convert.inception` from pytorch-fid's weights"
  # Each member: a .npy header (at most a few hundred bytes) and its array at up to 8 bytes
  # an element; members of unknown keys (format_version) hold a scalar.
  slack = 4096
  member_limits = {f"{key}.npy": slack + 8 * int(np.prod(shape))
                   for key, shape in expected_shapes().items()}
  file_limit = sum(member_limits.values()) + 16 * slack
  try:
    with path.open("rb") as f:
      size = f.seek(0, 2)  # the size first: a huge file is refused unread
      f.seek(0)
      raw = f.read(file_limit + 1) if size <= file_limit else b""
  except OSError as e:
    raise InceptionWeightsError(f"cannot read the Inception weights {path} ({e}); {how}") from e
  if size > file_limit or len(raw) > file_limit:
    raise InceptionWeightsError(f"{path} holds more than the {file_limit:,} bytes "
                                f"Inception's weights can take; refused; {how}")
  if not zipfile.is_zipfile(io.BytesIO(raw)):
    raise InceptionWeightsError(f"{path} is not an .npz file; {how}")
  problem, arrays = None, {}
  try:
    with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
      for info in npz.zip.infolist():  # declared sizes, before anything is inflated
        if info.file_size > member_limits.get(info.filename, slack):
          problem = (f"member {info.filename} declares {info.file_size:,} bytes, more than "
                     f"its key may hold ({member_limits.get(info.filename, slack):,})")
          break
      else:
        arrays = {key: npz[key] for key in npz.files}
  except (ValueError, OSError, EOFError, zipfile.BadZipFile, MemoryError) as e:
    problem = f"unreadable ({type(e).__name__}: {str(e)[:200]})"  # e.g. an object array
  if problem:
    raise InceptionWeightsError(f"{path}: {problem}; {how}")
  if "format_version" not in arrays:
    raise InceptionWeightsError(f"{path}: missing key 'format_version'; {how}")
  version = arrays.pop("format_version")
  if version.shape != () or version.dtype.kind not in "iu":
    raise InceptionWeightsError(
        f"{path}: format_version is a {version.dtype}{list(version.shape)}, not an integer")
  version = int(version)
  if version != FORMAT_VERSION:
    raise InceptionWeightsError(
        f"{path}: format_version {version}, this code reads {FORMAT_VERSION}; convert again")
  for key, shape in expected_shapes().items():
    if key not in arrays:
      raise InceptionWeightsError(f"{path}: missing key '{key}'")
    if arrays[key].shape != shape:
      raise InceptionWeightsError(
          f"{path}: key '{key}' has shape {arrays[key].shape}, expected {shape}")
    if arrays[key].dtype.kind not in "fiu":  # float32 as written; any real number will do
      raise InceptionWeightsError(
          f"{path}: key '{key}' holds {arrays[key].dtype}, not numbers")
  return fold_batch_norm(arrays)


def random_file_arrays(seed: int = 0) -> dict[str, np.ndarray]:
  """What a weights file holds, random (He-normal kernels, mild batch norms), for tests."""
  rng = np.random.default_rng(seed)
  arrays = {"format_version": np.array(FORMAT_VERSION, np.int32)}
  for key, shape in expected_shapes().items():
    field = key.rsplit("/", 1)[1]
    if field == "kernel":
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:3]))
    elif field in ("bn_scale", "bn_var"):
      value = rng.uniform(0.5, 1.5, size=shape)
    else:
      value = rng.normal(size=shape) * 0.1
    arrays[key] = value.astype(np.float32)
  return arrays


def random_weights(seed: int = 0) -> dict[str, np.ndarray]:
  """Folded random weights, what `load_weights` returns, for tests."""
  return fold_batch_norm(random_file_arrays(seed))


def _conv(weights, name, x):
  c = LAYERS[name]
  y = jax.lax.conv_general_dilated(
      x, weights[f"{name}/kernel"], window_strides=(c.stride, c.stride),
      padding=[(p, p) for p in c.padding], dimension_numbers=("NHWC", "HWIO", "NHWC"),
      # Full float32 everywhere: TPUs and recent GPUs would otherwise round to bf16 or
      # TF32, and the features would no longer be those of the reference network.
      precision=jax.lax.Precision.HIGHEST)
  return jax.nn.relu(y + weights[f"{name}/bias"])


def _branch(weights, x, block, *names):
  """Convolutions `block.name` applied one after the other."""
  for name in names:
    x = _conv(weights, f"{block}.{name}" if block else name, x)
  return x


_SAME_3X3 = ((0, 0), (1, 1), (1, 1), (0, 0))


def _max_pool(x, stride):
  """3x3 max: stride 2 unpadded (downsampling), or stride 1 padded (same size)."""
  padding = "VALID" if stride == 2 else _SAME_3X3
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1),
                               padding)


def _avg_pool(x):
  """3x3 average at stride 1 over the pixels inside the image only (TensorFlow's rule)."""
  window, strides = (1, 3, 3, 1), (1, 1, 1, 1)
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, window, strides, _SAME_3X3)
  inside = jax.lax.reduce_window(jnp.ones((1, *x.shape[1:3], 1), x.dtype), 0.0, jax.lax.add,
                                 window, strides, _SAME_3X3)
  return total / inside


def _mixed_a(w, block, x):
  return jnp.concatenate([
      _branch(w, x, block, "branch1x1"),
      _branch(w, x, block, "branch5x5_1", "branch5x5_2"),
      _branch(w, x, block, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
      _branch(w, _avg_pool(x), block, "branch_pool")], axis=-1)


def _mixed_b(w, block, x):
  return jnp.concatenate([
      _branch(w, x, block, "branch3x3"),
      _branch(w, x, block, "branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"),
      _max_pool(x, stride=2)], axis=-1)


def _mixed_c(w, block, x):
  return jnp.concatenate([
      _branch(w, x, block, "branch1x1"),
      _branch(w, x, block, "branch7x7_1", "branch7x7_2", "branch7x7_3"),
      _branch(w, x, block, *(f"branch7x7dbl_{i}" for i in range(1, 6))),
      _branch(w, _avg_pool(x), block, "branch_pool")], axis=-1)


def _mixed_d(w, block, x):
  return jnp.concatenate([
      _branch(w, x, block, "branch3x3_1", "branch3x3_2"),
      _branch(w, x, block, *(f"branch7x7x3_{i}" for i in range(1, 5))),
      _max_pool(x, stride=2)], axis=-1)


def _mixed_e(w, block, x, pool):
  wide = _branch(w, x, block, "branch3x3_1")
  deep = _branch(w, x, block, "branch3x3dbl_1", "branch3x3dbl_2")
  return jnp.concatenate([
      _branch(w, x, block, "branch1x1"),
      _branch(w, wide, block, "branch3x3_2a"), _branch(w, wide, block, "branch3x3_2b"),
      _branch(w, deep, block, "branch3x3dbl_3a"), _branch(w, deep, block, "branch3x3dbl_3b"),
      _branch(w, pool(x), block, "branch_pool")], axis=-1)


def preprocess(images) -> jax.Array:
  """uint8 [0, 255] or float [-1, 1] images [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1]."""
  x = jnp.asarray(images)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"images of shape {x.shape}; expected [batch, height, width, 3]")
  x = x.astype(jnp.float32) / 127.5 - 1.0 if x.dtype == jnp.uint8 else x.astype(jnp.float32)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    # Resizing is linear, so resizing [-1, 1] values equals pytorch-fid's resizing of
    # [0, 1] values followed by its scaling.
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), "bilinear",
                         antialias=False)
  return x


def features(weights, images) -> jax.Array:
  """The 2048-d pool features, float32 [B, 2048], of images [B, H, W, 3] of any size.

  `images` are uint8 in [0, 255] (as stored on disk) or float in [-1, 1] (the project's
  model range); the dtype says which. `weights` is what `load_weights` returns.
  """
  x = preprocess(images)
  x = _branch(weights, x, None, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3")
  x = _max_pool(x, stride=2)
  x = _branch(weights, x, None, "Conv2d_3b_1x1", "Conv2d_4a_3x3")
  x = _max_pool(x, stride=2)
  for block in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
    x = _mixed_a(weights, block, x)
  x = _mixed_b(weights, "Mixed_6a", x)
  for block in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
    x = _mixed_c(weights, block, x)
  x = _mixed_d(weights, "Mixed_7a", x)
  x = _mixed_e(weights, "Mixed_7b", x, _avg_pool)
  x = _mixed_e(weights, "Mixed_7c", x, lambda v: _max_pool(v, stride=1))
  return jnp.mean(x, axis=(1, 2))
