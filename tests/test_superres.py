"""The super-resolution upsampler: the network's shapes and parts, the task's crops, inputs
and checks, a real training run that beats bicubic, exact resume, and the upsample command."""

import io
import json
import math
import subprocess
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ROOT, load_config
from flax import nnx
from PIL import Image
from sampling_helpers import SUPERRES_STEPS as STEPS
from sampling_helpers import superres_config, superres_run

from parti_jax import config as config_lib
from parti_jax import metrics
from parti_jax import runs, sharding, upsample
from parti_jax import train as trainer
from parti_jax.data import records
from parti_jax.models import superres as sr
from parti_jax.tasks import superres as sr_task



def small_model(scale: int, **fields):
  m = load_config("superres_tiny").model
  m.update(scale=scale, channels=8, blocks=1, expansion=2, **fields)
  return m


def params_of(module, without=()) -> int:
  state = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  return sum(x.size for k, v in state.items() if k not in without for x in jax.tree.leaves(v))


# ----------------------------------------------------------------------------- the network

@pytest.mark.parametrize("scale,h,w", [(2, 8, 8), (2, 7, 5), (4, 5, 9), (3, 6, 4)])
def test_output_is_scale_times_larger_and_starts_as_bicubic(scale, h, w):
  model = sr.SuperRes(small_model(scale), rngs=nnx.Rngs(0))
  x = jax.random.uniform(jax.random.key(1), (2, h, w, 3), minval=-1, maxval=1)
  y = model(x)
  assert y.shape == (2, scale * h, scale * w, 3) and y.dtype == jnp.float32
  # The tail starts at zero: the untrained network is exactly bicubic upsampling.
  np.testing.assert_allclose(y, sr.bicubic(x, scale), atol=1e-6)
  # After a change of the tail, the body's detail is added.
  model.tail.bias[...] = jnp.full_like(model.tail.bias[...], 0.25)
  np.testing.assert_allclose(model(x), sr.bicubic(x, scale) + 0.25, atol=1e-5)


def test_pixel_shuffle_puts_each_channel_group_at_its_sub_pixel():
  s, c = 3, 2
  x = np.random.default_rng(0).normal(size=(1, 2, 4, s * s * c)).astype(np.float32)
  y = np.asarray(sr.pixel_shuffle(jnp.asarray(x), s))
  assert y.shape == (1, 6, 12, c)
  for i in range(s):
    for j in range(s):
      np.testing.assert_array_equal(y[:, i::s, j::s, :], x[..., (i * s + j) * c:(i * s + j + 1) * c])


def test_the_low_resolution_input_is_the_area_mean():
  x = np.random.default_rng(1).uniform(-1, 1, (2, 6, 9, 3)).astype(np.float32)
  low = np.asarray(sr.area_downsample(jnp.asarray(x), 3))
  assert low.shape == (2, 2, 3, 3)
  for r in range(2):
    for c in range(3):
      np.testing.assert_allclose(low[:, r, c], x[:, 3 * r:3 * r + 3, 3 * c:3 * c + 3].mean((1, 2)),
                                 rtol=1e-6)


@pytest.mark.parametrize("name,paper_millions", [("superres_x2", 15), ("superres_x4", 30)])
def test_the_paper_configs_have_its_sizes(name, paper_millions):
  m = load_config(name).model
  model = nnx.eval_shape(lambda: sr.SuperRes(m, rngs=nnx.Rngs(0)))  # shapes only
  assert (m.blocks, m.channels) == (12, 128)  # the paper's
  upsampler = params_of(model, without=("discriminator",))
  assert upsampler / 1e6 == pytest.approx(paper_millions, rel=0.1)
  assert params_of(model.discriminator) > 0  # its adversary, with its own optimizer
  assert model.tail.kernel.shape == (3, 3, 128, 3 * m.scale ** 2)


def test_random_crops_are_squares_of_the_images_drawn_from_the_key():
  images = jax.random.uniform(jax.random.key(0), (4, 16, 12, 3))
  a = sr_task.random_crops(images, 5, jax.random.key(7))
  b = sr_task.random_crops(images, 5, jax.random.key(7))
  c = sr_task.random_crops(images, 5, jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  x = np.asarray(images)
  for crop, image in zip(np.asarray(a), x):
    places = [(i, j) for i in range(12) for j in range(8)
              if np.array_equal(image[i:i + 5, j:j + 5], crop)]
    assert len(places) == 1


def test_the_train_step_cuts_its_crops_from_the_state_and_downsamples_by_area():
  config = load_config("superres_tiny")
  config.model.update(channels=8, blocks=1, expansion=2)
  config.global_batch_size = 8
  task = sr_task.build(config, sharding.make_mesh(config))
  state = task.setup.init_state()
  images = np.random.default_rng(0).uniform(-1, 1, (8, 64, 64, 3)).astype(np.float32)
  batch = {"images": sharding.place_global_batch(task.setup.batch_sharding, images)}
  rng, step = jax.device_get(state.rng), int(state.step)
  _, metrics = task.train_step(state, batch)
  # The same crops and inputs made here give the step's bicubic PSNR.
  target = sr_task.random_crops(jnp.asarray(images), 32, jax.random.fold_in(rng, step))
  lowres = sr.area_downsample(target, 2)
  mse = jnp.mean((jnp.clip(sr.bicubic(lowres, 2), -1, 1) - target) ** 2)
  expected = 10 * jnp.log10(4.0 / mse)  # pixels in [-1, 1]: a range of 2
  assert float(metrics["psnr_bicubic"]) == pytest.approx(float(expected), abs=1e-4)
  # Untrained, the model is bicubic upsampling: no gain yet, and finite losses.
  assert float(metrics["psnr_gain"]) == pytest.approx(0.0, abs=1e-4)
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("change,named", [
    (lambda c: c.model.update(crop=33), "model.crop=33 is not divisible by model.scale=2"),
    (lambda c: c.model.update(crop=128), "model.crop=128 is larger than data.resolution=64"),
    (lambda c: c.data.update(spm_model="spm.model"), "data.spm_model='spm.model'"),
    (lambda c: c.data.update(kind="tokens"), "data.kind='tokens'"),
    (lambda c: (c.model.update(crop=48), c.model.discriminator.update(channels=16)),
     "the discriminator needs a power-of-two model.crop"),
    (lambda c: c.loss.update(adversarial=0.1), "loss.adversarial=0.1 needs a discriminator"),
    (lambda c: c.model.update(scale=1), "model.scale=1 must be at least 2"),
    (lambda c: c.update(global_batch_size=12), "global_batch_size=12 is not divisible"),
])
def test_a_config_that_cannot_work_is_refused_naming_the_field(change, named):
  config = load_config("superres_tiny")
  change(config)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.check(config, 8)
  assert named in str(e.value)


# ----------------------------------------------------------------------------- a trained run

@pytest.fixture(scope="module")
def trained(tmp_path_factory, worker_id):
  """One tiny upsampler trained through the real trainer, shared by the xdist workers."""
  return superres_run(tmp_path_factory, worker_id)


def validation_images(data) -> np.ndarray:
  """The validation split's 64 px images, uint8 [16, 64, 64, 3]."""
  shard_set = records.ShardSet.open(data / "validation")
  return np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
                   for r in shard_set.read_all()])


def test_a_short_run_beats_bicubic_on_held_out_images(trained):
  run, _, summary = trained
  assert summary["eval/examples"] == 16
  assert summary["eval/psnr"] > summary["eval/psnr_bicubic"] + 0.3, summary
  assert summary["eval/psnr_gain"] == pytest.approx(
      summary["eval/psnr"] - summary["eval/psnr_bicubic"], abs=1e-3)
  picture = np.asarray(Image.open(run / "pictures" / f"eval_picture_{STEPS:08d}.png"))
  assert picture.shape == (4 * 64, sr_task.PICTURE_IMAGES * 64, 3)
  # Rows: the input enlarged (blocks of 2x2 equal pixels), bicubic, the model, the target.
  nearest, target = picture[:64], picture[192:]
  np.testing.assert_array_equal(nearest[0::2], nearest[1::2])
  assert not np.array_equal(picture[64:128], target)


def test_an_interrupted_run_resumes_exactly(trained, tmp_path):
  """The crops come from the state's rng and step, the batches from the loader's saved
  state: a run stopped between checkpoints ends with the uninterrupted run's parameters."""
  _, data, _ = trained

  def config(checkpoint_every):  # a smaller network: what is tested is the state
    c = superres_config(data, steps=6, log_every=2, checkpoint_every=checkpoint_every)
    c.model.update(channels=8, blocks=1, expansion=2)
    c.data.eval = ""
    return c

  trainer.train(config(6), tmp_path / "whole")
  trainer.train(config(3), tmp_path / "resumed", stop_after_step=5)  # saved at step 3
  trainer.train(config(3), tmp_path / "resumed")
  # Losses are logged as means over the steps since the last log: the resumed run's log at
  # step 4 holds step 4 alone, its log at step 6 the same steps as the whole run's.
  losses = lambda run: {r["step"]: r["loss"] for r in metrics.read(run) if "loss" in r}
  whole, resumed = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
  assert sorted(whole) == sorted(resumed) == [2, 4, 6] and resumed[6] == whole[6]
  params = lambda run: runs.load(run, task="superres")[1]
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params(tmp_path / "resumed")),
               jax.device_get(params(tmp_path / "whole")))


def test_the_upsampler_beats_bicubic_on_uint8_images_of_any_size(trained):
  run, data, _ = trained
  upsampler = upsample.Upsampler.load(run)
  assert upsampler.scale == 2 and upsampler.step == STEPS
  targets = validation_images(data)
  lowres = np.asarray(sr.area_downsample(jnp.asarray(targets, jnp.float32), 2))
  lowres = np.clip(lowres + 0.5, 0, 255).astype(np.uint8)
  out = upsampler(lowres)
  assert out.shape == targets.shape and out.dtype == np.uint8
  bicubic = np.clip(np.asarray(sr.bicubic(jnp.asarray(lowres, jnp.float32), 2)) + 0.5, 0, 255)
  psnr = lambda x: 10 * math.log10(255 ** 2 / np.mean((x.astype(np.float64) - targets) ** 2))
  assert psnr(out) > psnr(bicubic.astype(np.uint8)) + 0.3
  # Any size, any count (padded to the devices' batch): 3 odd-sized images.
  odd = upsampler(lowres[:3, :7, :5])
  assert odd.shape == (3, 14, 10, 3)
  np.testing.assert_array_equal(odd, upsampler(lowres[:3, :7, :5])[:3])
  assert upsampler(lowres[:0]).shape == (0, 64, 64, 3)
  with pytest.raises(upsample.UpsampleError, match="uint8"):
    upsampler(lowres.astype(np.float32))


def test_a_run_of_another_task_is_refused_naming_it(tmp_path):
  helpers.vitvqgan_run(tmp_path / "vq")
  with pytest.raises(upsample.UpsampleError, match="trained 'vitvqgan', not 'superres'"):
    upsample.Upsampler.load(tmp_path / "vq")
  (tmp_path / "images").mkdir()
  with pytest.raises(SystemExit) as e:
    upsample.main(["--model", str(tmp_path / "vq"), "--images", str(tmp_path / "images"),
                   "--out", str(tmp_path / "out")])
  message = str(e.value.code)
  assert message.startswith("error: --model") and "'vitvqgan'" in message
  assert "\n" not in message
  with pytest.raises(SystemExit) as e:
    upsample.main(["--model", str(tmp_path / "vq"), "--images", str(tmp_path / "missing"),
                   "--out", str(tmp_path / "out")])
  assert str(e.value.code) == f"error: --images {tmp_path / 'missing'}: no such folder"


def test_the_command_upsamples_a_folder_and_counts_what_it_skips(trained, tmp_path):
  run, data, _ = trained
  folder, rng = tmp_path / "in", np.random.default_rng(0)
  folder.mkdir()
  small = validation_images(data)[:3, ::2, ::2]
  Image.fromarray(small[0]).save(folder / "a.png")
  Image.fromarray(small[1]).save(folder / "b.jpg", quality=95)
  Image.fromarray(small[2][:21, :13]).save(folder / "odd.PNG")
  Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(folder / "big.png")
  (folder / "broken.png").write_bytes(b"not a png at all")
  (folder / "notes.txt").write_text("not an image")
  out = subprocess.run(
      [sys.executable, "-m", "parti_jax.upsample", "--model", str(run), "--images", str(folder),
       "--out", str(tmp_path / "out"), "--max_pixels", "1024", "--noprogress"],
      cwd=ROOT, capture_output=True, text=True)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = out.stdout.strip().splitlines()[-1]
  assert summary.startswith("upsampled 3 images x2 from ")
  assert summary.endswith("skipped 3 (corrupt_image 1, image_too_large 1, not_png_or_jpeg 1)")
  written = {p.name: Image.open(p).size for p in (tmp_path / "out").iterdir()}
  assert written == {"a.png": (64, 64), "b.png": (64, 64), "odd.png": (26, 42)}


def test_the_benchmark_measures_a_run_against_bicubic(trained, tmp_path, capsys):
  """benchmarks/superres.py on the shared run (no training of its own), in process."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "superres.py")
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  run = str(trained[0])
  bench.main(["--workdir", str(tmp_path), "--shapes_model", run, "--photos_model", run,
              "--shapes", "8", "--shapes_train", "8", "--repeats", "1"])
  r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert r["shapes"]["images"] == 8 and r["shapes"]["output_size"] == [64, 64]
  assert r["photos"]["images"] == len(bench.HELD_OUT) and r["photos"]["input_size"] == [128, 128]
  for name in ("shapes", "photos"):
    m = r[name]
    assert m["step"] == STEPS and m["images_per_s"] > 0
    assert m["psnr_gain"] == pytest.approx(m["psnr_model"] - m["psnr_bicubic"], abs=1e-6)
  assert r["shapes"]["psnr_gain"] > 0  # the run trained on shapes beats bicubic on them
