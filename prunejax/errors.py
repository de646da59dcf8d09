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
