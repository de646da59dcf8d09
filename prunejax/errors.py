"""User-facing errors: one line naming the bad value and what is allowed."""

from __future__ import annotations

from typing import Any, Iterable


class PrunejaxError(ValueError):
  """Base class for errors caused by user input (configs, data, arguments)."""


class ConfigError(PrunejaxError):
  """A config field has a value that is not allowed."""


class DataError(PrunejaxError):
  """A dataset is unknown, missing or malformed."""


def check_choice(field: str, value: Any, allowed: Iterable[Any]) -> Any:
  """Returns ``value`` if it is in ``allowed``, else raises a one-line :class:`ConfigError`."""
  allowed = list(allowed)
  if value not in allowed:
    raise ConfigError(
        f"{field}={value!r} is not allowed; choose one of: {', '.join(map(repr, allowed))}")
  return value


def check_range(field: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False) -> Any:
  """Returns ``value`` if ``lo <(=) value <(=) hi``, else raises a one-line :class:`ConfigError`."""
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={value!r} is not a number; expected a value in "
                      f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}") from None
  ok_lo = v > lo if lo_open else v >= lo
  ok_hi = v < hi if hi_open else v <= hi
  if not (ok_lo and ok_hi):
    raise ConfigError(f"{field}={value!r} is out of range; expected a value in "
                      f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}")
  return value


def check_positive_int(field: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ConfigError(f"{field}={value!r} is not allowed; expected a positive integer")
  return value


class FileError(PrunejaxError):
  """A file cannot be written or read back (no space, read-only, no permission, damaged, or made
  by another run); the message names the path and what to do."""


class WorkdirBusyError(PrunejaxError):
  """Another live process holds the workdir's lock."""


INT32_MIN, INT32_MAX = -2**31, 2**31 - 1


def check_device_ids(field: str, ids: Any) -> Any:
  """Returns ``ids`` if every id fits in int32, else raises a one-line :class:`DataError`.

  Ids that travel to the device (batches, trackers, augmentation keys) are int32 under JAX's
  default 32-bit mode: an int64 id of 2**31 or more would wrap silently (ids 5 and 5 + 2**32 would
  be one example). Host-side functions (deduplication, score files) keep int64 ids.
  """
  import numpy as np  # errors.py is imported everywhere; keep its import light.
  a = np.asarray(ids)
  if a.size and np.issubdtype(a.dtype, np.integer):
    out = (a < INT32_MIN) | (a > INT32_MAX)
    if out.any():
      raise DataError(f"{field} has {int(out.sum())} ids outside int32 (e.g. "
                      f"{a[out][:3].tolist()}), which JAX's 32-bit mode wraps on the device; remap "
                      f"them to 0..N-1 on the host (np.unique(ids, return_inverse=True)) and keep "
                      f"the map")
  return ids


def check_unique_ids(field: str, ids_N: Any, n: int | None = None) -> Any:
  """``ids_N`` as an int64 NumPy array if it is a 1-D array of distinct integer ids (``n`` of them
  when ``n`` is given), else raises a one-line :class:`DataError` naming ``field``.

  Host-side functions (deduplication, outliers, prototypes, the audit) key their answers by these
  ids.
  """
  import numpy as np  # errors.py is imported everywhere; keep its import light.
  ids = np.asarray(ids_N)
  if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
    raise DataError(f"{field} must be a 1-D array of integer ids; got dtype {ids.dtype}, "
                    f"shape {ids.shape}")
  ids = ids.astype(np.int64)
  if n is not None and len(ids) != n:
    raise DataError(f"{field} has {len(ids)} ids for {n} examples")
  uniq, counts = np.unique(ids, return_counts=True)
  if np.any(counts > 1):
    raise DataError(f"{field} repeats ids {uniq[counts > 1][:5].tolist()}; every example needs its "
                    f"own id")
  return ids
