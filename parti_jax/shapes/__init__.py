"""The shapes domain: colored shapes on grey, captioned by a small grammar, as a dataset and
as a yardstick. `vocabulary` holds the words and their looks (palette, outlines, sizes);
`grammar` makes captions, parses them back and checks them against objects; `layout` places
objects (anywhere or on a lattice, relations that clearly hold, reading order); `scenes`
holds the `Spec`, the held-out compositions and the sampler of (scene, caption) pairs;
`render` draws a scene; `dataset` writes and reads the shard sets (the library behind
`python -m parti_jax.data.shapes`); and `judge` detects the shapes in an image and judges
them against a prompt (behind `python -m parti_jax.eval.shapes`).
"""
