"""CIFAR ResNets: ResNet-18 (He et al. 2016, the 4-stage BasicBlock variant with a 3x3 stem used by
Data Diet and most CIFAR work; 11.17M parameters) and ResNet-20 (the 3-stage CIFAR ResNet of He et al.
2016 Sec. 4.2, used by OpenLTH; 0.27M parameters), both with a width multiplier.

BatchNorm uses batch statistics in training (masked, so padding rows never enter them) and frozen running
statistics in evaluation.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class _MaskedBN(nn.Module):
  """BatchNorm whose training statistics skip padding rows (``mask_B`` False)."""

  train: bool

  @nn.compact
  def __call__(self, x, mask_B):
    m = None
    if mask_B is not None and self.train:
      m = jnp.broadcast_to(mask_B.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    return nn.BatchNorm(use_running_average=not self.train, momentum=0.9, name="bn")(x, mask=m)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  shortcut: str = "conv"  # "conv" (1x1 projection) or "pad" (option A of He et al., parameter-free)

  @nn.compact
  def __call__(self, x, train: bool, mask_B):
    bn = lambda name: _MaskedBN(train, name=name)
    y = nn.Conv(self.features, (3, 3), (self.strides, self.strides), padding="SAME",
                use_bias=False, name="conv1")(x)
    y = nn.relu(bn("bn1")(y, mask_B))
    y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
    y = bn("bn2")(y, mask_B)
    if x.shape[-1] != self.features or self.strides != 1:
      if self.shortcut == "conv":
        x = nn.Conv(self.features, (1, 1), (self.strides, self.strides), use_bias=False,
                    name="proj")(x)
        x = bn("proj_bn")(x, mask_B)
      else:
        x = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(x + y)


class ResNet(nn.Module):
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  width_multiplier: float = 1.0
  shortcut: str = "conv"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    widths = [max(1, int(round(w * self.width_multiplier))) for w in self.stage_widths]
    h = nn.Conv(widths[0], (3, 3), padding="SAME", use_bias=False, name="stem")(x.astype(jnp.float32))
    h = nn.relu(_MaskedBN(train, name="stem_bn")(h, mask))
    for s, (n_blocks, w) in enumerate(zip(self.stage_sizes, widths)):
      for b in range(n_blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        h = BasicBlock(w, strides, self.shortcut, name=f"stage{s}_block{b}")(h, train, mask)
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(self.num_classes, name="head")(h)


def resnet18(num_classes: int = 10, width_multiplier: float = 1.0) -> ResNet:
  return ResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), width_multiplier, "conv")


def resnet20(num_classes: int = 10, width_multiplier: float = 1.0) -> ResNet:
  # OpenLTH's cifar_resnet_20 uses 1x1 projection shortcuts; "pad" gives He et al.'s option A.
  return ResNet(num_classes, (3, 3, 3), (16, 32, 64), width_multiplier, "conv")
