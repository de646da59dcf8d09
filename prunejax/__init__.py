"""prunejax: data pruning and model pruning in JAX.

Subpackages: :mod:`prunejax.data` (id-keyed sources, the grain loader, on-device preprocessing),
:mod:`prunejax.models` (Flax models), :mod:`prunejax.scores` and :mod:`prunejax.select`
(data-importance scores and subsets), :mod:`prunejax.online` (online data pruning),
:mod:`prunejax.masks`, :mod:`prunejax.schedules`, :mod:`prunejax.optim` (weight masks, sparsity
schedules, masked optax), :mod:`prunejax.train` (steps and the epoch loop), :mod:`prunejax.losses`,
:mod:`prunejax.checkpoint` (resumable units, round and mid-run checkpoints),
:mod:`prunejax.dedup` (exact and semantic duplicates, train/test leakage), :mod:`prunejax.parallel`,
:mod:`prunejax.report`, :mod:`prunejax.adapters` (Flax NNX, Equinox and Haiku models as
``(apply_fn, params)`` and back), :mod:`prunejax.audit` (one Datalab-style audit of a dataset:
label issues, exact and near duplicates, outliers and train/test leakage in one table by id).
"""

from prunejax import (adapters, audit, checkpoint, data, dedup, losses, masks, models, online,
                      optim, parallel, report, schedules, scores, select, train)
from prunejax.errors import ConfigError, DataError, PrunejaxError

__version__ = "0.1.0"
