"""Mixed precision for the models: the dtype their layers compute in and the dtype of their params.

The recipe of accelerator training (Micikevicius et al. 2018; bfloat16 on TPUs, Kalamkar et al.
2019): parameters, and so gradients and optimizer state, stay float32 (``param_dtype``); each layer
casts its inputs and its parameters to ``compute_dtype`` (bfloat16 or float16) for the matrix
multiplies and convolutions, where the throughput and the activation memory are. What needs the
range or the precision stays float32: LayerNorm and BatchNorm statistics (Flax reduces them in
float32), the attention softmax, global pooling, the GPT's residual stream, and the logits, which
every model returns in float32 so that losses and scores reduce in float32. float16 has a narrow
range: train it with a loss scale (:func:`prunejax.train.create_train_state`'s ``loss_scale``);
bfloat16 needs none.

``compute_dtype=None`` (the models' default) keeps the dtype of the inputs and params, so a model
with float64 params (with ``jax_enable_x64``) still gives float64 references.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from prunejax.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")


def dtype_of(field: str, value: Any) -> jnp.dtype | None:
  """The dtype named by ``value`` (a name such as ``"bfloat16"`` or a dtype), None for None.

  Raises:
    ConfigError: ``value`` names no dtype or one outside :data:`DTYPES` (one line naming both).
  """
  if value is None:
    return None
  try:
    dtype = jnp.dtype(value)
  except (TypeError, ValueError):
    dtype = None
  if dtype is None or dtype.name not in DTYPES:
    raise ConfigError(f"{field}={value!r} is not allowed; choose one of: "
                      + ", ".join(map(repr, DTYPES)))
  return dtype


def module_dtypes(module: Any) -> tuple[jnp.dtype | None, jnp.dtype]:
  """``(compute dtype or None, param dtype)`` of a model with fields ``compute_dtype`` and
  ``param_dtype``, checked (errors name ``Class.field``)."""
  name = type(module).__name__
  return (dtype_of(f"{name}.compute_dtype", module.compute_dtype),
          dtype_of(f"{name}.param_dtype", module.param_dtype))


def is_narrow(dtype: Any) -> bool:
  """Whether ``dtype`` (None: the inputs' own) is a compute dtype narrower than float32."""
  return dtype is not None and jnp.dtype(dtype).itemsize < 4


def at_least_float32(x: jax.Array) -> jax.Array:
  """``x`` in float32, or in its own dtype when that is wider (float64 references stay float64);
  used for the logits, so that losses and scores reduce in at least float32."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))
