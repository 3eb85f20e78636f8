"""One writer per work directory: WORKDIR/lock.json names the run that is training in it.

Two trainers on one work directory break each other's checkpoints (each deletes and renames
the other's files), so `python -m parti_jax.train` takes this lock before it writes anything
and refuses to start while a live run holds it, naming the holder (host, process id, start
time). A run of several processes is one writer: process 0 takes the lock and every process
learns the outcome (`acquire_for_run`).

The holder refreshes `heartbeat` (its wall-clock time) every HEARTBEAT_S from a background
thread. A lock is stale, and taken over with a message, when
  - its holder ran on this host and that process is gone (a crash, kill -9, the machine
    rebooted), or
  - its heartbeat is older than STALE_AFTER_S (a holder on another host that stopped).
Hosts' clocks must agree to well within STALE_AFTER_S (NTP does). `force=True` (train's
--force) takes the lock whatever it says. The lock is released (deleted, if still ours) when
the run ends, also on the exit after SIGTERM; a run killed without a chance to release it
leaves a stale lock that the next start takes over.

Local directories: the lock is created with O_CREAT | O_EXCL, so of two starts exactly one
creates it. Buckets (gs://...): etils.epath has no exclusive create, so the lock is written,
then read back after SETTLE_S; a start that finds another's lock there lost the race (GCS
reads are strongly consistent: the last write wins and everyone reads it). Taking over a
stale lock is a write and a read-back everywhere: two starts that judge the same lock stale
within SETTLE_S of each other are told apart that way, not by the file system.
"""

import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid

from etils import epath

LOCK_NAME = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
SETTLE_S = 2.0  # buckets: how long a racing writer has to show before the read-back
READ_TRIES = 3  # a local lock is read again when found empty (created, not yet written)
MAX_LOCK_BYTES = 1 << 16  # a lock is a few hundred bytes; a larger file is not read whole


class LockError(RuntimeError):
  """The work directory is in use by another run; the message names it and how to go on."""


def _stat_fields(pid: int) -> list[str] | None:
  """Fields 3 onwards of /proc/PID/stat (state, ppid, ..., start time); None where /proc
  does not have the process (or there is no /proc: macOS)."""
  try:
    with open(f"/proc/{pid}/stat") as f:  # a kernel file, not a user path
      return f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None


def _process_start(pid: int) -> str | None:
  """The start time of process `pid` in clock ticks since boot, to tell a process from a
  later one that reuses its id; None where /proc does not say."""
  fields = _stat_fields(pid)
  return fields[19] if fields else None  # field 22 of stat(5); the list starts at field 3


def _process_alive(pid: int, start: str | None) -> bool:
  """Whether process `pid` of this host runs (a zombie does not), and is the same process."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process: it exists
  fields = _stat_fields(pid)
  if fields is None:
    return True  # no /proc (macOS): kill(0) is all there is
  if fields[0] in ("Z", "X"):
    return False
  return start is None or fields[19] == start


def describe(holder: dict) -> str:
  """'host H, process P, started T' of a lock's contents."""
  return (f"host {holder.get('host', '?')}, process {holder.get('pid', '?')}, started "
          f"{holder.get('started', '?')}")


class WorkdirLock:
  """The lock of one work directory; `acquire()` takes it or raises LockError."""

  def __init__(self, workdir, force: bool = False, heartbeat_s: float = HEARTBEAT_S,
               stale_after_s: float = STALE_AFTER_S, log=None):
    self.path = epath.Path(workdir) / LOCK_NAME
    self._force = force
    self._heartbeat_s = heartbeat_s
    self._stale_after_s = stale_after_s
    self._log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    self._local = "://" not in str(self.path)
    self._token = uuid.uuid4().hex
    self._contents = dict(
        host=socket.gethostname(), pid=os.getpid(), pid_start=_process_start(os.getpid()),
        started=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        command=" ".join(sys.argv), token=self._token)
    self._stop = threading.Event()
    self._thread = None
    self.lost_to = None  # the lock's contents, once another run has taken it from us

  # -- reading and judging

  def read(self) -> dict | None:
    """The lock's contents; None when there is none; {} when they are not a lock's (then
    judged by no host, no process and no heartbeat: stale)."""
    from parti_jax.data import records
    for attempt in range(READ_TRIES):
      try:
        holder = json.loads(records.read_limited(self.path, MAX_LOCK_BYTES, "a lock"))
      except FileNotFoundError:
        return None
      except (ValueError, records.TooLarge):
        holder = None
      if isinstance(holder, dict):
        return holder
      # Locally, a lock between its exclusive create and its contents reads empty.
      if attempt + 1 < READ_TRIES:
        time.sleep(0.2)
    return {}

  def stale_reason(self, holder: dict) -> str | None:
    """Why `holder` no longer holds the lock, or None when it may be alive."""
    heartbeat = holder.get("heartbeat")
    age = time.time() - (heartbeat if isinstance(heartbeat, (int, float)) else 0)
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
      if not _process_alive(holder["pid"], holder.get("pid_start")):
        return f"process {holder['pid']} is not running on this host"
      return None  # alive here, whatever its heartbeat says
    if age > self._stale_after_s:
      return f"its last heartbeat was {age:.0f} s ago (stale after {self._stale_after_s:.0f} s)"
    return None

  # -- taking and releasing

  def acquire(self) -> None:
    """Takes the lock (a stale one with a message, any with force) or raises LockError."""
    if self._local:  # a bucket has no folders (and making one could make a bucket)
      self.path.parent.mkdir(parents=True, exist_ok=True)
    if self._create():
      self._start_heartbeat()
      return
    holder = self.read()
    if holder is None:  # released between our create and our read: try once more
      if self._create():
        self._start_heartbeat()
        return
      holder = self.read() or {}
    reason = "forced (--force)" if self._force else self.stale_reason(holder)
    if reason is None:
      raise LockError(
          f"{self.path}: the work directory is in use by another run ({describe(holder)}; "
          f"command: {holder.get('command', '?')}). Two runs in one work directory break "
          "each other's checkpoints: wait for it to end, stop it, or use another --workdir. "
          "Once that run is gone, a start takes its lock over (on its host at once, "
          f"elsewhere when its heartbeat is {self._stale_after_s:.0f} s old); if you know "
          "better, start with --force")
    self._log(f"taking over the lock {self.path} of {describe(holder)}: {reason}")
    self._write()
    if not self._verify():
      raise LockError(f"{self.path}: another run took this work directory over at the same "
                      f"time ({describe(self.read() or {})}); start again to see which")
    self._start_heartbeat()

  def _create(self) -> bool:
    """Creates the lock if there is none; False when there is one."""
    if self._local:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(self._text())
        f.flush()
        os.fsync(f.fileno())
      return True
    # A bucket: no exclusive create; write, then read back after SETTLE_S (see above).
    if self.path.exists():
      return False
    self._write()
    return self._verify()

  def _verify(self) -> bool:
    """After a write that may race another (a bucket's create, any takeover): whether ours
    is the write that stayed once a racing one would have landed."""
    time.sleep(SETTLE_S)
    return (self.read() or {}).get("token") == self._token

  def _text(self) -> str:
    return json.dumps(dict(self._contents, heartbeat=time.time()), indent=1) + "\n"

  def _write(self) -> None:
    """Writes our contents whole: an object is replaced whole on a bucket; locally through
    a temporary file and a rename, so a reader never sees half of it."""
    if not self._local:
      self.path.write_text(self._text())
      return
    tmp = self.path.parent / f".{LOCK_NAME}.{self._token}.tmp"
    tmp.write_text(self._text())
    os.replace(tmp, self.path)

  def _start_heartbeat(self) -> None:
    self._thread = threading.Thread(target=self._beat, name="parti_jax.workdir_lock",
                                    daemon=True)
    self._thread.start()

  def _beat(self) -> None:
    while not self._stop.wait(self._heartbeat_s):
      try:
        holder = self.read()
        if (holder or {}).get("token") != self._token:
          # Taken over (our heartbeat was late, or someone used --force): say so once and
          # leave the lock to its new holder.
          self.lost_to = holder or {}
          self._log(f"warning: the lock {self.path} was taken over by "
                    f"{describe(self.lost_to)}; two runs may now write this work directory")
          return
        self._write()
      except Exception as e:  # noqa: BLE001  a missed beat is retried at the next one
        self._log(f"warning: could not refresh the lock {self.path}: {type(e).__name__}: {e}")

  def release(self) -> None:
    """Stops the heartbeat and deletes the lock if it is still ours."""
    self._stop.set()
    if self._thread is None:
      return
    self._thread.join()
    self._thread = None
    try:
      if (self.read() or {}).get("token") == self._token:
        self.path.unlink(missing_ok=True)
    except Exception as e:  # noqa: BLE001  the next start finds it stale
      self._log(f"warning: could not remove the lock {self.path}: {type(e).__name__}: {e}")

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *_):
    self.release()


def acquire_for_run(workdir, force: bool = False, log=None) -> WorkdirLock:
  """Process 0 takes the lock for the whole run; every process raises the same LockError
  if it could not (so none waits for the others in a collective). Returns the lock to
  release at the end (on other processes one never taken, whose release does nothing)."""
  import jax

  from parti_jax import checkpoints
  lock, error = WorkdirLock(workdir, force=force, log=log), ""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except LockError as e:
      error = str(e)
    except Exception as e:  # noqa: BLE001  a storage error too: every process must hear
      error = f"{lock.path}: cannot take the work directory's lock: {type(e).__name__}: {e}"
  error = checkpoints._from_process_0(error)  # pylint: disable=protected-access  # a barrier
  if error:
    raise LockError(error)
  return lock
