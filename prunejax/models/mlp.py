"""Multi-layer perceptron; LeNet-300-100 by default (LeCun et al. 1998)."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from prunejax.models.precision import at_least_float32, module_dtypes


class MLP(nn.Module):
  """Flatten, then Dense+ReLU for each width in ``hidden``, then a Dense head of ``num_classes``.

  ``compute_dtype`` and ``param_dtype`` are as in :mod:`prunejax.models.precision`; the logits are
  float32.
  """

  num_classes: int = 10
  hidden: Sequence[int] = (300, 100)
  compute_dtype: Any = None
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    del train, mask
    cd, pd = module_dtypes(self)
    h = x.reshape((x.shape[0], -1)).astype(cd or jnp.float32)
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, dtype=cd, param_dtype=pd, name=f"dense_{i}")(h))
    return at_least_float32(nn.Dense(self.num_classes, dtype=cd, param_dtype=pd, name="head")(h))
