"""The input pipeline's device half: normalization and augmentation inside the jitted step.

Images travel from the source to the device as stored (``uint8``), a quarter of float32's bytes;
:class:`Preprocess` turns them into the model's float input there. In training it first applies a
random crop (after zero padding) and a random horizontal flip whose randomness is derived from
``(run key, epoch, example id)`` by ``fold_in``: an example is augmented the same way whichever batch,
device or process it lands in.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from prunejax.errors import ConfigError

_AUGMENT_STREAM = 0xA06  # separates the augmentation keys from other uses of the run key


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """``x -> (x / scale - mean) / std`` on device, with optional crop + flip in training.

  Args:
    scale: the stored value that maps to 1.0 (255 for uint8 images, 16 for scikit-learn's digits);
      None leaves ``x`` untouched (token ids).
    mean, std: per-channel statistics after scaling (None: no standardization).
    crop_padding: random crop of the original size after zero padding by this many pixels on each
      side (0: no crop).
    flip: random horizontal flip with probability 1/2.
  """

  scale: float | None = None
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  crop_padding: int = 0
  flip: bool = False

  def __post_init__(self):
    if self.scale is not None and not self.scale > 0:
      raise ConfigError(f"preprocess scale={self.scale!r} must be positive")
    if (self.mean is None) != (self.std is None):
      raise ConfigError("preprocess mean and std go together (give both or neither)")
    if self.std is not None and any(s <= 0 for s in self.std):
      raise ConfigError(f"preprocess std={self.std!r} must be positive")
    if self.crop_padding < 0:
      raise ConfigError(f"preprocess crop_padding={self.crop_padding} must be >= 0")

  @property
  def augments(self) -> bool:
    return self.crop_padding > 0 or self.flip

  def eval(self, x: jax.Array) -> jax.Array:
    """The model input in evaluation and scoring: normalization only."""
    if self.scale is None:
      return x
    out = x.astype(jnp.float32) / jnp.float32(self.scale)
    if self.mean is not None:
      out = (out - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)
    return out

  def train(self, x: jax.Array, ids: jax.Array, epoch: jax.Array, key: jax.Array) -> jax.Array:
    """The model input in training: augmentation (on the stored values), then normalization."""
    if self.augments:
      x = augment(x, ids, epoch, key, crop_padding=self.crop_padding, flip=self.flip)
    return self.eval(x)


def example_keys(key: jax.Array, ids_B: jax.Array, epoch_B: jax.Array) -> jax.Array:
  """One PRNG key per example: ``fold_in(fold_in(fold_in(key, stream), epoch), id)``."""
  base = jax.random.fold_in(key, _AUGMENT_STREAM)
  return jax.vmap(lambda e, i: jax.random.fold_in(jax.random.fold_in(base, e), i))(
      epoch_B.astype(jnp.uint32), ids_B.astype(jnp.uint32))


def crop_flip_params(keys_B: jax.Array, crop_padding: int) -> tuple[jax.Array, jax.Array,
                                                                      jax.Array]:
  """``(dy_B, dx_B, flip_B)`` drawn from each example's key: offsets in ``[0, 2 * crop_padding]``
  into the padded image and whether to flip."""

  def one(k):
    k_crop, k_flip = jax.random.split(k)
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * crop_padding + 1)
    return dy, dx, jax.random.bernoulli(k_flip)

  return jax.vmap(one)(keys_B)


def augment(x_BxHxWxC: jax.Array, ids_B: jax.Array, epoch_B: jax.Array, key: jax.Array, *,
            crop_padding: int = 4, flip: bool = True) -> jax.Array:
  """Random crop after zero padding by ``crop_padding`` and random horizontal flip, per example.

  Args:
    x_BxHxWxC: images (any dtype; padding is 0 in that dtype).
    ids_B: example ids; with ``epoch_B`` and ``key`` they decide each example's crop and flip.
    epoch_B: the epoch of each row.
    key: the run's key.
    crop_padding: pixels of zero padding on each side before the crop (0: no crop).
    flip: whether to flip horizontally with probability 1/2.

  Returns:
    Augmented images, same shape and dtype.
  """
  if x_BxHxWxC.ndim != 4:
    raise ConfigError(f"augment expects images [B, H, W, C]; got shape {x_BxHxWxC.shape} "
                      "(set dataset.augment=False for non-image data)")
  _, h, w, _ = x_BxHxWxC.shape
  dy_B, dx_B, flip_B = crop_flip_params(example_keys(key, ids_B, epoch_B), crop_padding)
  p = crop_padding
  padded = jnp.pad(x_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)))
  # The crop and the flip as two gathers of whole rows and columns (cheaper than a per-example
  # dynamic slice, on CPU and GPU alike).
  rows_BxH = dy_B[:, None] + jnp.arange(h)[None]
  cols_BxW = dx_B[:, None] + jnp.arange(w)[None]
  if flip:
    cols_BxW = jnp.where(flip_B[:, None], cols_BxW[:, ::-1], cols_BxW)
  out = jnp.take_along_axis(padded, rows_BxH[:, :, None, None], axis=1)
  return jnp.take_along_axis(out, cols_BxW[:, None, :, None], axis=2)
