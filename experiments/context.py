"""The context a strategy runs in (:class:`Context`: config, data, mesh, workdir, units of work,
input preprocessing, replicate splits, the loader) and the data it is built from
(:func:`load_data`).

Below every strategy and cleaning step: it imports nothing from the rest of ``experiments``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from prunejax import data
from prunejax.checkpoint import Units
from prunejax.models import build_model, make_apply_fn

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
