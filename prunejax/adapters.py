"""Models of other frameworks as ``(apply_fn, params)`` for prunejax, and back.

prunejax's scores and masks take ``apply_fn(params, x) -> logits_BxC`` and a params pytree. These
functions build that pair from a Flax NNX module, an Equinox module or a Haiku transformed
function, and rebuild the framework's own object from (masked, trained) params:

===========  ==========================================  ==========================================
framework    to prunejax                                 back
===========  ==========================================  ==========================================
Flax NNX     ``from_nnx(model)``: params = the           ``to_nnx(model, params)``: a module with
             ``nnx.Param`` state of ``nnx.split``        these params
Equinox      ``from_equinox(model)``: params = the       ``to_equinox(model, params)``: a module
             float arrays of ``eqx.partition``           with these params
Haiku        ``from_haiku(transformed, params)``:        ``to_haiku(params)``: a plain
             params as ``init`` made them                ``{module: {name: array}}`` dict
===========  ==========================================  ==========================================

Flax linen models need no adapter: ``lambda p, x: model.apply({"params": p}, x)`` (or
:func:`prunejax.models.make_apply_fn` for models with BatchNorm statistics). A plain JAX function
``f(params, x)`` is already an ``apply_fn``.

The params stay the framework's own pytree (an NNX ``State``, an Equinox module with ``None``
where there is no parameter, Haiku's nested dict), so masks, ``optax`` and ``jax.grad`` see the
same structure as the user's code; the default mask filter finds their weights (NNX ``kernel``,
Equinox ``weight``, Haiku ``w``). Equinox and Haiku are imported only when their adapter is
called: prunejax does not depend on them.

What is not a parameter (the NNX graph and its other state, such as BatchNorm statistics and RNG
counters; the Equinox module's static fields; Haiku's state of ``transform_with_state``) is fixed
when the adapter is called and captured by ``apply_fn``: call the adapter again after training
changes it. Put the model in evaluation mode first (``model.eval()`` in NNX,
``eqx.nn.inference_mode(model)``) so that scores see no dropout.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping

import jax

from prunejax.errors import ConfigError
from prunejax.types import ApplyFn, Params


# ----------------------------------------------------------------------------------------------
# Flax NNX.
# ----------------------------------------------------------------------------------------------


def from_nnx(model: Any, wrt: Any = None) -> tuple[ApplyFn, Params]:
  """``(apply_fn, params)`` of a Flax NNX module.

  Args:
    model: an ``nnx.Module`` called as ``model(x) -> logits_BxC``.
    wrt: an NNX filter of the variables that are params (default ``nnx.Param``).

  Returns:
    ``apply_fn(params, x) = nnx.merge(graphdef, params, rest)(x)`` and ``params``, the ``nnx.State``
    of the ``wrt`` variables (``nnx.split(model, wrt, ...)``); ``rest`` is the other state as it is
    now.
  """
  from flax import nnx
  if not isinstance(model, nnx.Module):
    raise ConfigError(f"from_nnx takes an nnx.Module, not {type(model).__name__}")
  wrt = nnx.Param if wrt is None else wrt
  graphdef, params, rest = nnx.split(model, wrt, ...)

  def apply_fn(params: Params, x: Any) -> jax.Array:
    return nnx.merge(graphdef, params, rest)(x)

  return apply_fn, params


def to_nnx(model: Any, params: Params, wrt: Any = None) -> Any:
  """A copy of the NNX ``model`` whose ``wrt`` variables (default ``nnx.Param``) are ``params``.

  ``model`` itself is not changed (use ``nnx.update(model, params)`` for that).

  Raises:
    ConfigError: ``params`` does not have the structure and shapes of the model's params.
  """
  from flax import nnx

  from prunejax.masks.core import check_mask
  wrt = nnx.Param if wrt is None else wrt
  graphdef, current, rest = nnx.split(model, wrt, ...)
  check_mask(params, current, "to_nnx: params", bool_leaves=False)
  return nnx.merge(graphdef, params, rest)


# ----------------------------------------------------------------------------------------------
# Equinox.
# ----------------------------------------------------------------------------------------------


def from_equinox(model: Any, *, batched: bool = False,
                 filter_spec: Callable[[Any], bool] | None = None) -> tuple[ApplyFn, Params]:
  """``(apply_fn, params)`` of an Equinox module.

  Args:
    model: an ``eqx.Module``. Equinox layers act on one example, so by default ``apply_fn`` maps
      the model over the batch axis with ``jax.vmap``.
    batched: whether ``model(x)`` already takes a batch (then it is called as it is).
    filter_spec: which leaves are params (default ``eqx.is_inexact_array``: every float array).

  Returns:
    ``apply_fn(params, x) -> logits_BxC`` and ``params``, the module with ``None`` in place of
    everything that is not a param (``eqx.partition``).
  """
  import equinox as eqx
  if not isinstance(model, eqx.Module):
    raise ConfigError(f"from_equinox takes an eqx.Module, not {type(model).__name__}")
  params, static = eqx.partition(model, eqx.is_inexact_array if filter_spec is None
                                 else filter_spec)

  def apply_fn(params: Params, x: Any) -> jax.Array:
    module = eqx.combine(params, static)
    return module(x) if batched else jax.vmap(module)(x)

  return apply_fn, params


def to_equinox(model: Any, params: Params) -> Any:
  """The Equinox ``model`` with its params replaced by ``params`` (``eqx.combine``).

  Raises:
    ConfigError: ``params`` is not a partition of ``model`` (another structure or leaf shapes).
  """
  import equinox as eqx
  import jax.numpy as jnp

  from prunejax.masks.core import path_str
  is_none = lambda x: x is None
  p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_none)
  m_leaves, m_def = jax.tree_util.tree_flatten_with_path(model, is_leaf=is_none)
  if p_def != m_def:
    raise ConfigError(f"to_equinox: params must be the partition of this {type(model).__name__} "
                      "that from_equinox returned (the same module with None for non-params)")
  for (path, p), (_, m) in zip(p_leaves, m_leaves):
    if p is not None and tuple(jnp.shape(p)) != tuple(jnp.shape(m)):
      raise ConfigError(f"to_equinox: params leaf {path_str(path)} has shape "
                        f"{tuple(jnp.shape(p))}; the model's has {tuple(jnp.shape(m))}")
  return eqx.combine(params, model)


# ----------------------------------------------------------------------------------------------
# Haiku.
# ----------------------------------------------------------------------------------------------


def from_haiku(transformed: Any, params: Params, state: Params | None = None, *,
               rng: jax.Array | None = None) -> tuple[ApplyFn, Params]:
  """``(apply_fn, params)`` of a Haiku transformed function.

  Args:
    transformed: ``hk.transform(f)`` or ``hk.transform_with_state(f)`` (with or without
      ``hk.without_apply_rng``), where ``f(x) -> logits_BxC``.
    params: the params from ``transformed.init``.
    state: the state from ``init``, for ``transform_with_state`` (required there).
    rng: the key passed to ``apply`` where it takes one (default None: no randomness).

  Returns:
    ``apply_fn(params, x) -> logits_BxC`` (the new state of ``transform_with_state`` is dropped)
    and ``params``.
  """
  import haiku as hk
  if not isinstance(transformed, (hk.Transformed, hk.TransformedWithState)):
    raise ConfigError(f"from_haiku takes hk.transform(...) or hk.transform_with_state(...), not "
                      f"{type(transformed).__name__}")
  with_state = isinstance(transformed, hk.TransformedWithState)
  if with_state and state is None:
    raise ConfigError("from_haiku: a transform_with_state function needs state= (from init)")
  if not with_state and state is not None:
    raise ConfigError("from_haiku: state= is only for hk.transform_with_state functions")
  takes_rng = "rng" in inspect.signature(transformed.apply).parameters
  extra = ((state,) if with_state else ()) + ((rng,) if takes_rng else ())

  def apply_fn(params: Params, x: Any) -> jax.Array:
    out = transformed.apply(params, *extra, x)
    return out[0] if with_state else out

  return apply_fn, params


def to_haiku(params: Params) -> dict[str, dict[str, Any]]:
  """Params (e.g. masked or trained) as the plain ``{module: {name: array}}`` dict Haiku takes.

  Raises:
    ConfigError: ``params`` is not a two-level mapping of arrays.
  """
  if not isinstance(params, Mapping) or not all(isinstance(v, Mapping) for v in params.values()):
    raise ConfigError("to_haiku: params must be a {module name: {param name: array}} mapping, as "
                      "hk.transform's init returns")
  return {module: dict(leaves) for module, leaves in params.items()}
