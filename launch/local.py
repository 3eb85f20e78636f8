"""Runs a command as N JAX processes on this machine, each with K simulated CPU devices.

  python launch/local.py --num_processes 2 --devices_per_process 4 -- \
      python benchmarks/train_throughput.py --config configs/parti_tiny.py --steps 5

Every process gets PARTI_COORDINATOR, PARTI_NUM_PROCESSES, PARTI_PROCESS_ID (read by
parti_jax.distributed.initialize) and XLA_FLAGS for its device count, so the global
mesh has N*K devices and collectives cross processes (gloo), as on a pod. Output lines
are prefixed with the process id. Exits with the first non-zero status, if any.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _relay(process: subprocess.Popen, prefix: str) -> None:
  for line in process.stdout:
    sys.stdout.write(f"{prefix}{line}")
    sys.stdout.flush()


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the command to run after --")

  coordinator = f"127.0.0.1:{_free_port()}"
  processes, relays = [], []
  for i in range(args.num_processes):
    env = dict(os.environ, PARTI_COORDINATOR=coordinator,
               PARTI_NUM_PROCESSES=str(args.num_processes), PARTI_PROCESS_ID=str(i),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}",
               JAX_PLATFORMS="cpu")
    p = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    processes.append(p)
    relays.append(threading.Thread(target=_relay, args=(p, f"[{i}] "), daemon=True))
    relays[-1].start()
  codes = [p.wait() for p in processes]
  for t in relays:
    t.join()
  return next((c for c in codes if c), 0)


if __name__ == "__main__":
  sys.exit(main())
