"""train.prng_impl: the state's key in threefry, rbg or unsafe_rbg; checkpoints keep the key
and its implementation, and a run with rbg dropout resumes exactly."""

import data_helpers
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import load_config

from parti_jax import config as config_lib
from parti_jax import train as trainer
from parti_jax.tasks import parti as parti_task

from test_trainer import assert_same_params, final_params, logged


def key_dtype(impl: str):
  """key<fry>, key<rbg> or key<unsafe_rbg> (jax names threefry's "threefry2x32")."""
  return jax.random.key(0, impl="threefry2x32" if impl == "threefry" else impl).dtype


@pytest.mark.parametrize("impl", ["threefry", "rbg", "unsafe_rbg"])
def test_the_state_key_has_the_configured_implementation(impl):
  c = load_config("parti_tiny")
  c.train.prng_impl = impl
  setup = parti_task.Setup(c)
  assert setup.abstract_state().rng.dtype == key_dtype(impl)
  if impl == "threefry":  # today's key, unchanged: the split of the seed's key
    state = setup.init_state()
    want = jax.random.split(jax.random.key(c.seed))[1]
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(want))


@pytest.mark.parametrize("impl", ["rbg", "unsafe_rbg"])
def test_keys_of_each_implementation_save_and_restore_through_orbax(impl, tmp_path):
  c = load_config("parti_tiny")
  c.train.prng_impl = impl
  setup = parti_task.Setup(c)
  key = setup.init_state().rng
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "key", {"rng": key})
  checkpointer.wait_until_finished()
  back = checkpointer.restore(tmp_path / "key", {"rng": setup.abstract_state().rng})["rng"]
  assert back.dtype == key.dtype == key_dtype(impl)
  np.testing.assert_array_equal(jax.random.key_data(back), jax.random.key_data(key))
  # The restored key draws what the saved one draws.
  draw = lambda k: jax.random.bernoulli(jax.random.fold_in(k, 3), 0.9, (64,))
  np.testing.assert_array_equal(draw(back), draw(key))


def test_an_unknown_implementation_is_refused():
  c = load_config("parti_tiny")
  c.train.prng_impl = "philox"
  with pytest.raises(config_lib.ConfigError, match="train.prng_impl='philox'"):
    config_lib.check(c, 8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return data_helpers.token_data(tmp_path_factory.mktemp("prng_data"), num_validation=8)


def rbg_tiny(data):
  c = load_config("parti_tiny")
  c.data.update(train=str(data / "tokens" / "train"), eval="")
  c.model.dropout_rate = 0.1  # so that the key's random bits reach the loss
  c.train.update(prng_impl="rbg", log_every=1, checkpoint_every=3, eval_every=0)
  c.num_train_steps = 6
  return c


def test_a_run_with_rbg_dropout_resumes_bitwise(data, tmp_path):
  trainer.train(rbg_tiny(data), tmp_path / "whole")
  trainer.train(rbg_tiny(data), tmp_path / "resumed", stop_after_step=5)
  trainer.train(rbg_tiny(data), tmp_path / "resumed")  # from the checkpoint of step 3
  whole, resumed = logged(tmp_path / "whole"), logged(tmp_path / "resumed")
  assert sorted(whole) == list(range(1, 7))
  assert {s: resumed[s] for s in range(4, 7)} == {s: whole[s] for s in range(4, 7)}
  assert_same_params(final_params(tmp_path / "resumed", rbg_tiny(data))[1],
                     final_params(tmp_path / "whole", rbg_tiny(data))[1])
