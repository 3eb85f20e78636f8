"""The README.md of a model folder: what the model is, what it trained on, how far, how well,
and the commands that sample it and fine-tune from it (parti_jax/model_folder.py)."""

import ml_collections
from etils import epath

from parti_jax import metrics as metrics_lib
from parti_jax.data import records

# Metrics shown, when the run's history has them (the trainer's names).
TRAIN_METRICS = ("loss", "accuracy", "l2", "psnr")


def text(out, manifest: dict, config: ml_collections.ConfigDict, workdir,
         previewed: dict | None) -> str:
  step, task, m = manifest["step"], manifest["task"], config.model
  lines = [f"# {task} model, step {step}", "",
           f"Exported by `python -m parti_jax.export` from the run `{workdir}` "
           f"({manifest['source']['chosen']} checkpoint: step {step} of "
           f"{config.num_train_steps:,}). Folder format {manifest['format_version']} "
           "(`model.json` lists every file and its size).", "", "## Model", ""]
  for name, stage in manifest["stages"].items():
    if "parameters" in stage:
      files = stage.get("index") or stage["weights"][0]
      lines.append(f"- `{name}`: {stage['task']}, {stage['parameters']:,} parameters "
                   f"({stage['bytes'] / 2**20:,.1f} MiB float32) in `{files}`; config "
                   f"`{stage['config']}`")
    else:
      lines.append(f"- `{name}`: the built-in `{stage['spec']}` (no weights)")
  if task == "parti":
    lines.append(f"- text: `{manifest['spm_model']}` (SentencePiece), up to {m.text_len} "
                 f"tokens; images: {m.image_grid}x{m.image_grid} codes of {m.codebook_size}")
  lines += ["", "## Data and training", "",
            f"- data: `{config.data.train}`{_count(config.data.train)}; evaluation: "
            f"`{config.data.eval or 'none'}`{_count(config.data.eval)}",
            f"- {step:,} steps of {config.global_batch_size:,} examples "
            f"({step * config.global_batch_size:,} examples seen), {config.optimizer.name}, "
            f"learning rate {config.optimizer.learning_rate:g} ({config.schedule.name})"]
  lines += ["", "## Metrics", "", *_metrics(workdir, step)]
  name = epath.Path(out).name  # commands run from the folder's parent, wherever it moved
  lines += ["", "## Use", "", "From the folder's parent directory:", "", "```bash"]
  if task == "parti":
    lines.append(f"python -m parti_jax.sample --model {name} --prompt \"a red circle\" "
                 "--num_samples 4 --out samples")
  lines += [f"python -m parti_jax.train --config CONFIG --workdir RUN "
            f"--config.init_from={name}  # fine-tune from it", "```"]
  if previewed:
    lines += ["", "## Preview", "", "Sampled from this folder at the project's sampling "
              "defaults, as this command does from the folder's parent directory:", "",
              "```bash", previewed["command"], "```", ""]
    lines += [f"![{p}]({previewed['directory']}/{i:04d}_grid.png) {p}"
              for i, p in enumerate(previewed["prompts"])]
  return "\n".join(lines) + "\n"


def _count(shards: str) -> str:
  if not shards:
    return ""
  try:
    count = records.read_metadata(shards).get("count")
  except (OSError, ValueError, records.DataError):
    return ""
  return f" ({count:,} examples)" if isinstance(count, int) else ""


def _metrics(workdir, step: int) -> list[str]:
  """The last training window's and the last evaluation's metrics at or before `step`."""
  try:
    rows = [r for r in metrics_lib.read(workdir) if r.get("step", 0) <= step]
  except (OSError, ValueError):
    rows = []
  found = []
  for what, keys in (("training", TRAIN_METRICS), ("evaluation", None)):
    chosen = [r for r in rows if (any(k in r for k in keys) if keys else
                                  any(k.startswith("eval/") for k in r))]
    if not chosen:
      continue
    row = chosen[-1]
    shown = {k: v for k, v in row.items()
             if (k in keys if keys else k.startswith("eval/")) and isinstance(v, (int, float))}
    found.append(f"- {what} at step {row['step']}: "
                 + ", ".join(f"{k} {v:.4g}" for k, v in shown.items()))
  return found or ["- none recorded in the run's metrics"]
