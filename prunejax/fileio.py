"""Files that are never half-written, honour the umask, say what made them and prove they are
intact.

* Atomic writes: through a temporary file in the same directory, fsync, then ``os.replace`` (and an
  fsync of the directory), so a reader, or a run resumed after a kill, never sees a half-written
  file.
  New files get ``0o666`` minus the umask, like any file a program opens, so teammates sharing a
  results folder or a cache can read them.
* Write failures (no space, read-only file system, no permission, a path under a file) raise one
  :class:`~prunejax.errors.FileError` naming the path and what to do.
* ``.npz`` files carry a JSON ``meta`` dict (what made them: a fingerprint of the config, data and
  code) and are read back validated (:func:`load_npz`): a truncated or bit-flipped file (zip CRC),
  a file without the expected arrays or with other ``meta`` raises
  :class:`~prunejax.errors.FileError`.
  :func:`content_digest` hashes what a file holds (names, dtypes, shapes, bytes), not its bytes on
  disk (zip entries carry timestamps), so two writes of the same arrays have the same digest.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import zipfile
from typing import IO, Any, Iterator, Mapping

import numpy as np

from prunejax.errors import FileError

META_KEY = "__meta__"
"""The array of an ``.npz`` file that holds its JSON ``meta`` dict (a 0-d unicode array)."""

_ADVICE = {
    errno.ENOSPC: "free space on that file system (or write elsewhere) and rerun to resume",
    errno.EDQUOT: "the disk quota is exceeded; free space (or write elsewhere) and rerun to resume",
    errno.EROFS: "the file system is read-only; write to a writable directory instead",
    errno.EACCES: "no permission; fix the permissions or write to another directory",
    errno.EPERM: "no permission; fix the permissions or write to another directory",
    errno.ENOTDIR: "a parent of it is a file, not a directory; choose another path",
    errno.EEXIST: "a file of that name is in the way; choose another path",
    errno.EISDIR: "it is a directory; choose another path",
    errno.ENAMETOOLONG: "the path is too long; choose a shorter one",
    errno.EIO: "the device reported an I/O error; check the disk or write elsewhere",
}


def os_error_message(e: OSError, path: str, action: str = "write") -> str:
  """One line for an ``OSError`` on ``path``: what failed, why, and what to do."""
  reason = e.strerror or type(e).__name__
  where = e.filename if isinstance(e.filename, str) and e.filename else path
  advice = _ADVICE.get(e.errno, "check the path and its file system")
  return f"cannot {action} {where}: {reason}; {advice}"


def makedirs(path: str) -> None:
  """``os.makedirs(path, exist_ok=True)`` with a one-line :class:`FileError` on failure."""
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise FileError(os_error_message(e, path, "create the directory")) from None


def _fsync_dir(directory: str) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass  # not every file system can sync a directory
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """Opens a temporary file that replaces ``path`` when the block ends without an error.

  The file is created with mode ``0o666`` minus the umask. An ``OSError`` while writing (disk full,
  read-only, no permission) becomes a one-line :class:`FileError` naming ``path``; the temporary
  file is removed and ``path`` keeps its old content.
  """
  directory = os.path.dirname(os.path.abspath(path))
  makedirs(directory)
  tmp = os.path.join(directory, f".tmp_{os.getpid()}_{secrets.token_hex(4)}"
                     f"{os.path.splitext(path)[1]}")
  try:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  except OSError as e:
    raise FileError(os_error_message(e, path)) from None
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(e, OSError):
      raise FileError(os_error_message(e, path)) from None
    raise
  _fsync_dir(directory)


def atomic_write_text(path: str, text: str) -> None:
  with atomic_open(path, "w") as f:
    f.write(text)


def _canonical(arrays: Mapping[str, Any], meta: Mapping[str, Any] | None) -> dict[str, np.ndarray]:
  out = {k: np.asarray(v) for k, v in arrays.items()}
  if META_KEY in out:
    raise FileError(f"{META_KEY!r} is reserved for the file's meta; rename that array")
  for k, v in out.items():
    if v.dtype == object:
      raise FileError(f"array {k!r} has dtype object; expected numbers, bools or strings")
  if meta is not None:
    out[META_KEY] = np.asarray(to_json(dict(meta)))
  return out


def content_digest(arrays: Mapping[str, Any]) -> str:
  """SHA-256 (hex, 32 characters) of named arrays: names, dtypes, shapes and bytes, in name
  order."""
  h = hashlib.sha256()
  for k in sorted(arrays):
    a = np.asarray(arrays[k])
    h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:32]


def atomic_savez(path: str, meta: Mapping[str, Any] | None = None, **arrays: Any) -> str:
  """``np.savez(path, **arrays)`` atomically, with ``meta`` (a JSON-able dict) stored beside the
  arrays; returns the :func:`content_digest` of what was written (``meta`` included)."""
  out = _canonical(arrays, meta)
  with atomic_open(path, "wb") as f:
    np.savez(f, **out)
  return content_digest(out)


def load_npz(path: str, *, meta: Mapping[str, Any] | None = None,
             required: tuple[str, ...] = ()) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The arrays and ``meta`` of an ``.npz`` file, read in full and validated.

  Args:
    path: the file.
    meta: if given, every key of it must be in the file's meta with an equal value.
    required: arrays the file must hold.

  Returns:
    ``(arrays, meta)``; ``meta`` is ``{}`` for a file written without one.

  Raises:
    FileError: the file is missing, unreadable, truncated or damaged (the zip CRC of every array is
      checked), lacks a required array, or its meta differs from ``meta`` (naming the keys).
  """
  arrays = _read_npz(path)
  found = {}
  if META_KEY in arrays:
    try:
      found = json.loads(str(arrays.pop(META_KEY)))
    except ValueError:
      raise FileError(f"{path} is damaged (its {META_KEY} is not JSON); delete it or recompute "
                      "it") from None
    if not isinstance(found, dict):
      raise FileError(f"{path} is damaged (its {META_KEY} is not an object)")
  missing = [k for k in required if k not in arrays]
  if missing:
    raise FileError(f"{path} has no {', '.join(map(repr, missing))} array; not the file expected")
  if meta is not None:
    differ = sorted(k for k in meta if found.get(k) != _jsonable(meta[k]))
    if differ:
      raise FileError(f"{path} was made by another run ({', '.join(differ)} differ: "
                      f"{ {k: found.get(k) for k in differ} } there, "
                      f"{ {k: _jsonable(meta[k]) for k in differ} } here)")
  return arrays, found


def _read_npz(path: str) -> dict[str, np.ndarray]:
  """Every array of an ``.npz`` file, read in full (so the zip CRC of each is checked)."""
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except FileNotFoundError:
    raise FileError(f"{path} does not exist") from None
  except OSError as e:
    raise FileError(os_error_message(e, path, "read")) from None
  except (ValueError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError) as e:
    # zipfile, numpy's header parser and zlib raise all of these for damaged files.
    raise FileError(f"{path} is damaged ({type(e).__name__}: {_first_line(e)}); delete it or "
                    "recompute it") from None
  # A member whose name lost its ".npy" (a damaged zip directory) comes back as raw bytes.
  raw = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
  if raw:
    raise FileError(f"{path} is damaged (its member {raw[0]!r} is not an array); delete it or "
                    "recompute it")
  return arrays


def npz_digest(path: str) -> str:
  """The :func:`content_digest` of an ``.npz`` file's arrays (its meta included), read validated;
  equal to what :func:`atomic_savez` returned when it wrote them."""
  return content_digest(_read_npz(path))


def read_meta(path: str) -> dict[str, Any]:
  """The ``meta`` dict of an ``.npz`` file written by :func:`atomic_savez` (``{}`` if none)."""
  return load_npz(path)[1]


def _jsonable(value: Any) -> Any:
  return json.loads(to_json(value))


def _first_line(e: BaseException) -> str:
  s = str(e).strip()
  return s.splitlines()[0][:200] if s else ""


def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, np.bool_):
    return bool(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def to_json(obj) -> str:
  """``obj`` as indented JSON with sorted keys (NumPy scalars and arrays as numbers and lists)."""
  return json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n"


def atomic_write_json(path: str, obj) -> None:
  atomic_write_text(path, to_json(obj))


def read_json(path: str) -> Any:
  """A JSON file's content; a file that does not parse raises a one-line :class:`FileError`."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    raise FileError(f"{path} does not exist") from None
  except OSError as e:
    raise FileError(os_error_message(e, path, "read")) from None
  except (ValueError, UnicodeDecodeError) as e:
    raise FileError(f"{path} is damaged (not JSON: {_first_line(e)})") from None
