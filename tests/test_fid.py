"""FID: the Frechet distance, the feature statistics, the Inception network, its converter
and the command line, on random weights (the real ones are not downloaded in tests)."""

import json

import jax
import numpy as np
import pytest
from PIL import Image

import helpers

from parti_jax.convert import inception as convert_inception
from parti_jax.data import images as image_lib
from parti_jax.data import records
from parti_jax.eval import fid, inception

RESOLUTION = 320  # the test pictures are brought to this size, the network scales down


def eigen_reference(mu1, sigma1, mu2, sigma2) -> float:
  """FID through the symmetric form: Tr((S1 S2)^(1/2)) = sum of sqrt(eig(S1^(1/2) S2 S1^(1/2)))."""
  values, vectors = np.linalg.eigh(sigma1)
  root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
  inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
  trace_root = np.sqrt(np.clip(inner, 0, None)).sum()
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_root)


def gaussian_samples(rng, n, d, shift=0.0):
  return rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift


def moments(x):
  return x.mean(0), np.cov(x, rowvar=False)


@pytest.mark.parametrize("n,d", [(400, 16), (10, 48)], ids=["full_rank", "singular"])
def test_frechet_distance_matches_the_symmetric_eigenvalue_form(n, d):
  rng = np.random.default_rng(0)
  a, b = moments(gaussian_samples(rng, n, d)), moments(gaussian_samples(rng, n + 5, d, 0.5))
  expected = eigen_reference(*a, *b)
  assert fid.frechet_distance(*a, *b) == pytest.approx(expected, rel=1e-6)
  assert fid.frechet_distance(*a, *a) == pytest.approx(0.0, abs=1e-6 * np.trace(a[1]))


def test_frechet_distance_of_diagonal_gaussians_has_a_closed_form():
  mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([3.0, 1.0, 2.0])
  var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
  # A shift alone: the squared distance of the means.
  assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var1)) == pytest.approx(25.0)
  # Per axis: (m1 - m2)^2 + (s1 - s2)^2 with standard deviations s.
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  assert fid.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected)


def test_frechet_distance_refuses_what_is_not_a_pair_of_gaussians():
  with pytest.raises(ValueError, match="imaginary part"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), -np.eye(3))
  with pytest.raises(ValueError, match="shapes"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_statistics_over_batches_are_numpys_mean_and_covariance():
  rng = np.random.default_rng(1)
  x = gaussian_samples(rng, 37, 24, 3.0).astype(np.float32)
  stats = fid.Statistics(dims=24)
  for start, stop in ((0, 1), (1, 16), (16, 16), (16, 37)):
    stats.add(x[start:stop])
  mu, sigma, count = stats.result()
  assert count == 37
  np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(x.astype(np.float64), rowvar=False, ddof=1),
                             rtol=1e-9, atol=1e-12)
  with pytest.raises(ValueError, match="at least 2"):
    fid.Statistics(dims=24).result()


# --- the network -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def features_fn():
  return jax.jit(inception.features)  # shared: each input shape compiles once per module


def test_layer_table_has_the_size_of_inception_v3():
  # Keras' InceptionV3 reports 23,851,784 parameters: the same convolutions, batch norms
  # without a scale (beta, mean, variance) and a 1000-class classifier.
  kernels = sum(np.prod(s) for k, s in inception.expected_shapes().items()
                if k.endswith("/kernel"))
  channels = sum(c.out_channels for c in inception.LAYERS.values())
  assert kernels + 3 * channels + 2048 * 1000 + 1000 == 23_851_784
  assert len(inception.LAYERS) == 94


@pytest.mark.parametrize("shape", [(1, 37, 53, 3), (1, 400, 350, 3)], ids=["up", "down"])
def test_inputs_are_resized_and_scaled_as_pytorch_fid_does(shape):
  torch = pytest.importorskip("torch")
  pixels = np.random.default_rng(2).integers(0, 256, shape, np.uint8)
  got = np.asarray(inception.preprocess(pixels))
  x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
  x = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  np.testing.assert_allclose(got, (2 * x - 1).permute(0, 2, 3, 1).numpy(), atol=1e-5)
  # The same pictures as floats in [-1, 1] are read as such.
  as_float = pixels.astype(np.float32) / 127.5 - 1
  np.testing.assert_allclose(np.asarray(inception.preprocess(as_float)), got, atol=1e-5)


def numpy_state_dict(seed: int = 0) -> dict[str, np.ndarray]:
  """A random state dict with pytorch-fid's key names and shapes (classifier included)."""
  rng = np.random.default_rng(seed)
  sd = {}
  for name, c in inception.LAYERS.items():
    shape = (c.out_channels, c.in_channels, *c.kernel)
    sd[f"{name}.conv.weight"] = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[1:]))
    sd[f"{name}.bn.weight"] = rng.uniform(0.5, 1.5, c.out_channels)
    sd[f"{name}.bn.bias"] = rng.normal(size=c.out_channels) * 0.1
    sd[f"{name}.bn.running_mean"] = rng.normal(size=c.out_channels) * 0.1
    sd[f"{name}.bn.running_var"] = rng.uniform(0.5, 1.5, c.out_channels)
  sd["fc.weight"] = rng.normal(size=(1008, 2048)) * 0.01
  sd["fc.bias"] = np.zeros(1008)
  return {k: v.astype(np.float32) for k, v in sd.items()}


@pytest.fixture(scope="module")
def state_dict():
  return numpy_state_dict()


@pytest.fixture(scope="module")
def weights(state_dict):
  """The state dict's weights, converted in memory (no torch needed)."""
  return inception.fold_batch_norm(convert_inception.convert_state(state_dict, "memory"))


def picture_files() -> dict[str, bytes]:
  """Two images of other sizes, modes and formats than the model's, in sorted-name order."""
  rng = np.random.default_rng(3)
  rgba = rng.integers(0, 256, (40, 50, 4), np.uint8)
  gray = Image.fromarray(rng.integers(0, 256, (36, 30), np.uint8))
  return {"a.png": image_lib.encode_png(rgba),
          "b.JPG": image_lib.encode_jpeg(np.asarray(gray.convert("RGB")))}


@pytest.fixture(scope="module")
def pixels():
  """The pictures as the command line makes them: uint8 [2, R, R, 3], R above 299."""
  return np.stack([image_lib.square(image_lib.open_image(data, RESOLUTION), RESOLUTION)
                   for data in picture_files().values()])


@pytest.fixture(scope="module")
def features(features_fn, weights, pixels):
  return np.asarray(features_fn(weights, pixels))


def test_features_are_deterministic_finite_and_tell_images_apart(features_fn, weights, pixels,
                                                                 features):
  assert features.shape == (2, inception.FEATURES) and features.dtype == np.float32
  assert np.isfinite(features).all() and (features >= 0).all()  # averages of ReLU outputs
  np.testing.assert_array_equal(np.asarray(features_fn(weights, pixels)), features)
  assert np.abs(features[0] - features[1]).max() > 1e-3 * np.abs(features).max()


# pytorch-fid's convolutions without padding, and those of stride 2; every other one pads
# to keep the size. Written out here, apart from the module's table, as a second reading.
STRIDE_2 = {"Conv2d_1a_3x3", "Mixed_6a.branch3x3", "Mixed_6a.branch3x3dbl_3",
            "Mixed_7a.branch3x3_2", "Mixed_7a.branch7x7x3_4"}
UNPADDED = STRIDE_2 | {"Conv2d_2a_3x3", "Conv2d_4a_3x3"}


def torch_reference(torch, sd, images):
  """pytorch-fid's forward pass (FID blocks), with torch.nn.functional on its state dict."""
  F = torch.nn.functional
  sd = {k: torch.from_numpy(v) for k, v in sd.items()}

  def conv(x, *names):
    for name in names:
      w = sd[f"{name}.conv.weight"]
      padding = (0, 0) if name in UNPADDED else (w.shape[2] // 2, w.shape[3] // 2)
      x = F.conv2d(x, w, stride=2 if name in STRIDE_2 else 1, padding=padding)
      x = F.batch_norm(x, sd[f"{name}.bn.running_mean"], sd[f"{name}.bn.running_var"],
                       sd[f"{name}.bn.weight"], sd[f"{name}.bn.bias"], training=False, eps=1e-3)
      x = F.relu(x)
    return x

  avg = lambda x: F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
  down = lambda x: F.max_pool2d(x, 3, stride=2)
  cat = lambda *xs: torch.cat(xs, 1)
  with torch.no_grad():
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    x = down(conv(x, "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"))
    x = down(conv(x, "Conv2d_3b_1x1", "Conv2d_4a_3x3"))
    for b in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
      x = cat(conv(x, f"{b}.branch1x1"), conv(x, f"{b}.branch5x5_1", f"{b}.branch5x5_2"),
              conv(x, f"{b}.branch3x3dbl_1", f"{b}.branch3x3dbl_2", f"{b}.branch3x3dbl_3"),
              conv(avg(x), f"{b}.branch_pool"))
    b = "Mixed_6a"
    x = cat(conv(x, f"{b}.branch3x3"),
            conv(x, f"{b}.branch3x3dbl_1", f"{b}.branch3x3dbl_2", f"{b}.branch3x3dbl_3"),
            down(x))
    for b in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
      x = cat(conv(x, f"{b}.branch1x1"),
              conv(x, *(f"{b}.branch7x7_{i}" for i in (1, 2, 3))),
              conv(x, *(f"{b}.branch7x7dbl_{i}" for i in (1, 2, 3, 4, 5))),
              conv(avg(x), f"{b}.branch_pool"))
    b = "Mixed_7a"
    x = cat(conv(x, f"{b}.branch3x3_1", f"{b}.branch3x3_2"),
            conv(x, *(f"{b}.branch7x7x3_{i}" for i in (1, 2, 3, 4))), down(x))
    for b, pool in (("Mixed_7b", avg), ("Mixed_7c", lambda v: F.max_pool2d(v, 3, 1, 1))):
      wide = conv(x, f"{b}.branch3x3_1")
      deep = conv(x, f"{b}.branch3x3dbl_1", f"{b}.branch3x3dbl_2")
      x = cat(conv(x, f"{b}.branch1x1"),
              cat(conv(wide, f"{b}.branch3x3_2a"), conv(wide, f"{b}.branch3x3_2b")),
              cat(conv(deep, f"{b}.branch3x3dbl_3a"), conv(deep, f"{b}.branch3x3dbl_3b")),
              conv(pool(x), f"{b}.branch_pool"))
    return x.mean((2, 3)).numpy()


def test_converted_torch_file_gives_pytorch_fids_features(tmp_path, state_dict, weights,
                                                          pixels, features):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(v) for k, v in state_dict.items()}
  state["Conv2d_1a_3x3.bn.num_batches_tracked"] = torch.tensor(0)  # newer torch adds these
  path = tmp_path / "pt_inception.pth"
  # The released file predates torch's zip format.
  torch.save(state, path, _use_new_zipfile_serialization=False)
  out = tmp_path / "sub" / "inception_fid.npz"
  convert_inception.main(["--pytorch_fid", str(path), "--out", str(out)])
  loaded = inception.load_weights(out)
  assert set(loaded) == {f"{n}/{p}" for n in inception.LAYERS for p in ("kernel", "bias")}
  for key, value in loaded.items():  # so `features` are those of the file's weights
    np.testing.assert_array_equal(value, weights[key], err_msg=key)
  expected = torch_reference(torch, state_dict, pixels)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_converter_names_the_file_and_the_key(state_dict):
  sd, path = state_dict, "x.pth"
  broken = dict(sd)
  del broken["Mixed_6c.branch7x7_2.bn.running_var"]
  with pytest.raises(convert_inception.ConversionError,
                     match=r"x\.pth: missing key 'Mixed_6c\.branch7x7_2\.bn\.running_var'"):
    convert_inception.convert_state(broken, path)
  broken = dict(sd, **{"Mixed_5b.branch5x5_2.conv.weight": np.zeros((64, 48, 3, 3))})
  with pytest.raises(convert_inception.ConversionError,
                     match=r"'Mixed_5b\.branch5x5_2\.conv\.weight' has shape \(64, 48, 3, 3\)"):
    convert_inception.convert_state(broken, path)
  with pytest.raises(convert_inception.ConversionError, match="1000-class"):
    convert_inception.convert_state(dict(sd, **{"fc.weight": np.zeros((1000, 2048))}), path)
  with pytest.raises(convert_inception.ConversionError, match="unexpected key.*'extra.weight'"):
    convert_inception.convert_state(dict(sd, **{"extra.weight": np.zeros(3)}), path)


def test_load_weights_names_the_file_and_the_key(tmp_path):
  with pytest.raises(inception.InceptionWeightsError, match="cannot read.*convert.inception"):
    inception.load_weights(tmp_path / "missing.npz")
  (tmp_path / "text.npz").write_text("not a zip")
  with pytest.raises(inception.InceptionWeightsError, match=r"text\.npz is not an \.npz"):
    inception.load_weights(tmp_path / "text.npz")
  version = np.array(inception.FORMAT_VERSION)
  # Keys are checked in the network's order, so a first layer tells each story.
  cases = {
      "absent": (dict(format_version=version), r"absent\.npz: missing key 'Conv2d_1a_3x3/kernel'"),
      "shape": (dict(format_version=version,
                     **{"Conv2d_1a_3x3/kernel": np.zeros((32, 3, 3, 3), np.float32)}),
                r"'Conv2d_1a_3x3/kernel' has shape \(32, 3, 3, 3\), expected \(3, 3, 3, 32\)"),
      "version": (dict(format_version=np.array(7)), "format_version 7"),
      "unversioned": ({"Conv2d_1a_3x3/kernel": np.zeros(1)}, "missing key 'format_version'"),
  }
  for name, (content, message) in cases.items():
    path = tmp_path / f"{name}.npz"
    np.savez(path, **content)
    with pytest.raises(inception.InceptionWeightsError, match=message):
      inception.load_weights(path)


# --- the command line ------------------------------------------------------------------


def test_cli_measures_a_folder_against_a_shard_set(tmp_path, monkeypatch, capsys, state_dict,
                                                   features):
  files = picture_files()
  folder = tmp_path / "samples"
  folder.mkdir()
  for name, data in files.items():
    (folder / name).write_bytes(data)
  (folder / "c_broken.png").write_bytes(b"\x89PNG truncated")
  (folder / "notes.txt").write_text("not an image")
  shards = tmp_path / "shards"
  recs = [dict(id=str(i), image=data, captions=["x"]) for i, data in enumerate(files.values())]
  recs.append(dict(id="bad", image=b"junk", captions=["x"]))
  records.write_shard_set(shards, "fidtest", "images", recs, num_shards=2, made_by={})
  weights_path = tmp_path / "inception_fid.npz"
  np.savez(weights_path, **convert_inception.convert_state(state_dict, "memory"))

  # At 2048 dimensions scipy's sqrtm takes a minute on a small CPU; the distance is tested
  # above, so here it is checked on what it is given, and measured on 16 dimensions.
  calls = []

  def distance(mu1, sigma1, mu2, sigma2):
    calls.append((mu1, sigma1, mu2, sigma2))
    return frechet_distance(mu1[:16], sigma1[:16, :16], mu2[:16], sigma2[:16, :16])

  frechet_distance = fid.frechet_distance
  monkeypatch.setattr(fid, "frechet_distance", distance)
  result = fid.main(["--weights", str(weights_path), "--resolution", str(RESOLUTION),
                     "--batch_size", "2", str(folder), str(shards)])
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed == result
  assert result["mode"] == "fid" and result["resolution"] == RESOLUTION
  assert result["a"] == str(folder) and result["b"] == str(shards) and result["seconds"] > 0
  assert (result["images_a"], result["skipped_a"]) == (2, 1)
  assert (result["images_b"], result["skipped_b"]) == (2, 1)
  assert result["fid"] == pytest.approx(0.0, abs=1e-3)  # the same pictures on both sides

  expected = features.astype(np.float64)  # of the same pictures, decoded by the test
  (mu_a, sigma_a, mu_b, sigma_b), = calls
  for mu, sigma in ((mu_a, sigma_a), (mu_b, sigma_b)):
    np.testing.assert_allclose(mu, expected.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sigma, np.cov(expected, rowvar=False), rtol=1e-4, atol=1e-4)


def test_cli_names_what_is_missing(tmp_path):
  weights_path = tmp_path / "w.npz"
  folder = tmp_path / "pictures"
  folder.mkdir()
  (folder / "a.png").write_bytes(image_lib.encode_png(np.zeros((8, 8, 3), np.uint8)))
  empty = tmp_path / "empty"
  empty.mkdir()
  args = ["--weights", str(weights_path)]
  with pytest.raises(fid.FidError, match="nowhere: no such directory"):
    fid.main(args + [str(folder), str(tmp_path / "nowhere")])
  with pytest.raises(fid.FidError, match="empty: no images"):
    fid.main(args + [str(folder), str(empty)])
  with pytest.raises(inception.InceptionWeightsError, match=r"w\.npz"):
    fid.main(args + [str(folder), str(folder)])


def test_cli_rfid_compares_a_tokenizers_reconstructions_with_the_originals(
    tmp_path, monkeypatch, capsys):
  from parti_jax.tasks import vitvqgan as vqgan_task
  setup, params = helpers.vitvqgan_run(tmp_path / "run")
  rng = np.random.default_rng(4)
  pixels = rng.integers(0, 256, (6, 32, 32, 3), np.uint8)
  recs = [dict(id=str(i), image=image_lib.encode_png(p), captions=["x"])
          for i, p in enumerate(pixels)]
  records.write_shard_set(tmp_path / "shards", "rfid", "images", recs, num_shards=1, made_by={})
  weights_path = tmp_path / "w.npz"
  np.savez(weights_path, **inception.random_file_arrays(0))
  # Inception is tested above; a stand-in passing on the first 2048 values of each image
  # shows exactly which pixels reach it. Distances are taken on 16 dimensions (see above).
  first_values = lambda weights, x: x.reshape(x.shape[0], -1)[:, :inception.FEATURES]
  monkeypatch.setattr(inception, "features", first_values)
  calls = []
  frechet_distance = fid.frechet_distance

  def distance(*moments):
    calls.append(moments)
    return frechet_distance(*(m[:16] if m.ndim == 1 else m[:16, :16] for m in moments))

  monkeypatch.setattr(fid, "frechet_distance", distance)
  # Batches of 8, one row per simulated device: the 6 images and 2 padding rows.
  result = fid.main(["--weights", str(weights_path), "--tokenizer",
                     f"vitvqgan:{tmp_path / 'run'}", "--batch_size", "5",
                     str(tmp_path / "shards")])
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
  assert (result["mode"], result["images"], result["skipped"], result["resolution"]) == (
      "rfid", 6, 0, 32)
  assert np.isfinite(result["fid"]) and result["fid"] > 0

  recon = vqgan_task.reconstruct_fn(setup)(params, image_lib.to_model_range(pixels, -1, 1))
  rebuilt = image_lib.to_uint8(np.asarray(recon), -1, 1)  # as a saved picture
  (mu_a, sigma_a, mu_b, sigma_b), = calls
  f = first_values(None, pixels.astype(np.float64))
  np.testing.assert_allclose(mu_a, f.mean(0), rtol=1e-9)
  np.testing.assert_allclose(sigma_a, np.cov(f, rowvar=False), rtol=1e-9, atol=1e-9)
  # The command reconstructs 8 rows sharded over 8 devices, the test 6 on one: float noise
  # can tip a rare pixel across a rounding boundary, moving a mean by one level in six.
  off = np.abs(mu_b - first_values(None, rebuilt.astype(np.float64)).mean(0))
  assert off.max() <= 1 / 6 + 1e-9 and np.mean(off > 1e-9) < 0.01
