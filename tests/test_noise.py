"""Label flipping: exact counts, other classes uniformly, deterministic per seed and keyed by id."""

import numpy as np
import pytest

from prunejax import data
from prunejax.errors import ConfigError, DataError


def _data(n=1000, num_classes=10, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.choice(10 * n, n, replace=False).astype(np.int64)  # ids are not positions
  return ids, rng.integers(0, num_classes, n).astype(np.int32)


@pytest.mark.parametrize("n,fraction", [(1000, 0.2), (7, 0.5), (359, 0.2), (10, 1.0), (3, 0.17)])
def test_flips_exactly_the_rounded_count_to_other_classes(n, fraction):
  ids, labels = _data(n)
  noisy, flipped = data.flip_labels(ids, labels, fraction, num_classes=10, seed=3)
  assert len(flipped) == int(np.floor(fraction * n + 0.5))
  assert noisy.dtype == labels.dtype and flipped.dtype == np.int64
  np.testing.assert_array_equal(flipped, np.sort(flipped))
  changed = ids[noisy != labels]
  np.testing.assert_array_equal(np.sort(changed), flipped)  # every flipped label changed class
  assert noisy.min() >= 0 and noisy.max() < 10


def test_deterministic_per_seed_and_independent_of_order():
  ids, labels = _data(500)
  noisy, flipped = data.flip_labels(ids, labels, 0.3, num_classes=10, seed=1)
  again, flipped_again = data.flip_labels(ids, labels, 0.3, num_classes=10, seed=1)
  np.testing.assert_array_equal(noisy, again)
  np.testing.assert_array_equal(flipped, flipped_again)
  perm = np.random.default_rng(9).permutation(len(ids))
  noisy_p, flipped_p = data.flip_labels(ids[perm], labels[perm], 0.3, num_classes=10, seed=1)
  np.testing.assert_array_equal(flipped_p, flipped)
  np.testing.assert_array_equal(noisy_p, noisy[perm])  # the same new label for the same id
  _, other = data.flip_labels(ids, labels, 0.3, num_classes=10, seed=2)
  assert not np.array_equal(other, flipped)


def test_new_classes_and_flipped_examples_are_uniform():
  n = 30000
  ids = np.arange(n)
  noisy, _ = data.flip_labels(ids, np.zeros(n, np.int32), 1.0, num_classes=4, seed=0)
  counts = np.bincount(noisy, minlength=4)
  assert counts[0] == 0
  # Each other class has probability 1/3: within 5 binomial standard deviations.
  assert np.all(np.abs(counts[1:] / n - 1 / 3) < 5 * np.sqrt(2 / 9 / n))
  # Across seeds every example is flipped with probability `fraction`.
  ids, labels = _data(50, num_classes=3)
  hits = np.zeros(50)
  for seed in range(400):
    _, flipped = data.flip_labels(ids, labels, 0.2, num_classes=3, seed=seed)
    hits += np.isin(ids, flipped)
  assert np.all(np.abs(hits / 400 - 0.2) < 5 * np.sqrt(0.2 * 0.8 / 400))


def test_fraction_zero_is_the_noise_free_control():
  ids, labels = _data(20)
  noisy, flipped = data.flip_labels(ids, labels, 0.0, num_classes=10, seed=0)
  np.testing.assert_array_equal(noisy, labels)
  assert flipped.shape == (0,) and noisy is not labels


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(fraction=1.5), ConfigError, "fraction=1.5 is out of range; expected a value in \\[0.0"),
    (dict(fraction=0.01), ConfigError, "fraction=0.01 of 20 examples flips no label; expected at "
                                       "least 0.025"),
    (dict(num_classes=1), ConfigError, "num_classes=1 is not allowed; expected an integer >= 2"),
    (dict(seed=-1), ConfigError, "seed=-1 is not allowed; expected a non-negative integer"),
    (dict(ids=np.r_[np.arange(19), 3]), DataError, "ids must be unique; id 3 appears more"),
    (dict(labels=np.r_[np.zeros(19, int), 10]), DataError, "label 10 is outside \\[0, 10\\)"),
    (dict(labels=np.zeros(19, int)), DataError, "same length; got shapes \\(20,\\) and \\(19,\\)"),
    (dict(labels=np.zeros(20)), DataError, "must be integers; got dtypes int64 and float64"),
])
def test_bad_input_is_one_line_error(kwargs, error, message):
  args = dict(ids=np.arange(20), labels=np.zeros(20, int), fraction=0.2, num_classes=10, seed=0)
  args.update(kwargs)
  with pytest.raises(error, match=message) as e:
    data.flip_labels(args.pop("ids"), args.pop("labels"), args.pop("fraction"), **args)
  assert "\n" not in str(e.value)
