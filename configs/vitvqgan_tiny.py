"""A tiny ViT-VQGAN for CPU runs and tests: 32 px images -> 4x4 codes from a codebook of 64.

  python -m parti_jax.train --config configs/vitvqgan_tiny.py --workdir runs/vq \
      --config.data.train=data/shapes/train --config.data.eval=data/shapes/validation

Matches configs/parti_tiny.py (image_grid 4, codebook_size 64), so its codes can feed the
tiny Parti model. Width 64, 2 blocks per side, float32. Restarts dead codes every 10 steps for
the first 80% of the run (without, the codebook collapses to a few codes within ~100 steps).
Trains without the adversary and the perceptual loss, to stay fast on a CPU;
`--config.loss.adversarial=0.1 --config.model.discriminator.channels=16` adds the former,
`--config.loss.perceptual=0.1 --config.loss.perceptual_weights=vgg16_lpips.npz` the latter.
"""

from parti_jax import config as common


def get_config():
  c = common.vitvqgan_base()
  m = c.model
  m.update(resolution=32, patch_size=8, codebook_size=64, dtype="float32",
           dead_code_restart_every=10)
  m.discriminator.update(channels=0, max_channels=64)
  c.loss.update(adversarial=0.0, adversarial_start=0, perceptual=0.0)
  for side in (m.encoder, m.decoder):
    side.update(d_model=64, num_heads=4, mlp_dim=256, layers=2)
  c.data.resolution = 32
  c.global_batch_size = 16
  c.num_train_steps = 500
  m.dead_code_restart_until = c.get_ref("num_train_steps") * 4 // 5
  c.optimizer.learning_rate = 1e-3
  c.schedule.warmup_steps = 20
  c.train.update(log_every=10, eval_every=100, checkpoint_every=100)
  return c
