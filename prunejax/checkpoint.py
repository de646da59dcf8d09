"""Resumable work: a lock on the workdir, finished units, per-round and mid-run checkpoints, and
stopping cleanly on a signal.

* :class:`WorkdirLock`: one run per workdir. The lock is an ``flock`` held for the run's life, so
  the kernel releases it on any exit (a crash or ``kill -9`` included) and a stale lock never
  blocks.
* :class:`Units`: the result of each finished unit of work (a training run, a round) as one JSON
  file with a fingerprint of what made it (config, data, code), a checksum, and the digests of the
  files the unit wrote (subsets, masks); rerunning skips finished units whose record, fingerprint
  and files all check out, and recomputes any other.
* :class:`RoundCheckpoints`: one orbax checkpoint per finished round of an iterative loop (IMP's
  trained weights, mask and rewind point); a damaged round falls back to the one before.
* :class:`RunCheckpoint`: the state of one training run mid-way (train state, online-pruner state,
  the epoch's plan and position, counters), so a killed or preempted run resumes at the batch where it
  stopped and ends with the same result as an uninterrupted one.
* Stopping: :func:`install_signal_handlers` turns SIGTERM and SIGINT into a request that training
  loops honour at the next step (:func:`stop_at_step`: save a mid-run checkpoint, then raise
  :class:`Interrupted`) and :meth:`Units.run` at the next unit. With several processes every process
  stops at the same step through JAX's preemption service (a preemption notice on cloud TPUs is a
  SIGTERM: the same path).

Every orbax checkpoint carries the fingerprint of the run that wrote it and a digest of its arrays,
checked on restore. Only process 0 writes JSON; orbax checkpoints are written by all processes
together.
"""

from __future__ import annotations

import contextvars
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import time
import weakref
from typing import Any, Callable, Iterable

import jax
import numpy as np

from prunejax.errors import FileError, WorkdirBusyError
from prunejax.fileio import (atomic_write_json, makedirs, npz_digest, os_error_message, read_json,
                             to_json)
from prunejax.parallel import barrier

log = logging.getLogger("prunejax")

# ----------------------------------------------------------------------------------------------
# Stopping on a signal or a preemption notice.
# ----------------------------------------------------------------------------------------------


class Interrupted(BaseException):
  """The run stopped on SIGTERM or SIGINT at a step or unit boundary, its state saved up to there.

  A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way out
  swallows it. ``exit_code`` is ``128 + signum`` (143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, signum: int, detail: str):
    super().__init__(detail)
    self.signum = int(signum)
    self.detail = detail

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name


_STOP: dict[str, Any] = {"signum": None}
_STEPS = [0]  # training steps taken by this process, the step ids of JAX's preemption sync


def request_stop(signum: int = signal.SIGTERM) -> None:
  """Asks the run to stop at the next training step or unit boundary (what the signal handlers
  do)."""
  _STOP["signum"] = int(signum)


def stop_requested() -> int | None:
  """The signal number of a pending stop request, or None."""
  return _STOP["signum"]


def clear_stop() -> None:
  """Forgets a stop request (for a process that runs several experiments, e.g. tests)."""
  _STOP["signum"] = None


def stop_at_step(steps: int = 1) -> bool:
  """Whether training must save and stop after the step that just ended; call it after every step
  (or after every chunk of ``steps`` steps run in one dispatch).

  One process: whether a stop was requested. Several: whether every process has reached the step
  that JAX's preemption service chose after a SIGTERM to any of them
  (``multihost_utils.reached_preemption_sync_point``), so all save the same step together.
  """
  _STEPS[0] += steps
  kill_point("step", steps)
  if _multi_process():
    from jax.experimental import multihost_utils
    try:
      return bool(multihost_utils.reached_preemption_sync_point(_STEPS[0]))
    except RuntimeError:  # the preemption service is disabled
      return False
  return _STOP["signum"] is not None


_KILL_COUNTS = {"step": 0, "unit": 0}
KILL_AT_ENV = "PRUNEJAX_KILL_AT"


def kill_point(kind: str, count: int = 1) -> None:
  """Fault injection for tests of resumption: with ``PRUNEJAX_KILL_AT=KIND:N`` in the environment
  (``step:N`` or ``unit:N``) the process kills itself with SIGKILL once it has completed N training
  steps (at the end of the dispatch that reaches N, when steps run in chunks), or right after the
  N-th unit record it writes. ``KIND:N:SIGNAME`` (``step:3:SIGTERM``) sends that signal instead, as
  a user or a scheduler would. A test then knows
  exactly where the run died, however fast or slow the machine is. Unset: does nothing."""
  spec = os.environ.get(KILL_AT_ENV)
  if not spec:
    return
  want, n, *name = spec.split(":")
  if (want not in _KILL_COUNTS or not n.isdigit() or len(name) > 1
      or name and name[0] not in signal.Signals.__members__):
    raise ValueError(f"{KILL_AT_ENV}={spec!r}; expected 'step:N' or 'unit:N', optionally "
                     "followed by ':SIGNAME'")
  before = _KILL_COUNTS[kind]
  _KILL_COUNTS[kind] += count
  if kind == want and before < int(n) <= _KILL_COUNTS[kind]:
    os.kill(os.getpid(), signal.Signals[name[0]] if name else signal.SIGKILL)


def interrupted_at_step(step: int, saved: bool) -> Interrupted:
  """The :class:`Interrupted` a training loop raises after :func:`stop_at_step` said to stop."""
  return Interrupted(_STOP["signum"] or signal.SIGTERM,
                     f"saved the training run in progress at step {step}" if saved else
                     f"stopped a training run at step {step} (it has no mid-run checkpoint and "
                     "starts over)")


def check_stop(where: str) -> None:
  """Raises :class:`Interrupted` at a unit boundary if a stop was requested (one process only:
  several processes stop together at a training step, :func:`stop_at_step`)."""
  if _STOP["signum"] is not None and not _multi_process():
    raise Interrupted(_STOP["signum"], f"stopped before {where}")


def _multi_process() -> bool:
  return jax.distributed.is_initialized()  # never starts a backend (safe in a signal handler)


def _on_signal(signum, frame):  # noqa: ARG001 - the signal module's handler signature
  if _STOP["signum"] is not None:  # a second signal: stop at once
    raise Interrupted(signum, "stopped at once on a second signal; the work since the last "
                      "finished unit or checkpoint is lost")
  request_stop(signum)
  if signum == signal.SIGINT and _multi_process():
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service makes every process stop
  log.warning("received %s: stopping at the next step (send it again to stop at once)",
              signal.Signals(signum).name)


def install_signal_handlers() -> None:
  """SIGTERM and SIGINT request a stop at the next step or unit (a second one stops at once).

  Call from the main thread, before ``jax.distributed.initialize``: with several processes JAX's
  preemption service then takes SIGTERM over and makes every process stop at the same step, and
  SIGINT is passed on to it as a SIGTERM.
  """
  signal.signal(signal.SIGINT, _on_signal)
  signal.signal(signal.SIGTERM, _on_signal)


# ----------------------------------------------------------------------------------------------
# The workdir lock.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# Finished units.
# ----------------------------------------------------------------------------------------------


class _Recorder:
  """The unit being computed: its fingerprint and the files it wrote (path -> content digest)."""

  def __init__(self, units: "Units", key: str):
    self.units, self.key = units, key
    self.files: dict[str, str] = {}

  @property
  def fingerprint(self) -> str:
    return self.units.fingerprint

  def add(self, path: str, digest: str) -> None:
    self.files[self.units.relpath(path)] = digest


_CURRENT: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar("prunejax_unit",
                                                                           default=None)


def current_unit() -> _Recorder | None:
  """The unit :meth:`Units.run` is computing (files written with ``experiments.common.save_npz``
  register with it), or None."""
  return _CURRENT.get()


def _sha(obj: Any) -> str:
  return hashlib.sha256(to_json(obj).encode()).hexdigest()[:32]


class Units:
  """Finished units of work, one JSON file each under ``workdir/units``; resuming skips them.

  A unit's file holds its result, the ``fingerprint`` of the run that computed it, a checksum of the
  result and the content digest of every file the unit wrote. A unit counts as finished only if all
  of these check out; otherwise (a damaged or foreign record, a missing or changed file) it is
  recomputed, and a record that does not parse or fails its checksum is moved aside to
  ``*.corrupt``.
  """

  def __init__(self, workdir: str, fingerprint: str = ""):
    self.workdir = os.path.abspath(workdir)
    self.dir = os.path.join(self.workdir, "units")
    self.fingerprint = fingerprint
    makedirs(self.dir)

  def _path(self, key: str) -> str:
    return os.path.join(self.dir, key.replace("/", "_") + ".json")

  def relpath(self, path: str) -> str:
    return os.path.relpath(os.path.abspath(path), self.workdir)

  def get(self, key: str) -> Any | None:
    """The result of a finished unit, or None if it is not finished (or does not check out)."""
    path = self._path(key)
    if not os.path.exists(path):
      return None
    try:
      record = read_json(path)
    except FileError as e:
      return self._reject(key, path, str(e), move_aside=True)
    if (not isinstance(record, dict) or not {"key", "fingerprint", "sha256", "result", "files"}
        <= set(record) or not isinstance(record["files"], dict)):
      return self._reject(key, path, "its record is damaged or from an older prunejax",
                          move_aside=True)
    if record["key"] != key or _sha(record["result"]) != record["sha256"]:
      return self._reject(key, path, "its record fails its checksum (damaged)", move_aside=True)
    if record["fingerprint"] != self.fingerprint:
      return self._reject(key, path, "it was computed with another config, dataset or code "
                          "version", move_aside=False)
    for rel, digest in record["files"].items():
      file = os.path.join(self.workdir, rel)
      try:
        ok = npz_digest(file) == digest
      except FileError as e:
        return self._reject(key, path, str(e), move_aside=False)
      if not ok:
        return self._reject(key, path, f"{file} was changed since", move_aside=False)
    return record["result"]

  def _reject(self, key: str, path: str, why: str, move_aside: bool) -> None:
    log.warning("unit %s is recomputed: %s", key, why)
    if move_aside and jax.process_index() == 0:
      try:
        os.replace(path, path + ".corrupt")
      except OSError:
        pass
    return None

  def run(self, key: str, fn: Callable[[], Any], files: Iterable[str] = ()) -> Any:
    """``fn()``'s result for unit ``key``: read back if finished, else computed and written.

    Files that ``fn`` writes with ``experiments.common.save_npz`` are recorded with the unit, as are
    ``files`` (already written); the unit counts as finished only while they are intact.
    """
    done = self.get(key)
    if done is not None:
      return done
    check_stop(f"unit {key}")
    rec = _Recorder(self, key)
    token = _CURRENT.set(rec)
    try:
      result = fn()
    finally:
      _CURRENT.reset(token)
    if jax.process_index() == 0:
      for f in files:
        rec.add(f, npz_digest(f))
      atomic_write_json(self._path(key), {"key": key, "fingerprint": self.fingerprint,
                                          "sha256": _sha(result), "files": rec.files,
                                          "result": result})
    kill_point("unit")
    barrier(f"unit {key}")  # every process sees the file before going on
    return result


# ----------------------------------------------------------------------------------------------
# Orbax checkpoints.
# ----------------------------------------------------------------------------------------------

_OPEN: list = []  # weak references to open checkpoint managers, in the order they were opened


def _opened(manager) -> Any:
  _OPEN[:] = [r for r in _OPEN if r() is not None]
  _OPEN.append(weakref.ref(manager))
  return manager


def close_all() -> None:
  """Closes every checkpoint manager still open (their background threads end), in the order they
  were opened (the same on every process), e.g. when a run stops on an error, so the process can
  exit."""
  while _OPEN:
    manager = _OPEN.pop(0)()
    if manager is not None:
      try:
        manager.close()
      except Exception:  # noqa: BLE001 - closing on the way out must not raise.
        pass


def tree_digest(tree: Any) -> str:
  """SHA-256 (hex, 32 characters) of a pytree's leaves: their paths, dtypes, shapes and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    a = np.asarray(leaf)
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype.str}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()[:32]


_WRITE_FAILURES = {"No space left": "No space left on device", "RESOURCE_EXHAUSTED":
                   "No space left on device", "Disk quota": "Disk quota exceeded",
                   "Read-only file system": "Read-only file system",
                   "Permission denied": "Permission denied",
                   "PERMISSION_DENIED": "Permission denied"}
_ADVICE = {"No space left on device": "free space (or use another workdir), then rerun to resume",
           "Disk quota exceeded": "free space (or use another workdir), then rerun to resume",
           "Read-only file system": "use a writable workdir",
           "Permission denied": "fix the permissions or use another workdir"}


def _write_failure(text: str) -> str | None:
  """The reason of an orbax / tensorstore write failure in ``text`` (None if it is not one)."""
  hits = [reason for key, reason in _WRITE_FAILURES.items() if key in text]
  return min(hits, key=lambda r: r == "No space left on device") if hits else None


class _QuietWriteFailures(logging.Filter):
  """Drops orbax's own tracebacks of a write failure (disk full, read-only, no permission) that
  prunejax reports in one line (:class:`~prunejax.errors.FileError`)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR or "orbax" not in record.pathname:
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return _write_failure(text) is None


logging.getLogger("absl").addFilter(_QuietWriteFailures())  # orbax logs through absl


def _saving(directory: str, fn: Callable[[], None]) -> None:
  """Runs an orbax save, turning write failures into a one-line :class:`FileError`."""
  try:
    fn()
  except OSError as e:
    raise FileError(os_error_message(e, directory)) from None
  except Exception as e:  # noqa: BLE001 - orbax and tensorstore wrap I/O errors in many types.
    reason = _write_failure(str(e))
    if reason is None:
      raise
    raise FileError(f"cannot write the checkpoint {directory}: {reason}; {_ADVICE[reason]}") \
        from None


def _abstract(like: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)


class _Foreign(Exception):
  """A checkpoint of another run (its fingerprint differs)."""


class RoundCheckpoints:
  """One orbax checkpoint per finished round of an iterative loop, under ``workdir/checkpoints/key``.

  ``save(round, tree)`` is atomic (orbax writes to a temporary folder and renames it), so a killed
  run leaves either the whole round or nothing; ``restore(round, like)`` reads a round back into the
  structure of ``like``, checking the fingerprint of the run that wrote it and the digest of its
  arrays.
  """

  def __init__(self, workdir: str, key: str, fingerprint: str = ""):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = os.path.abspath(os.path.join(workdir, "checkpoints", key))
    self.fingerprint = fingerprint
    self.manager = self._manager()

  def _manager(self):
    return _opened(self._ocp.CheckpointManager(
        self.dir, options=self._ocp.CheckpointManagerOptions(max_to_keep=None, create=True),
        item_names=("tree", "meta")))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like: Any) -> tuple[int | None, Any]:
    """(round, state) of the newest round that restores cleanly; a damaged round is moved aside
    (``<round>.corrupt-<time>``) and a round of another run deleted, and the one before it is tried,
    so the run redoes the lost rounds instead of starting over or crashing. (None, None) when no
    round survives."""
    while (step := self.latest()) is not None:
      try:
        return step, self.restore(step, like)
      except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files.
        foreign = isinstance(e, _Foreign)
        log.warning("checkpoint %s round %d %s; falling back", self.dir, step,
                    "is of another run" if foreign else f"is damaged ({type(e).__name__})")
        self.manager.close()
        if jax.process_index() == 0:
          src = os.path.join(self.dir, str(step))
          if foreign:
            shutil.rmtree(src, ignore_errors=True)
          else:
            os.replace(src, os.path.join(self.dir, f"{step}.corrupt-{time.time_ns()}"))
        barrier(f"fallback {self.dir} {step}")
        self.manager = self._manager()
    return None, None

  def save(self, rnd: int, tree: Any) -> None:
    host = jax.device_get(tree)
    meta = {"fingerprint": self.fingerprint, "digest": tree_digest(host)}
    args = self._ocp.args.Composite(tree=self._ocp.args.StandardSave(host),
                                    meta=self._ocp.args.JsonSave(meta))

    def save():
      self.manager.save(rnd, args=args)
      self.manager.wait_until_finished()
    _saving(self.dir, save)

  def restore(self, rnd: int, like: Any) -> Any:
    """Round ``rnd`` in the structure of ``like``.

    Raises:
      FileError: the round was written by another run, or its arrays fail their digest.
    """
    got = self.manager.restore(rnd, args=self._ocp.args.Composite(
        tree=self._ocp.args.StandardRestore(_abstract(like)), meta=self._ocp.args.JsonRestore()))
    meta = dict(got["meta"] or {})
    if meta.get("fingerprint") != self.fingerprint:
      raise _Foreign(f"{self.dir} round {rnd} was written by another run")
    if meta.get("digest") != tree_digest(got["tree"]):
      raise FileError(f"{self.dir} round {rnd} is damaged (its arrays fail their digest)")
    return got["tree"]

  def close(self) -> None:
    self.manager.close()


class RunCheckpoint:
  """The state of one training run mid-way, in ``directory`` (one orbax checkpoint, replaced on each
  save): a pytree of arrays and a JSON-able ``meta`` dict (epoch, batch, counters, ...).

  ``restore(like)`` returns ``(tree, meta)`` or None when there is nothing (or nothing readable,
  or only a checkpoint of another run: ``fingerprint``) to resume from; ``delete()`` removes it once
  the run's result is safely stored.
  """

  def __init__(self, directory: str, fingerprint: str = ""):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = os.path.abspath(directory)
    self.fingerprint = fingerprint
    self.manager = _opened(ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_names=("tree", "meta")))
    self._saves = int(self.manager.latest_step() or 0)

  def save(self, tree: Any, meta: dict) -> None:
    self._saves += 1
    host = jax.device_get(tree)
    meta = {**meta, "_fingerprint": self.fingerprint, "_digest": tree_digest(host)}
    args = self._ocp.args.Composite(tree=self._ocp.args.StandardSave(host),
                                    meta=self._ocp.args.JsonSave(meta))

    def save():
      self.manager.save(self._saves, args=args)
      self.manager.wait_until_finished()
    _saving(self.dir, save)

  def _meta(self, step: int) -> dict | None:
    try:
      got = self.manager.restore(step, args=self._ocp.args.Composite(
          meta=self._ocp.args.JsonRestore()))
    except Exception:  # noqa: BLE001 - damaged: treated as absent.
      return None
    meta = dict(got["meta"] or {})
    if meta.get("_fingerprint") != self.fingerprint:
      log.warning("run checkpoint %s was written by another run; starting the run over", self.dir)
      return None
    return meta

  def meta(self) -> dict | None:
    """The ``meta`` of the saved state (None when there is none, it does not read, or it is of
    another run)."""
    step = self.manager.latest_step()
    meta = None if step is None else self._meta(step)
    return None if meta is None else {k: v for k, v in meta.items() if not k.startswith("_")}

  def restore(self, like: Any) -> tuple[Any, dict] | None:
    step = self.manager.latest_step()
    if step is None or self._meta(step) is None:
      return None
    try:
      got = self.manager.restore(step, args=self._ocp.args.Composite(
          tree=self._ocp.args.StandardRestore(_abstract(like)), meta=self._ocp.args.JsonRestore()))
      meta = dict(got["meta"])
      if meta.get("_digest") != tree_digest(got["tree"]):
        raise FileError("its arrays fail their digest")
    except Exception as e:  # noqa: BLE001 - a damaged or incompatible checkpoint: start over.
      log.warning("run checkpoint %s does not restore (%s); starting the run over", self.dir,
                  type(e).__name__)
      return None
    return got["tree"], {k: v for k, v in meta.items() if not k.startswith("_")}

  def delete(self) -> None:
    self.manager.close()
    if jax.process_index() == 0 and os.path.isdir(self.dir):
      shutil.rmtree(self.dir, ignore_errors=True)
    barrier(f"delete {self.dir}")

  def close(self) -> None:
    self.manager.close()
