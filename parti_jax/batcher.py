"""Rows of many requests decoded together: what lets N people share one batched decode.

  batcher = Batcher(run, batch_sizes=[4, 16, 32], wait_s=0.1)
  job = batcher.submit(settings, [Row(text, prompt_id, seed, sample), ...])
  for indices, images in job.finished():  # as each decode batch ends
    ...

A thread takes the oldest waiting request, waits up to `wait_s` for more (or until the
largest batch is full), and decodes every waiting row with the same settings in one
program, padded up to the next of a few compiled batch sizes; a request larger than a batch
spans several. Settings are compiled into the sampler (decoding.Settings is static), so
rows of different settings never share a decode.

A row's image depends only on its text, prompt id, seed and sample index: its key is
decoding's fold_in(fold_in(key(seed), prompt_id), sample), the key `sampling.generate`
uses, so the server draws the image the sample command draws, alone or batched with anyone.
Codes become pixels in fixed chunks of the smallest batch size, so the image decoder, too,
always sees the same shapes.
"""

import dataclasses
import queue
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from parti_jax import decoding


@dataclasses.dataclass(frozen=True)
class Row:
  """One image to draw."""
  text: np.ndarray  # int32 [text_len], padded as the model reads it
  prompt_id: int  # decoding.prompt_id of the prompt as typed
  seed: int
  sample: int


@dataclasses.dataclass
class BatchReport:
  """What one decode did, for the server's log and the requests that shared it."""
  number: int
  rows: int
  padded_to: int
  requests: int
  compile_s: float
  decode_s: float
  pixels_s: float


class Job:
  """One request's rows, and their images as the decodes that hold them finish."""

  def __init__(self, settings: decoding.Settings, rows: list[Row]):
    self.settings, self.rows = settings, rows
    self.submitted = time.perf_counter()
    self.taken = 0  # rows handed to a decode so far (the batcher's thread only)
    self.keys = np.concatenate([decoding.row_keys(r.seed, [r.prompt_id], [r.sample])
                                for r in rows]) if rows else None
    self._results = queue.Queue()

  def finished(self, timeout_s: float | None = None):
    """(row indices, uint8 images [n, R, R, 3], BatchReport) per decode, until every row
    is drawn; a failed decode raises its error here."""
    done = 0
    while done < len(self.rows):
      item = self._results.get(timeout=timeout_s)
      if isinstance(item, BaseException):
        raise item
      done += len(item[0])
      yield item


class Batcher:
  """Decodes the rows of every submitted job on one thread, several jobs per program."""

  def __init__(self, run, batch_sizes: list[int], wait_s: float, log: Callable[[str], None]):
    mesh = run.setup.mesh
    ways = mesh.shape["data"] * mesh.shape["fsdp"]
    # Whole rows on every device; the largest is how many rows one decode takes.
    self.sizes = sorted({-(-size // ways) * ways for size in batch_sizes})
    self.run, self.wait_s, self.log = run, wait_s, log
    self._pending: list[Job] = []
    self._wake = threading.Condition()
    self._batches = 0
    threading.Thread(target=self._loop, name="batcher", daemon=True).start()

  @property
  def max_rows(self) -> int:
    return self.sizes[-1]

  def settings_for(self, settings: decoding.Settings) -> decoding.Settings:
    """The settings the sampler runs (sampling.Run.sampler_settings)."""
    return self.run.sampler_settings(settings)

  def compile(self, settings: decoding.Settings) -> float:
    """Compiles the sampler for `settings` at every batch size; the seconds it took."""
    return sum(self.run.generate_fn(self.settings_for(settings), size)[1] for size in self.sizes)

  def submit(self, settings: decoding.Settings, rows: list[Row]) -> Job:
    job = Job(self.settings_for(settings), rows)
    with self._wake:
      self._pending.append(job)
      self._wake.notify()
    return job

  def waiting_rows(self) -> int:
    with self._wake:
      return sum(len(job.rows) - job.taken for job in self._pending)

  # ----------------------------------------------------------------- the thread

  def _loop(self):
    while True:
      taken = self._next_batch()
      try:
        self._decode(taken)
      except Exception as e:  # noqa: BLE001  the requests hear of it; the server goes on
        self.log(f"decode failed: {type(e).__name__}: {e}")
        for job in {id(job): job for job, _ in taken}.values():
          job._results.put(RuntimeError(f"decoding failed: {type(e).__name__}: {e}"))

  def _next_batch(self) -> list[tuple[Job, range]]:
    """Blocks until rows wait, lets more come for up to wait_s, then takes up to max_rows
    of the oldest request's settings, oldest requests first."""
    with self._wake:
      while not self._pending:
        self._wake.wait()
      deadline = self._pending[0].submitted + self.wait_s
      while (sum(len(j.rows) - j.taken for j in self._pending) < self.max_rows
             and (left := deadline - time.perf_counter()) > 0):
        self._wake.wait(left)
      settings, room, taken = self._pending[0].settings, self.max_rows, []
      for job in list(self._pending):
        if job.settings != settings or not room:
          continue
        n = min(room, len(job.rows) - job.taken)
        taken.append((job, range(job.taken, job.taken + n)))
        job.taken += n
        room -= n
        if job.taken == len(job.rows):
          self._pending.remove(job)
      return taken

  def _decode(self, taken: list[tuple[Job, range]]):
    rows = [job.rows[i] for job, indices in taken for i in indices]
    keys = np.concatenate([job.keys[indices.start:indices.stop] for job, indices in taken])
    size = next(s for s in self.sizes if s >= len(rows))
    pad = size - len(rows)  # copies of the last row, dropped after
    text = np.stack([r.text for r in rows + [rows[-1]] * pad])
    keys = np.concatenate([keys, np.repeat(keys[-1:], pad, 0)])
    generate_fn, compile_s = self.run.generate_fn(taken[0][0].settings, size)
    start = time.perf_counter()
    out = jax.device_get(generate_fn(self.run.params, text, keys))
    decoded = time.perf_counter()
    chunk = self.sizes[0]
    codes = out.tokens[:len(rows)]
    codes = np.concatenate([codes, np.repeat(codes[-1:], -len(codes) % chunk, 0)])
    images = np.concatenate([self.run.image_tokenizer.decode_codes(codes[i:i + chunk])
                             for i in range(0, len(codes), chunk)])
    self._batches += 1
    report = BatchReport(self._batches, len(rows), size, len(taken), compile_s,
                         decoded - start, time.perf_counter() - decoded)
    s = taken[0][0].settings
    self.log(f"batch {report.number}: {report.rows} rows of {report.requests} requests "
             f"(padded to {size}; guidance {s.guidance}, temperature {s.temperature}, top_k "
             f"{s.top_k}, top_p {s.top_p}, sjd {s.sjd_window}): compile {compile_s:.2f} s, "
             f"decode {report.decode_s:.2f} s, pixels {report.pixels_s:.2f} s")
    at = 0
    for job, indices in taken:
      job._results.put((list(indices), images[at:at + len(indices)], report))
      at += len(indices)
