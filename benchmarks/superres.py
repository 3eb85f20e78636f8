"""The super-resolution upsampler against bicubic upsampling on held-out images.

  python benchmarks/superres.py --workdir runs/bench_superres [--steps 300] \
      [--vgg vgg16_lpips.npz] [--shapes_model RUN --photos_model RUN] \
      [--speed_config configs/superres_x2.py]

Two image sets, each with a tiny upsampler (configs/superres_tiny.py, x2) trained for it
through the real trainer unless a run is given:
  shapes: the demo's shapes rendered at 64 px (2x the demo's 32 px); trained on the train
          split, measured on the validation split's images.
  photos: scikit-image's bundled photographs (`skimage.data`); trained on random crops of
          the training photos (an image shard set written by `python -m
          parti_jax.data.ingest folder`, each photo resized to 256 px), measured on the
          held-out ones (HELD_OUT), each the centre square resized to 256 px.
Each held-out image is the target; its input is the area mean of each 2x2 block, rounded to
uint8 as a stored image would be. Reported per set: the mean PSNR (8-bit pixels) of the
model's output (`parti_jax.upsample.Upsampler`, as the upsample command runs it) and of
bicubic upsampling of the same input, the gain, the LPIPS distance of both with `--vgg`
(weights from `python -m parti_jax.convert.vgg16`), and the model's images/s (median of
`--repeats` timed calls on the whole set, after a warm-up). `--speed_config` also times
the config's network (random weights: speed does not depend on training) upsampling a
batch of `--speed_batch` 256 px images. The last line printed is one JSON object.
"""

import importlib.util
import io
import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from PIL import Image

from parti_jax import cli, sharding, upsample
from parti_jax import train as trainer
from parti_jax.data import images as image_lib
from parti_jax.data import ingest, records
from parti_jax.models import perceptual
from parti_jax.models import superres as sr
from parti_jax.shapes import dataset, scenes
from parti_jax.tasks import superres as sr_task

# skimage.data's colour and grey photographs that ship with scikit-image (no download).
HELD_OUT = ("astronaut", "coffee", "chelsea")
# The rest of them at least PHOTO_SIZE on the short side (smaller ones would be enlarged
# into blurred targets: `page` and `text` are left out).
TRAINING = ("rocket", "immunohistochemistry", "hubble_deep_field", "retina", "camera",
            "coins", "moon", "brick", "grass", "gravel", "clock", "cell")
PHOTO_SIZE = 256  # held-out photos are measured at this size (128 px inputs)
# Training photos are stored with at most this short side: the pipeline resizes them to
# PHOTO_SIZE anyway, and decoding the 1411 px retina every time it is drawn slowed steps.
STORED_SIZE = 384
ROOT = epath.Path(__file__).parent.parent

FLAGS = cli.Flags(__doc__)
FLAGS.string("workdir", None, "Where data, runs and results go.", required=True)
FLAGS.integer("steps", 300, "Training steps of each tiny upsampler.")
FLAGS.integer("photo_crop", 48, "High-resolution crop side when training on photos.")
FLAGS.integer("shapes", 256, "Held-out shapes images (the validation split).")
FLAGS.integer("shapes_train", 2000, "Shapes images to train on (the train split).")
FLAGS.string("shapes_model", None, "A trained run to measure on shapes (default: train one).")
FLAGS.string("photos_model", None, "A trained run to measure on photos (default: train one).")
FLAGS.string("vgg", None, "VGG-16 LPIPS weights (.npz): also report the perceptual distance.")
FLAGS.integer("repeats", 5, "Timed calls for images/s.")
FLAGS.string("speed_config", None, "Also time this config's network on 256 px inputs.")
FLAGS.integer("speed_batch", 8, "Images per call for --speed_config.")


def load_config(path):
  """configs/NAME.py's get_config() (a config is code, docs/trust.md)."""
  spec = importlib.util.spec_from_file_location("config", str(path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def photo(name: str) -> np.ndarray:
  """An skimage.data image as uint8 [H, W, 3] (grey ones repeated to RGB)."""
  import skimage.data
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return image_lib.rgb_array(np.asarray(getattr(skimage.data, name)(), np.uint8))


def photo_shards(workdir: epath.Path) -> str:
  """The training photos as an image shard set, through the ingest command."""
  folder, out = workdir / "photos" / "train", workdir / "photos" / "train_shards"
  if not (out / "metadata.json").exists():
    folder.mkdir(parents=True, exist_ok=True)
    for name in TRAINING:
      img = Image.fromarray(photo(name))
      shrink = STORED_SIZE / min(img.size)
      if shrink < 1:
        img = img.resize((round(img.width * shrink), round(img.height * shrink)),
                         Image.Resampling.LANCZOS)
      img.save(folder / f"{name}.png")
      (folder / f"{name}.txt").write_text(f"a photograph: {name}\n")  # ingest wants captions
    ingest.main(["folder", "--images", str(folder), "--out", str(out), "--no_progress"])
  return str(out)


def shapes_data(workdir: epath.Path, num_train: int, num_heldout: int) -> epath.Path:
  """Shapes at 64 px, objects on a 16 px lattice (the demo's 8 px lattice at 32 px)."""
  root = workdir / "shapes64"
  if not (root / "validation" / "metadata.json").exists():
    dataset.write(root, scenes.Spec(resolution=64, lattice=16), num=num_train,
                  num_validation=num_heldout, num_heldout=0, progress=False)
  return root


def train(workdir: epath.Path, name: str, steps: int, train_data: str, eval_data: str = "",
          **config_fields) -> str:
  """A tiny upsampler trained through the trainer (resumed if its run exists)."""
  config = load_config(ROOT / "configs" / "superres_tiny.py")
  config.num_train_steps = steps
  config.data.update(train=train_data, eval=eval_data)
  config.train.update(eval_every=steps, checkpoint_every=steps)
  for field, value in config_fields.items():
    config.update_from_flattened_dict({field: value})
  run = workdir / f"run_{name}"
  start = time.perf_counter()
  trainer.train(config, run)
  print(f"{name}: trained {steps} steps in {time.perf_counter() - start:.0f} s", file=sys.stderr)
  return str(run)


def psnr(x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Per-image PSNR (dB) of uint8 images."""
  mse = np.mean((x.astype(np.float64) - y.astype(np.float64)) ** 2, axis=(1, 2, 3))
  return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def measure(upsampler: upsample.Upsampler, targets: np.ndarray, repeats: int,
            vgg: dict | None) -> dict:
  """The model against bicubic on `targets` (uint8 [N, H, W, 3]) from their 2x2 area means."""
  s = upsampler.scale
  lowres = np.asarray(sr.area_downsample(jnp.asarray(targets, jnp.float32), s))
  lowres = np.clip(lowres + 0.5, 0, 255).astype(np.uint8)
  output = upsampler(lowres)  # also the warm-up
  bicubic = np.asarray(sr.bicubic(jnp.asarray(lowres, jnp.float32), s))
  bicubic = np.clip(bicubic + 0.5, 0, 255).astype(np.uint8)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    upsampler(lowres)
    times.append(time.perf_counter() - start)
  p_model, p_bicubic = psnr(output, targets), psnr(bicubic, targets)
  r = dict(images=len(targets), input_size=list(lowres.shape[1:3]),
           output_size=list(targets.shape[1:3]), psnr_model=float(p_model.mean()),
           psnr_bicubic=float(p_bicubic.mean()), psnr_gain=float((p_model - p_bicubic).mean()),
           images_better_than_bicubic=int((p_model > p_bicubic).sum()),
           images_per_s=len(targets) / float(np.median(times)))
  if vgg:
    model_range = lambda x: jnp.asarray(image_lib.to_model_range(x, -1.0, 1.0))
    lpips = lambda x: float(jnp.mean(perceptual.distance(vgg, model_range(x),
                                                         model_range(targets))))
    r.update(lpips_model=lpips(output), lpips_bicubic=lpips(bicubic))
  return r


def speed(config_file: str, batch: int, repeats: int) -> dict:
  """Images/s of a config's network (random weights) upsampling 256 px images."""
  config = load_config(config_file)
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  mesh = sharding.make_mesh(config, jax.local_devices(), training=False)
  setup = sr_task.Setup(config, mesh, training=False)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(
      sr.SuperRes(config.model, rngs=nnx.Rngs(0)), nnx.Param)),
      out_shardings=setup.param_shardings)()
  fn = jax.jit(lambda p, x: setup.model(p)(x), out_shardings=setup.batch_sharding)
  x = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, 256, 256, 3))
                     .astype(np.float32), setup.batch_sharding)
  jax.block_until_ready(fn(params, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(params, x))
    times.append(time.perf_counter() - start)
  return dict(config=config_file, scale=config.model.scale, batch=batch, input_size=256,
              images_per_s=batch / float(np.median(times)), dtype=config.model.dtype)


def main(argv=None):
  a = FLAGS.parse(argv)
  workdir = epath.Path(a.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  vgg = perceptual.load_weights(a.vgg) if a.vgg else None
  shapes = shapes_data(workdir, a.shapes_train, a.shapes)
  shapes_model = a.shapes_model or train(
      workdir, "shapes", a.steps, str(shapes / "train"), str(shapes / "validation"))
  photos_model = a.photos_model or train(
      workdir, "photos", a.steps, photo_shards(workdir),
      **{"data.resolution": PHOTO_SIZE, "model.crop": a.photo_crop})
  results = dict(device_kind=jax.devices()[0].device_kind, num_devices=jax.local_device_count(),
                 steps=a.steps)
  shapes_targets = np.stack([np.asarray(Image.open(io.BytesIO(r["image"])).convert("RGB"))
                             for r in records.ShardSet.open(shapes / "validation").read_all()])
  shapes_targets = shapes_targets[:a.shapes]
  photo_targets = np.stack([image_lib.square(Image.fromarray(photo(n)), PHOTO_SIZE)
                            for n in HELD_OUT])
  for name, model, targets in (("shapes", shapes_model, shapes_targets),
                               ("photos", photos_model, photo_targets)):
    upsampler = upsample.Upsampler.load(model)
    results[name] = dict(model=model, step=upsampler.step, **measure(
        upsampler, targets, a.repeats, vgg))
    print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
  results["photos"]["held_out"] = list(HELD_OUT)
  if a.speed_config:
    results["speed"] = speed(a.speed_config, a.speed_batch, a.repeats)
  print(json.dumps(results))


if __name__ == "__main__":
  cli.run(main)
