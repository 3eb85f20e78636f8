"""The sampling server as a real subprocess on a free port, for the API and browser tests."""

import contextlib
import pathlib
import queue
import re
import socket
import subprocess
import sys
import threading

import numpy as np
from conftest import ROOT
from PIL import Image

START_TIMEOUT_S = 300  # loading and compiling on a busy 2-core machine


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def server(workdir, log_path: pathlib.Path, *flags: str):
  """Yields (url, log_path) once the server says it is serving; stops it after. `workdir`
  None: `flags` name the model (`--model FOLDER`)."""
  port = free_port()
  log = log_path.open("w")
  process = subprocess.Popen(
      [sys.executable, "-m", "parti_jax.serve", *(["--workdir", str(workdir)] if workdir else []),
       "--port", str(port), *flags], cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True)
  try:
    lines = queue.Queue()  # the server prints one line on stdout once it is up
    threading.Thread(target=lambda: [*map(lines.put, process.stdout), lines.put("")],
                     daemon=True).start()
    line = "?"
    while line and not line.startswith("serving http://"):
      try:
        line = lines.get(timeout=START_TIMEOUT_S)
      except queue.Empty:
        raise RuntimeError(f"the server did not start in {START_TIMEOUT_S} s:\n"
                           f"{log_path.read_text()[-3000:]}") from None
    if not line:
      raise RuntimeError(f"the server stopped:\n{log_path.read_text()[-3000:]}")
    yield f"http://127.0.0.1:{port}", log_path
  finally:
    process.terminate()  # SIGTERM, as a container's stop sends it
    try:
      process.wait(timeout=30)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait()
    log.close()
  # It stopped cleanly and took its images with it (they would pile up in /tmp).
  assert process.returncode == 0, log_path.read_text()[-3000:]
  (folder,) = re.findall(r"images go to (\S+) \(removed", log_path.read_text())
  assert not pathlib.Path(folder).exists(), folder


def pixels(path) -> np.ndarray:
  return np.asarray(Image.open(path).convert("RGB"))


def gallery_pixels(gallery) -> list[np.ndarray]:
  """The images of a /generate answer's gallery, as gradio_client saved them."""
  return [pixels(item["image"]) for item in gallery]
