"""The demo's image tokenizer: 32 px shapes -> 8x8 codes from a codebook of 256.

  python -m parti_jax.train --config configs/demo_tokenizer.py --workdir runs/demo/tokenizer \
      --config.data.train=runs/demo/data/train --config.data.eval=runs/demo/data/validation

Stage 3 of `python -m parti_jax.demo`. The tiny ViT-VQGAN (width 64, 2 blocks per side) with
4x4 patches, so an object of the shapes dataset spans several codes, trained on L2 alone
(as Parti's decoder) with dead-code restarts. Its decoder sees the continuous latents for
the first 65% of the steps (`model.quantize_start`): quantized from the start, this model
learns codes for little more than a patch's mean color (25 dB: flat 4x4 blocks), which
loses the shapes. On the demo's data (objects 0.34 and 0.44 of the side on an 8 px lattice)
expect an evaluation PSNR of about 29 dB after 2000 steps, and the shapes evaluator to judge
88% of its reconstructions of validation renders right (three quarters with the smaller
objects of before, about half with those anywhere). A
codebook of 1024 reconstructs a little better but makes Parti's task much harder (its
samples' objects run on).
"""

from parti_jax import config as common


def get_config():
  c = common.vitvqgan_base()
  m = c.model
  m.update(resolution=32, patch_size=4, codebook_size=256, dtype="float32",
           logit_laplace=False, dead_code_restart_every=10, commitment=0.05)
  m.quantize_start = c.get_ref("num_train_steps") * 13 // 20
  m.dead_code_restart_until = c.get_ref("num_train_steps") * 4 // 5
  m.discriminator.update(channels=0)
  c.loss.update(adversarial=0.0, perceptual=0.0)
  for side in (m.encoder, m.decoder):
    side.update(d_model=64, num_heads=4, mlp_dim=256, layers=2)
  c.data.resolution = 32
  c.global_batch_size = 16
  c.num_train_steps = 2000
  c.optimizer.learning_rate = 1e-3
  c.schedule.update(warmup_steps=50, final_ratio=0.1)
  c.train.update(log_every=50, eval_every=500, checkpoint_every=250, eval_batch_size=64)
  return c
