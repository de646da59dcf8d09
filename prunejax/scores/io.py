"""Scores on disk: one ``.npz`` per set of scores, keyed by example id, so they can be published
and reused. The file holds ``ids`` and one array per score, all of length N."""

from __future__ import annotations

import numpy as np

from prunejax.errors import DataError
from prunejax.fileio import atomic_savez


def save_scores(path: str, ids: np.ndarray, **scores: np.ndarray) -> None:
  """Writes ``ids`` and each named score array to ``path`` (``.npz``), atomically.

  Args:
    path: destination file; written through a temporary file in the same directory and
      ``os.replace``, so a reader never sees a partial file.
    ids: int example ids, [N], unique.
    **scores: name -> array with first dimension N (``ids`` is reserved).

  Raises:
    DataError: repeated ids, a score of the wrong length, or no score.
  """
  ids = np.asarray(ids)
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise DataError(f"ids must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
  if len(np.unique(ids)) != len(ids):
    raise DataError("ids must be unique")
  if not scores:
    raise DataError("save_scores needs at least one score array")
  arrays = {"ids": ids.astype(np.int64)}
  for name, value in scores.items():
    value = np.asarray(value)
    if value.shape[:1] != ids.shape:
      raise DataError(f"score {name!r} has shape {value.shape}; expected first dimension "
                      f"{len(ids)}")
    arrays[name] = value
  atomic_savez(path, **arrays)


def load_scores(path: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``(ids, {name: scores})`` from a file written by :func:`save_scores`."""
  with np.load(path, allow_pickle=False) as f:
    if "ids" not in f.files:
      raise DataError(f"{path} has no 'ids' array; not a scores file")
    return f["ids"], {k: f[k] for k in f.files if k != "ids"}


def align(ids: np.ndarray, scores_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
  """``scores`` (keyed by ``scores_ids``) reordered to follow ``ids``.

  Raises:
    DataError: an id of ``ids`` has no score.
  """
  from prunejax.data.ids import IdIndex
  index, ids = IdIndex(scores_ids, "the scores"), np.asarray(ids, np.int64)
  found = index.contains(ids)
  if not np.all(found):
    raise DataError(f"{int(np.sum(~found))} ids have no score (first: {ids[~found][:5].tolist()})")
  return np.asarray(scores)[index.rows(ids)]
