"""CIFAR ResNets: ResNet-18 (He et al. 2016, the 4-stage BasicBlock variant with a 3x3 stem used by
Data Diet and most CIFAR work; 11.17M parameters) and ResNet-20 (the 3-stage CIFAR ResNet of He et al.
2016 Sec. 4.2, used by OpenLTH; 0.27M parameters), both with a width multiplier.

BatchNorm uses batch statistics in training (masked, so padding rows never enter them) and frozen running
statistics in evaluation.

Mixed precision (:mod:`prunejax.models.precision`): convolutions and the head compute in
``compute_dtype``; BatchNorm statistics, the running averages and the global average pool stay
float32, and so do the logits. ``remat=True`` rematerializes each residual block
(``jax.checkpoint``): its activations are recomputed in the backward pass instead of being stored,
trading about one more forward pass for the activation memory of the blocks.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from prunejax.models.precision import at_least_float32, is_narrow, module_dtypes

# In a narrow compute dtype BatchNorm (float32 statistics) is recomputed in the backward pass from
# its narrow input, so that no float32 copy of an activation is kept for it.
_RematBatchNorm = nn.remat(nn.BatchNorm)


class _MaskedBN(nn.Module):
  """BatchNorm whose training statistics skip padding rows (``mask_B`` False)."""

  train: bool
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask_B):
    m = None
    if mask_B is not None and self.train:
      m = jnp.broadcast_to(mask_B.reshape((-1,) + (1,) * (x.ndim - 1)), x.shape)
    batch_norm = _RematBatchNorm if is_narrow(self.dtype) else nn.BatchNorm
    return batch_norm(use_running_average=not self.train, momentum=0.9, dtype=self.dtype,
                      param_dtype=self.param_dtype, name="bn")(x, mask=m)


class BasicBlock(nn.Module):
  features: int
  strides: int = 1
  shortcut: str = "conv"  # "conv" (1x1 projection) or "pad" (option A of He et al., parameter-free)
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool, mask_B):
    bn = lambda name: _MaskedBN(train, self.dtype, self.param_dtype, name=name)
    conv = lambda *a, **kw: nn.Conv(*a, use_bias=False, dtype=self.dtype,
                                    param_dtype=self.param_dtype, **kw)
    y = conv(self.features, (3, 3), (self.strides, self.strides), padding="SAME", name="conv1")(x)
    y = nn.relu(bn("bn1")(y, mask_B))
    y = conv(self.features, (3, 3), padding="SAME", name="conv2")(y)
    y = bn("bn2")(y, mask_B)
    if x.shape[-1] != self.features or self.strides != 1:
      if self.shortcut == "conv":
        x = conv(self.features, (1, 1), (self.strides, self.strides), name="proj")(x)
        x = bn("proj_bn")(x, mask_B)
      else:
        x = x[:, ::self.strides, ::self.strides, :]
        extra = self.features - x.shape[-1]
        x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    return nn.relu(x + y)


# static_argnums counts self: (self, x, train, mask_B); train is a Python bool.
_RematBlock = nn.remat(BasicBlock, static_argnums=(2,))


class ResNet(nn.Module):
  """A ResNet of :class:`BasicBlock` stages on images ``[B, H, W, C]``; logits ``f32[B, classes]``.

  Attributes:
    num_classes: outputs of the head.
    stage_sizes: blocks per stage.
    stage_widths: channels per stage (before ``width_multiplier``).
    width_multiplier: scales every width.
    shortcut: ``"conv"`` (1x1 projection) or ``"pad"`` (option A of He et al.).
    compute_dtype: dtype of the convolutions and the head (None: that of the inputs and params).
    param_dtype: dtype of the params and BatchNorm running statistics' initializers.
    remat: recompute each block's activations in the backward pass (``jax.checkpoint``).
  """

  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  width_multiplier: float = 1.0
  shortcut: str = "conv"
  compute_dtype: Any = None
  param_dtype: Any = "float32"
  remat: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: jax.Array | None = None) -> jax.Array:
    cd, pd = module_dtypes(self)
    widths = [max(1, int(round(w * self.width_multiplier))) for w in self.stage_widths]
    h = nn.Conv(widths[0], (3, 3), padding="SAME", use_bias=False, dtype=cd, param_dtype=pd,
                name="stem")(x.astype(cd or jnp.float32))
    h = nn.relu(_MaskedBN(train, cd, pd, name="stem_bn")(h, mask))
    block = _RematBlock if self.remat else BasicBlock
    for s, (n_blocks, w) in enumerate(zip(self.stage_sizes, widths)):
      for b in range(n_blocks):
        strides = 2 if (s > 0 and b == 0) else 1
        h = block(w, strides, self.shortcut, cd, pd, name=f"stage{s}_block{b}")(h, train, mask)
    # The global average pool reduces in float32.
    h = jnp.mean(at_least_float32(h), axis=(1, 2))
    return at_least_float32(nn.Dense(self.num_classes, dtype=cd, param_dtype=pd, name="head")(h))


def resnet18(num_classes: int = 10, width_multiplier: float = 1.0, **fields: Any) -> ResNet:
  """CIFAR ResNet-18; ``fields`` are further :class:`ResNet` fields (``compute_dtype``, ...)."""
  return ResNet(num_classes, (2, 2, 2, 2), (64, 128, 256, 512), width_multiplier, "conv", **fields)


def resnet20(num_classes: int = 10, width_multiplier: float = 1.0, **fields: Any) -> ResNet:
  """CIFAR ResNet-20; ``fields`` are further :class:`ResNet` fields (``compute_dtype``, ...)."""
  # OpenLTH's cifar_resnet_20 uses 1x1 projection shortcuts; "pad" gives He et al.'s option A.
  return ResNet(num_classes, (3, 3, 3), (16, 32, 64), width_multiplier, "conv", **fields)
