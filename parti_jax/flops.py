"""Analytic model FLOPs of a train step (the numerator of MFU) and peaks (its denominator).

Matmuls only (2*m*n*k each), attention scores and values included; causal
self-attention counts half its score/value work, as is customary, although the dense
mask computes all of it. A train step is 3x the forward (forward + backward).
"""

import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from parti_jax import config as config_lib


def forward_flops_per_example(m: ml_collections.ConfigDict) -> float:
  d, f, t, n = m.d_model, m.mlp_dim, m.text_len, m.image_grid ** 2
  h = m.num_heads * config_lib.head_dim(m)  # width of all heads together
  vocab_out = config_lib.round_up(
      m.codebook_size + 1 if m.share_image_embedding else m.codebook_size)
  mlp = lambda length: 2 * length * 2 * d * f
  encoder = m.encoder_layers * (2 * t * d * h * 4 + 4 * t * t * h + mlp(t))
  decoder_self = 2 * n * d * h * 4 + 4 * n * n * h / 2
  decoder_cross = 2 * n * d * h * 2 + 2 * t * d * h * 2 + 4 * n * t * h
  decoder = m.decoder_layers * (decoder_self + decoder_cross + mlp(n))
  logits = 2 * n * d * vocab_out
  return encoder + decoder + logits


def train_step_flops(config: ml_collections.ConfigDict) -> float:
  """FLOPs of one optimizer step over the global batch (all micro-batches)."""
  return 3 * forward_flops_per_example(config.model) * config.global_batch_size


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
