"""Image-text alignment of a sample directory, scored by a contrastive reranker run.

  python -m parti_jax.eval.alignment --model RUN [--step N|best] --images SAMPLE_DIR \\
      [--out report.json] [--spm SPM_MODEL]

A CLIP-score analogue that needs no downloaded weights: every image of SAMPLE_DIR (a
`python -m parti_jax.sample` output: its samples.json lists each prompt with its files) is
scored against its prompt by the dual encoder of RUN (task `contrastive`, trained with
`python -m parti_jax.train --config configs/contrastive_tiny.py ...`): the cosine
similarity of their embeddings (parti_jax/rerank.py). Prints each prompt's mean score and
the mean over all images; `--out` writes them as JSON: `mean_score`, `count`, and per
prompt `prompt`, `count`, `mean_score` and `scores` (in the order of its files). Scores are
comparable only between directories scored by the same reranker run and step.

samples.json and the images are data (docs/trust.md): read with size limits, file names
only inside SAMPLE_DIR. RUN, SAMPLE_DIR and the output may be in buckets (gs://...).
"""

import concurrent.futures
import json
import sys

import numpy as np
from etils import epath

from parti_jax import cli, rerank, runs
from parti_jax import eval as eval_lib
from parti_jax.data import buckets, records
from parti_jax.data import images as image_lib

READ_THREADS = 16  # sample PNGs read at once (in a bucket, each is a round trip)

FLAGS = cli.Flags(__doc__)
FLAGS.string("model", None, "Contrastive reranker run (task 'contrastive').", required=True)
FLAGS.string("step", None, "Checkpoint step of --model: a number or 'best' (default: latest).")
FLAGS.string("images", None, "A sampler output directory (with samples.json).", required=True)
FLAGS.string("out", None, "Also write the report (JSON) here.")
FLAGS.string("spm", None, "SentencePiece model (default: the run's data.spm_model).")


class AlignmentError(ValueError):
  """A sample directory that cannot be scored; the message names it."""


def sample_files(directory) -> list[tuple[str, list[epath.Path]]]:
  """(prompt, image paths) per prompt entry of DIR/samples.json, read and checked as data by
  the evaluators' one reader (`parti_jax.eval.read_samples`)."""
  directory = epath.Path(directory)
  return [(entry["prompt"], [directory / name for name in entry["files"]])
          for entry in eval_lib.read_samples(directory)]


def read_image(path) -> np.ndarray:
  try:
    data = records.read_limited(path, records.MAX_IMAGE_BYTES, "a sample image")
  except FileNotFoundError:
    raise AlignmentError(f"{path} is listed in samples.json but missing") from None
  try:
    return image_lib.rgb_array(np.asarray(image_lib.open_image(data)))
  except records.BadRecord as e:
    raise AlignmentError(f"{path} is not an image it can read ({e})") from None


def score(scorer: rerank.Scorer, directory) -> dict:
  """The report: mean score and count over all images, and per prompt."""
  prompts = sample_files(directory)
  with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
    images = list(pool.map(read_image, [path for _, files in prompts for path in files]))
  texts = [prompt for prompt, files in prompts for _ in files]
  scores = scorer.scores(images, texts)
  per_prompt, start = [], 0
  for i, (prompt, files) in enumerate(prompts):
    mine = scores[start:start + len(files)]
    start += len(files)
    per_prompt.append(dict(index=i, prompt=prompt, count=len(files),
                           mean_score=float(mine.mean()) if len(mine) else None,
                           scores=[round(float(s), 6) for s in mine]))
  return dict(model=scorer.name, step=scorer.step, images=str(directory),
              count=int(len(scores)), mean_score=float(scores.mean()), prompts=per_prompt)


def main(argv=None):
  a = FLAGS.parse(argv)
  try:
    for path in filter(None, (a.images, a.out)):
      buckets.check_bucket(path)  # before loading anything
    sample_files(a.images)  # a wrong directory is said before the model loads
    scorer = rerank.Scorer.load(a.model, runs.parse_step(a.step), spm_model=a.spm)
    report = score(scorer, a.images)
    if a.out:
      with buckets.reported(a.out):
        records.atomic_write_text(a.out, json.dumps(report, indent=1) + "\n")
  except (AlignmentError, eval_lib.SamplesError, rerank.RerankError, runs.RunError,
          records.DataError) as e:
    sys.exit(f"error: {e}")
  for entry in report["prompts"]:
    if entry["count"]:
      print(f"{entry['mean_score']:+.4f}  ({entry['count']} images)  {entry['prompt'][:100]}")
  print(f"mean score {report['mean_score']:+.4f} over {report['count']} images of "
        f"{len(report['prompts'])} prompts (reranker {report['model']}, step {report['step']})")


if __name__ == "__main__":
  cli.run(main)
