"""The same numbers on one device and on a (2, 2, 2) mesh; state created sharded by the rules."""

import math

import jax
import numpy as np
import pytest
from conftest import load_config
from helpers import random_batch, setup_on
from jax.sharding import PartitionSpec as P

from parti_jax import config as config_lib
from parti_jax import sharding
from parti_jax.tasks import parti as parti_task


@pytest.fixture(scope="module")
def config():
  c = load_config("parti_tiny")
  c.model.dropout_rate = 0.1  # the dropout masks must not depend on the sharding either
  c.model.remat = "dots"
  c.optimizer.name = "adafactor"
  return c


def test_loss_and_grads_on_a_2x2x2_mesh_equal_one_device(config):
  batch = random_batch(config)
  results = []
  for shape, n in [((1, 1, 1), 1), ((2, 2, 2), 8)]:
    setup = setup_on(config, shape, n)
    params = setup.init_state().params
    key = jax.random.key(7)
    results.append(jax.device_get(parti_task.jit_loss_and_grads(setup)(params, batch, key)))
  (loss1, acc1, grads1), (loss8, acc8, grads8) = results
  # float32 sums in a different order across devices: agreement to ~1e-6 relative.
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  np.testing.assert_allclose(acc8, acc1)
  for g1, g8 in zip(jax.tree.leaves(grads1), jax.tree.leaves(grads8)):
    np.testing.assert_allclose(g8, g1, rtol=1e-4, atol=1e-6)


def test_train_steps_on_a_2x2x2_mesh_equal_one_device(config):
  batch = random_batch(config)
  finals = []
  for shape, n in [((1, 1, 1), 1), ((2, 2, 2), 8)]:
    setup = setup_on(config, shape, n)
    state, step = setup.init_state(), parti_task.jit_train_step(setup)
    for _ in range(3):
      state, metrics = step(state, batch)
    finals.append(jax.device_get((state.params, metrics)))
  (p1, m1), (p8, m8) = finals
  np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_state_is_created_sharded_as_the_rules_say(config):
  setup = setup_on(config, (2, 2, 2), 8)
  state = setup.init_state()
  flat_state = jax.tree_util.tree_leaves_with_path(state)
  flat_want = jax.tree.leaves(setup.state_shardings)
  assert len(flat_state) == len(flat_want)
  for (path, x), want in zip(flat_state, flat_want):
    assert x.sharding.is_equivalent_to(want, x.ndim), jax.tree_util.keystr(path)
    # No device holds more than its shard: the per-device buffer has the shard's shape.
    for shard in x.addressable_shards:
      assert shard.data.shape == want.shard_shape(x.shape), jax.tree_util.keystr(path)
  kernel = state.params["decoder"]["blocks"]["mlp"]["up"]["kernel"]
  assert kernel.sharding.spec == P(None, "fsdp", "tensor")
  assert kernel.addressable_shards[0].data.shape == (2, 32, 128)  # (2, 64, 256) / (1, 2, 2)


def _temporaries_per_device(config, decoder_layers: int, sequence_parallel: bool) -> int:
  """Bytes of temporaries per device of the compiled loss and gradients on a (2, 2, 2) mesh,
  under remat=full."""
  c = config.copy_and_resolve_references()
  c.model.update(remat="full", decoder_layers=decoder_layers,
                 sequence_parallel=sequence_parallel)
  setup = setup_on(c, (2, 2, 2), 8)
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), random_batch(c))
  lowered = parti_task.jit_loss_and_grads(setup).lower(setup.abstract_params, batch,
                                                         jax.random.key(0))
  return lowered.compile().memory_analysis().temp_size_in_bytes


def test_the_residual_stream_kept_for_the_backward_pass_is_split_over_tensor(config):
  """Sequence parallelism: under remat=full the backward pass keeps each layer's input, the
  residual stream. With its length split over tensor=2 (the default), a decoder layer adds
  about half the temporaries per device it adds with the stream whole on each shard."""
  assert config.model.sequence_parallel
  per_layer = {split: (_temporaries_per_device(config, 8, split)
                       - _temporaries_per_device(config, 2, split)) / 6
               for split in (True, False)}
  assert per_layer[False] > 0
  assert per_layer[True] <= 0.6 * per_layer[False], per_layer


@pytest.mark.parametrize("name, shape", [("parti_350m", (2, 2, 2)), ("parti_3b", (1, 2, 4))])
def test_every_large_parameter_and_statistic_is_sharded(name, shape):
  config = load_config(name)
  setup = setup_on(config, shape, 8)  # shapes only: nothing is allocated
  rules = sharding.rules_of(config)
  params = jax.tree_util.tree_leaves_with_path(setup.abstract_params)
  logical = jax.tree.leaves(setup.logical_specs, is_leaf=lambda s: isinstance(s, P))
  shardings = jax.tree.leaves(setup.state_shardings.params)
  checked = 0
  for (path, p), names, s in zip(params, logical, shardings):
    if math.prod(p.shape) <= 1_000_000:
      continue
    checked += 1
    assert s.spec == sharding.logical_to_mesh(names, rules), jax.tree_util.keystr(path)
    assert math.prod(s.shard_shape(p.shape)) < math.prod(p.shape), jax.tree_util.keystr(path)
  assert checked >= 10
  abstract_opt = jax.eval_shape(setup.tx.init, setup.abstract_params)
  for (path, x), s in zip(jax.tree_util.tree_leaves_with_path(abstract_opt),
                          jax.tree.leaves(setup.state_shardings.opt_state)):
    if math.prod(x.shape) > 1_000_000:
      assert math.prod(s.shard_shape(x.shape)) < math.prod(x.shape), jax.tree_util.keystr(path)


def test_place_global_batch_splits_the_rows_over_the_batch_axes(config):
  setup = setup_on(config, (2, 2, 2), 8)
  host = random_batch(config, seed=3, batch_size=8)
  placed = sharding.place_global_batch(setup.batch_sharding, host)
  for key, x in placed.items():
    np.testing.assert_array_equal(np.asarray(x), host[key])
    # data x fsdp = 4 shards of 2 rows, each on the 2 devices of the tensor axis
    rows = sorted({s.index[0].start for s in x.addressable_shards})
    assert rows == [0, 2, 4, 6] and len(x.addressable_shards) == 8


def _rows(*ranges) -> dict:
  """{process: its rows} from one (start, stop) per process."""
  return {p: list(range(*r)) for p, r in enumerate(ranges)}


def test_an_input_layout_with_replica_hosts_is_accepted():
  # 4 hosts, a tensor axis across pairs of them: two row sets, each read by 2 hosts.
  layout = sharding.check_input_layout(_rows((0, 4), (0, 4), (4, 8), (4, 8)), 8)
  assert layout == dict(hosts=4, rows_per_host=4, row_sets=2, hosts_per_row=2, valid=True)
  # One process on this machine's 8 devices reads the whole batch.
  config = load_config("parti_tiny")
  batch = sharding.batch_sharding(sharding.make_mesh(config), sharding.rules_of(config))
  layout = sharding.check_input_layout(sharding.rows_by_process(batch, 16), 16)
  assert (layout["hosts"], layout["rows_per_host"], layout["hosts_per_row"]) == (1, 16, 1)


def test_processes_with_overlapping_rows_each_read_theirs():
  layout = sharding.check_input_layout(_rows((0, 4), (2, 6), (4, 8)), 8)
  assert layout == dict(hosts=3, rows_per_host=4, row_sets=3, hosts_per_row=2, valid=True)


@pytest.mark.parametrize("rows, problem", [
    (_rows((0, 8), (0, 0)), r"processes \[1\] hold no rows"),
    (_rows((0, 4), (0, 4)), r"global_batch_size=8 is not covered.*rows \[4, 5, 6, 7\]"),
])
def test_an_input_layout_the_loader_cannot_feed_is_refused(rows, problem):
  with pytest.raises(config_lib.ConfigError, match=problem):
    sharding.check_input_layout(rows, 8)
