"""The demo's image tokenizer: 32 px shapes -> 4x4 codes from a codebook of 1024.

  python -m parti_jax.train --config configs/demo_tokenizer.py --workdir runs/demo/tokenizer \
      --config.data.train=runs/demo/data/train --config.data.eval=runs/demo/data/validation

Stage 3 of `python -m parti_jax.demo`. A tiny ViT-VQGAN with 8x8 patches, matching the demo's
8 px object lattice: an encoder of width 64 (2 blocks), a wider decoder of width 192 (1
block), layers unrolled; L2 loss alone; the decoder sees the continuous latents for the first
65% of the steps (`model.quantize_start`); dead codes restart every 10 steps; 1000 steps of
batch 128 at peak learning rate 3e-3. Expect an evaluation PSNR of about 36 dB and nearly all
reconstructions of validation renders judged right, but under half of the held-out renders
(its codes come from train images, which show no red star). The 1000 steps took 115 to 128 s
in the demo runs on a 2-core Intel machine, 254 to 265 s on a 2-core AMD one. Why these
values: BENCHMARKS.md, "How the demo configs' values were chosen".
"""

from parti_jax import config as common


def get_config():
  c = common.vitvqgan_base()
  m = c.model
  m.update(resolution=32, patch_size=8, codebook_size=1024, dtype="float32",
           logit_laplace=False, dead_code_restart_every=10, commitment=0.05, scan_unroll=2)
  m.quantize_start = c.get_ref("num_train_steps") * 13 // 20
  m.dead_code_restart_until = c.get_ref("num_train_steps") * 4 // 5
  m.discriminator.update(channels=0)
  c.loss.update(adversarial=0.0, perceptual=0.0)
  m.encoder.update(d_model=64, num_heads=4, mlp_dim=256, layers=2)
  m.decoder.update(d_model=192, num_heads=4, mlp_dim=384, layers=1)
  c.data.resolution = 32
  c.global_batch_size = 128
  c.num_train_steps = 1000
  c.optimizer.learning_rate = 3e-3
  c.schedule.update(warmup_steps=50, final_ratio=0.1)
  c.train.update(log_every=50, eval_every=500, checkpoint_every=250, eval_batch_size=64)
  return c
