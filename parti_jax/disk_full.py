"""A full disk, recognised in what every writer raises and said in one line with its path.

The writers of a run report it each in their own way: Python's OSError (errno ENOSPC, or
EDQUOT for a quota), and tensorstore, through orbax, as a ValueError whose text quotes the
file and "No space left on device [os_error_code='28']". A traceback from the depths of an
asynchronous save does not tell a user that freeing space and starting again is all it takes.
"""

import errno
import re

_NO_SPACE = re.compile(r"No space left on device|Disk quota exceeded|os_error_code='(28|122)'")
_QUOTED_PATH = re.compile(r"\"(/[^\"]+)\"|'(/[^']+)'")


def path_of(error: BaseException) -> str | None:
  """The file an error could not write for want of space ("" when it names none), or None
  when the error (and every error it was raised from) is not about a full disk."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return str(error.filename or "")
    text = str(error)
    found = _NO_SPACE.search(text)
    if found:  # tensorstore: the last path quoted before the reason is the file
      paths = [a or b for a, b in _QUOTED_PATH.findall(text[:found.start()])]
      return paths[-1] if paths else ""
    error = error.__cause__ or error.__context__
  return None


def message(error: BaseException, workdir) -> str | None:
  """What to tell the user when `error` is a full disk under the run `workdir` (None when it
  is not): the path, that the disk is full, what is intact and how to go on."""
  path = path_of(error)
  if path is None:
    return None
  from absl import logging

  from parti_jax import runs  # here: the trainer's modules need JAX; recognising does not
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that it lists read-only
  try:
    steps = runs.checkpoint_steps(workdir)
  except Exception:  # noqa: BLE001  the message must not fail on a disk that fails
    steps = []
  finally:
    logging.set_verbosity(verbosity)
  kept = (f"the finished checkpoints are intact (the latest: step {steps[-1]}), and a "
          f"checkpoint cut short is never read; free space and start the same command again "
          f"to resume from step {steps[-1]}" if steps else
          "no checkpoint was finished; free space and start the same command again")
  writing = f", writing {path}" if path else ""
  return f"{workdir}: no space left on the device (the disk is full{writing}); {kept}"
