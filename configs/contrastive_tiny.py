"""A tiny contrastive reranker (dual encoder) on the shapes data: the tests' and the demo's.

  python -m parti_jax.train --config configs/contrastive_tiny.py --workdir runs/reranker \
      --config.data.train=runs/demo/data/train --config.data.eval=runs/demo/data/validation \
      --config.data.spm_model=runs/demo/spm.model

Matches the demo's data (stages 1 and 2 of `python -m parti_jax.demo`): 32 px
shapes images, captions as ids of the demo's SentencePiece model (128 BPE pieces, 16 text
tokens). Text tower: 2 Parti encoder blocks; image tower: 2 blocks over 8x8 patches (the
demo's 8 px object lattice); both 64 wide, layers unrolled, projected to 64 dimensions;
float32; 0.23M parameters. The softmax contrastive loss over batches of 64
(`--config.loss.name=sigmoid` for SigLIP's), AdamW at peak learning rate 2e-3, 300 steps.
Expect about 60 s on a 2-core CPU (11 s of it compiling) and, on the demo's 400 validation
images in eval batches of 64, recall@1 of about 97% both ways and recall@5 of 100%
(docs/reranker.md).
"""

from parti_jax.tasks import contrastive

TOWER = dict(d_model=64, num_heads=4, mlp_dim=256, layers=2)


def get_config():
  c = contrastive.base_config()
  m = c.model
  m.update(text_vocab_size=128, text_len=16, resolution=32, patch_size=8, embed_dim=64,
           dtype="float32", scan_unroll=2)
  m.text.update(TOWER)
  m.image.update(TOWER)
  c.data.resolution = 32
  c.global_batch_size = 64
  c.num_train_steps = 300
  c.optimizer.update(learning_rate=2e-3, weight_decay=0.0)
  c.schedule.update(warmup_steps=50, final_ratio=0.05)
  c.train.update(log_every=50, eval_every=0, checkpoint_every=300, eval_batch_size=64)
  return c
