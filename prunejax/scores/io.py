"""Scores on disk: one ``.npz`` per set of scores, keyed by example id, so they can be published
and reused. The file holds ``ids``, one array per score (all of length N) and a ``meta`` dict saying
what made them (dataset, split, seed, config fingerprint, ...), so another run's file is not used as
is: pass the expected ``meta`` to :func:`load_scores`."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from prunejax.errors import DataError
from prunejax.fileio import META_KEY, atomic_savez, load_npz


def _check(ids: np.ndarray, scores: Mapping[str, np.ndarray], where: str) -> None:
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise DataError(f"{where}ids must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
  if len(np.unique(ids)) != len(ids):
    _, first = np.unique(ids, return_index=True)
    dup = np.setdiff1d(np.arange(len(ids)), first)
    raise DataError(f"{where}ids must be unique; repeated: {np.unique(ids[dup])[:5].tolist()}")
  if not scores:
    raise DataError(f"{where}needs at least one score array besides 'ids'")
  for name, value in scores.items():
    if value.shape[:1] != ids.shape:
      raise DataError(f"{where}score {name!r} has shape {value.shape}; expected first dimension "
                      f"{len(ids)} (one per id)")


def save_scores(path: str, ids: np.ndarray, *, meta: Mapping[str, Any] | None = None,
                **scores: np.ndarray) -> None:
  """Writes ``ids`` and each named score array to ``path`` (``.npz``), atomically.

  Args:
    path: destination file; written through a temporary file in the same directory and
      ``os.replace``, so a reader never sees a partial file.
    ids: int example ids, [N], unique.
    meta: what made the scores (JSON-able: dataset, split, seed, a config fingerprint, ...), stored
      in the file and checked by :func:`load_scores`.
    **scores: name -> array with first dimension N (``ids`` and ``meta`` are reserved).

  Raises:
    DataError: repeated ids, a score of the wrong length, or no score.
    FileError: the file cannot be written (no space, read-only, no permission).
  """
  ids = np.asarray(ids)
  arrays = {k: np.asarray(v) for k, v in scores.items()}
  if META_KEY in arrays:
    raise DataError(f"score name {META_KEY!r} is reserved")
  _check(ids, arrays, "save_scores: ")
  atomic_savez(path, meta=dict(meta or {}), ids=ids.astype(np.int64), **arrays)


def load_scores(path: str, *, meta: Mapping[str, Any] | None = None
                ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
  """``(ids, {name: scores})`` from a file written by :func:`save_scores`, validated as it was on
  writing (1-D unique integer ids, every score of their length).

  Args:
    path: the file.
    meta: if given, the file's meta must hold these keys with equal values (e.g. the dataset, seed
      and config fingerprint the caller expects), so scores of another run are not used as is.

  Raises:
    FileError: the file is missing, truncated or damaged, or made by another run (``meta``).
    DataError: it is not a valid scores file (no ``ids``, repeated ids, a score of another length).
  """
  arrays, _ = load_npz(path, meta=meta)
  if "ids" not in arrays:
    raise DataError(f"{path} has no 'ids' array; not a scores file")
  ids = arrays.pop("ids")
  _check(ids, arrays, f"{path}: ")
  return ids, arrays


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
