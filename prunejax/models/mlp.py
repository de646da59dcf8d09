"""Multi-layer perceptron; LeNet-300-100 by default (LeCun et al. 1998)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """Flatten, then Dense+ReLU for each width in ``hidden``, then a Dense head of ``num_classes``."""

  num_classes: int = 10
  hidden: Sequence[int] = (300, 100)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    del train, mask
    h = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    for i, width in enumerate(self.hidden):
      h = nn.relu(nn.Dense(width, name=f"dense_{i}")(h))
    return nn.Dense(self.num_classes, name="head")(h)
