"""How the experiments compute a static score of every training example, by the score's kind.

* per-batch scores (``prunejax.scores.SCORES`` of kind "batch": EL2N, GraNd, loss, ...): after
  ``data_pruning.score_epochs`` epochs, averaged over ``score_seeds`` seeds (Paul et al. 2021);
* tracked scores (kind "tracker": forgetting, AUM, cartography): over ``tracker_epochs`` epochs, one
  presentation per example per epoch with the model at the end of the epoch;
* dataset-level recipes (:data:`DATASET_SCORES`): prototypes (k-means on embeddings), kNN outliers
  (Datalab's score on the same embeddings) and label quality (Confident Learning on out-of-fold
  probabilities);
* LESS (``less``, ``less_targeted``): similarity of gradients to a validation split or a slice of
  it (:mod:`experiments.similarity`);
* RHO-LOSS's irreducible losses (:func:`irreducible_losses`), an input of the ``rho_loss`` strategy.

Every function returns ``(hardness f32[N] in the order of ids, compute in example passes)``; high
hardness means hard whatever the score's own direction.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable

import jax
import numpy as np

from experiments import similarity, trainer
from prunejax import scores as scores_lib
from prunejax.errors import DataError, PrunejaxError


def batch_score(ctx, name: str, ids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
  dp, spec = ctx.config.data_pruning, scores_lib.SCORES[name]
  total, compute = np.zeros(len(ids), np.float64), 0.0
  runs = trainer.train_models(ctx, [ids] * dp.score_seeds,
                              [seed * 1000 + s for s in range(dp.score_seeds)],
                              epochs=dp.score_epochs, desc=f"score {name}")
  for run in runs:  # summed in seed order, as one seed after another would
    total += trainer.score_ids(ctx, run.state, ids, name)
    compute += run.compute + spec.passes * len(ids)
  return spec.hardness((total / dp.score_seeds).astype(np.float32)), compute


def _track(ctx, state, ids: np.ndarray, tracker_state, update):
  """One tracker update per example from the logits of the model after an epoch."""
  logits_fn = _logits_fn(ctx.apply_fn(state.model))
  from prunejax import parallel
  for b in ctx.batches(ids):
    gb = parallel.shard_batch(b, ctx.mesh)
    tracker_state = update(tracker_state, gb, logits_fn(state.variables, gb["x"]))
  return tracker_state


@functools.lru_cache(maxsize=64)
def _logits_fn(apply_fn):
  return jax.jit(apply_fn)


def tracker_score(ctx, name: str, ids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
  """Each example is presented to the tracker once per epoch, with the model at the end of the
  epoch (Toneva et al. record at every mini-batch; an epoch-end pass costs one forward per example
  and gives every example the same number of presentations)."""
  dp, spec = ctx.config.data_pruning, scores_lib.SCORES[name]
  tracker = spec.tracker()
  update = jax.jit(tracker.update)
  total, compute = np.zeros(len(ids), np.float64), 0.0
  for s in range(dp.score_seeds):
    holder = {"state": tracker.init(ids)}

    def on_epoch(epoch, state):
      holder["state"] = _track(ctx, state, ids, holder["state"], update)

    run = trainer.train_model(ctx, ids, seed=seed * 1000 + s, epochs=dp.tracker_epochs,
                              desc=f"score {name} seed {s}", on_epoch=on_epoch)
    st = holder["state"]
    raw = spec.hardness(np.asarray(spec.read_tracker(st)))
    total += scores_lib.align(ids, np.asarray(st.ids), raw)  # tracker state is sorted by id
    compute += run.compute + dp.tracker_epochs * len(ids) * spec.passes
  return (total / dp.score_seeds).astype(np.float32), compute


def embeddings(ctx, ids: np.ndarray, seed: int, desc: str) -> tuple[np.ndarray, float]:
  """Penultimate features f32[N, D] of the training examples ``ids`` (in that order) from a model
  trained ``data_pruning.score_epochs`` epochs on them, and what that cost in example passes (the
  training and one forward per example)."""
  run = trainer.train_model(ctx, ids, seed=seed * 1000, epochs=ctx.config.data_pruning.score_epochs,
                            desc=desc)
  feats_fn = _features_fn(ctx.apply_fn(run.state.model))
  emb = trainer.map_ids(ctx, ids, lambda b: feats_fn(run.state.variables, b["x"]))
  return np.asarray(emb, np.float32), run.compute + len(ids)


def prototype_scores(ctx, ids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
  """Distance to the nearest of ``prototypes_k`` k-means centroids of the penultimate features of a
  model trained ``score_epochs`` epochs (Sorscher et al. 2022 use a self-supervised embedding; a
  briefly trained supervised one is the cheap stand-in). High = atypical = hard."""
  emb, compute = embeddings(ctx, ids, seed, "score prototypes")
  s = scores_lib.prototypes(emb, num_clusters=ctx.config.data_pruning.prototypes_k,
                            key=jax.random.key(seed), ids_N=ids)
  return np.asarray(s, np.float32), compute


def knn_outlier_scores(ctx, ids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
  """Outlier score by the distance to the ``knn_k`` nearest neighbours in the same embedding space
  (cleanlab Datalab's definition; high = outlier = hard)."""
  emb, compute = embeddings(ctx, ids, seed, "score knn outliers")
  s = scores_lib.knn_outlier_score(emb, k=min(ctx.config.data_pruning.knn_k, len(ids) - 1),
                                   ids_N=ids)
  return np.asarray(s, np.float32), compute


@functools.lru_cache(maxsize=64)
def _features_fn(apply_fn):
  return jax.jit(lambda v, x: scores_lib.penultimate(apply_fn, v, x)[0])


def out_of_fold_probs(ctx, ids: np.ndarray, seed: int, desc: str = "label quality fold"
                      ) -> tuple[np.ndarray, float]:
  """K-fold out-of-fold probabilities f32[len(ids), C] of ``ids`` (``data_pruning.label_quality_folds``
  folds, each model trained ``label_quality_epochs`` epochs) and what they cost in example passes
  (the training and one forward per held-out example)."""
  dp = ctx.config.data_pruning
  spent = [0.0]

  def fit_predict(train_ids, heldout_ids):
    run = trainer.train_model(ctx, train_ids, seed=seed, epochs=dp.label_quality_epochs, desc=desc)
    spent[0] += run.compute + len(heldout_ids)
    return trainer.predict_probs(ctx, run.state, heldout_ids)

  probs = scores_lib.out_of_fold_probs(fit_predict, ids, ctx.labels(ids),
                                       num_folds=dp.label_quality_folds, seed=seed)
  return probs, spent[0]


def label_quality_scores(ctx, ids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
  """``1 -`` self-confidence of out-of-fold predicted probabilities from K-fold training (Northcutt
  et al. 2021): high = probably mislabeled. Each fold model trains ``label_quality_epochs`` epochs;
  the probably-mislabeled ids (``find_label_issues``) are saved beside the scores."""
  labels = ctx.labels(ids)
  probs, spent = out_of_fold_probs(ctx, ids, seed)
  issues = scores_lib.find_label_issues(probs, labels)
  path = os.path.join(ctx.workdir, "scores", f"label_issues_seed{seed}.npz")
  if jax.process_index() == 0:
    scores_lib.save_scores(path, ids, meta={"fingerprint": ctx.units.fingerprint, "seed": seed},
                           probably_mislabeled=issues.astype(np.float32))
  return (1.0 - scores_lib.self_confidence(probs, labels)).astype(np.float32), spent


def irreducible_losses(ctx, r: int, ids: np.ndarray, seed: int
                       ) -> tuple[np.ndarray, np.ndarray, float]:
  """RHO-LOSS's irreducible losses: ``(target ids, their irreducible losses, compute)``.

  The irreducible-loss (IL) model (``rho_loss.model``: overrides of the config's model, trained
  ``rho_loss.epochs`` epochs) never sees the examples it gives losses for. With
  ``rho_loss.holdout_fraction > 0`` it trains on a stratified holdout of that fraction of ``ids``
  and the target model trains on the rest (Mindermann et al. 2022); with 0, two IL models are
  cross-fitted on the two halves of ``ids`` (each gives the losses of the half it did not see), so
  the target trains on all of ``ids``. Saved by id to ``workdir/scores/irreducible_loss_r{r}.npz``.
  """
  path = os.path.join(ctx.workdir, "scores", f"irreducible_loss_r{r}.npz")
  meta = {"fingerprint": ctx.units.fingerprint, "score": "irreducible_loss", "replicate": r,
          "seed": seed}
  got = _load_cached(path, meta, ("irreducible_loss", "compute"))
  if got is not None:
    return got[0], got[1]["irreducible_loss"], float(got[1]["compute"][0])
  rc = ctx.config.rho_loss
  if rc.holdout_fraction:
    from prunejax import select
    holdout = select.select(ids, np.zeros(len(ids)), fraction=rc.holdout_fraction, keep="random",
                            labels=ctx.labels(ids), class_balanced=True, seed=seed)
    parts = [(holdout, np.setdiff1d(ids, holdout))]
  else:
    folds = scores_lib.stratified_folds(ctx.labels(ids), 2, seed)
    parts = [(ids[folds != k], ids[folds == k]) for k in (0, 1)]
  target, losses, compute = [], [], 0.0
  overrides = dict(rc.get("model", {}) or {})
  for k, (fit_ids, target_ids) in enumerate(parts):
    run = trainer.train_model(ctx, fit_ids, seed=seed * 1000 + 17 + k, epochs=rc.epochs,
                              model_overrides=overrides, desc=f"irreducible-loss model {k}")
    losses.append(trainer.score_ids(ctx, run.state, target_ids, "loss"))
    target.append(target_ids)
    compute += run.compute + len(target_ids)
  target_ids, il = np.concatenate(target), np.concatenate(losses).astype(np.float32)
  order = np.argsort(target_ids)
  if jax.process_index() == 0:
    scores_lib.save_scores(path, target_ids[order], meta=meta, irreducible_loss=il[order],
                           compute=np.full(len(il), compute))
  _record(path)
  return target_ids[order], il[order], compute


DATASET_SCORES: dict[str, Callable] = {
    "prototypes": prototype_scores,
    "knn_outlier": knn_outlier_scores,
    "label_quality": label_quality_scores,
    "less": functools.partial(similarity.less_scores, targeted=False),
    "less_targeted": functools.partial(similarity.less_scores, targeted=True),
}
"""Scores computed from the whole dataset at once, by the recipes above."""

STATIC_SCORES = scores_lib.BATCH_SCORES + scores_lib.TRACKER_SCORES + tuple(DATASET_SCORES)
"""Every score a static (score, then keep a subset) strategy can use."""


def static_scores(ctx, name: str, r: int, ids: np.ndarray, seed: int
                  ) -> tuple[np.ndarray, float]:
  """Hardness of replicate ``r``'s training ids (high = hard) by the score ``name``, saved to
  ``workdir/scores`` keyed by id (and read back from there on a rerun); returns (hardness, scoring
  compute in example passes).

  The file records what made it (the run's fingerprint: config, data, code; the score, replicate and
  seed); one that is damaged, of another run or of other examples is recomputed, never used. It is
  recorded with the unit of work that asked for it, so a rerun redoes that unit if it is damaged.
  """
  path = os.path.join(ctx.workdir, "scores", f"{name}_r{r}.npz")
  meta = {"fingerprint": ctx.units.fingerprint, "score": name, "replicate": r, "seed": seed}
  got = _load_cached(path, meta, (name, "compute"), ids)
  if got is not None:
    return got[1][name], float(got[1]["compute"][0])
  if name in DATASET_SCORES:
    hardness, compute = DATASET_SCORES[name](ctx, ids, seed)
  elif scores_lib.SCORES[name].kind == "tracker":
    hardness, compute = tracker_score(ctx, name, ids, seed)
  else:
    hardness, compute = batch_score(ctx, name, ids, seed)
  if jax.process_index() == 0:
    scores_lib.save_scores(path, ids, meta=meta,
                           **{name: hardness, "compute": np.full(len(ids), compute)})
  _record(path)
  return hardness, compute


def _load_cached(path: str, meta: dict, names: tuple[str, ...], ids: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
  """``(ids, arrays)`` of a scores file this run wrote before, or None when there is none or it is
  damaged, of another run (``meta``), of other examples than ``ids`` or without ``names``: it is
  then recomputed, never used."""
  if not os.path.exists(path):
    return None
  try:
    loaded_ids, loaded = scores_lib.load_scores(path, meta=meta)
    if ids is not None and not np.array_equal(loaded_ids, ids):
      raise DataError(f"{path} holds scores of other examples than this run's")
    missing = [n for n in names if n not in loaded]
    if missing:
      raise DataError(f"{path} has no {', '.join(map(repr, missing))} array")
  except PrunejaxError as e:
    logging.warning("%s; recomputing the scores", e)
    return None
  _record(path)
  return loaded_ids, loaded


def _record(path: str) -> None:
  from prunejax.checkpoint import current_unit
  from prunejax.fileio import npz_digest
  unit = current_unit()
  if unit is not None and jax.process_index() == 0:
    unit.add(path, npz_digest(path))
