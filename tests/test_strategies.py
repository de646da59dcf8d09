"""Every registered strategy (``experiments.strategies.REGISTRY``) runs on a tiny config.

One shared context per dataset (module-scoped): digits with an MLP for every strategy, and a tiny
Rotten Tomatoes one for the strategies that select by text similarity (``similarity.SCORES``:
their slice needs the texts). Each strategy must return rows named after it (or after the dense
baseline it shares), with a finite test accuracy in [0, 1], the kept fraction its config asks
for and, for model pruning, the sparsity it asks for. A new strategy is tested here the day it is
registered.
"""

from __future__ import annotations

import math

import pytest

from experiments import common, similarity, strategies
from experiments.configs import base, less_rotten_tomatoes
from prunejax import masks

KEEP = 0.5
SPARSITY = 0.5


def _tiny_digits():
  c = base.get_config()
  c.name = "registry"
  c.replicates = 1
  c.dataset.num_train, c.dataset.num_test = 200, 100
  c.model.update(dict(name="mlp"))
  c.train.update(dict(epochs=2, progress=False))
  c.data_pruning.update(dict(keep_fractions=(KEEP,), score_epochs=1, score_seeds=1,
                             dynamic_keep=KEEP, tracker_epochs=2, prototypes_k=4, knn_k=4,
                             label_quality_folds=2, label_quality_epochs=1))
  c.batch_pruning.keep_fraction = KEEP
  c.semi_batch.delta = 1.0
  c.iterative.update(dict(prune_per_round=KEEP, target_keep=KEEP, score_epochs=1))
  c.imp.update(dict(prune_per_round=SPARSITY, target_sparsity=SPARSITY))
  c.pai.update(dict(methods=tuple(masks.METHODS), sparsities=(SPARSITY,)))
  c.rho_loss.epochs = 1
  c.dedup.num_clusters = 4
  c.post_training.update(dict(sparsities=(SPARSITY,), calibration=("random",),
                              calibration_size=16, error_size=16, batch_size=16, blocksize=16))
  return c


def _tiny_text():
  c = less_rotten_tomatoes.get_config("quick")
  c.train.progress = False
  c.less.dim = 32
  c.data_pruning.keep_fractions = (KEEP,)
  return c


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
  made = {}

  def get(kind):
    if kind not in made:
      cfg = _tiny_text() if kind == "text" else _tiny_digits()
      # Validated as one config that runs every strategy of its kind.
      cfg.strategies = tuple(s for s in strategies.REGISTRY if _kind(s) == kind)
      made[kind] = common.setup(cfg, str(tmp_path_factory.mktemp(kind)))
    return made[kind]
  return get


def _kind(name: str) -> str:
  return "text" if name in similarity.SCORES else "digits"


@pytest.mark.parametrize("name", list(strategies.REGISTRY))
def test_every_registered_strategy_runs_on_a_tiny_config(name, contexts):
  ctx = contexts(_kind(name))
  rows = strategies.REGISTRY[name](ctx)
  assert rows, name
  own = [r for r in rows if r["strategy"] == name]
  assert own and {r["strategy"] for r in rows} <= {name, "dense"}, name
  for r in rows:
    assert math.isfinite(r["test_accuracy"]) and 0.0 <= r["test_accuracy"] <= 1.0, (name, r)
    assert r["replicate"] == 0 and r["compute"] > 0 and r["steps"] > 0, (name, r)
  for r in own:
    if r.get("nominal_fraction") == -1.0:  # online pruning: the measured fraction back-propagated
      assert 0.0 < r["fraction_kept"] <= 1.0, (name, r)
    else:  # full data, or a subset of the asked size
      assert r["fraction_kept"] in (1.0, pytest.approx(KEEP, abs=0.02)), (name, r)
    if "nominal_sparsity" in r or r.get("round", 0) > 0:  # model pruning at the asked sparsity
      assert r["sparsity"] == pytest.approx(SPARSITY, abs=0.02), (name, r)
    else:
      assert r["sparsity"] == 0.0, (name, r)
