"""The tokenizer's adversarial and perceptual terms, dead-code restarts, and overfitting photos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from parti_jax import config as config_lib
from parti_jax.tasks import vitvqgan as vqgan_task


def gan_config(**loss):
  c = load_config("vitvqgan_tiny")
  c.model.discriminator.update(channels=16, max_channels=32)
  c.loss.update(adversarial=0.1, adversarial_start=2, r1=1.0, perceptual=0.1,
                perceptual_weights="random:0")
  c.loss.update(loss)
  c.global_batch_size = 8
  return c


def batch(seed=0, n=8):
  x = jax.random.uniform(jax.random.key(seed), (n, 32, 32, 3), minval=-1, maxval=1)
  return {"images": x}


def changed(a, b) -> bool:
  return any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_generator_and_discriminator_each_update_from_their_own_loss():
  config = gan_config()
  setup = vqgan_task.Setup(config)
  step = vqgan_task.jit_train_step(setup)
  state = setup.init_state()
  assert "discriminator" in state.params
  snapshots, rows = [jax.device_get(state.params)], []
  for i in range(4):
    state, metrics = step(state, batch(i))
    snapshots.append(jax.device_get(state.params))
    rows.append(jax.device_get(metrics))
  generator = lambda p: {k: v for k, v in p.items() if k != "discriminator"}
  # Before loss.adversarial_start the discriminator is not trained at all...
  assert [float(r["adversarial_on"]) for r in rows] == [0, 0, 1, 1]
  assert not changed(snapshots[0]["discriminator"], snapshots[2]["discriminator"])
  assert float(rows[0]["discriminator"]) == 0 and float(rows[0]["generator_adversarial"]) == 0
  # ...from it on, both sides move, and every term is reported.
  assert changed(snapshots[2]["discriminator"], snapshots[3]["discriminator"])
  assert changed(generator(snapshots[2]), generator(snapshots[3]))
  for key in ("discriminator", "r1", "generator_adversarial", "perceptual", "real_logit",
              "fake_logit", "l2"):
    assert np.isfinite(rows[3][key]) and rows[3][key] != 0, key


def test_discriminator_update_lowers_its_loss_on_the_same_images():
  """Its gradients are its own loss's: one step of its Adam makes real and fake easier to tell."""
  from parti_jax.models import discriminator as disc
  config = gan_config(adversarial_start=0, r1=0.0, perceptual=0.0)
  config.discriminator_optimizer.learning_rate = 1e-3
  config.schedule.warmup_steps = 0
  setup = vqgan_task.Setup(config)
  state = setup.init_state()
  real = batch(0)["images"]

  @jax.jit  # one compile for both measurements (eager, each took seconds)
  def d_loss(params):
    model = setup.model(params)
    fake = model(real)["reconstruction"]
    return disc.discriminator_loss(model.discriminator(real), model.discriminator(fake))

  before = float(d_loss(state.params))
  state, _ = vqgan_task.jit_train_step(setup)(state, {"images": real})
  # Measured with the discriminator's new parameters against the old generator's output.
  old_generator = jax.device_get(state.params)
  assert float(d_loss(old_generator)) < before


def test_adversarial_and_perceptual_settings_are_checked():
  c = gan_config()
  c.model.discriminator.channels = 0
  with pytest.raises(config_lib.ConfigError, match="model.discriminator.channels"):
    config_lib.check(c, 8)
  c = gan_config(perceptual_weights="/no/such/vgg.npz")
  with pytest.raises(config_lib.ConfigError, match="loss.perceptual_weights"):
    config_lib.check(c, 8)


def test_perceptual_loss_without_weights_is_off_with_a_warning(caplog):
  c = gan_config(perceptual_weights="")
  with caplog.at_level("WARNING"):
    assert vqgan_task.load_perceptual_weights(c) == {}
  assert "perceptual loss is OFF" in caplog.text and "parti_jax.convert.vgg16" in caplog.text


def test_dead_codes_restart_from_the_batch():
  config = load_config("vitvqgan_tiny")
  config.model.dead_code_restart_every = 1
  setup = vqgan_task.Setup(config)
  state = setup.init_state()
  # A batch of one flat colour uses a single code; every other entry is dead and restarts.
  flat = {"images": jnp.full((16, 32, 32, 3), 0.3)}
  state, metrics = vqgan_task.jit_train_step(setup)(state, flat)
  assert int(metrics["codes_restarted"]) >= config.model.codebook_size - 16
  model = setup.model(state.params)
  z = np.asarray(model.latents(flat["images"])).reshape(-1, config.model.code_dim)
  book = np.asarray(state.params["codebook"])
  # Restarted entries are latents of that batch (the encoder has moved one step since).
  nearest = np.max(book @ z.T / np.linalg.norm(book, axis=1, keepdims=True), axis=1)
  assert np.mean(nearest > 0.9) > 0.7


def test_dead_codes_restart_at_the_worst_fitted_latents():
  import ml_collections
  config = ml_collections.ConfigDict(dict(model=dict(
      codebook_size=4, code_dim=2, dead_code_restart_every=1, dead_code_restart_until=-1)))
  codebook = jnp.array([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [1.0, 0.05]])
  # Six latents sit on entry 0; two lie far from every entry, the one opposite farthest.
  latents = jnp.array([[1.0, 0.0]] * 6 + [[0.0, 1.0], [-1.0, 0.0]])
  out = {"latents": latents[None], "codes": jnp.zeros((1, 8), jnp.int32)}
  state = type("State", (), dict(step=jnp.int32(0), rng=jax.random.key(0)))
  params, restarted = vqgan_task.restart_dead_codes(config, state, {"codebook": codebook}, out)
  assert int(restarted) == 3
  book = np.asarray(params["codebook"])
  np.testing.assert_array_equal(book[0], [1.0, 0.0])  # in use: kept
  np.testing.assert_array_equal(book[1:], [[-1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])


def test_decoder_sees_latents_until_quantize_start():
  config = load_config("vitvqgan_tiny")
  config.model.update(quantize_start=2, dead_code_restart_every=0)
  setup = vqgan_task.Setup(config)
  state = setup.init_state()
  model = setup.model(state.params)
  x = batch(0, 2)["images"]
  nudged = x + 1e-3  # too little to change a code, enough to move a latent
  np.testing.assert_array_equal(model.encode(x), model.encode(nudged))
  quantized = [model(i, None, True)["reconstruction"] for i in (x, nudged)]
  continuous = [model(i, None, False)["reconstruction"] for i in (x, nudged)]
  # Same codes, same picture (to float rounding: the straight-through sum z + (zq - z)).
  np.testing.assert_allclose(*quantized, atol=1e-5)
  assert np.max(np.abs(continuous[0] - continuous[1])) > 1e-4
  step = vqgan_task.jit_train_step(setup)
  flags = []
  for i in range(3):
    state, metrics = step(state, batch(i, config.global_batch_size))
    flags.append(float(metrics["quantized"]))
  assert flags == [0.0, 0.0, 1.0]
