"""The whole Parti system on a laptop CPU, end to end, in one command.

  python -m parti_jax.demo --workdir runs/demo

Eight stages, each an ordinary command of the package that the demo only chains (it prints
each command before running it, so the same steps can be run by hand on a user's own data):

  1. shapes     render the shapes dataset: train (held-out compositions left out; the
                two-object kinds drawn more often), validation, and heldout (only
                held-out compositions), objects on an 8 px lattice (the tokenizer's
                patch size)
  2. spm        train the SentencePiece model on the train captions
  3. tokenizer  train a tiny ViT-VQGAN on the train images (the real trainer)
  4. encode     turn train and validation images into token shards
  5. parti      train a tiny Parti model on the tokens (the real trainer; caption dropout on
                for classifier-free guidance)
  6. reranker   train a tiny contrastive dual encoder on the train images and captions (the
                real trainer, task `contrastive`)
  7. sample     draw `--candidates` images for each validation and held-out prompt, with
                guidance, scored and ranked by the reranker (Parti draws many and keeps the
                best)
  8. evaluate   judge each prompt's first sample and its reranked best with the shapes
                evaluator, and the tokenizer's round trip of the validation renders (roughly
                the most Parti can score with its codes); write report.md and report.json

Each finished stage leaves WORKDIR/stages/NAME.json (its time and results); a rerun skips
finished stages, and an interrupted training stage resumes from its last checkpoint. The
sizes below suit a 2-core CPU; `--train_images`, `--tokenizer_steps`, `--parti_steps` and
`--eval_prompts` scale the run (the test suite runs a much smaller one).
"""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image

from parti_jax import cli, decoding, metrics
from parti_jax.data import records

PREEMPTED_EXIT_CODE = 75  # the trainer's exit code after SIGTERM or Ctrl-C (it saved first)
STAGES = ("shapes", "spm", "tokenizer", "encode", "parti", "reranker", "sample", "evaluate")


def python(*args) -> list[str]:
  return [sys.executable, "-m", *map(str, args)]


def run_stage_command(command: list[str], env: dict) -> tuple[int, bool]:
  """Runs one stage's command to its end: (exit code, whether the demo was told to stop).
  Ctrl-C or SIGTERM to the demo reaches the command as one SIGTERM, and the demo waits while
  a trainer saves its checkpoint; a second one reaches it as Ctrl-C (a trainer then stops at
  once). subprocess.run would kill the command 0.25 s after Ctrl-C, in the middle of its
  save. The command has a session of its own, so a terminal's Ctrl-C goes to the demo alone
  and the order of the two signals is the demo's; a closed terminal (SIGHUP) stops it the
  same way, as it no longer reaches the command itself."""
  process = subprocess.Popen(command, env=env, start_new_session=True)
  signals = []

  def forward(signum, frame):
    process.send_signal(signal.SIGINT if signals else signal.SIGTERM)
    signals.append(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM,
                                                      signal.SIGHUP)}
  try:
    return process.wait(), bool(signals)
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


class Demo:

  def __init__(self, a):
    del a.args  # the demo takes flags only
    for flag in ("workdir", "configs"):
      if records.is_bucket(getattr(a, flag)):
        raise SystemExit(f"error: --{flag} {getattr(a, flag)}: the demo works in a local "
                         "folder (its stages write there and read each other's output); "
                         "the commands it prints take buckets")
    a.configs = pathlib.Path(a.configs)
    self.a = a
    self.dir = pathlib.Path(a.workdir).absolute()
    self.data = self.dir / "data"
    self.tokens = self.dir / "tokens"
    self.samples = self.dir / "samples"

  # --- the commands -----------------------------------------------------------------------

  def shapes(self):
    a = self.a
    return [python("parti_jax.data.shapes", "--out", self.data, "--num", a.train_images,
                   "--num_validation", a.eval_prompts, "--num_heldout", a.eval_prompts,
                   "--resolution", 32, "--lattice", a.lattice, "--seed", a.seed,
                   "--train_kinds", a.train_kinds)]

  def spm(self):
    return [python("parti_jax.data.spm", "--data", self.data / "train",
                   "--out", self.dir / "spm", "--vocab_size", 128, "--model_type", "bpe")]

  def tokenizer(self):
    a = self.a
    return [python("parti_jax.train", "--config", a.configs / "demo_tokenizer.py",
                   "--workdir", self.dir / "tokenizer",
                   f"--config.data.train={self.data / 'train'}",
                   f"--config.data.eval={self.data / 'validation'}",
                   f"--config.num_train_steps={a.tokenizer_steps}")]

  def encode(self):
    tokenizer = f"vitvqgan:{self.dir / 'tokenizer'}"
    return [python("parti_jax.data.encode", "--data", self.data / split,
                   "--out", self.tokens / split, "--tokenizer", tokenizer,
                   "--spm", self.dir / "spm.model", "--text_len", 16, "--batch_size", 64)
            for split in ("train", "validation")]

  def parti(self):
    a = self.a
    return [python("parti_jax.train", "--config", a.configs / "demo_parti.py",
                   "--workdir", self.dir / "parti",
                   f"--config.data.train={self.tokens / 'train'}",
                   f"--config.data.eval={self.tokens / 'validation'}",
                   f"--config.data.spm_model={self.dir / 'spm.model'}",
                   f"--config.num_train_steps={a.parti_steps}")]

  def reranker(self):
    a = self.a
    return [python("parti_jax.train", "--config", a.configs / "contrastive_tiny.py",
                   "--workdir", self.dir / "reranker",
                   f"--config.data.train={self.data / 'train'}",
                   f"--config.data.eval={self.data / 'validation'}",
                   f"--config.data.spm_model={self.dir / 'spm.model'}",
                   f"--config.num_train_steps={a.reranker_steps}",
                   # one evaluation, at the end: the report's recall
                   f"--config.train.eval_every={a.reranker_steps}")]

  def sample(self):
    # Sample 0 of a prompt is the image one sample per prompt would give (its key is
    # fold_in(prompt_id, 0) however many are drawn), so "first" is the demo without reranking.
    a = self.a
    return [python("parti_jax.sample", "--workdir", self.dir / "parti",
                   "--prompts", self.dir / f"prompts_{split}.txt", "--num_samples",
                   a.candidates, "--rerank", self.dir / "reranker", "--keep", 0,
                   "--out", self.samples / split, "--guidance", a.guidance,
                   "--temperature", a.temperature, "--seed", a.seed, "--batch_size", 64)
            for split in ("validation", "heldout")]

  def evaluate(self):
    # The validation renders through the image tokenizer too: the bound its codes set.
    ceiling = python("parti_jax.eval.shapes", "--shards", self.data / "validation",
                     "--reconstruct", f"vitvqgan:{self.dir / 'tokenizer'}",
                     "--out", self.dir / "eval_reconstructions.json")
    return [python("parti_jax.eval.shapes", "--images", self.samples / split,
                   "--heldout_from", self.data / "heldout", "--pick", pick,
                   "--out", self.dir / f"eval_{split}{suffix}.json")
            for split in ("validation", "heldout")
            for pick, suffix in (("first", ""), ("best", "_reranked"))] + [ceiling]

  # --- running ----------------------------------------------------------------------------

  def before(self, stage: str):
    """Files a stage's commands read that no command writes."""
    if stage == "sample":  # the prompts: one caption per line, from each split
      for split in ("validation", "heldout"):
        captions = [r["captions"][0] for r in records.ShardSet.open(self.data / split).read_all()]
        (self.dir / f"prompts_{split}.txt").write_text("\n".join(captions) + "\n")

  def run(self) -> dict:
    self.dir.mkdir(parents=True, exist_ok=True)
    (self.dir / "stages").mkdir(exist_ok=True)
    times = {}
    start = time.perf_counter()
    for number, stage in enumerate(STAGES, 1):
      marker = self.dir / "stages" / f"{stage}.json"
      if marker.exists():
        times[stage] = json.loads(marker.read_text())["seconds"]
        print(f"[{number}/{len(STAGES)}] {stage}: done before ({times[stage]:.0f} s), skipped",
              flush=True)
        continue
      stage_start = time.perf_counter()
      self.before(stage)
      commands = getattr(self, stage)()
      for command in commands:
        shown = " ".join(shlex.quote(c) for c in ["python", *command[1:]])
        print(f"\n[{number}/{len(STAGES)}] {stage}: {shown}", flush=True)
        returncode, stopped = run_stage_command(command, self.env())
        if returncode == PREEMPTED_EXIT_CODE:
          sys.exit(f"demo: stage {stage} was stopped and saved a checkpoint; rerun the same "
                   "command to resume it")
        if stopped:
          sys.exit(f"demo: stopped during stage {stage} (exit {returncode}); rerun the same "
                   "command: finished stages are skipped, training resumes")
        if returncode:
          sys.exit(f"demo: stage {stage} failed (exit {returncode}); fix the cause and "
                   "rerun the same command: finished stages are skipped, training resumes")
      times[stage] = time.perf_counter() - stage_start
      # Whole or not at all: a cut-off marker would stop every rerun at its JSON.
      records.atomic_write_text(marker, json.dumps(dict(seconds=times[stage], commands=[
          " ".join(shlex.quote(c) for c in ["python", *c[1:]]) for c in commands])))
    report = self.report(times)
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s (this run); "
          f"report: {self.dir / 'report.md'}")
    print(self.summary_table(report))
    return report

  def env(self) -> dict:
    env = dict(os.environ)
    # Stages compile the same small programs on a rerun: cache them.
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(self.dir / "compilation_cache"))
    return env

  # --- the report -------------------------------------------------------------------------

  def report(self, times: dict) -> dict:
    evals = {split: json.loads((self.dir / f"eval_{split}.json").read_text())
             for split in ("validation", "heldout")}
    reranked = {split: _accuracy(self.dir / f"eval_{split}_reranked.json")
                for split in ("validation", "heldout")}
    tokenizer = _last_eval(self.dir / "tokenizer")
    parti = _last_eval(self.dir / "parti")
    report = dict(
        accuracy=dict(validation=evals["validation"]["accuracy"],
                      heldout=evals["heldout"]["accuracy"]),
        # each prompt's best of `candidates` samples by the reranker's score
        accuracy_reranked=reranked,
        reranker=_last_eval(self.dir / "reranker"),
        prompts=dict(validation=evals["validation"]["counts"].get("all", 0),
                     heldout=evals["heldout"]["counts"].get("all", 0)),
        tokenizer=dict(eval_psnr=tokenizer.get("eval/psnr"),
                       eval_codebook_usage=tokenizer.get("eval/codebook_usage"),
                       reconstruction_accuracy=_accuracy(self.dir / "eval_reconstructions.json")),
        parti=dict(eval_loss=parti.get("eval/loss"), eval_accuracy=parti.get("eval/accuracy")),
        stage_seconds=times, total_seconds=sum(times.values()),
        settings=dict(vars(self.a), workdir=str(self.dir), configs=str(self.a.configs)),
        grids={split: self.overview(split) for split in ("validation", "heldout")})
    records.atomic_write_text(self.dir / "report.json", json.dumps(report, indent=1))
    records.atomic_write_text(self.dir / "report.md", self.markdown(report))
    return report

  def overview(self, split: str, count: int = 32) -> str:
    """One PNG of the first `count` samples of a split, 8 to a row; its path in the workdir."""
    meta = json.loads((self.samples / split / "samples.json").read_text())
    files = [self.samples / split / e["files"][0] for e in meta["prompts"]][:count]
    pictures = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    pictures += [np.zeros_like(pictures[0])] * (-len(pictures) % 8)
    rows = [np.concatenate(pictures[i:i + 8], 1) for i in range(0, len(pictures), 8)]
    name = f"samples_{split}.png"
    Image.fromarray(np.concatenate(rows, 0)).save(self.dir / name)
    return name

  def summary_table(self, r: dict) -> str:
    seen = r["accuracy"]["validation"].get("seen", 0.0)
    held = r["accuracy"]["heldout"].get("heldout", 0.0)
    best = r["accuracy_reranked"]
    lines = [f"  validation prompts (seen compositions): {seen:.1%} (reranked best of "
             f"{r['settings']['candidates']}: {best['validation'].get('seen', 0.0):.1%})",
             f"  held-out compositions:                 {held:.1%} (reranked: "
             f"{best['heldout'].get('heldout', 0.0):.1%})",
             f"  tokenizer PSNR: {r['tokenizer']['eval_psnr'] or float('nan'):.1f} dB; its "
             "reconstructions of validation renders judged right: "
             f"{r['tokenizer']['reconstruction_accuracy'].get('all', float('nan')):.1%}"]
    lines += [f"  {stage:<10} {seconds:7.1f} s" for stage, seconds in r["stage_seconds"].items()]
    return "\n".join(lines)

  def markdown(self, r: dict) -> str:
    kinds = ("single", "count", "binding", "relation")
    v, h = r["accuracy"]["validation"], r["accuracy"]["heldout"]
    out = ["# parti_jax demo report", "",
           "Accuracy of generated images, judged by `python -m parti_jax.eval.shapes`.", "",
           "| prompts | all | " + " | ".join(kinds) + " |",
           "|---|---|" + "---|" * len(kinds)]
    rv, rh = r["accuracy_reranked"]["validation"], r["accuracy_reranked"]["heldout"]
    n = r["settings"]["candidates"]
    for name, acc, key in (("validation (seen), first sample", v, "seen"),
                           (f"validation (seen), reranked best of {n}", rv, "seen"),
                           ("held-out, first sample", h, "heldout"),
                           (f"held-out, reranked best of {n}", rh, "heldout")):
      cells = [f"{acc.get(f'{key}/{k}', float('nan')):.1%}" for k in kinds]
      out.append(f"| {name} | {acc.get(key, float('nan')):.1%} | " + " | ".join(cells) + " |")
    rr = r["reranker"]
    out += ["", "Reranker (contrastive dual encoder) on validation: text-to-image recall@1 "
            f"{rr.get('eval/recall@1_text_to_image', float('nan')):.1%}, image-to-text "
            f"recall@1 {rr.get('eval/recall@1_image_to_text', float('nan')):.1%}."]
    t = r["tokenizer"]
    out += ["", f"Prompts: {r['prompts']['validation']} validation, {r['prompts']['heldout']} "
            "held-out.",
            f"Tokenizer reconstruction PSNR (validation): {t['eval_psnr'] or float('nan'):.2f} dB, "
            f"codebook usage {t['eval_codebook_usage'] or float('nan'):.1%}. The evaluator "
            "judges its reconstructions of the validation renders right for "
            f"{t['reconstruction_accuracy'].get('all', float('nan')):.1%} of prompts ("
            + ", ".join(f"{k} {t['reconstruction_accuracy'].get(f'all/{k}', float('nan')):.1%}"
                        for k in kinds)
            + "), roughly the most a Parti model that generates its codes can score.",
            f"Parti validation token accuracy: "
            f"{r['parti']['eval_accuracy'] or float('nan'):.3f}.", "",
            "| stage | seconds |", "|---|---|"]
    out += [f"| {s} | {sec:.1f} |" for s, sec in r["stage_seconds"].items()]
    out += [f"| total | {r['total_seconds']:.1f} |", ""]
    for split, grid in r["grids"].items():
      out += [f"{split} prompts, first samples:", "", f"![{split} samples]({grid})", ""]
    return "\n".join(out) + "\n"


def _accuracy(path: pathlib.Path) -> dict:
  """The accuracies of an evaluator report; {} if there is none (a workdir of an older demo)."""
  return json.loads(path.read_text())["accuracy"] if path.exists() else {}


def _last_eval(run_dir: pathlib.Path) -> dict:
  """The last row of a run's metrics history that has evaluation metrics ({} if none)."""
  last = {}
  for row in metrics.read(run_dir):
    if any(k.startswith("eval/") for k in row):
      last = row
  return last


DEFAULTS = decoding.Settings()  # the project's sampling defaults
FLAGS = cli.Flags(__doc__)
FLAGS.string("workdir", None, "Everything the demo makes goes here.", required=True)
FLAGS.integer("train_images", 32000, "Images of the train split.")
FLAGS.integer("eval_prompts", 400, "Validation and held-out prompts each (400: about 100 of "
              "each kind, so a kind's score has a standard error of up to 5 points).")
FLAGS.integer("lattice", 8, "Objects on multiples of this many pixels, the tokenizer's 8 px "
              "patches, so each shows the same codes wherever it stands and no patch shows two "
              "objects; 0 puts objects anywhere, which the demo's small Parti learns far less "
              "well (BENCHMARKS.md).")
FLAGS.string("train_kinds", "single:1,count:1,binding:2,relation:3", "How often the train "
             "split draws each kind of caption; validation and held-out prompts draw them "
             "equally. Drawing the two-object kinds more often raised the seen score from 83% "
             "to 92.5% (BENCHMARKS.md).")
FLAGS.integer("tokenizer_steps", 1000, "Training steps of the image tokenizer.")
FLAGS.integer("parti_steps", 6000, "Training steps of the Parti model.")
FLAGS.integer("reranker_steps", 300, "Training steps of the reranker.")
FLAGS.integer("candidates", 4, "Samples drawn per prompt for the reranker to choose from.")
FLAGS.float("guidance", DEFAULTS.guidance, "Classifier-free guidance scale.")
FLAGS.float("temperature", DEFAULTS.temperature, "Sampling temperature.")
FLAGS.integer("seed", 0, "Seed of the shapes data and of the samples.")
FLAGS.string("configs", str(pathlib.Path(__file__).resolve().parents[1] / "configs"),
             "Directory with demo_tokenizer.py, demo_parti.py and contrastive_tiny.py.")


def main(argv=None):
  Demo(FLAGS.parse(argv)).run()


if __name__ == "__main__":
  cli.run(main)
