"""What a run reports: its metrics history, TensorBoard event files, and progress on the terminal.

Only process 0 writes. The history is kept in segments, WORKDIR/metrics/START-CREATED.jsonl,
one JSON object per line (`step` plus the scalars): START is the step the run (re)started
from, zero padded, CREATED the UTC time the segment was begun plus a random tag. A segment is
written as a whole object, at most every `flush_secs` while there is something new and at
close, and is never appended to: a bucket cannot append (gcsfs, which etils.epath uses for
gs://, turns "a" into an overwrite and writes nothing until a block of several MiB is full),
so this one code path keeps the history on a local disk and on a bucket alike, a restart
never rewrites the segments before it, and a process that dies loses only its last seconds.
A segment that grows past SEGMENT_BYTES is closed and another begun, so that no write
re-sends more than that. `read(WORKDIR)` merges the segments into the run's history.

WORKDIR/tensorboard/ holds the event files (`tensorboard --logdir WORKDIR`). On an
interactive terminal a tqdm bar shows progress and the latest loss; otherwise (logs of a pod
job) each write is also printed as one plain line.
"""

import concurrent.futures
import datetime
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import threading
import time
import weakref

import numpy as np
import tqdm
from etils import epath

from parti_jax import disk_full
from parti_jax.data import images

SEGMENT_BYTES = 1 << 20
# An event file is closed and another begun past this size: each copy to the work directory
# re-sends the whole file, so this bounds what one flush sends.
EVENT_FILE_BYTES = 8 << 20
_SEGMENT = re.compile(r"(\d+)-(\d{8}T\d{12}Z)-([0-9a-f]+)\.jsonl")


def read(workdir) -> list[dict]:
  """The run's history: every row its segments hold, in the order written.

  Segments are taken in the order they were begun. One that starts at step s (a restart
  from the checkpoint at s) replaces the rows of earlier segments with step > s, which the
  restart computed again, so the history is that of the run as if it had never stopped.
  A run from before segments (a single WORKDIR/metrics.jsonl) is read as the first segment.
  """
  workdir = epath.Path(workdir)
  rows = []
  legacy = workdir / "metrics.jsonl"
  if legacy.exists():
    rows = _rows(legacy.read_text())
  # glob, not iterdir: on a bucket it lists afresh, where gcsfs would answer iterdir (and
  # the sizes of the files in it) from a listing cached earlier, missing what another
  # process wrote since.
  segments = []
  for path in (workdir / "metrics").glob("*.jsonl"):
    match = _SEGMENT.fullmatch(path.name)
    if match:
      segments.append((match[2], int(match[1]), path.name, path))
  for _, start, _, path in sorted(segments):
    rows = [r for r in rows if r["step"] <= start] + _rows(path.read_text())
  return rows


def _rows(text: str) -> list[dict]:
  lines = text.splitlines()
  rows = []
  for i, line in enumerate(lines):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      # A local file read while its writer rewrites it may end in a partial line; any
      # other damage is an error.
      if i != len(lines) - 1:
        raise
  return rows


class Writer:
  """Writes a run's metrics (see the module docstring); `close()` writes what is left.

  `start_step`: the step the run starts from, which names its metrics segment. None: the
  first step given to `progress()`, which the trainer calls once it knows where it resumed.
  """

  def __init__(self, workdir, total_steps: int, start_step: int | None = None,
               flush_secs: float = 5.0):
    import jax  # here: read() needs no JAX (the demo's report reads without it)
    self.enabled = jax.process_index() == 0
    self._interactive = sys.stderr.isatty()
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    self._workdir = epath.Path(workdir)
    self._flush_secs = flush_secs
    self._start = start_step
    self._segment = None  # the name of the segment being written, once it has a row
    self._lines: list[str] = []
    self._size = 0
    self._last_step = None
    self._dirty = False
    self._last_flush = time.monotonic()
    # Uploads run on one thread so that the training loop never waits for a bucket; each
    # object's newest contents wait in `_unwritten` until a write of them succeeds.
    self._unwritten: dict[epath.Path, str | bytes] = {}
    self._lock = threading.Lock()
    self._uploader = concurrent.futures.ThreadPoolExecutor(1, "parti_jax.metrics")
    self._upload = None
    self._upload_error = None
    self._made = set()  # directories made (a local disk needs them; a bucket has none)
    # TensorBoard: tensorboardX writes event files into a local scratch directory, and each
    # flush copies the files that grew into WORKDIR/tensorboard through epath, like the
    # segments. tensorboardX can write gs:// itself (through google-cloud-storage, which
    # works against the tests' emulator), but it re-uploads every event file whole at each
    # of its flushes, and again when the writer is garbage-collected after close, retrying
    # for 120 s when the bucket cannot be reached (at exit); copying keeps one storage
    # client, one set of credentials, and bounded uploads (EVENT_FILE_BYTES) on every kind
    # of work directory.
    self._scratch = tempfile.mkdtemp(prefix="parti_jax_tensorboard_")
    # Removed at close, or at exit when a run ends without closing its writer.
    weakref.finalize(self, shutil.rmtree, self._scratch, True)
    self._tag = secrets.token_hex(3)
    self._event_files = 0
    self._copied: dict[str, int] = {}
    self._tb = self._summary_writer()
    if self._interactive:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step or 0, unit="step",
                            dynamic_ncols=True)

  def _summary_writer(self):
    from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    self._event_files += 1
    return SummaryWriter(self._scratch, flush_secs=self._flush_secs,
                         filename_suffix=f".{self._tag}.{self._event_files}")

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)
    if self._segment is None:
      start = self._start if self._start is not None else 0
      created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
      self._segment = f"{start:010d}-{created}-{self._tag}.jsonl"
    line = json.dumps(dict(step=step, time=time.time(), **values)) + "\n"
    self._lines.append(line)
    self._size += len(line)
    self._last_step = step
    self._dirty = True
    if self._size >= SEGMENT_BYTES:
      self._end_segment()
    self._flush_if_due()
    if not self._interactive:
      shown = " ".join(f"{k}={_short(v)}" for k, v in values.items() if "/" not in k or
                       k.startswith("eval/"))
      print(f"step {step}: {shown}", flush=True)

  def _end_segment(self) -> None:
    """Hands the full segment to the uploader; the next one starts at its last step."""
    self._unwrite(self._workdir / "metrics" / self._segment, "".join(self._lines))
    self._start, self._segment = self._last_step, None
    self._lines, self._size, self._dirty = [], 0, False

  def picture(self, step: int, name: str, pixels: np.ndarray) -> None:
    """A uint8 [H, W, 3] picture (a grid of samples): TensorBoard and a PNG file."""
    if self.enabled:
      self._tb.add_image(name, pixels, step, dataformats="HWC")
      path = self._workdir / "pictures" / f"{name.replace('/', '_')}_{step:08d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(images.encode_png(pixels))

  def progress(self, step: int, **postfix) -> None:
    """Moves the bar to `step` (cheap: tqdm redraws at most every 0.1 s)."""
    if not self.enabled:
      return
    if self._start is None:
      self._start = step
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
      self._bar.update(step - self._bar.n)
    self._flush_if_due()

  def log(self, message: str) -> None:
    """A line for the person running the job (process 0 only), clear of the progress bar."""
    if self.enabled:
      tqdm.tqdm.write(message, file=sys.stderr)

  def _flush_if_due(self) -> None:
    if ((self._dirty or self._unwritten)
        and time.monotonic() - self._last_flush >= self._flush_secs):
      self.flush()

  def flush(self, closing: bool = False) -> None:
    """Starts writing the segment and the event files that changed (in the background)."""
    if not self.enabled or self._tb is None:
      return
    self._last_flush = time.monotonic()
    if self._dirty:
      self._unwrite(self._workdir / "metrics" / self._segment, "".join(self._lines))
      self._dirty = False
    self._tb.flush()  # what tensorboardX's thread has taken from its queue, to the file
    for name in os.listdir(self._scratch):
      size = os.path.getsize(os.path.join(self._scratch, name))
      if size != self._copied.get(name):
        self._copy_event_file(name, size)
        if size >= EVENT_FILE_BYTES and not closing:
          self._tb.close()
          self._copy_event_file(name, os.path.getsize(os.path.join(self._scratch, name)))
          os.remove(os.path.join(self._scratch, name))
          self._tb = self._summary_writer()
    if self._upload is None or self._upload.done():
      self._report_upload_error()
      self._upload = self._uploader.submit(self._write_unwritten)

  def _copy_event_file(self, name: str, size: int) -> None:
    # The scratch directory is this process's own local temporary directory.
    with open(os.path.join(self._scratch, name), "rb") as f:
      data = f.read(size)
    self._unwrite(self._workdir / "tensorboard" / name, data)
    self._copied[name] = size

  def _unwrite(self, path: epath.Path, contents) -> None:
    with self._lock:
      self._unwritten[path] = contents

  def _write_unwritten(self) -> None:
    with self._lock:
      todo, self._unwritten = self._unwritten, {}
    for path, contents in todo.items():
      try:
        if path.parent not in self._made:
          path.parent.mkdir(parents=True, exist_ok=True)
          self._made.add(path.parent)
        _write_whole(path, contents)
      except Exception as e:  # noqa: BLE001  kept for the next try, and reported
        if disk_full.path_of(e) is not None:
          self._upload_error = (f"{path}: no space left on the device (the disk is full); "
                                "kept, and written once there is space")
        else:
          self._upload_error = f"{path}: {type(e).__name__}: {e}"
        with self._lock:
          self._unwritten.setdefault(path, contents)

  def _report_upload_error(self) -> None:
    if self._upload_error:
      self.log(f"metrics: could not write {self._upload_error}; trying again")
      self._upload_error = None

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is None:
      return
    self._tb.close()  # writes every queued event
    self.flush(closing=True)
    self._tb = None
    self._upload.result()
    if self._unwritten:  # the last try, here: a run's end should not lose its last rows
      self._write_unwritten()
    self._uploader.shutdown()
    if self._upload_error:
      self.log(f"metrics: could not write {self._upload_error}")
    shutil.rmtree(self._scratch, ignore_errors=True)


def _write_whole(path: epath.Path, contents: str | bytes) -> None:
  """Replaces a file whole. An object in a bucket is; on a disk, a file is written under a
  temporary name and renamed, so that a write that fails (a full disk) leaves the version
  before it, not a truncated one. The name holds neither ".jsonl" nor "tfevents", which
  `read` and TensorBoard would take for theirs."""
  data = contents.encode() if isinstance(contents, str) else contents
  if "://" in str(path):
    path.write_bytes(data)
    return
  tmp = path.parent / f".partial-{secrets.token_hex(6)}"
  try:
    tmp.write_bytes(data)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _short(v) -> str:
  v = float(v)
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
