"""Least confidence: how unsure the model is of its top class, one forward pass."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunejax.losses import as_float
from prunejax.scores.output import _logits
from prunejax.types import ApplyFn, Batch, Params, Scores, batch_mask


def least_confidence(apply_fn: ApplyFn, params: Params, batch: Batch) -> Scores:
  """``1 - max_k softmax(f(x))_k`` per example. High means uncertain (hard). Labels are not used.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: the parameters ``apply_fn`` takes.
    batch: ``x`` and optionally ``mask``.

  Returns:
    f32[B], 0 on padding rows.

  References:
    Coleman et al. "Selection via Proxy: Efficient Data Selection for Deep Learning." ICLR 2020
    (least-confidence uncertainty sampling).
  """
  probs_BxC = jax.nn.softmax(as_float(_logits(apply_fn, params, batch)), axis=-1)
  scores_B = 1.0 - jnp.max(probs_BxC, axis=-1)
  return jnp.where(batch_mask(batch, scores_B.shape[0]), scores_B, 0.0)
