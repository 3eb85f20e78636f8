"""A new task is one module and a registry line: the trainer, the planner and the run loader
take it with no change of theirs.

This file is such a module (a bag-of-words model: each image token predicted from the mean
embedding of the caption's words), registered for the test only.
"""

import sys

import data_helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import load_config
from flax import nnx

from parti_jax import inspect as inspect_lib
from parti_jax import runs, tasks
from parti_jax import train as trainer
from parti_jax.models.layers import dense_init, embed_init
from parti_jax.tasks import base
from parti_jax.text import PAD_ID

INPUTS = ("text_tokens", "image_tokens")


class BagOfWords(nnx.Module):
  def __init__(self, m, rngs: nnx.Rngs):
    self.grid, self.codebook = m.image_grid ** 2, m.codebook_size
    with nnx.use_eager_sharding(False):  # base.Setup lays parameters out by their names
      self.embed = nnx.Embed(m.text_vocab_size, m.d_model, rngs=rngs,
                             embedding_init=embed_init(("vocab", "embed")))
      self.out = nnx.Linear(m.d_model, self.grid * self.codebook, rngs=rngs,
                            kernel_init=dense_init(("embed", "mlp")))

  def __call__(self, text_tokens):
    words = (text_tokens != PAD_ID)[..., None]
    mean = (self.embed(text_tokens) * words).sum(1) / jnp.maximum(words.sum(1), 1)
    return self.out(mean).reshape(-1, self.grid, self.codebook)


class Setup(base.Setup):
  model_class = BagOfWords

  def abstract_batch(self, batch_size=None):
    m, b = self.config.model, batch_size or self.config.global_batch_size
    shape = lambda n: jax.ShapeDtypeStruct((b, n), jnp.int32, sharding=self.batch_sharding)
    return dict(text_tokens=shape(m.text_len), image_tokens=shape(m.image_grid ** 2))


def config_problems(config, sizes, training):
  return [] if config.model.d_model > 0 else [f"model.d_model={config.model.d_model}"]


def _loss(setup, params, batch):
  logits = setup.model(params)(batch["text_tokens"])
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["image_tokens"]).mean()


def train_step(setup, state, batch):
  grad_fn = lambda p, b, key: jax.value_and_grad(lambda q: _loss(setup, q, b))(p)
  loss, grads = base.mean_over_micro_batches(setup, grad_fn, state.params, batch, None,
                                             aux_zeros=jnp.zeros(()))
  params, opt_state, metrics = base.apply_gradients(setup, state, grads)
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          dict(loss=loss, **metrics))


def eval_step(setup, params, batch):
  return dict(loss=_loss(setup, params, batch), weight=batch["mask"].sum())


def train_step_flops(config):
  m = config.model
  return 3 * 2 * m.d_model * m.image_grid ** 2 * m.codebook_size * config.global_batch_size


def tokens_per_example(config):
  return config.model.image_grid ** 2


def build(config, mesh):
  setup = Setup(config, mesh)
  return base.Task(setup, INPUTS, base.jit_train_step(setup, train_step),
                   base.jit_eval_step(setup, eval_step), train_step_flops(config),
                   tokens_per_example(config))


@pytest.fixture
def registered(monkeypatch):
  monkeypatch.setitem(tasks.TASKS, "bag_of_words", sys.modules[__name__])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return data_helpers.token_data(tmp_path_factory.mktemp("task_data"), num_validation=16)


def config_of(data):
  c = load_config("parti_tiny")
  c.task = "bag_of_words"
  c.data.update(train=str(data / "tokens" / "train"), eval=str(data / "tokens" / "validation"))
  c.num_train_steps = 8
  c.train.update(log_every=2, checkpoint_every=4, eval_every=8)
  return c


def test_a_registered_task_trains_resumes_and_loads_with_the_shared_code(registered, data,
                                                                        tmp_path):
  config = config_of(data)
  interrupted = config_of(data)
  trainer.train(interrupted, tmp_path / "run", stop_after_step=4)
  summary = trainer.train(config, tmp_path / "run")  # resumes from step 4
  assert np.isfinite(summary["loss"]) and np.isfinite(summary["eval/loss"])
  assert summary["image_tokens_per_s"] > 0  # the task's tokens per example, as reported

  run, params = runs.load(tmp_path / "run", task="bag_of_words")
  assert run.step == 8 and isinstance(run.setup, Setup) and not run.setup.training
  text = np.zeros((2, config.model.text_len), np.int32)
  text[:, :2] = [5, 2]
  logits = run.setup.model(params)(jnp.asarray(text))
  assert logits.shape == (2, config.model.image_grid ** 2, config.model.codebook_size)

  planned = inspect_lib.plan(config, 8)
  assert planned["train_step_tflops"] == train_step_flops(config) / 1e12
  assert {r["name"] for r in planned["params"]} == {"embed/embedding", "out/kernel", "out/bias"}


def test_a_task_refuses_its_own_config_problems_and_an_unknown_task_is_named(registered, data):
  config = config_of(data)
  config.model.d_model = 0
  with pytest.raises(trainer.config_lib.ConfigError, match="model.d_model=0"):
    trainer.config_lib.check(config, 8)
  config.task = "no_such_task"
  with pytest.raises(tasks.UnknownTask, match="'no_such_task' is not one of .*bag_of_words"):
    trainer.config_lib.check(config, 8)
