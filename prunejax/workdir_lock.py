"""One run per workdir: :class:`WorkdirLock`, an ``flock`` on ``workdir/.lock`` held for the run's
life, so the kernel releases it on any exit (a crash or ``kill -9`` included) and a stale lock never
blocks.

The names are re-exported by :mod:`prunejax.checkpoint`.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time
from typing import Any

from prunejax.errors import FileError, WorkdirBusyError
from prunejax.fileio import makedirs, os_error_message

log = logging.getLogger("prunejax")



class WorkdirLock:
  """An exclusive lock on ``workdir`` (the file ``workdir/.lock``) for the life of a run.

  ``acquire()`` takes it or raises :class:`~prunejax.errors.WorkdirBusyError` naming the process
  that holds it. It is an ``flock``, so it goes with the process on any exit (``kill -9``
  included): a lock left by a dead process never blocks. On file systems without ``flock`` it falls
  back to a lock file created exclusively, whose holder is checked for life when it is on the same
  host.
  The lock file stays (deleting it would let two processes lock two different files).
  """

  NAME = ".lock"

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, self.NAME)
    self._fd: int | None = None
    self._excl: str | None = None

  def acquire(self) -> "WorkdirLock":
    makedirs(self.workdir)
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as e:
      raise FileError(os_error_message(e, self.path)) from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      busy = e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
      holder = _read_holder(fd)
      for _ in range(20 if busy else 0):  # the holder names itself just after taking the lock
        if holder != "another process":
          break
        time.sleep(0.05)
        holder = _read_holder(fd)
      os.close(fd)
      if busy:
        raise WorkdirBusyError(f"{self.workdir} is in use by {holder}; wait for that run to "
                               "finish (or stop it), or use another directory") from None
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return self._acquire_exclusive_file()
      raise FileError(os_error_message(e, self.path, "lock")) from None
    self._fd = fd
    _write_holder(fd)
    return self

  def _acquire_exclusive_file(self) -> "WorkdirLock":
    path = self.path + ".held"
    for _ in range(2):
      try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
      except FileExistsError:
        holder = _holder_info(path)
        if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
          log.warning("removing the stale lock %s of dead process %s", path, holder.get("pid"))
          os.unlink(path)
          continue
        raise WorkdirBusyError(f"{self.workdir} is in use by {_describe(holder)}; wait for that "
                               f"run to finish, or delete {path} if it is gone, or use another "
                               "directory") from None
      except OSError as e:
        raise FileError(os_error_message(e, path)) from None
      _write_holder(fd)
      os.close(fd)
      self._excl = path
      return self
    raise WorkdirBusyError(f"{self.workdir} is in use (lock {path})")

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing releases the flock
      self._fd = None
    if self._excl is not None:
      try:
        os.unlink(self._excl)
      except OSError:
        pass
      self._excl = None

  @property
  def held(self) -> bool:
    return self._fd is not None or self._excl is not None

  def __enter__(self) -> "WorkdirLock":
    if not self.held:
      self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()

  def __del__(self):
    self.release()


class NoLock:
  """What processes other than 0 hold: process 0 holds the workdir's lock for all of them."""

  held = True

  def __enter__(self) -> "NoLock":
    return self

  def __exit__(self, *exc) -> None:
    pass

  def release(self) -> None:
    pass


def _write_holder(fd: int) -> None:
  info = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  try:
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)
  except OSError:
    pass  # who holds the lock is only for messages


def _read_holder(fd: int) -> str:
  try:
    return _describe(json.loads(os.pread(fd, 4096, 0).decode() or "{}"))
  except (OSError, ValueError):
    return "another process"


def _holder_info(path: str) -> dict:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _describe(holder: dict) -> str:
  if not holder.get("pid"):
    return "another process"
  return (f"process {holder['pid']} on {holder.get('host', '?')} (since "
          f"{holder.get('since', '?')})")


def _alive(pid: Any) -> bool:
  try:
    os.kill(int(pid), 0)
  except (TypeError, ValueError, ProcessLookupError):
    return False
  except PermissionError:
    return True
  return True
