"""Cross-validated label quality (Confident Learning): find examples that are probably mislabeled.

1. :func:`out_of_fold_probs`: K-fold training, each example's predicted probabilities from the model
   that did not see it. The training itself is the caller's ``fit_predict(train_ids, heldout_ids)``.
2. Per-example label-quality scores from those probabilities: :func:`self_confidence` and
   :func:`normalized_margin` (low means probably mislabeled).
3. :func:`confident_joint`, the counts of (given label, probable true label), and
   :func:`find_label_issues`, the examples to remove as "low quality".

These run once over the dataset on the host, in NumPy, and follow ``cleanlab`` 2.x to the example on
the same probabilities (the tests check it).

References:
  Northcutt, Jiang, Chuang. "Confident Learning: Estimating Uncertainty in Dataset Labels."
  JAIR 2021.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from prunejax.errors import ConfigError, DataError, check_choice, check_positive_int

FILTERS = ("prune_by_noise_rate", "confident_learning")

# The constants of cleanlab (cleanlab.internal.constants, cleanlab.count).
_THRESHOLD_EPS = 1e-6
_THRESHOLD_LOWER_BOUND = 2e-6
_MISSING_CLASS_THRESHOLD = 2.0
_TINY = 1e-100


def _check(probs_NxC: np.ndarray, labels_N: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  probs_NxC = np.asarray(probs_NxC, np.float64)
  labels_N = np.asarray(labels_N)
  if probs_NxC.ndim != 2 or labels_N.shape != (probs_NxC.shape[0],):
    raise DataError(f"probs must be [N, C] and labels [N]; got {probs_NxC.shape} and "
                    f"{labels_N.shape}")
  if probs_NxC.shape[0] == 0 or probs_NxC.shape[1] == 0:
    raise DataError(f"probs must hold at least one example and one class; got shape "
                    f"{probs_NxC.shape}")
  if not (np.issubdtype(labels_N.dtype, np.integer) or labels_N.dtype == bool):
    raise DataError(f"labels must be integers; got dtype {labels_N.dtype}")
  finite_N = np.isfinite(probs_NxC).all(axis=1)
  if not finite_N.all():
    raise DataError(f"probs have NaN or inf in {int((~finite_N).sum())} rows (positions "
                    f"{np.flatnonzero(~finite_N)[:5].tolist()})")
  if labels_N.size and (labels_N.min() < 0 or labels_N.max() >= probs_NxC.shape[1]):
    raise DataError(f"labels must lie in [0, {probs_NxC.shape[1] - 1}]")
  return probs_NxC, labels_N.astype(np.int64)


def stratified_folds(labels_N: np.ndarray, num_folds: int, seed: int = 0) -> np.ndarray:
  """Fold index in ``[0, num_folds)`` of each example: each class is shuffled (seeded) and dealt
  round-robin, so every fold has the class proportions of the whole, within one example."""
  check_positive_int("num_folds", num_folds)
  if num_folds < 2:
    raise ConfigError(f"num_folds={num_folds} is not allowed; expected at least 2")
  labels_N = np.asarray(labels_N)
  folds_N = np.empty(len(labels_N), np.int64)
  rng = np.random.default_rng([seed, 0xF01D])
  offset = 0
  for c in np.unique(labels_N):
    members = np.flatnonzero(labels_N == c)
    members = members[rng.permutation(len(members))]
    folds_N[members] = (offset + np.arange(len(members))) % num_folds
    offset += len(members)
  return folds_N


def out_of_fold_probs(fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray],
                      ids: np.ndarray, labels: np.ndarray, *, num_folds: int = 5,
                      seed: int = 0) -> np.ndarray:
  """Out-of-fold predicted probabilities by stratified K-fold cross-validation.

  Args:
    fit_predict: ``fit_predict(train_ids, heldout_ids) -> probs``: trains a fresh model on
      ``train_ids`` and returns its predicted class probabilities for ``heldout_ids``, shape
      ``[len(heldout_ids), C]``, in that order.
    ids: the example ids, [N].
    labels: their (possibly noisy) labels, [N].
    num_folds: K.
    seed: seeds the fold assignment.

  Returns:
    f32[N, C]: row ``i`` comes from the model that did not train on ``ids[i]``.

  References:
    Northcutt, Jiang, Chuang. JAIR 2021, Sec. 3 (out-of-sample predicted probabilities).
  """
  ids = np.asarray(ids)
  folds = stratified_folds(labels, num_folds, seed)
  probs = None
  for k in range(num_folds):
    held = folds == k
    p = np.asarray(fit_predict(ids[~held], ids[held]), np.float32)
    if p.ndim != 2 or p.shape[0] != held.sum():
      raise DataError(f"fit_predict returned shape {p.shape} for {held.sum()} held-out ids")
    if probs is None:
      probs = np.zeros((len(ids), p.shape[1]), np.float32)
    probs[held] = p
  return probs


def self_confidence(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """``p(given label)``: the self-confidence label-quality score. LOW means probably mislabeled.

  References:
    Northcutt, Jiang, Chuang. JAIR 2021. Kuan, Mueller. "Model-Agnostic Label Quality Scoring to
    Detect Real-World Label Errors." ICML DataPerf Workshop 2022.
  """
  probs_NxC, labels_N = _check(probs_NxC, labels_N)
  return probs_NxC[np.arange(len(labels_N)), labels_N]


def normalized_margin(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """``(p(given label) - max_{k != label} p(k) + 1) / 2`` in [0, 1]. LOW means probably mislabeled.

  References:
    Kuan, Mueller. ICML DataPerf Workshop 2022 (cleanlab's ``normalized_margin``).
  """
  probs_NxC, labels_N = _check(probs_NxC, labels_N)
  rows = np.arange(len(labels_N))
  others = probs_NxC.copy()
  others[rows, labels_N] = -np.inf
  return (probs_NxC[rows, labels_N] - others.max(axis=1) + 1.0) / 2.0


def confident_thresholds(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """``t_k``: the mean ``p(k)`` over examples labeled ``k`` (2 for a class with no example)."""
  probs_NxC, labels_N = _check(probs_NxC, labels_N)
  t = np.full(probs_NxC.shape[1], _MISSING_CLASS_THRESHOLD)
  for k in np.unique(labels_N):
    t[k] = probs_NxC[labels_N == k, k].mean()
  return np.maximum(t, _THRESHOLD_LOWER_BOUND)


def _round_preserving_sum(x: np.ndarray) -> np.ndarray:
  ints = x.round()
  target = np.sum(x).round()
  while abs(np.sum(ints).round() - target) > _THRESHOLD_EPS:
    diff = np.round(target - np.sum(ints).round())
    step = -1 if diff < 0 else 1
    changes = min(int(abs(diff)), len(x))
    order = np.argsort(x - ints)[::-step][:changes]
    ints[order] += step
  return ints.astype(np.int64)


def _round_preserving_row_totals(m: np.ndarray) -> np.ndarray:
  return np.stack([_round_preserving_sum(row) for row in m]).astype(np.int64)


def _confident_guess(probs_NxC: np.ndarray, labels_N: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(probable true label of each example, whether it is confidently some class)."""
  above_NxC = probs_NxC >= confident_thresholds(probs_NxC, labels_N) - _THRESHOLD_EPS
  num_above_N = above_NxC.sum(axis=1)
  guess_N = np.where(num_above_N > 1, probs_NxC.argmax(axis=1), above_NxC.argmax(axis=1))
  return guess_N, num_above_N > 0


def confident_joint(probs_NxC: np.ndarray, labels_N: np.ndarray, *,
                    calibrate: bool = True) -> np.ndarray:
  """The confident joint ``C[i][j]``: examples labeled ``i`` confidently of true class ``j``.

  An example counts toward class ``j`` when ``p(j) >= t_j`` (:func:`confident_thresholds`); with
  several such classes, the argmax of ``p``. Every diagonal entry is at least 1. ``calibrate``
  rescales rows to the label counts and the total to N, rounded preserving row totals.

  Returns:
    int[C, C], rows the given labels, columns the probable true labels.

  References:
    Northcutt, Jiang, Chuang. JAIR 2021, Eq. 1 and 2.
  """
  probs_NxC, labels_N = _check(probs_NxC, labels_N)
  c = probs_NxC.shape[1]
  guess_N, confident_N = _confident_guess(probs_NxC, labels_N)
  cj = np.zeros((c, c), np.int64)
  np.add.at(cj, (labels_N[confident_N], guess_N[confident_N]), 1)
  np.fill_diagonal(cj, np.maximum(np.diag(cj), 1))
  if not calibrate:
    return cj
  label_counts = np.bincount(labels_N, minlength=c)
  cal = (cj.T / np.maximum(cj.sum(axis=1), _TINY) * label_counts).T
  cal = cal / np.maximum(np.sum(cal), _TINY) * label_counts.sum()
  return _round_preserving_row_totals(cal)


def _keep_at_least_n_per_class(prune_counts_CxC: np.ndarray, n: int) -> np.ndarray:
  diag = np.diagonal(prune_counts_CxC)
  new_diag = np.maximum(diag, n)
  per_col = np.maximum(np.count_nonzero(prune_counts_CxC, axis=0) - 1.0, 1.0)
  m = prune_counts_CxC - (new_diag - diag) / per_col
  m[m < 0] = 0
  np.fill_diagonal(m, new_diag)
  return _round_preserving_row_totals(m.astype(np.int64).astype(float))


def find_label_issues(probs_NxC: np.ndarray, labels_N: np.ndarray, *,
                      filter_by: str = "prune_by_noise_rate",
                      min_examples_per_class: int = 1) -> np.ndarray:
  """Which examples are probably mislabeled, bool[N], from out-of-fold probabilities.

  ``filter_by="confident_learning"``: the off-diagonal examples of the confident joint (confidently
  of a class other than their label). ``"prune_by_noise_rate"`` (cleanlab's default): for each pair
  (given ``i``, true ``j != i``) the calibrated confident joint's count of examples labeled ``i``
  with the largest margin ``p(j) - p(i)``, keeping at least ``min_examples_per_class`` per class.
  Either way an example whose label is the model's prediction is never flagged.

  References:
    Northcutt, Jiang, Chuang. JAIR 2021, Sec. 3.2 (C_confusion, C_{y*,y} and prune-by-noise-rate).
  """
  check_choice("find_label_issues.filter_by", filter_by, FILTERS)
  probs_NxC, labels_N = _check(probs_NxC, labels_N)
  n, c = probs_NxC.shape
  issues_N = np.zeros(n, bool)
  if filter_by == "confident_learning":
    guess_N, confident_N = _confident_guess(probs_NxC, labels_N)
    issues_N = confident_N & (guess_N != labels_N)
  else:
    prune_CxC = _keep_at_least_n_per_class(confident_joint(probs_NxC, labels_N).T,
                                           min_examples_per_class)
    for k in range(c):
      members = np.flatnonzero(labels_N == k)
      if len(members) <= min_examples_per_class:
        continue
      for j in range(c):
        count = prune_CxC[j, k]
        if j != k and count > 0:
          margin = probs_NxC[members, j] - probs_NxC[members, k]
          issues_N[members[np.argsort(-margin, kind="stable")[:count]]] = True
  nudged = probs_NxC.copy()
  nudged[np.arange(n), labels_N] += _THRESHOLD_EPS
  return issues_N & (nudged.argmax(axis=1) != labels_N)
