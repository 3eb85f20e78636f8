"""Converters from weights users already have (PyTorch files) to the project's format.

The package never downloads weights. `python -m parti_jax.convert.vgg16` and
`python -m parti_jax.convert.inception` turn files a user provides into `.npz` files the
perceptual loss and the FID feature extractor load from a configured path.
"""
