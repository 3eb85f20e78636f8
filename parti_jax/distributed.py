"""Joins this process to a multi-process JAX run when the environment asks for one.

Where the process count comes from, in this order:

- `launch/local.py` sets PARTI_COORDINATOR, PARTI_NUM_PROCESSES and PARTI_PROCESS_ID for
  processes on one machine; they are joined with exactly those values.
- Open MPI (OMPI_COMM_WORLD_SIZE), MPICH / Intel MPI (PMI_SIZE), SLURM (SLURM_STEP_NUM_TASKS,
  else SLURM_NTASKS) and Cloud TPU (the hosts in TPU_PROCESS_ADDRESSES or
  TPU_WORKER_HOSTNAMES, times MEGASCALE_NUM_SLICES for several slices) say how many
  processes were started. Where that is more than one, or on a Cloud TPU VM, the process
  joins through `jax.distributed.initialize()`, whose own cluster detection finds the
  coordinator and this process's index (SLURM under srun, Open MPI 4's mpirun, Cloud TPU
  VMs and GKE). Under srun JAX gives each task the one GPU of its SLURM_LOCALID (one
  task per GPU); in a step of one task per node (`launch/slurm.sh --processes-per-node
  node`) each process joins with JAX's detected values but drives all the GPUs SLURM gave
  its node. Where JAX detects nothing but JAX_COORDINATOR_ADDRESS (host:port of process 0)
  is set, the process joins there with the launcher's count and rank (OMPI_COMM_WORLD_RANK,
  PMI_RANK, SLURM_PROCID).

A process that cannot join, or joins a run of another size than its environment says,
raises DistributedError naming the variable and both counts: processes that silently ran
alone would each train on the same work directory and overwrite each other's checkpoints.

PARTI_SINGLE_PROCESS=1 opts out: every process runs alone, as if no launcher had started
it (independent runs, each with its own work directory). PARTI_INIT_TIMEOUT (seconds,
default 300) bounds the wait for the other processes; past it JAX aborts the process.
Without any of these variables, and off Cloud TPU, `initialize()` does nothing.
"""

import os
import sys
from typing import Mapping, NamedTuple

import jax

DEFAULT_TIMEOUT_S = 300  # JAX's own default: hosts of a pod can start minutes apart
# JAX's cluster environments that describe TPU slices (jax/_src/clusters/cloud_tpu_cluster.py).
_TPU_CLUSTERS = ("gketpu", "gcetpu")


class DistributedError(RuntimeError):
  """The environment says several processes, but this process is not in a run of that size."""


class Expected(NamedTuple):
  """How many processes the environment says were started, and who says so."""
  source: str  # the variable(s), e.g. "SLURM_NTASKS=4"
  processes: int
  rank_variable: str | None = None  # this process's index among them, if the launcher says
  multiple: bool = False  # only a multiple is known (TPU hosts of a slice, slices unknown)

  def matches(self, count: int) -> bool:
    return count == self.processes or (self.multiple and count % self.processes == 0)

  def says(self) -> str:
    many = f"a multiple of {self.processes}" if self.multiple else str(self.processes)
    return f"{self.source} says {many} processes"


# Launchers' (process count, process index) variables; the first one set is used.
_LAUNCHERS = (("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),  # Open MPI's mpirun
              ("PMI_SIZE", "PMI_RANK"),  # MPICH / Intel MPI (Hydra), srun --mpi=pmi2
              ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID"),  # srun: this job step's tasks
              ("SLURM_NTASKS", "SLURM_PROCID"))  # sbatch / salloc: the allocation's


def expected_processes(environ: Mapping[str, str] = os.environ) -> Expected | None:
  """What the environment says about the process count; None where it says nothing."""
  if environ.get("PARTI_COORDINATOR"):
    n = environ["PARTI_NUM_PROCESSES"]
    return Expected(f"PARTI_NUM_PROCESSES={n}", int(n), "PARTI_PROCESS_ID")
  for count, rank in _LAUNCHERS:
    if environ.get(count):
      return Expected(f"{count}={environ[count]}", int(environ[count]), rank)
  return _expected_tpu_processes(environ)


def _expected_tpu_processes(environ: Mapping[str, str]) -> Expected | None:
  """Hosts per slice (JAX reads TPU_PROCESS_ADDRESSES first) times the slices."""
  hosts_var = next((v for v in ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")
                    if v in environ), None)
  if hosts_var is None:
    return None
  hosts = [h for h in environ[hosts_var].split(",") if h.strip()]
  if not hosts:  # launch/tpu_pod.sh exports what the metadata server returned: nothing
    raise DistributedError(
        f"{hosts_var} is set but empty: the launcher could not list the slice's hosts (on a "
        "TPU VM it reads them from the metadata server, worker-network-endpoints), so this "
        "process cannot tell whether it is alone. Fix the launcher, unset the variable on a "
        "single host, or set PARTI_SINGLE_PROCESS=1 for independent runs.")
  source = f"{hosts_var} ({len(hosts)} host{'s' * (len(hosts) > 1)})"
  slices = environ.get("MEGASCALE_NUM_SLICES")
  if slices:
    return Expected(f"{source} x MEGASCALE_NUM_SLICES={slices}", len(hosts) * int(slices))
  # Several slices whose count JAX reads from the metadata server: a multiple of the hosts.
  return Expected(source, len(hosts), multiple="MEGASCALE_COORDINATOR_ADDRESS" in environ)


def initialize() -> None:
  """Call once, first thing, before any other JAX work."""
  if os.environ.get("PARTI_SINGLE_PROCESS", "") not in ("", "0") or \
      jax.distributed.is_initialized():
    return
  expected = expected_processes()
  timeout = int(os.environ.get("PARTI_INIT_TIMEOUT", DEFAULT_TIMEOUT_S))
  if os.environ.get("PARTI_COORDINATOR"):
    _use_gloo()
    jax.distributed.initialize(os.environ["PARTI_COORDINATOR"],
                               num_processes=expected.processes,
                               process_id=int(os.environ["PARTI_PROCESS_ID"]),
                               initialization_timeout=timeout)
  elif (expected and expected.processes > 1) or _on_cloud_tpu() or \
      "MEGASCALE_COORDINATOR_ADDRESS" in os.environ:
    _join_through_jax(expected, timeout)
  if expected is not None:
    check_process_count(expected, jax.process_count())


def check_process_count(expected: Expected, count: int, why: str = "") -> None:
  """Refuses a run whose size is not the one the environment says."""
  if not expected.matches(count):
    raise DistributedError(f"{expected.says()}, but this process joined a run of {count}"
                           f"{': ' + why if why else ''}")


def _join_through_jax(expected: Expected | None, timeout: int) -> None:
  """jax.distributed.initialize() where JAX's cluster detection knows this environment."""
  cluster = _jax_cluster()
  if cluster is None and expected is None:
    print("parti_jax.distributed: a Cloud TPU VM, but neither TPU_WORKER_HOSTNAMES nor the "
          "metadata server describes the slice: running as one process", file=sys.stderr)
    return
  if cluster is None:
    _join_at_jax_coordinator_address(expected, timeout)
    return
  if cluster.name not in _TPU_CLUSTERS and (expected is None or expected.processes <= 1):
    return  # a one-task SLURM step on a TPU VM, say: nothing to join
  # JAX aborts the process (it does not raise) when a join fails or times out, so the
  # count JAX would join is checked first, and what is about to happen is said.
  count, index = cluster.get_process_count(), cluster.get_process_id()
  if expected is not None and not expected.matches(count):
    raise DistributedError(f"{expected.says()}, but JAX's {cluster.name} cluster detection "
                           f"would join a run of {count}")
  _use_gloo()
  args = initialize_args(cluster, timeout)
  devices = ", this process driving all the node's GPUs (one SLURM task per node)" \
      if args.get("cluster_detection_method") == "deactivate" else ""
  _say(f"joining a run of {count} processes as process {index} through JAX's {cluster.name} "
       f"cluster detection{devices}", timeout)
  jax.distributed.initialize(**args)


def initialize_args(cluster, timeout: int) -> dict:
  """jax.distributed.initialize()'s arguments where JAX's `cluster` detection applies.

  JAX detects everything itself, but gives a SLURM task only the GPU of its SLURM_LOCALID:
  right for one task per GPU, and one GPU of eight for one task per node (every task there
  has SLURM_LOCALID 0). In a step of one task per node the detected address, count and index
  are passed with detection off instead, so JAX restricts no devices (JAX_LOCAL_DEVICE_IDS,
  if set, still does).
  """
  if cluster.name != "slurm" or not slurm_one_task_per_node(os.environ):
    return dict(initialization_timeout=timeout)
  # As JAX would choose them (jax/_src/distributed.py, jax/_src/clusters/cluster.py).
  address = os.environ.get("JAX_COORDINATOR_ADDRESS") or cluster.get_coordinator_address(
      timeout_secs=timeout, override_coordinator_port=os.environ.get("JAX_COORDINATOR_PORT"))
  return dict(coordinator_address=address, num_processes=cluster.get_process_count(),
              process_id=cluster.get_process_id(), cluster_detection_method="deactivate",
              initialization_timeout=timeout)


def slurm_one_task_per_node(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this srun step runs one task on each of its nodes: SLURM_STEP_TASKS_PER_NODE
  (`1`, `1(x4)`; `8(x4)` or `2,1` are more), else its task and node counts."""
  per_node = environ.get("SLURM_STEP_TASKS_PER_NODE")
  if per_node:
    return all(part.split("(")[0].strip() == "1" for part in per_node.split(","))
  tasks = environ.get("SLURM_STEP_NUM_TASKS")
  return bool(tasks) and tasks == environ.get("SLURM_STEP_NUM_NODES")


def _join_at_jax_coordinator_address(expected: Expected, timeout: int) -> None:
  """No cluster JAX knows (Open MPI 5, MPICH): the launcher's count and rank, if it gives
  both, at the coordinator the user names; otherwise a clear refusal."""
  rank = os.environ.get(expected.rank_variable or "", "")
  if not os.environ.get("JAX_COORDINATOR_ADDRESS") or not rank or expected.multiple:
    check_process_count(expected, 1, why=(
        "JAX's cluster detection does not recognise this environment (it knows SLURM job "
        "steps started by srun, Open MPI 4's mpirun, Cloud TPU VMs and GKE) and "
        "JAX_COORDINATOR_ADDRESS is not set. Start the processes with srun or mpirun, set "
        "JAX_COORDINATOR_ADDRESS=HOST:PORT of process 0 on every process, use "
        "launch/local.py on one machine, or set PARTI_SINGLE_PROCESS=1 for independent runs"))
    return  # one process expected after all
  _use_gloo()
  _say(f"joining a run of {expected.processes} processes as process {rank} "
       f"({expected.rank_variable}) at JAX_COORDINATOR_ADDRESS="
       f"{os.environ['JAX_COORDINATOR_ADDRESS']}", timeout)
  jax.distributed.initialize(num_processes=expected.processes, process_id=int(rank),
                             initialization_timeout=timeout)


def _jax_cluster():
  """The cluster environment `jax.distributed.initialize()` would pick here, or None.

  Mirrors JAX's own choice (jax/_src/clusters/cluster.py: the first registered, not
  opt-in environment that is present), so what it finds is what initialize() uses.
  """
  from jax._src import clusters  # JAX's cluster detection: no public API exposes it
  for cluster in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if cluster.opt_in_only_method:
      continue
    try:
      present = cluster.is_env_present()
    except Exception:  # pylint: disable=broad-except  # e.g. no metadata server to ask
      present = False
    if present:
      return cluster
  return None


def _on_cloud_tpu() -> bool:
  """A Cloud TPU VM (libtpu and TPU chips), as JAX decided when it was imported."""
  from jax._src import cloud_tpu_init
  return cloud_tpu_init.running_in_cloud_tpu_vm


def _use_gloo() -> None:
  # CPU processes talk through gloo; accelerators use their own collectives.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")


def _say(what: str, timeout: int) -> None:
  # Printed before the join: a failed or timed-out join aborts the process without a
  # Python exception, so this line is what explains the abort.
  print(f"parti_jax.distributed: {what}; waiting up to {timeout} s (PARTI_INIT_TIMEOUT) for "
        "the others. A DEADLINE_EXCEEDED abort means they did not all arrive.",
        file=sys.stderr, flush=True)


BARRIER_TIMEOUT_S = 3600  # as long as compiling a large model on one host may take
_barriers = 0


def barrier(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
  """Every process waits here for the others, through the coordination service.

  Before the first step: processes finish compiling minutes apart (several processes on one
  CPU, hosts of a pod under different load), and gloo gives the peers of a first collective
  30 s to arrive. A barrier of the coordination service waits as long as asked instead, and
  moves no data. Does nothing in a single process.
  """
  global _barriers
  if jax.process_count() == 1:
    return
  from orbax.checkpoint import multihost  # its barrier is the coordination service's
  _barriers += 1  # a barrier's key may be used once
  multihost.get_barrier_sync_fn()(key=f"parti_jax:{name}:{_barriers}",
                                  timeout_ms=timeout_s * 1000)
