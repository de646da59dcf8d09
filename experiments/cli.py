"""The command line shared by every experiment script: ``--config``, ``--workdir``, ``--overwrite``.

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

from prunejax.errors import PrunejaxError
from prunejax.train import NumericalError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")


def default_workdir(config_name: str) -> str:
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{config_name}-{stamp}")


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
    except Exception as e:  # noqa: BLE001 - config_flags wraps a missing file in several types.
      _fail(f"--config: {str(e).splitlines()[0]}")
    workdir = flags.FLAGS.workdir or default_workdir(config.get("name", "run"))
    logging.getLogger("absl").setLevel(logging.WARNING)
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
    _fail(str(e).splitlines()[0])
  except Exception as e:  # noqa: BLE001 - a config file that does not load, an override of a
    # field that does not exist: ml_collections raises KeyError/AttributeError/IOError here.
    _fail(f"--config: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")


def _fail(message: str, code: int = 2) -> None:
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)
