"""Parti 350M (12 encoder + 12 decoder layers, d_model 1024, MLP 4096, 16 heads).

The paper trained it purely data parallel. On a single host:
  python -m parti_jax.inspect --config configs/parti_350m.py
  python benchmarks/train_throughput.py --config configs/parti_350m.py \
      --config.global_batch_size=64 --steps 20
On a GPU the throughput benchmark runs it in bfloat16; see BENCHMARKS.md for figures.
About 377M parameters (the image embedding is shared with the output projection).
"""

from parti_jax import config as common


def get_config():
  c = common.base()
  c.model.update(encoder_layers=12, decoder_layers=12, d_model=1024, mlp_dim=4096, num_heads=16)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
