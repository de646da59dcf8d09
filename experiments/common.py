"""What every experiment script shares: :func:`setup`, which builds the context a strategy runs in
(``experiments/context.py``) in a workdir (``experiments/files.py``) and cleans its data
(``experiments/cleaning.py``). Configs are validated before, from their declarations
(``experiments/configs/fields.py``).

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
from prunejax.errors import ConfigError

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
