"""launch/slurm.sh: the batch script it writes (--dry-run), what it hands to sbatch, its
refusals, and how the processes srun starts from it are found by JAX's SLURM detection."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import ROOT

SCRIPT = ROOT / "launch" / "slurm.sh"
OVERRIDES = ["--config.global_batch_size=64", "--config.data.train=/shared/my tokens"]


def slurm(*args, env=None, check=True):
  return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=60, check=check, env=env)


def batch_script(*options):
  out = slurm("--dry-run", *options, "configs/parti_tiny.py", "/shared/runs/tiny", "--",
              *OVERRIDES).stdout
  script, _, submit = out.partition("# submit with:\n")
  assert submit.strip() == "sbatch"
  return script


def test_the_dry_run_prints_one_process_per_gpu_running_the_train_command():
  script = batch_script("--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                        "--time", "24:00:00", "--sbatch-flag=--exclusive")
  lines = script.splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
  for flag in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu",
               "--time=24:00:00", "--exclusive", "--job-name=parti"):
    assert flag in sbatch, (flag, sbatch)
  # SIGTERM before the limit by the config's checkpoint timeout (1800 s) + 300 s: time to save.
  assert "--signal=TERM@2100" in sbatch
  [srun] = [shlex.split(line) for line in lines if line.startswith("srun ")]
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=8"]
  assert srun[3:] == ["python3", "-m", "parti_jax.train", "--config=configs/parti_tiny.py",
                      "--workdir=/shared/runs/tiny", *OVERRIDES]
  assert "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in lines
  # The script is valid bash.
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_options_reach_the_script():
  script = batch_script("--job-name", "mine", "--python", "/opt/venv/bin/python",
                        "--xla-flags", "--xla_foo=1 --xla_bar=2", "--grace-period", "600",
                        "--cpus-per-gpu", "12")
  assert "#SBATCH --job-name=mine" in script and "--job-name=parti" not in script
  assert "#SBATCH --signal=TERM@600" in script and "#SBATCH --cpus-per-task=12" in script
  assert "export XLA_FLAGS=--xla_foo=1\\ --xla_bar=2" in script
  assert "srun --kill-on-bad-exit=1 --ntasks-per-node=8 /opt/venv/bin/python -m" in script


def test_a_process_per_node_drives_all_its_gpus():
  script = batch_script("--nodes", "4", "--gpus-per-node", "8", "--processes-per-node", "node",
                        "--cpus-per-gpu", "12")
  lines = script.splitlines()
  sbatch = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
  for flag in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
               "--cpus-per-task=96"):  # 12 cores for each of the process's 8 GPUs
    assert flag in sbatch, (flag, sbatch)
  [srun] = [shlex.split(line) for line in lines if line.startswith("srun ")]
  assert srun[:3] == ["srun", "--kill-on-bad-exit=1", "--ntasks-per-node=1"]
  assert srun[3:] == ["python3", "-m", "parti_jax.train", "--config=configs/parti_tiny.py",
                      "--workdir=/shared/runs/tiny", *OVERRIDES]
  subprocess.run(["bash", "-n"], input=script, text=True, check=True)
  # `gpu` is the default.
  assert batch_script("--processes-per-node", "gpu") == batch_script()


def test_the_script_submitted_is_the_one_printed(tmp_path):
  """A stand-in sbatch on PATH receives the batch script on its standard input."""
  fake = tmp_path / "bin" / "sbatch"
  fake.parent.mkdir()
  fake.write_text(f"#!/usr/bin/env bash\ncat > {tmp_path / 'submitted'}\n"
                  "echo 'Submitted batch job 4242'\n")
  fake.chmod(0o755)
  env = dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")
  done = slurm("--nodes", "2", "configs/parti_tiny.py", "/shared/runs/tiny", "--", *OVERRIDES,
               env=env)
  assert "Submitted batch job 4242" in done.stdout
  assert (tmp_path / "submitted").read_text() == batch_script("--nodes", "2")


def test_the_dry_run_prints_the_plan_for_the_whole_job():
  out = slurm("--dry-run", "--plan", "h200", "--nodes", "4", "configs/parti_tiny.py",
              "/shared/runs/tiny", "--", *OVERRIDES).stdout
  plan = out.split("# plan first with:\n")[1].splitlines()[0]
  # 4 nodes of 8: the planner's h200-32, compiled with the trainers' XLA flags.
  assert shlex.split(plan) == [
      "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true", "python3", "-m",
      "parti_jax.aot", "--config=configs/parti_tiny.py", "--topology=h200-32", *OVERRIDES]


def fake_sbatch(tmp_path):
  """A stand-in sbatch on PATH that keeps the batch script it is handed; the env to use."""
  fake = tmp_path / "bin" / "sbatch"
  fake.parent.mkdir()
  fake.write_text(f"#!/usr/bin/env bash\ncat > {tmp_path / 'submitted'}\n")
  fake.chmod(0o755)
  return dict(os.environ, PATH=f"{fake.parent}:{os.environ['PATH']}")


def test_a_plan_that_passes_submits_the_job(tmp_path):
  """The planner's exit 0 lets the job through (a stand-in for the Python that runs it
  records what it was asked; the real planner's verdicts are the next test's and
  tests/test_gpu_plan.py's)."""
  env = fake_sbatch(tmp_path)
  python = tmp_path / "python"
  python.write_text(f"#!/usr/bin/env bash\necho \"$*\" > {tmp_path / 'planned'}\n")
  python.chmod(0o755)
  done = slurm("--plan", "h100", "--nodes", "2", "--python", str(python),
               "configs/parti_tiny.py", "/shared/runs/tiny", env=env)
  assert (tmp_path / "planned").read_text().split() == [
      "-m", "parti_jax.aot", "--config=configs/parti_tiny.py", "--topology=h100-16"]
  assert done.returncode == 0 and (tmp_path / "submitted").exists()


@pytest.mark.skipif(importlib.util.find_spec("jax_plugins.xla_cuda13") is None
                    or importlib.util.find_spec("nvidia.cudnn") is None,
                    reason="JAX's CUDA plugin or cuDNN is not installed "
                    "(pip install -e '.[gpu_plan]')")
def test_a_job_the_planner_says_does_not_fit_is_not_submitted(tmp_path):
  """The real planner compiles the tiny step for one H100 here; with almost none of the
  card for JAX (XLA_CLIENT_MEM_FRACTION, which sbatch would pass on) it does not fit, and
  nothing reaches sbatch."""
  env = dict(fake_sbatch(tmp_path), XLA_CLIENT_MEM_FRACTION="0.000001")
  env.pop("XLA_PYTHON_CLIENT_MEM_FRACTION", None)
  done = subprocess.run(
      ["bash", str(SCRIPT), "--plan", "h100", "--gpus-per-node", "1", "--python",
       sys.executable, "configs/parti_tiny.py", "/shared/runs/tiny"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
  assert not (tmp_path / "submitted").exists()
  assert done.returncode == 1 and "verdict: does NOT fit" in done.stdout, done.stderr[-2000:]
  assert "the planner says the job cannot run on 1 x 1 h100 (exit 1); not submitted" in \
      done.stderr


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "configs/parti_tiny.py", "/w"], "--nodes must be a positive count"),
    (["--gpus-per-node", "x", "configs/parti_tiny.py", "/w"], "--gpus-per-node must be"),
    (["configs/nothing.py", "/w"], "CONFIG configs/nothing.py is not a file"),
    (["--processes-per-node", "host", "configs/parti_tiny.py", "/w"],
     "--processes-per-node must be gpu or node, not 'host'"),
    (["--cpus-per-gpu", "4x", "configs/parti_tiny.py", "/w"], "--cpus-per-gpu must be a"),
    (["--plan", "v100", "configs/parti_tiny.py", "/w"], "--plan must name a GPU the planner"),
    (["--plan", "h100", "--nodes", "2", "--gpus-per-node", "4", "configs/parti_tiny.py", "/w"],
     "--plan plans nodes of 8 GPUs (or one node of 1, 2 or 4), not 2 x 4"),
])
def test_bad_input_is_refused_in_one_line(args, message):
  done = slurm(*args, check=False)
  assert done.returncode == 2 and message in done.stderr


def test_missing_positionals_print_the_help():
  for words in (["configs/parti_tiny.py"], ["configs/parti_tiny.py", "/w", "extra"]):
    done = slurm(*words, check=False)
    assert done.returncode == 2 and "launch/slurm.sh [OPTIONS] CONFIG WORKDIR" in done.stderr


# What jax.distributed.initialize() would join with, given parti_jax.distributed's
# arguments: JAX's detection fills what they leave unset, unless they turn it off
# (jax/_src/distributed.py); a `local` of None leaves every GPU visible.
DETECT = """
import json
from jax._src import clusters
from parti_jax import distributed
expected = distributed.expected_processes()
cluster = distributed._jax_cluster()
args = distributed.initialize_args(cluster, 10)
given = [args.get(k) for k in ("coordinator_address", "num_processes", "process_id")] + [None]
if args.get("cluster_detection_method") == "deactivate":
  address, count, index, local = given
else:
  address, count, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      *given, args.get("cluster_detection_method"), 10)
print(json.dumps(dict(expected=expected.processes, source=expected.source,
                      cluster=cluster.name, address=address, count=count, index=index,
                      local=None if local is None else list(local))))
"""


def detect(**slurm_env) -> dict:
  """DETECT in a task of a fake srun step (on CPU: detection only, nothing joins)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
  env.update(SLURM_JOB_ID="4242", JAX_PLATFORMS="cpu", **slurm_env)
  done = subprocess.run([sys.executable, "-c", DETECT], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120, check=True)
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_jax_finds_every_task_of_the_job_and_its_gpu():
  """What srun sets in the tasks of `--nodes 2 --gpus-per-node 2`: 4 processes, process i
  on GPU i mod 2, the first node coordinating."""
  for procid in range(4):
    f = detect(SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4", SLURM_NTASKS_PER_NODE="2",
               SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE="2(x2)",
               SLURM_STEP_NODELIST="gpu[07-08]", SLURM_NODELIST="gpu[07-08]",
               SLURM_PROCID=str(procid), SLURM_LOCALID=str(procid % 2),
               SLURM_NODEID=str(procid // 2))
    assert f["cluster"] == "slurm" and f["expected"] == f["count"] == 4
    assert f["source"] == "SLURM_STEP_NUM_TASKS=4"
    assert f["index"] == procid and f["local"] == [procid % 2]
    assert f["address"].startswith("gpu07:")


def test_a_task_per_node_is_found_with_every_gpu_of_its_node():
  """What srun sets in the tasks of `--nodes 2 --processes-per-node node`: 2 processes,
  each SLURM_LOCALID 0, none restricted to GPU 0, at the address JAX would pick."""
  port = 4242 % 2**12 + (65535 - 2**12 + 1)  # JAX's port for SLURM_JOB_ID 4242
  for procid in range(2):
    f = detect(SLURM_NTASKS="2", SLURM_STEP_NUM_TASKS="2", SLURM_NTASKS_PER_NODE="1",
               SLURM_STEP_NUM_NODES="2", SLURM_STEP_TASKS_PER_NODE="1(x2)",
               SLURM_STEP_NODELIST="gpu[07-08]", SLURM_NODELIST="gpu[07-08]",
               SLURM_PROCID=str(procid), SLURM_LOCALID="0", SLURM_NODEID=str(procid))
    assert f["cluster"] == "slurm" and f["expected"] == f["count"] == 2
    assert f["index"] == procid and f["local"] is None
    assert f["address"] == f"gpu07:{port}"
