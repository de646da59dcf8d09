"""The audit's issue types, one function each (:mod:`prunejax.audit` runs them and builds the table).

Every function takes checked host arrays in ascending id order (``ids`` sorted, one row per id) and
returns an :class:`Issue`: the flags and Datalab-style scores (in [0, 1], low = more severe) of one
issue type, with what it adds to the audit's info, summary and result fields.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from prunejax import dedup
from prunejax.errors import ConfigError
from prunejax.scores import label_quality as lq
from prunejax.scores.outliers import _knn_host


class Issue(NamedTuple):
  """One issue type's findings, rows in id order.

  Attributes:
    is_issue: bool[N], flagged examples.
    score: f64[N] in [0, 1], low = more severe.
    info: settings and statistics for ``Audit.info``.
    summary: entries beside ``ran`` / ``count`` / ``share`` in ``Audit.summary[type]``.
    fields: other :class:`prunejax.audit.Audit` fields it sets (duplicate sets, leakage pairs,
      given and predicted labels).
  """

  is_issue: np.ndarray
  score: np.ndarray
  info: dict = {}
  summary: dict = {}
  fields: dict = {}


def label_issue(probs_NxC: np.ndarray, labels_N: np.ndarray, *, filter_by: str,
                label_score_method: str) -> Issue:
  """cleanlab's label issues (:func:`prunejax.scores.find_label_issues`' ``filter_by``) scored by
  its label quality (``label_score_method``) on checked out-of-fold probabilities."""
  # Rows are in id order, so the by-id form's stable sorts break ties by id.
  is_issue = lq._issues(probs_NxC, labels_N, filter_by=filter_by, min_examples_per_class=1,
                        frac_noise=1.0, num_to_remove_per_class=None, joint_CxC=None,
                        argsort=lq._stable_argsort)
  score = lq._quality(probs_NxC, labels_N, label_score_method).astype(np.float64)
  info = {"filter_by": filter_by, "label_score_method": label_score_method,
          "num_classes": probs_NxC.shape[1]}
  return Issue(is_issue, score, info,
               fields={"given_label": labels_N, "predicted_label": probs_NxC.argmax(axis=1)})


def exact_duplicate_issue(ids: np.ndarray, hashes_N: np.ndarray) -> Issue:
  """Groups of equal content; all but the lowest id of a group flagged; score ``1 / group size``."""
  sets = dedup.exact_duplicates(ids, hashes_N)
  size = np.ones(len(ids))
  for g in sets:
    size[np.searchsorted(ids, g)] = len(g)
  return Issue(np.isin(ids, dedup.redundant_ids(sets)), 1.0 / size,
               summary={"groups": len(sets)}, fields={"exact_duplicate_sets": sets})


def leakage_issue(ids: np.ndarray, hashes_N: np.ndarray, test_ids: np.ndarray,
                  test_hashes: np.ndarray) -> Issue:
  """Training examples whose content occurs in the test split (score 0 if leaked, else 1)."""
  tr_p, te_p = dedup.leakage(ids, hashes_N, test_ids, test_hashes)
  pairs = np.stack([tr_p, te_p], axis=1).astype(np.int64)
  leaked = np.isin(ids, tr_p)
  test_examples = int(len(np.unique(te_p)))
  return Issue(leaked, np.where(leaked, 0.0, 1.0), {"leaked_test_examples": test_examples},
               summary={"pairs": len(pairs), "test_examples": test_examples},
               fields={"leakage_pairs": pairs})


def near_duplicate_issue(ids: np.ndarray, emb_NxD: np.ndarray, *, eps: float, num_clusters: int,
                         keep: str, seed: int) -> tuple[Issue, np.ndarray]:
  """SemDeDup's removals at ``eps``, scored by the clipped cosine distance ``1 - M_j``; also
  returns the k-means cluster of every row (for the clustered outlier search)."""
  res = dedup.semdedup(emb_NxD, ids_N=ids, num_clusters=num_clusters, key=jax.random.key(seed),
                       keep=keep)
  near = ~res.keep(eps)
  m = res.max_similarity.astype(np.float64)
  score = np.clip(np.where(np.isfinite(m), 1.0 - m, 1.0), 0.0, 1.0)
  sets = _components(ids, np.flatnonzero(near), np.searchsorted(ids, res.duplicate_of[near]))
  info = {"near_duplicate_eps": eps, "num_clusters": num_clusters, "keep": keep}
  return Issue(near, score, info, summary={"sets": len(sets)},
               fields={"near_duplicate_sets": sets}), res.cluster


def outlier_issue(emb_NxD: np.ndarray, clusters: np.ndarray | None, *, k: int, threshold: float,
                  search: str, exact_max: int) -> Issue:
  """Datalab's kNN outlier issue (see :func:`_outliers`)."""
  is_issue, score, info = _outliers(emb_NxD, k=k, threshold=threshold, search=search,
                                    exact_max=exact_max, clusters=clusters)
  return Issue(is_issue, score, info)


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
