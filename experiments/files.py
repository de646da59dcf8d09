"""The workdir of a run and the files it writes: the config stamp and lock
(:func:`prepare_workdir`), the fingerprints that tie every file to the config, data and code that
made it, and :func:`save_npz` / :func:`save_mask`.

Below every strategy and cleaning step: it imports nothing from the rest of ``experiments``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from prunejax import data
from prunejax.errors import ConfigError
from prunejax.fileio import atomic_write_json

RESULT_NEUTRAL_FIELDS = (
    "name", "strategies", "replicates", "train.progress", "train.eval_batch_size",
    "train.checkpoint_every_steps", "train.checkpoint_minutes", "dataset.cache_dir",
    "dataset.num_threads", "dataset.data_dir", "dataset.manual_dir", "dataset.download",
    "data_pruning.keep_fractions", "data_pruning.conventions", "pai.methods", "pai.sparsities")
"""Config fields outside the fingerprint: they cannot change the result of any unit of work. Either
they do not touch the numbers (names, progress bars, the evaluation batch size, checkpoint cadence,
cache and data paths: the data itself is fingerprinted) or they only choose *which* units run, and
every unit's key names its own choice (strategies, replicates, keep fractions, conventions, PaI
methods and sparsities); so adding a strategy, a seed or a keep fraction to a finished run reuses
its finished units."""


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def result_fields(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """The config's fields that can change results (dotted names -> JSON values)."""
  d = config.to_dict() if hasattr(config, "to_dict") else config
  flat = json.loads(json.dumps(_flatten(d), sort_keys=True, default=str))
  neutral = lambda k: any(k == f or k.startswith(f + ".") for f in RESULT_NEUTRAL_FIELDS)
  return {k: v for k, v in flat.items() if not neutral(k)}


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A stable hash of the config fields that change results (:func:`result_fields`)."""
  text = json.dumps(result_fields(config), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """A hash of the code that computes results: every source file of prunejax and experiments (the
  config files aside: their values are fingerprinted) and the versions of the numerical
  libraries."""
  import importlib.metadata
  import prunejax
  h = hashlib.sha256()
  roots = {"prunejax": os.path.dirname(os.path.abspath(prunejax.__file__)),
           "experiments": os.path.dirname(os.path.abspath(__file__))}
  for name, root in sorted(roots.items()):
    for directory, subdirs, files in os.walk(root):
      subdirs[:] = sorted(d for d in subdirs if d not in ("configs", "__pycache__"))
      for f in sorted(files):
        if f.endswith(".py"):
          path = os.path.join(directory, f)
          h.update(os.path.relpath(path, root).encode())
          with open(path, "rb") as fh:
            h.update(fh.read())
  for dist in ("jax", "jaxlib", "flax", "optax", "numpy"):
    try:
      h.update(f"{dist}=={importlib.metadata.version(dist)}".encode())
    except importlib.metadata.PackageNotFoundError:
      pass
  return h.hexdigest()[:16]


def _x_digest(split: data.Source, h) -> None:
  shape, dtype = split.spec["x"]
  n_bytes = len(split) * int(np.prod(shape)) * np.dtype(dtype).itemsize
  ids = split.ids
  if not (split.in_memory and n_bytes <= 256 << 20):  # large or on disk: a fixed sample
    ids = np.unique(np.concatenate([ids[:64], ids[-64:], ids[:: max(len(ids) // 128, 1)]]))
  for i in range(0, len(ids), 4096):
    h.update(np.ascontiguousarray(split.read(ids[i:i + 4096])["x"]).tobytes())


def dataset_fingerprint(ds: data.Dataset) -> str:
  """A hash of what a dataset holds: name, classes, kind, meta, and each split's ids, labels and
  inputs (all inputs of an in-memory split up to 256 MB, else a fixed sample of them)."""
  h = hashlib.sha256(json.dumps([ds.name, ds.num_classes, ds.kind, ds.meta], sort_keys=True,
                                default=str).encode())
  for split in (ds.train, ds.test):
    h.update(np.asarray(split.ids, np.int64).tobytes())
    h.update(np.asarray(split.labels(), np.int64).tobytes())
    _x_digest(split, h)
  return h.hexdigest()[:16]


def run_fingerprint(config: ml_collections.ConfigDict, ds: data.Dataset) -> str:
  """What every unit, score, subset, mask and checkpoint file of a run carries: a hash of the config
  fields that change results, the data (splits, ids, labels, inputs) and the code version."""
  parts = [config_fingerprint(config), dataset_fingerprint(ds), code_version()]
  return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def config_differences(old: dict, new: dict) -> list[str]:
  """``"field: OLD there, NEW here"`` for every result field that differs between two config
  dicts."""
  a, b = result_fields(old), result_fields(new)
  show = lambda d, k: json.dumps(d[k]) if k in d else "(absent)"
  return [f"{k}: {show(a, k)} there, {show(b, k)} here"
          for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]


_MISSING = object()
_RUN: dict[str, str | None] = {"fingerprint": None}  # of the run set up last (files outside units)
_OURS = ("config.json", "units", "checkpoints", "scores", "subsets", "masks", "results.json")


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool):
  """Takes ``workdir`` for this run: locks it, then creates it or checks that it holds a run of the
  same config (to resume it), and stamps it with the config.

  Returns the lock (:class:`prunejax.checkpoint.WorkdirLock`; with several processes process 0 holds
  it): hold it for the run's life (``with``), it is released on close and on any exit. A workdir
  holding a config that differs in a field that changes results is refused, naming the fields,
  unless ``overwrite``; ``overwrite`` deletes everything in it and starts over. Fields that cannot
  change results (:data:`RESULT_NEUTRAL_FIELDS`) may differ: the stamp then records the new config.

  Raises:
    ConfigError: ``workdir`` is a file, holds another config, or is not a prunejax workdir and
      ``overwrite`` was asked.
    WorkdirBusyError: another live process holds the workdir.
    FileError: the workdir cannot be created or written.
  """
  from prunejax.checkpoint import NoLock
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir!r} is a file; expected a directory (new or from an "
                      "earlier run of the same config)")
  if jax.process_count() == 1:
    return _take_workdir(workdir, config, overwrite)
  from jax.experimental import multihost_utils
  lock, failed = NoLock(), None
  if jax.process_index() == 0:
    try:
      lock = _take_workdir(workdir, config, overwrite)
    except Exception as e:  # noqa: BLE001 - every process must hear of it before raising.
      failed = e
  code = int(multihost_utils.broadcast_one_to_all(np.int32(failed is not None)))
  if failed is not None:
    raise failed
  if code:
    raise ConfigError(f"process 0 could not take --workdir={workdir!r} (its error says why)")
  return lock


def _take_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool):
  from prunejax.checkpoint import WorkdirLock
  from prunejax.errors import FileError
  from prunejax.fileio import read_json
  lock = WorkdirLock(workdir).acquire()
  try:
    stamp = os.path.join(workdir, "config.json")
    entries = [e for e in os.listdir(workdir) if e != WorkdirLock.NAME]
    if overwrite and entries:
      if not any(e in _OURS for e in entries):
        raise ConfigError(f"--workdir={workdir!r} is not empty and holds no prunejax run; "
                          "--overwrite deletes only prunejax workdirs: choose a new or empty "
                          "directory")
      _clear(workdir, keep=WorkdirLock.NAME)
    elif os.path.exists(stamp):
      try:
        old = read_json(stamp)
        if not isinstance(old, dict) or not isinstance(old.get("config"), dict):
          raise FileError(f"{stamp} is damaged (no config)")
      except FileError as e:
        logging.warning("%s; it is rewritten, and every unit is checked against its own "
                        "fingerprint", e)
      else:
        diffs = config_differences(old["config"], config.to_dict())
        if diffs:
          more = f" and {len(diffs) - 3} more" if len(diffs) > 3 else ""
          raise ConfigError(f"--workdir={workdir!r} holds a run of a different config ("
                            f"{'; '.join(diffs[:3])}{more}); choose another --workdir, or pass "
                            "--overwrite to delete its results and start over")
        if old.get("code_version") not in (None, code_version()):
          logging.warning("the code changed since %s was last run; units computed by the old "
                          "code are recomputed", workdir)
    atomic_write_json(stamp, {"fingerprint": config_fingerprint(config),
                              "code_version": code_version(), "config": config.to_dict()})
  except BaseException:
    lock.release()
    raise
  return lock


def _clear(workdir: str, keep: str) -> None:
  from prunejax.fileio import os_error_message
  from prunejax.errors import FileError
  for e in os.listdir(workdir):
    if e == keep:
      continue
    path = os.path.join(workdir, e)
    try:
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.unlink(path)
    except OSError as err:
      raise FileError(os_error_message(err, path, "delete")) from None


def save_npz(path: str, **arrays: Any) -> None:
  """Atomic ``np.savez`` by process 0 only, with the run's fingerprint as the file's meta; inside a
  unit of work (``Units.run``) the file is recorded with the unit, which then counts as finished
  only while the file is intact."""
  from prunejax.checkpoint import current_unit
  from prunejax.fileio import atomic_savez
  unit = current_unit()
  meta = {"fingerprint": unit.fingerprint if unit is not None else _RUN["fingerprint"]}
  if jax.process_index() == 0:
    digest = atomic_savez(path, meta=meta, **arrays)
  else:
    digest = ""
  if unit is not None:
    unit.add(path, digest)


def save_mask(path: str, mask: Any) -> None:
  """A mask as ``.npz``, one boolean array per leaf, named by its path (``dense_0/kernel``)."""
  from prunejax.masks import leaf_paths
  save_npz(path, **dict(zip(leaf_paths(mask), jax.tree.leaves(jax.device_get(mask)))))



def set_run_fingerprint(fingerprint: str) -> None:
  """Stamps the files written outside any unit of work (by :func:`save_npz`) with ``fingerprint``,
  the run set up last (:func:`run_fingerprint`)."""
  _RUN["fingerprint"] = fingerprint
