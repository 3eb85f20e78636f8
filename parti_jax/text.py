"""The text input's fixed ids and the unconditional input: one definition for the model,
the SentencePiece tokenizer, the input pipeline and the sampler.

The SentencePiece models the project trains (`parti_jax.data.spm`) are made with these ids;
the model masks PAD_ID out of attention. The unconditional input, `[END, PAD, ...]`, is
an empty caption: caption dropout trains on it and classifier-free guidance decodes the
second half of every pair from it.
"""

import numpy as np

PAD_ID, UNK_ID, END_ID = 0, 1, 2


def unconditional(length: int, rows: int | None = None) -> np.ndarray:
  """int32 [length] (or [rows, length]): the input of an empty caption."""
  out = np.zeros((1 if rows is None else rows, length), np.int32)
  out[:, 0] = END_ID
  return out[0] if rows is None else out


def pad(ids, length: int) -> np.ndarray:
  """Ids cut or zero-padded to `length`; no ids at all is the unconditional input."""
  ids = list(ids)[:length]
  if not ids:
    return unconditional(length)
  out = np.zeros(length, np.int32)
  out[:len(ids)] = ids
  return out
