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

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from prunejax import dedup
from prunejax.dedup.exact import _check_ids
from prunejax.errors import ConfigError, DataError, check_choice, check_positive_int, check_range
from prunejax.scores import label_quality as lq
from prunejax.scores.outliers import _knn_host

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
  ids = _check_ids(raw[keep], field=field)
  if len(ids) == 0:
    raise DataError(f"{field} has no examples (empty, or every row is padding)")
  order = np.argsort(ids, kind="stable")
  return ids[order], keep, order


# ----------------------------------------------------------------------------------------------
# Issue types.
# ----------------------------------------------------------------------------------------------


def _components(ids: np.ndarray, u: np.ndarray, v: np.ndarray) -> list[np.ndarray]:
  """Connected components (of two or more) of the graph on positions with edges (u, v)."""
  parent = np.arange(len(ids))

  def find(a):
    while parent[a] != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a

  for a, b in zip(u.tolist(), v.tolist()):
    ra, rb = find(a), find(b)
    if ra != rb:
      parent[max(ra, rb)] = min(ra, rb)
  roots = np.array([find(a) for a in range(len(ids))])
  _, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
  member = counts[inverse] > 1
  groups: dict[int, list[int]] = {}
  for pos in np.flatnonzero(member).tolist():
    groups.setdefault(int(roots[pos]), []).append(pos)
  return sorted((np.sort(ids[g]) for g in groups.values()), key=lambda g: int(g[0]))


def _cluster_knn(x: np.ndarray, clusters: np.ndarray, k: int, block: int = 4096
                 ) -> np.ndarray:
  """Mean cosine distance to the ``k`` nearest other examples of the same cluster, f64[N]
  (the whole dataset for examples of clusters with at most ``k`` members).

  Everything is float32 (the approximate search's own precision, ~1e-7 in the distances); rows
  equal in float32 count as exact copies, at distance exactly 0 as in Datalab.
  """
  x = np.asarray(x, np.float32)
  u32 = x / np.sqrt(np.einsum("nd,nd->n", x, x))[:, None]
  n = len(u32)
  avg = np.zeros(n)
  counts = np.bincount(clusters)

  def rows_avg(sim: np.ndarray, r: np.ndarray, cols: np.ndarray) -> None:
    # Exact copies (similarity within f32 rounding of 1, then compared) rank first and sit at
    # distance 0 (clipped below).
    ri, ci = np.nonzero(sim >= 1.0 - 1e-5)
    same = np.all(x[r[ri]] == x[cols[ci]], axis=1)
    sim[ri[same], ci[same]] = 2.0
    # Only the k largest values are needed (not their positions): partition, no argsort.
    top = np.partition(sim, sim.shape[1] - k, axis=1)[:, -k:].astype(np.float64)
    avg[r] = np.maximum(1.0 - top, 0.0).mean(axis=1)

  order = np.argsort(clusters, kind="stable")
  starts = np.concatenate([[0], np.cumsum(counts)])
  for c in np.flatnonzero(counts > k):
    members = order[starts[c]:starts[c + 1]]
    u_m = u32[members]
    for s in range(0, len(members), block):
      # One block is u_m @ u_m.T, which NumPy computes as a symmetric rank-k update (half the work).
      sim = u_m @ u_m.T if len(members) <= block else u_m[s:s + block] @ u_m.T
      rows = np.arange(s, min(s + block, len(members)))
      sim[rows - s, rows] = -np.inf
      rows_avg(sim, members[rows], members)
  small = np.flatnonzero(counts[clusters] <= k)
  for s in range(0, len(small), block):
    r = small[s:s + block]
    sim = u32[r] @ u32.T
    sim[np.arange(len(r)), r] = -np.inf
    rows_avg(sim, r, np.arange(n))
  return avg


def _outliers(x: np.ndarray, *, k: int, threshold: float, search: str, exact_max: int,
              clusters: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, dict]:
  n = len(x)
  if k >= n:
    raise ConfigError(f"audit.outlier_k={k} needs more than k examples; got N={n}")
  use_exact = search == "exact" or (search == "auto" and (n <= exact_max or x.shape[1] <= 3))
  if use_exact:
    dist, _, metric = _knn_host(np.asarray(x, np.float64), k, "auto", 256, 1024, None)
    avg = dist.mean(axis=1)
  else:
    if clusters is None:
      raise ConfigError("audit: outlier_search='cluster' needs the SemDeDup clusters (run with "
                        "near-duplicate detection on, i.e. embeddings given)")
    metric = "cosine"
    avg = _cluster_knn(x, clusters, k)
  # Datalab: exp(-avg / scale), scale = median(avg) (at least 100 eps), 1 below a tolerance.
  scale = max(float(np.median(avg)), 100 * np.finfo(np.float64).eps)
  score = np.exp(-avg / scale)
  tol = (100 * np.finfo(np.float64).epsneg if metric == "cosine"
         else np.sqrt(100 * np.finfo(np.float64).eps))
  score[avg < tol] = 1.0
  q1, q3 = np.percentile(avg, [25, 75])
  issue_threshold = q3 + (1.0 / threshold - 1.0) * (q3 - q1)
  info = {"outlier_k": k, "outlier_metric": metric,
          "outlier_search": "exact" if use_exact else "cluster",
          "outlier_issue_threshold": float(issue_threshold)}
  return avg > issue_threshold, score, info


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
  """Audits a dataset for every issue type its inputs allow; one row per id.

  Args:
    ids_N: unique int ids of the (training) examples, in any order.
    labels_N: their given labels, int in ``[0, C)``.
    probs_NxC: out-of-fold predicted probabilities (rows as ``ids_N``).
    embeddings_NxD: one embedding per example (e.g. ``prunejax.scores.penultimate`` features or
      GPT-2 features), for ``near_duplicate`` and ``outlier``.
    content: the examples' content for ``exact_duplicate`` / ``leakage`` (an array ``[N, ...]``,
      ``N`` strings or token rows, as :func:`prunejax.dedup.content_hashes` with ``kind``).
    hashes_N: instead of ``content``, its digests (:func:`prunejax.dedup.hash_batches`).
    kind, pad_id: how content is hashed (``"image"``, ``"text"``, ``"tokens"``).
    mask_N: bool, False on padding rows (dropped); default all real.
    test_ids, test_content, test_hashes, test_mask: the test split, for ``leakage``.
    fit_predict: ``fit_predict(train_ids, heldout_ids) -> probs``, to make out-of-fold
      probabilities by stratified K-fold when ``probs_NxC`` is not given
      (:func:`prunejax.scores.out_of_fold_probs`); called with ids in ascending order.
    num_folds: K of that cross-validation.
    embed_fn: ``embed_fn(ids) -> [len(ids), D]``, to compute embeddings when not given.
    filter_by: :func:`prunejax.scores.find_label_issues` filter (one of its seven).
    label_score_method: ``"self_confidence"``, ``"normalized_margin"`` or
      ``"confidence_weighted_entropy"``.
    near_duplicate_eps: SemDeDup's cosine-distance threshold in [0, 1].
    num_clusters: SemDeDup's k-means clusters (default ``max(1, round(sqrt(N)))``, at most N).
    keep: SemDeDup's keep rule (``"farthest"`` or ``"lowest_id"``).
    outlier_k, outlier_threshold: Datalab's ``k`` and ``threshold``.
    outlier_search: ``"exact"``, ``"cluster"`` or ``"auto"`` (exact up to ``outlier_exact_max``
      examples, or at most 3 dimensions).
    seed: seeds k-means and the folds.

  Returns:
    An :class:`Audit`.
  """
  check_choice("audit.filter_by", filter_by, lq.FILTERS)
  check_choice("audit.label_score_method", label_score_method, lq.RANKINGS)
  check_choice("audit.outlier_search", outlier_search, OUTLIER_SEARCH)
  check_range("audit.near_duplicate_eps", near_duplicate_eps, 0.0, 1.0)
  check_range("audit.outlier_threshold", outlier_threshold, 0.0, 1.0, lo_open=True)
  check_positive_int("audit.outlier_k", outlier_k)
  check_positive_int("audit.outlier_exact_max", outlier_exact_max)
  ids, keep_rows, order = _ids_in_order(ids_N, mask_N, "audit.ids_N")
  n_in = len(np.asarray(ids_N))
  n = len(ids)
  rows = lambda name, x: _rows(name, x, n_in, keep_rows, order)
  is_issue, score, info = {}, {}, {}
  summary = {t: {"ran": False, "count": 0, "share": 0.0} for t in ISSUE_TYPES}
  given = predicted = None
  exact_sets: list[np.ndarray] = []
  near_sets: list[np.ndarray] = []
  leak_pairs = np.zeros((0, 2), np.int64)

  # -- label ------------------------------------------------------------------------------------
  if probs_NxC is not None or fit_predict is not None:
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
    # Rows are in id order, so the by-id form's stable sorts break ties by id.
    is_issue["label"] = lq._issues(probs, labels, filter_by=filter_by, min_examples_per_class=1,
                                   frac_noise=1.0, num_to_remove_per_class=None, joint_CxC=None,
                                   argsort=lq._stable_argsort)
    score["label"] = lq._quality(probs, labels, label_score_method).astype(np.float64)
    given, predicted = labels, probs.argmax(axis=1)
    info.update(filter_by=filter_by, label_score_method=label_score_method,
                num_classes=probs.shape[1])
  elif labels_N is not None:
    given = rows("labels_N", labels_N).astype(np.int64)

  # -- exact duplicates and leakage ---------------------------------------------------------------
  train_h = _hashes(("hashes_N", "content"), hashes_N, content, kind, pad_id, n_in, keep_rows,
                    order)
  if train_h is not None:
    exact_sets = dedup.exact_duplicates(ids, train_h)
    redundant = dedup.redundant_ids(exact_sets)
    is_issue["exact_duplicate"] = np.isin(ids, redundant)
    size = np.ones(n)
    for g in exact_sets:
      size[np.searchsorted(ids, g)] = len(g)
    score["exact_duplicate"] = 1.0 / size
  if test_ids is not None or test_content is not None or test_hashes is not None:
    if train_h is None:
      raise ConfigError("audit: leakage needs the training content or hashes_N too")
    if test_ids is None:
      raise ConfigError("audit: leakage needs test_ids beside test_content or test_hashes")
    te_ids, te_keep, te_order = _ids_in_order(test_ids, test_mask, "audit.test_ids")
    n_te = len(np.asarray(test_ids))
    te_h = _hashes(("test_hashes", "test_content"), test_hashes, test_content, kind, pad_id, n_te,
                   te_keep, te_order)
    if te_h is None:
      raise ConfigError("audit: leakage needs test_content or test_hashes beside test_ids")
    tr_p, te_p = dedup.leakage(ids, train_h, te_ids, te_h)
    leak_pairs = np.stack([tr_p, te_p], axis=1).astype(np.int64)
    is_issue["leakage"] = np.isin(ids, tr_p)
    score["leakage"] = np.where(is_issue["leakage"], 0.0, 1.0)
    info["leaked_test_examples"] = int(len(np.unique(te_p)))

  # -- near duplicates and outliers ---------------------------------------------------------------
  if embeddings_NxD is None and embed_fn is not None:
    emb = np.asarray(embed_fn(ids))
    if emb.ndim != 2 or len(emb) != n:
      raise DataError(f"audit.embed_fn returned shape {emb.shape} for {n} ids")
  elif embeddings_NxD is not None:
    if embed_fn is not None:
      raise ConfigError("audit: pass embeddings_NxD or embed_fn, not both")
    emb = rows("embeddings_NxD", embeddings_NxD)
  else:
    emb = None
  if emb is not None:
    if emb.ndim != 2 or emb.shape[1] == 0 or not np.issubdtype(emb.dtype, np.number):
      raise DataError(f"audit.embeddings_NxD must be a numeric [N, D] array; got dtype "
                      f"{emb.dtype}, shape {emb.shape}")
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
      raise DataError(f"audit.embeddings_NxD has NaN or inf in {int(bad.sum())} rows (ids "
                      f"{ids[bad][:5].tolist()})")
    k_clusters = num_clusters if num_clusters is not None else max(1, int(round(np.sqrt(n))))
    if isinstance(k_clusters, int) and k_clusters > n:
      raise ConfigError(f"audit.num_clusters={k_clusters} exceeds the number of examples N={n}")
    res = dedup.semdedup(emb, ids_N=ids, num_clusters=k_clusters, key=jax.random.key(seed),
                         keep=keep)
    near = ~res.keep(near_duplicate_eps)
    is_issue["near_duplicate"] = near
    m = res.max_similarity.astype(np.float64)
    score["near_duplicate"] = np.clip(np.where(np.isfinite(m), 1.0 - m, 1.0), 0.0, 1.0)
    pos_of = np.searchsorted(ids, res.duplicate_of[near])
    near_sets = _components(ids, np.flatnonzero(near), pos_of)
    info.update(near_duplicate_eps=near_duplicate_eps, num_clusters=k_clusters, keep=keep)
    if n > outlier_k:
      is_issue["outlier"], score["outlier"], out_info = _outliers(
          emb, k=outlier_k, threshold=outlier_threshold,
          search=outlier_search, exact_max=outlier_exact_max, clusters=res.cluster)
      info.update(out_info)
    else:
      info["outlier_skipped"] = f"N={n} is not more than outlier_k={outlier_k}"

  for t in is_issue:
    count = int(is_issue[t].sum())
    summary[t] = {"ran": True, "count": count, "share": count / n}
  if "exact_duplicate" in is_issue:
    summary["exact_duplicate"]["groups"] = len(exact_sets)
  if "near_duplicate" in is_issue:
    summary["near_duplicate"]["sets"] = len(near_sets)
  if "leakage" in is_issue:
    summary["leakage"].update(pairs=len(leak_pairs), test_examples=info["leaked_test_examples"])
  return Audit(ids=ids, is_issue=is_issue, score=score, given_label=given,
               predicted_label=predicted, exact_duplicate_sets=exact_sets,
               near_duplicate_sets=near_sets, leakage_pairs=leak_pairs, summary=summary,
               info=info)


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
