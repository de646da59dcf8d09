"""Atomic file writes: through a temporary file in the same directory, fsync, then ``os.replace``, so
a reader (or a run resumed after a kill) never sees a half-written file."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import IO, Iterator

import numpy as np


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces ``path`` when the block ends without an error."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=os.path.splitext(path)[1])
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  with atomic_open(path, "w") as f:
    f.write(text)


def atomic_savez(path: str, **arrays: np.ndarray) -> None:
  """``np.savez(path, **arrays)``, atomically."""
  with atomic_open(path, "wb") as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def to_json(obj) -> str:
  """``obj`` as indented JSON with sorted keys (NumPy scalars and arrays as numbers and lists)."""
  return json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n"


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, to_json(obj))
