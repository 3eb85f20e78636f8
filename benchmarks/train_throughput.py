"""Times the Parti train step after compilation and reports throughput and MFU.

  python benchmarks/train_throughput.py --config configs/parti_cpu512.py --steps 5
  python benchmarks/train_throughput.py --config configs/parti_350m.py \
      --config.global_batch_size=64 --find_max_batch --steps 10     # on a GPU

The last line printed is one JSON object. MFU = analytic model FLOPs per second per
device (the task's `train_step_flops`, 3x forward) / peak per device. The peak on a CPU
is a float32 matrix product measured in this same run (shared between the host's simulated
devices); on GPU/TPU it is the chip's bf16 spec, looked up by device kind (or --peak_tflops).
Synthetic random tokens are used: the input pipeline is not part of this measurement.
`--hlo_out FILE` keeps the compiled step's HLO text, e.g. to check that a change leaves the
CPU's program as it was: diff two commits' files with the metadata left out (the `metadata=`
fields and the table of source files and stack frames), which differs between checkouts.
"""

import json
import sys
import time

from etils import epath
import jax
import numpy as np
import tqdm

from parti_jax import cli, distributed, flops, sharding, tasks
from parti_jax import config as config_lib
from parti_jax.models import layers

FLAGS = cli.Flags(__doc__)
FLAGS.config()
FLAGS.integer("steps", 10, "Timed steps (after one warm-up step).")
FLAGS.float("peak_tflops", None, "Peak TFLOP/s per device (overrides lookup).")
FLAGS.bool("find_max_batch", False,
           "Double the global batch until it no longer fits; time the largest.")
FLAGS.string("hlo_out", None,
             "Write the compiled step that was reported (the largest batch that fit) as HLO "
             "text to this path: to read it, or to diff two commits' programs.")


def peak_tflops_per_device(flag_peak: float | None,
                           cpu_peak_before: float | None) -> tuple[float, str]:
  if flag_peak:
    return flag_peak, "--peak_tflops"
  device = jax.devices()[0]
  if device.platform == "cpu":
    # A shared CPU's speed drifts: take the best of a measurement before and one after
    # the timed steps (the higher peak gives the lower, safer MFU). Simulated CPU
    # devices share the host's cores, so each gets an equal share.
    peak = max(cpu_peak_before, flops.cpu_matmul_peak_tflops())
    return peak / jax.local_device_count(), "measured float32 matmul (best of 2x20)"
  spec = flops.spec_peak_tflops(device.device_kind)
  if spec:
    return spec
  sys.exit(f"no peak TFLOP/s known for device kind {device.device_kind!r}; pass --peak_tflops")


def synthetic_batch(setup, batch_size: int) -> dict:
  """Random tokens: one global batch (seed 0), each process placing its own rows."""
  m, rng = setup.config.model, np.random.default_rng(0)
  text = rng.integers(1, m.text_vocab_size, (batch_size, m.text_len), dtype=np.int32)
  text[:, m.text_len // 2:] = 0  # half the text is padding, as with real captions
  image = rng.integers(0, m.codebook_size, (batch_size, m.image_grid ** 2), dtype=np.int32)
  return sharding.place_global_batch(setup.batch_sharding,
                                     dict(text_tokens=text, image_tokens=image))


def time_steps(config, steps: int, keep_hlo: bool = False) -> tuple[dict, str | None]:
  """(Its figures, the compiled step's HLO text if `keep_hlo`) for `steps` timed steps."""
  task = tasks.build(config, sharding.make_mesh(config))
  state = task.setup.init_state()
  batch = synthetic_batch(task.setup, config.global_batch_size)
  start = time.perf_counter()
  compiled = task.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - start
  state, metrics = compiled(state, batch)  # warm-up
  jax.block_until_ready(metrics)
  times = []
  for _ in tqdm.trange(steps, desc="train steps", file=sys.stderr, disable=None):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    sys.exit(f"the benchmark produced a non-finite loss ({loss}); the figures would be meaningless")
  return (dict(step_time_s=float(np.median(times)), compile_s=compile_s, loss=loss),
          compiled.as_text() if keep_hlo else None)


def log_trial(config, result: dict) -> None:
  """One line per timed batch size on stderr, so a search cut short still leaves figures."""
  if jax.process_index() == 0:
    tflops = (tasks.of(config).train_step_flops(config) / result["step_time_s"]
              / jax.device_count() / 1e12)
    print(json.dumps(dict(global_batch=config.global_batch_size,
                          model_tflops_per_s_per_device=tflops, **result)), file=sys.stderr)


def _is_out_of_memory(e: Exception) -> bool:
  return "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower()


def main(argv=None):
  a = FLAGS.parse(argv)
  distributed.initialize()
  config = a.config
  if config is None:
    sys.exit("--config is required")
  try:
    task = tasks.of(config)
    config_lib.check(config)
  except (tasks.UnknownTask, config_lib.ConfigError) as e:
    sys.exit(f"error: {e}")
  if config.get("task", "parti") != "parti":  # the synthetic batch and the report are Parti's
    sys.exit(f"error: {a.config_file} trains {config.task!r}; this benchmark times Parti "
             "(benchmarks/tokenizer_throughput.py times the image tokenizer)")

  on_cpu = jax.devices()[0].platform == "cpu"
  cpu_peak_before = flops.cpu_matmul_peak_tflops() if on_cpu and not a.peak_tflops else None
  result, hlo = time_steps(config, a.steps, keep_hlo=bool(a.hlo_out))
  log_trial(config, result)
  while a.find_max_batch:
    bigger = config.copy_and_resolve_references()
    bigger.global_batch_size *= 2
    try:
      trial, trial_hlo = time_steps(bigger, a.steps, keep_hlo=bool(a.hlo_out))
    except Exception as e:  # pylint: disable=broad-except
      if not _is_out_of_memory(e):
        raise
      print(f"global batch {bigger.global_batch_size} does not fit; "
            f"keeping {config.global_batch_size}", file=sys.stderr)
      break
    config, result, hlo = bigger, trial, trial_hlo
    log_trial(config, result)

  if jax.process_index() != 0:
    return  # every process timed the same global steps; process 0 reports
  if a.hlo_out:
    epath.Path(a.hlo_out).write_text(hlo)
  m, n = config.model, jax.device_count()
  peak, peak_source = peak_tflops_per_device(a.peak_tflops, cpu_peak_before)
  model_tflops = task.train_step_flops(config) / result["step_time_s"] / n / 1e12
  tokens = config.global_batch_size * task.tokens_per_example(config)
  print(json.dumps(dict(
      image_tokens_per_s=tokens / result["step_time_s"],
      model_tflops_per_s_per_device=model_tflops,
      peak_tflops_per_device=peak,
      peak_source=peak_source,
      mfu=model_tflops / peak,
      step_time_s=result["step_time_s"],
      compile_s=result["compile_s"],
      final_loss=result["loss"],
      device_kind=jax.devices()[0].device_kind,
      num_devices=n,
      global_batch=config.global_batch_size,
      grad_accum_steps=config.grad_accum_steps,
      dtype=m.dtype,
      remat=layers.resolve_remat(m.remat, jax.devices()[0]),  # "auto" as it ran here
      d_model=m.d_model, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
      encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
      scan_unroll=m.get("scan_unroll", 1),
      attention_impl=layers.attention_impl(m, jax.devices()[0]),  # "auto" as it ran here
      text_len=m.text_len, image_tokens=m.image_grid ** 2,
      text_vocab=m.text_vocab_size, image_vocab=m.codebook_size)))


if __name__ == "__main__":
  cli.run(main)
