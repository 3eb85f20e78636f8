"""A tiny super-resolution upsampler for CPU runs, tests and the benchmark: x2, 32 -> 64 px.

  python -m parti_jax.data.shapes --out data/shapes64 --num 2000 --resolution 64 --lattice 16
  python -m parti_jax.train --config configs/superres_tiny.py --workdir runs/superres \
      --config.data.train=data/shapes64/train --config.data.eval=data/shapes64/validation
  python -m parti_jax.upsample --model runs/superres --images DIR --out OUT

Trains on random 32 px crops of the 64 px images (16 px inputs) and evaluates on the whole
images (32 px -> 64 px). 3 wide-activation blocks of 32 channels (expansion 4), float32;
L2 loss alone, without the adversary and the perceptual loss, to stay fast on a CPU
(`--config.loss.adversarial=0.1 --config.model.discriminator.channels=16` adds the former,
`--config.loss.perceptual=0.1 --config.loss.perceptual_weights=vgg16_lpips.npz` the latter).
226,028 parameters. The 300 steps of batch 16 took 69 to 73 s on a shared 2-core CPU; expect
eval/psnr_gain near +0.9 dB on held-out shapes (35.9 dB against bicubic's 35.0 on 256
validation images: docs/superres.md, benchmarks/superres.py).
"""

from parti_jax.tasks import superres


def get_config():
  c = superres.base_config()
  m = c.model
  m.update(channels=32, blocks=3, expansion=4, crop=32, dtype="float32")
  m.discriminator.update(channels=0, max_channels=64)
  c.loss.update(adversarial=0.0, adversarial_start=0, perceptual=0.0)
  c.data.resolution = 64
  c.global_batch_size = 16
  c.num_train_steps = 300
  c.optimizer.learning_rate = 1e-3
  c.schedule.update(warmup_steps=20, final_ratio=0.1)
  c.train.update(log_every=25, eval_every=100, checkpoint_every=100, eval_batch_size=64)
  return c
