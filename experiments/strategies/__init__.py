"""The strategies an experiment can run, each producing result rows; :data:`REGISTRY` names them.

One file per family:

* ``dense.py``: ``dense`` (full data, the baseline);
* ``static.py``: static subsets, ``random``, a subset by any registered score (``el2n``, ``grand``,
  ``forgetting``, ``aum``, ``prototypes``, ``knn_outlier``, ``label_quality``, ``less``, ...;
  ``experiments/scoring.py``) and ``semdedup`` (semantic deduplication);
* ``online_pruning.py``: the online pruners of :data:`ONLINE_PRUNERS` (``random_dynamic``,
  ``batch``, ``semi_batch`` = InfoBatch) and ``rho_loss`` (batch pruning by reducible loss);
* ``iterative.py``: ``iterative`` data pruning (train, score, prune, retrain);
* ``lottery.py``: ``imp`` (lottery tickets with rewinding, any registered mask method) and its
  controls ``imp_random_reinit`` and ``imp_random_mask``;
* ``pai.py``: ``pai``, pruning at initialization by any registered mask method;
* ``post_training.py``: ``post_training``, magnitude, Wanda and SparseGPT without retraining;
* ``joint.py``: ``joint``, data and weights pruned in the same run;
* ``base.py``: what they share (replicates, units of replicas, the compute unit, mask inputs).

A strategy is ``fn(ctx: Context) -> list[dict]``. Its work is split into units (one training run,
one round) whose result rows are written once finished (``prunejax.checkpoint.Units``), so a rerun
skips what is done. A new strategy is one file here and one line in :data:`REGISTRY`;
``tests/test_strategies.py`` runs every entry on a tiny config.
"""

from __future__ import annotations

import functools
from typing import Callable

from experiments import scoring
from experiments.context import Context
from experiments.strategies.base import (  # noqa: F401 - public names of this package
    Rows, baseline_compute, replica_units)
from experiments.strategies.base import init_params as _init_params  # noqa: F401
from experiments.strategies.dense import dense
from experiments.strategies.iterative import iterative
from experiments.strategies.joint import joint
from experiments.strategies.lottery import imp, imp_controls
from experiments.strategies.online_pruning import ONLINE_PRUNERS, online_strategy, rho_loss
from experiments.strategies.pai import pai
from experiments.strategies.post_training import (  # noqa: F401 - named here before the split
    CALIBRATION_SETS, POST_TRAINING_METHODS, post_training)
from experiments.strategies.static import random_static, score_based, semdedup

REGISTRY: dict[str, Callable[[Context], Rows]] = {
    "dense": dense,
    "random": random_static,
    **{name: functools.partial(online_strategy, name=name) for name in ONLINE_PRUNERS},
    "rho_loss": rho_loss,
    "semdedup": semdedup,
    **{name: functools.partial(score_based, name=name) for name in scoring.STATIC_SCORES},
    "iterative": iterative,
    "imp": imp,
    "imp_random_reinit": functools.partial(imp_controls, control="imp_random_reinit"),
    "imp_random_mask": functools.partial(imp_controls, control="imp_random_mask"),
    "pai": pai,
    "joint": joint,
    "post_training": post_training,
}
"""Every strategy by the name configs use."""
