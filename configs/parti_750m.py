"""Parti 750M (12 encoder + 36 decoder layers, d_model 1024, MLP 4096, 16 heads).

  python -m parti_jax.inspect --config configs/parti_750m.py
  python -m parti_jax.aot --config configs/parti_750m.py --topology v6e-16 \
      --config.mesh.data=16 --config.grad_accum_steps=512

About 780M parameters; the paper trained it purely data parallel, as this config does. At the
paper's global batch of 8192 the plan above fits v6e-16 (27.1 GiB of 32 per chip); v5p-16 in
docs/scaling.md.
"""

from parti_jax import config as common


def get_config():
  c = common.base()
  c.model.update(encoder_layers=12, decoder_layers=36, d_model=1024, mlp_dim=4096, num_heads=16)
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
