"""Test setup: 8 simulated CPU devices, so every sharding path really runs."""

import os

# Must happen before jax is imported anywhere; the README and .ci/run set it too.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and their subprocesses, which inherit this) compile the same tiny programs:
# JAX's persistent compilation cache compiles each once per machine.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/parti_jax_test_compilation_cache")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import importlib.util  # noqa: E402
import pathlib  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str):
  """A fresh copy of configs/NAME.py's get_config()."""
  spec = importlib.util.spec_from_file_location(name, ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.fixture(autouse=True, scope="session")
def _eight_devices():
  assert jax.device_count() == 8, (
      "the tests expect 8 simulated CPU devices: run them with "
      "XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(autouse=True, scope="session")
def _temporary_files_in_pytests_tree(tmp_path_factory):
  """Temporary files go under pytest's tree, which pytest prunes, not into /tmp: those of
  the tests' own process (gradio_client leaves an empty folder there for every file it
  downloads, hundreds a run) and, through TMPDIR, those of the commands the tests start
  (a test may look for what a command left in its temporary folder)."""
  import tempfile
  folder = str(tmp_path_factory.mktemp("tmp"))
  with pytest.MonkeyPatch.context() as patch:  # undone after the session
    patch.setattr(tempfile, "tempdir", folder)
    patch.setenv("TMPDIR", folder)
    yield


# The modules whose tests take longest (real multi-process training, the demo, benchmark
# commands, the tokenizer's GAN steps) run first. xdist hands tests out in collection order
# as workers free up: a two-minute test handed out last keeps the other worker idle for its
# whole length, as it did when these modules came last alphabetically.
RUN_FIRST = ("test_trainer.py", "test_demo.py", "test_benchmarks.py", "test_vqgan_losses.py",
             "test_vqgan.py", "test_faults.py", "test_buckets.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(RUN_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(RUN_FIRST)))  # stable: each
  # module's own order (and so its module-scoped fixtures' reuse) stays
