"""The ViT-VQGAN model: sizes, codes, the straight-through estimator, losses, metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_config
from parti_jax import sharding, tokenizers
from parti_jax.models import vitvqgan as vqgan
from parti_jax.tasks import vitvqgan as vqgan_task


def count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name,paper_millions,tolerance", [
    ("small", 32, 0.15), ("base", 91, 0.01), ("large", 599, 0.1)])
def test_sizes_per_side_are_the_papers(name, paper_millions, tolerance):
  m = load_config(f"vitvqgan_{name}").model
  model = nnx.eval_shape(lambda: vqgan.ViTVQGAN(m, rngs=nnx.Rngs(0)))
  encoder = count(model.patch_in) + count(model.encoder) + count(model.to_code)
  decoder = count(model.from_code) + count(model.decoder) + count(model.to_pixels)
  for side in (encoder, decoder):
    assert side / 1e6 == pytest.approx(paper_millions, rel=tolerance)
  assert model.grid == 32 and model.codebook.shape == (8192, 32)


@pytest.fixture(scope="module")
def tiny():
  m = load_config("vitvqgan_tiny").model
  return vqgan.ViTVQGAN(m, rngs=nnx.Rngs(0)), m


def images(n=4, seed=1):
  return jax.random.uniform(jax.random.key(seed), (n, 32, 32, 3), minval=-1, maxval=1)


def test_codes_are_the_nearest_normalized_entries(tiny):
  model, m = tiny
  x = images()
  codes = model.encode(x)
  assert codes.shape == (4, 16) and codes.dtype == jnp.int32
  z, book = model.latents(x), model.normalized_codebook()
  np.testing.assert_allclose(jnp.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(jnp.linalg.norm(book, axis=-1), 1.0, atol=1e-5)
  distances = jnp.sum((z[:, :, None, :] - book[None, None]) ** 2, -1)
  np.testing.assert_array_equal(codes, jnp.argmin(distances, -1))
  decoded = model.decode(codes)
  assert decoded.shape == (4, 32, 32, 3)
  np.testing.assert_allclose(decoded, model(x)["reconstruction"], atol=1e-5)


def test_gradients_reach_the_encoder_through_the_quantizer(tiny):
  model, _ = tiny
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p):
    out = nnx.merge(graphdef, p)(images())
    return jnp.mean((out["reconstruction"] - images()) ** 2)

  grads = nnx.to_pure_dict(jax.grad(loss)(params))
  encoder_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads["encoder"]))
  assert encoder_norm > 0  # straight-through: the decoder's gradient passes to the encoder
  assert float(jnp.abs(grads["codebook"]).sum()) == 0  # entries move by the codebook loss


def test_quantizer_losses_and_metrics(tiny):
  model, m = tiny
  out = model(images())
  assert float(out["codebook_loss"]) == pytest.approx(float(out["commitment_loss"]), rel=1e-5)
  assert 0 < float(out["codebook_loss"]) <= 4.0  # unit vectors: squared distance <= 4
  used, perplexity = vqgan.codebook_usage(jnp.array([[0, 0, 1, 2]]), 4)
  assert float(used) == 0.75
  masked, _ = vqgan.codebook_usage(jnp.array([[0, 0], [3, 3]]), 4, jnp.array([1, 0]))
  assert float(masked) == 0.25  # the padding row's code 3 is not a use
  assert float(perplexity) == pytest.approx(np.exp(-(0.5 * np.log(0.5) + 0.5 * np.log(0.25))))
  x = images()
  assert float(vqgan.psnr(x, x)[0]) == pytest.approx(10 * np.log10(4 / 1e-10))  # capped
  assert float(vqgan.psnr(x + 0.1, x)[0]) == pytest.approx(10 * np.log10(4 / 0.01), rel=1e-4)
  assert out["output"].shape[-1] == 6 and np.isfinite(float(
      vqgan.logit_laplace_nll(out["output"], x)))


def test_logit_laplace_prefers_the_right_location_and_scale():
  x = jnp.full((1, 2, 2, 3), 0.3)
  at = lambda loc, log_scale: jnp.concatenate(
      [jnp.full((1, 2, 2, 3), loc), jnp.full((1, 2, 2, 3), log_scale)], -1)
  right = vqgan.logit_laplace_nll(at(0.3, -3.0), x)
  assert right < vqgan.logit_laplace_nll(at(-0.5, -3.0), x)
  assert right < vqgan.logit_laplace_nll(at(0.3, 1.0), x)


def test_parameters_carry_logical_names_that_shard_on_the_mesh(tiny):
  config = load_config("vitvqgan_tiny")
  config.mesh.update(data=1, fsdp=8, tensor=1)
  model = nnx.eval_shape(lambda: vqgan.ViTVQGAN(config.model, rngs=nnx.Rngs(0)))
  specs = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  mesh = sharding.make_mesh(config)
  shardings = sharding.named(mesh, specs, sharding.rules_of(config))
  kernel = shardings["encoder"]["stack"]["blocks"]["mlp"]["up"]["kernel"]
  assert kernel.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert shardings["codebook"].spec == jax.sharding.PartitionSpec(None, None)


def test_the_trainer_trains_the_tokenizer(tmp_path):
  """Same command, same checkpoints and metrics: the tokenizer plugs into the trainer."""
  from parti_jax import metrics
  from parti_jax import train as trainer
  from parti_jax.data import images
  from parti_jax.shapes import dataset, scenes
  dataset.write(tmp_path / "shapes", scenes.Spec(), num=64, num_validation=16, num_heldout=0,
                progress=False)
  config = load_config("vitvqgan_tiny")
  config.data.update(train=str(tmp_path / "shapes" / "train"),
                     eval=str(tmp_path / "shapes" / "validation"))
  config.num_train_steps = 20
  config.train.update(log_every=10, eval_every=20, checkpoint_every=20)
  summary = trainer.train(config, tmp_path / "run")
  rows = metrics.read(tmp_path / "run")
  train_rows = [r for r in rows if "l2" in r]
  assert train_rows[-1]["l2"] < train_rows[0]["l2"]
  for key in ("psnr", "codebook_usage", "codebook_perplexity", "logit_laplace", "mfu"):
    assert key in train_rows[-1], key
  assert summary["eval/examples"] == 16 and summary["eval/psnr"] > 10
  assert (tmp_path / "run" / "checkpoints" / "20").is_dir()
  (picture,) = (tmp_path / "run" / "pictures").iterdir()  # originals above reconstructions
  assert images.open_image(picture.read_bytes()).size == (8 * 32, 2 * 32)

  # Its codes: data.encode with --tokenizer vitvqgan:RUN_DIR gives the model's own codes.
  from parti_jax.data import encode, records, spm
  spm.train(spm.captions_of([tmp_path / "shapes" / "train"]), tmp_path / "spm", 64)
  tokenizer = tokenizers.load(f"vitvqgan:{tmp_path / 'run'}")
  assert (tokenizer.resolution, tokenizer.grid, tokenizer.codebook_size) == (32, 4, 64)
  meta = encode.encode(tmp_path / "shapes" / "validation", tmp_path / "tokens", tokenizer,
                       spm.Tokenizer(tmp_path / "spm.model", 16), batch_size=8)
  assert meta["count"] == 16 and meta["tokens"]["grid"] == 4
  record = next(records.ShardSet.open(tmp_path / "tokens").read_all())
  source = {r["id"]: r for r in records.ShardSet.open(tmp_path / "shapes" / "validation")
            .read_all()}
  pixels = images.to_model_range(images.square(images.open_image(
      source[record["id"]]["image"]), 32), -1, 1)
  model = vqgan_task.Setup(config).model(tokenizer.params)
  np.testing.assert_array_equal(np.frombuffer(record["image_codes"], np.uint16),
                                np.asarray(model.encode(pixels[None]))[0])

  # Parti's recipe: keep this encoder and codebook, frozen; train a bigger decoder.
  mix = load_config("vitvqgan_tiny")
  mix.data.update(config.data)
  mix.model.decoder.update(d_model=96, mlp_dim=192)
  mix.update(init_from=str(tmp_path / "run"), num_train_steps=4,
             init_from_groups=load_config("vitvqgan_small_large").init_from_groups)
  mix.optimizer.frozen = mix.init_from_groups
  mix.train.update(log_every=2, eval_every=0, checkpoint_every=4)
  trainer.train(mix, tmp_path / "mix")
  tuned = tokenizers.vitvqgan(tmp_path / "mix")
  for group in mix.optimizer.frozen:
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(tuned.params[group]),
                 jax.device_get(tokenizer.params[group]))
  assert tuned.params["decoder"]["stack"]["final_norm"]["norm"]["scale"].shape == (96,)
  unfrozen = load_config("vitvqgan_small_large")
  unfrozen.data.train = config.data.train
  with pytest.raises(trainer.config_lib.ConfigError, match="without init_from"):
    trainer.train(unfrozen, tmp_path / "nothing")


def test_evaluation_ignores_padding_rows():
  config = load_config("vitvqgan_tiny")
  setup = vqgan_task.Setup(config)
  params = setup.init_state().params
  x = np.array(images(8))
  x[4:] = 0.0  # padding rows, as the eval pipeline fills them
  mask = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.int32)
  batch = {"images": jnp.asarray(x), "mask": jnp.asarray(mask)}
  got = jax.device_get(vqgan_task.eval_step(setup, params, batch))
  model = setup.model(params)
  real = jnp.asarray(x[:4])
  used, _ = vqgan.codebook_usage(model.encode(real), config.model.codebook_size)
  assert float(got["weight"]) == 4
  assert float(got["codebook_usage"]) == pytest.approx(float(used))
  recon = model(real)["reconstruction"]
  assert float(got["psnr"]) == pytest.approx(float(jnp.mean(vqgan.psnr(recon, real))), rel=1e-5)


def photographs(resolution: int) -> np.ndarray:
  """Four of scikit-image's bundled photographs, square-cropped, in [-1, 1]."""
  skimage_data = pytest.importorskip("skimage.data")
  from PIL import Image

  from parti_jax.data import images as image_lib
  photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(),
            skimage_data.rocket()]
  return np.stack([image_lib.to_model_range(image_lib.square(Image.fromarray(p), resolution),
                                            -1.0, 1.0) for p in photos])


def test_a_tiny_tokenizer_overfits_a_handful_of_photographs():
  """The whole path (encoder, quantizer, decoder, losses, optimizer) can fit real images:
  four photographs at 32 px through 16 codes each reach above 30 dB."""
  config = load_config("vitvqgan_tiny")
  config.update(global_batch_size=4, num_train_steps=800)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  config.optimizer.learning_rate = 2e-3
  config.model.logit_laplace = False  # L2 alone, as Parti's decoder
  setup = vqgan_task.Setup(config, sharding.make_mesh(config, jax.devices()[:1]))
  state, step = setup.init_state(), vqgan_task.jit_train_step(setup)
  batch = {"images": jnp.asarray(photographs(32))}
  for _ in range(config.num_train_steps):
    state, metrics = step(state, batch)
  model = setup.model(state.params)
  psnr = float(jnp.mean(vqgan.psnr(model.decode(model.encode(batch["images"])),
                                   batch["images"])))
  print(f"tiny tokenizer on 4 photographs, {config.num_train_steps} steps: PSNR {psnr:.1f} dB, "
        f"codebook usage {float(metrics['codebook_usage']):.2f}")
  assert psnr > 30


def test_sharded_encode_and_decode_equal_unsharded():
  config = load_config("vitvqgan_tiny")
  config.mesh.update(data=2, fsdp=4, tensor=1)
  setup = vqgan_task.Setup(config)
  params = setup.init_state().params
  x = images(8, seed=3)
  sharded_x = jax.device_put(x, setup.batch_sharding)
  encode = jax.jit(lambda p, v: setup.model(p).encode(v), out_shardings=setup.batch_sharding)
  decode = jax.jit(lambda p, c: setup.model(p).decode(c), out_shardings=setup.batch_sharding)
  codes = encode(params, sharded_x)
  assert codes.sharding.spec[0] == ("data", "fsdp")
  host = setup.model(jax.device_put(jax.device_get(params), jax.devices()[0]))
  np.testing.assert_array_equal(np.asarray(codes), np.asarray(host.encode(x)))
  np.testing.assert_allclose(np.asarray(decode(params, codes)), np.asarray(host.decode(np.asarray(codes))),
                             atol=1e-5)
