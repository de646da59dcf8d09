"""Static subsets: choose a subset once, then train on it at each keep fraction and convention.

``random`` (a random subset), a subset by any registered static score (``el2n``, ``grand``,
``forgetting``, ``aum``, ``prototypes``, ``knn_outlier``, ``label_quality``, ``less``, ...;
``experiments/scoring.py``) and ``semdedup`` (the least redundant examples by SemDeDup).
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import numpy as np

from experiments import scoring, trainer
from experiments.context import Context
from experiments.files import save_npz
from experiments.strategies import base
from experiments.strategies.base import Rows
from prunejax import online, select


def _per_class_kept(ctx, kept: np.ndarray, ids: np.ndarray) -> list[float]:
  c = ctx.ds.num_classes
  return (np.bincount(ctx.labels(kept), minlength=c)
          / np.maximum(np.bincount(ctx.labels(ids), minlength=c), 1)).round(4).tolist()


def _subset_runs(ctx, strategy: str, kept_fn: Callable[[int, np.ndarray, int, float], np.ndarray],
                 *, scoring_compute: Callable[[int], float] = lambda r: 0.0) -> Rows:
  """Trains on the kept subset for each keep fraction, convention and replicate."""
  rows = []
  dp = ctx.config.data_pruning
  reps = list(base.replicates(ctx))
  for frac in dp.keep_fractions:
    for conv in dp.conventions:
      kept = {}

      def epochs_of(j, frac=frac, conv=conv):
        epochs = ctx.config.train.epochs
        if conv == "steps":  # same number of optimizer steps as full data
          epochs = int(round(epochs * len(reps[j][1]) / max(len(kept[j]), 1)))
        return epochs

      def train(todo, key, frac=frac):
        for j in todo:
          r, ids, _, seed = reps[j]
          kept[j] = kept_fn(r, ids, seed, frac)
        by_epochs = {}  # replicas of one program share the number of epochs
        for j in todo:
          by_epochs.setdefault(epochs_of(j), []).append(j)
        runs = {}
        for epochs, js in by_epochs.items():
          got = trainer.train_models(ctx, [kept[j] for j in js], [reps[j][3] for j in js],
                                     epochs=epochs, desc=f"{strategy} keep={frac}",
                                     checkpoint=key if len(by_epochs) == 1 else f"{key}_e{epochs}")
          runs.update(zip(js, got))
        return [runs[j] for j in todo]

      def row(j, run, frac=frac, conv=conv):
        r, ids, held, _ = reps[j]
        save_npz(os.path.join(ctx.workdir, "subsets", f"{strategy}_keep{frac}_r{r}.npz"),
                        ids=kept[j])
        return trainer.result_row(ctx, strategy, r, run, held,
                                  fraction_kept=len(kept[j]) / len(ids), nominal_fraction=frac,
                                  convention=conv, scoring_compute=scoring_compute(r),
                                  per_class_kept=_per_class_kept(ctx, kept[j], ids))

      rows += base.replica_units(ctx, f"{strategy}_keep{frac}_{conv}",
                            [f"{strategy}_keep{frac}_{conv}_r{r}" for r, *_ in reps], train, row)
  return rows


def random_static(ctx: Context) -> Rows:
  def kept(r, ids, seed, frac):
    return select.select(ids, np.zeros(len(ids), np.float32), fraction=frac, keep="random",
                         seed=seed)
  return _subset_runs(ctx, "random", kept)


def score_based(ctx: Context, name: str) -> Rows:
  """Keeps ``data_pruning.keep`` (hard, easy, random) examples by the score ``name``."""
  dp = ctx.config.data_pruning
  get = functools.lru_cache(maxsize=None)(
      lambda r: scoring.static_scores(ctx, name, r, *base.split_and_seed(ctx, r)))
  # Label quality removes the probably-mislabeled: it always keeps the most self-confident.
  # LESS keeps the examples most similar to its target.
  keep = ("easy" if name == "label_quality" else "hard" if name in scoring.similarity.SCORES
          else dp.keep)

  def kept(r, ids, seed, frac):
    return select.select(ids, get(r)[0], fraction=frac, keep=keep, labels=ctx.labels(ids),
                         class_balanced=dp.class_balanced, offset=dp.offset, seed=seed)

  return _subset_runs(ctx, name, kept, scoring_compute=lambda r: get(r)[1])


def semdedup(ctx: Context) -> Rows:
  """SemDeDup (Abbas et al. 2023) as a static strategy: at each of ``data_pruning.keep_fractions``
  it removes the most redundant examples (highest similarity to a kept example of their k-means
  cluster), i.e. the threshold ``eps`` is chosen per fraction; the row records ``eps``."""
  from prunejax import dedup
  cfg = ctx.config
  cache = {}

  def result(r, ids, seed):
    if r not in cache:
      emb, compute = scoring.embeddings(ctx, ids, seed, f"semdedup embeddings r{r}")
      res = dedup.semdedup(emb, ids_N=ids, num_clusters=min(cfg.dedup.num_clusters, len(ids)),
                           key=jax.random.key(seed), keep=cfg.dedup.keep)
      save_npz(os.path.join(ctx.workdir, "dedup", f"semdedup_r{r}.npz"), ids=res.ids,
                      max_similarity=res.max_similarity, duplicate_of=res.duplicate_of)
      cache[r] = (res, compute)
    return cache[r]

  def kept(r, ids, seed, frac):
    res, _ = result(r, ids, seed)
    n_keep = online.count_of(frac, len(ids))
    order = np.lexsort((res.ids, res.max_similarity))  # least redundant first
    return np.sort(res.ids[order[:n_keep]])

  return _subset_runs(ctx, "semdedup", kept,
                      scoring_compute=lambda r: result(r, *base.split_and_seed(ctx, r))[1])
