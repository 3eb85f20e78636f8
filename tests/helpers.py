"""Small shared pieces of the tests."""

import jax
import numpy as np

from parti_jax import sharding
from parti_jax.tasks import parti as parti_task


def random_batch(config, seed: int = 0, batch_size: int | None = None) -> dict:
  """Host numpy batch of random text (with padding) and image tokens."""
  m, rng = config.model, np.random.default_rng(seed)
  b = batch_size or config.global_batch_size
  text = rng.integers(1, m.text_vocab_size, (b, m.text_len)).astype(np.int32)
  lengths = rng.integers(1, m.text_len + 1, b)
  text[np.arange(m.text_len)[None, :] >= lengths[:, None]] = 0
  image = rng.integers(0, m.codebook_size, (b, m.image_grid ** 2)).astype(np.int32)
  return dict(text_tokens=text, image_tokens=image)


def saved_for_backward(capsys, **model) -> list[str]:
  """The residuals the tiny Parti's backward pass keeps (with `model` fields changed), as
  jax prints them."""
  from flax import nnx

  from conftest import load_config
  from parti_jax.models import parti as parti_model
  c = load_config("parti_tiny")
  c.model.update(model)
  graphdef, params = nnx.split(parti_model.Parti(c.model, rngs=nnx.Rngs(0)))
  b = random_batch(c, batch_size=2)
  loss = lambda p: nnx.merge(graphdef, p)(b["text_tokens"], b["image_tokens"]).sum()
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(loss, params)
  return capsys.readouterr().out.splitlines()


def whole_cache_copies(config, mesh, batch_size: int) -> tuple[list[str], int, int]:
  """Compiles the guided decode step of `config` on `mesh` (whatever devices it has, also
  compile-only ones): the instructions of the optimised program that copy a whole
  self-attention cache shard, the bytes the step's donated arguments share with its
  outputs, and the bytes of the self-attention caches per device."""
  from parti_jax import decoding
  step, (params, state) = decoding.decode_step_and_args(config, mesh, batch_size,
                                                        decoding.Settings())
  compiled = step.lower(params, state).compile()
  caches = [state.cache[name] for name in ("self_k", "self_v")]
  cache_bytes = sum(sharding.shard_bytes(c.shape, c.dtype, c.sharding) for c in caches)
  shard = caches[0].sharding.shard_shape(caches[0].shape)  # [layers, rows, length, heads, kv]
  hlo_type = {"float32": "f32", "bfloat16": "bf16"}[np.dtype(caches[0].dtype).name]
  whole = hlo_type + "[" + ",".join(map(str, shard)) + "]{"
  copies = [line.strip() for line in compiled.as_text().splitlines()
            if f"= {whole}" in line and (" copy(" in line or "copy-start(" in line)]
  return copies, compiled.memory_analysis().alias_size_in_bytes, cache_bytes


def setup_on(config, mesh_shape, num_devices) -> parti_task.Setup:
  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh_shape)))
  return parti_task.Setup(config, sharding.make_mesh(config, jax.devices()[:num_devices]))


def vitvqgan_run(workdir):
  """A tiny untrained ViT-VQGAN laid out as a run: config.json, checkpoints/0/state."""
  import orbax.checkpoint as ocp

  from conftest import load_config
  from parti_jax import checkpoints, runs
  from parti_jax.tasks import vitvqgan as vqgan_task
  config = load_config("vitvqgan_tiny")
  runs.write_config(workdir, config)
  setup = vqgan_task.Setup(config)
  # Random values of the right shapes: initializing the model compiles for ~20 s.
  rng = np.random.default_rng(5)
  params = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones(s.shape) if "scale" in jax.tree_util.keystr(path)
                       else rng.normal(size=s.shape) * 0.1).astype(s.dtype),
      setup.abstract_params)
  # Only the parameters: all that `checkpoints.load_params` reads of a trainer's state.
  ocp.PyTreeCheckpointer().save(checkpoints.absolute(workdir / "checkpoints" / "0" / "state"),
                                {"params": params})
  return setup, params
