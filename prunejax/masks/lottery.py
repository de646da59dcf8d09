"""Lottery-ticket building blocks: save a rewind point and rewind to it with the current mask.

Iterative magnitude pruning with rewinding (Frankle et al. 2020) trains, prunes a fraction of the
remaining weights, resets the surviving weights to their values at an early step ``k`` and trains
again. These functions are the reset; the loop lives in an experiment.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from prunejax.masks.core import apply_mask
from prunejax.masks.masked_state import set_mask
from prunejax.errors import ConfigError
from prunejax.types import Mask, Params


class RewindPoint(NamedTuple):
  """Weights (and optionally optimizer state) at a training step."""

  step: Any
  params: Params
  opt_state: optax.OptState | None = None


def save_rewind_point(step: Any, params: Params, opt_state: optax.OptState | None = None
                      ) -> RewindPoint:
  """A copy of ``params`` (and ``opt_state``) at ``step``, safe against donated buffers."""
  copy = lambda t: jax.tree.map(lambda x: x.copy() if hasattr(x, "copy") else x, t)
  return RewindPoint(step, copy(params), None if opt_state is None else copy(opt_state))


def rewind(point: RewindPoint, mask: Mask, tx: optax.GradientTransformation | None = None,
           opt_state: optax.OptState | None = None, *, reset_optimizer: bool = True
           ) -> tuple[Params, optax.OptState | None]:
  """The rewind point's weights with ``mask`` applied, and an optimizer state to continue with.

  Args:
    point: from :func:`save_rewind_point`.
    mask: the current mask; pruned weights become exactly zero.
    tx: the optimizer; needed when ``reset_optimizer`` is True.
    opt_state: the optimizer state to keep when ``reset_optimizer`` is False and ``point`` saved
      none (otherwise the saved one is restored).
    reset_optimizer: re-initialize the optimizer state with ``tx.init`` (as OpenLTH does) instead
      of keeping one.

  Returns:
    ``(params, opt_state)``. If the optimizer state holds a
    :class:`prunejax.masks.masked_state.MaskedState`, its mask is set to ``mask``.

  References:
    Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis".
  """
  params = apply_mask(point.params, mask)
  if reset_optimizer:
    if tx is None:
      raise ConfigError("rewind(reset_optimizer=True) needs tx")
    state = tx.init(params)
  else:
    state = point.opt_state if point.opt_state is not None else opt_state
  if state is not None:
    state = set_mask(state, mask)
  return params, state


def rewind_state(train_state: Any, point: RewindPoint, mask: Mask, *,
                 reset_optimizer: bool = True) -> Any:
  """:func:`rewind` for a :class:`prunejax.train.TrainState`; its step goes back to the point's."""
  params, opt_state = rewind(point, mask, train_state.tx, train_state.opt_state,
                             reset_optimizer=reset_optimizer)
  return train_state.replace(step=jax.numpy.asarray(point.step, train_state.step.dtype),
                             params=params, opt_state=opt_state)
