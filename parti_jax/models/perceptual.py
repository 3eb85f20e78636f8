"""The LPIPS perceptual distance on VGG-16 features, for the ViT-VQGAN's perceptual loss.

The network is the 13 convolutions of torchvision's `vgg16().features` (3x3, padding 1,
ReLU; a 2x2 max-pool between its five blocks). LPIPS compares two images through it:
  1. shift and scale the [-1, 1] inputs towards the statistics VGG-16 was trained on;
  2. take the features after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3;
  3. scale every feature vector (one pixel, all channels) to unit length;
  4. square the difference of the two images' vectors, weight each channel with the
     layer's non-negative "lin" weights, sum over channels and average over the pixels;
  5. add up the five layers: one distance per example.

Weights come from an `.npz` file written by `python -m parti_jax.convert.vgg16` (nothing
is downloaded). Its arrays (the weights float32):
  format_version       int, currently 1
  convB_L/kernel       [3, 3, in, out] (HWIO) for block B in 1..5, layer L in its block
  convB_L/bias         [out]
  linB/weight          [channels of block B], optional: all five or none
Without lin weights every channel weighs 1 (the sum over channels), as in LPIPS's untrained
"baseline" variant, which needs only torchvision's VGG-16. It is on a different scale from
the trained lin weights, so a loss weight tuned for one does not carry over to the other.

The weights are a plain dict of arrays, not an NNX module: the network is frozen, so it has
no optimizer state, no checkpoint entry and no sharding rules. The caller passes the dict as
an argument to its jitted step (closed over, its 59 MB would be baked into every compiled
program as constants), replicated over the mesh.
"""

import io
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

FORMAT_VERSION = 1

# (block, convolutions in it, output channels) of VGG-16's feature network.
_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))

CONV_LAYERS = tuple(f"conv{b}_{i}" for b, n, _ in _BLOCKS for i in range(1, n + 1))
LIN_LAYERS = tuple(f"lin{b}" for b, _, _ in _BLOCKS)

# LPIPS's input normalisation: (x - shift) / scale maps [-1, 1] images to roughly the
# ImageNet mean/std normalisation torchvision's VGG-16 was trained with.
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)

# Inside the square root rather than added to the norm (as LPIPS does), so the gradient of
# an all-zero feature vector, common after a ReLU, is finite instead of NaN. For vectors
# with a norm well above 1e-5 the two agree.
_EPS = 1e-10


class PerceptualWeightsError(ValueError):
  """The weights file is missing, not an `.npz`, or lacks or mis-shapes an array."""


def expected_shapes(with_lin: bool = True) -> dict[str, tuple[int, ...]]:
  """The shape of every array of the weights dict, by key."""
  shapes, channels_in = {}, 3
  for block, n, channels in _BLOCKS:
    for i in range(1, n + 1):
      shapes[f"conv{block}_{i}/kernel"] = (3, 3, channels_in, channels)
      shapes[f"conv{block}_{i}/bias"] = (channels,)
      channels_in = channels
    if with_lin:
      shapes[f"lin{block}/weight"] = (channels,)
  return shapes


def load_weights(path) -> dict[str, np.ndarray]:
  """The weights in a file written by `parti_jax.convert.vgg16`, checked key by key.

  The file is data (docs/trust.md): never unpickled, and no larger than its expected arrays
  may be, whole or member by member, before any array is read.
  """
  path = epath.Path(path)
  # Each member: a .npy header (at most a few hundred bytes) and its array at up to 8 bytes
  # an element; members of unknown keys (format_version) hold a scalar.
  slack = 4096
  member_limits = {f"{key}.npy": slack + 8 * int(np.prod(shape))
                   for key, shape in expected_shapes(with_lin=True).items()}
  file_limit = sum(member_limits.values()) + 16 * slack
  try:
    with path.open("rb") as f:
      size = f.seek(0, 2)  # the size first: a huge file is refused unread
      f.seek(0)
      raw = f.read(file_limit + 1) if size <= file_limit else b""
  except OSError as e:
    raise PerceptualWeightsError(f"cannot read the perceptual weights {path}: {e}") from e
  if size > file_limit or len(raw) > file_limit:
    raise PerceptualWeightsError(f"{path} holds more than the {file_limit:,} bytes VGG-16's "
                                 "weights can take; refused")
  if not zipfile.is_zipfile(io.BytesIO(raw)):
    raise PerceptualWeightsError(
        f"{path} is not an .npz file; write one with `python -m parti_jax.convert.vgg16`")
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
    raise PerceptualWeightsError(f"{path}: {problem}")
  if "format_version" not in arrays:
    raise PerceptualWeightsError(f"{path}: missing key 'format_version'")
  version = arrays.pop("format_version")
  if version.shape != () or version.dtype.kind not in "iu":
    raise PerceptualWeightsError(
        f"{path}: format_version is a {version.dtype}{list(version.shape)}, not an integer")
  version = int(version)
  if version != FORMAT_VERSION:
    raise PerceptualWeightsError(
        f"{path}: format_version {version}, this code reads {FORMAT_VERSION}; convert again")
  missing_lin = [f"{name}/weight" for name in LIN_LAYERS if f"{name}/weight" not in arrays]
  if 0 < len(missing_lin) < len(LIN_LAYERS):
    raise PerceptualWeightsError(
        f"{path}: missing key '{missing_lin[0]}' (lin weights must be all five or none)")
  weights = {}
  for key, shape in expected_shapes(with_lin=not missing_lin).items():
    if key not in arrays:
      raise PerceptualWeightsError(f"{path}: missing key '{key}'")
    if arrays[key].shape != shape:
      raise PerceptualWeightsError(
          f"{path}: key '{key}' has shape {arrays[key].shape}, expected {shape}")
    if arrays[key].dtype.kind not in "fiu":  # float32 as written; any real number will do
      raise PerceptualWeightsError(
          f"{path}: key '{key}' holds {arrays[key].dtype}, not numbers")
    weights[key] = arrays[key].astype(np.float32)
  return weights


def random_weights(seed: int = 0, lin: bool = True) -> dict[str, np.ndarray]:
  """Random weights of the right shapes, for tests: He-normal kernels, positive lin weights."""
  rng = np.random.default_rng(seed)
  weights = {}
  for key, shape in expected_shapes(with_lin=lin).items():
    if key.endswith("/kernel"):
      fan_in = shape[0] * shape[1] * shape[2]
      value = rng.normal(size=shape) * np.sqrt(2.0 / fan_in)
    elif key.endswith("/bias"):
      value = rng.normal(size=shape) * 0.01
    else:  # lin: positive, summing to about 1 per layer like the trained ones
      value = rng.uniform(0.5, 1.5, size=shape) / shape[0]
    weights[key] = value.astype(np.float32)
  return weights


def _conv_relu(x, weights, name, dtype):
  y = jax.lax.conv_general_dilated(
      x, weights[f"{name}/kernel"].astype(dtype), window_strides=(1, 1),
      padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.nn.relu(y + weights[f"{name}/bias"].astype(dtype))


def _max_pool(x):
  # VALID padding floors odd sizes, like torch's MaxPool2d(2, 2).
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def features(weights, images, dtype=jnp.float32) -> list[jax.Array]:
  """The five LPIPS feature maps (relu1_2 ... relu5_3) of [-1, 1] NHWC images, in `dtype`."""
  x = ((images.astype(jnp.float32) - _SHIFT) / _SCALE).astype(dtype)
  taps = []
  for block, n, _ in _BLOCKS:
    if block > 1:
      x = _max_pool(x)
    for i in range(1, n + 1):
      x = _conv_relu(x, weights, f"conv{block}_{i}", dtype)
    taps.append(x)
  return taps


def _unit_length(f):
  return f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + _EPS)


def distance(weights, x, y, dtype=jnp.float32) -> jax.Array:
  """The LPIPS distance between [-1, 1] NHWC images x and y: float32, shape [batch].

  `dtype` is the network's compute dtype (float32 or bfloat16); the normalisation and the
  sums run in float32.
  """
  batch = x.shape[0]
  # One pass over both images: twice the batch keeps the convolutions busier.
  taps = features(weights, jnp.concatenate([x, y]), dtype)
  total = jnp.zeros((batch,), jnp.float32)
  for (block, _, channels), f in zip(_BLOCKS, taps):
    f = _unit_length(f.astype(jnp.float32))
    squared = (f[:batch] - f[batch:]) ** 2
    lin = weights.get(f"lin{block}/weight")
    if lin is None:  # the untrained baseline: every channel alike
      lin = jnp.ones((channels,), jnp.float32)
    total = total + jnp.mean(squared @ lin.astype(jnp.float32), axis=(1, 2))
  return total
