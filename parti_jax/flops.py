"""Peak FLOP/s of a device, the denominator of MFU (each task counts its own model FLOPs,
the numerator: `parti_jax.tasks`, `train_step_flops`)."""

import time

import jax
import jax.numpy as jnp
import numpy as np


# bf16 dense peak TFLOP/s per chip, by substring of jax's device_kind.
SPEC_PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "H100": 989.0, "H200": 989.0,
}


def cpu_matmul_peak_tflops(n: int = 2048, reps: int = 20) -> float:
  """Best float32 matrix-product throughput of this host, in TFLOP/s."""
  a = jax.device_put(jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), jnp.float32))
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * n ** 3 / best / 1e12


def spec_peak_tflops(device_kind: str) -> tuple[float, str] | None:
  """(bf16 peak TFLOP/s per chip, where it comes from) for a known accelerator, else None."""
  for name, peak in SPEC_PEAK_TFLOPS.items():
    if name in device_kind:
      return peak, f"bf16 spec of {name}"
  return None
