"""Scores from training dynamics, as ``(init, update)`` pairs of pure functions.

A :class:`Tracker` is ``init(ids) -> state`` and ``update(state, batch, values) -> state``, where
``batch`` carries ``id``, ``y`` and ``mask`` (padding rows are ignored) and the values are the
logits of the batch (forgetting, cartography, AUM) or any per-example score (running mean). The
state is a ``NamedTuple`` of arrays with one entry per example, in increasing id order
(``state.ids``), so it can be jitted, checkpointed and sharded like any pytree, and its methods read
the scores out; ``Tracker.read`` is the one read-out every tracker has.

Call ``update`` once for every presentation of the examples (each epoch, or each step on the batch
just trained on). An id that is not in ``state.ids`` is ignored; an id must not appear twice in one
batch.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prunejax.errors import ConfigError, DataError, check_device_ids
from prunejax.scores.output import (as_float, batch_mask, check_batch, checked_labels,
                                    margin_from_logits)
from prunejax.types import ApplyFn, Batch, Params, Scores


class Tracker(NamedTuple):
  """An ``(init, update)`` pair: ``init(ids) -> state``, ``update(state, batch, values) -> state``,
  and ``read(state) -> f32[N]``, the tracker's score of each example in ``state.ids`` order (its
  direction is in :data:`prunejax.scores.SCORES`)."""

  init: Callable[..., Any]
  update: Callable[..., Any]
  read: Callable[[Any], Scores] | None = None


def _sorted_ids(ids: Any) -> jax.Array:
  try:
    ids_np = np.asarray(ids)
  except jax.errors.TracerArrayConversionError:  # under jit: no host checks.
    return jnp.sort(ids)
  if ids_np.ndim != 1 or not (np.issubdtype(ids_np.dtype, np.integer) or ids_np.size == 0):
    raise ConfigError(f"tracker ids must be a 1-D integer array; got dtype {ids_np.dtype}, shape "
                      f"{ids_np.shape}")
  check_device_ids("tracker ids", ids_np)
  unique = np.unique(ids_np)
  if len(unique) != len(ids_np):
    raise ConfigError(f"ids must be unique; {len(ids_np) - len(unique)} are repeated")
  return jnp.asarray(unique)


def positions(ids_N: jax.Array, batch: Batch) -> jax.Array:
  """Position of each batch row in ``ids_N`` (sorted), or ``N`` (dropped by scatters) for padding
  rows and unknown ids."""
  n = ids_N.shape[0]
  ids_B = batch["id"].astype(ids_N.dtype)
  pos_B = jnp.clip(jnp.searchsorted(ids_N, ids_B), 0, n - 1)
  found_B = batch_mask(batch, ids_B.shape[0]) & (ids_N[pos_B] == ids_B)
  return jnp.where(found_B, pos_B, n)


def _correct(batch: Batch, logits_BxC: jax.Array) -> jax.Array:
  """Whether ``argmax(logits) == y``; False where the logits are not finite (argmax would pick the
  first NaN) or the label is outside the classes."""
  finite_B = jnp.all(jnp.isfinite(logits_BxC), axis=-1)
  return (jnp.argmax(logits_BxC, axis=-1) == batch["y"]) & finite_B


def _valid(batch: Batch, logits_BxC: jax.Array) -> jax.Array:
  """bool[B]: rows whose label lies in ``[0, C)`` (checked once, at trace time, for shapes and an
  integer dtype); a tracker records NaN for the others, never a plausible number."""
  b = check_batch(batch) if "x" in batch else jnp.shape(batch["y"])[0]
  if jnp.shape(logits_BxC)[:1] != (b,) or jnp.shape(batch["y"]) != (b,):
    raise DataError(f"logits of shape {tuple(jnp.shape(logits_BxC))} and batch['y'] of shape "
                    f"{tuple(jnp.shape(batch['y']))} do not match a batch of {b} rows")
  _, valid_B = checked_labels(batch["y"], jnp.shape(logits_BxC)[-1])
  return valid_B & jnp.all(jnp.isfinite(as_float(logits_BxC)), axis=-1)


# ----------------------------------------------------------------------------------------------
# Forgetting events (Toneva et al. 2019).
# ----------------------------------------------------------------------------------------------


class ForgettingState(NamedTuple):
  ids: jax.Array            # [N] sorted example ids
  presented: jax.Array      # i32[N] updates that included the example
  prev_correct: jax.Array   # bool[N] correct at its last presentation
  learned: jax.Array        # bool[N] correct at least once
  forgets: jax.Array        # i32[N] correct -> incorrect transitions; < 0 once the example had
                            # a label outside the classes or non-finite logits (read as NaN)

  def scores(self) -> Scores:
    """Forgetting counts, f32[N]; never-learned examples get ``max(presented) + 1``.

    An example presented ``n`` times can be forgotten at most ``n // 2`` times, so the
    never-learned examples (including never-presented ones) rank above every learned example, as
    most forgettable, following Toneva et al. High means hard.
    """
    unlearned = jnp.max(self.presented, initial=0) + 1
    counts = jnp.where(self.learned, self.forgets, unlearned).astype(jnp.float32)
    return jnp.where(self.forgets < 0, jnp.nan, counts)


def forgetting() -> Tracker:
  """Forgetting events: how often an example goes from correctly to incorrectly classified.

  ``update(state, batch, logits_BxC)`` compares ``argmax(logits) == y`` with the example's previous
  presentation. Unforgettable examples (learned, never forgotten) score 0; never-learned ones are
  counted as forgotten more often than any learned example can be (see
  :meth:`ForgettingState.scores`).

  References:
    Toneva, Sordoni, Combes, Trischler, Bengio, Gordon. "An Empirical Study of Example Forgetting
    during Deep Neural Network Learning." ICLR 2019.
  """

  def init(ids: Any) -> ForgettingState:
    ids_N = _sorted_ids(ids)
    n = ids_N.shape[0]
    return ForgettingState(ids_N, jnp.zeros(n, jnp.int32), jnp.zeros(n, bool), jnp.zeros(n, bool),
                           jnp.zeros(n, jnp.int32))

  def update(state: ForgettingState, batch: Batch, logits_BxC: jax.Array) -> ForgettingState:
    pos_B = positions(state.ids, batch)
    valid_B = _valid(batch, logits_BxC)
    correct_B = _correct(batch, logits_BxC)
    prev_B = state.prev_correct.at[pos_B].get(mode="fill", fill_value=False)
    learned_B = state.learned.at[pos_B].get(mode="fill", fill_value=False) | correct_B
    old_B = state.forgets.at[pos_B].get(mode="fill", fill_value=0)
    forgets_B = jnp.where((old_B < 0) | ~valid_B, -1,  # sticky: once invalid, read as NaN
                          old_B + (prev_B & ~correct_B).astype(jnp.int32))
    return ForgettingState(
        state.ids,
        state.presented.at[pos_B].add(1, mode="drop"),
        state.prev_correct.at[pos_B].set(correct_B, mode="drop"),
        state.learned.at[pos_B].set(learned_B, mode="drop"),
        state.forgets.at[pos_B].set(forgets_B, mode="drop"))

  return Tracker(init, update, ForgettingState.scores)


# ----------------------------------------------------------------------------------------------
# Dataset cartography (Swayamdipta et al. 2020).
# ----------------------------------------------------------------------------------------------


class CartographyState(NamedTuple):
  ids: jax.Array        # [N] sorted example ids
  count: jax.Array      # i32[N] presentations
  mean: jax.Array       # f32[N] running mean of p(y | x)
  m2: jax.Array         # f32[N] running sum of squared deviations (Welford)
  correct: jax.Array    # i32[N] presentations classified correctly

  def confidence(self) -> Scores:
    """Mean probability of the label over presentations, f32[N] (0 if never presented).
    LOW means hard."""
    return self.mean

  def variability(self) -> Scores:
    """Standard deviation (population, ddof 0) of the label's probability, f32[N]. High means
    ambiguous."""
    return jnp.sqrt(jnp.maximum(self.m2, 0.0) / jnp.maximum(self.count, 1))

  def correctness(self) -> Scores:
    """Fraction of presentations classified correctly, f32[N]."""
    return self.correct / jnp.maximum(self.count, 1).astype(jnp.float32)


def cartography() -> Tracker:
  """Dataset cartography: mean (confidence) and spread (variability) of ``p(y | x)`` over training.

  ``update(state, batch, logits_BxC)`` adds one presentation. Easy-to-learn examples have high
  confidence and low variability, hard-to-learn ones low confidence, ambiguous ones high
  variability. Statistics use Welford's update, exact for any number of presentations.

  References:
    Swayamdipta et al. "Dataset Cartography: Mapping and Diagnosing Datasets with Training
    Dynamics." EMNLP 2020.
  """

  def init(ids: Any) -> CartographyState:
    ids_N = _sorted_ids(ids)
    n = ids_N.shape[0]
    return CartographyState(ids_N, jnp.zeros(n, jnp.int32), jnp.zeros(n, jnp.float32),
                            jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32))

  def update(state: CartographyState, batch: Batch, logits_BxC: jax.Array) -> CartographyState:
    pos_B = positions(state.ids, batch)
    valid_B = _valid(batch, logits_BxC)
    probs_BxC = jax.nn.softmax(as_float(logits_BxC), axis=-1)
    y_B = jnp.where(valid_B, batch["y"], 0)[:, None].astype(jnp.int32)
    p_B = jnp.take_along_axis(probs_BxC, y_B, axis=-1)[:, 0]
    p_B = jnp.where(valid_B, p_B, jnp.nan).astype(state.mean.dtype)
    count_B = state.count.at[pos_B].get(mode="fill", fill_value=0) + 1
    mean_B = state.mean.at[pos_B].get(mode="fill", fill_value=0.0)
    m2_B = state.m2.at[pos_B].get(mode="fill", fill_value=0.0)
    delta_B = p_B - mean_B
    new_mean_B = mean_B + delta_B / count_B
    new_m2_B = m2_B + delta_B * (p_B - new_mean_B)
    return CartographyState(
        state.ids,
        state.count.at[pos_B].set(count_B, mode="drop"),
        state.mean.at[pos_B].set(new_mean_B, mode="drop"),
        state.m2.at[pos_B].set(new_m2_B, mode="drop"),
        state.correct.at[pos_B].add(_correct(batch, logits_BxC).astype(jnp.int32), mode="drop"))

  return Tracker(init, update, CartographyState.confidence)


# ----------------------------------------------------------------------------------------------
# Area under the margin (Pleiss et al. 2020) and running means.
# ----------------------------------------------------------------------------------------------


class MeanState(NamedTuple):
  ids: jax.Array      # [N] sorted example ids
  total: jax.Array    # f32[N] sum of the values
  count: jax.Array    # i32[N] number of values

  def mean(self) -> Scores:
    """The mean value of each example, f32[N] (0 if it never had one)."""
    return self.total / jnp.maximum(self.count, 1).astype(self.total.dtype)


def _mean_init(ids: Any) -> MeanState:
  ids_N = _sorted_ids(ids)
  n = ids_N.shape[0]
  return MeanState(ids_N, jnp.zeros(n, jnp.float32), jnp.zeros(n, jnp.int32))


def _mean_add(state: MeanState, batch: Batch, values_B: jax.Array) -> MeanState:
  pos_B = positions(state.ids, batch)
  return MeanState(state.ids,
                   state.total.at[pos_B].add(values_B.astype(state.total.dtype), mode="drop"),
                   state.count.at[pos_B].add(1, mode="drop"))


def aum() -> Tracker:
  """Area under the margin: the mean over training of ``z_y - max_{k != y} z_k`` on the logits.

  ``update(state, batch, logits_BxC)`` adds one presentation; ``state.mean()`` is the AUM. LOW means
  hard or mislabeled (Pleiss et al. flag examples below the AUM of deliberately mislabeled
  threshold examples).

  References:
    Pleiss, Zhang, Elenberg, Weinberger. "Identifying Mislabeled Data using the Area Under the
    Margin Ranking." NeurIPS 2020.
  """

  def update(state: MeanState, batch: Batch, logits_BxC: jax.Array) -> MeanState:
    valid_B = _valid(batch, logits_BxC)
    y_B = jnp.where(valid_B, batch["y"], 0)
    return _mean_add(state, batch, jnp.where(valid_B, margin_from_logits(logits_BxC, y_B),
                                             jnp.nan))

  return Tracker(_mean_init, update, MeanState.mean)


def running_mean() -> Tracker:
  """The mean of any per-example score over updates: ``update(state, batch, scores_B)``.

  Averages EL2N or GraNd over checkpoints or seeds as Paul et al. do, when each checkpoint's scores
  arrive batch by batch; ``state.mean()`` reads the average.

  References:
    Paul, Ganguli, Dziugaite. "Deep Learning on a Data Diet: Finding Important Examples Early in
    Training." NeurIPS 2021.
  """
  return Tracker(_mean_init, _mean_add, MeanState.mean)


def average_over_checkpoints(score_fn: Callable[..., Scores], apply_fn: ApplyFn,
                             stacked_params: Params, batch: Batch, **kwargs: Any) -> Scores:
  """The mean of ``score_fn(apply_fn, params, batch)`` over checkpoints or seeds.

  Args:
    score_fn: a per-batch score such as :func:`prunejax.scores.el2n` or
      :func:`prunejax.scores.grand`.
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    stacked_params: the params of ``K`` checkpoints stacked along a new leading axis (e.g.
      ``jax.tree.map(lambda *p: jnp.stack(p), *params_list)``); evaluated one at a time.
    batch: ``x``, ``y`` and optionally ``mask``.
    **kwargs: passed to ``score_fn``.

  Returns:
    f32[B], the mean over the ``K`` checkpoints; 0 on padding rows.

  References:
    Paul, Ganguli, Dziugaite. NeurIPS 2021 (EL2N and GraNd averaged over 10 seeds).
  """
  per_ckpt = lax.map(lambda p: score_fn(apply_fn, p, batch, **kwargs), stacked_params)
  return jnp.mean(per_ckpt, axis=0)
