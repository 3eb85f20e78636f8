"""Images from a trained Parti run or a model folder.

  python -m parti_jax.sample (--workdir RUN [--step N|best] | --model FOLDER) \\
      (--prompt "..." | --prompts FILE) --num_samples 16 --out DIR [--guidance 1.5 \\
      --temperature 0.2 --top_k 0 --top_p 1 --seed 0 --sjd --sjd_window 16 --batch_size 16 \\
      --tensor 1]

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
    sampling.check_out(a.out)
    run = sampling.load_flagged(a)
    report = sampling.generate(run, prompts, settings, a.num_samples, a.seed, a.batch_size,
                               a.out, log=log)
  except (sampling.SampleError, records.DataError, runs.RunError) as e:
    sys.exit(f"error: {e}")
  t = report["timings"]
  print(f"wrote {len(prompts) * a.num_samples} images of {len(prompts)} prompts to {a.out} "
        f"({t['s_per_image']:.3f} s per image, {t['forwards_per_batch']:.1f} forwards per "
        f"batch of {report['batch_size']}; compile {t['compile_s']:.1f} s)")


if __name__ == "__main__":
  cli.run(main)
