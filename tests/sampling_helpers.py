"""A tiny trained Parti run for the sampler's tests (decoding, the command, the notebook).

Shapes at 32 px -> SentencePiece -> colour-code token shards (4x4 grid, codebook 64) ->
the tiny config for `STEPS` steps. Several test modules need it; it is built once per
pytest session (per xdist worker) in the session's base temporary directory.
"""

import pathlib

import jax

from conftest import load_config
from parti_jax import train as trainer
from parti_jax import tokenizers
from parti_jax.data import encode, spm
from parti_jax.shapes import dataset, scenes

STEPS = 150


def tiny_run(tmp_path_factory) -> pathlib.Path:
  """The work directory of a tiny Parti trained on shapes (built on first use)."""
  root = tmp_path_factory.getbasetemp() / "sampling_tiny_run"
  workdir = root / "run"
  if (workdir / "checkpoints" / str(STEPS)).exists():
    return workdir
  dataset.write(root / "shapes", scenes.Spec(), num=1000, num_validation=8, num_heldout=0,
                progress=False)
  spm.train(spm.captions_of([root / "shapes" / "train"]), root / "spm", vocab_size=128)
  encode.encode(root / "shapes" / "train", root / "tokens", tokenizers.color(32),
                spm.Tokenizer(root / "spm.model", 16), batch_size=64)
  config = load_config("parti_tiny")
  config.data.train = str(root / "tokens")
  config.num_train_steps = STEPS
  config.train.update(log_every=50, checkpoint_every=STEPS, eval_every=0)
  # One device: a step of this tiny model is quicker unsharded. The sampler restores the
  # checkpoint onto whatever mesh it uses.
  trainer.train(config, workdir, devices=jax.devices()[:1])
  return workdir
