"""Example ids to row positions: one O(1) lookup, built once.

Every example carries a stable integer id (see :mod:`prunejax.data.datasets`). Whatever holds per-example
values keyed by id (a data source, a score file, a tracker) finds the row of an id through
:class:`IdIndex`: a dense table ``row_of[id - lo]`` when the ids are compact (the usual case: ids are
positions in a source), a sorted search otherwise. Lookups cost the same at 50k or 1.28M ids.
"""

from __future__ import annotations

import numpy as np

from prunejax.errors import DataError

# A dense table is used when it is at most this many times larger than the number of ids.
_DENSE_SLACK = 4


class IdIndex:
  """Row positions of example ids.

  Args:
    ids: int ids, [N], unique; row ``i`` holds ``ids[i]``.
    what: what the rows are, for error messages (e.g. "the training split").

  Raises:
    DataError: ids that are not a 1-D integer array, or repeated ids.
  """

  def __init__(self, ids: np.ndarray, what: str = "the source"):
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
      raise DataError(f"ids must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
    self.ids = ids.astype(np.int64)
    self.what = what
    n = len(self.ids)
    self._lo = int(self.ids.min()) if n else 0
    span = (int(self.ids.max()) - self._lo + 1) if n else 0
    if span <= _DENSE_SLACK * n + 1024:
      self._table = np.full(span, -1, np.int64)
      self._table[self.ids - self._lo] = np.arange(n)
      if n and np.count_nonzero(self._table >= 0) != n:
        raise DataError(f"ids of {what} must be unique; {n - np.count_nonzero(self._table >= 0)} "
                        "are repeated")
      self._order = None
      # ids lo, lo+1, ... in row order (a source's own positions): a row is id - lo, no lookup.
      self._identity = n == span and bool(np.all(self.ids == np.arange(self._lo, self._lo + n)))
    else:
      self._identity = False
      self._table = None
      self._order = np.argsort(self.ids, kind="stable")
      sorted_ids = self.ids[self._order]
      if np.any(sorted_ids[1:] == sorted_ids[:-1]):
        raise DataError(f"ids of {what} must be unique")
      self._sorted = sorted_ids

  def __len__(self) -> int:
    return len(self.ids)

  def rows(self, ids: np.ndarray) -> np.ndarray:
    """Row positions i64[n] of ``ids`` (in their order).

    Raises:
      DataError: an id that is not in the index, naming the first few and the range that exists.
    """
    ids = np.asarray(ids, np.int64)
    rows, found = self._find(ids)
    if not np.all(found):
      bad = ids[~found]
      rng = (f"{self._lo} to {int(self.ids.max())}" if len(self.ids) else "none")
      raise DataError(f"{len(bad)} ids are not in {self.what}: {bad[:5].tolist()} (its ids run "
                      f"from {rng})")
    return rows

  def contains(self, ids: np.ndarray) -> np.ndarray:
    """bool[n]: whether each id is in the index."""
    return self._find(np.asarray(ids, np.int64))[1]

  def _find(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(rows, found)`` in one pass: bounds, at most one gather (none when the ids are the rows'
    own positions), one check; ``rows`` is meaningful where ``found``."""
    if not len(self.ids):
      return np.zeros(ids.shape, np.int64), np.zeros(ids.shape, bool)
    if self._table is not None:
      off = ids - self._lo
      inside = (off >= 0) & (off < len(self._table))
      if self._identity:
        return off, inside
      rows = self._table[np.where(inside, off, 0)]
      return rows, inside & (rows >= 0)
    where = np.clip(np.searchsorted(self._sorted, ids), 0, len(self._sorted) - 1)
    return self._order[where], self._sorted[where] == ids
