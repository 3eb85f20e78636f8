"""A paper-scale contrastive reranker: a CoCa-Base-sized dual encoder (about 200M parameters).

  python -m parti_jax.train --config configs/contrastive_paper.py --workdir RUN \
      --config.data.train=IMAGE_SHARDS --config.data.eval=IMAGE_SHARDS \
      --config.data.spm_model=spm.model
  python -m parti_jax.inspect --config configs/contrastive_paper.py --num_devices 256
  python -m parti_jax.aot --config configs/contrastive_paper.py --topology v5p-256

Parti reranks its samples with CoCa; this is CoCa-Base's contrastive half (no captioning
decoder): a ViT-B/16 image tower at 256 px (12 blocks, 768 wide, 256 patches) and a text
tower of 12 Parti encoder blocks, 768 wide, over Parti's text input (16,000 SentencePiece
pieces, 128 tokens), projected into a 768-dimensional space. The softmax contrastive loss
over a global batch of 4,096 image-text pairs, every one a negative of every other
(`--config.loss.name=sigmoid` for SigLIP's pairwise loss); bfloat16 matmuls, float32
parameters, AdamW as CLIP trains (peak 5e-4, weight decay 0.2), 100k steps. Parameters are
sharded over fsdp, the batch over data and fsdp. `inspect` prints each parameter's layout
and bytes per device from shapes alone; `aot` compiles the train step for a TPU slice
through libtpu and says whether it fits (docs/scaling.md).
"""

from parti_jax.tasks import contrastive


def get_config():
  return contrastive.base_config()
