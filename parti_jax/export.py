"""A trained run as a model folder to share: safetensors weights, JSON configs, the
SentencePiece model, the image tokenizer and a model card.

  python -m parti_jax.export --workdir RUN [--step N|best] --out DIR \\
      [--preview "a red circle" --preview ...] [--max_shard_mb 2048]

DIR then holds model.json (the folder's format version and every file with its size),
model/ (config.json and model.safetensors, or several files with an index past
--max_shard_mb), image_tokenizer/ (a vitvqgan:RUN tokenizer's weights; a built-in one is
named in model.json), spm.model, README.md (the model card) and, with --preview, samples
drawn from the folder itself. `python -m parti_jax.sample --model DIR` and the notebook read
it without orbax or the run; `--config.init_from=DIR` fine-tunes from it
(docs/sharing.md). RUN and DIR may be in buckets (gs://...). An export cut short after
model.json (in its preview or model card) is finished by running the same command again.
"""

import sys

from parti_jax import cli, model_folder, runs, sampling
from parti_jax.data import records

FLAGS = cli.Flags(__doc__)
FLAGS.string("workdir", None, "Training run directory (local or bucket).", required=True)
FLAGS.string("step", None, "Checkpoint step: a number or 'best' (default: the latest).")
FLAGS.string("out", None, "The model folder to write.", required=True)
FLAGS.string("tokenizer", None, "Image tokenizer (default: the run's token shards').")
FLAGS.string("spm", None, "SentencePiece model (default: the run's token shards').")
FLAGS.integer("max_shard_mb", model_folder.DEFAULT_SHARD_BYTES >> 20,
              "Largest safetensors file in MiB; a larger model is split into several.")
FLAGS.strings("preview", None, "A prompt of the preview samples (repeat for several).")
FLAGS.integer("preview_samples", 4, "Preview images per prompt.")


def main(argv=None):
  a = FLAGS.parse(argv)
  log = lambda msg: print(msg, file=sys.stderr)
  try:
    model_folder.export(a.workdir, a.out, runs.parse_step(a.step), a.tokenizer, a.spm,
                        max(1, a.max_shard_mb) << 20, tuple(a.preview or ()),
                        a.preview_samples, log=log)
  except (runs.RunError, sampling.SampleError, records.DataError) as e:  # FolderError too
    sys.exit(f"error: {e}")
  print(f"wrote the model folder {a.out}")


if __name__ == "__main__":
  cli.run(main)
