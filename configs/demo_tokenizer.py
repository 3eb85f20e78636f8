"""The demo's image tokenizer: 32 px shapes -> 4x4 codes from a codebook of 1024.

  python -m parti_jax.train --config configs/demo_tokenizer.py --workdir runs/demo/tokenizer \
      --config.data.train=runs/demo/data/train --config.data.eval=runs/demo/data/validation

Stage 3 of `python -m parti_jax.demo`. A tiny ViT-VQGAN with 8x8 patches: the demo puts
objects on an 8 px lattice, so each patch shows at most one object, always the same quarter
of it, and an image is 16 codes, which makes Parti's sequences short (its steps cost half
those of 64 codes). The decoder is wider than the encoder (192 against 64): it turns each
code into 192 pixel values through one linear map, and at width 64 that map can only
produce a 64-dimensional family of patches, too few to keep a star's points apart from a
circle (27.7 dB, 66% of reconstructions judged right). Batch 128, because a dead-code
restart (`model.dead_code_restart_every`) replaces the entries no latent of one batch chose,
which needs many more latents per batch than codes in use (with the narrow decoder and 512
codes: 51% at batch 16, 64% at 128). Trained on L2 alone (as Parti's decoder); the decoder
sees the continuous latents for the first 65% of the steps (`model.quantize_start`):
quantized from the start, the narrow one scored 58% against 64%. Peak learning rate 3e-3:
at 1e-3 the evaluation PSNR after 1000 steps was 32.2 dB and the evaluator judged 93.8% of
the reconstructions right (most failures small stars drawn blurred into diamonds), at 2e-3
34.2 dB and 97.3%, at 3e-3 36.3 dB and 100% (99.8% with another seed), at 4e-3 36.9 dB and
97.0% (BENCHMARKS.md). On the demo's data expect an evaluation PSNR of about 36 dB after
1000 steps and nearly all reconstructions of validation renders judged right. It
reconstructs under half of the held-out renders: it learned its codes from the train
images, which show no red star. Layers run unrolled (`model.scan_unroll=2`): a step takes
9% less time than scanned on 2 cores.
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
