"""The demo's Parti model: shapes captions -> 4x4 image codes of configs/demo_tokenizer.py.

  python -m parti_jax.train --config configs/demo_parti.py --workdir runs/demo/parti \
      --config.data.train=runs/demo/tokens/train --config.data.eval=runs/demo/tokens/validation \
      --config.data.spm_model=runs/demo/spm.model

Stage 5 of `python -m parti_jax.demo`. Width 128, 3 encoder and 3 decoder blocks run
unrolled, 1-D rotary embeddings in the encoder and 2-D in the decoder, 16 text tokens (the
demo's SentencePiece model: 128 BPE pieces, whole words), 16 image tokens from 1024 codes,
caption dropout 0.1 (the unconditional input classifier-free guidance needs); 6000 steps of
batch 16 at peak learning rate 2e-3. Expect 3 to 6 minutes on 2 cores, a validation loss of
about 0.19 to 0.20, and nearly all validation prompts drawn right at temperature 0.2 (98.8 to
99.8% of 2,000 prompts in four runs). Why these values: BENCHMARKS.md, "How the demo configs'
values were chosen".
"""

from parti_jax import config as common


def get_config():
  c = common.tiny_model(common.base())
  m = c.model
  m.update(text_vocab_size=128, text_len=16, image_grid=4, codebook_size=1024, d_model=128,
           num_heads=4, mlp_dim=512, encoder_layers=3, decoder_layers=3, image_rope=True,
           text_rope=True, scan_unroll=3)
  c.data.kind = "tokens"
  c.data.caption_dropout = 0.1
  c.global_batch_size = 16
  c.num_train_steps = 6000
  c.optimizer.learning_rate = 2e-3
  c.schedule.update(name="warmup_cosine", warmup_steps=100, final_ratio=0.05)
  c.train.update(log_every=50, eval_every=1000, checkpoint_every=500, eval_batch_size=64)
  return c
