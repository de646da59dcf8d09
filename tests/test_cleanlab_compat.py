"""cleanlab-compatible label issues (prunejax.scores.cleanlab_compat) and the by-id form
(prunejax.scores.find_label_issues) against cleanlab 2.9 on real noisy data."""

import warnings

import numpy as np
import pytest

from prunejax.errors import ConfigError, DataError
from prunejax.scores import cleanlab_compat as cc
from prunejax.scores import find_label_issues as find_by_id


class _Imported:
  """A cleanlab module imported on first use (a skip without cleanlab): importing it takes about
  1.3 s, which every test worker paid at collection, not only the one that runs these tests."""

  def __init__(self, name: str):
    self._name = name

  def __getattr__(self, attr: str):
    if attr.startswith("_"):  # pytest's collection looks for its own markers on every module global
      raise AttributeError(attr)
    return getattr(pytest.importorskip(self._name), attr)


cl_filter = _Imported("cleanlab.filter")
cl_rank = _Imported("cleanlab.rank")
cl_count = _Imported("cleanlab.count")


def _noisy_digits(noise: float, seed: int = 0):
  """sklearn digits with ``noise`` of the labels flipped to another class, and out-of-fold
  probabilities of a 5-fold logistic regression trained on the noisy labels."""
  from sklearn.datasets import load_digits
  from sklearn.linear_model import LogisticRegression
  from sklearn.model_selection import StratifiedKFold, cross_val_predict
  x, y = load_digits(return_X_y=True)
  rng = np.random.default_rng(seed)
  flip = rng.choice(len(y), int(round(noise * len(y))), replace=False)
  noisy = y.copy()
  noisy[flip] = (y[flip] + rng.integers(1, 10, len(flip))) % 10
  probs = cross_val_predict(LogisticRegression(max_iter=300, C=0.05), x / 16.0, noisy,
                            cv=StratifiedKFold(5, shuffle=True, random_state=seed),
                            method="predict_proba")
  return noisy, probs, flip


@pytest.fixture(scope="module", params=[0.15, 0.30], ids=["noise15", "noise30"])
def digits(request):
  return _noisy_digits(request.param)


def _cleanlab(labels, probs, **kw):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    return cl_filter.find_label_issues(labels, probs, n_jobs=1, **kw)


@pytest.mark.parametrize("filter_by", cc.FILTERS)
def test_every_filter_equals_cleanlab_on_noisy_digits(digits, filter_by):
  labels, probs, flip = digits
  ours = cc.find_label_issues(labels, probs, filter_by=filter_by)
  np.testing.assert_array_equal(ours, _cleanlab(labels, probs, filter_by=filter_by))
  # The data is really noisy and the filters find it (not a vacuous equality of empty masks).
  assert ours.sum() > 0.5 * len(flip) and np.isin(np.flatnonzero(ours), flip).mean() > 0.6
  # The by-id form gives the same examples (no ties in these probabilities), in any row order.
  np.testing.assert_array_equal(find_by_id(probs, labels, filter_by=filter_by), ours)
  ids = np.arange(len(labels)) * 7 + 3
  perm = np.random.default_rng(1).permutation(len(labels))
  shuffled = find_by_id(probs[perm], labels[perm], filter_by=filter_by, ids_N=ids[perm])
  np.testing.assert_array_equal(shuffled, ours[perm])
  # Padding rows (NaN probabilities, out-of-range labels) on both sides are left out.
  pad = lambda a, fill: np.concatenate([np.full((2,) + a.shape[1:], fill, a.dtype), a,
                                        np.full((3,) + a.shape[1:], fill, a.dtype)])
  mask = np.r_[np.zeros(2, bool), np.ones(len(labels), bool), np.zeros(3, bool)]
  padded = find_by_id(pad(probs, np.nan), pad(labels, 99), filter_by=filter_by,
                      ids_N=pad(ids, -1), mask_N=mask)
  np.testing.assert_array_equal(padded, pad(ours, False))


@pytest.mark.parametrize("rank_by", cc.METHODS)
def test_ranked_indices_equal_cleanlab(digits, rank_by):
  labels, probs, _ = digits
  for filter_by in ("prune_by_noise_rate", "confident_learning", "low_self_confidence"):
    np.testing.assert_array_equal(
        cc.find_label_issues(labels, probs, filter_by=filter_by,
                             return_indices_ranked_by=rank_by),
        _cleanlab(labels, probs, filter_by=filter_by, return_indices_ranked_by=rank_by))


@pytest.mark.parametrize("method", cc.METHODS)
def test_quality_scores_equal_cleanlab(digits, method):
  labels, probs, _ = digits
  np.testing.assert_array_equal(cc.get_label_quality_scores(labels, probs, method=method),
                                cl_rank.get_label_quality_scores(labels, probs, method=method))
  if method != "confidence_weighted_entropy":
    np.testing.assert_array_equal(
        cc.get_label_quality_scores(labels, probs, method=method, adjust_pred_probs=True),
        cl_rank.get_label_quality_scores(labels, probs, method=method, adjust_pred_probs=True))


def test_options_and_float32_equal_cleanlab(digits):
  labels, probs, _ = digits
  assert cc.num_label_issues(labels, probs) == cl_count.num_label_issues(labels, probs)
  for kw in ({"frac_noise": 0.5}, {"min_examples_per_class": 170},
             {"num_to_remove_per_class": list(range(10))},
             {"confident_joint": cl_count.compute_confident_joint(labels, probs, calibrate=False)},
             {"return_indices_ranked_by": "normalized_margin",
              "rank_by_kwargs": {"adjust_pred_probs": True}}):
    for filter_by in ("prune_by_noise_rate", "prune_by_class", "both"):
      np.testing.assert_array_equal(cc.find_label_issues(labels, probs, filter_by=filter_by, **kw),
                                    _cleanlab(labels, probs, filter_by=filter_by, **kw))
  p32 = probs.astype(np.float32)
  for filter_by in cc.FILTERS:
    np.testing.assert_array_equal(cc.find_label_issues(labels, p32, filter_by=filter_by),
                                  _cleanlab(labels, p32, filter_by=filter_by))
  for method in cc.METHODS:
    ours = cc.get_label_quality_scores(labels, p32, method=method)
    theirs = cl_rank.get_label_quality_scores(labels, p32, method=method)
    assert ours.dtype == theirs.dtype == (np.float64 if "entropy" in method else np.float32)
    np.testing.assert_array_equal(ours, theirs)


def test_hand_computed_case():
  # Thresholds t0 = mean(0.9, 0.5) = 0.7, t1 = mean(0.8, 0.4, 0.2) = 1.4 / 3.
  probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.2, 0.8], [0.6, 0.4], [0.8, 0.2]])
  labels = np.array([0, 0, 1, 1, 1])
  # Off-diagonal: rows 1 (0.5 >= t1 only) and 4 (0.8 >= t0 only); row 1's label ties the argmax.
  np.testing.assert_array_equal(cc.find_label_issues(labels, probs, filter_by="confident_learning"),
                                [False, False, False, False, True])
  np.testing.assert_array_equal(
      cc.find_label_issues(labels, probs, filter_by="predicted_neq_given"),
      [False, False, False, True, True])
  assert cc.num_label_issues(labels, probs) == 1
  # low_self_confidence flags the num_label_issues lowest p(label): row 4 (0.2).
  np.testing.assert_array_equal(
      cc.find_label_issues(labels, probs, filter_by="low_self_confidence",
                           return_indices_ranked_by="self_confidence"), [4])
  np.testing.assert_allclose(cc.get_label_quality_scores(labels, probs, method="normalized_margin"),
                             [0.9, 0.5, 0.8, 0.4, 0.2])
  # Entropy H = 1 bit for row 1 (normalized by log 2), s = 0.5: log(1 + 2) / 2.
  assert cc.get_label_quality_scores(labels, probs, method="confidence_weighted_entropy")[1] == \
      pytest.approx(np.log(3.0) / 2.0)


def test_ties_go_to_the_lower_id_in_the_by_id_form():
  # Class 0: six clean rows and four identical rows confidently of class 1 (t0 = 0.66, t1 = 0.6),
  # so the confident joint is [[6, 4], [0, 6]]; frac_noise=0.5 flags 2 of the 4 tied rows.
  probs = np.array([[0.9, 0.1]] * 6 + [[0.3, 0.7]] * 4 + [[0.4, 0.6]] * 6)
  labels = np.array([0] * 10 + [1] * 6)
  ids = np.arange(16)[::-1] * 10  # the tied rows 6..9 have ids 90, 80, 70, 60.
  for filter_by in ("prune_by_class", "prune_by_noise_rate"):
    got = find_by_id(probs, labels, filter_by=filter_by, frac_noise=0.5, ids_N=ids)
    assert set(ids[got]) == {60, 70}
    perm = np.random.default_rng(0).permutation(16)
    again = find_by_id(probs[perm], labels[perm], filter_by=filter_by, frac_noise=0.5,
                       ids_N=ids[perm])
    assert set(ids[perm][again]) == {60, 70}
  assert find_by_id(probs, labels, filter_by="confident_learning").sum() == 4


def test_bad_inputs_name_the_argument():
  probs = np.full((4, 2), 0.5)
  labels = np.array([0, 1, 0, 1])
  with pytest.raises(DataError, match="labels must lie in"):
    cc.find_label_issues(np.array([0, 1, 2, 1]), probs)
  with pytest.raises(DataError, match="labels must lie in"):
    cc.find_label_issues(np.array([0, -1, 0, 1]), probs)
  bad = probs.copy()
  bad[2, 0] = np.nan
  with pytest.raises(DataError, match="pred_probs has NaN"):
    cc.find_label_issues(labels, bad)
  bad[2, 0] = np.inf
  with pytest.raises(DataError, match="pred_probs has NaN"):
    cc.get_label_quality_scores(labels, bad)
  with pytest.raises(DataError, match=r"pred_probs must be \[N, C\]"):
    cc.find_label_issues(labels, probs[:3])
  with pytest.raises(DataError, match="empty"):
    cc.find_label_issues(np.zeros(0, int), np.zeros((0, 2)))
  with pytest.raises(DataError, match="integer class labels"):
    cc.find_label_issues(np.array([0.5, 1, 0, 1]), probs)
  with pytest.raises(ConfigError, match="filter_by"):
    cc.find_label_issues(labels, probs, filter_by="nope")
  with pytest.raises(ConfigError, match="return_indices_ranked_by"):
    cc.find_label_issues(labels, probs, return_indices_ranked_by="nope")
  with pytest.raises(ConfigError, match="method"):
    cc.get_label_quality_scores(labels, probs, method="nope")
  with pytest.raises(ConfigError, match="num_to_remove_per_class"):
    cc.find_label_issues(labels, probs, filter_by="confident_learning",
                         num_to_remove_per_class=[1, 1])
  with pytest.raises(ConfigError, match="frac_noise"):
    cc.find_label_issues(labels, probs, frac_noise=1.5)
  with pytest.raises(DataError, match="ids_N repeats"):
    find_by_id(probs, labels, ids_N=np.array([1, 2, 2, 3]))
  with pytest.raises(DataError, match="ids_N must be 4"):
    find_by_id(probs, labels, ids_N=np.array([1, 2, 3]))
  with pytest.raises(DataError, match="mask_N must be bool"):
    find_by_id(probs, labels, mask_N=np.ones(4))
  with pytest.raises(DataError, match="probs_NxC must be"):
    find_by_id(probs[:3], labels)
