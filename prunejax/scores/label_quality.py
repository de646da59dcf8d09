"""Cross-validated label quality (Confident Learning): find examples that are probably mislabeled.

1. :func:`out_of_fold_probs`: K-fold training, each example's predicted probabilities from the model
   that did not see it. The training itself is the caller's ``fit_predict(train_ids, heldout_ids)``.
2. Per-example label-quality scores from those probabilities: :func:`self_confidence`,
   :func:`normalized_margin` and :func:`confidence_weighted_entropy` (low means probably
   mislabeled).
3. :func:`confident_joint`, the counts of (given label, probable true label), and
   :func:`find_label_issues` (all seven filters of cleanlab 2.9), the examples to remove as "low
   quality", keyed by id. :mod:`prunejax.scores.cleanlab_compat` has the same computation with
   cleanlab's own signatures and argument order.

These run once over the dataset on the host, in NumPy, and follow ``cleanlab`` 2.x to the example on
the same probabilities (the tests check it).

References:
  Northcutt, Jiang, Chuang. "Confident Learning: Estimating Uncertainty in Dataset Labels."
  JAIR 2021.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from prunejax.errors import (ConfigError, DataError, check_choice, check_positive_int,
                             check_range)

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning",
           "predicted_neq_given", "low_normalized_margin", "low_self_confidence")

# The constants of cleanlab (cleanlab.internal.constants, cleanlab.count).
_THRESHOLD_EPS = 1e-6
_THRESHOLD_LOWER_BOUND = 2e-6
_MISSING_CLASS_THRESHOLD = 2.0
_TINY = 1e-100
_CLIPPING = 1e-6


def _check(probs_NxC: Any, labels_N: Any, *, keep_dtype: bool = False,
           fields: tuple[str, str] = ("probs_NxC", "labels_N")) -> tuple[np.ndarray, np.ndarray]:
  """Checked ``(probs, labels)``: float64 probabilities (the input float dtype if ``keep_dtype``),
  every one finite and in [0, 1], and int64 labels in ``[0, C)``."""
  pf, lf = fields
  probs = np.asarray(probs_NxC)
  labels = np.asarray(labels_N)
  if probs.ndim != 2 or probs.shape[1] == 0 or labels.shape != (probs.shape[0],):
    raise DataError(f"{pf} must be [N, C] and {lf} [N]; got {probs.shape} and {labels.shape}")
  if probs.shape[0] == 0:
    raise DataError(f"{pf} and {lf} are empty; label quality needs at least one example")
  if not (np.issubdtype(probs.dtype, np.floating) or np.issubdtype(probs.dtype, np.integer)):
    raise DataError(f"{pf} must hold numbers; got dtype {probs.dtype}")
  if not (keep_dtype and probs.dtype in (np.float32, np.float64)):
    probs = probs.astype(np.float64)
  bad = ~np.isfinite(probs).all(axis=1) | (probs < 0).any(axis=1) | (probs > 1).any(axis=1)
  if bad.any():
    raise DataError(f"{pf} has NaN, inf or values outside [0, 1] in {int(bad.sum())} rows "
                    f"(positions {np.flatnonzero(bad)[:5].tolist()})")
  if not np.issubdtype(labels.dtype, np.integer):
    if not (np.issubdtype(labels.dtype, np.floating) and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))):
      raise DataError(f"{lf} must hold integer class labels; got dtype {labels.dtype}")
  labels = labels.astype(np.int64)
  if labels.min() < 0 or labels.max() >= probs.shape[1]:
    out = np.flatnonzero((labels < 0) | (labels >= probs.shape[1]))
    raise DataError(f"{lf} must lie in [0, {probs.shape[1] - 1}] ({pf} has {probs.shape[1]} "
                    f"columns); positions {out[:5].tolist()} do not")
  return probs, labels


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


def confidence_weighted_entropy(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """``log(1 + H/s) / max(H/s, 1e-6)`` with ``H`` the entropy of ``p`` normalized by ``log C`` and
  ``s = max(p(given label), 1e-6)``. LOW means probably mislabeled.

  References:
    Kuan, Mueller. ICML DataPerf Workshop 2022 (cleanlab's ``confidence_weighted_entropy``).
  """
  probs_NxC, labels_N = _check(probs_NxC, labels_N)
  return _quality(probs_NxC, labels_N, "confidence_weighted_entropy")


RANKINGS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")


def _quality(probs_NxC: np.ndarray, labels_N: np.ndarray, method: str) -> np.ndarray:
  """cleanlab 2.9's ``rank.get_*_for_each_label``, operation for operation (checked inputs)."""
  rows = np.arange(len(labels_N))
  self_conf_N = probs_NxC[rows, labels_N]
  if method == "self_confidence":
    return self_conf_N
  if method == "normalized_margin":
    others = probs_NxC.copy()
    others[rows, labels_N] = -np.inf
    return (self_conf_N - others.max(axis=1) + 1) / 2
  from scipy.special import xlogy
  entropy_N = -np.sum(xlogy(probs_NxC, probs_NxC), axis=1) / np.log(probs_NxC.shape[1])
  ratio_N = entropy_N / np.clip(self_conf_N, a_min=_CLIPPING, a_max=None)
  return np.log(ratio_N + 1) / np.clip(ratio_N, a_min=_CLIPPING, a_max=None)


def _adjust(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """cleanlab's ``adjust_pred_probs``: subtract the confident thresholds, shift, renormalize."""
  t_C = _thresholds(probs_NxC, labels_N)
  adj = probs_NxC - t_C
  adj += t_C.max()
  adj /= adj.sum(axis=1, keepdims=True)
  return adj


def _thresholds(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  # As cleanlab builds them (a list, then np.clip), so float32 inputs round as they do there.
  present = set(np.unique(labels_N).tolist())
  t = [np.mean(probs_NxC[:, k][labels_N == k]) if k in present else _MISSING_CLASS_THRESHOLD
       for k in range(probs_NxC.shape[1])]
  return np.clip(t, a_min=_THRESHOLD_LOWER_BOUND, a_max=None)


def confident_thresholds(probs_NxC: np.ndarray, labels_N: np.ndarray) -> np.ndarray:
  """``t_k``: the mean ``p(k)`` over examples labeled ``k`` (2 for a class with no example)."""
  probs_NxC, labels_N = _check(probs_NxC, labels_N)
  return _thresholds(probs_NxC, labels_N)


def _round_preserving_sum(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, float)
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
  above_NxC = probs_NxC >= _thresholds(probs_NxC, labels_N) - _THRESHOLD_EPS
  num_above_N = above_NxC.sum(axis=1)
  guess_N = np.where(num_above_N > 1, probs_NxC.argmax(axis=1), above_NxC.argmax(axis=1))
  return guess_N, num_above_N > 0


def _joint(probs_NxC: np.ndarray, labels_N: np.ndarray, calibrate: bool) -> np.ndarray:
  c = probs_NxC.shape[1]
  guess_N, confident_N = _confident_guess(probs_NxC, labels_N)
  # cleanlab transposes a (guess, label) confusion matrix: the same Fortran memory order makes the
  # float sums of the calibration below round exactly as there.
  cm = np.zeros((c, c), np.int64)
  np.add.at(cm, (guess_N[confident_N], labels_N[confident_N]), 1)
  cj = cm.T
  np.fill_diagonal(cj, np.maximum(np.diag(cj), 1))
  if not calibrate:
    return cj
  label_counts = np.bincount(labels_N, minlength=c)
  cal = (cj.T / np.clip(cj.sum(axis=1), a_min=_TINY, a_max=None) * label_counts).T
  cal = cal / np.clip(np.sum(cal), a_min=_TINY, a_max=None) * sum(label_counts)
  return _round_preserving_row_totals(cal)


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
  return _joint(probs_NxC, labels_N, calibrate)


def _keep_at_least_n_per_class(prune_counts_CxC: np.ndarray, n: int,
                               frac_noise: float = 1.0) -> np.ndarray:
  diag = np.diagonal(prune_counts_CxC)
  new_diag = np.maximum(diag, n)
  per_col = np.maximum(np.count_nonzero(prune_counts_CxC, axis=0) - 1.0, 1.0)
  m = prune_counts_CxC - (new_diag - diag) / per_col
  m[m < 0] = 0
  np.fill_diagonal(m, new_diag)
  # cleanlab's _reduce_prune_counts: scale the noise by frac_noise, move the rest to the diagonal.
  reduced = m * frac_noise
  np.fill_diagonal(reduced, m.diagonal())
  np.fill_diagonal(reduced, m.diagonal() + np.sum(m - reduced, axis=0))
  return _round_preserving_row_totals(reduced.astype(int)).astype(int)


def _off_diagonal_issues(probs_NxC, labels_N) -> np.ndarray:
  guess_N, confident_N = _confident_guess(probs_NxC, labels_N)
  return confident_N & (guess_N != labels_N)


def _prediction_is_label(probs_NxC, labels_N) -> np.ndarray:
  nudged = probs_NxC.copy()
  nudged[np.arange(len(labels_N)), labels_N] += _THRESHOLD_EPS
  return nudged.argmax(axis=1) == labels_N


def _num_label_issues(probs_NxC, labels_N) -> int:
  """cleanlab's ``count.num_label_issues`` (off-diagonal estimate)."""
  return int(np.sum(_off_diagonal_issues(probs_NxC, labels_N)
                    & ~_prediction_is_label(probs_NxC, labels_N)))


def _issues(probs_NxC: np.ndarray, labels_N: np.ndarray, *, filter_by: str,
            min_examples_per_class: int, frac_noise: float,
            num_to_remove_per_class: np.ndarray | None, joint_CxC: np.ndarray | None,
            argsort: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
  """cleanlab 2.9's ``filter.find_label_issues`` on checked inputs, step for step.

  ``argsort`` orders margins and scores: ``np.argsort`` (cleanlab's own, ties unspecified) or a
  stable sort over rows in id order (ties to the lower id).
  """
  n, c = probs_NxC.shape
  if filter_by in ("low_normalized_margin", "low_self_confidence"):
    scores_N = _quality(probs_NxC, labels_N, filter_by[4:])
    issues_N = np.zeros(n, bool)
    issues_N[argsort(scores_N)[:_num_label_issues(probs_NxC, labels_N)]] = True
    return issues_N
  if filter_by == "confident_learning":
    issues_N = _off_diagonal_issues(probs_NxC, labels_N)
  elif filter_by == "predicted_neq_given":
    issues_N = np.argmax(probs_NxC, axis=1) != labels_N
  else:
    if joint_CxC is None:
      joint_CxC = _joint(probs_NxC, labels_N, calibrate=True)
    prune_CxC = _keep_at_least_n_per_class(joint_CxC.T, min_examples_per_class, frac_noise)
    if num_to_remove_per_class is not None:
      psy = prune_CxC / np.sum(prune_CxC, axis=1)
      noise_per_s = psy.sum(axis=1) - psy.diagonal()
      tmp = (psy.T * num_to_remove_per_class / noise_per_s).T
      np.fill_diagonal(tmp, np.bincount(labels_N, minlength=c) - num_to_remove_per_class)
      prune_CxC = _round_preserving_row_totals(tmp)
    by_class_N = np.zeros(n, bool)
    by_noise_N = np.zeros(n, bool)
    for k in range(c):
      members = np.flatnonzero(labels_N == k)
      if len(members) <= max(min_examples_per_class, 1):  # cleanlab skips one-member classes too.
        continue
      p_MxC = probs_NxC[members]
      num_issues = len(members) - prune_CxC[k, k]
      if num_issues >= 1:
        by_class_N[members[argsort(p_MxC[:, k])[:num_issues]]] = True
      for j in range(c):
        count = prune_CxC[j, k]
        if j != k and count > 0:
          by_noise_N[members[argsort(-(p_MxC[:, j] - p_MxC[:, k]))[:count]]] = True
    issues_N = {"prune_by_class": by_class_N, "prune_by_noise_rate": by_noise_N,
                "both": by_class_N & by_noise_N}[filter_by]
  return issues_N & ~_prediction_is_label(probs_NxC, labels_N)


def _stable_argsort(x: np.ndarray) -> np.ndarray:
  return np.argsort(x, kind="stable")


def find_label_issues(probs_NxC: np.ndarray, labels_N: np.ndarray, *,
                      filter_by: str = "prune_by_noise_rate",
                      min_examples_per_class: int = 1, frac_noise: float = 1.0,
                      ids_N: np.ndarray | None = None,
                      mask_N: np.ndarray | None = None) -> np.ndarray:
  """Which examples are probably mislabeled, bool[N], from out-of-fold probabilities.

  The prunejax form: ``(probs, labels)`` order, rows keyed by ``ids_N``. With ``ids_N`` the rows are
  put in id order before anything is computed and ties (equal margins, equal scores) go to the lower
  id, so the answer by id does not depend on the row order; without it, ids are the positions. For
  cleanlab's own signature and argument order see :mod:`prunejax.scores.cleanlab_compat`.

  ``filter_by`` (all seven of cleanlab 2.9):

  * ``"confident_learning"``: the off-diagonal examples of the confident joint (confidently of a
    class other than their label).
  * ``"prune_by_noise_rate"`` (cleanlab's default): for each pair (given ``i``, true ``j != i``) the
    calibrated confident joint's count of examples labeled ``i`` with the largest margin
    ``p(j) - p(i)``, keeping at least ``min_examples_per_class`` per class.
  * ``"prune_by_class"``: per class ``i``, its estimated number of label errors with the lowest
    ``p(i)``; ``"both"``: flagged by both of these.
  * ``"predicted_neq_given"``: ``argmax p != label``.
  * ``"low_self_confidence"`` / ``"low_normalized_margin"``: the ``num_label_issues`` examples with
    the lowest score (the number being the confident joint's off-diagonal count).

  Except for the two ``low_*`` filters, an example whose label is the model's prediction is never
  flagged. Probabilities are used in float64.

  Args:
    probs_NxC: out-of-fold predicted probabilities, each in [0, 1].
    labels_N: given labels in ``[0, C)``.
    filter_by: one of :data:`FILTERS`.
    min_examples_per_class: classes with at most this many examples are never pruned.
    frac_noise: flag only this fraction of the estimated errors (the three prune filters).
    ids_N: unique int ids of the rows (default ``0..N-1``).
    mask_N: bool, False on padding rows: they are left out (their values are never read) and are
      False in the result.

  References:
    Northcutt, Jiang, Chuang. JAIR 2021, Sec. 3.2 (C_confusion, C_{y*,y} and prune-by-noise-rate).
  """
  check_choice("find_label_issues.filter_by", filter_by, FILTERS)
  n = len(np.asarray(labels_N)) if np.ndim(labels_N) else 0
  real = np.ones(n, bool) if mask_N is None else np.asarray(mask_N)
  if real.shape != (n,) or real.dtype != bool:
    raise DataError(f"mask_N must be bool[{n}] (False on padding rows); got dtype {real.dtype}, "
                    f"shape {real.shape}")
  rows = np.flatnonzero(real)
  probs_NxC, labels_N = _check(np.asarray(probs_NxC)[rows] if len(np.shape(probs_NxC)) == 2
                               and np.shape(probs_NxC)[0] == n else probs_NxC,
                               np.asarray(labels_N)[rows])
  _check_prune_args(min_examples_per_class, frac_noise)
  order = (np.arange(len(rows)) if ids_N is None
           else _id_order(np.asarray(ids_N)[rows] if np.shape(ids_N) == (n,) else ids_N, len(rows)))
  issues_sorted = _issues(probs_NxC[order], labels_N[order], filter_by=filter_by,
                          min_examples_per_class=min_examples_per_class, frac_noise=frac_noise,
                          num_to_remove_per_class=None, joint_CxC=None, argsort=_stable_argsort)
  issues_N = np.zeros(n, bool)
  issues_N[rows[order]] = issues_sorted
  return issues_N


def _check_prune_args(min_examples_per_class: Any, frac_noise: Any) -> None:
  if (isinstance(min_examples_per_class, bool) or not isinstance(min_examples_per_class,
                                                                 (int, np.integer))
      or min_examples_per_class < 0):
    raise ConfigError(f"min_examples_per_class={min_examples_per_class!r} is not allowed; "
                      f"expected an integer >= 0")
  check_range("frac_noise", frac_noise, 0.0, 1.0)


def _id_order(ids_N: Any, n: int) -> np.ndarray:
  ids = np.asarray(ids_N)
  if ids.shape != (n,) or not (np.issubdtype(ids.dtype, np.integer) or n == 0):
    raise DataError(f"ids_N must be {n} integer ids; got dtype {ids.dtype}, shape {ids.shape}")
  order = np.argsort(ids, kind="stable")
  if n and np.any(ids[order][1:] == ids[order][:-1]):
    rep = np.unique(ids[order][1:][ids[order][1:] == ids[order][:-1]])
    raise DataError(f"ids_N repeats ids {rep[:5].tolist()}; every example needs its own id")
  return order
