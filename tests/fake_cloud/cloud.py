"""Fake gcloud, kubectl, xpk and docker for tests/test_launch.py, answering like the real ones.

Run as `python cloud.py TOOL ARGS...` by the shims FakeCloud puts on PATH. Everything lives in
the directory $FAKE_CLOUD:

  scenario.json  what the test scripted: the queued resource's states, slices and workers per
                 slice, workers that cannot be reached, the pods' exit codes, ...
  calls.jsonl    one line per call of a fake tool: {"tool", "argv", "t"}
  state.json     what the fakes remember between calls (queued resources, the JobSet)
  vm/NAME/slice-S/worker-W/
                 a TPU VM worker's home directory: `queued-resources ssh` runs its command
                 there with bash, with a metadata server (fake curl), sudo, uv and a TPU device
                 file of its own; `queued-resources scp` copies files into it.

xpk and kubectl share the JobSet that `xpk workload create` made: it restarts after a pod's
exit code only when that code is in what xpk's podFailurePolicy lets through (42, 127-255 and
--restart-on-exit-codes; xpk's commands/workload.py) and --max-restarts is not used up.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = pathlib.Path(os.environ["FAKE_CLOUD"])


def scenario() -> dict:
  path = ROOT / "scenario.json"
  return json.loads(path.read_text()) if path.exists() else {}


def load_state() -> dict:
  path = ROOT / "state.json"
  return json.loads(path.read_text()) if path.exists() else {"qr": {}}


def save_state(state: dict) -> None:
  (ROOT / "state.json").write_text(json.dumps(state))


def log_call(tool: str, argv: list[str], **extra) -> None:
  with open(ROOT / "calls.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps(dict(tool=tool, argv=argv, t=time.time(), **extra)) + "\n")


def flag(argv: list[str], name: str, default=None):
  """The value of --name=VALUE or --name VALUE (the last one given)."""
  found = default
  for i, word in enumerate(argv):
    if word.startswith(name + "="):
      found = word.split("=", 1)[1]
    elif word == name and i + 1 < len(argv):
      found = argv[i + 1]
  return found


def fail(message: str, code: int = 1) -> int:
  print(message, file=sys.stderr)
  return code


# --- gcloud -------------------------------------------------------------------------------

def gcloud(argv: list[str]) -> int:
  words = [w for w in argv if not w.startswith("-")]
  if words[:3] == ["config", "get-value", "project"]:
    print(scenario().get("project", "fake-project"))
    return 0
  if words[:3] == ["container", "clusters", "get-credentials"]:
    print(f"Fetching cluster endpoint and auth data.\nkubeconfig entry generated for {words[3]}.")
    return 0
  if words[:3] != ["compute", "tpus", "queued-resources"]:
    return fail(f"fake gcloud: unsupported command {argv}", 2)
  verb, rest = words[3], words[4:]
  handler = dict(create=qr_create, describe=qr_describe, delete=qr_delete, ssh=qr_ssh,
                 scp=qr_scp).get(verb)
  if handler is None:
    return fail(f"fake gcloud: unsupported queued-resources {verb}", 2)
  return handler(argv, rest)


def qr_create(argv, rest):
  name, state = rest[0], load_state()
  if name in state["qr"]:
    return fail(f"ERROR: (gcloud.compute.tpus.queued-resources.create) ALREADY_EXISTS: {name}")
  assert flag(argv, "--node-id") or flag(argv, "--node-prefix"), argv
  state["qr"][name] = dict(slices=int(flag(argv, "--node-count", 1)), describes=0)
  save_state(state)
  print(f"Create request issued for: [{name}]")
  return 0


def qr_describe(argv, rest):
  name, sc, state = rest[0], scenario(), load_state()
  if name not in state["qr"]:
    return fail(f"ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: {name}")
  assert flag(argv, "--format") == "value(state.state)", argv
  answers = sc.get("describe", ["ACTIVE"])
  qr = state["qr"][name]
  answer = answers[min(qr["describes"], len(answers) - 1)]
  qr["describes"] += 1
  save_state(state)
  if answer == "ERROR":
    return fail("ERROR: (gcloud.compute.tpus.queued-resources.describe) UNAVAILABLE: "
                "The service is currently unavailable.")
  print(answer)
  return 0


def qr_delete(argv, rest):
  state = load_state()
  state["qr"].pop(rest[0], None)
  save_state(state)
  return 0


def slice_count(name: str) -> int:
  qr = load_state()["qr"].get(name)
  return qr["slices"] if qr else scenario().get("slices", 1)


def selected_workers(argv, name):
  """(slice, worker) pairs of --node and --worker ("all" or an index)."""
  slices, hosts = slice_count(name), scenario().get("workers", 2)
  node, worker = flag(argv, "--node", "0"), flag(argv, "--worker", "0")
  return [(s, w) for s in range(slices) for w in range(hosts)
          if node in ("all", str(s)) and worker in ("all", str(w))]


def worker_home(name: str, s: int, w: int) -> pathlib.Path:
  """A worker's home directory, with its metadata server's answers and a TPU device file."""
  home = ROOT / "vm" / name / f"slice-{s}" / f"worker-{w}"
  meta = home / ".metadata"
  if not meta.exists():
    sc, slices = scenario(), slice_count(name)
    hosts = sc.get("workers", 2)
    meta.mkdir(parents=True)
    (home / "dev").mkdir()
    (home / "tmp").mkdir()
    (home / "dev" / "accel0").write_text("")
    (meta / "agent-worker-number").write_text(str(w))
    if sc.get("endpoints") == "hostnames":  # the newer format: host names only
      endpoints = [f"{name}-{s}-w-{i}" for i in range(hosts)]
    else:  # name:id:ip triples
      endpoints = [f"unknown:{i}:10.1.{s}.{i + 2}" for i in range(hosts)]
    (meta / "worker-network-endpoints").write_text(",".join(endpoints))
    tpu_env = [f"ACCELERATOR_TYPE: '{sc.get('accelerator', 'v5p-256')}'", "ZONE: 'us-east5-a'"]
    if slices > 1:  # what the TPU runtime writes for a multislice queued resource
      tpu_env += ["MEGASCALE_COORDINATOR_ADDRESS: '10.1.0.2:8080'",
                  f"MEGASCALE_NUM_SLICES: '{slices}'", f"MEGASCALE_SLICE_ID: '{s}'",
                  "MEGASCALE_PORT: '8080'"]
    (meta / "tpu-env").write_text("\n".join(tpu_env) + "\n")
  return home


def worker_env(name: str, s: int, w: int, home: pathlib.Path) -> dict:
  env = dict(os.environ)
  env.update(HOME=str(home), PATH=f"{HERE / 'worker_bin'}:{os.environ['FAKE_SYSTEM_PATH']}",
             FAKE_METADATA_DIR=str(home / ".metadata"), FAKE_WORKER=f"{s}/{w}",
             PARTI_TPU_DEVICES=str(home / "dev" / "accel0"),
             PARTI_LIBTPU_LOCKFILE=str(home / "tmp" / "libtpu_lockfile"),
             PARTI_POLL_S="0.05", PARTI_START_CHECK_S="0.3", PARTI_LOG_UPLOAD_S="30")
  env.update(scenario().get("worker_env", {}))
  return env


def unreachable(s: int, w: int) -> bool:
  return f"{s}/{w}" in scenario().get("unreachable", [])


def qr_ssh(argv, rest):
  name, command, status = rest[0], flag(argv, "--command"), 0
  assert command, argv
  for s, w in selected_workers(argv, name):
    if unreachable(s, w):
      print(f"ssh: connect to host 10.1.{s}.{w + 2} port 22: Connection timed out",
            file=sys.stderr)
      status = status or 255
      continue
    home = worker_home(name, s, w)
    done = subprocess.run(["bash", "-c", command], cwd=home, env=worker_env(name, s, w, home),
                          check=False)
    status = status or done.returncode
  return status


def qr_scp(argv, rest):
  *sources, dest = rest
  name, _, path = dest.partition(":")
  for s, w in selected_workers(argv, name):
    if unreachable(s, w):
      continue
    home = worker_home(name, s, w)
    for source in sources:
      target = home / path if path else home / pathlib.Path(source).name
      target.write_bytes(pathlib.Path(source).read_bytes())
  return 0


# --- xpk and kubectl -----------------------------------------------------------------------

def xpk_restart_codes(argv) -> list[int]:
  """Exit codes after which xpk's podFailurePolicy lets the JobSet restart."""
  codes = [42, *range(127, 256)]
  for item in (flag(argv, "--restart-on-exit-codes") or "").split(","):
    item = item.strip()
    if "-" in item:
      first, last = map(int, item.split("-"))
      codes += range(first, last + 1)
    elif item:
      codes.append(int(item))
  return sorted(set(codes))


def xpk(argv: list[str]) -> int:
  state = load_state()
  if argv[:2] == ["workload", "create"]:
    state["jobset"] = dict(
        name=flag(argv, "--workload"), slices=int(flag(argv, "--num-slices", 1)),
        hosts=scenario().get("workers", 2), max_restarts=int(flag(argv, "--max-restarts", 0)),
        restart_codes=xpk_restart_codes(argv), restarts=0, attempt=0, polls=0, terminal="")
  elif argv[:2] == ["workload", "delete"]:
    state.pop("jobset", None)
  elif argv[:2] not in (["cluster", "create"], ["cluster", "delete"]):
    return fail(f"fake xpk: unsupported command {argv}", 2)
  save_state(state)
  return 0


def pods(js: dict, selector: str) -> list[str]:
  """The JobSet's pods of this attempt that match a label selector."""
  labels = dict(kv.split("=", 1) for kv in selector.split(","))
  assert labels.pop("jobset.sigs.k8s.io/jobset-name") == js["name"], selector
  found = []
  for s in range(js["slices"]):
    for h in range(js["hosts"]):
      have = {"jobset.sigs.k8s.io/job-index": str(s),
              "batch.kubernetes.io/job-completion-index": str(h),
              "jobset.sigs.k8s.io/restart-attempt": str(js["restarts"])}
      if all(have.get(k) == v for k, v in labels.items()):
        found.append(f"{js['name']}-slice-job-{s}-{h}-a{js['attempt']}")
  return found


def kubectl(argv: list[str]) -> int:
  state, sc = load_state(), scenario()
  js = state.get("jobset")
  output = flag(argv, "--output") or flag(argv, "-o") or ""
  if argv[:2] == ["get", "jobset"]:
    if js is None or argv[2] != js["name"]:
      return fail(f'Error from server (NotFound): jobsets.jobset.x-k8s.io "{argv[2]}" not found')
    if output == "jsonpath={.status.restarts}/{.status.terminalState}":
      # status.restarts is left out while it is 0
      print(f"{js['restarts'] or ''}/{js['terminal']}", end="")
    elif output == ("jsonpath={.spec.replicatedJobs[0].replicas} "
                    "{.spec.replicatedJobs[0].template.spec.parallelism}"):
      print(f"{js['slices']} {js['hosts']}", end="")
    else:
      return fail(f"fake kubectl: unsupported output {output}", 2)
    return 0
  if js is None:
    return fail("No resources found in default namespace.", 0)
  selector = flag(argv, "--selector")
  # Pods appear late: Kueue admits the workload and the Jobs create them after a while.
  appeared = js["polls"] >= sc.get("pods_late", 0)
  if argv[:2] == ["get", "pods"]:
    js["polls"] += 1
    save_state(state)
    if not appeared:
      return fail("No resources found in default namespace.", 0)
    for pod in pods(js, selector):
      print(f"pod/{pod}" if output == "name" else f"{pod} Running")
    return 0
  if argv[0] == "wait":
    if not appeared:  # what the real kubectl does when nothing matches yet
      return fail("error: no matching resources found")
    if sc.get("not_ready"):
      return fail(f"error: timed out waiting for the condition on pods/{pods(js, selector)[0]}")
    for pod in pods(js, selector):
      print(f"pod/{pod} condition met")
    return 0
  if argv[0] == "logs":
    return kubectl_logs(argv, state, js, sc, selector)
  return fail(f"fake kubectl: unsupported command {argv}", 2)


def kubectl_logs(argv, state, js, sc, selector) -> int:
  """Prints the attempt's log; when it ends, the pods exit and the JobSet restarts or ends."""
  assert "--follow" in argv, argv
  codes = sc.get("exit_codes", [0])
  code = codes[min(js["attempt"], len(codes) - 1)]
  for pod in pods(js, selector):
    lines = [f"{pod}: step {i}" for i in range(30)] + [f"{pod}: exit {code}"]
    tail = flag(argv, "--tail", "10")  # with a selector, kubectl shows the last 10 lines
    if tail != "-1":
      lines = lines[-int(tail):]
    print("\n".join(f"[{pod}] {line}" if "--prefix" in argv else line for line in lines))
  if code == 0:
    js["terminal"] = "Completed"
  elif code in js["restart_codes"] and js["restarts"] < js["max_restarts"]:
    js.update(restarts=js["restarts"] + 1, attempt=js["attempt"] + 1, polls=0)
  else:
    js["terminal"] = "Failed"
  save_state(state)
  return 0


def docker(argv: list[str]) -> int:
  if argv[0] == "build":
    context = pathlib.Path(argv[-1])
    assert (context / "Dockerfile").exists(), f"no Dockerfile in {context}"
    log_call("docker-context", sorted(p.name for p in context.iterdir()))
  return 0


def main() -> int:
  tool, argv = sys.argv[1], sys.argv[2:]
  log_call(tool, argv)
  return dict(gcloud=gcloud, kubectl=kubectl, xpk=xpk, docker=docker)[tool](argv)


if __name__ == "__main__":
  sys.exit(main())
