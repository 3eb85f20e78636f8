"""The train step learns, gradient accumulation is exact, the eval step agrees with training."""

import jax
import numpy as np
from conftest import load_config
from helpers import random_batch, setup_on

from parti_jax.tasks import parti as parti_task


def test_tiny_config_drives_the_loss_on_a_fixed_batch_close_to_zero():
  c = load_config("parti_tiny")
  setup = setup_on(c, (2, 2, 2), 8)
  state, step = setup.init_state(), parti_task.jit_train_step(setup)
  batch = random_batch(c)
  losses = []
  for _ in range(150):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert losses[0] > 3.5  # about log(64) at the start
  assert losses[-1] < 0.1, losses[-10:]
  assert float(metrics["accuracy"]) == 1.0
  assert int(state.step) == 150
  np.testing.assert_allclose(float(metrics["learning_rate"]), c.optimizer.learning_rate)


def test_gradient_accumulation_equals_one_big_batch():
  c = load_config("parti_tiny")
  c.global_batch_size = 16
  batch = random_batch(c)
  results = []
  for accum in (1, 4):
    c.grad_accum_steps = accum
    setup = setup_on(c, (2, 1, 1), 2)
    params = setup.init_state().params
    results.append(jax.device_get(parti_task.jit_loss_and_grads(setup)(params, batch, None)))
  (loss1, _, g1), (loss4, _, g4) = results
  np.testing.assert_allclose(loss4, loss1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g4)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


def test_eval_step_matches_the_train_step_loss_without_dropout():
  c = load_config("parti_tiny")
  setup = setup_on(c, (1, 8, 1), 8)
  state = setup.init_state()
  batch = random_batch(c, seed=3)
  evaluated = parti_task.jit_eval_step(setup)(state.params, batch)
  _, metrics = parti_task.jit_train_step(setup)(state, batch)
  np.testing.assert_allclose(evaluated["loss"], metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(evaluated["accuracy"], metrics["accuracy"])
