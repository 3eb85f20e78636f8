"""Analytic model FLOPs of a train step, the numerator of MFU.

Matmuls only (2*m*n*k each), attention scores and values included; causal
self-attention counts half its score/value work, as is customary, although the dense
mask computes all of it. A train step is 3x the forward (forward + backward).
"""

import ml_collections

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
