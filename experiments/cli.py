"""The command line shared by every experiment script: ``--config``, ``--workdir``, ``--overwrite``.

Logging: prunejax's own progress at INFO and other libraries' records (orbax, absl, TFDS, grain,
jax compilation) at WARNING and above; absl's ``--verbosity=N`` (``-v N``) shows everyone's at
that level (0: INFO, 1: DEBUG, -1: WARNING).

User errors (a bad config value, a bad flag, a workdir that is a file, ...) print one line on stderr and
exit with code 2, without a traceback.
"""

from __future__ import annotations

import datetime
import logging
import os
import sys
from typing import Callable

from absl import app, flags
from ml_collections import config_flags

import prunejax
from prunejax.errors import PrunejaxError
from prunejax.train import NumericalError

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
  flags.DEFINE_bool("overwrite", False, "clear a workdir that holds a different config")
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
    try:
      from prunejax import parallel
      parallel.initialize_distributed(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes,
                                      flags.FLAGS.process_id)
      run(config, workdir, overwrite=flags.FLAGS.overwrite)
    except PrunejaxError as e:
      _fail(str(e))
    except NumericalError as e:
      _fail(str(e), code=3)

  try:
    app.run(_main, flags_parser=_parse_flags)
  except SystemExit:
    raise


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


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
