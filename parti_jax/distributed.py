"""Joins this process to a multi-process JAX run when the environment asks for one.

`launch/local.py` sets PARTI_COORDINATOR, PARTI_NUM_PROCESSES and PARTI_PROCESS_ID for
processes on one machine. Without them, `initialize()` does nothing on CPU and GPU
(one process), and on a TPU pod leaves discovery to `jax.distributed.initialize()`.
"""

import os

import jax


def initialize() -> None:
  """Call once, first thing, before any other JAX work."""
  coordinator = os.environ.get("PARTI_COORDINATOR")
  if coordinator:
    # CPU processes talk through gloo; accelerators use their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=int(os.environ["PARTI_NUM_PROCESSES"]),
                               process_id=int(os.environ["PARTI_PROCESS_ID"]))
  elif os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
    jax.distributed.initialize()  # TPU VM pods describe themselves to JAX
