"""The contracts shared by both wings of prunejax.

Data pruning and model pruning speak the same language:

* ``ApplyFn``: ``apply_fn(params, x) -> logits_BxC``. ``params`` is any pytree the function is
  differentiated with respect to; state that must not be differentiated (BatchNorm statistics) is
  either passed inside ``params`` under ``jax.lax.stop_gradient`` (see
  :func:`prunejax.models.make_apply_fn`) or kept out of it. Params are always arguments, never captured
  in a closure, so a jitted score does not re-compile for every checkpoint.
* ``Batch``: a dict with at least ``x`` and ``y`` (int labels), and in prunejax pipelines always ``id``
  (stable int example ids) and ``mask`` (bool, False on padding rows).
* ``Scores``: ``f32[B]``, one per example, 0 on padding rows.
* ``Mask``: a pytree of bools with exactly the structure of the params.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Protocol

import jax
import jax.numpy

PyTree = Any
Params = PyTree
Mask = PyTree
Batch = Mapping[str, jax.Array]
Scores = jax.Array


class ApplyFn(Protocol):
  """``apply_fn(params, x) -> logits[B, C]``."""

  def __call__(self, params: Params, x: Any) -> jax.Array:
    ...


FilterFn = Callable[[tuple, jax.Array], bool]


def batch_mask(batch: Batch, n: int) -> jax.Array:
  """``batch["mask"]`` as bools (False on padding rows), or all True when the batch has no mask."""
  return batch["mask"].astype(bool) if "mask" in batch else jax.numpy.ones((n,), bool)
"""``filter_fn(path, leaf) -> bool``: whether a parameter leaf is prunable."""
