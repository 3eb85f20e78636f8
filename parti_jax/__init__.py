"""parti_jax: the Parti text-to-image system (ViT-VQGAN tokenizer + encoder-decoder) in JAX."""

__version__ = "0.1.0"
