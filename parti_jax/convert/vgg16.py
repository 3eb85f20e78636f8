"""Convert VGG-16 (and optionally LPIPS's lin weights) to the perceptual loss's `.npz`.

  python -m parti_jax.convert.vgg16 --vgg16 vgg16-397923af.pth [--lpips vgg.pth] \
      --out vgg16_lpips.npz

Inputs, which the user fetches; the package downloads nothing:
  --vgg16  torchvision's ImageNet VGG-16 weights, `vgg16-397923af.pth` in torchvision's model
           zoo (what `torchvision.models.vgg16(weights="IMAGENET1K_V1")` caches under
           ~/.cache/torch/hub/checkpoints/). Only `features.*` is read: the convolutions at
           indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, weights [out, in, 3, 3].
  --lpips  the LPIPS package's `lpips/weights/v0.1/vgg.pth` (in its source tree and in the
           installed `lpips` package): `lin0.model.1.weight` ... `lin4.model.1.weight`, each
           [1, channels, 1, 1]. Files saved without LPIPS's dropout layer name them
           `lin0.model.0.weight` or `lin0.weight`; both are accepted. Without --lpips every
           channel is weighted alike: the untrained baseline (see `parti_jax.models.perceptual`).
The output format is described in `parti_jax.models.perceptual`. Files are read with the torch-free
reader `parti_jax.convert.torch_file`, so torch need not be installed.
"""

import sys

import numpy as np
from etils import epath

from parti_jax import cli
from parti_jax.convert import torch_file
from parti_jax.data import records
from parti_jax.models import perceptual

# Index of each convolution in torchvision's `vgg16().features` (ReLUs and pools between).
_TORCHVISION_INDEX = dict(zip(perceptual.CONV_LAYERS,
                              (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)))
_LIN_NAMES = ("lin{}.model.1.weight", "lin{}.model.0.weight", "lin{}.weight")


class ConversionError(ValueError):
  """An input file lacks or mis-shapes a tensor the conversion needs."""


def _take(state, path, key, shape) -> np.ndarray:
  if key not in state:
    raise ConversionError(f"{path}: missing key '{key}'")
  value = state[key]
  if value.shape != tuple(shape):
    raise ConversionError(f"{path}: key '{key}' has shape {value.shape}, expected {tuple(shape)}")
  return value.astype(np.float32)


def convert_vgg16(state, path) -> dict[str, np.ndarray]:
  """The convolutions of a torchvision VGG-16 state dict, kernels OIHW -> HWIO."""
  shapes = perceptual.expected_shapes(with_lin=False)
  out = {}
  for name, index in _TORCHVISION_INDEX.items():
    h, w, cin, cout = shapes[f"{name}/kernel"]
    kernel = _take(state, path, f"features.{index}.weight", (cout, cin, h, w))
    out[f"{name}/kernel"] = kernel.transpose(2, 3, 1, 0)
    out[f"{name}/bias"] = _take(state, path, f"features.{index}.bias", (cout,))
  return out


def convert_lpips(state, path) -> dict[str, np.ndarray]:
  """LPIPS's five lin layers ([1, C, 1, 1] 1x1 convolutions) as per-channel weights [C]."""
  shapes = perceptual.expected_shapes()
  out = {}
  for i, name in enumerate(perceptual.LIN_LAYERS):
    keys = [pattern.format(i) for pattern in _LIN_NAMES]
    key = next((k for k in keys if k in state), keys[0])
    (channels,) = shapes[f"{name}/weight"]
    weight = _take(state, path, key, (1, channels, 1, 1)).reshape(channels)
    # LPIPS clamps these at zero while training; a negative one would let the distance go
    # below zero, so such a file is not LPIPS's.
    if (weight < 0).any():
      raise ConversionError(f"{path}: key '{key}' has negative weights; LPIPS's are >= 0")
    out[f"{name}/weight"] = weight
  return out


def convert(vgg16_path, out_path, lpips_path=None) -> dict[str, np.ndarray]:
  """Reads the inputs, writes `out_path` and returns what it wrote."""
  arrays = convert_vgg16(torch_file.load(vgg16_path), vgg16_path)
  if lpips_path is not None:
    arrays.update(convert_lpips(torch_file.load(lpips_path), lpips_path))
  arrays["format_version"] = np.array(perceptual.FORMAT_VERSION, np.int32)
  out_path = epath.Path(out_path)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  with records.atomic_output(out_path) as f:  # whole or not at all
    np.savez(f, **arrays)
  return arrays


FLAGS = cli.Flags(__doc__)
FLAGS.string("vgg16", None, "torchvision's vgg16-397923af.pth.", required=True)
FLAGS.string("lpips", None, "LPIPS's weights/v0.1/vgg.pth (optional: else the baseline).")
FLAGS.string("out", None, "The .npz to write.", required=True)


def main(argv=None):
  a = FLAGS.parse(argv)
  arrays = convert(a.vgg16, a.out, a.lpips)
  params = sum(v.size for k, v in arrays.items() if k != "format_version")
  variant = "LPIPS lin weights" if a.lpips else "no lin weights: the uniform baseline"
  print(f"wrote {a.out}: {len(arrays) - 1} arrays, {params:,} parameters ({variant})")


if __name__ == "__main__":
  try:
    cli.run(main)
  except (ConversionError, torch_file.TorchFileError, OSError) as e:
    sys.exit(f"error: {e}")
