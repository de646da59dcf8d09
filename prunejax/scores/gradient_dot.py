"""Per-example inner products of loss gradients with a fixed direction: the core of TracIn.

``gradient_dot(apply_fn, params, batch, target)`` returns ``<grad_params CE(f(params, x_i), y_i),
target>`` for every row ``i``, where ``target`` is a pytree shaped like ``params`` (e.g. the mean
gradient of a validation set, :func:`mean_gradient`).

How: the per-example losses ``L_B(params)`` have the per-example gradients as the rows of their
Jacobian, so one forward-mode derivative in the direction ``target``,
``jax.jvp(L_B, (params,), (target,))``, is exactly ``[<g_i, target>]_i`` for every layer, whatever
it is (dense, conv, embedding, attention, norms, a weight used twice, a leaf inside ``scan``): no
per-example gradient, no layer analysis, and no activation is stored for a backward pass. Its
cost is the primal pass plus its tangent, about two forward passes (a train step is a forward and
a backward, about three). Sequences need nothing special: a weight shared over tokens gets the sum
of its tokens' contributions, as its gradient does. Like every per-example gradient it assumes an
example's logits do not depend on the other rows (evaluation mode).

References:
  Pruthi, Liu, Kale, Sundararajan. "Estimating Training Data Influence by Tracing Gradient
  Descent." NeurIPS 2020 (TracIn).
  Xia, Malladi, Gururangan, Arora, Chen. "LESS: Selecting Influential Data for Targeted
  Instruction Tuning." ICML 2024.
"""

from __future__ import annotations

import importlib
from typing import Any, Iterable

import jax
import jax.numpy as jnp

from prunejax.errors import DataError
from prunejax.scores.output import finish_scores
from prunejax.types import ApplyFn, Batch, Params, Scores

# The module (the package re-exports its function ``grand`` under the same name).
grand_lib = importlib.import_module("prunejax.scores.grand")

__all__ = ["check_target", "gradient_dot", "mean_gradient"]


def check_target(params: Params, target: Any, field: str = "target") -> list:
  """``target``'s leaves at the float leaves of ``params``, cast to their dtypes.

  ``target`` must have the structure of ``params`` (the leaves at non-float positions of
  ``params``, such as integer step counters, are ignored) and each float leaf its shape.

  Raises:
    DataError: another structure, a leaf of another shape, or a non-float leaf where ``params``
      has a float one; the message names ``field`` and the leaf's path.
  """
  p_paths, p_def = jax.tree_util.tree_flatten_with_path(params)
  try:
    t_leaves = p_def.flatten_up_to(target)
  except (ValueError, TypeError) as e:
    raise DataError(f"{field} must have the pytree structure of params (e.g. jax.grad of a loss "
                    f"with respect to them): {str(e).splitlines()[0]}") from None
  out = []
  for (path, p), t in zip(p_paths, t_leaves):
    if not grand_lib._is_float(p):
      continue
    name = jax.tree_util.keystr(path)
    if not hasattr(t, "shape") or not hasattr(t, "dtype"):
      raise DataError(f"{field}{name} is {type(t).__name__}; expected an array of shape "
                      f"{tuple(jnp.shape(p))}")
    if tuple(t.shape) != tuple(jnp.shape(p)):
      raise DataError(f"{field}{name} has shape {tuple(t.shape)}; params{name} has "
                      f"{tuple(jnp.shape(p))}")
    if not jnp.issubdtype(t.dtype, jnp.floating):
      raise DataError(f"{field}{name} has dtype {t.dtype}; expected a float array")
    out.append(jnp.asarray(t).astype(jnp.result_type(p)))
  return out


def _float_split(params: Params) -> tuple[list, Any, list[int]]:
  leaves, treedef = jax.tree.flatten(params)
  return leaves, treedef, [i for i, leaf in enumerate(leaves) if grand_lib._is_float(leaf)]


def gradient_dot(apply_fn: ApplyFn, params: Params, batch: Batch, target: Params) -> Scores:
  """The exact ``<g_i, target>`` of each example's cross-entropy gradient ``g_i`` with ``target``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``, any JAX function whose rows are independent.
    params: the parameters ``apply_fn`` takes; ``g_i`` is over all their float leaves (leaves
      behind ``stop_gradient``, such as BatchNorm statistics, contribute 0).
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.
    target: a pytree shaped like ``params`` (see :func:`check_target`), e.g. the mean gradient of a
      validation set (:func:`mean_gradient`).

  Returns:
    f32[B] (the params' dtype when wider): 0 on padding rows, NaN on real rows whose label is
    outside ``[0, C)``; a non-finite ``target`` or logit gives NaN where it reaches.

  Raises:
    DataError: ``target`` is not shaped like ``params``; labels are not integers.

  References:
    Pruthi et al. "Estimating Training Data Influence by Tracing Gradient Descent." NeurIPS 2020.
  """
  tangents = check_target(params, target)

  def scores_B(params, batch):
    params = grand_lib._vary_like(params, batch["x"])
    leaves, treedef, float_idx = _float_split(params)
    y_B, valid_B, w_B = grand_lib._labels(apply_fn, params, batch)

    def losses_B(float_leaves):
      vals = list(leaves)
      for i, v in zip(float_idx, float_leaves):
        vals[i] = v
      logits_BxC = apply_fn(jax.tree.unflatten(treedef, vals), batch["x"])
      return grand_lib._example_losses(logits_BxC, y_B, w_B)

    # Inside shard_map the tangents vary over the batch's manual axes like the params.
    _, dot_B = jax.jvp(losses_B, ([leaves[i] for i in float_idx],),
                       (grand_lib._vary_like(tangents, batch["x"]),))
    return finish_scores(dot_B.astype(jnp.promote_types(dot_B.dtype, jnp.float32)), batch,
                         valid_B)

  return grand_lib._auto_axes(scores_B, params, batch)


def mean_gradient(apply_fn: ApplyFn, params: Params, batches: Batch | Iterable[Batch]) -> Params:
  """The gradient of the mean cross-entropy over the real rows (``mask`` True, label in
  ``[0, C)``) of one batch or of a sequence of batches: the usual ``target`` of
  :func:`gradient_dot` (a validation set's gradient).

  Returns:
    A pytree like ``params``: float leaves hold the gradient, other leaves zeros of their shape.

  Raises:
    DataError: no batch, or no real row with a valid label in them.
  """
  batches = [batches] if isinstance(batches, dict) else list(batches)
  if not batches:
    raise DataError("mean_gradient got no batches")
  leaves, treedef, float_idx = _float_split(params)

  @jax.jit
  def summed(float_leaves, batch):
    vals = list(leaves)
    for i, v in zip(float_idx, float_leaves):
      vals[i] = v
    p = jax.tree.unflatten(treedef, vals)
    y_B, _, w_B = grand_lib._labels(apply_fn, p, batch)

    def total(fl):
      vals2 = list(leaves)
      for i, v in zip(float_idx, fl):
        vals2[i] = v
      return jnp.sum(grand_lib._example_losses(
          apply_fn(jax.tree.unflatten(treedef, vals2), batch["x"]), y_B, w_B))

    return jax.grad(total)(float_leaves), jnp.sum(w_B)

  grads, count = None, 0
  for batch in batches:
    g, n = summed([leaves[i] for i in float_idx], batch)
    grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
    count += int(n)
  if count == 0:
    raise DataError("mean_gradient: the batches have no real row with a valid label")
  out = [jnp.zeros(jnp.shape(leaf), jnp.float32) for leaf in leaves]
  for i, g in zip(float_idx, grads):
    out[i] = g / count
  return jax.tree.unflatten(treedef, out)
