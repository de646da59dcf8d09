"""GraNd: the exact norm of each example's full loss gradient, at about the cost of a train step.

``grand(apply_fn, params, batch)`` returns ``||d CE(f(params, x_i), y_i) / d params||_2`` for every
row ``i``, over all parameter leaves, without forming the ``B x P`` per-example gradients.

How (``method="ghost"``): :func:`prunejax.layer_taps.find_layers` traces ``apply_fn`` on the batch
and finds, for each parameter leaf, where it meets the examples. Then one batched forward pass and
ONE backward pass of the summed cross-entropy run with taps, differentiated with respect to the
taps only (no weight gradient is formed):

* a leaf used once, as the weight of a dense, conv or embedding layer: an identity on the layer's
  output whose backward turns (input, output cotangent) into each example's squared weight-gradient
  norm, in the cheaper of the Gram and explicit forms (:mod:`prunejax.scores.ghost_norms`);
* a leaf only broadcast over the examples (biases, norm scales and offsets, position tables): the
  broadcast value's cotangent, kept per example, is pulled back to the leaf for each example;
* any other leaf (a weight used twice, a leaf inside ``scan`` or a custom derivative):
  ``vmap(grad)`` per example with respect to those leaves only, in chunks when they are large.

Leaves behind ``stop_gradient`` (BatchNorm statistics in :func:`prunejax.models.make_apply_fn`)
contribute 0. ``method="vmap"`` is the direct definition, chunked ``vmap(grad)``; ``method="auto"``
(default) uses the ghost path whenever it finds at least one layer. Both assume, as every
per-example gradient does, that an example's logits do not depend on the other rows of the batch
(evaluation mode).

References:
  Paul, Ganguli, Dziugaite. "Deep Learning on a Data Diet: Finding Important Examples Early in
  Training." NeurIPS 2021 (GraNd).
  Goodfellow. "Efficient Per-Example Gradient Computations." arXiv:1510.01799, 2015.
  Li, Tramer, Liang, Hashimoto. "Large Language Models Can Be Strong Differentially Private
  Learners." ICLR 2022 (ghost clipping).
  Bu, Mao, Xu. "Scalable and Efficient Training of Large Convolutional Neural Networks with
  Differential Privacy." NeurIPS 2022 (mixed ghost clipping).
  Guo, Zhao, Bai. "DeepCore: A Comprehensive Library for Coreset Selection in Deep Learning."
  DEXA 2022 (the last-layer closed form).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from prunejax import layer_rows
from prunejax import layer_taps as lt
from prunejax.errors import ConfigError, check_choice, check_positive_int
from prunejax.layer_taps import penultimate
from prunejax.scores import ghost_norms
# The ghost plan and taps live in ghost_taps; their names stay importable from here.
from prunejax.scores.ghost_taps import (GhostPlan, _after, _dummies, _layer_tap,  # noqa: F401
                                        _like, _site_tap, _zeros_B, ghost_plan, site_grads)
from prunejax.scores.output import (as_float, check_batch, checked_labels, cross_entropy,
                                    el2n_from_logits, finish_scores)
from prunejax.types import ApplyFn, Batch, Params, Scores

__all__ = ["GhostPlan", "METHODS", "ghost_plan", "grand", "grand_jacrev", "grand_last_layer",
           "grand_vmap"]

METHODS = ("auto", "ghost", "vmap")

# Elements of per-example gradients of directly differentiated leaves (B x their size) allowed at
# once, besides a full gradient's worth; past it they go ``chunk_size`` rows at a time.
_MATERIALIZED_BUDGET = 1 << 20


# ----------------------------------------------------------------------------------------------
# Per-example squared gradient norms.
# ----------------------------------------------------------------------------------------------


def _example_losses(logits_BxC: jax.Array, y_B: jax.Array, w_B: jax.Array) -> jax.Array:
  """Cross-entropy of each row, 0 where ``w_B`` is False (padding, labels outside the classes)."""
  return jnp.where(w_B, cross_entropy(as_float(logits_BxC), y_B), 0.0)


def _site_sq_norms(plan: GhostPlan, params: Params, cts: dict) -> jax.Array:
  """Each example's squared gradient norm over the broadcast leaves (:func:`site_grads`)."""
  return sum(jnp.sum(jnp.square(g.astype(ghost_norms.norm_dtype(g.dtype))),
                     axis=tuple(range(1, g.ndim))) for g in site_grads(plan, params, cts).values())


def _ghost_sq_norms(apply_fn: ApplyFn, plan: GhostPlan, params: Params, x: Any, y_B: jax.Array,
                    w_B: jax.Array, chunk_size: int) -> jax.Array:
  lp = plan.layers

  def loss(dummies):
    layer_taps = {k: _layer_tap(lp.layers[k], form, dummies["layers"][k])
                  for k, form in plan.ghost.items()}
    site_taps = {key: _site_tap(dummies["sites"][key], lp.batch_size) for key in plan.sites}
    (logits_BxC,), _ = lt.run(lp, params, x, layer_taps=layer_taps, site_taps=site_taps)
    return jnp.sum(_example_losses(logits_BxC, y_B, w_B))

  grads = jax.grad(loss)(_dummies(plan, x))
  sq_B = sum(grads["layers"].values())
  if plan.sites:
    sq_B = sq_B + _site_sq_norms(plan, params, grads["sites"])
  if plan.materialized:
    leaves = jax.tree.leaves(params)
    size = sum(math.prod(jnp.shape(leaves[i])) for i in plan.materialized)
    total = sum(math.prod(jnp.shape(leaf)) for leaf in leaves)
    # Materialized leaves cost B x their size; past a full gradient's worth, go in chunks.
    chunk = None if size * lp.batch_size <= max(total, _MATERIALIZED_BUDGET) else chunk_size
    sq_B = sq_B + _vmap_sq_norms(apply_fn, params, x, y_B, w_B, chunk, plan.materialized)
  return sq_B


def _map_chunks(fn: Callable, chunk_size: int | None, *batched: Any) -> jax.Array:
  """``vmap(fn)`` over the leading axis, ``chunk_size`` rows at a time (all at once if None)."""
  n = jax.tree.leaves(batched)[0].shape[0]
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(fn)(*batched)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n

  def split(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((num_chunks, chunk_size) + a.shape[1:])

  out = lax.map(lambda args: jax.vmap(fn)(*args), jax.tree.map(split, batched))
  return out.reshape((num_chunks * chunk_size,) + out.shape[2:])[:n]


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def _vmap_sq_norms(apply_fn: ApplyFn, params: Params, x: Any, y_B: jax.Array, w_B: jax.Array,
                   chunk_size: int | None, leaf_ids: tuple[int, ...] | None = None) -> jax.Array:
  """``vmap(grad)`` of the one-example loss with respect to ``leaf_ids`` (all float leaves)."""
  leaves = jax.tree.leaves(params)
  ids = [i for i, l in enumerate(leaves) if _is_float(l)] if leaf_ids is None else list(leaf_ids)
  grads_of = example_grads(apply_fn, params, ids)

  def example(x1, y1, w1):
    return sum((jnp.sum(jnp.square(g.astype(ghost_norms.norm_dtype(g.dtype))))
                for g in grads_of(x1, y1, w1)), 0.0)

  return _map_chunks(example, chunk_size, x, y_B, w_B)


def example_grads(apply_fn: ApplyFn, params: Params, ids: list[int]):
  """``(x1, y1, w1) -> [grad]``: the gradients of one example's loss with respect to the leaves
  ``ids`` of ``params`` (in ``jax.tree.leaves`` order), for ``vmap``."""
  leaves, treedef = jax.tree.flatten(params)

  def grads(x1, y1, w1):
    def loss_fn(selected):
      vals = list(leaves)
      for i, v in zip(ids, selected):
        vals[i] = v
      logits_1xC = apply_fn(jax.tree.unflatten(treedef, vals), jax.tree.map(lambda a: a[None], x1))
      return _example_losses(logits_1xC, y1[None], w1[None])[0]

    return jax.grad(loss_fn)([leaves[i] for i in ids])
  return grads


# ----------------------------------------------------------------------------------------------
# Public scores.
# ----------------------------------------------------------------------------------------------


def _varying_axes(a: Any) -> frozenset:
  aval = jax.typeof(a)
  manual = getattr(aval, "manual_axis_type", None)
  return frozenset(manual.varying) if manual is not None else frozenset(getattr(aval, "vma", ()))


def _vary_like(params: Params, x: Any) -> Params:
  """Inside ``shard_map``: ``params`` marked as varying over the manual axes the batch varies
  over. JAX sums the gradient of a value that does not vary over the shards, which would add up
  the per-example gradients of different shards."""
  want = _varying_axes(jax.tree.leaves(x)[0])
  if not want:
    return params

  def leaf(a):
    missing = tuple(sorted(want - _varying_axes(a)))
    if not missing:
      return a
    return lax.pcast(a, missing, to="varying") if hasattr(lax, "pcast") else lax.pvary(a, missing)

  return jax.tree.map(leaf, params)


def _auto_axes(fn: Callable[[Params, Batch], jax.Array], params: Params,
               batch: Batch) -> jax.Array:
  """``fn(params, batch) -> f[B]``, inside ``jax.sharding.auto_axes`` when an argument is typed on
  an explicit-axes mesh (``jax.make_mesh``): the walk replays ``apply_fn``'s jaxpr and its taps
  reshape per-example rows, which explicit sharding types would have to spell out op by op. The
  result is sharded like the labels."""
  explicit = [s for s in map(layer_rows.explicit_sharding, jax.tree.leaves((params, batch)))
              if s is not None]
  if not explicit:
    return fn(params, batch)
  y_sharding = layer_rows.explicit_sharding(batch["y"])
  lead = y_sharding.spec[0] if y_sharding is not None and len(y_sharding.spec) else None
  out = jax.sharding.NamedSharding(explicit[0].mesh, jax.sharding.PartitionSpec(lead))
  return jax.sharding.auto_axes(fn, out_sharding=out)(params, batch)


def _labels(apply_fn: ApplyFn, params: Params, batch: Batch,
            num_classes: int | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(y_B, valid_B, w_B)``: safe labels, which are in ``[0, C)``, and which rows count."""
  check_batch(batch)
  if num_classes is None:
    num_classes = jax.eval_shape(apply_fn, params, batch["x"]).shape[-1]
  y_B, valid_B = checked_labels(batch["y"], num_classes)
  real_B = batch["mask"].astype(bool) if "mask" in batch else jnp.ones_like(y_B, bool)
  return y_B, valid_B, real_B & valid_B


def grand(apply_fn: ApplyFn, params: Params, batch: Batch, *, method: str = "auto",
          chunk_size: int = 32) -> Scores:
  """GraNd: the exact L2 norm of each example's cross-entropy gradient over all parameters.

  ``||grad_params CE(apply_fn(params, x_i), y_i)||_2``, over every float leaf of ``params`` (leaves
  behind ``stop_gradient``, such as BatchNorm statistics, contribute 0). High means hard.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``, any JAX function whose rows are independent.
    params: the parameters ``apply_fn`` takes; the gradient is taken with respect to all of them.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.
    method: ``"ghost"`` (one forward and one backward pass with per-layer taps, see the module
      doc), ``"vmap"`` (chunked ``vmap(grad)``) or ``"auto"``: ghost when ``apply_fn`` has at least
      one dense, conv or embedding layer the walk recognises, else vmap.
    chunk_size: examples whose full gradients may be alive at once (vmap path, and the ghost path's
      directly differentiated leaves when they are large).

  Returns:
    f32[B] (the params' dtype when wider), 0 on padding rows, NaN on rows whose label is outside
    ``[0, C)``.

  References:
    Paul, Ganguli, Dziugaite. "Deep Learning on a Data Diet: Finding Important Examples Early in
    Training." NeurIPS 2021.
  """
  check_choice("grand.method", method, METHODS)
  check_positive_int("grand.chunk_size", chunk_size)

  def scores_B(params, batch):
    params = _vary_like(params, batch["x"])
    plan = ghost_plan(apply_fn, params, batch["x"]) if method != "vmap" else None
    if method == "ghost" and not plan.ghost:
      raise ConfigError("grand.method='ghost' found no dense, conv or embedding layer in "
                        "apply_fn; use method='auto' or 'vmap'")
    y_B, valid_B, w_B = _labels(apply_fn, params, batch, plan.num_classes if plan else None)
    if plan is not None and plan.ghost:
      sq_B = _ghost_sq_norms(apply_fn, plan, params, batch["x"], y_B, w_B, chunk_size)
    else:
      sq_B = _vmap_sq_norms(apply_fn, params, batch["x"], y_B, w_B, chunk_size)
    return finish_scores(jnp.sqrt(jnp.maximum(sq_B, 0.0)), batch, valid_B)

  return _auto_axes(scores_B, params, batch)


def grand_vmap(apply_fn: ApplyFn, params: Params, batch: Batch, *,
               chunk_size: int | None = None) -> Scores:
  """GraNd by ``vmap(grad)`` of the one-example loss: all ``B`` full gradients at once when
  ``chunk_size`` is None. The reference the fast path is measured against.

  References:
    Paul, Ganguli, Dziugaite. NeurIPS 2021.
  """
  params = _vary_like(params, batch["x"])
  y_B, valid_B, w_B = _labels(apply_fn, params, batch)
  sq_B = _vmap_sq_norms(apply_fn, params, batch["x"], y_B, w_B, chunk_size)
  return finish_scores(jnp.sqrt(sq_B), batch, valid_B)


def grand_jacrev(apply_fn: ApplyFn, params: Params, batch: Batch) -> Scores:
  """GraNd as Data Diet computes it: ``jacrev`` of the vector of per-example losses of the
  batched forward pass, i.e. the full ``B x P`` Jacobian, then row norms.

  References:
    Paul, Ganguli, Dziugaite. NeurIPS 2021 (github.com/mansheej/data_diet).
  """
  params = _vary_like(params, batch["x"])
  leaves, treedef = jax.tree.flatten(params)
  float_idx = [i for i, l in enumerate(leaves) if _is_float(l)]
  y_B, valid_B, w_B = _labels(apply_fn, params, batch)

  def losses_B(float_leaves):
    vals = list(leaves)
    for i, v in zip(float_idx, float_leaves):
      vals[i] = v
    return _example_losses(apply_fn(jax.tree.unflatten(treedef, vals), batch["x"]), y_B, w_B)

  jac = jax.jacrev(losses_B)([leaves[i] for i in float_idx])
  b = y_B.shape[0]
  sq_B = sum((jnp.sum(jnp.square(j), axis=tuple(range(1, j.ndim))) for j in jac), 0.0)
  return finish_scores(jnp.sqrt(sq_B), batch, valid_B)


def grand_last_layer(apply_fn: ApplyFn, params: Params, batch: Batch, *,
                     features_fn: Callable[[Params, Any], jax.Array] | None = None,
                     bias: bool | None = None) -> Scores:
  """GraNd restricted to a linear head, in closed form: ``el2n * sqrt(||h||^2 + 1)``.

  For ``logits = W h + b`` the per-example gradient is ``(softmax - onehot) h^T`` for ``W`` and
  ``softmax - onehot`` for ``b``, so its norm is ``EL2N * sqrt(||h||^2 + 1)`` (``+ 0`` without a
  bias). One forward pass; an approximation of :func:`grand` that ignores every other layer.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: the parameters ``apply_fn`` takes.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.
    features_fn: ``features_fn(params, x) -> h_BxD``, the head's input. By default it is found in
      ``apply_fn`` as the input of its last dense layer (see :func:`penultimate`).
    bias: whether the head has a bias; found with the head by default, else True.

  Returns:
    f32[B], 0 on padding rows, NaN on rows whose label is outside ``[0, C)``.

  References:
    Guo, Zhao, Bai. "DeepCore: A Comprehensive Library for Coreset Selection in Deep Learning."
    DEXA 2022.
    Paul, Ganguli, Dziugaite. NeurIPS 2021.
  """
  if features_fn is None:
    h_BxD, logits_BxC, found_bias = penultimate(apply_fn, params, batch["x"])
    bias = found_bias if bias is None else bias
  else:
    h_BxD = features_fn(params, batch["x"]).reshape(batch["y"].shape[0], -1)
    logits_BxC = apply_fn(params, batch["x"])
    bias = True if bias is None else bias
  y_B, valid_B = checked_labels(batch["y"], logits_BxC.shape[-1])
  h_BxD = as_float(h_BxD)
  scores_B = el2n_from_logits(logits_BxC, y_B) * jnp.sqrt(
      jnp.sum(jnp.square(h_BxD), axis=-1) + (1.0 if bias else 0.0))
  return finish_scores(scores_B, batch, valid_B)
