"""A stand-in for `python -m parti_jax.train` on a fake TPU VM worker.

Like the real trainer it holds the TPU (its device file, PARTI_TPU_DEVICES) while it runs, and
on SIGTERM it finishes, "saves a checkpoint" (waits save_s) and exits with 75. Scenario
(`trainer` in scenario.json): run_s (then exit 0), save_s, fail_on (workers "S/W" that exit
with 1 at once, as on an import error), ignore_sigterm. Every start and exit is appended to
$FAKE_CLOUD/trainers.jsonl with what the launcher gave it: argv, environment, open-file limit.
"""

import json
import os
import pathlib
import resource
import signal
import sys
import time

ROOT = pathlib.Path(os.environ["FAKE_CLOUD"])
WORKER = os.environ["FAKE_WORKER"]


def record(**fields) -> None:
  with open(ROOT / "trainers.jsonl", "a", encoding="utf-8") as f:
    f.write(json.dumps(dict(worker=WORKER, pid=os.getpid(), t=time.time(), **fields)) + "\n")


def main() -> int:
  scenario = json.loads((ROOT / "scenario.json").read_text()).get("trainer", {})
  env = {k: v for k, v in os.environ.items()
         if k.startswith(("TPU_WORKER", "MEGASCALE_", "PARTI_GCS_MOUNT"))}
  record(event="start", argv=sys.argv[1:], env=env, cwd=os.getcwd(),
         open_files=resource.getrlimit(resource.RLIMIT_NOFILE))
  if WORKER in scenario.get("fail_on", []):
    print("ImportError: the fake trainer cannot start on this worker", flush=True)
    record(event="exit", code=1)
    return 1
  tpu = open(os.environ["PARTI_TPU_DEVICES"])  # pylint: disable=consider-using-with

  def preempted(*_):
    print("SIGTERM: finishing the step, saving a checkpoint", flush=True)
    time.sleep(scenario.get("save_s", 0.3))
    print("checkpoint saved; exiting with 75", flush=True)
    record(event="exit", code=75)
    tpu.close()
    sys.exit(75)

  signal.signal(signal.SIGTERM, signal.SIG_IGN if scenario.get("ignore_sigterm") else preempted)
  deadline = time.time() + scenario.get("run_s", 1.0)
  step = 0
  while time.time() < deadline:
    print(f"step {step}", flush=True)
    step += 1
    time.sleep(0.1)
  record(event="exit", code=0)
  return 0


if __name__ == "__main__":
  sys.exit(main())
