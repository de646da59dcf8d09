"""What every experiment script shares: the workdir and the context a strategy
runs in (config, data, mesh, replicate splits, the loader, the units of work).

Every experiment is a list of *strategies* (``config.strategies``, see ``experiments/strategies.py``)
run by ``experiments/run.py``; the lists of names a config may use are derived from the registries
(strategies, scores, mask methods, datasets, models), never kept beside them.
"""

from __future__ import annotations

import dataclasses
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

from prunejax import data, online, parallel
from prunejax.checkpoint import Units
from prunejax.errors import ConfigError
from prunejax.fileio import atomic_write_json
from prunejax.models import build_model, make_apply_fn

# ----------------------------------------------------------------------------------------------
# The workdir.
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# The context of a run.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Context:
  """What every strategy needs: config, data, mesh, workdir, units and the input preprocessing."""

  config: ml_collections.ConfigDict
  ds: data.Dataset
  mesh: Any
  workdir: str
  units: Units
  preprocess: data.Preprocess
  corrupted_ids: np.ndarray | None = None  # training ids whose label noise flipped
  cleaning: dict | None = None  # what deduplication removed (experiments/cleaning.py)
  _device: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  def device_data(self):
    """The training split on the device (:func:`prunejax.fused.to_device`) when the fused path
    applies, else None: ``train.fused`` is on, one process, and ``dataset.device_resident`` is
    'on' (an error if the split is over the budget) or 'auto' and the split fits the budget."""
    from prunejax import fused
    cfg = self.config
    mode = cfg.dataset.get("device_resident", "auto")
    if not cfg.train.get("fused", True) or mode == "off" or jax.process_count() > 1:
      return None
    source = self.ds.train
    key = id(source)
    if key not in self._device:
      budget = device_budget_bytes(cfg)
      if mode == "auto" and not fused.fits(source, budget):
        logging.getLogger("prunejax").info(
            "the training split (%.1f MiB) is over dataset.device_budget_mb (%.1f MiB): it streams "
            "from the host, one step per dispatch", fused.source_nbytes(source) / 2**20,
            budget / 2**20)
        self._device[key] = (source, None)
      else:
        self._device[key] = (source, fused.to_device(source, budget_bytes=budget, mesh=self.mesh))
    return self._device[key][1]

  @property
  def x_example(self) -> np.ndarray:
    return self.ds.train.example()

  def model(self, **overrides):
    if self.config.model.get("checkpoint_dir"):
      return _pretrained(self.config.model.checkpoint_dir, self.ds.num_classes,
                         self.ds.meta["max_len"], self.ds.meta["pad_id"],
                         self.config.model.get("dropout"), 0, _precision(self.config))[0]
    kw = {k: v for k, v in self.config.model.to_dict().items()
          if k not in ("name", "checkpoint_dir", "dropout")}
    if self.config.model.name == "gpt":
      kw.setdefault("vocab_size", self.ds.meta["vocab_size"])
      kw.setdefault("pad_id", self.ds.meta["pad_id"])
      kw.setdefault("context", self.ds.meta["max_len"])
    kw.update(overrides)
    return build_model(self.config.model.name, self.ds.num_classes, **kw)

  def initial_variables(self, seed: int) -> dict | None:
    """The pretrained checkpoint's variables (``model.checkpoint_dir``; a new classification head
    seeded by ``seed``), or None for a fresh initialization."""
    if not self.config.model.get("checkpoint_dir"):
      return None
    params = _pretrained(self.config.model.checkpoint_dir, self.ds.num_classes,
                         self.ds.meta["max_len"], self.ds.meta["pad_id"],
                         self.config.model.get("dropout"), seed, _precision(self.config))[1]
    # A copy: train steps donate their state's buffers, the cached checkpoint must survive them.
    return {"params": jax.tree.map(lambda a: jax.numpy.array(a, copy=True), params)}

  def apply_fn(self, model):
    """``apply_fn(variables, x) -> logits`` on stored inputs (preprocessed on device)."""
    return _apply_fn(model, self.preprocess)

  def replicate_split(self, r: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(train ids, held-out ids or None, seed) of replicate ``r``: a seed, or a stratified CV fold;
    with ``validation_fraction`` (no CV), a stratified validation split held out of the pool."""
    from prunejax.scores import stratified_folds
    seed = int(self.config.seed) + r
    folds = self.config.get("cv_folds", 0)
    ids = np.sort(self.ds.train.ids)
    if not folds and self.config.get("validation_fraction", 0.0):
      # A validation split held out of every strategy's pool, the same for every replicate.
      from prunejax import select
      held = np.sort(select.select(ids, np.zeros(len(ids), np.float32),
                                   fraction=self.config.validation_fraction, keep="random",
                                   labels=self.labels(ids), class_balanced=True,
                                   seed=int(self.config.seed)))
      return np.setdiff1d(ids, held), held, seed
    if not folds:
      return ids, None, seed
    fold_of = stratified_folds(self.ds.train.labels(ids), folds, int(self.config.seed))
    return ids[fold_of != r], ids[fold_of == r], seed

  def labels(self, ids: np.ndarray) -> np.ndarray:
    return self.ds.train.labels(ids)

  def batches(self, ids: np.ndarray | None = None, *, split: str = "train", shuffle: bool = False,
              **kw):
    """This process's rows of each global batch over ``ids`` of ``split`` (one epoch)."""
    source = self.ds.train if split == "train" else self.ds.test
    kw.setdefault("batch_size", self.config.train.eval_batch_size)
    kw.setdefault("num_threads", self.config.dataset.get("num_threads"))
    return data.batches(source, ids, shuffle=shuffle, process_index=jax.process_index(),
                        process_count=jax.process_count(), **kw)

  @property
  def num_replicates(self) -> int:
    return self.config.get("cv_folds", 0) or self.config.replicates


def _precision(config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
  """The ``model.compute_dtype``, ``model.param_dtype`` and ``model.remat`` fields that are set."""
  return tuple((k, config.model[k]) for k in _PRECISION_FIELDS if config.model.get(k) is not None)


_PRECISION_FIELDS = ("compute_dtype", "param_dtype", "remat")


@functools.lru_cache(maxsize=2)
def _pretrained(checkpoint_dir: str, num_classes: int, context: int, pad_id: int,
                dropout: float | None, seed: int, precision: tuple = ()):
  from prunejax.models.pretrained import load_gpt2_classifier
  return load_gpt2_classifier(checkpoint_dir, num_classes, key=jax.random.key(seed),
                              context=context, pad_id=pad_id, dropout=dropout, **dict(precision))


@functools.lru_cache(maxsize=64)
def _apply_fn(model, preprocess):
  # One function object per (model, preprocessing): jitted scores keyed on it compile once.
  return make_apply_fn(model, preprocess)


def device_budget_bytes(config: ml_collections.ConfigDict) -> int:
  """``dataset.device_budget_mb`` in bytes; 0 means a quarter of the first device's memory, or
  2 GiB where the device does not report it (CPU)."""
  mb = config.dataset.get("device_budget_mb", 0) or 0
  if mb:
    return int(mb * 2**20)
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  return int(limit // 4) if limit else 2 * 2**30


def _check_splits(config: ml_collections.ConfigDict, ds: data.Dataset) -> None:
  dc = config.dataset
  for split in (ds.train, ds.test):
    if len(split) == 0:
      raise ConfigError(f"dataset {dc.name!r} has an empty split (num_train={dc.get('num_train')}, "
                        f"num_test={dc.get('num_test')})")
    y = split.labels()
    bad = (y < 0) | (y >= ds.num_classes)
    if np.any(bad):
      raise ConfigError(f"dataset {dc.name!r} has labels outside [0, {ds.num_classes}): "
                        f"{sorted(set(y[bad].tolist()))[:5]}")
  n_fit = len(ds.train) * (1 - 1 / config.cv_folds if config.get("cv_folds") else 1)
  for f in config.data_pruning.keep_fractions:
    if online.count_of(f, int(n_fit)) < 1:
      raise ConfigError(f"data_pruning.keep_fractions={f} keeps no example of {int(n_fit)}; "
                        f"expected at least {1 / n_fit:.2g}")


def load_data(config: ml_collections.ConfigDict) -> data.Dataset:
  """The config's dataset (all its ``dataset`` options), cut to ``num_train`` / ``num_test``."""
  dc = config.dataset
  options = {k: dc.get(k) for k in ("data_dir", "download", "manual_dir", "x_key", "text_keys",
                                    "label_key", "train_split", "test_split", "image_size", "tokenizer",
                                    "vocab_size", "max_len", "cache_dir", "tokenizer_dir")
             if dc.get(k) is not None}
  if "text_keys" in options:
    options["text_keys"] = tuple(options["text_keys"])
  ds = data.load_dataset(dc.name, **options)
  return ds.take(dc.get("num_train"), dc.get("num_test"))


def setup(config: ml_collections.ConfigDict, workdir: str) -> Context:
  ds = load_data(config)
  _check_splits(config, ds)
  dc = config.dataset
  mean, std = dc.get("mean"), dc.get("std")
  prep = ds.preprocess(augment=bool(dc.get("augment", False)),
                       crop_padding=int(dc.get("crop_padding", 4)),
                       mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
  from experiments import cleaning
  # Cleaning (label noise, deduplication) is a function of the config and the data: the fingerprint
  # of the data as loaded covers it, and the files cleaning writes carry it too.
  fingerprint = _RUN["fingerprint"] = run_fingerprint(config, ds)
  ctx = Context(config, ds, parallel.data_mesh(), workdir, Units(workdir, fingerprint), prep)
  return cleaning.deduplicate(cleaning.add_label_noise(ctx))
