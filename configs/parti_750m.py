"""Parti 750M (12 encoder + 36 decoder layers, d_model 1024, MLP 4096, 16 heads).

  python -m parti_jax.inspect --config configs/parti_750m.py
About 780M parameters; the paper trained it purely data parallel.
"""

from parti_jax import config as common


def get_config():
  c = common.base()
  c.model.update(encoder_layers=12, decoder_layers=36, d_model=1024, mlp_dim=4096, num_heads=16)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
