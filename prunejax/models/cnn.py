"""A small convolutional network: conv-relu-pool blocks, a hidden dense layer and a head."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from prunejax.models.precision import at_least_float32, module_dtypes


class CNN(nn.Module):
  """``[Conv3x3(f) -> ReLU -> MaxPool2]`` for f in ``features``, Dense(``dense``)+ReLU, Dense head.

  ``compute_dtype`` and ``param_dtype`` are as in :mod:`prunejax.models.precision`; the logits are
  float32.
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  dense: int = 128
  compute_dtype: Any = None
  param_dtype: Any = "float32"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    del train, mask
    cd, pd = module_dtypes(self)
    h = x.astype(cd or jnp.float32)
    for i, f in enumerate(self.features):
      h = nn.relu(nn.Conv(f, (3, 3), padding="SAME", dtype=cd, param_dtype=pd,
                          name=f"conv_{i}")(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    h = h.reshape((h.shape[0], -1))
    h = nn.relu(nn.Dense(self.dense, dtype=cd, param_dtype=pd, name="dense_0")(h))
    return at_least_float32(nn.Dense(self.num_classes, dtype=cd, param_dtype=pd, name="head")(h))
