"""Evaluation of generated images: FID (`parti_jax.eval.fid`) on Inception-v3 features."""
