"""Parti 20B (16 encoder + 64 decoder layers, d_model 4096, MLP 16384, 64 heads).

  python -m parti_jax.inspect --config configs/parti_20b.py --num_devices 256
  python -m parti_jax.aot --config configs/parti_20b.py --topology v4-512 \
      --config.grad_accum_steps=8 --config.model.remat=qkv_up
  launch/tpu_pod.sh ... configs/parti_20b.py gs://BUCKET/RUN v4-512 -- (the same overrides)

About 20.5B parameters. The paper used 16-stage pipelines x 64-way data parallel on 1024 TPU
v4 chips; here the same global batch of 8192 is sharded with FSDP over the rest of the devices
and tensor=8, with sequence parallelism and, by default, full rematerialisation. It fits 256
v4 chips (v4-512) with remat qkv_up in 8 micro-batches: 30.3 GiB of 32 per chip with this
mesh, (1, 32, 8) (the command above), 29.7 with (1, 64, 4); plans for v4-1024, v5p-256,
v6e-256 and v5e-256 in docs/scaling.md.
"""

from parti_jax import config as common


def get_config():
  c = common.base()
  c.model.update(encoder_layers=16, decoder_layers=64, d_model=4096, mlp_dim=16384, num_heads=64)
  c.model.remat = "full"
  c.mesh.update(data=1, fsdp=-1, tensor=8)
  return c
