"""Convert pytorch-fid's Inception-v3 weights to the `.npz` that FID (`parti_jax.eval`) loads.

  python -m parti_jax.convert.inception \
      --pytorch_fid pt_inception-2015-12-05-6726825d.pth --out inception_fid.npz

The input, which the user fetches (the package downloads nothing), is the file pytorch-fid
publishes as a release asset of github.com/mseitzer/pytorch-fid (release `fid_weights`),
also what pytorch-fid caches under ~/.cache/torch/hub/checkpoints/ after its first run:
the TensorFlow Inception graph FID is defined with, ported to PyTorch. For each of its
convolutions (`Conv2d_1a_3x3`, ..., `Mixed_7c.branch_pool`; see `parti_jax.eval.inception`)
it holds `NAME.conv.weight` [out, in, kh, kw] and `NAME.bn.{weight,bias,running_mean,
running_var}` [out]. The classifier (`fc.*`, 1008 classes) is not needed and is skipped.
torchvision's own ImageNet Inception has the same names but other weights (and pool
blocks); its 1000-class `fc` gives it away, and it is refused.

The output format is described in `parti_jax.eval.inception`. The file is read with the
torch-free reader `parti_jax.convert.torch_file`, so torch need not be installed.
"""

import sys

import numpy as np
from etils import epath

from parti_jax import cli
from parti_jax.convert import torch_file
from parti_jax.data import records
from parti_jax.eval import inception

# npz field -> the batch norm tensor it comes from.
_BATCH_NORM = dict(bn_scale="weight", bn_bias="bias", bn_mean="running_mean",
                   bn_var="running_var")
# Tensors the FID features do not use.
_SKIPPED_PREFIXES = ("fc.", "AuxLogits.")
_FID_CLASSES = 1008  # the 2015 TensorFlow graph's classifier; torchvision's has 1000


class ConversionError(ValueError):
  """The input file lacks, mis-shapes or adds a tensor: it is not pytorch-fid's Inception."""


def _take(state, path, key, shape) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"{path}: missing key '{key}'; is this pytorch-fid's "
                          "pt_inception-2015-12-05 file?")
  value = state[key]
  if value.shape != tuple(shape):
    raise ConversionError(f"{path}: key '{key}' has shape {value.shape}, expected {tuple(shape)}")
  return value.astype(np.float32)


def convert_state(state: dict[str, np.ndarray], path) -> dict[str, np.ndarray]:
  """pytorch-fid's state dict -> the `.npz` arrays (kernels OIHW -> HWIO)."""
  fc = state.get("fc.weight")
  if fc is not None and fc.shape[0] != _FID_CLASSES:
    raise ConversionError(
        f"{path}: a {fc.shape[0]}-class classifier: this is not pytorch-fid's FID Inception "
        f"({_FID_CLASSES} classes) but another Inception-v3, e.g. torchvision's ImageNet one, "
        "whose features give other FID values")
  arrays = {"format_version": np.array(inception.FORMAT_VERSION, np.int32)}
  used = set()
  for name, c in inception.LAYERS.items():
    kh, kw = c.kernel
    key = f"{name}.conv.weight"
    kernel = _take(state, path, key, (c.out_channels, c.in_channels, kh, kw))
    arrays[f"{name}/kernel"] = kernel.transpose(2, 3, 1, 0)
    used.add(key)
    for field, tensor in _BATCH_NORM.items():
      key = f"{name}.bn.{tensor}"
      arrays[f"{name}/{field}"] = _take(state, path, key, (c.out_channels,))
      used.add(key)
  unexpected = sorted(k for k in state if k not in used and not k.startswith(_SKIPPED_PREFIXES)
                      and not k.endswith(".num_batches_tracked"))
  if unexpected:
    raise ConversionError(f"{path}: {len(unexpected)} unexpected key(s), e.g. "
                          f"'{unexpected[0]}'; is this pytorch-fid's Inception?")
  return arrays


def convert(pytorch_fid_path, out_path) -> dict[str, np.ndarray]:
  """Reads pytorch-fid's file, writes `out_path` (whole or not at all), returns its arrays."""
  arrays = convert_state(torch_file.load(pytorch_fid_path), pytorch_fid_path)
  out_path = epath.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with records.atomic_output(out_path) as f:  # a file object: np.savez would add ".npz" to a name
    np.savez(f, **arrays)
  return arrays


FLAGS = cli.Flags(__doc__)
FLAGS.string("pytorch_fid", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.",
             required=True)
FLAGS.string("out", None, "The .npz to write.", required=True)


def main(argv=None):
  a = FLAGS.parse(argv)
  arrays = convert(a.pytorch_fid, a.out)
  params = sum(v.size for k, v in arrays.items() if k != "format_version")
  print(f"wrote {a.out}: {len(inception.LAYERS)} convolutions, {params:,} parameters")


if __name__ == "__main__":
  try:
    cli.run(main)
  except (ConversionError, torch_file.TorchFileError, OSError) as e:
    sys.exit(f"error: {e}")
