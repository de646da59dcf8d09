"""What every experiment script shares: config validation, the workdir, and the context a strategy
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
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np

from prunejax import data, online, parallel
from prunejax.checkpoint import Units
from prunejax.errors import ConfigError, check_choice, check_positive_int, check_range
from prunejax.fileio import atomic_write_json
from prunejax.models import MODELS, build_model, make_apply_fn

# ----------------------------------------------------------------------------------------------
# Config validation.
# ----------------------------------------------------------------------------------------------


def _check_data_pruning(config: ml_collections.ConfigDict) -> None:
  from prunejax import scores
  dp = config.data_pruning
  for f in dp.keep_fractions:
    check_range("data_pruning.keep_fractions", f, 0.0, 1.0, lo_open=True)
  check_choice("data_pruning.keep", dp.keep, ("hard", "easy", "random"))
  for c in dp.conventions:
    check_choice("data_pruning.conventions", c, ("epochs", "steps"))
  check_positive_int("data_pruning.score_seeds", dp.score_seeds)
  check_range("batch_pruning.keep_fraction", config.batch_pruning.keep_fraction, 0.0, 1.0,
              lo_open=True)
  check_choice("batch_pruning.score", config.batch_pruning.score, online.SELECTION_SCORES)
  check_range("semi_batch.prune_ratio", config.semi_batch.prune_ratio, 0.0, 1.0, hi_open=True)
  check_range("semi_batch.delta", config.semi_batch.delta, 0.0, 1.0)
  it = config.iterative
  check_range("iterative.prune_per_round", it.prune_per_round, 0.0, 1.0, lo_open=True, hi_open=True)
  check_range("iterative.target_keep", it.target_keep, 0.0, 1.0, lo_open=True, hi_open=True)
  check_choice("iterative.score", it.score, scores.BATCH_SCORES)


def _check_model_pruning(config: ml_collections.ConfigDict) -> None:
  from prunejax import masks
  from experiments import strategies
  for m in config.pai.methods:
    check_choice("pai.methods", m, masks.METHODS)
  for sp in config.pai.sparsities:
    check_range("pai.sparsities", sp, 0.0, 1.0, hi_open=True)
  check_choice("joint.data", config.joint.data, strategies.ONLINE_PRUNERS)
  imp = config.imp
  check_choice("imp.method", imp.get("method", "magnitude"), masks.METHODS)
  check_range("imp.prune_per_round", imp.prune_per_round, 0.0, 1.0, lo_open=True, hi_open=True)
  check_range("imp.target_sparsity", imp.target_sparsity, 0.0, 1.0, hi_open=True)
  check_choice("imp.scope", imp.scope, ("global", "layerwise"))
  if imp.get("max_rounds") is not None:
    from prunejax import schedules
    need = schedules.rounds_to_reach(imp.target_sparsity, imp.prune_per_round)
    if need > imp.max_rounds:
      raise ConfigError(f"imp.max_rounds={imp.max_rounds} cannot reach imp.target_sparsity="
                        f"{imp.target_sparsity} at imp.prune_per_round={imp.prune_per_round} "
                        f"(needs {need} rounds)")


def _check_precision(config: ml_collections.ConfigDict) -> None:
  from prunejax.models import REMAT_MODELS
  from prunejax.models.precision import dtype_of
  for field in ("compute_dtype", "param_dtype"):
    dtype_of(f"model.{field}", config.model.get(field))
  remat = config.model.get("remat", False)
  if not isinstance(remat, bool):
    raise ConfigError(f"model.remat={remat!r} is not allowed; expected True or False")
  if remat and config.model.name not in REMAT_MODELS:
    raise ConfigError(f"model.remat=True is not supported by model {config.model.name!r}; "
                      f"rematerialization is per block of: {', '.join(map(repr, REMAT_MODELS))}")
  steps = config.train.get("accumulation_steps", 1)
  check_positive_int("train.accumulation_steps", steps)
  if config.train.batch_size % steps:
    raise ConfigError(f"train.accumulation_steps={steps} must divide train.batch_size="
                      f"{config.train.batch_size} (each micro-batch has batch_size / "
                      "accumulation_steps rows)")
  parallel.check_batch_size(config.train.batch_size // steps, parallel.data_mesh(),
                            "train.batch_size / train.accumulation_steps")
  check_range("train.loss_scale", config.train.get("loss_scale", 1.0), 0.0, 2.0 ** 24,
              lo_open=True)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked before any work starts; one-line errors."""
  from experiments import strategies
  data.check_dataset_name(config.dataset.name, config.dataset.get("data_dir"), "dataset.name")
  check_choice("model.name", config.model.name, MODELS)
  if not config.strategies:
    raise ConfigError("strategies=() is empty; choose at least one of: "
                      + ", ".join(strategies.REGISTRY))
  for s in config.strategies:
    check_choice("strategies", s, strategies.REGISTRY)
  check_positive_int("train.epochs", config.train.epochs)
  check_positive_int("train.batch_size", config.train.batch_size)
  _check_precision(config)
  check_positive_int("replicates", config.replicates)
  folds = config.get("cv_folds", 0)
  if folds and (not isinstance(folds, int) or folds < 2):
    raise ConfigError(f"cv_folds={folds!r} is not allowed; expected 0 (off) or an integer >= 2")
  parallel.check_batch_size(config.train.batch_size, parallel.data_mesh(), "train.batch_size")
  _check_data_pruning(config)
  _check_model_pruning(config)


# ----------------------------------------------------------------------------------------------
# The workdir.
# ----------------------------------------------------------------------------------------------


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A stable hash of the settings that change results (not progress bars or logging)."""
  d = config.to_dict()
  d.get("train", {}).pop("progress", None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
  """Creates ``workdir`` or checks that it holds a run of the same config (to resume it).

  A workdir holding a different config is refused unless ``overwrite``, which clears it first.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir!r} is a file; expected a directory (new or from an "
                      "earlier run of the same config)")
  stamp = os.path.join(workdir, "config.json")
  fp = config_fingerprint(config)
  if os.path.exists(stamp):
    with open(stamp) as f:
      old = json.load(f).get("fingerprint")
    if old != fp:
      if not overwrite:
        raise ConfigError(f"--workdir={workdir!r} holds a run of a different config (fingerprint "
                          f"{old} != {fp}); choose another --workdir or pass --overwrite")
      shutil.rmtree(workdir)
  elif os.path.isdir(workdir) and os.listdir(workdir) and overwrite:
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  atomic_write_json(stamp, {"fingerprint": fp, "config": config.to_dict()})


def save_npz(path: str, **arrays: Any) -> None:
  """Atomic ``np.savez`` by process 0 only."""
  from prunejax.fileio import atomic_savez
  if jax.process_index() == 0:
    atomic_savez(path, **arrays)


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
    return {"params": _pretrained(self.config.model.checkpoint_dir, self.ds.num_classes,
                                  self.ds.meta["max_len"], self.ds.meta["pad_id"],
                                  self.config.model.get("dropout"), seed,
                                  _precision(self.config))[1]}

  def apply_fn(self, model):
    """``apply_fn(variables, x) -> logits`` on stored inputs (preprocessed on device)."""
    return _apply_fn(model, self.preprocess)

  def replicate_split(self, r: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(train ids, held-out ids or None, seed) of replicate ``r``: a seed, or a stratified CV fold."""
    from prunejax.scores import stratified_folds
    seed = int(self.config.seed) + r
    folds = self.config.get("cv_folds", 0)
    ids = np.sort(self.ds.train.ids)
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
  validate_config(config)
  ds = load_data(config)
  _check_splits(config, ds)
  dc = config.dataset
  mean, std = dc.get("mean"), dc.get("std")
  prep = ds.preprocess(augment=bool(dc.get("augment", False)),
                       crop_padding=int(dc.get("crop_padding", 4)),
                       mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
  return Context(config, ds, parallel.data_mesh(), workdir, Units(workdir), prep)
