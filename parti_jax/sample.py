"""Images from a trained Parti run.

  python -m parti_jax.sample --workdir RUN [--step N] (--prompt "..." | --prompts FILE) \\
      --num_samples 16 --out DIR [--guidance 3 --temperature 1 --top_k 0 --top_p 1 \\
      --seed 0 --sjd --sjd_window 16 --batch_size 16 --tensor 1]

FILE is a text file (one prompt per line; empty lines skipped) or a PartiPrompts-style
TSV (column `Prompt`; `--category` and `--challenge` filter its rows). DIR receives one
PNG per sample (`PPPP_SS.png`), a grid per prompt (`PPPP_grid.png`) and `samples.json`:
the settings, every prompt with its files and seeds, and timings. RUN, FILE and DIR may be
in buckets (gs://...); samples.json is written last.

The run's config.json gives the model; its token shards (`config.data.train`) name the
image tokenizer and the SentencePiece model they were made with (`config.data.spm_model`,
`--tokenizer` and `--spm` override them, e.g. when the run moved machines).

Sample s of a prompt draws from fold_in(fold_in(key(seed), prompt_id), s), prompt_id
being a checksum of the prompt's text: a prompt and seed give the same image in any
batch, file or order. Token-by-token and speculative Jacobi decoding (`--sjd`) draw from
the same distribution, with different images for a seed.

Rows (prompt x sample) run in batches of `--batch_size` on this process's devices (batch
over `data`, heads over `--tensor` devices; weights in the model's dtype); the last batch
is padded.
"""

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from typing import Callable

import jax
import ml_collections
import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from parti_jax import checkpoints, decoding, sharding
from parti_jax import config as config_lib
from parti_jax import train_step as ts
from parti_jax.data import images as image_lib
from parti_jax.data import buckets, records, spm


class SampleError(Exception):
  """Sampling cannot start; the message says what is missing and where."""


# --------------------------------------------------------------------------- prompts


def read_prompts(path, category: str | None = None, challenge: str | None = None) -> list[str]:
  """Prompts of a text file (one per line) or a TSV with a `Prompt` column, filtered."""
  try:
    text = buckets.read_text(path)
  except (OSError, UnicodeDecodeError) as e:
    raise SampleError(f"cannot read the prompts file {path}: {e}") from None
  except records.DataError as e:  # a bucket that cannot be reached
    raise SampleError(f"cannot read the prompts file: {e}") from None
  lines = text.splitlines()
  header = lines[0].split("\t") if lines else []
  if "Prompt" in header:
    rows = list(csv.DictReader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    for name, wanted in (("Category", category), ("Challenge", challenge)):
      if wanted:
        rows = [r for r in rows if (r.get(name) or "").strip().lower() == wanted.lower()]
    prompts = [r["Prompt"] for r in rows]
  elif category or challenge:
    raise SampleError(f"--category and --challenge filter a TSV with a Prompt column; {path} "
                      "has none")
  else:
    prompts = lines
  prompts = [p.strip() for p in prompts if p and p.strip()]
  if not prompts:
    raise SampleError(f"no prompts in {path}" + (" after filtering" if category or challenge
                                                 else ""))
  return prompts


# ----------------------------------------------------------------------- image decoders


@dataclasses.dataclass(frozen=True)
class ImageDecoder:
  """`decode(codes int [B, grid * grid]) -> uint8 [B, R, R, 3]` of an image tokenizer."""
  decode: Callable[[np.ndarray], np.ndarray]
  grid: int
  codebook_size: int
  name: str


def color_decoder(resolution: int, patch: int = 8, levels: int = 4) -> ImageDecoder:
  """The built-in colour tokenizer backwards: each code becomes its patch's flat colour."""
  grid = resolution // patch

  def decode(codes):
    codes = np.asarray(codes).reshape(-1, grid, grid)
    rgb = np.stack([codes // (levels * levels), codes // levels % levels, codes % levels], -1)
    pixels = np.round(rgb * (255 / (levels - 1))).astype(np.uint8)
    return pixels.repeat(patch, axis=1).repeat(patch, axis=2)

  return ImageDecoder(decode, grid, levels ** 3, f"color:patch={patch},levels={levels}")


def vitvqgan_decoder(workdir, mesh) -> ImageDecoder:
  """The decoder of a ViT-VQGAN run (its config.json and latest checkpoint)."""
  from parti_jax import vqgan_train  # the tokenizer's model only when it is asked for
  try:
    setup, params = vqgan_train.load_run(workdir, mesh)
  except (ValueError, FileNotFoundError) as e:
    raise SampleError(f"image tokenizer vitvqgan:{workdir}: {e}") from None
  m = setup.config.model
  run = jax.jit(lambda p, codes: setup.model(p).decode(codes))

  def decode(codes):
    return image_lib.to_uint8(run(params, np.asarray(codes, np.int32)),
                              *setup.config.data.value_range)

  return ImageDecoder(decode, m.resolution // m.patch_size, m.codebook_size,
                      f"vitvqgan:{workdir}")


def image_decoder(spec: str, resolution: int | None, mesh, grid: int) -> ImageDecoder:
  """The decoder of a tokenizer named as `parti_jax.data.encode` names it.

  The colour tokenizer's resolution is the token shards' (when known), else what makes
  `grid` codes a side.
  """
  name, _, args = spec.partition(":")
  if name == "color":
    kwargs = {k: int(v) for k, v in (kv.split("=") for kv in args.split(",") if kv)}
    return color_decoder(resolution or grid * kwargs.get("patch", 8), **kwargs)
  if name == "vitvqgan":
    return vitvqgan_decoder(args, mesh)
  raise SampleError(f"image tokenizer {spec!r}: no decoder known for it (color, vitvqgan)")


# ------------------------------------------------------------------------------ runs


def read_config(workdir) -> ml_collections.ConfigDict:
  path = epath.Path(workdir) / "config.json"
  try:
    text = buckets.read_text(path)
  except FileNotFoundError:
    raise SampleError(f"{workdir}: no config.json; not a training run directory") from None
  except records.DataError as e:  # a bucket that cannot be reached
    raise SampleError(str(e)) from None
  config = ml_collections.ConfigDict(json.loads(text))
  config.sharding_rules = tuple(tuple(rule) for rule in config.sharding_rules)
  return config


def checkpoint_dir(workdir, step: int | None) -> tuple[epath.Path, int]:
  directory = checkpoints.absolute(workdir) / "checkpoints"
  steps = checkpoints.finished_steps(directory)  # never a step still being written
  if not steps:
    raise SampleError(f"{workdir} has no checkpoint (nothing in {directory}); train it first")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise SampleError(f"{workdir} has no checkpoint at step {step}; it has steps {steps}")
  return directory / str(step), step


@dataclasses.dataclass
class Run:
  """A loaded run: model setup and parameters, text tokenizer, image decoder."""
  workdir: str
  step: int
  setup: ts.Setup
  params: dict
  text_tokenizer: spm.Tokenizer
  image_decoder: ImageDecoder
  load_s: float
  _compiled: dict = dataclasses.field(default_factory=dict)

  def generate_fn(self, settings: decoding.Settings, batch_size: int):
    """(compiled `Sampler.generate`, seconds it took): compiled once per run and settings."""
    key = (settings, batch_size)
    if key in self._compiled:
      return self._compiled[key], 0.0
    start = time.perf_counter()
    sampler = decoding.Sampler(self.setup, settings, batch_size)
    _, text, keys = sampler.abstract_inputs()
    self._compiled[key] = sampler.generate.lower(self.params, text, keys).compile()
    return self._compiled[key], time.perf_counter() - start


def load_run(workdir, step: int | None = None, tokenizer: str | None = None,
             spm_model: str | None = None, tensor: int = 1, devices=None) -> Run:
  """The run's model on the local devices (batch over `data`, heads over `tensor`)."""
  start = time.perf_counter()
  workdir = str(workdir)
  config = read_config(workdir)
  if config.get("task", "parti") != "parti":
    raise SampleError(f"{workdir} trained {config.task!r}, not a Parti model")
  path, step = checkpoint_dir(workdir, step)
  devices = devices or jax.local_devices()
  config.mesh.update(data=-1, fsdp=1, tensor=tensor)
  config.global_batch_size = len(devices) // tensor  # not used; keeps the checks quiet
  try:
    setup = ts.Setup(config, sharding.make_mesh(config, devices))
  except config_lib.ConfigError as e:
    raise SampleError(str(e)) from None
  spm_model = spm_model or config.data.get("spm_model")  # a config may name it
  tokens = _token_metadata(config, required=not (tokenizer and spm_model))
  spm_model = spm_model or _locate(tokens.get("spm_model", ""), config.data.train)
  if not spm_model:
    raise SampleError(f"{config.data.train}: metadata.json names no SentencePiece model; "
                      "pass --spm")
  decoder = image_decoder(tokenizer or tokens["tokenizer"], tokens.get("resolution"),
                          setup.mesh, config.model.image_grid)
  text_tokenizer = _text_tokenizer(spm_model, config.model)
  _check_codebook(decoder, config.model)
  params = checkpoints.load_params(path, setup.abstract_state().params)
  if config.model.dtype != "float32":  # matmuls run in it anyway: half the bytes to read
    params = jax.jit(lambda p: decoding.cast_params(p, config.model.dtype))(params)
  return Run(workdir, step, setup, params, text_tokenizer, decoder,
             time.perf_counter() - start)


def _token_metadata(config, required: bool) -> dict:
  """The image tokenizer and SentencePiece model that made the run's token shards
  (nothing, if they cannot be read and are not `required`)."""
  where = config.data.train
  try:
    tokens = records.read_metadata(where).get("tokens", {})
  except (OSError, records.DataError, ValueError) as e:
    if not required:
      return {}
    raise SampleError(f"cannot read the run's token shards {where!r} to find its tokenizers "
                      f"({e}); pass --tokenizer and --spm") from None
  if required and "tokenizer" not in tokens:
    raise SampleError(f"{where}: metadata.json names no tokenizer; pass --tokenizer and --spm")
  return tokens


def _locate(path: str, token_shards: str) -> str:
  """A path recorded relative to wherever encode ran: tried from here, then from the token
  shard directory and each directory above it."""
  if "://" in path or epath.Path(path).is_absolute() or epath.Path(path).exists():
    return path
  for folder in [epath.Path(token_shards), *epath.Path(token_shards).parents]:
    if (folder / path).exists():
      return str(folder / path)
  return path


def _text_tokenizer(spm_model, m) -> spm.Tokenizer:
  try:
    tokenizer = spm.Tokenizer(spm_model, m.text_len)
  except (OSError, records.DataError) as e:
    raise SampleError(f"cannot read the SentencePiece model {spm_model}: {e}; pass --spm") \
        from None
  if tokenizer.vocab_size > m.text_vocab_size:
    raise SampleError(f"the SentencePiece model {spm_model} has {tokenizer.vocab_size} pieces; "
                      f"the model's text vocabulary only {m.text_vocab_size}")
  return tokenizer


def _check_codebook(decoder: ImageDecoder, m) -> None:
  if decoder.codebook_size > m.codebook_size or decoder.grid != m.image_grid:
    raise SampleError(
        f"the image tokenizer {decoder.name} ({decoder.grid}x{decoder.grid} codes of "
        f"{decoder.codebook_size}) does not match the model ({m.image_grid}x{m.image_grid} "
        f"codes of {m.codebook_size})")


# --------------------------------------------------------------------------- sampling


def grid(images: np.ndarray) -> np.ndarray:
  """uint8 [n, H, W, 3] -> one picture, ceil(sqrt(n)) images a row."""
  n, h, w, c = images.shape
  cols = math.ceil(math.sqrt(n))
  rows = -(-n // cols)
  canvas = np.full((rows * h, cols * w, c), 255, np.uint8)
  for i, image in enumerate(images):
    canvas[i // cols * h:(i // cols + 1) * h, i % cols * w:(i % cols + 1) * w] = image
  return canvas


def generate(run: Run, prompts: list[str], settings: decoding.Settings, num_samples: int,
             seed: int = 0, batch_size: int = 0, out=None, progress: bool = True,
             log=print) -> dict:
  """Samples every prompt `num_samples` times; writes files to `out` when given.

  Returns the report written as samples.json, plus `images`: uint8 [num_samples, R, R, 3]
  per prompt.
  """
  m, mesh = run.setup.config.model, run.setup.mesh
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
  batch_size = batch_size or min(len(rows), 16)
  batch_size = -(-batch_size // ways) * ways  # whole rows on every device
  if run.image_decoder.codebook_size < m.codebook_size:
    settings = dataclasses.replace(settings, num_codes=run.image_decoder.codebook_size)

  text, truncated = [], []
  for i, prompt in enumerate(prompts):
    ids = run.text_tokenizer.ids(prompt)
    if ids[-1] != spm.END_ID:
      truncated.append(i)
      log(f"warning: prompt {i} is longer than {m.text_len} text tokens; truncated: "
          f"{prompt[:80]!r}")
    text.append(spm.pad(ids, m.text_len))
  ids = [decoding.prompt_id(p) for p in prompts]

  generate_fn, compile_s = run.generate_fn(settings, batch_size)

  images = [[None] * num_samples for _ in prompts]
  remaining = [num_samples] * len(prompts)
  forwards, start = [], time.perf_counter()
  bar = tqdm(total=len(prompts), unit="prompt", disable=not progress, file=sys.stderr)
  for b in range(0, len(rows), batch_size):
    batch = rows[b:b + batch_size]
    padded = batch + [batch[-1]] * (batch_size - len(batch))
    tokens = np.stack([text[i] for i, _ in padded])
    keys = decoding.row_keys(seed, [ids[i] for i, _ in padded], [s for _, s in padded])
    out_batch = jax.device_get(generate_fn(run.params, tokens, keys))
    forwards.append(int(out_batch.forwards))
    pictures = run.image_decoder.decode(out_batch.tokens[:len(batch)])
    for (i, s), picture in zip(batch, pictures):
      images[i][s] = picture
      remaining[i] -= 1
      if not remaining[i]:
        bar.update(1)
  bar.close()
  sample_s = time.perf_counter() - start

  report = dict(
      workdir=run.workdir, step=run.step, image_tokenizer=run.image_decoder.name,
      settings=dataclasses.asdict(settings), decoding="sjd" if settings.sjd_window else "token",
      seed=seed, key=("fold_in(fold_in(jax.random.key(seed), prompt_id), sample); "
                      "prompt_id = crc32(prompt utf-8) & 0x7fffffff"),
      num_samples=num_samples, batch_size=batch_size, devices=mesh.size,
      device_kind=mesh.devices.flat[0].device_kind,
      timings=dict(load_s=run.load_s, compile_s=compile_s, sample_s=sample_s,
                   images_per_s=len(rows) / sample_s, s_per_image=sample_s / len(rows),
                   batches=len(forwards), forwards_per_batch=float(np.mean(forwards)),
                   image_tokens=m.image_grid ** 2),
      prompts=[dict(index=i, prompt=p, prompt_id=ids[i], truncated=i in truncated)
               for i, p in enumerate(prompts)])
  if out is not None:
    with buckets.reported(out):  # a bucket's errors as one line naming it
      _write(epath.Path(out), report, images)
  report["images"] = [np.stack(x) for x in images]
  return report


def _write(out: epath.Path, report: dict, images) -> None:
  out.mkdir(parents=True, exist_ok=True)

  def save(name, pixels):
    with (out / name).open("wb") as f:
      Image.fromarray(pixels).save(f, format="PNG")

  for entry, pictures in zip(report["prompts"], images):
    i = entry["index"]
    entry["files"] = [f"{i:04d}_{s:02d}.png" for s in range(len(pictures))]
    entry["grid"] = f"{i:04d}_grid.png"
    for name, picture in zip(entry["files"], pictures):
      save(name, picture)
    save(entry["grid"], grid(np.stack(pictures)))
  (out / "samples.json").write_text(json.dumps(report, indent=1) + "\n")


# ------------------------------------------------------------------------------- main


def _check_out(out) -> None:
  """A bucket for `--out` that is missing or unreachable is said before anything is loaded."""
  try:
    buckets.check_bucket(out)
  except records.DataError as e:
    raise SampleError(f"--out {e}") from None


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True, help="training run directory (local or bucket)")
  p.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
  source = p.add_mutually_exclusive_group(required=True)
  source.add_argument("--prompt", action="append", help="a prompt (repeatable)")
  source.add_argument("--prompts", help="text file (one per line) or TSV with a Prompt column")
  p.add_argument("--category", help="TSV: only rows of this Category")
  p.add_argument("--challenge", help="TSV: only rows of this Challenge")
  p.add_argument("--num_samples", type=int, default=16, help="images per prompt")
  p.add_argument("--out", required=True, help="output directory")
  p.add_argument("--guidance", type=float, default=3.0,
                 help="classifier-free guidance scale (1: none; Parti used 1.2)")
  p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
  p.add_argument("--top_k", type=int, default=0, help="0: all codes")
  p.add_argument("--top_p", type=float, default=1.0, help="1: all codes")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sjd", action="store_true", help="speculative Jacobi decoding")
  p.add_argument("--sjd_window", type=int, default=16, help="draft tokens per SJD forward")
  p.add_argument("--batch_size", type=int, default=0,
                 help="rows per forward (default: up to 16), rounded up to the devices")
  p.add_argument("--tensor", type=int, default=1, help="devices that split the heads")
  p.add_argument("--tokenizer", help="image tokenizer (default: the run's token shards')")
  p.add_argument("--spm", help="SentencePiece model (default: the run's token shards')")
  a = p.parse_args(argv)
  settings = decoding.Settings(guidance=a.guidance, temperature=a.temperature, top_k=a.top_k,
                               top_p=a.top_p, sjd_window=a.sjd_window if a.sjd else 0)
  log = lambda msg: print(msg, file=sys.stderr)
  try:
    prompts = ([q.strip() for q in a.prompt if q.strip()] if a.prompt
               else read_prompts(a.prompts, a.category, a.challenge))
    if not prompts:
      raise SampleError("every --prompt is empty")
    _check_out(a.out)
    run = load_run(a.workdir, a.step, a.tokenizer, a.spm, a.tensor)
    report = generate(run, prompts, settings, a.num_samples, a.seed, a.batch_size, a.out,
                      log=log)
  except (SampleError, records.DataError) as e:
    sys.exit(f"error: {e}")
  t = report["timings"]
  print(f"wrote {len(prompts) * a.num_samples} images of {len(prompts)} prompts to {a.out} "
        f"({t['s_per_image']:.3f} s per image, {t['forwards_per_batch']:.1f} forwards per "
        f"batch of {report['batch_size']}; compile {t['compile_s']:.1f} s)")


if __name__ == "__main__":
  main()
