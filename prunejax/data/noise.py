"""Synthetic label noise keyed by example id, for experiments on noisy data.

Used to test whether a data-pruning rule back-propagates or keeps corrupted examples, as in
RHO-LOSS (Mindermann et al. 2022), which flips a fraction of labels uniformly to other classes.
"""

from __future__ import annotations

import numpy as np

from prunejax.errors import ConfigError, DataError, check_range

# Separates this module's random stream from other uses of the same seed.
_STREAM = 0x1AB3F11


def flip_labels(ids: np.ndarray, labels: np.ndarray, fraction: float, *, num_classes: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Flips ``floor(fraction * N + 0.5)`` labels, each to another class chosen uniformly.

  Which examples are flipped and their new classes depend only on ``seed`` and the set of
  (id, label) pairs, not on their order: the draw is made over the examples sorted by id and mapped
  back. A flipped label never keeps its class (symmetric noise over the other ``num_classes - 1``).

  Args:
    ids: example ids ``int[N]``, unique.
    labels: labels ``int[N]`` in ``[0, num_classes)``, aligned with ``ids``.
    fraction: share of the examples to flip, in ``[0, 1]``. 0 returns the labels unchanged (a
      noise-free control); a positive fraction that rounds to no example is an error.
    num_classes: number of classes, at least 2.
    seed: the random seed, a non-negative integer.

  Returns:
    ``(noisy_labels, flipped_ids)``: ``noisy_labels`` ``int[N]`` aligned with ``ids`` (same dtype as
    ``labels``), and the sorted ids whose label was changed ``int64[round(fraction * N)]``.

  Raises:
    ConfigError: ``fraction`` out of range or rounding to no example, ``num_classes`` below 2, a
      negative or non-integer ``seed``.
    DataError: ids not unique, lengths that differ, labels outside ``[0, num_classes)``.
  """
  check_range("fraction", fraction, 0.0, 1.0)
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ConfigError(f"seed={seed!r} is not allowed; expected a non-negative integer")
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) \
      or num_classes < 2:
    raise ConfigError(f"num_classes={num_classes!r} is not allowed; expected an integer >= 2")
  ids, labels = np.asarray(ids), np.asarray(labels)
  if ids.ndim != 1 or labels.shape != ids.shape:
    raise DataError(f"ids and labels must be 1-d of the same length; got shapes {ids.shape} and "
                    f"{labels.shape}")
  if not np.issubdtype(ids.dtype, np.integer) or not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"ids and labels must be integers; got dtypes {ids.dtype} and {labels.dtype}")
  n = ids.size
  order = np.argsort(ids, kind="stable")
  sorted_ids = ids[order]
  if n and np.any(sorted_ids[1:] == sorted_ids[:-1]):
    dup = sorted_ids[1:][sorted_ids[1:] == sorted_ids[:-1]][0]
    raise DataError(f"ids must be unique; id {int(dup)} appears more than once")
  if n and (labels.min() < 0 or labels.max() >= num_classes):
    bad = labels[(labels < 0) | (labels >= num_classes)][0]
    raise DataError(f"label {int(bad)} is outside [0, {num_classes}) (num_classes={num_classes})")
  count = int(np.floor(float(fraction) * n + 0.5))
  if count == 0 and fraction > 0:
    raise ConfigError(f"fraction={fraction!r} of {n} examples flips no label; expected at least "
                      f"{0.5 / n if n else 'one example'} or exactly 0 for no noise")
  rng = np.random.default_rng([int(seed), _STREAM])
  chosen = np.sort(rng.permutation(n)[:count])  # positions in id order
  offsets = rng.integers(1, num_classes, size=count)  # never 0: the class always changes
  noisy_sorted = labels[order].copy()
  noisy_sorted[chosen] = (noisy_sorted[chosen] + offsets) % num_classes
  noisy = np.empty_like(labels)
  noisy[order] = noisy_sorted
  return noisy, sorted_ids[chosen].astype(np.int64)
