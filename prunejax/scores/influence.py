"""Selections by gradient similarity: TracIn and LESS.

* :func:`tracin`: ``sum_c lr_c <g_i(c), t(c)>`` over saved checkpoints ``c`` (target influence,
  with :func:`prunejax.scores.gradient_dot`), or ``sum_c lr_c ||g_i(c)||^2`` (self-influence, with
  the ghost norms of :func:`prunejax.scores.grand`); both at about a train step per checkpoint.
* :func:`less`: cosine similarity of each training example's gradient features
  (:func:`prunejax.scores.gradient_features`) to the target examples' features, reduced over the
  targets by ``max`` or ``mean`` (or LESS's mean within each target task, max over tasks), summed
  over checkpoints with their learning rates.

High means "keep" for both (most influential on, or most similar to, the target), so in
:mod:`prunejax.select` terms high is ``keep="hard"``. High self-influence marks examples that are
hard to fit, often mislabeled (Pruthi et al. 2020).

References:
  Pruthi, Liu, Kale, Sundararajan. "Estimating Training Data Influence by Tracing Gradient
  Descent." NeurIPS 2020 (TracIn, TracInCP).
  Xia, Malladi, Gururangan, Arora, Chen. "LESS: Selecting Influential Data for Targeted
  Instruction Tuning." ICML 2024.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError, DataError, check_choice, check_positive_int
from prunejax.scores.gradient_dot import gradient_dot
from prunejax.types import ApplyFn, Batch, Params, Scores

grand_lib = importlib.import_module("prunejax.scores.grand")

__all__ = ["REDUCTIONS", "less", "tracin"]

REDUCTIONS = ("max", "mean")


def _learning_rates(field: str, learning_rates: Any, n: int) -> list[float]:
  lrs = [learning_rates] * n if np.ndim(learning_rates) == 0 else list(learning_rates)
  if len(lrs) != n:
    raise ConfigError(f"{field} has {len(lrs)} values for {n} checkpoints; give one per checkpoint")
  for lr in lrs:
    if not np.isfinite(float(lr)) or float(lr) < 0:
      raise ConfigError(f"{field}={lr!r} is not allowed; expected a finite value >= 0")
  return [float(lr) for lr in lrs]


def tracin(apply_fn: ApplyFn, checkpoints: Sequence[Params], learning_rates: Any, batch: Batch,
           targets: Sequence[Params] | None = None, *, chunk_size: int = 32) -> Scores:
  """TracInCP: each example's influence summed over checkpoints with their learning rates.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``, any JAX function whose rows are independent.
    checkpoints: the saved parameters ``params_c`` (same structure and shapes).
    learning_rates: ``lr_c``, one per checkpoint or one for all (the learning rate in effect
      around each checkpoint).
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.
    targets: one gradient pytree per checkpoint (e.g. :func:`prunejax.scores.mean_gradient` of a
      validation set at that checkpoint): target influence ``sum_c lr_c <g_i(c), t(c)>``. None:
      self-influence ``sum_c lr_c ||g_i(c)||^2``.
    chunk_size: see :func:`prunejax.scores.grand`.

  Returns:
    f32[B]: 0 on padding rows, NaN on real rows whose label is outside ``[0, C)``.

  Raises:
    ConfigError: no checkpoint, learning rates of another count or negative or non-finite, or
      targets of another count than the checkpoints.
    DataError: a target is not shaped like the parameters.

  References:
    Pruthi et al. NeurIPS 2020.
  """
  checkpoints = list(checkpoints)
  if not checkpoints:
    raise ConfigError("tracin.checkpoints is empty; pass at least one saved checkpoint")
  lrs = _learning_rates("tracin.learning_rates", learning_rates, len(checkpoints))
  if targets is not None:
    targets = list(targets)
    if len(targets) != len(checkpoints):
      raise ConfigError(f"tracin.targets has {len(targets)} gradients for {len(checkpoints)} "
                        "checkpoints; give one per checkpoint (or None for self-influence)")
  total_B = None
  for c, (params, lr) in enumerate(zip(checkpoints, lrs)):
    if targets is None:
      s_B = jnp.square(grand_lib.grand(apply_fn, params, batch, chunk_size=chunk_size))
    else:
      s_B = gradient_dot(apply_fn, params, batch, targets[c])
    total_B = lr * s_B if total_B is None else total_B + lr * s_B
  return total_B


def _features_list(field: str, features: Any) -> list[np.ndarray]:
  """Features of each checkpoint, ``[N, D]`` each."""
  if isinstance(features, (list, tuple)):
    feats = [np.asarray(f) for f in features]
  else:
    feats = [np.asarray(features)]
  if not feats:
    raise DataError(f"{field} is empty; pass [N, D] features (or one array per checkpoint)")
  for c, f in enumerate(feats):
    if f.ndim != 2 or not np.issubdtype(f.dtype, np.floating):
      raise DataError(f"{field}[{c}] has dtype {f.dtype} and shape {f.shape}; expected float "
                      "[N, D] features")
    if f.shape != feats[0].shape:
      raise DataError(f"{field}[{c}] has shape {f.shape}; checkpoint 0 has {feats[0].shape}")
  return feats


def _unit_rows(f_NxD: jax.Array) -> jax.Array:
  """Rows scaled to norm 1; rows of norm 0 (padding, no gradient) stay 0."""
  norm_N = jnp.sqrt(jnp.sum(jnp.square(f_NxD), -1, keepdims=True))
  return jnp.where(norm_N > 0, f_NxD / jnp.where(norm_N > 0, norm_N, 1.0), 0.0)


def less(train_features: Any, target_features: Any, *, reduce: str = "max",
         target_groups: Any = None, learning_rates: Any = 1.0,
         chunk_size: int = 4096) -> np.ndarray:
  """LESS scores: cosine similarity of each training example's gradient features to the targets'.

  ``score_i = sum_c lr_c R_j cos(f_i(c), t_j(c))`` with ``R`` the max or the mean over the target
  examples ``j``, or, with ``target_groups``, the mean within each group (a target task) and the
  max over groups, as LESS does.

  Args:
    train_features: ``[N, D]`` features of the training examples
      (:func:`prunejax.scores.gradient_features`, with Adam's state for LESS), or a list of them,
      one per checkpoint; rows are examples in any order (scores follow it).
    target_features: ``[M, D]`` features of the target examples (LESS: plain gradient features of
      the validation examples), or a list, one per checkpoint.
    reduce: ``"max"`` or ``"mean"`` over the target examples (within groups: always the mean, max
      over groups).
    target_groups: optional int ``[M]`` task of each target example.
    learning_rates: one per checkpoint, or one for all.
    chunk_size: training rows compared at once.

  Returns:
    f32[N]: a row of zeros (a padding row, no gradient) scores 0; a row with a NaN or inf scores
    NaN.

  Raises:
    DataError: features of another rank, dtype or width, targets empty or not finite, groups of
      another length or not integers.
    ConfigError: ``reduce``, ``chunk_size`` or ``learning_rates`` not allowed.

  References:
    Xia et al. "LESS: Selecting Influential Data for Targeted Instruction Tuning." ICML 2024.
  """
  check_choice("less.reduce", reduce, REDUCTIONS)
  check_positive_int("less.chunk_size", chunk_size)
  train = _features_list("less.train_features", train_features)
  target = _features_list("less.target_features", target_features)
  _check_targets(train, target)
  lrs = _learning_rates("less.learning_rates", learning_rates, len(train))
  weights_MxK = None if target_groups is None else _group_weights(target_groups,
                                                                  target[0].shape[0])
  n = train[0].shape[0]
  total = np.zeros(n, np.float32)
  for f, t, lr in zip(train, target, lrs):
    t_unit = jnp.asarray(t)
    for start in range(0, n, chunk_size):
      total[start:start + chunk_size] += lr * np.asarray(_cosine_scores(
          jnp.asarray(f[start:start + chunk_size]), t_unit, weights_MxK, reduce))
  finite_N = np.all(np.stack([np.all(np.isfinite(f), 1) for f in train]), 0)
  total[~finite_N] = np.nan  # a non-finite row would otherwise count as a zero row.
  return total


def _check_targets(train: list[np.ndarray], target: list[np.ndarray]) -> None:
  """One target per checkpoint, at least one row, the train features' width, all finite."""
  if len(train) != len(target):
    raise DataError(f"less: {len(train)} checkpoints of train_features but {len(target)} of "
                    "target_features")
  if target[0].shape[0] == 0:
    raise DataError("less.target_features has no rows; pass at least one target example")
  if target[0].shape[1] != train[0].shape[1]:
    raise DataError(f"less.target_features has {target[0].shape[1]} features per row; "
                    f"train_features has {train[0].shape[1]}")
  for c, t in enumerate(target):
    if not np.all(np.isfinite(t)):
      raise DataError(f"less.target_features[{c}] has non-finite values in rows "
                      f"{np.nonzero(~np.all(np.isfinite(t), 1))[0][:5].tolist()}")


def _group_weights(target_groups: Any, m: int) -> np.ndarray:
  """f32[M, K]: column ``k`` averages the targets of group ``k`` (LESS's mean within a task)."""
  groups = np.asarray(target_groups)
  if groups.shape != (m,) or not np.issubdtype(groups.dtype, np.integer):
    raise DataError(f"less.target_groups has dtype {groups.dtype} and shape {groups.shape}; "
                    f"expected int [{m}]")
  _, inverse = np.unique(groups, return_inverse=True)
  onehot_MxK = np.eye(inverse.max() + 1, dtype=np.float32)[inverse]
  onehot_MxK /= onehot_MxK.sum(0, keepdims=True)
  return onehot_MxK


@functools.partial(jax.jit, static_argnames="reduce")
def _cosine_scores(f_NxD: jax.Array, t_MxD: jax.Array, weights_MxK: jax.Array | None,
                   reduce: str) -> jax.Array:
  """f32[N]: each row's cosine similarities to the targets, reduced by ``reduce`` (or averaged
  within the groups of ``weights_MxK``, then the max over groups)."""
  cos_NxM = _unit_rows(f_NxD.astype(jnp.float32)) @ _unit_rows(t_MxD.astype(jnp.float32)).T
  if weights_MxK is not None:
    return jnp.max(cos_NxM @ weights_MxK, -1)
  return jnp.max(cos_NxM, -1) if reduce == "max" else jnp.mean(cos_NxM, -1)
