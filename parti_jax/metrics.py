"""What a run reports: TensorBoard event files, a JSONL log, and progress on the terminal.

Only process 0 writes. WORKDIR/metrics.jsonl holds one JSON object per write (`step`
plus the scalars); WORKDIR/tensorboard/ holds the event files (`tensorboard --logdir
WORKDIR`). On an interactive terminal a tqdm bar shows progress and the latest loss;
otherwise (logs of a pod job) each write is also printed as one plain line.
"""

import json
import sys
import time

import jax
import numpy as np
import tqdm
from etils import epath

from parti_jax.data import images


class Writer:

  def __init__(self, workdir, total_steps: int, start_step: int = 0):
    self.enabled = jax.process_index() == 0
    self._interactive = sys.stderr.isatty()
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    workdir = self._workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._jsonl = (workdir / "metrics.jsonl").open("a")
    from tensorboardX import SummaryWriter  # writes event files without TensorFlow
    self._tb = SummaryWriter(str(workdir / "tensorboard"), flush_secs=10)
    if self._interactive:
      self._bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step",
                            dynamic_ncols=True)

  def scalars(self, step: int, values: dict) -> None:
    if not self.enabled:
      return
    values = {k: float(v) for k, v in values.items()}
    for name, value in values.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps(dict(step=step, time=time.time(), **values)) + "\n")
    self._jsonl.flush()
    if not self._interactive:
      shown = " ".join(f"{k}={_short(v)}" for k, v in values.items() if "/" not in k or
                       k.startswith("eval/"))
      print(f"step {step}: {shown}", flush=True)

  def picture(self, step: int, name: str, pixels: np.ndarray) -> None:
    """A uint8 [H, W, 3] picture (a grid of samples): TensorBoard and a PNG file."""
    if self.enabled:
      self._tb.add_image(name, pixels, step, dataformats="HWC")
      path = self._workdir / "pictures" / f"{name.replace('/', '_')}_{step:08d}.png"
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_bytes(images.encode_png(pixels))

  def progress(self, step: int, **postfix) -> None:
    """Moves the bar to `step` (cheap: tqdm redraws at most every 0.1 s)."""
    if self._bar is not None:
      if postfix:
        self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
      self._bar.update(step - self._bar.n)

  def log(self, message: str) -> None:
    """A line for the person running the job (process 0 only), clear of the progress bar."""
    if self.enabled:
      tqdm.tqdm.write(message, file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
      self._jsonl.close()


def _short(v) -> str:
  v = float(v)
  return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
