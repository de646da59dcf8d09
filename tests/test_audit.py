"""prunejax.audit: one table by id: label issues, exact and near duplicates, outliers, leakage."""

import warnings

import numpy as np
import pytest

from prunejax import audit as audit_lib
from prunejax import dedup, scores
from prunejax.errors import ConfigError, DataError

N, D, C = 160, 12, 4


def _data(seed=0):
  """Planted issues: flipped labels, exact copies (5=6, 7=8=9), a near copy (21 of 20), an outlier
  (50), and test rows equal to training rows 30 and 5."""
  rng = np.random.default_rng(seed)
  true = np.arange(N) % C
  centers = rng.normal(size=(C, D)) * 3
  emb = centers[true] + rng.normal(size=(N, D))
  images = rng.integers(0, 255, (N, 3, 3), dtype=np.uint8)
  for src, dst in ((5, 6), (7, 8), (7, 9)):
    images[dst], emb[dst], true[dst] = images[src], emb[src], true[src]
  emb[21] = emb[20] + 1e-4 * rng.normal(size=D)
  emb[50] = rng.normal(size=D) * 40
  labels = true.copy()
  flipped = np.array([11, 23, 42, 77, 101, 133])
  labels[flipped] = (true[flipped] + 1) % C
  logits = 4.0 * np.eye(C)[true] + rng.normal(size=(N, C))
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  ids = np.arange(N) * 3 + 1000
  test_images = rng.integers(0, 255, (20, 3, 3), dtype=np.uint8)
  test_images[3], test_images[9] = images[30], images[5]
  test_ids = np.arange(20) + 5000
  return dict(ids=ids, labels=labels, probs=probs, emb=emb, images=images,
              test_ids=test_ids, test_images=test_images, flipped=flipped)


def _run(d, perm=None, **kw):
  p = np.arange(N) if perm is None else perm
  return audit_lib.audit(d["ids"][p], labels_N=d["labels"][p], probs_NxC=d["probs"][p],
                         embeddings_NxD=d["emb"][p], content=d["images"][p], kind="image",
                         test_ids=d["test_ids"], test_content=d["test_images"],
                         num_clusters=4, near_duplicate_eps=0.01, **kw)


@pytest.fixture(scope="module")
def data():
  return _data()


@pytest.fixture(scope="module")
def result(data):
  return _run(data)


def test_every_issue_type_finds_what_was_planted(data, result):
  ids = data["ids"]
  assert set(result.is_issue) == set(audit_lib.ISSUE_TYPES)
  np.testing.assert_array_equal(result.ids, ids)
  # Exact duplicates: groups {5, 6} and {7, 8, 9}; all but the lowest id flagged.
  assert [g.tolist() for g in result.exact_duplicate_sets] == [ids[[5, 6]].tolist(),
                                                                ids[[7, 8, 9]].tolist()]
  assert set(result.issue_ids("exact_duplicate")) == set(ids[[6, 8, 9]])
  assert result.score["exact_duplicate"][7] == pytest.approx(1 / 3)
  # Leakage: train rows 30 and 5 (and 5's copy 6) equal test rows 3 and 9.
  assert result.leakage_pairs.tolist() == [[ids[5], 5009], [ids[6], 5009], [ids[30], 5003]]
  assert set(result.issue_ids("leakage")) == {ids[5], ids[6], ids[30]}
  # Near duplicates: the near copy pair and the exact copies, one of each set kept.
  near_sets = {tuple(s) for s in result.near_duplicate_sets}
  assert tuple(ids[[20, 21]]) in near_sets and tuple(ids[[7, 8, 9]]) in near_sets
  flagged = set(result.issue_ids("near_duplicate"))
  assert len(flagged & set(ids[[20, 21]])) == 1 and len(flagged & set(ids[[7, 8, 9]])) == 2
  assert flagged <= set(ids[[5, 6, 7, 8, 9, 20, 21]])
  # Outlier: row 50 is flagged and has the lowest outlier score.
  assert ids[50] in result.issue_ids("outlier")
  assert result.top("outlier", 1)[0] == ids[50]
  # Labels: the flipped ones are found, with their given and predicted labels.
  found = set(result.issue_ids("label"))
  assert len(found) >= 2 and found <= set(ids[data["flipped"]])
  t = result.table()
  assert list(t)[:3] == ["id", "is_label_issue", "label_score"]
  np.testing.assert_array_equal(t["given_label"], data["labels"])
  np.testing.assert_array_equal(t["predicted_label"], data["probs"].argmax(1))
  s = result.summary
  assert s["exact_duplicate"]["count"] == 3 and s["exact_duplicate"]["groups"] == 2
  assert s["leakage"] == {"ran": True, "count": 3, "share": 3 / N, "pairs": 3, "test_examples": 2}
  assert "| leakage | yes | 3 |" in audit_lib.summary_markdown(result)
  removed = result.remove_ids()
  assert set(removed) == set().union(*[set(result.issue_ids(x)) for x in result.is_issue])


def test_each_column_equals_its_reference(data, result):
  cl_filter = pytest.importorskip("cleanlab.filter")
  cl_rank = pytest.importorskip("cleanlab.rank")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    np.testing.assert_array_equal(result.is_issue["label"],
                                  cl_filter.find_label_issues(data["labels"], data["probs"],
                                                              n_jobs=1))
  np.testing.assert_array_equal(result.score["label"],
                                cl_rank.get_label_quality_scores(data["labels"], data["probs"]))
  # Near duplicates are SemDeDup's removals at the same settings.
  sd = dedup.semdedup(data["emb"], ids_N=data["ids"], num_clusters=4,
                      key=__import__("jax").random.key(0))
  np.testing.assert_array_equal(result.is_issue["near_duplicate"], ~sd.keep(0.01))
  # Outliers: Datalab's rule on float64 brute-force mean cosine distances to the 10 nearest.
  u = data["emb"] / np.linalg.norm(data["emb"], axis=1, keepdims=True)
  dist = 1.0 - u @ u.T
  np.fill_diagonal(dist, np.inf)
  avg = np.sort(np.maximum(dist, 0), axis=1)[:, :10].mean(1)
  same = np.all(data["emb"][:, None] == data["emb"][None], -1) & ~np.eye(N, dtype=bool)
  for i in np.flatnonzero(same.any(1)):  # exact copies are at distance exactly 0.
    row = np.where(same[i], 0.0, dist[i])
    avg[i] = np.sort(np.maximum(row, 0))[:10].mean()
  from scipy.stats import iqr
  thr = np.percentile(avg, 75) + (1 / 0.37037 - 1) * iqr(avg)
  np.testing.assert_array_equal(result.is_issue["outlier"], avg > thr)
  np.testing.assert_allclose(result.score["outlier"], np.exp(-avg / np.median(avg)), atol=1e-9)
  # prunejax's own score is Datalab's before the exp (it does not saturate): exp(-ours) = theirs.
  np.testing.assert_allclose(result.score["outlier"],
                             np.exp(-np.asarray(scores.knn_outlier_score(data["emb"]), np.float64)),
                             atol=1e-6)


def test_row_order_and_padding_do_not_change_the_answer_by_id(data, result):
  perm = np.random.default_rng(3).permutation(N)
  again = _run(data, perm)
  np.testing.assert_array_equal(again.ids, result.ids)
  for t in result.is_issue:
    np.testing.assert_array_equal(again.is_issue[t], result.is_issue[t])
    np.testing.assert_allclose(again.score[t], result.score[t], rtol=1e-6, atol=1e-7)
  # Padding rows (garbage, NaN embeddings, out-of-range labels) on both sides are dropped.
  pad = lambda a, fill: np.concatenate([np.full((2,) + a.shape[1:], fill, a.dtype), a,
                                        np.full((3,) + a.shape[1:], fill, a.dtype)])
  mask = np.r_[np.zeros(2, bool), np.ones(N, bool), np.zeros(3, bool)]
  padded = audit_lib.audit(pad(data["ids"], -1), labels_N=pad(data["labels"], 99),
                           probs_NxC=pad(data["probs"], np.nan),
                           embeddings_NxD=pad(data["emb"], np.nan),
                           content=pad(data["images"], 0), kind="image", mask_N=mask,
                           test_ids=data["test_ids"], test_content=data["test_images"],
                           num_clusters=4, near_duplicate_eps=0.01)
  for t in result.is_issue:
    np.testing.assert_array_equal(padded.is_issue[t], result.is_issue[t])


def test_cluster_search_with_one_cluster_is_exact(data):
  exact = audit_lib.audit(data["ids"], embeddings_NxD=data["emb"], num_clusters=1,
                          outlier_search="exact")
  clustered = audit_lib.audit(data["ids"], embeddings_NxD=data["emb"], num_clusters=1,
                              outlier_search="cluster")
  assert clustered.info["outlier_search"] == "cluster"
  # float32 similarities in the cluster search: scores within f32 rounding of the exact ones.
  np.testing.assert_allclose(clustered.score["outlier"], exact.score["outlier"], atol=2e-6)
  np.testing.assert_array_equal(clustered.is_issue["outlier"], exact.is_issue["outlier"])
  # Only what was given runs; the rest is reported as not checked.
  assert set(exact.is_issue) == {"near_duplicate", "outlier"}
  assert exact.summary["label"] == {"ran": False, "count": 0, "share": 0.0}


def test_models_instead_of_arrays(data):
  calls = []

  def fit_predict(train_ids, held_ids):
    calls.append(len(held_ids))
    rows = np.searchsorted(data["ids"], held_ids)
    return data["probs"][rows]

  def embed_fn(ids):
    return data["emb"][np.searchsorted(data["ids"], ids)]

  res = audit_lib.audit(data["ids"], labels_N=data["labels"], fit_predict=fit_predict,
                        num_folds=4, embed_fn=embed_fn, num_clusters=4)
  assert sum(calls) == N and len(calls) == 4
  ref = _run(data)
  np.testing.assert_array_equal(res.is_issue["label"], ref.is_issue["label"])
  np.testing.assert_array_equal(res.is_issue["outlier"], ref.is_issue["outlier"])


def test_text_content_and_save(tmp_path):
  texts = ["A good film.", "a  GOOD film.", "Bad.", "Fine", "fine", "other"]
  res = audit_lib.audit(np.array([4, 2, 9, 7, 1, 3]), content=texts, kind="text",
                        test_ids=np.array([0, 1]), test_content=["BAD.", "nothing"])
  assert [g.tolist() for g in res.exact_duplicate_sets] == [[1, 7], [2, 4]]
  assert res.issue_ids("exact_duplicate").tolist() == [4, 7]
  assert res.leakage_pairs.tolist() == [[9, 0]]
  res.save(str(tmp_path / "audit.npz"))
  with np.load(tmp_path / "audit.npz") as z:
    np.testing.assert_array_equal(z["id"], [1, 2, 3, 4, 7, 9])
    np.testing.assert_array_equal(z["exact_duplicate_set_sizes"], [2, 2])


def test_bad_inputs_name_the_field(data):
  ids, labels, probs, emb = data["ids"], data["labels"], data["probs"], data["emb"]
  with pytest.raises(DataError, match="audit.labels_N must lie in"):
    audit_lib.audit(ids, labels_N=np.where(np.arange(N) == 3, C, labels), probs_NxC=probs)
  bad = probs.copy()
  bad[4, 1] = np.nan
  with pytest.raises(DataError, match="audit.probs_NxC has NaN"):
    audit_lib.audit(ids, labels_N=labels, probs_NxC=bad)
  bad = emb.copy()
  bad[4, 1] = np.inf
  with pytest.raises(DataError, match=rf"audit.embeddings_NxD has NaN or inf in 1 rows "
                                      rf"\(ids \[{ids[4]}\]"):
    audit_lib.audit(ids, embeddings_NxD=bad, num_clusters=4)
  with pytest.raises(DataError, match="audit.hashes_N must be the bytes16"):
    audit_lib.audit(ids, hashes_N=np.zeros(N, np.int64))
  with pytest.raises(ConfigError, match="test_content needs kind"):
    audit_lib.audit(ids, hashes_N=dedup.content_hashes(data["images"], kind="image"),
                    test_ids=data["test_ids"], test_content=data["test_images"])
  with pytest.raises(DataError, match="audit.ids_N repeats"):
    audit_lib.audit(np.r_[ids[:-1], ids[0]], labels_N=labels, probs_NxC=probs)
  with pytest.raises(DataError, match="audit.probs_NxC has 159 rows"):
    audit_lib.audit(ids, labels_N=labels, probs_NxC=probs[:-1])
  with pytest.raises(DataError, match="audit.ids_N has no examples"):
    audit_lib.audit(np.zeros(0, np.int64))
  with pytest.raises(DataError, match="audit.mask_N"):
    audit_lib.audit(ids, mask_N=np.ones(N))
  with pytest.raises(ConfigError, match="labels_N"):
    audit_lib.audit(ids, probs_NxC=probs)
  with pytest.raises(ConfigError, match="kind"):
    audit_lib.audit(ids, content=data["images"])
  with pytest.raises(ConfigError, match="audit.filter_by"):
    audit_lib.audit(ids, labels_N=labels, probs_NxC=probs, filter_by="nope")
  with pytest.raises(ConfigError, match="near_duplicate_eps"):
    audit_lib.audit(ids, embeddings_NxD=emb, near_duplicate_eps=2.0)
  with pytest.raises(ConfigError, match="leakage needs"):
    audit_lib.audit(ids, test_ids=data["test_ids"], test_content=data["test_images"])
  res = audit_lib.audit(ids, labels_N=labels, probs_NxC=probs)
  with pytest.raises(ConfigError, match="did not run"):
    res.remove_ids(["outlier"])


def test_audit_of_a_source_equals_the_audit_of_its_arrays(data):
  from prunejax.data import ArraySource
  perm = np.random.default_rng(5).permutation(N)
  train = ArraySource(data["images"][perm], data["labels"][perm], data["ids"][perm], "train")
  test = ArraySource(data["test_images"], np.zeros(20, np.int64), data["test_ids"], "test")
  res = audit_lib.audit_source(train, data["ids"], test=test, probs_NxC=data["probs"],
                               embeddings_NxD=data["emb"], num_clusters=4,
                               near_duplicate_eps=0.01, chunk=50)
  ref = _run(data)
  for t in ref.is_issue:
    np.testing.assert_array_equal(res.is_issue[t], ref.is_issue[t])
  np.testing.assert_array_equal(res.leakage_pairs, ref.leakage_pairs)
