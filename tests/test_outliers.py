"""kNN outlier score (prunejax.scores.outliers) against cleanlab's Datalab computation and a
float64 brute-force neighbour search."""

from __future__ import annotations

import numpy as np
import pytest

from prunejax import scores
from prunejax.errors import ConfigError, DataError


def _embeddings(d, n=120, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, d)) + 3.0  # gathered around the direction (1, ..., 1).
  x[5] = x[9]
  x[17] = x[9]  # three exact duplicates: distance 0 among themselves.
  x[0] = -x[0]  # the opposite direction, far away: an outlier in both metrics.
  return x


def _brute_force(x, k, metric):
  if metric == "cosine":
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = np.maximum(1.0 - u @ u.T, 0.0)
  else:
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :])**2).sum(-1), 0.0))
  np.fill_diagonal(d, np.inf)
  return np.sort(d, axis=1)[:, :k]


@pytest.mark.parametrize("d,metric", [(8, "cosine"), (2, "euclidean")])
def test_knn_outlier_score_matches_cleanlab_datalab(d, metric):
  knn_graph = pytest.importorskip("cleanlab.internal.neighbor.knn_graph")
  cl_outlier = pytest.importorskip("cleanlab.outlier")
  cl_internal = pytest.importorskip("cleanlab.internal.outlier")
  x = _embeddings(d)
  # The steps of cleanlab 2.9's OutlierIssueManager.find_issues on features (Datalab itself needs
  # the optional `datasets` package): kNN graph with duplicate correction, mean distance, scores.
  graph, knn = knn_graph.create_knn_graph_and_index(x, n_neighbors=10, metric=None)
  avg = graph.data.reshape(len(x), -1).mean(axis=1)
  name = knn.metric if isinstance(knn.metric, str) else knn.metric.__name__
  assert name == metric
  scale = max(np.median(avg), 100 * np.finfo(np.float64).eps)
  quality = cl_internal.correct_precision_errors(
      cl_outlier.transform_distances_to_scores(avg, t=1, scaling_factor=scale), avg, name)
  ours = np.asarray(scores.knn_outlier_score(x, 10))
  assert ours.dtype == np.float32 and ours.shape == (len(x),)
  np.testing.assert_allclose(np.exp(-ours.astype(np.float64)), quality, atol=1e-6)
  assert np.argmax(ours) == 0  # high = outlier.
  np.testing.assert_allclose(np.asarray(scores.knn_outlier_score(x, 10, metric=metric)), ours)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_knn_distances_match_float64_brute_force(metric):
  x = _embeddings(5, n=77, seed=1)
  ref = _brute_force(x, 6, metric)
  for tile, chunk in ((256, 1024), (8, 16)):  # one block, and many tiles and chunks.
    dist, idx = scores.knn_distances(x, 6, metric=metric, tile=tile, chunk=chunk)
    np.testing.assert_allclose(dist, ref, atol=1e-12)
    assert (idx != np.arange(77)[:, None]).all()  # never the example itself.
    # The neighbours are at the distances reported.
    u = x / np.linalg.norm(x, axis=1, keepdims=True) if metric == "cosine" else x
    recomputed = (np.maximum(1 - np.einsum("nd,nkd->nk", u, u[idx]), 0) if metric == "cosine"
                  else np.linalg.norm(x[:, None] - x[idx], axis=-1))
    np.testing.assert_allclose(recomputed, dist, atol=1e-12)
  # Exact duplicates are each other's nearest neighbours at distance 0.
  assert dist[9, :2].tolist() == [0.0, 0.0] and set(idx[9, :2]) == {5, 17}


def test_knn_outlier_bad_input_is_one_line():
  x = _embeddings(4, n=20)[:12]
  nan = x.copy()
  nan[3, 0] = np.nan
  zero = x.copy()
  zero[2] = 0.0
  cases = [
      (ConfigError, r"k=12 nearest neighbours need more than k examples; got N=12, so k must be "
       r"at most 11", lambda: scores.knn_outlier_score(x, 12)),
      (ConfigError, "k=0 is not allowed", lambda: scores.knn_outlier_score(x, 0)),
      (DataError, r"NaN or inf in 1 rows \(positions \[3\]\)",
       lambda: scores.knn_outlier_score(nan)),
      (DataError, r"zero norm \(positions \[2\]\)",
       lambda: scores.knn_outlier_score(zero, 3, metric="cosine")),
      (ConfigError, "metric='manhattan' is not allowed",
       lambda: scores.knn_outlier_score(x, 3, metric="manhattan")),
      (ConfigError, "t=0 is not allowed", lambda: scores.knn_outlier_score(x, 3, t=0)),
      (ConfigError, "scaling_factor=-1.0 is not allowed",
       lambda: scores.knn_outlier_score(x, 3, scaling_factor=-1.0)),
      (DataError, "non-empty 2-D", lambda: scores.knn_distances(x[0], 1)),
  ]
  for error, match, fn in cases:
    with pytest.raises(error, match=match) as info:
      fn()
    assert "\n" not in str(info.value)
  # A zero row is fine under the euclidean metric.
  assert np.isfinite(np.asarray(scores.knn_outlier_score(zero, 3, metric="euclidean"))).all()


def test_knn_outlier_score_does_not_saturate_and_ranks_as_the_distance():
  # Ten planted outliers at distances 22-40 from a unit blob: 1 - exp(-avg / median) was exactly
  # 1.0 in float32 for all of them, so "keep the worst m" broke ties by position.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(300, 2)) * 0.5
  far = np.linspace(22, 40, 10)
  angles = rng.uniform(0, 2 * np.pi, 10)
  x[:10] = np.stack([far * np.cos(angles), far * np.sin(angles)], 1)
  s = np.asarray(scores.knn_outlier_score(x, 5, metric="euclidean"))
  assert len(np.unique(s[:10])) == 10  # no ties among the outliers
  dist, _ = _brute_force(x, 5, "euclidean"), None
  avg = dist.mean(axis=1)
  np.testing.assert_array_equal(np.argsort(-s, kind="stable"), np.argsort(-avg, kind="stable"))
  np.testing.assert_allclose(s, avg / np.median(avg), rtol=1e-6)


def test_knn_by_id_is_independent_of_row_order():
  x = _embeddings(6, n=60, seed=2)
  x[7] = x[3]  # an exact tie, broken by id.
  x[11] = x[3]
  ids = np.random.default_rng(1).permutation(10**6)[:60] + 2**40  # sparse, beyond int32: host side
  perm = np.random.default_rng(2).permutation(60)
  d1, n1 = scores.knn_distances(x, 4, ids_N=ids)
  d2, n2 = scores.knn_distances(x[perm], 4, ids_N=ids[perm])
  inv = np.argsort(perm)
  np.testing.assert_array_equal(n1, n2[inv])
  np.testing.assert_allclose(d1, d2[inv], atol=1e-12)
  assert set(np.unique(n1)) <= set(ids.tolist())
  s1 = np.asarray(scores.knn_outlier_score(x, 4, ids_N=ids))
  s2 = np.asarray(scores.knn_outlier_score(x[perm], 4, ids_N=ids[perm]))
  np.testing.assert_allclose(s1, s2[inv], rtol=1e-6)
  nan = x.copy()
  nan[5, 0] = np.inf
  with pytest.raises(DataError, match=rf"NaN or inf in 1 rows \(ids \[{ids[5]}\]\)"):
    scores.knn_outlier_score(nan, 4, ids_N=ids)
  with pytest.raises(DataError, match="ids_N repeats ids"):
    scores.knn_outlier_score(x, 4, ids_N=np.zeros(60, int))
  with pytest.raises(DataError, match="ids_N has 59 ids for 60 examples"):
    scores.knn_outlier_score(x, 4, ids_N=ids[:59])
  with pytest.raises(DataError, match="ids_N must be a 1-D array of integer ids"):
    scores.knn_outlier_score(x, 4, ids_N=ids.astype(float))
