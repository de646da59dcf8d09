"""A small convolutional network: conv-relu-pool blocks, a hidden dense layer and a head."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class CNN(nn.Module):
  """``[Conv3x3(f) -> ReLU -> MaxPool2]`` for f in ``features``, Dense(``dense``)+ReLU, Dense head."""

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  dense: int = 128

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    del train, mask
    h = x.astype(jnp.float32)
    for i, f in enumerate(self.features):
      h = nn.relu(nn.Conv(f, (3, 3), padding="SAME", name=f"conv_{i}")(h))
      h = nn.max_pool(h, (2, 2), strides=(2, 2), padding="SAME")
    h = h.reshape((h.shape[0], -1))
    h = nn.relu(nn.Dense(self.dense, name="dense_0")(h))
    return nn.Dense(self.num_classes, name="head")(h)
