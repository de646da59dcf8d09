"""Deduplication (prunejax.dedup): exact duplicates and leakage by content hash, SemDeDup against a
dense NumPy reference, MinHash-LSH against a pure-Python reference, and bad input."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from prunejax import dedup, scores
from prunejax.dedup import minhash as mh
from prunejax.errors import ConfigError, DataError

# ----------------------------------------------------------------------------------------------
# Exact duplicates and leakage.
# ----------------------------------------------------------------------------------------------


def test_normalize_text_hand_cases():
  assert dedup.normalize_text("  Hello\t\n  WORLD  ") == "hello world"
  assert dedup.normalize_text("Stra\u00dfe") == "strasse"            # case folding, not lower().
  assert dedup.normalize_text("\ufb01ne \uff21\uff22") == "fine ab"  # NFKC: ligature, full width.
  assert dedup.normalize_text("a\u00a0b\u2003c") == "a b c"          # no-break and em spaces.
  assert dedup.normalize_text("Good, movie!") == "good, movie!"      # punctuation kept.
  assert dedup.normalize_text("") == ""


def test_text_duplicates_differ_only_by_case_and_whitespace():
  texts = ["A fine  film.", "a fine film.", "A fine film!", "  A FINE\tfilm. ", "other",
           "Other", "unique"]
  ids = np.array([40, 7, 13, 2, 99, 5, 61])  # arbitrary, unsorted ids.
  groups = dedup.exact_duplicates(ids, dedup.content_hashes(texts, kind="text"))
  assert [g.tolist() for g in groups] == [[2, 7, 40], [5, 99]]  # "!" differs: punctuation kept.
  np.testing.assert_array_equal(dedup.redundant_ids(groups), [7, 40, 99])


def test_token_duplicates_differ_only_by_padding():
  pad = 3
  rows = [np.array([5, 6, 7, pad, pad], np.int32),      # right-padded
          np.array([pad, pad, pad, 5, 6, 7], np.int64),  # left-padded, longer, int64
          [5, 6, 7],                                     # unpadded list
          np.array([5, 6, 8, pad, pad], np.int32),       # one token differs
          np.array([6, 5, 7, pad, pad], np.int32),       # same tokens, other order
          np.array([pad, pad], np.int32),                # all padding = empty
          np.array([], np.int32)]                        # empty
  h = dedup.content_hashes(rows, kind="tokens", pad_id=pad)
  groups = dedup.exact_duplicates(np.arange(len(rows)), h)
  assert [g.tolist() for g in groups] == [[0, 1, 2], [5, 6]]
  # A padded [N, L] array gives the same digests as the ragged rows.
  arr = np.full((3, 6), pad, np.int32)
  arr[0, :3], arr[1, 3:], arr[2, :3] = [5, 6, 7], [5, 6, 7], [5, 6, 8]
  h_arr = dedup.content_hashes(arr, kind="tokens", pad_id=pad)
  np.testing.assert_array_equal(h_arr, h[[0, 1, 3]])
  with pytest.raises(ConfigError, match="needs pad_id"):
    dedup.content_hashes(arr, kind="tokens")


def test_image_hashes_cover_bytes_shape_and_dtype():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (6, 4, 4, 1), dtype=np.uint8)
  x[3], x[5] = x[0], x[0]
  x[4] = x[1]
  x[4, 2, 2, 0] ^= 1  # one bit differs.
  h = dedup.content_hashes(x, kind="image")
  assert h.dtype == np.dtype("S16") and h.shape == (6,)
  assert [g.tolist() for g in dedup.exact_duplicates(np.arange(6), h)] == [[0, 3, 5]]
  # The same bytes in another per-example shape or dtype are other content.
  assert dedup.content_hashes(x.reshape(6, 16), kind="image")[0] != h[0]
  assert dedup.content_hashes(x.astype(np.float32), kind="image")[0] != h[0]
  # Byte order does not matter, the values do.
  be = x.astype(np.float32).astype(">f4")
  np.testing.assert_array_equal(dedup.content_hashes(be, kind="image"),
                                dedup.content_hashes(x.astype(np.float32), kind="image"))


def test_exact_duplicates_match_a_dictionary_reference():
  rng = np.random.default_rng(1)
  n, pad = 400, 0
  tokens = rng.integers(1, 4, (n, 5)).astype(np.int32)  # 81 distinct sequences: many duplicates.
  lengths = rng.integers(1, 6, n)
  tokens[np.arange(5)[None, :] >= lengths[:, None]] = pad
  ids = rng.permutation(10 * n)[:n]
  ref: dict[tuple, list[int]] = {}
  for row, i in zip(tokens, ids):
    ref.setdefault(tuple(row[row != pad].tolist()), []).append(int(i))
  expected = sorted((sorted(v) for v in ref.values() if len(v) > 1), key=lambda g: g[0])
  groups = dedup.exact_duplicates(ids, dedup.content_hashes(tokens, kind="tokens", pad_id=pad))
  assert [g.tolist() for g in groups] == expected
  assert len(dedup.redundant_ids(groups)) == n - len(ref)


def test_leakage_pairs_are_exact():
  train = ["Great acting.", "dull", "GREAT   acting.", "fine", "a twist"]
  test = ["great acting.", "A twist", "new", "a  twist", "dull!"]
  tr_ids, te_ids = np.array([10, 11, 12, 13, 14]), np.array([100, 101, 102, 103, 104])
  pairs = dedup.leakage(tr_ids, dedup.content_hashes(train, kind="text"), te_ids,
                        dedup.content_hashes(test, kind="text"))
  np.testing.assert_array_equal(pairs[0], [10, 12, 14, 14])
  np.testing.assert_array_equal(pairs[1], [100, 100, 101, 103])
  none = dedup.leakage([1], dedup.content_hashes(["x"], kind="text"), [2],
                       dedup.content_hashes(["y"], kind="text"))
  assert none[0].shape == (0,) and none[1].shape == (0,)


def test_leakage_matches_brute_force_on_random_tokens():
  rng = np.random.default_rng(2)
  tr = rng.integers(1, 3, (150, 4))
  te = rng.integers(1, 3, (60, 4))
  tr_ids, te_ids = rng.permutation(1000)[:150], rng.permutation(1000)[:60] + 5000
  got = dedup.leakage(tr_ids, dedup.content_hashes(tr, kind="tokens", pad_id=0), te_ids,
                      dedup.content_hashes(te, kind="tokens", pad_id=0))
  ref = sorted((int(a), int(b)) for i, a in enumerate(tr_ids) for j, b in enumerate(te_ids)
               if np.array_equal(tr[i], te[j]))
  assert list(zip(got[0].tolist(), got[1].tolist())) == ref and len(ref) > 50


def test_hash_batches_streams_and_skips_padding():
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, (11, 2, 2), dtype=np.uint8)
  x[7] = x[2]
  ids = np.arange(100, 111)

  def stream():  # batches of 4 rows; the last one padded with zero rows (mask False, id -1).
    for start in range(0, 11, 4):
      chunk = slice(start, min(start + 4, 11))
      m = chunk.stop - chunk.start
      bx = np.zeros((4, 2, 2), np.uint8)
      bx[:m] = x[chunk]
      yield {"id": np.r_[ids[chunk], [-1] * (4 - m)], "x": bx, "mask": np.arange(4) < m}

  got_ids, got_h = dedup.hash_batches(stream(), kind="image")
  np.testing.assert_array_equal(got_ids, ids)
  np.testing.assert_array_equal(got_h, dedup.content_hashes(x, kind="image"))
  assert [g.tolist() for g in dedup.exact_duplicates(got_ids, got_h)] == [[102, 107]]
  # Text batches may hold lists of strings.
  text_batches = [{"id": [1, 2], "x": ["A b", "c"], "mask": [True, True]},
                  {"id": [3, -1], "x": ["a  B", ""], "mask": [True, False]}]
  t_ids, t_h = dedup.hash_batches(text_batches, kind="text")
  assert [g.tolist() for g in dedup.exact_duplicates(t_ids, t_h)] == [[1, 3]]


def test_hash_batches_refuses_float_ids():
  x = np.arange(12, dtype=np.uint8).reshape(3, 4)
  # Float ids are kept only when exact: 1.5, NaN and 2**53 + 1 (rounded) would be truncated.
  for ids in (np.array([0.0, 1.5, 2.0]), np.array([0, 2**53 + 1, 3], np.float64),
              np.array([0, np.nan, 3])):
    with pytest.raises(DataError, match="batch 0 'id' holds 1 float values that are not whole"):
      dedup.hash_batches([{"id": ids, "x": x}], kind="image")
  with pytest.raises(DataError, match="batch 0 'id' must be a 1-D array of integer ids"):
    dedup.hash_batches([{"id": np.array(["a", "b", "c"]), "x": x}], kind="image")
  got_ids, _ = dedup.hash_batches([{"id": np.array([4.0, 2.0, -1.0]), "x": x}], kind="image")
  np.testing.assert_array_equal(got_ids, [4, 2, -1])
  with pytest.raises(DataError, match="batch 0 'mask' must be bool"):
    dedup.hash_batches([{"id": np.arange(3), "x": x, "mask": np.array([1, 0, 2])}], kind="image")
  got_ids, _ = dedup.hash_batches([{"id": np.array([5, 2**40, -1]), "x": x}], kind="image")
  np.testing.assert_array_equal(got_ids, [5, 2**40, -1])


def test_exact_bad_input_is_one_line():
  h = dedup.content_hashes(["a", "b"], kind="text")
  cases = [
      (ConfigError, "kind='video' is not allowed",
       lambda: dedup.content_hashes(["a"], kind="video")),
      (DataError, r"repeats ids \[4\]", lambda: dedup.exact_duplicates([4, 4], h)),
      (DataError, "has 3 ids for 2 examples", lambda: dedup.exact_duplicates([1, 2, 3], h)),
      (DataError, "digests of content_hashes",
       lambda: dedup.exact_duplicates([1, 2], np.array([1, 2]))),
      (DataError, "item 1 is a int", lambda: dedup.content_hashes(["a", 3], kind="text")),
      (DataError, "not one string", lambda: dedup.content_hashes("abc", kind="text")),
      (DataError, "no real rows",
       lambda: dedup.hash_batches([{"id": [0], "x": [[1]], "mask": [False]}], kind="tokens",
                                  pad_id=0)),
      (DataError, "repeats ids",
       lambda: dedup.hash_batches([{"id": [0], "x": [[1]]}, {"id": [0], "x": [[2]]}],
                                  kind="tokens", pad_id=0)),
      (DataError, "both splits", lambda: dedup.leakage([], h[:0], [1], h[:1])),
  ]
  for error, match, fn in cases:
    with pytest.raises(error, match=match) as info:
      fn()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# SemDeDup.
# ----------------------------------------------------------------------------------------------


def _reference_max_similarity(unit_NxD, clusters_N, order_N):
  """Dense float64 cosine similarities inside each cluster, processed in ``order_N``."""
  u = np.asarray(unit_NxD, np.float64)
  u = u / np.linalg.norm(u, axis=1, keepdims=True)
  best = np.full(len(u), -np.inf)
  arg = np.full(len(u), -1)
  ranks = np.empty(len(u), int)
  ranks[order_N] = np.arange(len(u))
  for c in np.unique(clusters_N):
    members = np.flatnonzero(clusters_N == c)
    members = members[np.argsort(ranks[members])]
    sim = np.clip(u[members] @ u[members].T, -1.0, 1.0)
    for j in range(1, len(members)):
      i = int(np.argmax(sim[:j, j]))
      best[members[j]], arg[members[j]] = sim[i, j], members[i]
  return best, arg


def _assert_same_for_every_threshold(got_max, ref_max):
  """Equal kept sets at thresholds between (and beyond) every pair of distinct reference values."""
  assert np.array_equal(np.isfinite(got_max), np.isfinite(ref_max))
  finite = np.isfinite(ref_max)
  np.testing.assert_allclose(got_max[finite], ref_max[finite], atol=2e-6)
  values = np.unique(np.r_[ref_max[finite], -1.0, 1.0])
  mids = (values[1:] + values[:-1]) / 2
  # Thresholds within float32 rounding of a value are not decidable by either side: skip them.
  thresholds = mids[np.diff(values) > 1e-5]
  for thr in np.r_[thresholds, -1.0, 1.0]:
    eps = float(np.clip(1.0 - thr, 0.0, 1.0))
    np.testing.assert_array_equal(got_max.astype(np.float64) <= 1 - eps, ref_max <= 1 - eps,
                                  err_msg=f"eps={eps}")
  assert len(thresholds) > 20


def _planted_embeddings(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  x[5] = x[3]                        # exact duplicate: a tie in every order.
  x[9] = 3.0 * x[3]                  # same direction, another norm.
  x[11] = x[3] + 1e-3 * rng.normal(size=d).astype(np.float32)
  x[20:30] = x[40] + 0.3 * rng.normal(size=(10, d)).astype(np.float32)  # a loose near-dup group.
  return x


@pytest.mark.parametrize("tile", [8, 64])
def test_cluster_max_similarity_matches_dense_reference(tile):
  rng = np.random.default_rng(4)
  n, d = 203, 6  # not a multiple of the tile.
  x = _planted_embeddings(rng, n, d)
  unit = np.asarray(dedup.normalize_rows(x))
  # Clusters: one of 120 members (spans many tiles), a singleton, and small ones; any labels.
  clusters = np.where(np.arange(n) < 120, 7, rng.integers(0, 12, n))
  clusters[150] = 30
  priority = rng.permutation(n)
  order = np.lexsort((priority, clusters))
  best, dup = dedup.cluster_max_similarity(unit, clusters, order, tile=tile)
  ref_best, ref_arg = _reference_max_similarity(x, clusters, order)
  _assert_same_for_every_threshold(best, ref_best)
  assert best[150] == -np.inf and dup[150] == -1
  # The argmax agrees wherever the reference maximum is unique by a margin.
  u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
  rank = np.argsort(order)
  checked = 0
  for j in np.flatnonzero(np.isfinite(ref_best)):
    earlier = order[:rank[j]]
    sims = np.sort(u[earlier[clusters[earlier] == clusters[j]]] @ u[j])
    if len(sims) < 2 or sims[-1] - sims[-2] > 1e-5:
      assert dup[j] == ref_arg[j], j
      checked += 1
  assert checked > n // 2


@pytest.mark.parametrize("keep", ["farthest", "lowest_id"])
def test_semdedup_matches_reference_for_every_threshold(keep):
  rng = np.random.default_rng(5)
  n, d = 203, 6
  x = _planted_embeddings(rng, n, d)
  ids = rng.permutation(1000)[:n]
  result = dedup.semdedup(x, num_clusters=4, key=jax.random.key(0), ids_N=ids, keep=keep)
  assert len(np.unique(result.cluster)) > 1
  np.testing.assert_allclose(np.linalg.norm(result.centroids, axis=1), 1.0, rtol=1e-5)
  # The reference orders each cluster itself, in float64: cosine distance to the centroid
  # descending (or nothing), ties to the lower id.
  u = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
  c = result.centroids.astype(np.float64)
  key = (u * c[result.cluster]).sum(1) if keep == "farthest" else np.zeros(n)
  order = np.lexsort((ids, key, result.cluster))
  ref_best, ref_arg = _reference_max_similarity(x, result.cluster, order)
  _assert_same_for_every_threshold(result.max_similarity, ref_best)
  # One of the near-identical 3, 5 (exact copies), 9 (same direction) and 11 (tiny noise) is
  # kept; of the tied exact copies 3 and 5, the higher id goes.
  group = np.array([3, 5, 9, 11])
  kept = result.keep(1e-4)
  assert kept[group].sum() == 1
  assert not kept[3 if ids[3] > ids[5] else 5]
  if keep == "lowest_id":
    assert ids[group][kept[group]][0] == ids[group].min()
  assert set(result.duplicate_of[~kept]) <= set(ids) and result.has_duplicate[~kept].all()
  np.testing.assert_array_equal(result.has_duplicate, result.max_similarity > -np.inf)
  np.testing.assert_array_equal(result.removed_ids(0.3), np.sort(ids[~result.keep(0.3)]))


def test_semdedup_hand_computed_angles():
  # Unit vectors at 0, 10, 50 and 180 degrees, one cluster, processed by id.
  deg = np.radians([0.0, 10.0, 50.0, 180.0])
  x = np.stack([np.cos(deg), np.sin(deg)], 1).astype(np.float32)
  r = dedup.semdedup(x, clusters_N=np.zeros(4, int), keep="lowest_id")
  np.testing.assert_allclose(r.max_similarity, [-np.inf, np.cos(np.radians(10)),
                                                np.cos(np.radians(40)), -np.cos(np.radians(50))],
                             atol=1e-6)
  np.testing.assert_array_equal(r.duplicate_of, [0, 0, 1, 2])  # none: the example's own id
  np.testing.assert_array_equal(r.has_duplicate, [False, True, True, True])
  assert r.keep(0.0).all()                                     # eps = 0 removes nothing.
  np.testing.assert_array_equal(r.removed_ids(1 - np.cos(np.radians(20))), [1])
  np.testing.assert_array_equal(r.removed_ids(1 - np.cos(np.radians(45))), [1, 2])
  np.testing.assert_array_equal(r.removed_ids(1.0), [1, 2])   # only positive similarities go.
  # Farthest first, at 0, 10, 50 and 120 degrees: the centroid points at 40.3 degrees, so the
  # order is 120 (79.7 away), 0 (40.3), 10 (30.3), 50 (9.7).
  deg = np.radians([0.0, 10.0, 50.0, 120.0])
  x = np.stack([np.cos(deg), np.sin(deg)], 1).astype(np.float32)
  far = dedup.semdedup(x, clusters_N=np.zeros(4, int), keep="farthest")
  angle = np.arctan2(np.sin(deg).sum(), np.cos(deg).sum())
  assert abs(np.degrees(angle) - 40.3) < 0.05
  np.testing.assert_allclose(far.centroids[0], [np.cos(angle), np.sin(angle)], atol=1e-6)
  np.testing.assert_array_equal(far.duplicate_of, [3, 0, 1, 3])
  np.testing.assert_array_equal(far.has_duplicate, [True, True, True, False])
  np.testing.assert_allclose(far.max_similarity, [np.cos(np.radians(120.0)),
                                                  np.cos(np.radians(10.0)),
                                                  np.cos(np.radians(40.0)), -np.inf], atol=1e-6)


def test_semdedup_is_deterministic_and_independent_of_input_order():
  rng = np.random.default_rng(6)
  x = _planted_embeddings(rng, 203, 6)
  ids = np.arange(203) * 3 + 1
  a = dedup.semdedup(x, clusters_N=np.arange(203) % 3, ids_N=ids)
  perm = rng.permutation(203)
  b = dedup.semdedup(x[perm], clusters_N=(np.arange(203) % 3)[perm], ids_N=ids[perm])
  for eps in (1e-4, 0.05, 0.3):
    np.testing.assert_array_equal(a.removed_ids(eps), b.removed_ids(eps))
  # Same values up to float32 rounding (a pair's dot product may land elsewhere in a tile).
  np.testing.assert_allclose(a.max_similarity[perm], b.max_similarity, rtol=0, atol=3e-7)
  np.testing.assert_array_equal(a.duplicate_of[perm], b.duplicate_of)
  c = dedup.semdedup(x, num_clusters=4, key=jax.random.key(1), ids_N=ids)
  d = dedup.semdedup(x, num_clusters=4, key=jax.random.key(1), ids_N=ids)
  np.testing.assert_array_equal(c.max_similarity, d.max_similarity)
  np.testing.assert_array_equal(c.cluster, d.cluster)


def test_semdedup_with_kmeans_removes_the_same_ids_under_any_row_order():
  # k-means subsamples and seeds by row position; the rows are put in id order first, so the
  # same key gives the same clusters, the same M_j and the same removed ids for any row order.
  rng = np.random.default_rng(16)
  base = rng.normal(size=(60, 8))
  x = base[rng.integers(0, 60, 400)] + 0.01 * rng.normal(size=(400, 8))
  ids = rng.permutation(10**6)[:400] - 5  # sparse, and -1 is one of the valid ids here
  ids[17] = -1
  a = dedup.semdedup(x, ids_N=ids, num_clusters=6, key=jax.random.key(3),
                     max_points_per_centroid=10)
  assert 50 < len(a.removed_ids(0.01)) < 390
  for seed in range(3):
    perm = np.random.default_rng(seed).permutation(400)
    b = dedup.semdedup(x[perm], ids_N=ids[perm], num_clusters=6, key=jax.random.key(3),
                       max_points_per_centroid=10)
    for eps in (0.001, 0.01, 0.1):
      np.testing.assert_array_equal(a.removed_ids(eps), b.removed_ids(eps))
    np.testing.assert_array_equal(a.cluster[perm], b.cluster)
    np.testing.assert_array_equal(a.max_similarity[perm], b.max_similarity)
    np.testing.assert_array_equal(a.duplicate_of[perm], b.duplicate_of)
    np.testing.assert_array_equal(a.centroids, b.centroids)
  # duplicate_of names an id of the same cluster; -1 is a real id, not "none".
  has = a.has_duplicate
  pos = {i: p for p, i in enumerate(ids)}
  dup_pos = np.array([pos[i] for i in a.duplicate_of])
  np.testing.assert_array_equal(a.cluster[dup_pos[has]], a.cluster[has])
  np.testing.assert_array_equal(a.duplicate_of[~has], ids[~has])


def test_semdedup_subsampled_kmeans_assigns_every_point():
  rng = np.random.default_rng(7)
  x = _planted_embeddings(rng, 203, 6)
  r = dedup.semdedup(x, num_clusters=4, key=jax.random.key(0), max_points_per_centroid=10)
  # Every example sits in the cluster of its most similar centroid.
  u = x / np.linalg.norm(x, axis=1, keepdims=True)
  sims = u @ r.centroids.T
  np.testing.assert_array_equal(sims[np.arange(203), r.cluster] >= sims.max(1) - 1e-6, True)


def test_spherical_kmeans_centroids_are_normalized_means():
  rng = np.random.default_rng(8)
  x = np.asarray(dedup.normalize_rows(rng.normal(size=(90, 5)).astype(np.float32)))
  c, assign = scores.kmeans(jax.random.key(0), x, 3, num_iters=30, spherical=True)
  c, assign = np.asarray(c), np.asarray(assign)
  for k in range(3):
    mean = x[assign == k].mean(0)
    np.testing.assert_allclose(c[k], mean / np.linalg.norm(mean), atol=1e-5)


def test_semdedup_on_penultimate_features_of_a_plain_function():
  # Any apply_fn: a plain-dict two-layer network; the features are the input of its last layer.
  rng = np.random.default_rng(12)
  params = {"w1": rng.normal(size=(10, 16)).astype(np.float32) / 3,
            "b1": rng.normal(size=16).astype(np.float32),
            "W_out": rng.normal(size=(16, 3)).astype(np.float32)}

  def apply_fn(p, x):
    return jax.nn.relu(x @ p["w1"] + p["b1"]) @ p["W_out"]

  x = rng.normal(size=(64, 10)).astype(np.float32)
  x[40:44] = x[3]                                          # exact copies of example 3
  x[50] = x[7] + 1e-4 * rng.normal(size=10)                # a near-copy of example 7
  feats = scores.penultimate(apply_fn, params, x)[0]
  assert feats.shape == (64, 16)
  ids = np.arange(64) + 500
  result = dedup.semdedup(feats, num_clusters=3, key=jax.random.key(0), ids_N=ids,
                          keep="lowest_id")
  np.testing.assert_array_equal(result.removed_ids(1e-4), [540, 541, 542, 543, 550])
  np.testing.assert_array_equal(result.duplicate_of[[40, 41, 50]], [503, 503, 507])


def test_semdedup_bad_input_is_one_line():
  x = np.random.default_rng(9).normal(size=(10, 4)).astype(np.float32)
  nan = x.copy()
  nan[4, 1] = np.nan
  zero = x.copy()
  zero[6] = 0.0
  r = dedup.semdedup(x, clusters_N=np.zeros(10, int))
  cases = [
      (DataError, r"NaN or inf in 1 rows \(ids \[104\]\)",
       lambda: dedup.semdedup(nan, num_clusters=2, key=jax.random.key(0),
                              ids_N=np.arange(100, 110))),
      (DataError, r"zero norm \(ids \[6\]\)",
       lambda: dedup.semdedup(zero, num_clusters=2, key=jax.random.key(0))),
      (ConfigError, r"semdedup.eps=-0.1 is out of range; expected a value in \[0.0, 1.0\]",
       lambda: r.keep(-0.1)),
      (ConfigError, r"semdedup.eps=1.5 is out of range", lambda: r.removed_ids(1.5)),
      (ConfigError, r"semdedup.eps=nan is out of range", lambda: r.keep(float("nan"))),
      (ConfigError, r"num_clusters=11 exceeds the number of examples N=10",
       lambda: dedup.semdedup(x, num_clusters=11, key=jax.random.key(0))),
      (ConfigError, r"num_clusters=0 is not allowed",
       lambda: dedup.semdedup(x, num_clusters=0, key=jax.random.key(0))),
      (ConfigError, "needs key", lambda: dedup.semdedup(x, num_clusters=2)),
      (ConfigError, "keep='hardest' is not allowed",
       lambda: dedup.semdedup(x, num_clusters=2, key=jax.random.key(0), keep="hardest")),
      (DataError, "clusters_N must be 10 non-negative ints",
       lambda: dedup.semdedup(x, clusters_N=-np.ones(10, int))),
      (DataError, "non-empty 2-D", lambda: dedup.semdedup(x[0], num_clusters=1,
                                                          key=jax.random.key(0))),
      (DataError, "repeats ids", lambda: dedup.semdedup(x, num_clusters=2, key=jax.random.key(0),
                                                        ids_N=np.zeros(10, int))),
  ]
  for error, match, fn in cases:
    with pytest.raises(error, match=match) as info:
      fn()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# MinHash-LSH.
# ----------------------------------------------------------------------------------------------

_MASK = (1 << 64) - 1


def _mix64_py(x: int) -> int:
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
  return x ^ (x >> 31)


def _signature_py(text: str, seeds, mults, ngram: int):
  """MinHash of one text with Python ints and string slicing: the reference."""
  s = dedup.normalize_text(text)
  grams = [s[i:i + ngram] for i in range(len(s) - ngram + 1)] if len(s) >= ngram else \
      ([s] if s else [])
  hashes = []
  for g in grams:
    h = 0x9E3779B97F4A7C15
    for ch in g:
      h = _mix64_py(h ^ ord(ch))
    hashes.append(h)
  return [min((((h ^ int(seed)) * int(mult)) & _MASK for h in hashes), default=_MASK)
          for seed, mult in zip(seeds, mults)]


def test_minhash_signatures_match_python_reference():
  texts = ["The quick brown fox", "the  QUICK brown fox", "abc", "", "x",
           "caf\u00e9 \u00fcber \U0001F600 na\u00efve", "aaaaaaa"]
  ngram, num_perm, seed = 4, 16, 3
  sig = dedup.minhash_signatures(texts, num_perm=num_perm, ngram=ngram, seed=seed)
  rng = np.random.default_rng(seed)
  seeds = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
  mults = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
  ref = np.array([_signature_py(t, seeds, mults, ngram) for t in texts], np.uint64)
  np.testing.assert_array_equal(sig, ref)
  np.testing.assert_array_equal(sig[0], sig[1])  # normalization.
  # Many texts crossing the vectorized chunk boundary give the same rows as one at a time.
  many = [f"review number {i} " * (1 + i % 7) for i in range(300)]
  old = mh._CHUNK
  try:
    mh._CHUNK = 64
    small_chunks = dedup.minhash_signatures(many, num_perm=8)
  finally:
    mh._CHUNK = old
  np.testing.assert_array_equal(small_chunks, dedup.minhash_signatures(many, num_perm=8))


def test_minhash_jaccard_estimate_is_close_to_exact():
  rng = np.random.default_rng(10)
  words = ["w%d" % i for i in range(40)]
  texts = [" ".join(rng.choice(words, 30)) for _ in range(12)]
  texts += [t.replace(t.split()[3], "zz", 1) for t in texts[:6]]
  sig = dedup.minhash_signatures(texts, num_perm=512, ngram=5)
  grams = [set(dedup.normalize_text(t)[i:i + 5] for i in range(len(dedup.normalize_text(t)) - 4))
           for t in texts]
  errs = [abs(np.mean(sig[a] == sig[b]) - len(grams[a] & grams[b]) / len(grams[a] | grams[b]))
          for a in range(len(texts)) for b in range(a)]
  assert max(errs) < 0.08 and np.mean(errs) < 0.02  # std at num_perm 512 is <= 0.022.


@pytest.mark.parametrize("threshold,num_perm", [(0.5, 64), (0.8, 128), (0.9, 256)])
def test_lsh_params_match_datasketch(threshold, num_perm):
  lsh = pytest.importorskip("datasketch.lsh")
  assert dedup.lsh_params(threshold, num_perm) == lsh._optimal_param(threshold, num_perm, 0.5, 0.5)


def test_minhash_duplicates_find_planted_near_duplicates():
  rng = np.random.default_rng(11)
  vocab = ["".join(rng.choice(list("abcdefghijklmnop"), 5)) for _ in range(500)]
  base = [" ".join(rng.choice(vocab, 40)) for _ in range(60)]
  texts = list(base)
  planted = {}
  for i in range(0, 20, 2):  # near-copies: one word changed at the end, or case and spacing.
    words = base[i].split()
    texts.append(" ".join(words[:-1] + ["zzzzz"]))
    planted[len(texts) - 1] = i
  texts.append("  " + base[30].upper() + "  ")
  planted[len(texts) - 1] = 30
  ids = np.arange(len(texts)) + 1000
  groups = dedup.minhash_duplicates(ids, texts, threshold=0.8)
  as_sets = [set(g.tolist()) for g in groups]
  for copy, orig in planted.items():
    assert {ids[copy], ids[orig]} in as_sets
  assert len(groups) == len(planted)
  # Each found pair really is similar: exact 5-gram Jaccard well above the unrelated texts'.
  def grams(t):
    s = dedup.normalize_text(t)
    return {s[i:i + 5] for i in range(len(s) - 4)}
  for g in groups:
    a, b = (grams(texts[i - 1000]) for i in g)
    assert len(a & b) / len(a | b) > 0.8
  with pytest.raises(ConfigError, match=r"threshold=0 is out of range"):
    dedup.minhash_duplicates(ids, texts, threshold=0)
  with pytest.raises(ConfigError, match="bands=300 exceeds num_perm=128"):
    dedup.minhash_duplicates(ids, texts, bands=300)
  with pytest.raises(DataError, match="has 3 ids for 71 examples"):
    dedup.minhash_duplicates([1, 2, 3], texts)


def test_components_of_links():
  labels = mh._components(7, np.array([6, 1, 3, 5]), np.array([5, 2, 1, 4]))
  np.testing.assert_array_equal(labels, [0, 1, 1, 1, 4, 4, 4])
