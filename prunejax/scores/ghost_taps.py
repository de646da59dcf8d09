"""The ghost machinery shared by per-example gradient scores (:func:`prunejax.scores.grand`,
:func:`prunejax.scores.gradient_features`): the plan of where each parameter leaf meets the examples
(:func:`ghost_plan`), the taps that turn one backward pass into per-example quantities, their
dummies, and the per-example gradients of broadcast leaves (:func:`site_grads`).

The names are re-exported by :mod:`prunejax.scores.grand`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prunejax import layer_rows
from prunejax import layer_taps as lt
from prunejax.scores import ghost_norms
from prunejax.types import ApplyFn, Params

# Data dependencies in each tap's backward: the layer's norm starts only once its cotangent exists,
# and the cotangent flows on only after the norm, so XLA neither hoists patches or Gram matrices
# into the forward pass nor keeps several layers' temporaries alive at once. On CPU they are
# row-local zeros added to the arrays (XLA:CPU drops optimization barriers; ``0 * x`` is not folded
# for floats), elsewhere optimization barriers (no extra pass over the arrays).
_SEQUENCE = True


class GhostPlan(NamedTuple):
  """How :func:`grand` differentiates each parameter leaf (from :func:`ghost_plan`).

  Attributes:
    layers: the :class:`prunejax.layer_taps.LayerPlan` of ``apply_fn``.
    ghost: layer index -> norm form, one per leaf used once as a layer's weight.
    sites: keys of the broadcast sites whose per-example cotangents are pulled back.
    broadcast: indices of the leaves those sites cover.
    materialized: indices of leaves differentiated by ``vmap(grad)`` per example.
    zero: indices of float leaves with no gradient (unused or behind ``stop_gradient``).
    num_classes: ``C``, the last axis of ``apply_fn``'s output.
  """

  layers: lt.LayerPlan
  ghost: dict
  sites: tuple
  broadcast: tuple[int, ...]
  materialized: tuple[int, ...]
  zero: tuple[int, ...]
  num_classes: int

  def describe(self) -> dict[str, str]:
    """Leaf path -> ``"dense/gram"``, ``"conv/explicit"``, ``"broadcast"``, ``"materialized"``,
    ``"zero"`` or ``"not float"``."""
    paths = self.layers.paths
    out = {p: "not float" for p in paths}
    for k, form in self.ghost.items():
      layer = self.layers.layers[k]
      out[paths[layer.leaf]] = f"{layer.kind}/{form}"
    out.update({paths[i]: "broadcast" for i in self.broadcast})
    out.update({paths[i]: "materialized" for i in self.materialized})
    out.update({paths[i]: "zero" for i in self.zero})
    return out


def ghost_plan(apply_fn: ApplyFn, params: Params, x: Any) -> GhostPlan:
  """Analyses ``apply_fn`` once and says how :func:`grand` will handle each parameter leaf.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: parameters (arrays, tracers or ``ShapeDtypeStruct``s).
    x: a batch of inputs (its leaves' first axis is the batch).

  Returns:
    A :class:`GhostPlan`; ``plan.describe()`` maps each leaf to its method.
  """
  plan = lt.find_layers(apply_fn, params, x)
  ghost, broadcast, materialized, zero = {}, [], [], []
  for i, meta in enumerate(plan.leaf_metas):
    uses = plan.uses.get(i, []) if meta is not None else None
    if uses is None:
      continue
    if not uses:
      zero.append(i)
    elif len(uses) == 1 and uses[0][0] == "layer":
      ghost[uses[0][1]] = ghost_norms.choose(plan.layers[uses[0][1]])
    elif all(kind == "site" for kind, _ in uses):
      broadcast.append(i)
    else:
      materialized.append(i)
  sites = tuple(sorted(key for key, site in plan.sites.items() if site.deps & set(broadcast)))
  num_classes = plan.jaxpr.outvars[0].aval.shape[-1]
  return GhostPlan(plan, ghost, sites, tuple(broadcast), tuple(materialized), tuple(zero),
                   num_classes)


# ----------------------------------------------------------------------------------------------
# Taps.
# ----------------------------------------------------------------------------------------------


def _like(value: jax.Array, like: Any) -> jax.Array:
  """``value`` with the dtype and (explicit-axes) sharding of the aval ``like``, as a
  ``custom_vjp`` cotangent must have."""
  value = value.astype(like.dtype)
  want = getattr(like, "sharding", None)
  if layer_rows.explicit_sharding(value) is None or jax.typeof(value).sharding == want:
    return value
  return jax.sharding.reshard(value, want)


def _after(v: jax.Array, axis: int, dep: jax.Array, dep_axis: int) -> jax.Array:
  """``v``, computed only once ``dep`` is (row by row on CPU: example ``i``'s rows of ``v`` get
  ``0 *`` example ``i``'s first entry of ``dep``, so a NaN in one example stays in its row)."""
  if not _SEQUENCE or not jnp.issubdtype(v.dtype, jnp.floating):
    return v
  if jax.default_backend() != "cpu":
    return lax.optimization_barrier((v, dep))[0]
  first_B = dep[tuple(slice(None) if d == dep_axis else 0 for d in range(dep.ndim))]
  return v + layer_rows.along(0 * first_B.astype(v.dtype), v.ndim, axis)


def _layer_tap(layer: lt.Layer, form: str, dummy_B: jax.Array) -> Callable:
  """Identity on the layer's output; its backward returns each example's squared weight-gradient
  norm as the cotangent of ``dummy_B``."""
  like = jax.typeof(dummy_B)

  @jax.custom_vjp
  def tap(out, act, dummy):
    del act, dummy
    return out

  def fwd(out, act, dummy):
    del dummy
    return out, act

  def bwd(act, ct):
    act = _after(act, layer.batch_axis, ct, layer.out_batch_axis)
    sq_B = ghost_norms.sq_norms(layer, form, act, ct)
    return _after(ct, layer.out_batch_axis, sq_B, 0), None, _like(sq_B, like)

  tap.defvjp(fwd, bwd)
  return lambda layer, act, out: (tap(out, act, dummy_B), None)


def _site_tap(dummy: jax.Array, batch_size: int) -> Callable:
  """Broadcasts a site's value over the batch; its backward returns the per-example cotangent
  ``(B, *site.shape)`` as the cotangent of ``dummy``."""
  like = jax.typeof(dummy)

  def site_tap(site: lt.Site, value: jax.Array) -> jax.Array:
    @jax.custom_vjp
    def bcast(v, d):
      del d
      return lt.broadcast_to_batch(site, v, batch_size)

    def fwd(v, d):
      return bcast(v, d), None

    def bwd(_, ct):
      return None, _like(lt.per_example(site, ct), like)

    bcast.defvjp(fwd, bwd)
    return bcast(value, dummy)

  return site_tap


# ----------------------------------------------------------------------------------------------
# Dummies and broadcast leaves.
# ----------------------------------------------------------------------------------------------


def _zeros_B(x: Any) -> jax.Array:
  """f32[B] zeros laid out (sharded, varying over manual axes) like the batch."""
  leaf = jax.tree.leaves(x)[0]
  return jnp.zeros_like(leaf[(slice(None),) + (0,) * (jnp.ndim(leaf) - 1)], jnp.float32)


def _dummies(plan: GhostPlan, x: Any) -> dict:
  zeros_B = _zeros_B(x)
  layers = {}
  for k in plan.ghost:
    out_dtype = plan.layers.layers[k].eqn.outvars[0].aval.dtype
    layers[k] = zeros_B.astype(ghost_norms.norm_dtype(out_dtype))
  sites = {}
  for key in plan.sites:
    site = plan.layers.sites[key]
    z = layer_rows.along(zeros_B.astype(site.dtype), len(site.shape) + 1, 0)
    sites[key] = jnp.broadcast_to(z, z.shape[:1] + site.shape)
  return {"layers": layers, "sites": sites}


def site_grads(plan: GhostPlan, params: Params, cts: dict) -> dict[int, jax.Array]:
  """Each example's gradient ``[B, *leaf]`` of the broadcast leaves (by flat leaf index): its
  cotangents of the broadcast sites pulled back to the leaves they cover."""
  leaves, treedef = jax.tree.flatten(params)

  def cone(values):
    vals = list(leaves)
    for i, v in zip(plan.broadcast, values):
      vals[i] = v
    at_sites = lt.site_values(plan.layers, jax.tree.unflatten(treedef, vals))
    return [at_sites[key] for key in plan.sites]

  _, pullback = jax.vjp(cone, [leaves[i] for i in plan.broadcast])
  (grads,) = jax.vmap(pullback)([cts[key] for key in plan.sites])
  return dict(zip(plan.broadcast, grads))
