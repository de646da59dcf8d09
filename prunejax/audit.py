"""One audit of a dataset: every issue type per example, in one table keyed by id (as cleanlab's
``Datalab.find_issues`` then ``get_issues()``), with a summary and the duplicate sets.

Entry points: :func:`audit` (arrays keyed by ids) and :func:`audit_source` (a
:class:`prunejax.data.Source`, its ``x`` hashed chunk by chunk); :func:`summary_markdown` renders
the summary.

Issue types (:data:`ISSUE_TYPES`), each run when its inputs are given:

* ``label`` (labels + out-of-fold probabilities, or a ``fit_predict`` to make them by stratified
  K-fold): flagged by :func:`prunejax.scores.find_label_issues` (``filter_by``, cleanlab's
  default ``prune_by_noise_rate``), scored by cleanlab's label quality (``label_score_method``,
  default ``self_confidence``), as Datalab's label issue.
* ``exact_duplicate`` (content, or its :func:`~prunejax.dedup.content_hashes`): groups of equal
  content; every member but the lowest id of a group is flagged (what cleaning removes); the score
  is ``1 / group size``.
* ``near_duplicate`` (embeddings, or an ``embed_fn``): SemDeDup (:func:`prunejax.dedup.semdedup`)
  at ``near_duplicate_eps``; the flagged examples are the ones SemDeDup removes; the score is the
  cosine distance ``1 - M_j`` to the closest example SemDeDup keeps before it in its cluster,
  clipped to [0, 1] (1 where there is none). Sets: connected components of (removed, duplicate_of).
* ``outlier`` (embeddings): Datalab's kNN outlier issue: the mean distance to the ``outlier_k``
  nearest other examples; the score is Datalab's ``exp(-avg / median(avg))``; flagged when
  ``avg > Q3 + (1 / outlier_threshold - 1) * IQR`` of ``avg`` (Datalab's rule, threshold 0.37037).
  Up to ``outlier_exact_max`` examples the neighbours are exact
  (:func:`prunejax.scores.knn_distances`); above, they are searched inside SemDeDup's k-means
  clusters (cosine, float32; exact for an example whose true neighbours share its cluster, which is
  the usual case but not guaranteed).
* ``leakage`` (content or hashes of a test split too): training examples whose content occurs in
  the test split; score 0 if leaked, else 1.

Scores follow Datalab's convention: in [0, 1], **low = more severe**. Rows are keyed by id: the
audit sorts by id first, so any row order gives the same answer by id, and ties go to the lower id.
Every input is checked: NaN/inf, labels out of range, repeated ids, lengths that disagree and empty
input raise one :class:`~prunejax.errors.DataError` naming the argument. ``mask_N`` drops padding
rows.

References:
  cleanlab Datalab (``Datalab.find_issues`` / ``get_issues`` / ``get_issue_summary``);
  Northcutt et al., JAIR 2021; Abbas et al., arXiv:2303.09540, 2023; Kuan & Mueller, 2022.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from prunejax import audit_issues as issues, dedup
from prunejax.audit_issues import Issue
from prunejax.errors import (ConfigError, DataError, check_choice, check_positive_int, check_range,
                             check_unique_ids)
from prunejax.scores import label_quality as lq

ISSUE_TYPES = ("label", "exact_duplicate", "near_duplicate", "outlier", "leakage")
OUTLIER_SEARCH = ("auto", "exact", "cluster")


class Audit(NamedTuple):
  """What :func:`audit` found, one row per example in ascending id order (host NumPy).

  Attributes:
    ids: i64[N] sorted example ids.
    is_issue: ``{issue type: bool[N]}`` for every type that ran.
    score: ``{issue type: f64[N]}`` in [0, 1], low = more severe (Datalab's convention).
    given_label: i64[N] labels (None without labels).
    predicted_label: i64[N] argmax of the probabilities (None without them).
    exact_duplicate_sets: sorted id arrays, one per group of equal content, by lowest id.
    near_duplicate_sets: the same for SemDeDup's near-duplicate sets.
    leakage_pairs: i64[P, 2], every (train id, test id) with equal content.
    summary: ``{issue type: {"ran", "count", "share", ...}}`` for every type of ISSUE_TYPES.
    info: settings and statistics (thresholds, metric, k, eps, ...).
  """

  ids: np.ndarray
  is_issue: dict
  score: dict
  given_label: np.ndarray | None
  predicted_label: np.ndarray | None
  exact_duplicate_sets: list
  near_duplicate_sets: list
  leakage_pairs: np.ndarray
  summary: dict
  info: dict

  def table(self) -> dict[str, np.ndarray]:
    """Datalab's ``get_issues()`` as columns: ``id``, then ``is_<type>_issue`` and
    ``<type>_score`` for every type that ran, then ``given_label`` / ``predicted_label``."""
    cols = {"id": self.ids}
    for t in ISSUE_TYPES:
      if t in self.is_issue:
        cols[f"is_{t}_issue"] = self.is_issue[t]
        cols[f"{t}_score"] = self.score[t]
    if self.given_label is not None:
      cols["given_label"] = self.given_label
    if self.predicted_label is not None:
      cols["predicted_label"] = self.predicted_label
    return cols

  def issue_ids(self, issue_type: str) -> np.ndarray:
    """Sorted ids flagged with ``issue_type``."""
    check_choice("issue_type", issue_type, list(self.is_issue))
    return self.ids[self.is_issue[issue_type]]

  def top(self, issue_type: str, n: int) -> np.ndarray:
    """The ``n`` most severe flagged ids of ``issue_type`` (lowest score first, ties by id)."""
    check_choice("issue_type", issue_type, list(self.is_issue))
    flagged = np.flatnonzero(self.is_issue[issue_type])
    order = np.lexsort((self.ids[flagged], self.score[issue_type][flagged]))
    return self.ids[flagged[order[:n]]]

  def remove_ids(self, issue_types: Sequence[str] | None = None) -> np.ndarray:
    """Sorted ids flagged by any of ``issue_types`` (all that ran by default): what cleaning by
    this audit removes."""
    types = list(self.is_issue) if issue_types is None else list(issue_types)
    flagged = np.zeros(len(self.ids), bool)
    for t in types:
      check_choice("remove_ids.issue_types", t, ISSUE_TYPES)
      if t not in self.is_issue:
        raise ConfigError(f"remove_ids.issue_types names {t!r}, which this audit did not run "
                          f"(it ran: {', '.join(self.is_issue) or 'nothing'})")
      flagged |= self.is_issue[t]
    return self.ids[flagged]

  def save(self, path: str) -> None:
    """The table, the sets (ragged: flat ids + set sizes) and the leakage pairs as one .npz,
    written atomically (:func:`prunejax.fileio.atomic_savez`)."""
    from prunejax.fileio import atomic_savez
    flat = lambda sets: (np.concatenate(sets) if sets else np.zeros(0, np.int64))
    sizes = lambda sets: np.asarray([len(s) for s in sets], np.int64)
    atomic_savez(path, **self.table(),
                 exact_duplicate_set_ids=flat(self.exact_duplicate_sets),
                 exact_duplicate_set_sizes=sizes(self.exact_duplicate_sets),
                 near_duplicate_set_ids=flat(self.near_duplicate_sets),
                 near_duplicate_set_sizes=sizes(self.near_duplicate_sets),
                 leakage_pairs=self.leakage_pairs)


# ----------------------------------------------------------------------------------------------
# Inputs.
# ----------------------------------------------------------------------------------------------


def _rows(name: str, x: Any, n: int, keep: np.ndarray, order: np.ndarray) -> np.ndarray:
  """``x`` (one row per input example) without padding rows, in id order."""
  if isinstance(x, jax.Array):
    x = np.asarray(jax.device_get(x))
  if not isinstance(x, np.ndarray):
    x = np.asarray(x, dtype=object if name in ("content", "test_content") else None)
  if x.ndim == 0 or len(x) != n:
    raise DataError(f"audit.{name} has {0 if x.ndim == 0 else len(x)} rows for {n} ids")
  return x[keep][order]


def _hashes(fields: tuple[str, str], hashes: Any, content: Any, kind: str | None,
            pad_id: int | None, n: int, keep: np.ndarray, order: np.ndarray) -> np.ndarray | None:
  """Digests in id order from ``hashes`` or ``content``; ``fields`` names them in messages."""
  hf, cf = fields
  if hashes is not None and content is not None:
    raise ConfigError(f"audit: pass {hf} or {cf}, not both")
  if hashes is not None:
    return dedup.exact._check_hashes(_rows(hf, hashes, n, keep, order), f"audit.{hf}")
  if content is None:
    return None
  if kind is None:
    raise ConfigError(f"audit: {cf} needs kind ('image', 'text' or 'tokens')")
  rows = _rows(cf, content, n, keep, order)
  return dedup.content_hashes(list(rows) if kind == "text" else rows, kind=kind, pad_id=pad_id)


def _mask(mask_N: Any, n: int, field: str) -> np.ndarray:
  if mask_N is None:
    return np.ones(n, bool)
  mask = np.asarray(mask_N)
  if mask.shape != (n,) or mask.dtype != bool:
    raise DataError(f"{field} must be bool[{n}] (False on padding rows); got dtype {mask.dtype}, "
                    f"shape {mask.shape}")
  return mask


def _ids_in_order(ids_N: Any, mask_N: Any, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(sorted real ids, keep mask over the input rows, order of the kept rows by id)."""
  raw = np.asarray(ids_N)
  if raw.ndim != 1:
    raise DataError(f"{field} must be a 1-D array of integer ids; got shape {raw.shape}")
  keep = _mask(mask_N, len(raw), field.replace("ids", "mask"))
  ids = check_unique_ids(field, raw[keep])
  if len(ids) == 0:
    raise DataError(f"{field} has no examples (empty, or every row is padding)")
  order = np.argsort(ids, kind="stable")
  return ids[order], keep, order


def _check_settings(filter_by: str, label_score_method: str, outlier_search: str,
                    near_duplicate_eps: float, outlier_threshold: float, outlier_k: int,
                    outlier_exact_max: int) -> None:
  check_choice("audit.filter_by", filter_by, lq.FILTERS)
  check_choice("audit.label_score_method", label_score_method, lq.RANKINGS)
  check_choice("audit.outlier_search", outlier_search, OUTLIER_SEARCH)
  check_range("audit.near_duplicate_eps", near_duplicate_eps, 0.0, 1.0)
  check_range("audit.outlier_threshold", outlier_threshold, 0.0, 1.0, lo_open=True)
  check_positive_int("audit.outlier_k", outlier_k)
  check_positive_int("audit.outlier_exact_max", outlier_exact_max)


def _labels(rows: Callable[[str, Any], np.ndarray], ids: np.ndarray, labels_N: Any,
            probs_NxC: Any, fit_predict: Callable | None, *, num_folds: int, seed: int,
            filter_by: str, label_score_method: str) -> tuple[dict[str, Issue], np.ndarray | None]:
  """({"label": issue} when probabilities are given or made, else {}; the given labels in id
  order, or None). Out-of-fold probabilities are made by ``fit_predict`` when not given."""
  if probs_NxC is None and fit_predict is None:
    return {}, None if labels_N is None else rows("labels_N", labels_N).astype(np.int64)
  if labels_N is None:
    raise ConfigError("audit: label issues need labels_N beside probs_NxC or fit_predict")
  labels = rows("labels_N", labels_N)
  if probs_NxC is None:
    probs = lq.out_of_fold_probs(fit_predict, ids, np.asarray(labels), num_folds=num_folds,
                                 seed=seed)
  else:
    if fit_predict is not None:
      raise ConfigError("audit: pass probs_NxC or fit_predict, not both")
    probs = rows("probs_NxC", probs_NxC)
  probs, labels = lq._check(probs, labels, fields=("audit.probs_NxC", "audit.labels_N"))
  label = issues.label_issue(probs, labels, filter_by=filter_by,
                             label_score_method=label_score_method)
  return {"label": label}, labels


def _test_split(test_ids: Any, test_content: Any, test_hashes: Any, test_mask: Any,
                kind: str | None, pad_id: int | None, train_h: np.ndarray | None
                ) -> tuple[np.ndarray, np.ndarray] | None:
  """(sorted test ids, their digests) for ``leakage``, or None when no test split is given."""
  if test_ids is None and test_content is None and test_hashes is None:
    return None
  if train_h is None:
    raise ConfigError("audit: leakage needs the training content or hashes_N too")
  if test_ids is None:
    raise ConfigError("audit: leakage needs test_ids beside test_content or test_hashes")
  te_ids, te_keep, te_order = _ids_in_order(test_ids, test_mask, "audit.test_ids")
  te_h = _hashes(("test_hashes", "test_content"), test_hashes, test_content, kind, pad_id,
                 len(np.asarray(test_ids)), te_keep, te_order)
  if te_h is None:
    raise ConfigError("audit: leakage needs test_content or test_hashes beside test_ids")
  return te_ids, te_h


def _embeddings(rows: Callable[[str, Any], np.ndarray], ids: np.ndarray, embeddings_NxD: Any,
                embed_fn: Callable | None) -> np.ndarray | None:
  """Checked finite numeric embeddings ``[N, D]`` in id order (given or from ``embed_fn``)."""
  n = len(ids)
  if embeddings_NxD is None and embed_fn is not None:
    emb = np.asarray(embed_fn(ids))
    if emb.ndim != 2 or len(emb) != n:
      raise DataError(f"audit.embed_fn returned shape {emb.shape} for {n} ids")
  elif embeddings_NxD is not None:
    if embed_fn is not None:
      raise ConfigError("audit: pass embeddings_NxD or embed_fn, not both")
    emb = rows("embeddings_NxD", embeddings_NxD)
  else:
    return None
  if emb.ndim != 2 or emb.shape[1] == 0 or not np.issubdtype(emb.dtype, np.number):
    raise DataError(f"audit.embeddings_NxD must be a numeric [N, D] array; got dtype "
                    f"{emb.dtype}, shape {emb.shape}")
  bad = ~np.isfinite(emb).all(axis=1)
  if bad.any():
    raise DataError(f"audit.embeddings_NxD has NaN or inf in {int(bad.sum())} rows (ids "
                    f"{ids[bad][:5].tolist()})")
  return emb


def _embedding_issues(ids: np.ndarray, emb_NxD: np.ndarray, *, near_duplicate_eps: float,
                      num_clusters: int | None, keep: str, seed: int, outlier_k: int,
                      outlier_threshold: float, outlier_search: str, outlier_exact_max: int
                      ) -> dict[str, Issue]:
  """``near_duplicate`` and (with more than ``outlier_k`` examples) ``outlier``."""
  n = len(ids)
  k_clusters = num_clusters if num_clusters is not None else max(1, int(round(np.sqrt(n))))
  if isinstance(k_clusters, int) and k_clusters > n:
    raise ConfigError(f"audit.num_clusters={k_clusters} exceeds the number of examples N={n}")
  near, clusters = issues.near_duplicate_issue(ids, emb_NxD, eps=near_duplicate_eps,
                                               num_clusters=k_clusters, keep=keep, seed=seed)
  if n <= outlier_k:
    skipped = {"outlier_skipped": f"N={n} is not more than outlier_k={outlier_k}"}
    return {"near_duplicate": near._replace(info={**near.info, **skipped})}
  return {"near_duplicate": near, "outlier": issues.outlier_issue(
      emb_NxD, clusters, k=outlier_k, threshold=outlier_threshold, search=outlier_search,
      exact_max=outlier_exact_max)}


def _result(ids: np.ndarray, found: dict[str, Issue], given: np.ndarray | None) -> Audit:
  """The :class:`Audit` of the issue types that ran (``found``, in the order they ran)."""
  fields = {"given_label": given, "predicted_label": None, "exact_duplicate_sets": [],
            "near_duplicate_sets": [], "leakage_pairs": np.zeros((0, 2), np.int64)}
  summary = {t: {"ran": False, "count": 0, "share": 0.0} for t in ISSUE_TYPES}
  info = {}
  for t, issue in found.items():
    count = int(issue.is_issue.sum())
    summary[t] = {"ran": True, "count": count, "share": count / len(ids), **issue.summary}
    info.update(issue.info)
    fields.update(issue.fields)
  return Audit(ids=ids, is_issue={t: i.is_issue for t, i in found.items()},
               score={t: i.score for t, i in found.items()}, summary=summary, info=info,
               **fields)


# ----------------------------------------------------------------------------------------------
# The audit.
# ----------------------------------------------------------------------------------------------


def audit(ids_N: Any, *, labels_N: Any = None, probs_NxC: Any = None,
          embeddings_NxD: Any = None, content: Any = None, hashes_N: Any = None,
          kind: str | None = None, pad_id: int | None = None, mask_N: Any = None,
          test_ids: Any = None, test_content: Any = None, test_hashes: Any = None,
          test_mask: Any = None,
          fit_predict: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
          num_folds: int = 5, embed_fn: Callable[[np.ndarray], Any] | None = None,
          filter_by: str = "prune_by_noise_rate", label_score_method: str = "self_confidence",
          near_duplicate_eps: float = 0.05, num_clusters: int | None = None,
          keep: str = "farthest", outlier_k: int = 10, outlier_threshold: float = 0.37037,
          outlier_search: str = "auto", outlier_exact_max: int = 20_000,
          seed: int = 0) -> Audit:
  """Audits a dataset for every issue type its inputs allow (module docstring); one row per id.

  Args:
    ids_N: unique int ids of the (training) examples, in any order.
    labels_N, probs_NxC: given labels (int in ``[0, C)``) and out-of-fold probabilities.
    embeddings_NxD: one embedding per example, for ``near_duplicate`` and ``outlier``.
    content, hashes_N, kind, pad_id: the content for ``exact_duplicate`` / ``leakage`` (as
      :func:`prunejax.dedup.content_hashes` with ``kind``), or its digests.
    mask_N: bool, False on padding rows (dropped); default all real.
    test_ids, test_content, test_hashes, test_mask: the test split, for ``leakage``.
    fit_predict, num_folds: ``fit_predict(train_ids, heldout_ids) -> probs`` (ids ascending) to
      make ``probs_NxC`` by stratified K-fold (:func:`prunejax.scores.out_of_fold_probs`).
    embed_fn: ``embed_fn(ids) -> [len(ids), D]``, to compute embeddings when not given.
    filter_by, label_score_method: :func:`prunejax.scores.find_label_issues`' filter and
      cleanlab's label quality (``self_confidence``, ``normalized_margin``, ...).
    near_duplicate_eps, num_clusters, keep: SemDeDup's threshold in [0, 1], its k-means clusters
      (default ``max(1, round(sqrt(N)))``, at most N) and keep rule.
    outlier_k, outlier_threshold: Datalab's ``k`` and ``threshold``.
    outlier_search, outlier_exact_max: ``"exact"``, ``"cluster"`` or ``"auto"`` (exact up to
      ``outlier_exact_max`` examples, or at most 3 dimensions).
    seed: seeds k-means and the folds.

  Returns:
    An :class:`Audit`.
  """
  _check_settings(filter_by, label_score_method, outlier_search, near_duplicate_eps,
                  outlier_threshold, outlier_k, outlier_exact_max)
  ids, keep_rows, order = _ids_in_order(ids_N, mask_N, "audit.ids_N")
  n_in = len(np.asarray(ids_N))
  rows = lambda name, x: _rows(name, x, n_in, keep_rows, order)
  found, given = _labels(rows, ids, labels_N, probs_NxC, fit_predict, num_folds=num_folds,
                         seed=seed, filter_by=filter_by, label_score_method=label_score_method)
  train_h = _hashes(("hashes_N", "content"), hashes_N, content, kind, pad_id, n_in, keep_rows,
                    order)
  if train_h is not None:
    found["exact_duplicate"] = issues.exact_duplicate_issue(ids, train_h)
  test = _test_split(test_ids, test_content, test_hashes, test_mask, kind, pad_id, train_h)
  if test is not None:
    found["leakage"] = issues.leakage_issue(ids, train_h, *test)
  emb = _embeddings(rows, ids, embeddings_NxD, embed_fn)
  if emb is not None:
    found.update(_embedding_issues(
        ids, emb, near_duplicate_eps=near_duplicate_eps, num_clusters=num_clusters, keep=keep,
        seed=seed, outlier_k=outlier_k, outlier_threshold=outlier_threshold,
        outlier_search=outlier_search, outlier_exact_max=outlier_exact_max))
  return _result(ids, found, given)


def audit_source(source: Any, ids: Any = None, *, test: Any = None, test_ids: Any = None,
                 kind: str | None = None, pad_id: int | None = None, chunk: int = 4096,
                 **kwargs: Any) -> Audit:
  """:func:`audit` of a :class:`prunejax.data.Source`: its labels and its ``x`` as content.

  Args:
    source: the training source (``read(ids)``, ``labels(ids)``, ``ids``).
    ids: the ids to audit (default all of ``source``).
    test, test_ids: the test source and its ids (default all), for ``leakage``.
    kind: how ``x`` is hashed: ``"image"`` (default for arrays) or ``"tokens"`` (with ``pad_id``).
    chunk: examples read at a time (only digests are kept).
    **kwargs: the rest of :func:`audit` (``probs_NxC``, ``embeddings_NxD``, ``fit_predict``,
      ``embed_fn``, thresholds, ...), rows in the order of ``ids``.
  """
  ids = np.asarray(source.ids if ids is None else ids)
  kind = kind or "image"

  def digests(src, which):
    parts = [dedup.content_hashes(src.read(which[s:s + chunk])["x"], kind=kind, pad_id=pad_id)
             for s in range(0, len(which), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0, dedup.exact.HASH_DTYPE)

  extra = {}
  if test is not None:
    te = np.asarray(test.ids if test_ids is None else test_ids)
    extra = {"test_ids": te, "test_hashes": digests(test, te)}
  return audit(ids, labels_N=source.labels(ids), hashes_N=digests(source, ids), **extra, **kwargs)


def summary_markdown(result: Audit) -> str:
  """The summary as a Markdown table: issue type, whether it ran, count, share, and sets."""
  lines = ["| issue type | checked | flagged | share | sets / pairs |", "|---|---|---:|---:|---:|"]
  for t in ISSUE_TYPES:
    s = result.summary[t]
    extra = s.get("groups", s.get("sets", s.get("pairs", "")))
    lines.append(f"| {t} | {'yes' if s['ran'] else 'no'} | {s['count']:,} | "
                 f"{s['share']:.2%} | {extra} |")
  return "\n".join(lines)
