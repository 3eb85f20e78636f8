"""The demo's Parti model: shapes captions -> 4x4 image codes of configs/demo_tokenizer.py.

  python -m parti_jax.train --config configs/demo_parti.py --workdir runs/demo/parti \
      --config.data.train=runs/demo/tokens/train --config.data.eval=runs/demo/tokens/validation \
      --config.data.spm_model=runs/demo/spm.model

Stage 5 of `python -m parti_jax.demo`. Width 128, 3 encoder and 3 decoder blocks, 16 text
tokens (the demo's SentencePiece model: 128 BPE pieces, whole words), 16 image tokens from
1024 codes; 6000 steps of batch 16 take 3 to 6 minutes on 2 cores. The layers run unrolled
(`model.scan_unroll=3`): 55 ms a step against 81 scanned. On the demo's data expect a
validation loss of about 0.19 to 0.20 and nearly all validation prompts drawn right at
temperature 0.2 (98.8 to 99.8% of 2,000 prompts in four runs).

Peak learning rate 2e-3. At 3e-3 (the earlier default) a run either learned every word or
got stuck on one pair of words that fill the same slot, left and right or three and four:
three of five runs drew 88 to 92% of the prompts right, and which pair depended on Parti's
own initialization, not on the data. At 2e-3 all four runs (two datasets, two
initializations each, one of them a pair that had been stuck at 3e-3) learned every pair,
and the validation loss came out lower (0.188 to 0.202 against 0.197 to 0.219); a 500-step
warmup at 3e-3 also freed the stuck run (BENCHMARKS.md).

1-D rotary embeddings in the encoder (`model.text_rope`): "a red circle and a blue square"
and "a red square and a blue circle" hold the same words, and without them the model drew
the swapped scene for one in five two-object prompts. On the demo's data (train kinds
weighted 1:1:2:3, 5000 steps, 2000 validation prompts) 92.5% of prompts came out right with
them and 73.3% without (relations 91% against 38%); BENCHMARKS.md.

The choices below were measured with the demo's earlier tokenizer (8x8 codes of 4 px
patches, 256 codes; BENCHMARKS.md). 2-D rotary embeddings in the decoder
(`model.image_rope`): after 2200 steps the validation loss was 0.225 with them and 0.263
without (as low as 3500 steps without), and 33.5% of validation prompts came out right
against 28.5%. Learning rate: at 1e-3 the validation loss after 1200 steps was 2.06
against 1.67 at 3e-3 (1024 codes, objects anywhere), at 5e-3 it was higher than at 3e-3
after 2000 steps (0.213 against 0.207). Batch 16: in the same time on 2 cores, 2200 steps of 16
reached a validation loss of 0.187 against 0.207 for 1200 steps of 32, and 5000 steps of 8
scored 39.5% of validation prompts against 50.5% for 3000 of 16. Other splits of about the
same step time scored alike or worse: 1 encoder block for 3500 steps 44.5%, 6 encoder
blocks 45.5%; 2 encoder and 4 decoder blocks with 256-wide MLPs 59% against 58%.
Caption dropout 0.1 trains the unconditional input that classifier-free guidance needs.
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
