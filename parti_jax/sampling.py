"""Prompts in, images out: loading a Parti run for sampling, batching prompt rows over the
local devices, and writing PNGs and samples.json (`python -m parti_jax.sample` is the command).

Sample s of a prompt draws from fold_in(fold_in(key(seed), prompt_id), s), prompt_id
being a checksum of the prompt's text: a prompt and seed give the same image in any
batch, file or order. Token-by-token and speculative Jacobi decoding draw from the same
distribution, with different images for a seed.

The run's config.json gives the model; its token shards (`config.data.train`) name the
image tokenizer and the SentencePiece model they were made with (`config.data.spm_model`,
or the `tokenizer` and `spm_model` arguments, override them, e.g. when the run moved
machines). A model folder (`python -m parti_jax.export`, parti_jax/model_folder.py) holds
its config, weights, image tokenizer and SentencePiece model itself (`load_model`; `load`
takes either). Rows (prompt x sample) run in batches on this process's devices (batch over
`data`, heads over `tensor` devices; weights in the model's dtype); the last batch is padded.
"""

import csv
import dataclasses
import json
import math
import sys
import time

import jax
import numpy as np
from etils import epath
from PIL import Image
from tqdm import tqdm

from parti_jax import decoding, model_folder, rerank, runs, tokenizers
from parti_jax import text as text_lib
from parti_jax.data import buckets, records, spm


class SampleError(Exception):
  """Sampling cannot start; the message says what is missing and where."""


# --------------------------------------------------------------------------- prompts


MAX_PROMPTS_BYTES = 64 << 20  # PartiPrompts' TSV is 150 KB; past this a file is no prompt list


def read_prompts(path, category: str | None = None, challenge: str | None = None) -> list[str]:
  """Prompts of a text file (one per line) or a TSV with a `Prompt` column, filtered."""
  try:
    text = records.read_limited(path, MAX_PROMPTS_BYTES, "a prompts file").decode("utf-8")
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


# ------------------------------------------------------------------------------ runs


@dataclasses.dataclass
class Run:
  """A Parti run loaded for sampling: model setup and parameters, the text tokenizer, the
  image tokenizer that decodes its codes."""
  workdir: str
  step: int
  setup: object  # parti_jax.tasks.parti.Setup, for inference
  params: dict
  text_tokenizer: spm.Tokenizer
  image_tokenizer: tokenizers.ImageTokenizer
  load_s: float
  _compiled: dict = dataclasses.field(default_factory=dict)

  def sampler_settings(self, settings: decoding.Settings) -> decoding.Settings:
    """`settings` as the sampler runs them: drawing only codes the image tokenizer has."""
    codes = self.image_tokenizer.codebook_size
    if codes < self.setup.config.model.codebook_size:
      settings = dataclasses.replace(settings, num_codes=codes)
    return settings

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


def load_run(workdir, step: int | str | None = None, tokenizer: str | None = None,
             spm_model: str | None = None, tensor: int = 1, devices=None) -> Run:
  """The run's model at `step` (default: the latest; `best`: the best evaluation's) on the
  local devices (batch over `data`, heads over `tensor`)."""
  start = time.perf_counter()
  try:
    run = runs.prepare(workdir, step, task="parti", mesh_axes=dict(data=-1, fsdp=1, tensor=tensor),
                       devices=devices or jax.local_devices())
  except runs.RunError as e:
    raise SampleError(str(e)) from None
  spec, resolution, spm_model = run_tokenizers(run.config, tokenizer, spm_model)
  image_tokenizer = _image_tokenizer(
      lambda: tokenizers.load(spec, resolution, run.setup.mesh, grid=run.config.model.image_grid))
  text_tokenizer = _text_tokenizer(spm_model, run.config.model)
  _check_codebook(image_tokenizer, run.config.model)
  return _loaded(run.workdir, run.step, run.setup, run.load_params(), text_tokenizer,
                 image_tokenizer, start)


def load_model(folder, tokenizer: str | None = None, spm_model: str | None = None,
               tensor: int = 1, devices=None) -> Run:
  """A model folder's Parti model (`python -m parti_jax.export` writes them), as
  `load_run` lays a run out; no orbax, no training run. `tokenizer` and `spm_model`
  override the folder's."""
  start = time.perf_counter()
  try:
    folder = model_folder.open_folder(folder)
    config = folder.config(model_folder.MODEL)
    if config.get("task", "parti") != "parti":
      raise SampleError(f"{folder.path}: its model is a {config.task}, not a Parti model")
    setup = runs.inference_setup(
        config, str(folder.path / folder.stage(model_folder.MODEL)["config"]),
        mesh_axes=dict(data=-1, fsdp=1, tensor=tensor), devices=devices or jax.local_devices())
    entry = folder.stage(model_folder.IMAGE_TOKENIZER)
    if tokenizer or "spec" in entry:
      image_tokenizer = _image_tokenizer(lambda: tokenizers.load(
          tokenizer or entry["spec"], None if tokenizer else entry.get("resolution"),
          setup.mesh, grid=config.model.image_grid))
    else:
      _, tokenizer_setup, tokenizer_params = model_folder.load_stage(
          folder, model_folder.IMAGE_TOKENIZER, mesh=setup.mesh)
      image_tokenizer = _image_tokenizer(lambda: tokenizers.vitvqgan_of(
          tokenizer_setup, tokenizer_params, str(folder.path / model_folder.IMAGE_TOKENIZER)))
    spm_model = spm_model or folder.checked_file(folder.manifest.get("spm_model", ""),
                                                 spm.MAX_MODEL_BYTES)
    text_tokenizer = _text_tokenizer(spm_model, config.model)
    _check_codebook(image_tokenizer, config.model)
    params = model_folder.read_stage(folder, model_folder.MODEL,
                                     setup.sharded_abstract_params())
  except runs.RunError as e:  # model_folder.FolderError included
    raise SampleError(str(e)) from None
  return _loaded(str(folder.path), folder.manifest.get("step"), setup, params, text_tokenizer,
                 image_tokenizer, start)


def load(path, step: int | str | None = None, tokenizer: str | None = None,
         spm_model: str | None = None, tensor: int = 1, devices=None) -> Run:
  """A model folder (`load_model`) or a training run (`load_run`), whichever `path` is."""
  if model_folder.is_model_folder(path):
    if step is not None:
      raise SampleError(f"{path} is a model folder: it holds one step "
                        "(export another with python -m parti_jax.export --step)")
    return load_model(path, tokenizer, spm_model, tensor, devices)
  return load_run(path, step, tokenizer, spm_model, tensor, devices)


def define_model_flags(flags) -> None:
  """The flags that say what to sample from; `sample` and `serve` share them."""
  flags.string("workdir", None, "Training run directory (local or bucket).")
  flags.string("step", None, "Checkpoint step of --workdir: a number or 'best' (default: the "
               "latest).")
  flags.string("model", None, "Model folder (python -m parti_jax.export), instead of --workdir.")
  flags.string("tokenizer", None, "Image tokenizer (default: the run's token shards').")
  flags.string("spm", None, "SentencePiece model (default: the run's token shards').")
  flags.integer("tensor", 1, "Devices that split the heads.")


def check_model_flags(a) -> None:
  """Refuses what `define_model_flags`' flags cannot mean, before anything slow."""
  if bool(a.workdir) == bool(a.model):
    raise SampleError("give one of --workdir or --model")
  if a.model and a.step:
    raise SampleError("--step is for --workdir; a model folder holds one step")


def define_helper_flags(flags) -> None:
  """The flags that name Parti's two helper models; `sample` and `serve` share them."""
  flags.string("rerank", None, "Contrastive reranker run (task 'contrastive') that scores every "
               "image against its prompt, to keep the best.")
  flags.string("rerank_step", None, "Checkpoint step of --rerank (default: the latest).")
  flags.string("upsample", None, "Super-resolution run (task 'superres') that upsamples the "
               "images.")
  flags.string("upsample_step", None, "Checkpoint step of --upsample (default: the latest).")


def load_helpers(a) -> tuple:
  """(scorer, upsampler) that `define_helper_flags`' flags name, None where not asked for."""
  if a.rerank_step and not a.rerank:
    raise SampleError("--rerank_step needs --rerank")
  if a.upsample_step and not a.upsample:
    raise SampleError("--upsample_step needs --upsample")
  scorer = upsampler = None
  if a.rerank:
    try:
      scorer = rerank.Scorer.load(a.rerank, runs.parse_step(a.rerank_step, "--rerank_step"))
    except rerank.RerankError as e:
      raise SampleError(f"--rerank {a.rerank}: {e}") from None
  if a.upsample:
    # Imported only when asked for: the upsampler's network, which a plain run does without.
    from parti_jax import upsample
    try:
      upsampler = upsample.Upsampler.load(
          a.upsample, runs.parse_step(a.upsample_step, "--upsample_step"))
    except upsample.UpsampleError as e:
      raise SampleError(f"--upsample {a.upsample}: {e}") from None
  return scorer, upsampler


def load_flagged(a) -> Run:
  """The model that `define_model_flags`' flags name, on this process's devices."""
  check_model_flags(a)
  if a.model:
    return load_model(a.model, a.tokenizer, a.spm, a.tensor)
  return load_run(a.workdir, runs.parse_step(a.step), a.tokenizer, a.spm, a.tensor)


def run_tokenizers(config, tokenizer: str | None = None,
                   spm_model: str | None = None) -> tuple[str, int | None, str]:
  """(image tokenizer spec, its resolution or None, SentencePiece model path) of a run:
  those its token shards were made with, unless given."""
  spm_model = spm_model or config.data.get("spm_model")  # a config may name it
  tokens = _token_metadata(config, required=not (tokenizer and spm_model))
  spm_model = spm_model or _locate(tokens.get("spm_model", ""), config.data.train)
  if not spm_model:
    raise SampleError(f"{config.data.train}: metadata.json names no SentencePiece model; "
                      "pass --spm")
  return tokenizer or tokens["tokenizer"], tokens.get("resolution"), spm_model


def _image_tokenizer(make) -> tokenizers.ImageTokenizer:
  try:
    image_tokenizer = make()
  except tokenizers.TokenizerError as e:
    raise SampleError(f"image tokenizer {e}") from None
  if image_tokenizer.decode is None:
    raise SampleError(f"image tokenizer {image_tokenizer.name}: it has no decoder")
  return image_tokenizer


def _loaded(where: str, step, setup, params, text_tokenizer, image_tokenizer, start) -> Run:
  """The Run, its weights cast to the model's dtype for decoding."""
  if setup.config.model.dtype != "float32":  # matmuls run in it anyway: half the bytes to read
    params = jax.jit(lambda p: decoding.cast_params(p, setup.config.model.dtype))(params)
  return Run(where, step, setup, params, text_tokenizer, image_tokenizer,
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


def _check_codebook(tokenizer: tokenizers.ImageTokenizer, m) -> None:
  if tokenizer.codebook_size > m.codebook_size or tokenizer.grid != m.image_grid:
    raise SampleError(
        f"the image tokenizer {tokenizer.name} ({tokenizer.grid}x{tokenizer.grid} codes of "
        f"{tokenizer.codebook_size}) does not match the model ({m.image_grid}x{m.image_grid} "
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
             log=print, scorer=None, keep: int = 0, upsampler=None) -> dict:
  """Samples every prompt `num_samples` times; writes files to `out` when given.

  `scorer` (a `parti_jax.rerank.Scorer`) scores every sample against its prompt and keeps
  the `keep` best of each prompt (0: all, ranked); `upsampler` (a
  `parti_jax.upsample.Upsampler`) upsamples the kept ones, written beside them.

  Returns the report written as samples.json, plus `images`: uint8 [num_samples, R, R, 3]
  per prompt (every sample, in sample order) and, with an upsampler, `upsampled`: the kept
  samples' upsampled images per prompt, in the order of the entry's `files`.
  """
  m, mesh = run.setup.config.model, run.setup.mesh
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = [(i, s) for i in range(len(prompts)) for s in range(num_samples)]
  batch_size = batch_size or min(len(rows), 16)
  batch_size = -(-batch_size // ways) * ways  # whole rows on every device
  settings = run.sampler_settings(settings)

  text, truncated = [], []
  for i, prompt in enumerate(prompts):
    ids = run.text_tokenizer.ids(prompt)
    if ids[-1] != text_lib.END_ID:
      truncated.append(i)
      log(f"warning: prompt {i} is longer than {m.text_len} text tokens; truncated: "
          f"{prompt[:80]!r}")
    text.append(text_lib.pad(ids, m.text_len))
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
    pictures = run.image_tokenizer.decode_codes(out_batch.tokens[:len(batch)])
    for (i, s), picture in zip(batch, pictures):
      images[i][s] = picture
      remaining[i] -= 1
      if not remaining[i]:
        bar.update(1)
  bar.close()
  sample_s = time.perf_counter() - start
  images = [np.stack(x) for x in images]

  start = time.perf_counter()
  ranking = (rank(scorer, prompts, images, keep) if scorer is not None else
             [dict(kept=list(range(num_samples))) for _ in prompts])
  rerank_s, start = time.perf_counter() - start, time.perf_counter()
  upsampled = None
  if upsampler is not None:
    kept = [x[sorted(r["kept"])] for x, r in zip(images, ranking)]
    flat = upsampler(np.concatenate(kept))
    upsampled = np.split(flat, np.cumsum([len(k) for k in kept])[:-1])
  upsample_s = time.perf_counter() - start

  report = dict(
      workdir=run.workdir, step=run.step, image_tokenizer=run.image_tokenizer.name,
      settings=dataclasses.asdict(settings), decoding="sjd" if settings.sjd_window else "token",
      seed=seed, key=("fold_in(fold_in(jax.random.key(seed), prompt_id), sample); "
                      "prompt_id = crc32(prompt utf-8) & 0x7fffffff"),
      num_samples=num_samples, batch_size=batch_size, devices=mesh.size,
      device_kind=mesh.devices.flat[0].device_kind,
      timings=dict(load_s=run.load_s, compile_s=compile_s, sample_s=sample_s,
                   images_per_s=len(rows) / sample_s, s_per_image=sample_s / len(rows),
                   batches=len(forwards), forwards_per_batch=float(np.mean(forwards)),
                   image_tokens=m.image_grid ** 2, rerank_s=rerank_s, upsample_s=upsample_s),
      prompts=[dict(index=i, prompt=p, prompt_id=ids[i], truncated=i in truncated, **r)
               for i, (p, r) in enumerate(zip(prompts, ranking))])
  if scorer is not None:
    report["rerank"] = dict(model=scorer.name, keep=keep)
  if upsampler is not None:
    report["upsample"] = dict(model=upsampler.name, scale=upsampler.scale)
  _name_files(report, upsampler)
  if out is not None:
    with buckets.reported(out):  # a bucket's errors as one line naming it
      _write(epath.Path(out), report, images, upsampled)
  report["images"] = images
  if upsampled is not None:
    report["upsampled"] = upsampled
  return report


def rank(scorer, prompts: list[str], images: list[np.ndarray], keep: int = 0) -> list[dict]:
  """Per prompt: every sample's reranker score (`scores`, by sample), its rank (`ranks`, 0 the
  best) and the samples `kept`: the `keep` best (0: all), best first. Ties keep sample
  order, so the ranking is a function of the scores alone."""
  texts = [p for p, x in zip(prompts, images) for _ in range(len(x))]
  scores = np.asarray(scorer.scores(np.concatenate(images), texts), np.float64)
  out, start = [], 0
  for x in images:
    row = scores[start:start + len(x)]
    start += len(x)
    order = rerank.rank(row)
    ranks = np.empty(len(order), np.int64)
    ranks[order] = np.arange(len(order))
    out.append(dict(scores=[round(float(v), 6) for v in row], ranks=ranks.tolist(),
                    kept=order[:keep or len(order)].tolist()))
  return out


def _name_files(report: dict, upsampler) -> None:
  """Each prompt's file names: `files` (the kept samples, in sample order), `grid`, and with
  a reranker `ranked` (the kept files, best first) and with an upsampler `upsampled`
  (beside `files`, the same order)."""
  for entry in report["prompts"]:
    i, kept = entry["index"], entry["kept"]
    name = lambda s, suffix="": f"{i:04d}_{s:02d}{suffix}.png"
    entry["files"] = [name(s) for s in sorted(kept)]
    entry["grid"] = f"{i:04d}_grid.png"
    if "scores" in entry:
      entry["ranked"] = [name(s) for s in kept]
    if upsampler is not None:
      entry["upsampled"] = [name(s, f"_x{upsampler.scale}") for s in sorted(kept)]


def _write(out: epath.Path, report: dict, images, upsampled=None) -> None:
  out.mkdir(parents=True, exist_ok=True)

  def save(name, pixels):
    with records.atomic_output(out / name) as f:  # never a cut-off PNG under a final name
      Image.fromarray(pixels).save(f, format="PNG")

  for j, (entry, pictures) in enumerate(zip(report["prompts"], images)):
    kept = sorted(entry["kept"])
    for name, picture in zip(entry["files"], pictures[kept]):
      save(name, picture)
    # The grid shows the kept samples best first when they were ranked.
    save(entry["grid"], grid(pictures[entry["kept"]]))
    if upsampled is not None:
      for name, picture in zip(entry["upsampled"], upsampled[j]):
        save(name, picture)
  records.atomic_write_text(out / "samples.json", json.dumps(report, indent=1) + "\n")


def check_out(out) -> None:
  """A bucket for `out` that is missing or unreachable is said before anything is loaded."""
  try:
    buckets.check_bucket(out)
  except records.DataError as e:
    raise SampleError(f"--out {e}") from None
