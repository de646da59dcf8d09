"""Flax models and the glue that turns them into ``apply_fn(params, x) -> logits``."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from prunejax.errors import ConfigError, check_choice
from prunejax.models.cnn import CNN
from prunejax.models.gpt import (POOLINGS, GPTClassifier, check_token_ids, make_features_fn,
                                 split_inputs)
from prunejax.models.mlp import MLP
from prunejax.models.precision import DTYPES, at_least_float32, dtype_of
from prunejax.models.pretrained import (GPT2Config, gpt2_classifier, gpt2_config_from_dict,
                                        gpt2_tensor_shapes, load_gpt2_classifier, read_gpt2_config)
from prunejax.models.resnet import ResNet, resnet18, resnet20

MODELS = ("mlp", "cnn", "resnet18", "resnet20", "gpt")
# Models whose blocks can be rematerialized (``remat=True``).
REMAT_MODELS = ("resnet18", "resnet20", "gpt")


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """A model by name; ``kwargs`` are its fields (e.g. ``hidden`` for mlp, ``width`` for gpt).

  Every model takes ``compute_dtype`` and ``param_dtype`` (names from
  :data:`prunejax.models.precision.DTYPES`, see :mod:`prunejax.models.precision`); ``remat=True``
  (rematerialize each block) is allowed for the models in :data:`REMAT_MODELS`, and ``remat=False``
  for every model.

  Raises:
    ConfigError: an unknown name, a dtype outside ``DTYPES``, or ``remat=True`` for a model without
      blocks to rematerialize.
  """
  check_choice("model.name", name, MODELS)
  for field in ("compute_dtype", "param_dtype"):
    if kwargs.get(field) is not None:
      dtype_of(f"model.{field}", kwargs[field])
  if name not in REMAT_MODELS:
    if kwargs.get("remat"):
      raise ConfigError(f"model.remat={kwargs['remat']!r} is not supported by model {name!r}; "
                        f"rematerialization is per block of: {', '.join(map(repr, REMAT_MODELS))}")
    kwargs.pop("remat", None)
  if name == "mlp":
    return MLP(num_classes, **kwargs)
  if name == "cnn":
    return CNN(num_classes, **kwargs)
  if name == "resnet18":
    return resnet18(num_classes, **kwargs)
  if name == "resnet20":
    return resnet20(num_classes, **kwargs)
  return GPTClassifier(num_classes=num_classes, **kwargs)


@functools.partial(jax.jit, static_argnums=0)
def _init(model: nn.Module, key: jax.Array, x_example: jax.Array) -> dict:
  return model.init(key, x_example, train=False)


def init_variables(model: nn.Module, key: jax.Array, x_example: jax.Array) -> dict:
  """Initial variables (``{"params": ..., "batch_stats": ...}`` where the model has BatchNorm).

  Compiled once per model (Flax modules hash by their fields) and input shape.
  """
  return dict(_init(model, key, x_example))


def make_apply_fn(model: nn.Module, preprocess: Any = None) -> Callable[[dict, jax.Array], jax.Array]:
  """``apply_fn(variables, x) -> logits`` in evaluation mode, for scores and evaluation.

  ``variables`` is the Flax variables dict. Non-trainable collections (BatchNorm statistics) pass
  through ``jax.lax.stop_gradient``, so gradients with respect to ``variables`` are exactly the
  gradients with respect to the trainable ``params`` (and zero for the frozen statistics). With a
  :class:`prunejax.data.Preprocess`, ``x`` is the stored input (e.g. uint8 images) and is normalized
  first, as the train step does.
  """

  def apply_fn(variables: dict, x: jax.Array) -> jax.Array:
    frozen = {k: (v if k == "params" else jax.lax.stop_gradient(v)) for k, v in variables.items()}
    return model.apply(frozen, preprocess.eval(x) if preprocess is not None else x, train=False)

  return apply_fn


def param_count(model: nn.Module, x_example: jax.Array) -> int:
  """Number of trainable parameters, counted with ``jax.eval_shape`` (nothing is allocated)."""
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x_example)
  return sum(int(jnp.prod(jnp.array(l.shape))) if l.shape else 1
             for l in jax.tree.leaves(shapes["params"]))
