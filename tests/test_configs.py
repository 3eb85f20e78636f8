"""Paper configs: sizes, the inspector, and refusal of bad combinations before compiling."""

import json
import subprocess
import sys

import pytest
from conftest import ROOT, load_config

from parti_jax import config as config_lib
from parti_jax import inspect as inspect_lib
from parti_jax.tasks import parti as parti_task


@pytest.mark.parametrize("name, expected", [
    ("parti_350m", 350e6), ("parti_750m", 750e6), ("parti_3b", 3e9), ("parti_20b", 20e9)])
def test_paper_configs_have_the_paper_sizes(name, expected):
  p = inspect_lib.plan(load_config(name), num_devices=8)
  assert abs(p["num_params"] / expected - 1) < 0.10, p["num_params"]


def test_inspect_json_for_20b_on_an_abstract_pod():
  out = subprocess.run(
      [sys.executable, "-m", "parti_jax.inspect", "--config", "configs/parti_20b.py",
       "--num_devices", "256", "--json", "--config.mesh.tensor=4"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  p = json.loads(out.strip().splitlines()[-1])
  assert p["mesh"] == {"data": 1, "fsdp": 64, "tensor": 4}
  # Parameters are float32 and fully sharded: each device holds 1/256 of them
  # (up to the few small ones that are only sharded over fsdp).
  assert p["param_bytes_per_device"] < 1.05 * p["num_params"] * 4 / 256
  up = next(r for r in p["params"] if r["name"] == "decoder/blocks/mlp/up/kernel")
  assert up["shape"] == [64, 4096, 16384]
  assert up["logical"] == ["layers", "embed", "mlp"]
  assert up["spec"] == [None, "fsdp", "tensor"]


def test_command_line_override_reaches_the_model():
  small = subprocess.run(
      [sys.executable, "-m", "parti_jax.inspect", "--config", "configs/parti_350m.py",
       "--json", "--num_devices", "1", "--config.model.decoder_layers=6"],
      cwd=ROOT, capture_output=True, text=True, check=True).stdout
  full = inspect_lib.plan(load_config("parti_350m"), num_devices=1)["num_params"]
  assert json.loads(small.strip().splitlines()[-1])["num_params"] < full


def _error(config, num_devices=8):
  with pytest.raises(config_lib.ConfigError) as e:
    parti_task.Setup(config) if num_devices is None else config_lib.check(config, num_devices)
  return str(e.value)


def test_heads_not_divisible_by_tensor_is_refused():
  c = load_config("parti_tiny")
  c.mesh.update(data=1, fsdp=1, tensor=8)  # 4 heads over 8
  msg = _error(c)
  assert "model.num_heads=4" in msg and "mesh.tensor=8" in msg


def test_mlp_not_divisible_by_tensor_is_refused():
  c = load_config("parti_tiny")
  c.mesh.update(data=1, fsdp=-1, tensor=4)
  c.model.mlp_dim = 250
  msg = _error(c)
  assert "model.mlp_dim=250" in msg and "mesh.tensor=4" in msg
  assert "num_heads" not in msg


def test_batch_not_divisible_by_batch_axes_is_refused():
  c = load_config("parti_tiny")
  c.mesh.update(data=2, fsdp=4, tensor=1)
  c.global_batch_size = 12
  msg = _error(c)
  assert "global_batch_size=12" in msg and "mesh.data=2 x mesh.fsdp=4" in msg


def test_batch_must_also_split_into_micro_batches():
  c = load_config("parti_tiny")
  c.mesh.update(data=8, fsdp=1, tensor=1)
  c.grad_accum_steps = 2  # 8 rows -> micro-batches of 4 over 8 batch shards
  assert "grad_accum_steps=2" in _error(c)


def test_mesh_larger_than_the_devices_is_refused():
  c = load_config("parti_tiny")
  c.mesh.update(data=4, fsdp=4, tensor=1)
  msg = _error(c)
  assert "mesh.data=4, mesh.fsdp=4, mesh.tensor=1" in msg and "8 are available" in msg


def test_setup_refuses_before_building_anything():
  c = load_config("parti_tiny")
  c.mesh.update(data=1, fsdp=1, tensor=8)
  assert "model.num_heads" in _error(c, num_devices=None)


def test_bad_choices_are_named():
  c = load_config("parti_tiny")
  c.model.remat = "sometimes"
  c.optimizer.name = "sgd"
  msg = _error(c)
  assert "model.remat='sometimes'" in msg and "optimizer.name='sgd'" in msg
