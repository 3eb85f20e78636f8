"""A d_model 512 Parti sized for throughput measurements on a CPU, in float32.

  python benchmarks/train_throughput.py --config configs/parti_cpu512.py --steps 5

4 + 4 layers, MLP 2048, 4 heads of 128, 64 text tokens, 16x16 image tokens, batch 8, no
dropout, remat "dots". Expect about 4 s per step on a 2-core machine (3.22 to 3.82 s
measured, median MFU 0.52; BENCHMARKS.md, which also has why heads of 128 and remat "dots":
the fastest settings measured on a 2-core CPU).
"""

from parti_jax import config as common


def get_config():
  c = common.base()
  c.model.update(
      encoder_layers=4, decoder_layers=4, d_model=512, mlp_dim=2048, num_heads=4,
      text_len=64, image_grid=16, dropout_rate=0.0, dtype="float32", remat="dots")
  c.global_batch_size = 8
  c.mesh.update(data=-1, fsdp=1, tensor=1)
  return c
