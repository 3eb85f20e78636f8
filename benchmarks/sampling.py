"""Times sampling: cached decoding with and without guidance, and speculative Jacobi decoding.

  python benchmarks/sampling.py --config configs/parti_tiny.py          # random weights
  python benchmarks/sampling.py --workdir runs/tiny                     # a trained run
  python benchmarks/sampling.py --config configs/parti_350m.py --batch_sizes 64   # a GPU

The last line printed is one JSON object. For each batch size (1, 8, 64: those that fit)
and guidance off (scale 1; not with --nounguided) and on (`--guidance`, rows doubled),
token-by-token decoding
gives ms per decode step ((generate - prefill) / image tokens), image tokens/s and
images/s, next to the memory-bandwidth floor of a step: every weight and the whole KV
cache (self- and cross-attention) read once, at the chip's HBM bandwidth (the spec of a
known accelerator, measured on a CPU, or --hbm_gbps); next to the filled floor, the same
with only the self-attention cache filled so far, on average over a generation (which
the sampler's segments approach by reading only a prefix of the cache); and the bytes
XLA's cost analysis counts for one compiled whole-cache step against the floor's bytes.
Speculative Jacobi decoding runs `--sjd_images` images (0: none) in batches of the same
size and reports the forward passes each image took (a batch takes as many as its slowest
row; `row_forwards_per_image` is what each row needed on its own) and its wall time
relative to token-by-token decoding.

SJD forward counts only mean something for a trained model: pass `--workdir` (prompts
are then the captions of the run's token shards; with `--config` alone they are random
tokens). Weights are cast to the model's dtype for sampling, as `parti_jax.sample` does.
Tokens are drawn at temperature 1.0 (not the sampler's default), as in BENCHMARKS.md's figures.

`--trace DIR` also traces one guided generation of each batch size with jax.profiler
(DIR/b{batch}/trace) and writes its compiled program (DIR/b{batch}/hlo.txt), for
`python benchmarks/profile_summary.py --trace DIR/b64/trace --hlo DIR/b64/hlo.txt`: where a
decode step's device time goes.
"""

import json
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from parti_jax import cli, decoding, runs, sharding
from parti_jax import config as config_lib
from parti_jax import text as text_lib
from parti_jax.data import records
from parti_jax.tasks import parti

FLAGS = cli.Flags(__doc__)
FLAGS.config(help="Config file (random weights).")
FLAGS.string("workdir", None, "A trained run: its config and weights.")
FLAGS.strings("batch_sizes", ["1", "8", "64"],
              "Batch sizes (prompts), comma-separated or repeated")
FLAGS.float("guidance", 3.0, "The guidance scale of the guided runs.")
FLAGS.integer("sjd_window", 16, "Draft tokens per SJD forward.")
FLAGS.integer("sjd_images", 64, "Images SJD statistics are taken over (0: no SJD run).")
FLAGS.bool("unguided", True, "Also time guidance off (scale 1); --nounguided: the guided "
           "runs only, half the compiles where device time is short.")
FLAGS.integer("reps", 3, "Timed repetitions (median) after one warm-up.")
FLAGS.float("hbm_gbps", None, "HBM bandwidth per device in GB/s (overrides).")
FLAGS.string("trace", None, "Trace one guided generation per batch size into this directory.")
FLAGS.bool("verbose", False, "Log at INFO (orbax then logs every checkpoint read).")

# The figures in BENCHMARKS.md were drawn at temperature 1.0, the sampler's default then;
# kept so that they stay comparable (the default is now 0.2).
TEMPERATURE = 1.0

# HBM bandwidth per chip in GB/s, by substring of jax's device_kind (first match wins).
SPEC_HBM_GBPS = {
    "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0,
    "TPU v4": 1200.0, "TPU v5 lite": 819.0, "TPU v5e": 819.0, "TPU v5p": 2765.0,
    "TPU v5": 2765.0, "TPU v6 lite": 1640.0, "TPU v6e": 1640.0,
}


def hbm_gbps(flag_gbps: float | None) -> tuple[float, str]:
  if flag_gbps:
    return flag_gbps, "--hbm_gbps"
  kind = jax.devices()[0].device_kind
  for name, gbps in SPEC_HBM_GBPS.items():
    if name in kind:
      return gbps, f"spec of {name}"
  # A CPU: the best of a few reductions over a 256 MiB array (a read-bound job).
  x = jnp.ones((64, 1024, 1024), jnp.float32)
  total = jax.jit(jnp.sum)
  total(x).block_until_ready()
  best = min(_timed(lambda: total(x).block_until_ready()) for _ in range(5))
  return x.nbytes / best / 1e9, "measured: reduction over 256 MiB"


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def load_config(a):
  try:
    config = runs.read_config(a.workdir) if a.workdir else a.config
  except runs.RunError as e:
    sys.exit(f"error: {e}")
  if config is None:
    sys.exit("--config or --workdir is required")
  if config.get("task", "parti") != "parti":  # only Parti samples
    sys.exit(f"error: {a.workdir or a.config_file} is not a Parti model")
  return config


def prompt_tokens(config, count: int, trained: bool) -> np.ndarray:
  """[count, text_len] prompts: the run's captions, or random tokens without a run."""
  m = config.model
  if trained and config.data.train:
    rows = []
    for record in records.ShardSet.open(config.data.train).read_all():
      rows.append(text_lib.pad(record["text_tokens"][0], m.text_len))
      if len(rows) == count:
        return np.stack(rows)
  rng = np.random.default_rng(0)
  text = rng.integers(3, m.text_vocab_size, (count, m.text_len), dtype=np.int32)
  text[:, m.text_len // 2:] = text_lib.PAD_ID
  return text


def setup_for(config, batch_size: int, workdir: str | None):
  """The model on as many devices as divide the batch (batch over `data`): the run's
  weights, or random ones without a run."""
  devices = jax.devices()[:math.gcd(batch_size, jax.device_count())]
  if workdir:
    try:
      run, params = runs.load(workdir, task="parti", mesh_axes=dict(data=-1, fsdp=1, tensor=1),
                              devices=devices)
    except runs.RunError as e:
      sys.exit(f"error: {e}")
    setup, config = run.setup, run.config
  else:
    config = config.copy_and_resolve_references()
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    config.global_batch_size = len(devices)  # random weights need a training setup's init
    setup = parti.Setup(config, sharding.make_mesh(config, devices))
    params = setup.init_state().params
  if config.model.dtype != "float32":
    params = jax.jit(lambda p: decoding.cast_params(p, config.model.dtype))(params)
  return setup, params


def floor(setup, params, batch_size: int, guided: bool, bandwidth_gbps: float) -> dict:
  """The bytes one device reads in a decode step, at least, and the time that takes.

  Two floors: the whole KV cache read at every step (the figures since 2026-11-27), and
  the cache filled so far, which is all a step needs: step t of N reads t + 1 positions of
  the self-attention cache, (N + 1) / 2 on average, and the whole cross-attention cache.
  The sampler's segments (parti_jax.decoding) read between the two.
  """
  m, n = setup.config.model, setup.mesh.size
  weights = sum(x.nbytes for x in jax.tree.leaves(params))  # replicated: every device reads all
  rows = batch_size * (2 if guided else 1)
  itemsize = jnp.dtype(m.dtype).itemsize
  per_layer = 2 * rows * config_lib.head_dim(m) * m.num_heads * itemsize  # keys and values
  image = m.image_grid ** 2
  kv = m.decoder_layers * per_layer * (image + m.text_len) // n
  filled = m.decoder_layers * per_layer * ((image + 1) / 2 + m.text_len) / n
  ms, filled_ms = ((weights + b) / (bandwidth_gbps * 1e9) * 1e3 for b in (kv, filled))
  return dict(floor_ms_per_step=ms, weight_bytes=weights, kv_cache_bytes_per_device=kv,
              floor_arithmetic=f"(weights {weights / 1e9:.4g} GB + KV cache {kv / 1e9:.4g} GB) "
                               f"/ {bandwidth_gbps:.4g} GB/s = {ms:.4g} ms",
              filled_floor_ms_per_step=filled_ms, filled_kv_cache_bytes_per_device=filled,
              filled_floor_arithmetic=(
                  f"(weights {weights / 1e9:.4g} GB + filled KV cache {filled / 1e9:.4g} GB) "
                  f"/ {bandwidth_gbps:.4g} GB/s = {filled_ms:.4g} ms"))


def compiled(setup, params, settings: decoding.Settings, batch_size: int, step_bytes=True):
  """(generate, prefill) of a Sampler, compiled, the seconds generate took to compile, and
  the bytes XLA expects one decode step to access (if asked)."""
  sampler = decoding.Sampler(setup, settings, batch_size)
  _, text, keys = sampler.abstract_inputs()
  start = time.perf_counter()
  generate = sampler.generate.lower(params, text, keys).compile()
  compile_s = time.perf_counter() - start
  prefill = sampler.prefill.lower(params, text, keys).compile()
  if not step_bytes:
    return generate, prefill, compile_s, None
  # XLA's own count for one step, next to the floor: far above it means the compiled step
  # moves more than weights and cache once (a copied or converted cache, say).
  state = jax.eval_shape(sampler.prefill, params, text, keys)
  cost = sampler.step.lower(params, state).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return generate, prefill, compile_s, float((cost or {}).get("bytes accessed", float("nan")))


def median_s(reps: int, fn, *args) -> float:
  """Median seconds of `fn(*args)` over `reps` calls, after a warm-up call."""
  jax.block_until_ready(fn(*args))
  return float(np.median([_timed(lambda: jax.block_until_ready(fn(*args)))
                          for _ in range(reps)]))


def run_batch(a, config, batch_size: int, prompts: np.ndarray, bandwidth: float) -> list[dict]:
  setup, params = setup_for(config, batch_size, a.workdir)
  n = config.model.image_grid ** 2
  results = []
  for guidance in (1.0, a.guidance) if a.unguided else (a.guidance,):
    text = prompts[:batch_size]
    keys = decoding.row_keys(0, np.arange(batch_size), np.zeros(batch_size))
    generate, prefill, compile_s, step_bytes = compiled(
        setup, params, decoding.Settings(guidance=guidance, temperature=TEMPERATURE), batch_size)
    gen_s = median_s(a.reps, generate, params, text, keys)
    prefill_s = median_s(a.reps, prefill, params, text, keys)
    if a.trace and guidance != 1.0:
      trace(generate, (params, text, keys), epath.Path(a.trace) / f"b{batch_size}")
    step_ms = (gen_s - prefill_s) / n * 1e3
    entry = dict(batch=batch_size, guidance=guidance, devices=setup.mesh.size,
                 ms_per_step=step_ms, prefill_ms=prefill_s * 1e3, generate_ms=gen_s * 1e3,
                 image_tokens_per_s=batch_size * n / gen_s, images_per_s=batch_size / gen_s,
                 compile_s=compile_s)
    entry |= floor(setup, params, batch_size, guidance != 1.0, bandwidth)
    entry["step_over_floor"] = step_ms / entry["floor_ms_per_step"]
    entry["step_over_filled_floor"] = step_ms / entry["filled_floor_ms_per_step"]
    entry["xla_step_bytes"] = step_bytes
    entry["xla_step_bytes_over_floor_bytes"] = step_bytes / (
        entry["weight_bytes"] + entry["kv_cache_bytes_per_device"])

    if a.sjd_images > 0:
      entry["sjd"] = sjd_figures(a, setup, params, batch_size, guidance, prompts, prefill_s,
                                 gen_s)
    results.append(entry)
    print(json.dumps(entry), file=sys.stderr)
  return results


def sjd_figures(a, setup, params, batch_size: int, guidance: float, prompts: np.ndarray,
                prefill_s: float, gen_s: float) -> dict:
  """Speculative Jacobi decoding of `a.sjd_images` images in batches of `batch_size`, against
  token-by-token decoding's prefill and generation times (seconds)."""
  n = setup.config.model.image_grid ** 2
  settings = decoding.Settings(guidance=guidance, temperature=TEMPERATURE,
                               sjd_window=a.sjd_window)
  generate = compiled(setup, params, settings, batch_size, step_bytes=False)[0]
  warm_keys = decoding.row_keys(0, np.arange(batch_size), np.zeros(batch_size))
  jax.block_until_ready(generate(params, prompts[:batch_size], warm_keys))  # warm-up
  forwards, row_forwards, times = [], [], []
  for b in range(max(1, a.sjd_images // batch_size)):
    rows = np.arange(b * batch_size, (b + 1) * batch_size) % len(prompts)
    keys = decoding.row_keys(0, rows, np.zeros(batch_size))
    start = time.perf_counter()
    out = jax.device_get(generate(params, prompts[rows], keys))
    times.append(time.perf_counter() - start)
    forwards.append(int(out.forwards))
    row_forwards += list(out.done_at)
  per_image = float(np.mean(forwards))
  return dict(
      window=a.sjd_window, images=len(row_forwards), forwards_per_image=per_image,
      token_forwards_per_image=n, forward_ratio=n / per_image,
      row_forwards_per_image=float(np.mean(row_forwards)),
      wall_ms_per_batch=float(np.mean(times)) * 1e3,
      ms_per_forward=(float(np.mean(times)) - prefill_s) / per_image * 1e3,
      wall_vs_token=float(np.mean(times)) / gen_s)


def trace(generate, args, out: epath.Path) -> None:
  """One call of the compiled `generate` under jax.profiler.trace, and its program's text."""
  out.mkdir(parents=True, exist_ok=True)
  (out / "hlo.txt").write_text(generate.as_text())
  with jax.profiler.trace(str(out / "trace")):
    jax.block_until_ready(generate(*args))


def _is_out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def main(argv=None):
  a = FLAGS.parse(argv)
  if not a.verbose:  # orbax logs every read at INFO
    logging.set_verbosity(logging.WARNING)
  config = load_config(a)
  m = config.model
  bandwidth, bandwidth_source = hbm_gbps(a.hbm_gbps)
  # cli's repeated flag keeps "1,8" whole: split it here.
  batch_sizes = [int(b) for v in a.batch_sizes for b in v.split(",") if b]
  prompts = prompt_tokens(config, max(max(batch_sizes), a.sjd_images), bool(a.workdir))
  results = []
  for batch_size in batch_sizes:
    try:
      results += run_batch(a, config, batch_size, prompts, bandwidth)
    except Exception as e:  # pylint: disable=broad-except
      if not _is_out_of_memory(e):
        raise
      print(f"batch {batch_size} does not fit; skipped", file=sys.stderr)
  goals = {}
  for r in results:
    tag = f"b{r['batch']}_{'guided' if r['guidance'] != 1 else 'unguided'}"
    if "sjd" in r:
      goals[f"sjd_forward_ratio_{tag}"] = r["sjd"]["forward_ratio"]
    goals[f"step_over_floor_{tag}"] = r["step_over_floor"]
    goals[f"step_over_filled_floor_{tag}"] = r["step_over_filled_floor"]
  print(json.dumps(dict(
      device_kind=jax.devices()[0].device_kind, num_devices=jax.device_count(),
      weights=f"{a.workdir} (trained)" if a.workdir else "random init",
      hbm_gbps=bandwidth, hbm_source=bandwidth_source, dtype=m.dtype,
      d_model=m.d_model, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
      encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers, text_len=m.text_len,
      scan_unroll=m.get("scan_unroll", 1),
      image_tokens=m.image_grid ** 2, codebook=m.codebook_size, guidance=a.guidance,
      temperature=TEMPERATURE, goals=goals, runs=results)))


if __name__ == "__main__":
  cli.run(main)
