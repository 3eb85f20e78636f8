"""Parti 3B (12 encoder + 36 decoder layers, d_model 2048, MLP 8192, 32 heads).

  python -m parti_jax.inspect --config configs/parti_3b.py
  python -m parti_jax.aot --config configs/parti_3b.py --topology v4-128 \
      --config.mesh.data=16 --config.mesh.fsdp=1 --config.mesh.tensor=4 \
      --config.grad_accum_steps=512 --config.model.remat=none

About 3.1B parameters. The paper split heads and MLP 4 ways (tensor parallel) and ran
128-way data parallel; the default mesh here is FSDP over the rest with tensor=4, which needs
at least 4 devices (`--config.mesh.tensor=1` for fewer). At the paper's global batch of 8192
the plan above fits v4-128 (25.2 GiB of 32 per chip); v5e-64 and v5p-64 in docs/scaling.md.
"""

from parti_jax import config as common


def get_config():
  c = common.base()
  c.model.update(encoder_layers=12, decoder_layers=36, d_model=2048, mlp_dim=8192, num_heads=32)
  c.model.remat = "dots"
  c.mesh.update(data=1, fsdp=-1, tensor=4)
  return c
