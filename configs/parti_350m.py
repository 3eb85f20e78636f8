"""Parti 350M (12 encoder + 12 decoder layers, d_model 1024, MLP 4096, 16 heads).

The paper trained it purely data parallel, as this config does. On a single host:
  python -m parti_jax.inspect --config configs/parti_350m.py
  python benchmarks/train_throughput.py --config configs/parti_350m.py \
      --config.global_batch_size=64 --steps 20
About 377M parameters (the image embedding is shared with the output projection). On an
H200 it trains in bfloat16 at 338 TFLOP/s, MFU 0.34, at batch 64 with cuDNN attention and
remat `dots`, which the default `model.remat=auto` picks on GPUs (BENCHMARKS.md, 2026-12-04). At the paper's global batch of 8192 it fits v4-16 and v5e-16
(docs/scaling.md).
"""

from parti_jax import config as common


def get_config():
  c = common.base()
  c.model.update(encoder_layers=12, decoder_layers=12, d_model=1024, mlp_dim=4096, num_heads=16)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
