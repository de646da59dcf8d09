"""Masked optimizers: an optax transformation that keeps pruned weights at exactly zero.

The mask rides in the optimizer state (:class:`MaskedState`), so it is checkpointed and sharded with
it, and can be recomputed on a sparsity schedule inside a jitted train step. The state and its
accessors (:func:`get_mask`, :func:`set_mask`) are defined in :mod:`prunejax.masks.masked_state`
and re-exported here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from prunejax.errors import ConfigError
from prunejax.masks.core import check_mask, ones_mask, reshard_like
from prunejax.masks.masked_state import MaskedState, get_mask, set_mask  # re-exported
from prunejax.schedules import Schedule
from prunejax.types import Mask, Params

MaskFn = Callable[[Params, jax.Array], Mask]


def masked(tx: optax.GradientTransformation, mask: Mask | None = None, *,
           mask_fn: MaskFn | None = None,
           schedule: Schedule | None = None) -> optax.GradientTransformation:
  """Wraps ``tx`` so that pruned weights (mask False) stay exactly zero through every update.

  Gradients of pruned weights are zeroed before ``tx`` (so momentum and Adam moments do not grow
  from them), and their final update is exactly ``-param``: ``optax.apply_updates`` then yields
  ``param + (-param) == 0`` exactly, whatever ``tx`` computed (weight decay, momentum from before
  pruning) and even if the weight was not zero when it was pruned. Kept weights get ``tx``'s update
  unchanged.

  With ``mask_fn`` and ``schedule`` the mask is recomputed inside ``update`` as
  ``mask_fn(params, schedule(count))`` at every update count where the schedule's value changes
  (``schedule(count) != schedule(count - 1)``), from the params before that update. For example
  ``mask_fn=functools.partial(prunejax.masks.magnitude, scope="global")`` with
  ``schedule=prunejax.schedules.polynomial(0.9, 0, 1000)`` is gradual magnitude pruning.

  Args:
    tx: the inner optimizer.
    mask: the initial mask (default: keep everything).
    mask_fn: ``mask_fn(params, sparsity) -> mask``, called with a traced sparsity.
    schedule: ``schedule(count) -> sparsity``; needed with ``mask_fn``.

  Returns:
    A ``GradientTransformation`` whose state is a :class:`MaskedState`; ``update`` needs ``params``.

  Raises:
    ConfigError: (at ``init`` / ``update``) a mask whose structure or leaf shapes differ from the
      params' (a ``(1, n)`` mask is never broadcast over ``(m, n)`` weights), or non-bool leaves.

  References:
    Lee et al. 2022, "JaxPruner: A concise library for sparsity research" (masks in the optimizer
    state); Zhu and Gupta 2017 (gradual pruning inside training).
  """
  if (mask_fn is None) != (schedule is None):
    raise ConfigError("masked: mask_fn and schedule go together (give both or neither)")

  def init_fn(params):
    if mask is None:
      m = ones_mask(params)
    else:
      check_mask(mask, params, "masked: mask")
      m = jax.tree.map(reshard_like, mask, params)
    return MaskedState(tx.init(params), m, jnp.zeros((), jnp.int32))

  def update_fn(updates, state, params=None):
    return _masked_update(tx, mask_fn, schedule, updates, state, params)

  return optax.GradientTransformation(init_fn, update_fn)


def _masked_update(tx, mask_fn, schedule, updates, state: MaskedState, params):
  """The ``update`` of :func:`masked`."""
  if params is None:
    raise ConfigError("masked(...).update needs params (pruned weights are set to -params)")
  check_mask(state.mask, params, "masked: the state's mask")
  check_mask(updates, params, "masked: the updates", bool_leaves=False)
  m = state.mask
  if mask_fn is not None:

    def new_mask():
      fresh = mask_fn(params, s_now)
      check_mask(fresh, params, "masked: mask_fn's mask")
      return jax.tree.map(reshard_like, fresh, params)

    s_now, s_prev = schedule(state.count), schedule(state.count - 1)
    m = jax.lax.cond(s_now != s_prev, new_mask, lambda: m)
  grads = jax.tree.map(lambda g, k: jnp.where(reshard_like(k, g), g, jnp.zeros_like(g)),
                       updates, m)
  inner_updates, inner_state = tx.update(grads, state.inner_state, params)
  new_updates = jax.tree.map(
      lambda u, p, k: jnp.where(reshard_like(k, u), u, -p).astype(u.dtype), inner_updates,
      params, m)
  return new_updates, MaskedState(inner_state, m, state.count + 1)
