"""Subset selection: from per-example scores to the ids to keep.

Pure host-side functions of ``(ids, scores, labels)``, run once over the dataset. They take NumPy
arrays or jax arrays on one or many devices of this process (sharded with a classic ``Mesh`` or
explicit ``jax.make_mesh`` axes alike); arrays spread over several processes must be gathered first
(:func:`prunejax.parallel.gather`). The conventions:

* **High score means hard.** EL2N, GraNd, loss, entropy, forgetting counts, prototype distances,
  cartography variability: pass them as they are. For scores where LOW means hard (margin, AUM,
  cartography confidence, self-confidence, normalized margin), pass their negation
  (``prunejax.scores.HIGHER_IS_HARDER`` says which is which).
* ``keep="hard"`` keeps the highest scores, ``"easy"`` the lowest, ``"random"`` ignores them.
* The number kept is exactly ``floor(fraction * N + 0.5)`` (per class, see ``class_balanced``).
* Ties are broken by id (the smaller id ranks first), and the result does not depend on the order
  of the inputs: it is a function of the (id, score, label) triples and ``seed`` alone.
* The kept ids come back sorted.
"""

from __future__ import annotations

import math

import numpy as np

from prunejax.errors import ConfigError, DataError, check_choice, check_positive_int, check_range

KEEPS = ("hard", "easy", "random")


def num_kept(n: int, fraction: float) -> int:
  """``floor(fraction * n + 0.5)``: the exact number of examples a fraction keeps."""
  return int(math.floor(fraction * n + 0.5))


def _host(x, name: str) -> np.ndarray:
  """``x`` as a NumPy array; a jax array sharded over several processes cannot be read here."""
  if getattr(x, "is_fully_addressable", True) is False:
    raise DataError(f"{name} is a jax array sharded over several processes; gather it first "
                    "(prunejax.parallel.gather) so every process selects from all of it")
  return np.asarray(x)


def _prepare(ids, scores, labels, need_scores: bool):
  ids, scores = _host(ids, "ids"), _host(scores, "scores")
  labels = None if labels is None else _host(labels, "labels")
  if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
    raise DataError(f"ids must be a 1-D integer array, got {ids.dtype}{list(ids.shape)}")
  scores = np.asarray(scores, np.float64)
  if scores.shape != ids.shape:
    raise DataError(f"scores have shape {scores.shape}; expected {ids.shape} (one per id)")
  if need_scores and not np.all(np.isfinite(scores)):
    raise DataError(f"{int(np.sum(~np.isfinite(scores)))} scores are NaN or infinite")
  order = np.argsort(ids, kind="stable")
  ids, scores = ids[order].astype(np.int64), scores[order]
  if len(ids) > 1 and np.any(ids[1:] == ids[:-1]):
    raise DataError("ids must be unique")
  if labels is not None:
    labels = np.asarray(labels)
    if labels.shape != order.shape:
      raise DataError(f"labels have shape {labels.shape}; expected {order.shape}")
    labels = labels[order]
  return ids, scores, labels


def _apportion(total: int, sizes: np.ndarray) -> np.ndarray:
  """Integer quotas proportional to ``sizes`` summing to ``total`` (largest remainder; ties go to
  the earlier group)."""
  n = int(sizes.sum())
  exact = total * sizes / max(n, 1)
  quotas = np.floor(exact).astype(np.int64)
  short = total - int(quotas.sum())
  order = np.lexsort((np.arange(len(sizes)), -(exact - quotas)))
  quotas[order[:short]] += 1
  return quotas


def _groups(ids, labels, class_balanced: bool):
  if not class_balanced:
    return [np.arange(len(ids))]
  if labels is None:
    raise ConfigError("class_balanced=True needs labels")
  return [np.flatnonzero(labels == c) for c in np.unique(labels)]


def _check_fraction(fraction: float, offset: float = 0.0, offset_name: str = "offset") -> None:
  check_range("fraction", fraction, 0.0, 1.0)
  check_range(offset_name, offset, 0.0, 1.0)
  if fraction + offset > 1.0 + 1e-9:
    raise ConfigError(f"fraction={fraction!r} + {offset_name}={offset!r} is out of range; "
                      f"expected a sum in [0, 1]")


def select(ids: np.ndarray, scores: np.ndarray, *, fraction: float, keep: str = "hard",
           labels: np.ndarray | None = None, class_balanced: bool = False, offset: float = 0.0,
           seed: int = 0) -> np.ndarray:
  """The ids to keep: a ``fraction`` of the hardest, easiest or random examples.

  Args:
    ids: int example ids, [N], unique.
    scores: one score per id, high means hard (see the module doc); ignored for ``"random"``.
    fraction: the fraction of ``ids`` to keep, in [0, 1].
    keep: ``"hard"`` (highest scores), ``"easy"`` (lowest) or ``"random"``.
    labels: int labels, [N]; needed for ``class_balanced``.
    class_balanced: keep the same fraction of every class: the total is split over classes in
      proportion to their sizes (largest remainder), so class proportions are preserved within one
      example and the total is still exact.
    offset: skip this fraction at the top of the keep order before keeping (Data Diet keeps the
      hardest after the very hardest: ``keep="hard", offset=0.1``); per class when balanced.
      ``fraction + offset`` must be at most 1.
    seed: seeds ``"random"``.

  Returns:
    The kept ids, sorted, int64.

  References:
    Paul, Ganguli, Dziugaite. "Deep Learning on a Data Diet." NeurIPS 2021 (offset windows).
    Sorscher et al. "Beyond neural scaling laws." NeurIPS 2022 (keep easy for small data, hard
    for large).
  """
  check_choice("keep", keep, KEEPS)
  _check_fraction(fraction, offset)
  if keep == "random" and offset > 0:
    raise ConfigError(f"offset={offset!r} is not allowed with keep='random'; expected 0")
  ids, scores, labels = _prepare(ids, scores, labels, need_scores=keep != "random")
  groups = _groups(ids, labels, class_balanced)
  quotas = _apportion(num_kept(len(ids), fraction), np.array([len(g) for g in groups]))
  rng = np.random.default_rng([seed, 0x5E1EC7])
  kept = []
  for members, quota in zip(groups, quotas):
    if keep == "random":
      kept.append(ids[members[rng.permutation(len(members))[:quota]]])
      continue
    # The skipped top is exactly what ``fraction=offset`` would keep, so the two never overlap;
    # when rounding both counts up passes the group's size, the kept window is one shorter.
    skip = min(num_kept(len(members), offset), len(members))
    key = -scores[members] if keep == "hard" else scores[members]
    ranked = members[np.lexsort((ids[members], key))]
    kept.append(ids[ranked[skip:skip + min(quota, len(members) - skip)]])
  return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def _ccs_group(ids, scores, members, quota, beta, num_strata, rng) -> np.ndarray:
  n_cut = min(num_kept(len(members), beta), len(members) - quota)
  ranked = members[np.lexsort((ids[members], -scores[members]))]
  pool = np.sort(ranked[n_cut:])  # after cutting the hardest, in id order.
  if quota == 0 or len(pool) == 0:
    return np.zeros(0, np.int64)
  s = scores[pool]
  lo, hi = s.min(), s.max()
  width = (hi - lo) / num_strata
  stratum = np.zeros(len(pool), np.int64) if width == 0 else np.minimum(
      ((s - lo) / width).astype(np.int64), num_strata - 1)
  strata = [pool[stratum == k] for k in range(num_strata) if np.any(stratum == k)]
  budget, chosen = quota, []
  while strata:
    smallest = min(range(len(strata)), key=lambda i: (len(strata[i]), i))
    members_k = strata.pop(smallest)
    take = min(len(members_k), budget // (len(strata) + 1))
    chosen.append(rng.choice(members_k, size=take, replace=False))
    budget -= take
  if budget > 0:  # cannot happen with enough examples; kept as a guard of the exact count.
    rest = np.setdiff1d(pool, np.concatenate(chosen))
    chosen.append(rng.choice(rest, size=budget, replace=False))
  return ids[np.concatenate(chosen)]


def ccs(ids: np.ndarray, scores: np.ndarray, *, fraction: float, beta: float = 0.0,
        num_strata: int = 50, labels: np.ndarray | None = None, class_balanced: bool = False,
        seed: int = 0) -> np.ndarray:
  """Coverage-centric coreset selection: cut the hardest, then sample evenly over score strata.

  Removes the ``beta`` fraction of hardest examples (highest scores; mislabeled or
  unlearnable), splits the rest into ``num_strata`` equal-width score ranges, and spends the budget
  from the smallest stratum up, each taking ``min(its size, budget left / strata left)`` examples at
  random. This covers easy and hard regions alike at high pruning rates.

  Args:
    ids: int example ids, [N], unique.
    scores: one score per id, high means hard.
    fraction: the fraction of ``ids`` to keep; exactly ``floor(fraction * N + 0.5)`` are kept.
    beta: the hard cutoff rate; ``fraction + beta`` must be at most 1.
    num_strata: number of score strata (the paper uses 50).
    labels, class_balanced: as in :func:`select` (CCS per class).
    seed: seeds the sampling.

  Returns:
    The kept ids, sorted, int64.

  References:
    Zheng, Liu, Li, Lai, Prakash. "Coverage-centric Coreset Selection for High Pruning Rates."
    ICLR 2023, Algorithm 1.
  """
  _check_fraction(fraction, beta, "beta")
  check_positive_int("num_strata", num_strata)
  ids, scores, labels = _prepare(ids, scores, labels, need_scores=True)
  groups = _groups(ids, labels, class_balanced)
  quotas = _apportion(num_kept(len(ids), fraction), np.array([len(g) for g in groups]))
  rng = np.random.default_rng([seed, 0xCC5])
  kept = [_ccs_group(ids, scores, m, q, beta, num_strata, rng) for m, q in zip(groups, quotas)]
  return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)
