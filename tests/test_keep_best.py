"""train.keep_best: the best evaluation's checkpoint kept beside the last ones, exact resume
with it, `--step best` and `init_from=RUN@best`, the overfitting note, the config checks."""

import contextlib
import io
import json

import data_helpers
import jax
import numpy as np
import pytest
from conftest import load_config

from parti_jax import checkpoints, keep_best, metrics, runs, sample
from parti_jax import config as common
from parti_jax import train as trainer
from parti_jax.tasks import parti as parti_task

STEPS = 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return data_helpers.token_data(tmp_path_factory.mktemp("keep_best_data"))


def overfitting(data, **train_fields):
  """A learning rate high enough that the evaluation loss turns up within 24 steps."""
  c = load_config("parti_tiny")
  c.data.update(train=str(data / "tokens" / "train"), eval=str(data / "tokens" / "validation"),
                spm_model=str(data / "spm.model"))
  c.num_train_steps = STEPS
  c.optimizer.learning_rate = 0.1
  # A note at the first worse evaluation: the loss rises after its best in any such run,
  # where 3 rises in a row depend on the CPU's arithmetic (seen on an AMD EPYC, not an Intel
  # Xeon).
  c.train.update(log_every=4, eval_every=2, checkpoint_every=2, keep_checkpoints=STEPS,
                 keep_best=True, worse_evals_note=1)
  c.train.update(train_fields)
  return c


def train(config, workdir, **kwargs) -> str:
  """Trains on one device (quicker for this model); returns what it told the user."""
  log = io.StringIO()
  with contextlib.redirect_stderr(log):
    trainer.train(config, workdir, devices=jax.devices()[:1], **kwargs)
  return log.getvalue()


@pytest.fixture(scope="module")
def run(data, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("keep_best") / "run"
  return workdir, train(overfitting(data), workdir)


def eval_losses(workdir) -> dict[int, float]:
  return {r["step"]: r["eval/loss"] for r in metrics.read(workdir) if "eval/loss" in r}


def best_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / keep_best.DIRECTORY).iterdir())


def params_at(directory, config):
  setup = parti_task.Setup(config, training=False)
  return jax.device_get(checkpoints.load_params(directory, setup.sharded_abstract_params()))


def test_the_best_evaluation_is_kept_and_a_rising_loss_noted(data, run):
  workdir, log = run
  losses = eval_losses(workdir)
  assert sorted(losses) == list(range(2, STEPS + 1, 2))
  best = min(losses, key=losses.get)
  assert best != STEPS, f"the loss never rose, so this run tests nothing: {losses}"
  assert best_steps(workdir) == [best]
  assert runs.checkpoint_dir(workdir, "best") == (
      checkpoints.absolute(workdir) / "checkpoints_best" / str(best), best)
  # The parameters of that step: the main checkpoint of the same step holds the same.
  config = overfitting(data)
  kept, main = (params_at(workdir / d / str(best), config)
                for d in ("checkpoints_best", "checkpoints"))
  jax.tree.map(np.testing.assert_array_equal, kept, main)
  assert runs.checkpoint_dir(workdir)[1] == STEPS  # the latest is still the latest
  # The note at the first evaluation worse than the one before (there is one: the loss
  # rose after its best), and none before it.
  steps = sorted(losses)
  first = next(s for before, s in zip(steps, steps[1:]) if losses[s] > losses[before])
  notes = [line for line in log.splitlines() if line.startswith("note: eval/loss")]
  assert notes and notes[0].startswith("note: eval/loss has risen at 1 evaluation in a row")
  assert f"(step {first}); the model may be overfitting" in notes[0]
  assert "the best so far is kept in" in notes[0]


def test_a_resumed_run_keeps_the_same_best(data, run, tmp_path):
  workdir, _ = run
  # Stopped after the evaluation at 18 but before a checkpoint of it: the restart from 16
  # evaluates 18 again and must neither fail on the step it kept nor change it.
  config = overfitting(data, checkpoint_every=8)
  train(config, tmp_path, stop_after_step=19)
  assert runs.checkpoint_dir(tmp_path)[1] == 16
  train(overfitting(data, checkpoint_every=8), tmp_path)
  assert best_steps(tmp_path) == best_steps(workdir)
  assert eval_losses(tmp_path) == eval_losses(workdir)
  (best,) = best_steps(workdir)
  jax.tree.map(np.testing.assert_array_equal,
               params_at(tmp_path / "checkpoints_best" / str(best), config),
               params_at(workdir / "checkpoints_best" / str(best), config))
  jax.tree.map(np.testing.assert_array_equal,
               params_at(tmp_path / "checkpoints" / str(STEPS), config),
               params_at(workdir / "checkpoints" / str(STEPS), config))


def test_sample_step_best_and_init_from_run_at_best(data, run, tmp_path, capsys):
  workdir, _ = run
  (best,) = best_steps(workdir)
  sample.main(["--workdir", str(workdir), "--step", "best", "--prompt", "a red circle",
               "--num_samples", "2", "--out", str(tmp_path / "best")])
  assert json.loads((tmp_path / "best" / "samples.json").read_text())["step"] == best
  assert "wrote 2 images" in capsys.readouterr().out

  config = overfitting(data)
  setup = parti_task.Setup(config)
  loaded = runs.load_init_params(f"{workdir}@best", setup.sharded_abstract_params())
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(loaded),
               params_at(workdir / "checkpoints" / str(best), config))
  assert runs.resolve_checkpoint(f"{workdir}@8") == checkpoints.absolute(workdir) / "checkpoints/8"
  with pytest.raises(runs.RunError, match="no checkpoint at step 7"):
    runs.resolve_checkpoint(f"{workdir}@7")
  with pytest.raises(runs.RunError, match="init_from=.*@soon: the step='soon' is not a step"):
    runs.resolve_checkpoint(f"{workdir}@soon")
  with pytest.raises(runs.RunError, match="is not a run directory"):
    runs.resolve_checkpoint(f"{tmp_path}@best")


def test_keep_best_without_evaluations_is_refused_naming_the_field(data):
  def refusal(config):
    with pytest.raises(common.ConfigError) as e:
      common.check(config)
    return str(e.value)

  assert "train.eval_every=0" in refusal(overfitting(data, eval_every=0))
  no_eval = overfitting(data)
  no_eval.data.eval = ""
  assert "train.keep_best=True needs evaluations, but data.eval is empty" in refusal(no_eval)
  message = refusal(overfitting(data, best_metric="eval/psnr"))
  assert "train.best_metric='eval/psnr' is not one of the task's evaluation metrics" in message
  assert "train.best_mode='lowest'" in refusal(overfitting(data, best_mode="lowest"))
  common.check(overfitting(data))  # accepted as it is
  common.check(overfitting(data, keep_best=False, eval_every=0))  # nothing to rank: fine
  tokenizer = load_config("vitvqgan_tiny")
  tokenizer.data.eval = "somewhere"
  tokenizer.train.update(keep_best=True, best_metric="eval/l2")
  common.check(tokenizer)
  tokenizer.train.best_metric = "eval/loss"  # the default is Parti's: named when wrong
  assert "['eval/psnr', 'eval/l2', 'eval/codebook_usage']" in refusal(tokenizer)


def test_the_trend_notes_worsening_evaluations_in_a_row():
  trend = keep_best.Trend("eval/loss", "min", 3)
  notes = [trend.add(s, v) for s, v in [(1, 3.0), (2, 2.0), (3, 2.1), (4, 2.2), (5, 2.3),
                                        (6, 2.4), (7, 1.0), (8, 1.1)]]
  assert notes[:4] == [None] * 4 and notes[6:] == [None, None]
  assert notes[4] == ("note: eval/loss has risen at 3 evaluations in a row: 2 (step 2) -> "
                      "2.1 (step 3) -> 2.2 (step 4) -> 2.3 (step 5); the model may be "
                      "overfitting its data")
  assert notes[5].startswith("note: eval/loss has risen at 4 evaluations in a row")
  # Higher is better: falling is worse. A restart carries the history on.
  trend = keep_best.Trend("eval/accuracy", "max", 2, history=[(1, 0.5), (2, 0.4)])
  assert trend.add(3, 0.3).startswith("note: eval/accuracy has fallen at 2 evaluations")
  assert keep_best.Trend("eval/loss", "min", 0).add(1, 1.0) is None  # 0: never
