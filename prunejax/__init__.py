"""prunejax: data pruning and model pruning in JAX.

Subpackages: :mod:`prunejax.data` (datasets with stable ids, batching), :mod:`prunejax.models` (Flax
models), :mod:`prunejax.scores` and :mod:`prunejax.select` (data-importance scores and subsets),
:mod:`prunejax.dynamic` (online data pruning), :mod:`prunejax.masks`, :mod:`prunejax.schedules`,
:mod:`prunejax.optim` (weight masks, sparsity schedules, masked optax), :mod:`prunejax.train`,
:mod:`prunejax.parallel`, :mod:`prunejax.report`; :mod:`prunejax.adapters` (Flax NNX, Equinox and
Haiku models as ``(apply_fn, params)``).
"""

from prunejax import (adapters, data, dynamic, masks, models, optim, parallel, report, schedules,
                      scores, select, train)
from prunejax.errors import ConfigError, DataError, PrunejaxError

__version__ = "0.1.0"
