"""Scores read off the model's output: EL2N, loss, margin and entropy.

Each is ``fn(apply_fn, params, batch) -> f32[B]``, one forward pass, 0 on padding rows (``mask``
False) and NaN on real rows whose label is outside ``[0, C)``; float labels are an error. They are
computed in float32, or in the logits' dtype when it is wider (float64 tests). The label checks
(:func:`checked_labels`, :func:`finish_scores`) are shared with :mod:`prunejax.scores.grand`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunejax.errors import DataError
from prunejax.losses import as_float, cross_entropy
from prunejax.types import ApplyFn, Batch, Params, Scores, batch_mask


def checked_labels(y_B: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """``(y_B, valid_B)``: the labels with those outside ``[0, num_classes)`` replaced by 0 (so they
  index safely), and which were inside.

  Raises:
    DataError: the labels are not integers (a float label would otherwise be truncated).
  """
  dtype = jnp.result_type(y_B)
  if not jnp.issubdtype(dtype, jnp.integer):
    raise DataError(f"batch['y'] has dtype {dtype}; labels must be integers in [0, {num_classes})")
  valid_B = (y_B >= 0) & (y_B < num_classes)
  return jnp.where(valid_B, y_B, 0), valid_B


def check_batch(batch: Batch) -> int:
  """The batch size ``B``, after checking that ``y``, ``mask`` and ``id`` (where present) are one
  value per row of ``x`` and ``mask`` is bool or integer (shapes are static: this runs at trace
  time, so a mismatch is one :class:`DataError` instead of a broadcasting error from inside JAX).
  """
  if "x" not in batch:
    raise DataError(f"a batch needs 'x'; got keys {sorted(batch)}")
  leaves = jax.tree.leaves(batch["x"])
  if not leaves or not jnp.ndim(leaves[0]):
    raise DataError("batch['x'] must have a leading example axis")
  b = jnp.shape(leaves[0])[0]
  for key in ("y", "mask", "id"):
    if key in batch and jnp.shape(batch[key]) != (b,):
      raise DataError(f"batch[{key!r}] has shape {tuple(jnp.shape(batch[key]))}; expected ({b},), "
                      f"one value per row of batch['x']")
  if "mask" in batch:
    dtype = jnp.result_type(batch["mask"])
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
      raise DataError(f"batch['mask'] has dtype {dtype}; expected bool (False on padding rows)")
  return b


def finish_scores(scores_B: jax.Array, batch: Batch, valid_B: jax.Array) -> Scores:
  """0 on padding rows, NaN on real rows with a label outside the classes, else ``scores_B``."""
  real_B = batch["mask"].astype(bool) if "mask" in batch else jnp.ones_like(scores_B, bool)
  return jnp.where(real_B, jnp.where(valid_B, scores_B, jnp.nan), 0.0)


def _logits(apply_fn: ApplyFn, params: Params, batch: Batch) -> jax.Array:
  check_batch(batch)
  try:
    jax.eval_shape(apply_fn, params, batch["x"])  # shapes only: nothing runs twice
  except (TypeError, ValueError, KeyError, IndexError) as e:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    raise DataError(f"apply_fn(params, x) fails on batch['x'] of shape "
                    f"{jax.tree.map(jnp.shape, batch['x'])} ({type(e).__name__}: {first}); does "
                    f"the batch match the model?") from e
  return as_float(apply_fn(params, batch["x"]))


def el2n_from_logits(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
  """``||softmax(z) - onehot(y)||_2`` per example."""
  logits_BxC = as_float(logits_BxC)
  error_BxC = jax.nn.softmax(logits_BxC, axis=-1) - jax.nn.one_hot(
      y_B, logits_BxC.shape[-1], dtype=logits_BxC.dtype)
  return jnp.sqrt(jnp.sum(jnp.square(error_BxC), axis=-1))


def margin_from_logits(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
  """``z_y - max_{k != y} z_k`` per example."""
  logits_BxC = as_float(logits_BxC)
  onehot_BxC = jax.nn.one_hot(y_B, logits_BxC.shape[-1], dtype=bool)
  logit_y_B = jnp.sum(jnp.where(onehot_BxC, logits_BxC, 0.0), axis=-1)
  other_B = jnp.max(jnp.where(onehot_BxC, -jnp.inf, logits_BxC), axis=-1)
  return logit_y_B - other_B


def el2n(apply_fn: ApplyFn, params: Params, batch: Batch) -> Scores:
  """EL2N: the L2 norm of the error vector, ``||softmax(f(x)) - onehot(y)||_2``.

  High means hard. Paul et al. average it over several early checkpoints or seeds; see
  :func:`prunejax.scores.dynamics.average_over_checkpoints`.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: the parameters ``apply_fn`` takes.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.

  Returns:
    f32[B], 0 on padding rows, NaN on rows whose label is outside ``[0, C)``.

  References:
    Paul, Ganguli, Dziugaite. "Deep Learning on a Data Diet: Finding Important Examples Early in
    Training." NeurIPS 2021.
  """
  logits_BxC = _logits(apply_fn, params, batch)
  y_B, valid_B = checked_labels(batch["y"], logits_BxC.shape[-1])
  scores_B = el2n_from_logits(logits_BxC, y_B)
  return finish_scores(scores_B, batch, valid_B)


def loss(apply_fn: ApplyFn, params: Params, batch: Batch) -> Scores:
  """Cross-entropy of each example, ``logsumexp(f(x)) - f(x)_y``. High means hard.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: the parameters ``apply_fn`` takes.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.

  Returns:
    f32[B], 0 on padding rows, NaN on rows whose label is outside ``[0, C)``.

  References:
    Toneva et al. "An Empirical Study of Example Forgetting during Deep Neural Network Learning."
    ICLR 2019 (loss as a baseline ranking).
  """
  logits_BxC = _logits(apply_fn, params, batch)
  y_B, valid_B = checked_labels(batch["y"], logits_BxC.shape[-1])
  scores_B = cross_entropy(logits_BxC, y_B)
  return finish_scores(scores_B, batch, valid_B)


def margin(apply_fn: ApplyFn, params: Params, batch: Batch) -> Scores:
  """Logit margin: the logit of the label minus the largest other logit. LOW means hard.

  Negative when the example is misclassified. Select with ``-margin`` to keep hard examples
  (:mod:`prunejax.select` treats high scores as hard).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: the parameters ``apply_fn`` takes.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.

  Returns:
    f32[B], 0 on padding rows, NaN on rows whose label is outside ``[0, C)``.

  References:
    Pleiss et al. "Identifying Mislabeled Data using the Area Under the Margin Ranking."
    NeurIPS 2020 (the margin whose average over training is AUM).
  """
  logits_BxC = _logits(apply_fn, params, batch)
  y_B, valid_B = checked_labels(batch["y"], logits_BxC.shape[-1])
  scores_B = margin_from_logits(logits_BxC, y_B)
  return finish_scores(scores_B, batch, valid_B)


def entropy(apply_fn: ApplyFn, params: Params, batch: Batch) -> Scores:
  """Entropy of the predicted distribution, ``-sum_k p_k log p_k`` (nats). High means uncertain.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: the parameters ``apply_fn`` takes.
    batch: ``x`` and optionally ``mask`` (``y`` is not used).

  Returns:
    f32[B], 0 on padding rows.

  References:
    Coleman et al. "Selection via Proxy: Efficient Data Selection for Deep Learning." ICLR 2020.
  """
  logits_BxC = _logits(apply_fn, params, batch)
  log_p_BxC = jax.nn.log_softmax(logits_BxC, axis=-1)
  scores_B = -jnp.sum(jnp.exp(log_p_BxC) * log_p_BxC, axis=-1)
  return jnp.where(batch_mask(batch, scores_B.shape[0]), scores_B, 0.0)
