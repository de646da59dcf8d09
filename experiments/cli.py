"""The command line shared by every experiment script: ``--config``, ``--workdir``, ``--overwrite``.

Logging: prunejax's own progress at INFO and other libraries' records (orbax, absl, TFDS, grain,
jax compilation) at WARNING and above; absl's ``--verbosity=N`` (``-v N``) shows everyone's at
that level (0: INFO, 1: DEBUG, -1: WARNING).

Every way a run can end prints at most one line of its own on stderr, without a traceback, and has
its exit code:

* 0: finished;
* 2: a user error (a bad config value, a bad flag, a workdir that is a file or holds another
  config);
* 3: a non-finite loss or gradient (the line names the run, epoch, step and examples);
* 74: a file could not be written or read (disk full, read-only, no permission; the line names it);
* 75: another run holds the workdir (the line names its process); wait for it or use another;
* 130 / 143: stopped by SIGINT / SIGTERM (or a preemption notice) at the next step, after saving the
  training run in progress; rerunning the same command resumes it. A second signal stops at once.
"""

from __future__ import annotations

import datetime
import errno
import logging
import os
import sys
import threading
import time
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

import prunejax
from prunejax.errors import ConfigError, FileError, PrunejaxError, WorkdirBusyError
from prunejax.train import NumericalError

EXIT_IO = 74  # sysexits' EX_IOERR: a file could not be written or read
EXIT_BUSY = 75  # sysexits' EX_TEMPFAIL: another run holds the workdir; try again later
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def default_workdir(config_name: str) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{config_name}-{stamp}")


# Records logged from these folders are prunejax's own: the library and the experiments.
_OWN_DIRS = (os.path.dirname(os.path.abspath(prunejax.__file__)) + os.sep,
             os.path.dirname(os.path.abspath(__file__)) + os.sep)


class OwnProgressFilter(logging.Filter):
  """Passes prunejax's own log records at every level and other libraries' at WARNING and above.

  Orbax, TFDS, grain and absl log through absl's logger, so a record is told apart by the file that
  logged it (prunejax/ and experiments/) or by a ``prunejax`` logger name, not by the logger alone.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return (record.levelno >= logging.WARNING or record.name.split(".")[0] == "prunejax"
            or os.path.abspath(record.pathname).startswith(_OWN_DIRS))


def configure_logging(verbosity_given: bool) -> None:
  """prunejax's progress at INFO, third-party libraries (orbax, absl, TFDS, grain, jax compilation)
  at WARNING; with ``--verbosity`` (``-v``) given, absl's verbosity alone decides, for everyone.

  Call after the flags are parsed (``app.run`` installs absl's handler on the root logger).
  """
  handlers = logging.getLogger().handlers
  for h in handlers:
    for f in [f for f in h.filters if isinstance(f, OwnProgressFilter)]:
      h.removeFilter(f)
  if verbosity_given:
    return
  for h in handlers:
    h.addFilter(OwnProgressFilter())


def main(run: Callable, default_config: str) -> None:
  """Defines the flags and runs ``run(config, workdir)`` with one-line user errors."""
  config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, default_config),
                                  "experiment config file (path[:variant], e.g. :quick)",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "where checkpoints and results go; rerun with the same "
                      "workdir to resume (default: a fresh folder under runs/)")
  flags.DEFINE_bool("overwrite", False, "delete everything in the workdir (a run of this or "
                    "another config) and start over")
  flags.DEFINE_string("coordinator_address", None, "multi-process runs: host:port of process 0 "
                      "(or $PRUNEJAX_COORDINATOR)")
  flags.DEFINE_integer("num_processes", None, "multi-process runs: number of processes, -1 to let "
                       "JAX detect it on TPU/SLURM (or $PRUNEJAX_NUM_PROCESSES)")
  flags.DEFINE_integer("process_id", None, "multi-process runs: this process's index "
                       "(or $PRUNEJAX_PROCESS_ID)")

  def _main(argv):
    if len(argv) > 1:
      _fail(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
      config = flags.FLAGS.config
      config.get("name")  # a config file that failed to load raises only when first used
    except Exception as e:  # noqa: BLE001 - config_flags wraps a missing file in several types.
      _fail(f"--config: {_last_line(e)}")
    workdir = flags.FLAGS.workdir or default_workdir(config.get("name", "run"))
    configure_logging(verbosity_given=bool(flags.FLAGS["verbosity"].present))
    code = 1
    try:
      _guarded(run, config, workdir)
      code = 0
    except SystemExit as e:
      code = e.code if isinstance(e.code, int) else 1
      raise
    finally:
      _exit_watchdog(code)

  from prunejax import checkpoint
  _quiet_closed_loop_callbacks()
  # SIGTERM and SIGINT stop the run at the next step, saved (before jax.distributed.initialize,
  # whose preemption service then takes SIGTERM over when there are several processes).
  checkpoint.install_signal_handlers()
  try:
    app.run(_main, flags_parser=_parse_flags)
  except SystemExit:
    raise


def _guarded(run: Callable, config, workdir: str) -> None:
  """Runs the experiment; user errors, write failures, interrupts and numerical faults end it with
  one line on stderr and an exit code of their own (see the module docstring)."""
  from prunejax import checkpoint, parallel
  try:
    parallel.initialize_distributed(*_distributed_args())
    run(config, workdir, overwrite=flags.FLAGS.overwrite)
  except checkpoint.Interrupted as e:
    _fail(f"interrupted by {e.signal_name}: {e.detail}; rerun the same command to resume",
          code=e.exit_code, prefix="")
  except KeyboardInterrupt:
    _fail("interrupted by SIGINT before the run started or while stopping; rerun the same command "
          "to resume from the last finished unit", code=130, prefix="")
  except WorkdirBusyError as e:
    _fail(str(e), code=EXIT_BUSY)
  except FileError as e:
    _fail(str(e), code=EXIT_IO)
  except PrunejaxError as e:
    _fail(str(e))
  except NumericalError as e:
    _fail(str(e), code=3)
  except OSError as e:  # a write outside prunejax's own files (plots, TensorBoard events, ...)
    from prunejax.fileio import os_error_message
    _fail(os_error_message(e, e.filename or workdir, "write" if e.errno in _WRITE_ERRNOS else
                           "use"), code=EXIT_IO)


def _distributed_args() -> tuple[str | None, int | None, int | None]:
  """--coordinator_address, --num_processes, --process_id, or their environment variables,
  checked."""
  f = flags.FLAGS
  return (f.coordinator_address or os.environ.get("PRUNEJAX_COORDINATOR"),
          f.num_processes if f.num_processes is not None else _env_int("PRUNEJAX_NUM_PROCESSES"),
          f.process_id if f.process_id is not None else _env_int("PRUNEJAX_PROCESS_ID"))


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value.strip() == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ConfigError(f"{name}={value!r} is not an integer; set it to an integer or unset it") \
        from None


def _quiet_closed_loop_callbacks() -> None:
  """Drops one known echo of an already reported write failure: when a checkpoint write fails,
  orbax closes its event loop while TensorStore still completes the other writes of that save, and
  their done-callbacks (``loop.call_soon_threadsafe``) raise ``RuntimeError: Event loop is closed``
  on TensorStore's threads, which report it as unraisable (a bare traceback). Only that error, raised from asyncio's
  ``_check_closed``, is dropped (logged at DEBUG); everything else goes to the previous hook."""
  previous_hook = sys.unraisablehook

  def hook(unraisable):
    value, tb, last = unraisable.exc_value, unraisable.exc_traceback, None
    while tb is not None:
      last, tb = tb, tb.tb_next
    if (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"
        and last is not None and last.tb_frame.f_code.co_name == "_check_closed"):
      logging.getLogger("prunejax").debug("ignored after a failed write: %s", value)
      return
    previous_hook(unraisable)

  sys.unraisablehook = hook


def _exit_watchdog(code: int, seconds: float = 60.0) -> None:
  """Ends the process with ``code`` if it has not exited ``seconds`` after the run: no background
  thread (a checkpoint writer stuck on a failed file system) can keep a finished run, and the
  machine it holds, alive."""
  def watch():
    time.sleep(seconds)
    print(f"error: background threads still running {seconds:.0f} s after the run ended; "
          "exiting anyway", file=sys.stderr, flush=True)
    os._exit(code)
  threading.Thread(target=watch, daemon=True, name="exit-watchdog").start()


def _parse_flags(argv):
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    line = str(e).splitlines()[0]
    _fail(line if not line.rstrip().endswith(":") else f"{line} {_last_line(e)}")
  except (KeyError, AttributeError) as e:  # an override of a field that does not exist
    _fail(f"--config: no such config field {str(e).strip(chr(34))}; see the config file for the "
          "fields that exist")
  except Exception as e:  # noqa: BLE001 - a config file that does not load, an override of a
    # field that does not exist: ml_collections raises KeyError/AttributeError/IOError here.
    _fail(f"--config: {_last_line(e)}")


def _last_line(e: BaseException) -> str:
  """The informative line of an error that config_flags may have wrapped around a traceback."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  if not lines:
    return type(e).__name__
  errno = [l for l in lines if "No such file" in l or "Errno" in l]
  return errno[-1] if errno else lines[-1]


def _fail(message: str, code: int = 2, prefix: str = "error: ") -> None:
  print(f"{prefix}{message}", file=sys.stderr, flush=True)
  sys.exit(code)
