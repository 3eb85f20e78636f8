"""The int8 first moment (optimizer.momentum_dtype="int8"): the block quantisation, how
closely it follows a float32 momentum, its bytes per chip, checkpoints and exact resume."""

import importlib.util
import json
import shutil

import data_helpers
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import ROOT, load_config
from jax.sharding import NamedSharding, PartitionSpec as P

from parti_jax import config as config_lib
from parti_jax import inspect as inspect_lib
from parti_jax import optim, quantized
from parti_jax import sharding as sharding_lib
from parti_jax import train as trainer

from test_trainer import assert_same_params, final_params, logged


@pytest.mark.parametrize("shape, block", [((3, 300), 128), ((5,), 4), ((), 8), ((2, 4, 64), 64)])
def test_blocks_keep_every_entry_within_half_a_step(shape, block):
  # Random magnitudes over several orders; drawn with numpy and checked with numpy, so the
  # case compiles two programs (quantize, dequantize) rather than one per operation.
  rng = np.random.default_rng(1)
  x = (rng.normal(size=shape) * np.exp(rng.normal(size=shape))).astype(np.float32)
  quantize = jax.jit(quantized.quantize, static_argnums=1)
  values, scales = quantize(x, block)
  assert values.dtype == jnp.int8 and values.shape == x.shape
  assert scales.shape == quantized.scale_shape(shape, block)
  back = np.asarray(jax.jit(quantized.dequantize, static_argnums=2)(values, scales, block))
  values, scales = np.asarray(values), np.asarray(scales)
  # Each entry's step is its block's scale; the last block may be short (padded).
  step = np.repeat(scales, block, axis=-1)[..., :shape[-1] if shape else 1].reshape(shape)
  assert np.all(np.abs(back - x) <= step / 2 * (1 + 1e-6))
  assert np.max(np.abs(values)) == 127  # every block's largest entry maps to +-127
  zeros = quantize(np.zeros(shape, np.float32), block)
  assert not np.any(zeros[0]) and not np.any(zeros[1])


def _relative_errors(*txs, steps=300):
  """Per-step relative error (worst parameter) of each tx's updates against float32's EMA,
  one row per tx; all of them in one compiled scan (compiling is most of this test's time)."""
  params = {"w": jnp.zeros((64, 300)), "b": jnp.zeros((300,))}
  exact = optax.ema(0.9, debias=False)

  def step(states, i):
    *states, exact_state = states
    # Gradients of different magnitudes across a row, as blocks see them in a layer.
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.fold_in(jax.random.key(0), i),
                                                     p.shape) * (1 + jnp.arange(300) / 30), params)
    want, exact_state = exact.update(grads, exact_state)
    errors = []
    for j, tx in enumerate(txs):
      updates, states[j] = tx.update(grads, states[j])
      errors.append(jnp.max(jnp.stack([
          jnp.linalg.norm(updates[k] - want[k]) / jnp.linalg.norm(want[k]) for k in params])))
    return (*states, exact_state), jnp.stack(errors)

  states = (*(tx.init(params) for tx in txs), exact.init(params))
  _, errors = jax.jit(lambda s: jax.lax.scan(step, s, jnp.arange(steps)))(states)
  return np.asarray(errors).T


def test_int8_momentum_tracks_the_float32_momentum_over_many_steps():
  """Stated tolerance: over 300 steps the int8 momentum's updates stay within 3% (relative
  L2, worst parameter) of float32's, and within 1.5x the error of a bfloat16 momentum."""
  int8, bf16, coarse = _relative_errors(
      quantized.ema(0.9, 128), optax.ema(0.9, debias=False, accumulator_dtype=jnp.bfloat16),
      quantized.ema(0.9, 300))
  assert int8.max() < 0.03, int8.max()
  assert int8.mean() < 1.5 * bf16.mean(), (int8.mean(), bf16.mean())
  # Coarser blocks follow less closely: the block size is what is traded.
  assert coarse.mean() > int8.mean(), (coarse.mean(), int8.mean())


def _momentum_bytes(name, num_devices, **mesh):
  out = {}
  for dtype in ("bfloat16", "int8"):
    c = load_config(name)
    c.optimizer.momentum_dtype = dtype
    c.mesh.update(mesh)
    out[dtype] = inspect_lib.plan(c, num_devices)["momentum_bytes_per_device"]
  return out


def test_int8_momentum_cuts_the_momentum_bytes_per_chip_by_45_percent():
  """From the abstract state: 350M data-parallel on 16 chips."""
  b = _momentum_bytes("parti_350m", 16)
  assert b["int8"] <= 0.55 * b["bfloat16"], b


def test_int8_momentum_cut_holds_fully_sharded():
  """20B on 256 chips (v4-512), fsdp=32 x tensor=8: the scales must shard with the values."""
  b = _momentum_bytes("parti_20b", 256, fsdp=32, tensor=8)
  assert b["int8"] <= 0.55 * b["bfloat16"], b


def _scale_specs(params: dict, block: int) -> dict:
  """The PartitionSpec opt_state_shardings gives each parameter's block scales on a
  (fsdp=4, tensor=2) mesh; params maps a name to (shape, the parameter's spec)."""
  mesh = jax.sharding.AbstractMesh((4, 2), ("fsdp", "tensor"))
  tx = quantized.ema(0.9, block)
  abstract = {k: jax.ShapeDtypeStruct(shape, jnp.float32) for k, (shape, _) in params.items()}
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in params.items()}
  state = sharding_lib.opt_state_shardings(tx, jax.eval_shape(tx.init, abstract), abstract,
                                           shardings)
  assert state.ema_values == shardings  # the int8 values: their parameter's
  specs = {k: s.spec for k, s in state.ema_scales.items()}
  for spec in specs.values():  # a mesh axis is named once in a spec, or the spec is invalid
    named = [a for e in spec if e for a in ((e,) if isinstance(e, str) else e)]
    assert len(named) == len(set(named)), spec
  return specs


def test_block_scales_keep_their_parameters_spec_where_the_blocks_split_evenly():
  assert _scale_specs({
      "up": ((64, 1024), P("fsdp", "tensor")),       # 8 blocks over tensor's 2
      "down": ((16, 4, 1024), P("tensor", None, "fsdp")),  # 8 blocks over fsdp's 4
      "both": ((2, 1024), P(None, ("fsdp", "tensor"))),  # 8 blocks over all 8 devices
  }, block=128) == {
      "up": P("fsdp", "tensor"), "down": P("tensor", None, "fsdp"),
      "both": P(None, ("fsdp", "tensor"))}


def test_block_scales_move_an_axis_the_blocks_cannot_split_to_a_leading_dimension():
  assert _scale_specs({
      # 2 blocks: fsdp (4) moves to the first dimension it divides, joining tensor there.
      "joins": ((16, 256), P("tensor", "fsdp")),
      "skips": ((3, 8, 256), P(None, None, "fsdp")),  # 3 is not split 4 ways; 8 is
      # 4 blocks: fsdp stays with them; tensor (2) does not fit too, so it moves.
      "splits": ((6, 512), P(None, ("fsdp", "tensor"))),
  }, block=128) == {
      "joins": P(("tensor", "fsdp"), None), "skips": P(None, "fsdp", None),
      "splits": P("tensor", "fsdp")}


def test_block_scales_are_replicated_over_an_axis_that_fits_nowhere():
  assert _scale_specs({
      "odd": ((3, 256), P(None, "fsdp")),  # 2 blocks, and 3 rows: fsdp's 4 divides neither
      "bias": ((256,), P("fsdp")),         # no leading dimension to move to
      "short": ((4, 100), P("fsdp", "tensor")),  # 1 block (short): tensor cannot join 4 / 4
  }, block=128) == {"odd": P(None, None), "bias": P(None), "short": P("fsdp", None)}


def test_values_shard_like_their_parameters():
  from parti_jax.tasks import parti as parti_task
  c = load_config("parti_tiny")
  c.optimizer.update(name="adafactor", momentum_dtype="int8", momentum_block=16)
  setup = parti_task.Setup(c)
  state = setup.abstract_state()
  [values] = [s.ema_values for s in jax.tree.leaves(
      state.opt_state, is_leaf=lambda s: isinstance(s, quantized.QuantizedEmaState))
      if isinstance(s, quantized.QuantizedEmaState)]
  jax.tree.map(lambda v, p, sh: (v.dtype == jnp.int8 and v.shape == p.shape
                                 and v.sharding == sh) or pytest.fail(str(v)),
               values, setup.abstract_params, setup.param_shardings)


def test_int8_is_adafactors_and_refused_for_adamw():
  c = load_config("parti_tiny")
  c.optimizer.momentum_dtype = "int8"  # parti_tiny trains with AdamW
  with pytest.raises(config_lib.ConfigError, match="momentum_dtype='int8'.*adamw"):
    config_lib.check(c, 8)
  with pytest.raises(ValueError, match="int8"):
    optim.make(c)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return data_helpers.token_data(tmp_path_factory.mktemp("int8_data"), num_validation=8)


def int8_tiny(data):
  c = load_config("parti_tiny")
  c.data.update(train=str(data / "tokens" / "train"), eval="")
  c.optimizer.update(name="adafactor", momentum_dtype="int8", momentum_block=32,
                     learning_rate=1e-2, b2=0.96)
  c.num_train_steps = 6
  c.train.update(log_every=1, checkpoint_every=3, eval_every=0)
  return c


def test_a_run_with_int8_momentum_resumes_bitwise(data, tmp_path):
  trainer.train(int8_tiny(data), tmp_path / "whole")
  # A restart from the whole run's checkpoint of step 3, in a workdir of its own: the run
  # interrupted between checkpoints, without training its lost steps a second time.
  shutil.copytree(tmp_path / "whole" / "checkpoints" / "3",
                  tmp_path / "resumed" / "checkpoints" / "3")
  trainer.train(int8_tiny(data), tmp_path / "resumed")
  whole, resumed = logged(tmp_path / "whole"), logged(tmp_path / "resumed")
  assert sorted(whole) == list(range(1, 7)) and whole[6] < whole[1]
  assert resumed == {s: whole[s] for s in range(4, 7)}
  assert_same_params(final_params(tmp_path / "resumed", int8_tiny(data))[1],
                     final_params(tmp_path / "whole", int8_tiny(data))[1])


# ml_collections loads the config file with importlib's deprecated load_module().
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")
def test_the_inspector_prints_the_momentum_bytes(capsys):
  # Its command line in this process: tests/test_configs.py runs `python -m parti_jax.inspect`.
  inspect_lib.main(["--config", str(ROOT / "configs" / "parti_350m.py"), "--num_devices", "16",
                    "--json", "--config.optimizer.momentum_dtype=int8"])
  p = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # int8 values (1 byte each) plus a float32 scale per 128 entries, data-parallel: whole.
  assert p["momentum_bytes_per_device"] == pytest.approx(p["num_params"] * (1 + 4 / 128),
                                                         rel=0.02)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu is not installed (pip install -e '.[tpu]')")
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
def test_the_planner_compiles_and_counts_the_int8_momentum():
  from parti_jax import aot
  c = load_config("parti_tiny")
  c.optimizer.update(name="adafactor", momentum_dtype="int8", momentum_block=32)
  report = aot.plan(c, "v5e-8")
  assert report["fits"]
  # The planner's count is the inspector's, from the same shardings.
  assert report["momentum_bytes_per_device"] == \
      inspect_lib.plan(c, 8)["momentum_bytes_per_device"] > 0
