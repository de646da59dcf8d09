"""Subset selection (prunejax.select): hand-computed cases and properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prunejax import select
from prunejax.errors import ConfigError, DataError

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def datasets(draw, min_size=1, max_size=60, num_classes=4):
  """(ids, scores, labels): unique ids in any order, scores with ties, labels."""
  n = draw(st.integers(min_size, max_size))
  ids = np.array(draw(st.lists(st.integers(-1000, 10**6), min_size=n, max_size=n, unique=True)))
  scores = np.array(draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, -3.0, 7.25]) | st.floats(
      -10, 10, allow_nan=False), min_size=n, max_size=n)))
  labels = np.array(draw(st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)))
  return ids, scores, labels


fractions = st.floats(0.0, 1.0)
keeps = st.sampled_from(select.KEEPS)


def test_hand_computed():
  ids = np.array([5, 1, 4, 2, 3])
  scores = np.array([0.1, 0.9, 0.5, 0.9, 0.0])
  # Hard: 0.9 (ids 1, 2, tie broken by id), then 0.5 (id 4).
  np.testing.assert_array_equal(select.select(ids, scores, fraction=0.6, keep="hard"), [1, 2, 4])
  np.testing.assert_array_equal(select.select(ids, scores, fraction=0.4, keep="easy"), [3, 5])
  # A tie at the cut: the smaller id is kept first.
  np.testing.assert_array_equal(select.select(ids, scores, fraction=0.2, keep="hard"), [1])
  # Offset skips the hardest 20% (id 1) before keeping.
  np.testing.assert_array_equal(select.select(ids, scores, fraction=0.4, keep="hard", offset=0.2),
                                [2, 4])
  assert select.num_kept(5, 0.5) == 3 and select.num_kept(4, 0.5) == 2  # half rounds up.


def test_errors_are_one_line():
  ids, scores = np.arange(4), np.zeros(4)
  for kwargs, match in [(dict(fraction=1.5), r"fraction=1\.5 is out of range"),
                        (dict(fraction=0.5, keep="middle"), "keep='middle' is not allowed"),
                        (dict(fraction=0.8, offset=0.3), r"fraction=0\.8 \+ offset=0\.3"),
                        (dict(fraction=0.5, class_balanced=True), "needs labels"),
                        (dict(fraction=0.5, keep="random", offset=0.1), "offset=0.1")]:
    with pytest.raises(ConfigError, match=match) as e:
      select.select(ids, scores, **kwargs)
    assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="unique"):
    select.select(np.array([1, 1]), np.zeros(2), fraction=0.5)
  with pytest.raises(DataError, match="NaN"):
    select.select(ids, np.array([0, np.nan, 0, 0]), fraction=0.5)
  with pytest.raises(ConfigError, match="beta"):
    select.ccs(ids, scores, fraction=0.9, beta=0.2)


@SETTINGS
@given(datasets(), fractions, keeps, st.booleans(), st.integers(0, 3))
def test_select_count_subset_and_determinism(data, fraction, keep, balanced, seed):
  ids, scores, labels = data
  kept = select.select(ids, scores, fraction=fraction, keep=keep, labels=labels,
                       class_balanced=balanced, seed=seed)
  assert len(kept) == select.num_kept(len(ids), fraction)
  assert len(set(kept)) == len(kept) and set(kept) <= set(ids.tolist())
  assert np.all(np.diff(kept) > 0)
  # Deterministic, and independent of the input order.
  perm = np.random.default_rng(seed).permutation(len(ids))
  again = select.select(ids[perm], scores[perm], fraction=fraction, keep=keep,
                        labels=labels[perm], class_balanced=balanced, seed=seed)
  np.testing.assert_array_equal(kept, again)


@SETTINGS
@given(datasets(), fractions, st.sampled_from(["hard", "easy"]))
def test_select_direction_and_tie_breaking(data, fraction, keep):
  ids, scores, _ = data
  kept = select.select(ids, scores, fraction=fraction, keep=keep)
  is_kept = np.isin(ids, kept)
  if 0 < is_kept.sum() < len(ids):
    sign = 1 if keep == "hard" else -1
    worst_kept = np.min(sign * scores[is_kept])
    best_dropped = np.max(sign * scores[~is_kept])
    assert worst_kept >= best_dropped
    if worst_kept == best_dropped:  # a tie across the cut goes to the smaller ids.
      tied = sign * scores == worst_kept
      assert ids[tied & is_kept].max() < ids[tied & ~is_kept].min()


@SETTINGS
@given(datasets(min_size=2), st.floats(0.0, 0.5), st.floats(0.0, 0.5))
def test_offset_skips_the_top(data, fraction, offset):
  ids, scores, _ = data
  kept = select.select(ids, scores, fraction=fraction, keep="hard", offset=offset)
  top = select.select(ids, scores, fraction=offset, keep="hard")
  window = select.select(ids, scores, fraction=offset + fraction, keep="hard")
  if select.num_kept(len(ids), offset) + len(kept) == select.num_kept(len(ids), offset + fraction):
    np.testing.assert_array_equal(np.sort(np.concatenate([top, kept])), window)
  assert not set(kept) & set(top.tolist())


@SETTINGS
@given(datasets(min_size=4), fractions, keeps, st.integers(0, 3))
def test_class_balance(data, fraction, keep, seed):
  ids, scores, labels = data
  kept = select.select(ids, scores, fraction=fraction, keep=keep, labels=labels,
                       class_balanced=True, seed=seed)
  kept_labels = labels[np.isin(ids, kept)]
  for c in np.unique(labels):
    size = np.sum(labels == c)
    assert abs(np.sum(kept_labels == c) - fraction * size) < 1.0 + 1e-9


@SETTINGS
@given(datasets(min_size=2), st.integers(0, 5))
def test_random_is_seeded(data, seed):
  ids, scores, _ = data
  a = select.select(ids, scores, fraction=0.5, keep="random", seed=seed)
  np.testing.assert_array_equal(a, select.select(ids, scores * 0, fraction=0.5, keep="random",
                                                 seed=seed))


def test_random_differs_across_seeds():
  ids = np.arange(200)
  a = select.select(ids, np.zeros(200), fraction=0.5, keep="random", seed=0)
  b = select.select(ids, np.zeros(200), fraction=0.5, keep="random", seed=1)
  assert not np.array_equal(a, b)


# ----------------------------------------------------------------------------------------------
# CCS.
# ----------------------------------------------------------------------------------------------


def test_ccs_hand_computed():
  ids = np.arange(10)
  scores = np.array([0.0, 0.1, 0.2, 0.3, 5.0, 5.1, 9.0, 9.5, 9.9, 10.0])
  # beta 0.1 cuts id 9 (score 10). Two strata of width 4.95 over [0, 9.9]: ids {0..3} and
  # {4..8}. Budget 4: the smaller stratum gives min(4, 4 // 2) = 2, the other the remaining 2.
  kept = select.ccs(ids, scores, fraction=0.4, beta=0.1, num_strata=2, seed=0)
  assert len(kept) == 4 and 9 not in kept
  assert np.sum(kept <= 3) == 2 and np.sum((kept >= 4) & (kept <= 8)) == 2
  # Three strata: {0..3}, {4, 5}, {6, 7, 8}; budget 6 gives 2 from each.
  kept = select.ccs(ids, scores, fraction=0.6, beta=0.1, num_strata=3, seed=0)
  assert [np.sum(kept <= 3), np.sum((kept >= 4) & (kept <= 5)), np.sum(kept >= 6)] == [2, 2, 2]


@SETTINGS
@given(datasets(min_size=1), st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(1, 8),
       st.booleans(), st.integers(0, 3))
def test_ccs_properties(data, fraction, beta, num_strata, balanced, seed):
  ids, scores, labels = data
  if fraction + beta > 1.0:
    fraction, beta = fraction / 2, beta / 2
  kept = select.ccs(ids, scores, fraction=fraction, beta=beta, num_strata=num_strata,
                    labels=labels, class_balanced=balanced, seed=seed)
  assert len(kept) == select.num_kept(len(ids), fraction)
  assert len(set(kept)) == len(kept) and set(kept) <= set(ids.tolist())
  if not balanced:  # the hardest beta fraction is never kept.
    cut = select.select(ids, scores, fraction=beta, keep="hard")
    if select.num_kept(len(ids), beta) + len(kept) <= len(ids):
      assert not set(kept) & set(cut.tolist())
  perm = np.random.default_rng(seed).permutation(len(ids))
  np.testing.assert_array_equal(
      kept, select.ccs(ids[perm], scores[perm], fraction=fraction, beta=beta,
                       num_strata=num_strata, labels=labels[perm], class_balanced=balanced,
                       seed=seed))


def test_ccs_covers_all_strata():
  rng = np.random.default_rng(0)
  # Strata of width exactly 1 over [0, 10]: 900 examples in [0, 1), 100 in [9, 10].
  scores = np.concatenate([[0.0], rng.uniform(0, 1, 899), rng.uniform(9, 10, 99), [10.0]])
  ids = np.arange(1000)
  kept = select.ccs(ids, scores, fraction=0.1, beta=0.0, num_strata=10, seed=0)
  # Top-k "hard" would take only the rare high scores; CCS spends half the budget on each
  # occupied stratum's share: 50 from [9, 10], 50 from [0, 1].
  assert np.sum(scores[kept] > 5) == 50


def test_scores_spread_over_processes_must_be_gathered_first():
  class MultiProcessArray(np.ndarray):  # what a jax array of another process's rows reports.
    is_fully_addressable = False

  scores = np.zeros(4).view(MultiProcessArray)
  with pytest.raises(DataError, match=r"scores is a jax array sharded over several processes; "
                                      r"gather it first \(prunejax.parallel.gather\)"):
    select.select(np.arange(4), scores, fraction=0.5)
  with pytest.raises(DataError, match="ids is a jax array"):
    select.ccs(np.arange(4).view(MultiProcessArray), np.zeros(4), fraction=0.5)


def test_offset_window_never_overlaps_the_skipped_top_when_rounding_overflows():
  """17 tied scores, fraction 0.5 + offset 0.5: both round up to 9 (18 > 17); the skipped top is
  the 9 that fraction=0.5 keeps and the window is the other 8 (was: 9, one of them skipped)."""
  ids, scores = np.arange(17), np.zeros(17, np.float32)
  kept = select.select(ids, scores, fraction=0.5, keep="hard", offset=0.5)
  top = select.select(ids, scores, fraction=0.5, keep="hard")
  np.testing.assert_array_equal(top, np.arange(9))
  np.testing.assert_array_equal(kept, np.arange(9, 17))
