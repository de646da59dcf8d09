"""The one cross-entropy of prunejax, and the masked mean every loss and metric uses.

Training, the output scores (EL2N aside), GraNd and the gradient-based masks all call
:func:`cross_entropy`, so a score, a mask and the training loss agree to the last bit on what "the
loss of an example" is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from prunejax.errors import ConfigError
from prunejax.types import Batch, batch_mask


def as_float(x: jax.Array) -> jax.Array:
  """``x`` in float32, or in its own dtype when that is wider (float64 references)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def check_labels(y_B: jax.Array) -> None:
  """Labels must be integers: a float label is an error, never silently truncated."""
  if not jnp.issubdtype(jnp.result_type(y_B), jnp.integer):
    raise ConfigError(f"labels must be integers; got dtype {jnp.result_type(y_B)}")


def cross_entropy(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
  """Per-example cross-entropy ``logsumexp(z) - z_y``, f32[B] (float64 for float64 logits).

  A label outside ``[0, C)`` gives NaN for its row, never a plausible number; float labels raise
  :class:`~prunejax.errors.ConfigError`.
  """
  check_labels(y_B)
  valid_B = (y_B >= 0) & (y_B < logits_BxC.shape[-1])
  ce_B = optax.softmax_cross_entropy_with_integer_labels(as_float(logits_BxC), y_B)
  return jnp.where(valid_B, ce_B, jnp.nan)


def masked_mean(values_B: jax.Array, batch: Batch, *, weighted: bool = True) -> jax.Array:
  """``sum_i mask_i w_i v_i / sum_i mask_i``: padding rows add nothing, and ``batch["weight"]``
  (when present and ``weighted``) scales each example (InfoBatch's rescaling)."""
  mask_B = batch_mask(batch, values_B.shape[0]).astype(values_B.dtype)
  w_B = mask_B * batch["weight"] if weighted and "weight" in batch else mask_B
  return jnp.sum(jnp.where(mask_B > 0, values_B * w_B, 0.0)) / jnp.maximum(mask_B.sum(), 1.0)
