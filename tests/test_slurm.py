"""launch/slurm.sh: the batch script it writes (--dry-run), what it hands to sbatch, its
refusals, and how the processes srun starts from it are found by JAX's SLURM detection."""

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


@pytest.mark.parametrize("args, message", [
    (["--nodes", "0", "configs/parti_tiny.py", "/w"], "--nodes must be a positive count"),
    (["--gpus-per-node", "x", "configs/parti_tiny.py", "/w"], "--gpus-per-node must be"),
    (["configs/nothing.py", "/w"], "CONFIG configs/nothing.py is not a file"),
])
def test_bad_input_is_refused_in_one_line(args, message):
  done = slurm(*args, check=False)
  assert done.returncode == 2 and message in done.stderr


def test_missing_positionals_print_the_help():
  done = slurm("configs/parti_tiny.py", check=False)
  assert done.returncode == 2 and "launch/slurm.sh [OPTIONS] CONFIG WORKDIR" in done.stderr


DETECT = """
import json
from jax._src import clusters
from parti_jax import distributed
expected = distributed.expected_processes()
cluster = distributed._jax_cluster()
address, count, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
    None, None, None, None, None, 10)
print(json.dumps(dict(expected=expected.processes, source=expected.source,
                      cluster=cluster.name, address=address, count=count, index=index,
                      local=list(local))))
"""


def test_jax_finds_every_task_of_the_job_and_its_gpu():
  """What srun sets in the tasks of `--nodes 2 --gpus-per-node 2` (on CPU: detection only,
  nothing joins): 4 processes, process i on GPU i mod 2, the first node coordinating."""
  found = []
  for procid in range(4):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI_"))}
    env.update(SLURM_JOB_ID="4242", SLURM_NTASKS="4", SLURM_STEP_NUM_TASKS="4",
               SLURM_NTASKS_PER_NODE="2", SLURM_STEP_NODELIST="gpu[07-08]",
               SLURM_NODELIST="gpu[07-08]", SLURM_PROCID=str(procid),
               SLURM_LOCALID=str(procid % 2), SLURM_NODEID=str(procid // 2),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", DETECT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    found.append(json.loads(done.stdout.strip().splitlines()[-1]))
  for procid, f in enumerate(found):
    assert f["cluster"] == "slurm" and f["expected"] == f["count"] == 4
    assert f["source"] == "SLURM_STEP_NUM_TASKS=4"
    assert f["index"] == procid and f["local"] == [procid % 2]
    assert f["address"].startswith("gpu07:")
