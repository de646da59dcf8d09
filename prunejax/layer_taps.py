"""Where the parameters of any JAX function meet the batch: its layers, and taps on them.

``find_layers(apply_fn, params, x)`` traces ``apply_fn(params, x)`` on the whole batch and walks
the jaxpr to find where each parameter leaf meets the examples:

* a **layer** (:class:`Layer`): a ``dot_general`` (dense, on vectors or sequences, with or without
  dot batch dimensions), a ``conv_general_dilated`` (any strides, padding, dilations, feature
  groups) or a row ``gather`` (embeddings), whose parameter operand is one leaf seen through
  reshapes, transposes, slices or casts only;
* a **site** (:class:`Site`): a parameter-side value broadcast over the examples by an elementwise
  op or a ``broadcast_in_dim`` (biases, norm scales and offsets, position tables);
* any other use (a weight used twice, a leaf inside ``scan`` or a custom derivative, ...).

The example axis of every value is found by tracing ``apply_fn`` a second time with the batch
doubled: the axis whose size is ``B`` in the first trace and ``2B`` in the second. The first trace
is made from the arguments themselves, so it carries their shardings (explicit-axes meshes) and
manual axes (``shard_map``), and its replay runs exactly as ``apply_fn`` does.

``run(plan, params, x, layer_taps=, site_taps=)`` evaluates ``apply_fn`` from that jaxpr, calling
``layer_taps[k](layer, act, out) -> (out, record)`` at layer ``k`` (``act`` its input, ``out`` its
output, which the tap may replace) and ``site_taps[key](site, value)`` at a site (it returns the
value broadcast over the batch, :func:`broadcast_to_batch`). A forward-only tap that records
statistics of each layer's input, as Wanda or SparseGPT calibration needs::

    plan = find_layers(apply_fn, params, x)

    def hessian_tap(layer, act, out):
      a_BxNxK = layer_rows.layer_rows(layer, act)  # input rows; conv: im2col patches
      return out, jnp.einsum("bnk,bnl->kl", a_BxNxK, a_BxNxK)

    (logits,), hessians = run(plan, params, x,
                              layer_taps={k: hessian_tap for k in plan.layers})

``hessians[k]`` belongs to leaf ``plan.layers[k].leaf`` (path ``plan.layers[k].path``); the
feature order of the rows is documented in :mod:`prunejax.layer_rows`. :func:`penultimate` (the
input of the last dense layer) is such a tap; GraNd (:mod:`prunejax.scores.grand`) taps the output
cotangents of the same layers in the backward pass. Every value an example touches is assumed to
stay in that example's row (evaluation mode).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from prunejax.errors import ConfigError, DataError
from prunejax.layer_rows import dense_dims, layer_rows
# The walk and the types it fills (Layer, Site, LayerPlan are re-exported here).
from prunejax.layer_walk import (_P, _X, Layer, LayerPlan, Site,  # pylint: disable=unused-import
                                 _example_axes, _Walker)
from prunejax.types import ApplyFn, Params


# ----------------------------------------------------------------------------------------------
# Broadcast sites.
# ----------------------------------------------------------------------------------------------


def broadcast_to_batch(site: Site, value: jax.Array, batch_size: int) -> jax.Array:
  """``value`` with its example axis (``site.pos``) broadcast to ``batch_size``."""
  shape = list(site.shape)
  if site.insert:
    shape.insert(site.pos, batch_size)
    dims = [d for d in range(len(shape)) if d != site.pos]
  else:
    shape[site.pos] = batch_size
    dims = list(range(len(shape)))
  return lax.broadcast_in_dim(value, tuple(shape), tuple(dims))


def per_example(site: Site, ct: jax.Array) -> jax.Array:
  """The cotangent of a broadcast site value, ``(B, *site.shape)``: example ``i``'s share."""
  ct = jnp.moveaxis(ct, site.pos, 0)
  if site.insert:
    return ct
  dims = tuple(d for d in range(len(site.shape) + 1) if d != site.pos + 1)
  return lax.broadcast_in_dim(ct, (ct.shape[0],) + site.shape, dims)


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def batch_size(x: Any) -> int:
  """``B``, the leading axis of every input leaf; a one-line error when they disagree."""
  sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(x)}
  if len(sizes) != 1 or None in sizes:
    raise ConfigError(f"every input leaf needs the same leading (example) axis; got leading sizes "
                      f"{sorted(map(str, sizes))}")
  return sizes.pop()


def find_layers(apply_fn: ApplyFn, params: Params, x: Any) -> LayerPlan:
  """Traces ``apply_fn(params, x)`` and finds its layers, sites and other uses of each leaf.

  Args:
    apply_fn: ``apply_fn(params, x) -> out`` with the examples on the leading axis of ``x``'s
      leaves and of ``out``; any JAX function (Flax, Equinox, Haiku, plain).
    params: its parameters (arrays, tracers or ``ShapeDtypeStruct``s).
    x: a batch of inputs (arrays, tracers or ``ShapeDtypeStruct``s).

  Returns:
    A :class:`LayerPlan`. When the two traces differ in structure (``apply_fn`` branches on the
    batch size), no example axis is known and the plan has no layers or sites.
  """
  b = batch_size(x)
  try:
    closed = jax.make_jaxpr(apply_fn)(params, x)
  except (TypeError, ValueError) as e:  # e.g. a dot_general of mismatched shapes
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataError(f"apply_fn(params, x) fails on a batch x of shape "
                    f"{jax.tree.map(jnp.shape, x)} ({first[:300]}); does the batch match the "
                    f"model's input?") from e
  axes = _example_axes(apply_fn, params, x, closed, b) or {}
  path_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [jax.tree_util.keystr(p) for p, _ in path_leaves]
  leaf_metas = [_P(frozenset({i}), i) if _is_float(l) else None
                for i, (_, l) in enumerate(path_leaves)]
  num_x = len(jax.tree.leaves(x))
  walker = _Walker(axes, "analyse", paths=paths)
  out_metas, _ = walker.run(closed.jaxpr, list(closed.consts), leaf_metas + [_X] * num_x)
  for m in out_metas:  # an output that is a parameter (no example axis): another use.
    if isinstance(m, _P):
      for leaf in m.deps:
        walker.uses[leaf].append(("other", None))
  dense = [k for k, layer in walker.layers.items() if layer.kind == "dense"]
  head = (max(dense), walker.head_bias.get(max(dense))) if dense else None
  return LayerPlan(closed.jaxpr, list(closed.consts), axes, leaf_metas, num_x, b, walker.layers,
                   walker.sites, dict(walker.uses), paths, head)


def run(plan: LayerPlan, params: Params, x: Any, *, layer_taps: dict | None = None,
        site_taps: dict | None = None) -> tuple[Any, dict]:
  """Evaluates ``apply_fn(params, x)`` from ``plan``, with taps.

  Args:
    plan: from :func:`find_layers` on arguments of the same shapes.
    params, x: the arguments.
    layer_taps: layer index -> ``tap(layer, act, out) -> (out, record)``; the returned ``out``
      replaces the layer's output (a ``custom_vjp`` identity can read its cotangent).
    site_taps: site key -> ``tap(site, value) -> value broadcast over the batch``
      (:func:`broadcast_to_batch`, possibly inside a ``custom_vjp``).

  Returns:
    ``(output, records)``: ``apply_fn``'s output pytree flattened to a list, and layer index ->
    record.
  """
  walker = _Walker(plan.axes, "eval", plan, layer_taps, site_taps)
  metas = plan.leaf_metas + [_X] * plan.num_x
  _, outs = walker.run(plan.jaxpr, plan.consts, metas,
                       jax.tree.leaves(params) + jax.tree.leaves(x))
  return outs, walker.records


def site_values(plan: LayerPlan, params: Params) -> dict:
  """Site key -> the parameter-side value at that site, computed from ``params`` alone."""
  walker = _Walker(plan.axes, "params", plan)
  metas = plan.leaf_metas + [_X] * plan.num_x
  walker.run(plan.jaxpr, plan.consts, metas, jax.tree.leaves(params) + [None] * plan.num_x)
  return walker.site_values


def layer_weights(plan: LayerPlan, params: Params) -> dict:
  """Layer index -> the weight operand of that layer's equation (the leaf seen through its
  reshapes, transposes, slices or casts), computed from ``params`` alone; ``params`` may be any
  pytree of ``params``' structure whose leaves these ops apply to (an optimizer's moments)."""
  walker = _Walker(plan.axes, "params", plan)
  metas = plan.leaf_metas + [_X] * plan.num_x
  walker.run(plan.jaxpr, plan.consts, metas, jax.tree.leaves(params) + [None] * plan.num_x)
  return walker.weights


def penultimate(apply_fn: ApplyFn, params: Params, x: Any) -> tuple[jax.Array, jax.Array, bool]:
  """``(h_BxD, logits_BxC, has_bias)``: the input of ``apply_fn``'s last dense layer.

  The last dense layer is the last ``dot_general`` with a parameter kernel in program order, as a
  linear classifier head is; ``has_bias`` says whether a parameter is added to its output. One
  forward pass of ``apply_fn`` with a tap on that layer.

  Raises:
    ConfigError: ``apply_fn`` has no such layer, or its last one sees several rows per example.
  """
  plan = find_layers(apply_fn, params, x)
  if plan.head is None:
    raise ConfigError("apply_fn has no dense layer with a parameter kernel; pass features_fn")
  k, bias_leaf = plan.head
  layer = plan.layers[k]
  a_batch, a_free, _, _ = dense_dims(layer)
  act_shape = layer.eqn.invars[layer.act_index].aval.shape
  rows = math.prod(act_shape[d] for d in a_batch + a_free)
  if rows != 1:
    raise ConfigError(f"the last dense layer of apply_fn sees {rows} rows per example; the "
                      "last-layer closed form needs one; pass features_fn")

  def tap(layer, act, out):
    return out, layer_rows(layer, act)[:, 0]

  (logits_BxC,), records = run(plan, params, x, layer_taps={k: tap})
  return records[k], logits_BxC, bias_leaf is not None
