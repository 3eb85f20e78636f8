"""Images from a trained Parti run or a model folder.

  python -m parti_jax.sample (--workdir RUN [--step N|best] | --model FOLDER) \\
      (--prompt "..." | --prompts FILE) --num_samples 16 --out DIR [--guidance 1.5 \\
      --temperature 0.2 --top_k 0 --top_p 1 --seed 0 --sjd --sjd_window 16 --batch_size 16 \\
      --tensor 1] [--rerank RERANKER_RUN --keep K] [--upsample UPSAMPLER_RUN]

FILE is a text file (one prompt per line; empty lines skipped) or a PartiPrompts-style
TSV (column `Prompt`; `--category` and `--challenge` filter its rows). DIR receives one
PNG per sample (`PPPP_SS.png`), a grid per prompt (`PPPP_grid.png`) and `samples.json`:
the settings, every prompt with its files and seeds, and timings. RUN, FILE and DIR may be
in buckets (gs://...); samples.json is written last.

RUN is a training run (`--step best`: the checkpoint of its best evaluation, kept with
`train.keep_best`); FOLDER a model folder written by `python -m parti_jax.export`, read
without orbax or the run. The image tokenizer and SentencePiece model are the folder's, or
those the run's token shards were made with (`--tokenizer` and `--spm` override them). A
prompt and seed give the same image in any batch, file or order (parti_jax/sampling.py).
The sampling defaults are the project's one set (`parti_jax.decoding.Settings`).

`--rerank` scores every sample against its prompt with a contrastive reranker run (task
`contrastive`, parti_jax/rerank.py), as Parti keeps the best of its candidates: samples.json
gets each sample's score and rank, and only the K best files of each prompt are written
(`--keep 0`, the default: all, with their ranks). `--upsample` writes each kept sample
upsampled by a super-resolution run (task `superres`, parti_jax/upsample.py) beside it
(`PPPP_SS_x2.png`).
"""

import sys

from parti_jax import cli, decoding, runs, sampling
from parti_jax.data import records

DEFAULTS = decoding.Settings()
FLAGS = cli.Flags(__doc__)
sampling.define_model_flags(FLAGS)
FLAGS.strings("prompt", None, "A prompt (repeat the flag for several).")
FLAGS.string("prompts", None, "Text file (one per line) or TSV with a Prompt column.")
FLAGS.string("category", None, "TSV: only rows of this Category.")
FLAGS.string("challenge", None, "TSV: only rows of this Challenge.")
FLAGS.integer("num_samples", 16, "Images per prompt.")
FLAGS.string("out", None, "Output directory.", required=True)
FLAGS.float("guidance", DEFAULTS.guidance, "Classifier-free guidance scale (1: none).")
FLAGS.float("temperature", DEFAULTS.temperature, "0: greedy.")
FLAGS.integer("top_k", DEFAULTS.top_k, "0: all codes.")
FLAGS.float("top_p", DEFAULTS.top_p, "1: all codes.")
FLAGS.integer("seed", 0, "Base seed of every prompt's keys.")
FLAGS.bool("sjd", False, "Speculative Jacobi decoding.")
FLAGS.integer("sjd_window", 16, "Draft tokens per SJD forward.")
FLAGS.integer("batch_size", 0, "Rows per forward (default: up to 16), rounded up to the "
              "devices.")
sampling.define_helper_flags(FLAGS)
FLAGS.integer("keep", 0, "With --rerank: the best samples of each prompt to write (0: all, "
              "ranked).")


def check_keep(a) -> None:
  """Refuses a --keep that cannot apply, before anything is loaded."""
  if a.keep < 0:
    raise sampling.SampleError(f"--keep={a.keep} must be 0 (all) or positive")
  if a.keep and not a.rerank:
    raise sampling.SampleError("--keep needs --rerank (a reranker run to rank the samples)")
  if a.keep > a.num_samples:
    raise sampling.SampleError(f"--keep={a.keep} is more than --num_samples={a.num_samples}")


def main(argv=None):
  a = FLAGS.parse(argv)
  if bool(a.prompt) == bool(a.prompts):
    raise SystemExit("error: give one of --prompt or --prompts")
  settings = decoding.Settings(guidance=a.guidance, temperature=a.temperature, top_k=a.top_k,
                               top_p=a.top_p, sjd_window=a.sjd_window if a.sjd else 0)
  log = lambda msg: print(msg, file=sys.stderr)
  try:
    sampling.check_model_flags(a)
    prompts = ([q.strip() for q in a.prompt if q.strip()] if a.prompt
               else sampling.read_prompts(a.prompts, a.category, a.challenge))
    if not prompts:
      raise sampling.SampleError("every --prompt is empty")
    check_keep(a)
    sampling.check_out(a.out)
    # The helpers first: a wrong run is said before the slow load.
    scorer, upsampler = sampling.load_helpers(a)
    run = sampling.load_flagged(a)
    report = sampling.generate(run, prompts, settings, a.num_samples, a.seed, a.batch_size,
                               a.out, log=log, scorer=scorer, keep=a.keep, upsampler=upsampler)
  except (sampling.SampleError, records.DataError, runs.RunError) as e:
    sys.exit(f"error: {e}")
  t = report["timings"]
  written = sum(len(entry["files"]) for entry in report["prompts"])
  print(f"wrote {written} images of {len(prompts)} prompts to {a.out} "
        f"({t['s_per_image']:.3f} s per image, {t['forwards_per_batch']:.1f} forwards per "
        f"batch of {report['batch_size']}; compile {t['compile_s']:.1f} s)"
        + (f", each also upsampled x{upsampler.scale}" if upsampler else ""))


if __name__ == "__main__":
  cli.run(main)
