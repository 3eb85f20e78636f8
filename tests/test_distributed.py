"""Joining a multi-process run from the launcher's environment, or refusing loudly.

Each case runs `distributed.initialize()` in fresh Python processes with a fake launcher
environment (SLURM, MPI, TPU, launch/local.py) and checks what they joined or why not.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from parti_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Prints the run this process joined: "joined P of N".
JOIN = ("from parti_jax import distributed; distributed.initialize(); import jax; "
        "print(f'joined {jax.process_index()} of {jax.process_count()}')")
# Also which GPUs JAX was told the process may use ("all", or the ids it was restricted to).
JOIN_SHOWING_GPUS = JOIN + "; print('gpus', jax.config.values['jax_cuda_visible_devices'])"
_LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "MEGASCALE_", "PARTI_", "JAX_COORD")


def _env(**variables) -> dict:
  """This process's environment without any launcher's variables, plus `variables`."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.update({k: str(v) for k, v in variables.items()})
  return env


def _start(tmp_path, code=JOIN, **variables) -> subprocess.Popen:
  # In tmp_path: a JAX abort may leave a core file behind.
  return subprocess.Popen([sys.executable, "-c", code], cwd=tmp_path, env=_env(**variables),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(tmp_path, **variables) -> tuple[subprocess.CompletedProcess, float]:
  start = time.perf_counter()
  p = _start(tmp_path, **variables)
  out, err = p.communicate(timeout=120)
  return subprocess.CompletedProcess(p.args, p.returncode, out, err), time.perf_counter() - start


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _slurm(procid: int, ntasks: int = 2, port: int | None = None, **more) -> dict:
  """What srun sets in each task (the variables JAX's SLURM detection reads)."""
  return dict(SLURM_JOB_ID=4242, SLURM_STEP_NODELIST="localhost", SLURM_NTASKS=ntasks,
              SLURM_PROCID=procid, SLURM_LOCALID=procid,
              JAX_COORDINATOR_PORT=port or _free_port(), **more)


# ----------------------------------------------------------------------------- what is expected

def test_each_launcher_says_how_many_processes():
  expect = distributed.expected_processes
  assert expect({}) is None
  assert expect(dict(SLURM_NTASKS="4")).processes == 4
  # srun's step count wins over the allocation's; MPI launchers' over SLURM's.
  assert expect(dict(SLURM_NTASKS="8", SLURM_STEP_NUM_TASKS="2")).source == \
      "SLURM_STEP_NUM_TASKS=2"
  assert expect(dict(SLURM_NTASKS="8", OMPI_COMM_WORLD_SIZE="2")).source == \
      "OMPI_COMM_WORLD_SIZE=2"
  assert expect(dict(PMI_SIZE="3", PMI_RANK="1")) == ("PMI_SIZE=3", 3, "PMI_RANK", False)
  # launch/local.py's variables are the whole story where they are set.
  assert expect(dict(PARTI_COORDINATOR="h:1", PARTI_NUM_PROCESSES="2", SLURM_NTASKS="4")) \
      .processes == 2


def test_tpu_hosts_times_slices():
  expect = distributed.expected_processes
  one_slice = expect(dict(TPU_WORKER_HOSTNAMES="h0,h1,h2,h3"))
  assert (one_slice.processes, one_slice.multiple) == (4, False)
  two = expect(dict(TPU_WORKER_HOSTNAMES="h0,h1,h2,h3", MEGASCALE_NUM_SLICES="2",
                    MEGASCALE_COORDINATOR_ADDRESS="h0"))
  assert two.processes == 8 and "MEGASCALE_NUM_SLICES=2" in two.source
  # JAX reads the slice count from the metadata server: only a multiple of 4 is known.
  unknown = expect(dict(TPU_WORKER_HOSTNAMES="h0,h1,h2,h3", MEGASCALE_COORDINATOR_ADDRESS="h0"))
  assert unknown.matches(12) and not unknown.matches(6)
  assert expect(dict(TPU_PROCESS_ADDRESSES="a:1,b:1", TPU_WORKER_HOSTNAMES="a")).processes == 2
  # launch/tpu_pod.sh exports what the metadata server gave; nothing is not "one host".
  with pytest.raises(distributed.DistributedError, match="TPU_WORKER_HOSTNAMES is set but empty"):
    expect(dict(TPU_WORKER_HOSTNAMES=""))


def test_the_count_check_names_the_variable_and_both_counts():
  with pytest.raises(distributed.DistributedError,
                     match="SLURM_NTASKS=4 says 4 processes, but this process joined a run of 1"):
    distributed.check_process_count(distributed.Expected("SLURM_NTASKS=4", 4), 1)
  distributed.check_process_count(distributed.Expected("SLURM_NTASKS=4", 4), 4)


def test_a_slurm_step_of_one_task_per_node_is_recognised():
  one_per_node = distributed.slurm_one_task_per_node
  for per_node in ("1", "1(x4)", "1(x2),1"):
    assert one_per_node(dict(SLURM_STEP_TASKS_PER_NODE=per_node)), per_node
  for per_node in ("8", "8(x4)", "2,1", "1(x3),2"):
    assert not one_per_node(dict(SLURM_STEP_TASKS_PER_NODE=per_node)), per_node
  # Without the per-node list: the step's task and node counts.
  assert one_per_node(dict(SLURM_STEP_NUM_TASKS="2", SLURM_STEP_NUM_NODES="2"))
  assert not one_per_node(dict(SLURM_STEP_NUM_TASKS="4", SLURM_STEP_NUM_NODES="2"))
  assert not one_per_node(dict(SLURM_NTASKS="2"))  # no srun step: nothing said
  assert not one_per_node({})


# ----------------------------------------------------------------------------- processes

def test_several_slurm_tasks_without_a_coordinator_fail_at_once(tmp_path):
  # sbatch --ntasks=2 running python directly (no srun): JAX cannot find a coordinator.
  done, seconds = _run(tmp_path, SLURM_NTASKS=2)
  assert done.returncode != 0
  assert "SLURM_NTASKS=2 says 2 processes, but this process joined a run of 1" in done.stderr
  assert "PARTI_SINGLE_PROCESS=1" in done.stderr and seconds < 60, (seconds, done.stderr)


def test_a_multi_host_tpu_slice_off_a_tpu_vm_is_refused(tmp_path):
  done, _ = _run(tmp_path, TPU_WORKER_HOSTNAMES="h0,h1", TPU_WORKER_ID=1)
  assert done.returncode != 0
  assert "TPU_WORKER_HOSTNAMES (2 hosts) says 2 processes, but this process joined a run of 1" \
      in done.stderr, done.stderr[-2000:]


def test_single_process_opts_out(tmp_path):
  done, _ = _run(tmp_path, SLURM_NTASKS=2, PARTI_SINGLE_PROCESS=1)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == "joined 0 of 1"


def test_slurm_tasks_join_through_jax_cluster_detection(tmp_path):
  port = _free_port()
  tasks = [_start(tmp_path, **_slurm(i, port=port)) for i in range(2)]
  outputs = [t.communicate(timeout=120) for t in tasks]
  assert [t.returncode for t in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
  assert sorted(out.strip() for out, _ in outputs) == ["joined 0 of 2", "joined 1 of 2"]
  assert "through JAX's slurm cluster detection" in outputs[0][1]


def test_slurm_tasks_one_per_node_join_with_every_gpu_of_their_node(tmp_path):
  # Two "nodes" on this machine, each task SLURM_LOCALID 0 (launch/slurm.sh
  # --processes-per-node node): JAX's detection alone would give each only GPU 0.
  port = _free_port()
  step = dict(SLURM_STEP_NUM_TASKS=2, SLURM_STEP_NUM_NODES=2, SLURM_STEP_TASKS_PER_NODE="1(x2)")
  tasks = [_start(tmp_path, JOIN_SHOWING_GPUS, **{**_slurm(i, port=port), "SLURM_LOCALID": 0},
                  **step) for i in range(2)]
  outputs = [t.communicate(timeout=120) for t in tasks]
  assert [t.returncode for t in tasks] == [0, 0], [err[-2000:] for _, err in outputs]
  assert sorted(out.split("\n")[0] for out, _ in outputs) == ["joined 0 of 2", "joined 1 of 2"]
  assert all(out.split("\n")[1] == "gpus all" for out, _ in outputs), outputs
  assert "driving all the node's GPUs (one SLURM task per node)" in outputs[0][1]


def test_a_step_whose_task_count_differs_from_jax_is_refused_before_joining(tmp_path):
  done, seconds = _run(tmp_path, **_slurm(0, SLURM_STEP_NUM_TASKS=3))
  assert done.returncode != 0
  assert ("SLURM_STEP_NUM_TASKS=3 says 3 processes, but JAX's slurm cluster detection would "
          "join a run of 2") in done.stderr, done.stderr[-2000:]
  assert seconds < 60


def test_a_task_whose_peers_never_come_gives_up_after_the_timeout(tmp_path):
  # JAX aborts the process rather than raise; the line printed before the join says why.
  done, seconds = _run(tmp_path, PARTI_INIT_TIMEOUT=2, **_slurm(1))
  assert done.returncode != 0 and seconds < 60, (seconds, done.stderr[-2000:])
  assert "joining a run of 2 processes as process 1" in done.stderr
  assert "DEADLINE_EXCEEDED" in done.stderr


def test_mpi_ranks_join_at_the_named_coordinator(tmp_path):
  # MPICH-style variables, which JAX does not detect, with JAX_COORDINATOR_ADDRESS set.
  address = f"127.0.0.1:{_free_port()}"
  ranks = [_start(tmp_path, PMI_SIZE=2, PMI_RANK=i, JAX_COORDINATOR_ADDRESS=address)
           for i in range(2)]
  outputs = [r.communicate(timeout=120) for r in ranks]
  assert [r.returncode for r in ranks] == [0, 0], [err[-2000:] for _, err in outputs]
  assert sorted(out.strip() for out, _ in outputs) == ["joined 0 of 2", "joined 1 of 2"]


def test_launch_local_still_joins_its_processes(tmp_path):
  # Its variables win over a SLURM allocation's (launch/local.py inside sbatch).
  done = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch/local.py"), "--num_processes", "2",
       "--devices_per_process", "1", "--", sys.executable, "-c", JOIN],
      cwd=tmp_path, env=_env(SLURM_NTASKS=4), capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout[-2000:]
  assert sorted(line for line in done.stdout.splitlines() if "joined" in line) == \
      ["[0] joined 0 of 2", "[1] joined 1 of 2"]
