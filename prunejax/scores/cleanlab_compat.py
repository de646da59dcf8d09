"""cleanlab 2.9's label-issue functions with cleanlab's signatures, argument order and defaults.

For users who know cleanlab: ``find_label_issues(labels, pred_probs, filter_by=...)`` (as
``cleanlab.filter.find_label_issues``), ``get_label_quality_scores(labels, pred_probs, method=...)``
(as ``cleanlab.rank.get_label_quality_scores``), ``num_label_issues`` and ``order_label_issues``.
They return exactly what cleanlab returns on the same arrays: the same positions, the same order,
the same scores. They compute in the dtype of ``pred_probs`` (float32 stays float32, as in
cleanlab) and sort with NumPy's default ``argsort``, as cleanlab does, so ties are ordered as
cleanlab orders them. Everything is positional, like cleanlab.

The prunejax form of the same computation is :func:`prunejax.scores.find_label_issues`:
``(probs, labels)`` order, rows keyed by ``ids_N``, ties broken by id, independent of row order.

Differences from cleanlab: single-label only (no ``multi_label``); no ``n_jobs`` or ``verbose``
(one process, the result does not depend on them in cleanlab either); bad input is one
:class:`~prunejax.errors.DataError` or :class:`~prunejax.errors.ConfigError` naming the argument
(cleanlab raises assertions or computes on NaN).

References:
  Northcutt, Jiang, Chuang. "Confident Learning: Estimating Uncertainty in Dataset Labels."
  JAIR 2021. Kuan, Mueller. "Model-Agnostic Label Quality Scoring to Detect Real-World Label
  Errors." ICML DataPerf Workshop 2022.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from prunejax.errors import ConfigError, DataError, check_choice
from prunejax.scores import label_quality as lq

FILTERS = lq.FILTERS
METHODS = lq.RANKINGS
_FIELDS = ("pred_probs", "labels")


def _inputs(labels: Any, pred_probs: Any) -> tuple[np.ndarray, np.ndarray]:
  probs, labels = lq._check(pred_probs, labels, keep_dtype=True, fields=_FIELDS)
  return labels, probs


def get_label_quality_scores(labels: Any, pred_probs: Any, *, method: str = "self_confidence",
                             adjust_pred_probs: bool = False) -> np.ndarray:
  """Label quality score of every example, as ``cleanlab.rank.get_label_quality_scores``.

  Args:
    labels: int[N] given labels in ``[0, C)``.
    pred_probs: [N, C] out-of-fold predicted probabilities.
    method: ``"self_confidence"`` (``p(label)``), ``"normalized_margin"`` or
      ``"confidence_weighted_entropy"``.
    adjust_pred_probs: subtract each class's confident threshold first (not with
      ``confidence_weighted_entropy``, as in cleanlab).

  Returns:
    [N] scores in the dtype of ``pred_probs``; LOW means probably mislabeled.
  """
  check_choice("get_label_quality_scores.method", method, METHODS)
  labels, probs = _inputs(labels, pred_probs)
  if adjust_pred_probs:
    if method == "confidence_weighted_entropy":
      raise ConfigError("get_label_quality_scores.adjust_pred_probs=True is not supported with "
                        "method='confidence_weighted_entropy' (as in cleanlab)")
    probs = lq._adjust(probs, labels)
  return lq._quality(probs, labels, method)


def num_label_issues(labels: Any, pred_probs: Any) -> int:
  """The estimated number of label issues, as ``cleanlab.count.num_label_issues`` (its default
  ``estimation_method="off_diagonal"``): off-diagonal examples of the confident joint whose label
  is not the model's prediction."""
  labels, probs = _inputs(labels, pred_probs)
  return lq._num_label_issues(probs, labels)


def order_label_issues(label_issues_mask: Any, labels: Any, pred_probs: Any, *,
                       rank_by: str = "self_confidence",
                       rank_by_kwargs: Mapping[str, Any] | None = None) -> np.ndarray:
  """Positions of the flagged examples, lowest label quality first (``cleanlab.rank``)."""
  check_choice("order_label_issues.rank_by", rank_by, METHODS)
  labels, probs = _inputs(labels, pred_probs)
  mask = np.asarray(label_issues_mask)
  if mask.dtype != bool or mask.shape != labels.shape:
    raise DataError(f"label_issues_mask must be bool[{len(labels)}]; got dtype {mask.dtype}, "
                    f"shape {mask.shape}")
  scores = get_label_quality_scores(labels, probs, method=rank_by, **dict(rank_by_kwargs or {}))
  return np.arange(len(labels))[mask][np.argsort(scores[mask])]


def find_label_issues(labels: Any, pred_probs: Any, *,
                      return_indices_ranked_by: str | None = None,
                      rank_by_kwargs: Mapping[str, Any] | None = None,
                      filter_by: str = "prune_by_noise_rate", frac_noise: float = 1.0,
                      num_to_remove_per_class: Sequence[int] | None = None,
                      min_examples_per_class: int = 1,
                      confident_joint: Any = None) -> np.ndarray:
  """The examples that probably have label issues, as ``cleanlab.filter.find_label_issues``.

  Args:
    labels: int[N] given labels in ``[0, C)``.
    pred_probs: [N, C] out-of-fold predicted probabilities.
    return_indices_ranked_by: ``None`` returns a bool[N] mask; a method of
      :func:`get_label_quality_scores` returns the flagged positions, lowest quality first.
    rank_by_kwargs: passed to the ranking (e.g. ``{"adjust_pred_probs": True}``).
    filter_by: one of the seven filters of :data:`FILTERS` (see
      :func:`prunejax.scores.find_label_issues` for what each flags).
    frac_noise: flag only this fraction of the estimated errors (``prune_by_noise_rate``,
      ``prune_by_class``, ``both``).
    num_to_remove_per_class: int[C], how many to flag per class (the same three filters).
    min_examples_per_class: classes with at most this many examples are never pruned.
    confident_joint: int[C, C] to use instead of the calibrated confident joint (ignored by
      ``confident_learning``, as in cleanlab).

  Returns:
    bool[N], or int positions when ``return_indices_ranked_by`` is set.
  """
  check_choice("find_label_issues.filter_by", filter_by, FILTERS)
  if return_indices_ranked_by is not None:
    check_choice("find_label_issues.return_indices_ranked_by", return_indices_ranked_by, METHODS)
  labels, probs = _inputs(labels, pred_probs)
  lq._check_prune_args(min_examples_per_class, frac_noise)
  c = probs.shape[1]
  num_to_remove_per_class = _num_to_remove(num_to_remove_per_class, filter_by, frac_noise, c)
  confident_joint = _confident_joint(confident_joint, filter_by, c)
  issues_N = lq._issues(probs, labels, filter_by=filter_by,
                        min_examples_per_class=min_examples_per_class, frac_noise=frac_noise,
                        num_to_remove_per_class=num_to_remove_per_class,
                        joint_CxC=confident_joint, argsort=np.argsort)
  if return_indices_ranked_by is None:
    return issues_N
  return order_label_issues(issues_N, labels, probs, rank_by=return_indices_ranked_by,
                            rank_by_kwargs=rank_by_kwargs)


_PRUNE_FILTERS = ("prune_by_noise_rate", "prune_by_class", "both")


def _num_to_remove(num_to_remove_per_class: Any, filter_by: str, frac_noise: float,
                   c: int) -> np.ndarray | None:
  """``num_to_remove_per_class`` as int[C] (or None); it and ``frac_noise`` only with the three
  filters that prune by count."""
  if num_to_remove_per_class is not None:
    if filter_by not in _PRUNE_FILTERS:
      raise ConfigError(f"find_label_issues.num_to_remove_per_class works only with filter_by in "
                        f"{_PRUNE_FILTERS}; got filter_by={filter_by!r}")
    num_to_remove_per_class = np.asarray(num_to_remove_per_class)
    if (num_to_remove_per_class.shape != (c,)
        or not np.issubdtype(num_to_remove_per_class.dtype, np.integer)
        or (num_to_remove_per_class < 0).any()):
      raise DataError(f"find_label_issues.num_to_remove_per_class must be {c} non-negative ints")
  if frac_noise != 1.0 and filter_by not in _PRUNE_FILTERS:
    raise ConfigError(f"find_label_issues.frac_noise works only with filter_by in "
                      f"{_PRUNE_FILTERS}; got filter_by={filter_by!r}")
  return num_to_remove_per_class


def _confident_joint(confident_joint: Any, filter_by: str, c: int) -> np.ndarray | None:
  """A checked ``[C, C]`` matrix of non-negative counts, or None (not given, or
  ``confident_learning``, which ignores it as cleanlab does)."""
  if confident_joint is None:
    return None
  confident_joint = np.asarray(confident_joint)
  if confident_joint.shape != (c, c) or not (np.isfinite(confident_joint).all()
                                              and (confident_joint >= 0).all()):
    raise DataError(f"find_label_issues.confident_joint must be a [{c}, {c}] matrix of "
                    f"non-negative counts; got shape {confident_joint.shape}")
  return None if filter_by == "confident_learning" else confident_joint
