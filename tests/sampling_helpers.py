"""Tiny trained runs for the sampler's tests (decoding, the command, the notebook, the server).

Parti: shapes at 32 px -> SentencePiece -> colour-code token shards (4x4 grid, codebook 64)
-> the tiny config for `STEPS` steps; built once per pytest session (per xdist worker) in the
session's base temporary directory. The reranker and the upsampler (Parti's helpers) are
built once for all workers of a session.
"""

import contextlib
import fcntl
import json
import pathlib

import jax
import numpy as np

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


# ------------------------------------------- Parti's helpers: the reranker and the upsampler


@contextlib.contextmanager
def once_across_workers(lock_path):
  """Serializes pytest-xdist workers on `lock_path`: the first builds, the others reuse."""
  with open(lock_path, "w") as f:  # the tests' own lock file
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shared_root(tmp_path_factory, worker_id) -> pathlib.Path:
  """The session's temporary directory that every xdist worker sees."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if worker_id != "master" else root


RERANKER_STEPS, RERANKER_BATCH = 120, 32


def reranker_run(tmp_path_factory, worker_id) -> tuple[pathlib.Path, dict, pathlib.Path]:
  """A tiny contrastive dual encoder trained by the real trainer on 32 px shapes, built once
  for all xdist workers: (workdir, the trainer's last metrics, data root)."""
  root = shared_root(tmp_path_factory, worker_id)
  data, workdir = root / "contrastive_data", root / "contrastive_run"
  with once_across_workers(root / "contrastive.lock"):
    if not (workdir / "summary.json").exists():
      dataset.write(data / "shapes", scenes.Spec(lattice=8), num=1000, num_validation=64,
                    num_heldout=0, progress=False)
      spm.train(spm.captions_of([data / "shapes" / "train"]), data / "spm", vocab_size=128,
                model_type="bpe")
      config = load_config("contrastive_tiny")
      config.data.update(train=str(data / "shapes" / "train"),
                         eval=str(data / "shapes" / "validation"),
                         spm_model=str(data / "spm.model"))
      config.global_batch_size = RERANKER_BATCH
      config.num_train_steps = RERANKER_STEPS
      config.schedule.warmup_steps = 20
      config.train.update(log_every=RERANKER_STEPS, eval_every=0,
                          checkpoint_every=RERANKER_STEPS, eval_batch_size=RERANKER_BATCH)
      # One device: this tiny model steps faster unsharded.
      summary = trainer.train(config, workdir, devices=jax.devices()[:1])
      (workdir / "summary.json").write_text(json.dumps(
          {k: float(v) for k, v in summary.items() if isinstance(v, (int, float, np.number))}))
  return workdir, json.loads((workdir / "summary.json").read_text()), data


SUPERRES_STEPS = 50  # enough for the tiny upsampler to beat bicubic by ~0.8 dB


def shapes64(root: pathlib.Path) -> pathlib.Path:
  """Shapes rendered at 64 px (2x the demo's 32 px), train and validation."""
  if not (root / "validation" / "metadata.json").exists():
    dataset.write(root, scenes.Spec(resolution=64, lattice=16), num=256, num_validation=16,
                  num_heldout=0, progress=False)
  return root


def superres_config(data: pathlib.Path, steps: int = SUPERRES_STEPS, **train_fields):
  c = load_config("superres_tiny")
  c.data.update(train=str(data / "train"), eval=str(data / "validation"))
  c.num_train_steps = steps
  c.train.update(log_every=10, eval_every=steps, checkpoint_every=steps, eval_batch_size=16)
  c.train.update(train_fields)
  return c


def superres_run(tmp_path_factory, worker_id) -> tuple[pathlib.Path, pathlib.Path, dict]:
  """A tiny x2 upsampler trained by the real trainer on 64 px shapes, built once for all
  xdist workers: (workdir, data root, the trainer's last metrics)."""
  root = shared_root(tmp_path_factory, worker_id)
  run, data = root / "superres_run", root / "superres_shapes64"
  with once_across_workers(root / "superres.lock"):
    shapes64(data)
    if not (run / "summary.json").exists():
      summary = trainer.train(superres_config(data), run)
      (run / "summary.json").write_text(json.dumps({k: float(v) for k, v in summary.items()
                                                    if isinstance(v, (int, float))}))
  return run, data, json.loads((run / "summary.json").read_text())
