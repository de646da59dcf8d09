"""What every experiment script shares: config validation, and :func:`setup`, which builds the
context a strategy runs in (``experiments/context.py``) in a workdir (``experiments/files.py``)
and cleans its data (``experiments/cleaning.py``).

Every experiment is a list of *strategies* (``config.strategies``, see ``experiments/strategies/``)
run by ``experiments/run.py``; the lists of names a config may use are derived from the registries
(strategies, scores, mask methods, datasets, models), never kept beside them.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from experiments import cleaning
from experiments.context import (  # noqa: F401 - re-exported: the context lived here
    Context, device_budget_bytes, load_data)
from experiments.files import (  # noqa: F401 - re-exported: the workdir helpers lived here
    RESULT_NEUTRAL_FIELDS, code_version, config_differences, config_fingerprint,
    dataset_fingerprint, prepare_workdir, result_fields, run_fingerprint, save_mask, save_npz,
    set_run_fingerprint)
from prunejax import data, online, parallel
from prunejax.checkpoint import Units
from prunejax.errors import ConfigError, check_choice, check_positive_int, check_range
from prunejax.models import MODELS

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
  check_range("dataset.label_noise", config.dataset.get("label_noise", 0.0), 0.0, 1.0,
              hi_open=True)
  rc = config.get("rho_loss")
  if rc is not None:
    check_range("rho_loss.holdout_fraction", rc.holdout_fraction, 0.0, 1.0, hi_open=True)
    check_positive_int("rho_loss.epochs", rc.epochs)
  dd = config.get("dedup")
  if dd is not None:
    from experiments import cleaning
    check_choice("dedup.first", dd.first, cleaning.FIRST_STEPS)
    check_range("dedup.eps", dd.eps, 0.0, 1.0)
    check_positive_int("dedup.num_clusters", dd.num_clusters)
    from prunejax.audit import ISSUE_TYPES
    for t in dd.get("audit_remove", ()):
      check_choice("dedup.audit_remove", t, ISSUE_TYPES)
    check_range("dedup.audit_max_removed", dd.get("audit_max_removed", 0.5), 0.0, 1.0)


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
  if not imp.rewind_step and not imp.get("reset_optimizer", True):
    raise ConfigError("imp.reset_optimizer=False does nothing with imp.rewind_step=0: the "
                      "optimizer state at step 0 is a fresh one; set imp.rewind_step > 0 to keep "
                      "the optimizer state of that step, or leave imp.reset_optimizer=True")
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
  _check_fused(config)
  check_range("train.loss_scale", config.train.get("loss_scale", 1.0), 0.0, 2.0 ** 24,
              lo_open=True)


def _check_fused(config: ml_collections.ConfigDict) -> None:
  from prunejax.fused import check_steps_per_dispatch
  fused = config.train.get("fused", True)
  if not isinstance(fused, bool):
    raise ConfigError(f"train.fused={fused!r} is not allowed; expected True or False")
  check_choice("train.vmap_replicas", config.train.get("vmap_replicas", "auto"),
               ("auto", "on", "off"))
  check_steps_per_dispatch(config.train.get("steps_per_dispatch", 0))
  check_choice("dataset.device_resident", config.dataset.get("device_resident", "auto"),
               ("auto", "on", "off"))
  check_range("dataset.device_budget_mb", config.dataset.get("device_budget_mb", 0), 0.0, 2.0**30)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked before any work starts; one-line errors."""
  from experiments import strategies
  data.check_dataset_name(config.dataset.name, config.dataset.get("data_dir"), "dataset.name")
  check_choice("model.name", config.model.name, MODELS)
  if not config.strategies:
    raise ConfigError("strategies=() is empty; choose at least one of: "
                      + ", ".join(strategies.REGISTRY))
  if config.model.get("require_checkpoint") and not config.model.get("checkpoint_dir"):
    raise ConfigError("model.checkpoint_dir is not set; this config fine-tunes a pretrained GPT-2: "
                      "download one (e.g. huggingface-cli download openai-community/gpt2 "
                      "--local-dir DIR) and pass --config.model.checkpoint_dir=DIR")
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
  from experiments import similarity
  similarity.check_config(config)


# ----------------------------------------------------------------------------------------------
# The context of a run.
# ----------------------------------------------------------------------------------------------


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


def setup(config: ml_collections.ConfigDict, workdir: str) -> Context:
  validate_config(config)
  ds = load_data(config)
  _check_splits(config, ds)
  dc = config.dataset
  mean, std = dc.get("mean"), dc.get("std")
  prep = ds.preprocess(augment=bool(dc.get("augment", False)),
                       crop_padding=int(dc.get("crop_padding", 4)),
                       mean=tuple(mean) if mean else None, std=tuple(std) if std else None)
  # Cleaning (label noise, deduplication) is a function of the config and the data: the fingerprint
  # of the data as loaded covers it, and the files cleaning writes carry it too.
  fingerprint = run_fingerprint(config, ds)
  set_run_fingerprint(fingerprint)
  ctx = Context(config, ds, parallel.data_mesh(), workdir, Units(workdir, fingerprint), prep)
  return cleaning.deduplicate(cleaning.add_label_noise(ctx))
