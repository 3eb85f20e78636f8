"""The LPIPS/VGG-16 perceptual distance and its weight converter.

The reference is an independent NCHW forward pass written with torch's functional ops on the
same (random) weights, read from the same torch files the converter reads.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parti_jax.models import perceptual
from parti_jax.convert import vgg16 as convert_vgg16

SIZE = 32  # 2x2 at relu5_3: the last block still sees neighbouring pixels


@functools.partial(jax.jit, static_argnames="dtype")
def _distance(weights, x, y, dtype=jnp.float32):
  return perceptual.distance(weights, x, y, dtype)


def _images(seed, n=2):
  return np.random.default_rng(seed).uniform(-1, 1, (n, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def weights():
  return perceptual.random_weights(0)


# --- the converter, against files torch writes ------------------------------------------

def _torch_files(torch, directory):
  """Random torchvision-layout VGG-16 and LPIPS lin state dicts, saved with torch."""
  g = torch.Generator().manual_seed(1)
  vgg, channels_in = {}, 3
  for name, index in convert_vgg16._TORCHVISION_INDEX.items():
    channels = perceptual.expected_shapes()[f"{name}/bias"][0]
    fan_in = 9 * channels_in
    vgg[f"features.{index}.weight"] = torch.randn(
        channels, channels_in, 3, 3, generator=g) * (2 / fan_in) ** 0.5
    vgg[f"features.{index}.bias"] = torch.randn(channels, generator=g) * 0.01
    channels_in = channels
  vgg["classifier.6.bias"] = torch.zeros(10)  # ignored, like the real classifier
  lpips = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) / c
           for i, c in enumerate((64, 128, 256, 512, 512))}
  lpips["scaling_layer.shift"] = torch.zeros(3)  # in full LPIPS state dicts; ignored
  # torchvision's file predates torch's zip format; LPIPS's is a zip.
  torch.save(vgg, directory / "vgg16.pth", _use_new_zipfile_serialization=False)
  torch.save(lpips, directory / "lpips_vgg.pth")
  return vgg, lpips


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(torch state dicts, the converted npz path) for a random VGG-16 + LPIPS pair."""
  torch = pytest.importorskip("torch")
  directory = tmp_path_factory.mktemp("vgg16")
  vgg, lpips = _torch_files(torch, directory)
  out = directory / "vgg16_lpips.npz"
  convert_vgg16.main(["--vgg16", str(directory / "vgg16.pth"),
                      "--lpips", str(directory / "lpips_vgg.pth"), "--out", str(out)])
  return vgg, lpips, out


def test_converter_round_trip(converted, capsys):
  vgg, lpips, out = converted
  loaded = perceptual.load_weights(out)
  assert set(loaded) == set(perceptual.expected_shapes())
  for key, shape in perceptual.expected_shapes().items():
    assert loaded[key].shape == shape and loaded[key].dtype == np.float32, key
  np.testing.assert_array_equal(  # conv1_2 is features.2, OIHW -> HWIO
      loaded["conv1_2/kernel"], vgg["features.2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["conv5_3/bias"], vgg["features.28.bias"].numpy())
  np.testing.assert_array_equal(loaded["lin3/weight"],
                                lpips["lin2.model.1.weight"].numpy().reshape(-1))
  with np.load(out) as npz:
    assert int(npz["format_version"]) == perceptual.FORMAT_VERSION


def test_converter_errors_name_file_and_key(tmp_path):
  torch = pytest.importorskip("torch")
  vgg, lpips = _torch_files(torch, tmp_path)
  del vgg["features.24.bias"]
  torch.save(vgg, tmp_path / "broken.pth")
  with pytest.raises(convert_vgg16.ConversionError, match=r"broken\.pth.*'features\.24\.bias'"):
    convert_vgg16.convert(tmp_path / "broken.pth", tmp_path / "out.npz")
  lpips["lin1.model.1.weight"] = torch.rand(1, 64, 1, 1)
  torch.save(lpips, tmp_path / "lin.pth")
  with pytest.raises(convert_vgg16.ConversionError,
                     match=r"lin\.pth.*'lin1\.model\.1\.weight' has shape"):
    convert_vgg16.convert(tmp_path / "vgg16.pth", tmp_path / "out.npz", tmp_path / "lin.pth")


# --- the distance, against an independent torch forward pass ----------------------------

def _torch_lpips(torch, vgg, lpips, x, y):
  """LPIPS in float64 torch, NCHW, straight from the torchvision/LPIPS state dicts."""
  F = torch.nn.functional
  shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
  scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
  blocks = ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28))

  def taps(images):
    h = (torch.from_numpy(images).double().permute(0, 3, 1, 2) - shift) / scale
    out = []
    for b, indices in enumerate(blocks):
      if b:
        h = F.max_pool2d(h, 2)
      for i in indices:
        h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"].double(),
                            vgg[f"features.{i}.bias"].double(), padding=1))
      out.append(h)
    return out

  total = 0
  for k, (fx, fy) in enumerate(zip(taps(x), taps(y))):
    fx = fx / (fx.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    fy = fy / (fy.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
    if lpips is None:
      lin = torch.ones((1, fx.shape[1], 1, 1), dtype=torch.float64)
    else:
      lin = lpips[f"lin{k}.model.1.weight"].double()
    total = total + F.conv2d((fx - fy) ** 2, lin).mean((1, 2, 3))
  return total.numpy()


@pytest.mark.parametrize("with_lin", [True, False], ids=["lpips", "baseline"])
def test_matches_torch_reference(converted, with_lin):
  torch = pytest.importorskip("torch")
  vgg, lpips, out = converted
  weights = perceptual.load_weights(out)
  if not with_lin:
    weights = {k: v for k, v in weights.items() if not k.startswith("lin")}
    lpips = None
  x, y = _images(1), _images(2)
  expected = _torch_lpips(torch, vgg, lpips, x, y)
  got = _distance(weights, x, y)
  assert got.shape == (2,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-4)


# --- properties -------------------------------------------------------------------------

def test_metric_properties(weights):
  a, b = _images(3)
  x, y = np.stack([a, b]), np.stack([b, a])
  same = np.asarray(_distance(weights, x, x))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)
  d = np.asarray(_distance(weights, x, y))
  assert (d > 1e-3).all(), d
  np.testing.assert_allclose(d[0], d[1], rtol=1e-5)  # d(a, b) == d(b, a)
  low = np.asarray(_distance(weights, x, y, dtype=jnp.bfloat16))
  assert low.dtype == np.float32
  np.testing.assert_allclose(low, d, rtol=0.01)


def test_gradients_flow(weights):
  x, y = _images(4), _images(5)
  # The weights go in as an argument: closed over, they would be baked into the program.
  loss = lambda weights, x: jnp.mean(perceptual.distance(weights, x, y))
  grad = np.asarray(jax.jit(jax.grad(loss, argnums=1))(weights, x))
  assert np.isfinite(grad).all()
  assert np.abs(grad).max() > 0


# --- the loader's errors ----------------------------------------------------------------

def test_loader_errors_name_file_and_key(tmp_path, weights):
  def write(name, arrays):
    path = tmp_path / name
    np.savez(path, format_version=np.array(perceptual.FORMAT_VERSION), **arrays)
    return path

  missing = write("missing.npz", {k: v for k, v in weights.items() if k != "conv3_2/bias"})
  with pytest.raises(perceptual.PerceptualWeightsError, match=r"missing\.npz.*'conv3_2/bias'"):
    perceptual.load_weights(missing)
  some_lin = write("some_lin.npz", {k: v for k, v in weights.items() if k != "lin4/weight"})
  with pytest.raises(perceptual.PerceptualWeightsError, match=r"some_lin\.npz.*'lin4/weight'"):
    perceptual.load_weights(some_lin)
  shaped = write("shaped.npz", dict(weights, **{"conv1_1/kernel": np.zeros((3, 3, 3, 32))}))
  with pytest.raises(perceptual.PerceptualWeightsError,
                     match=r"shaped\.npz.*'conv1_1/kernel' has shape \(3, 3, 3, 32\)"):
    perceptual.load_weights(shaped)
  text = tmp_path / "vgg.pth"
  text.write_bytes(b"not an npz")
  with pytest.raises(perceptual.PerceptualWeightsError, match=r"vgg\.pth is not an \.npz"):
    perceptual.load_weights(text)
  with pytest.raises(perceptual.PerceptualWeightsError, match=r"absent\.npz"):
    perceptual.load_weights(tmp_path / "absent.npz")
  baseline = perceptual.load_weights(
      write("baseline.npz", {k: v for k, v in weights.items() if not k.startswith("lin")}))
  assert set(baseline) == set(perceptual.expected_shapes(with_lin=False))
