"""The mask inside an optimizer state: :class:`MaskedState`, and reading or replacing its mask.

:func:`prunejax.optim.masked` keeps its mask in a :class:`MaskedState`, so the mask is checkpointed
and sharded with the optimizer state. The state and its accessors live here, below the optimizer,
so that rewinding (:mod:`prunejax.masks.lottery`) sets the mask without importing
:mod:`prunejax.optim`; :mod:`prunejax.optim` re-exports them.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from prunejax.masks.core import check_mask, reshard_like
from prunejax.types import Mask


class MaskedState(NamedTuple):
  """State of :func:`prunejax.optim.masked`: the inner optimizer's state, the mask and the number
  of updates."""

  inner_state: optax.OptState
  mask: Mask
  count: jax.Array


def _is_masked_state(x: Any) -> bool:
  return isinstance(x, MaskedState)


def get_mask(opt_state: optax.OptState) -> Mask | None:
  """The mask of the first :class:`MaskedState` inside ``opt_state`` (None if there is none)."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=_is_masked_state) if _is_masked_state(s)]
  return found[0].mask if found else None


def set_mask(opt_state: optax.OptState, mask: Mask) -> optax.OptState:
  """``opt_state`` with the mask of every :class:`MaskedState` inside it replaced by ``mask``.

  Raises:
    ConfigError: ``mask`` does not have the structure and leaf shapes of the mask it replaces.
  """
  def replace(s):
    if not _is_masked_state(s):
      return s
    check_mask(mask, s.mask, "set_mask: mask")
    return s._replace(mask=jax.tree.map(reshard_like, mask, s.mask))

  return jax.tree.map(replace, opt_state, is_leaf=_is_masked_state)
