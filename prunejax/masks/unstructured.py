"""Unstructured masks: magnitude, random and gradient-based (SNIP, GraSP, SynFlow, movement).

Each method computes a score pytree (higher = more important) and prunes the lowest scores with the
exact, sort-free select of :func:`prunejax.masks.core.threshold_mask`, either globally over all
prunable leaves or per leaf with a sparsity distribution (uniform, ERK or a custom map).

Gradient-based scores take ``apply_fn(params, x) -> logits`` with ``params`` the pytree that is
pruned (for a Flax model, ``lambda p, x: model.apply({"params": p}, x)``) and a batch dict with
``x``, ``y`` and optionally ``mask`` (False on padding rows, which add nothing to the loss).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

from prunejax import losses
from prunejax.errors import ConfigError, check_choice, check_positive_int
from prunejax.masks.core import (apply_mask, explicit_sharding, num_to_prune, ones_mask,
                                 resolve_filter, threshold_mask_flags)
from prunejax.masks.distributions import layer_sparsities
from prunejax.types import ApplyFn, Batch, FilterFn, Mask, Params, PyTree

SCOPES = ("global", "layerwise")
LossFn = Callable[[jax.Array, Batch], jax.Array]


def _size(leaf: Any) -> int:
  return math.prod(jnp.shape(leaf))


# ----------------------------------------------------------------------------------------------
# From scores to a mask.
# ----------------------------------------------------------------------------------------------


def prune_counts(tree: PyTree, sparsity: Any, *, scope: str = "global",
                 filter_fn: FilterFn | None = None,
                 distribution: str | Mapping[str, float] | None = None) -> Any:
  """How many weights :func:`mask_from_scores` removes: an int, or a per-leaf pytree of ints.

  Args: as :func:`mask_from_scores` (``tree`` gives the shapes).

  Returns:
    ``round(sparsity * n)`` over all ``n`` prunable entries for ``scope="global"``; for
    ``"layerwise"`` a pytree with ``round(s_l * n_l)`` on each prunable leaf and 0 elsewhere.
    Python ints for a concrete sparsity, int32 tracers for a traced one.

  Raises:
    ConfigError: a bad scope or distribution, a sparsity outside ``[0, 1]``, or a filter that
      selects no leaf.
  """
  return _prune_counts(tree, sparsity, scope, filter_fn, distribution,
                       resolve_filter(tree, filter_fn, what="prune_counts"))


def _prune_counts(tree, sparsity, scope, filter_fn, distribution, flags):
  check_choice("scope", scope, SCOPES)
  leaves, treedef = jax.tree.flatten(tree)
  if scope == "global":
    if distribution is not None:
      raise ConfigError(f"distribution={distribution!r} needs scope='layerwise'")
    return num_to_prune(sparsity, sum(_size(l) for l, f in zip(leaves, flags) if f))
  per_leaf = treedef.flatten_up_to(
      layer_sparsities(tree, sparsity, distribution or "uniform", filter_fn))
  return jax.tree.unflatten(treedef, [num_to_prune(s, _size(l)) if f else 0
                                      for s, l, f in zip(per_leaf, leaves, flags)])


def mask_from_scores(scores: PyTree, sparsity: Any, *, scope: str = "global",
                     filter_fn: FilterFn | None = None,
                     distribution: str | Mapping[str, float] | None = None) -> Mask:
  """Prunes the lowest scores to an exact sparsity.

  Args:
    scores: a pytree with the structure of the params; higher scores are kept.
    sparsity: fraction of prunable weights to remove, in ``[0, 1]``; may be traced (inside a jitted
      step), then the count is rounded in float32.
    scope: ``"global"``: exactly ``round(sparsity * n)`` of all ``n`` prunable weights are removed,
      wherever their scores are lowest; ``"layerwise"``: leaf ``l`` loses exactly
      ``round(s_l * n_l)`` weights, with ``s_l`` from ``distribution``.
    filter_fn: chooses the prunable leaves (default: weight matrices, conv kernels and embeddings
      of any framework, see :func:`~prunejax.masks.make_filter_fn`). It is resolved to one flag per
      leaf before anything is compiled, so any function object that selects the same leaves
      reuses the compiled mask.
    distribution: for ``scope="layerwise"`` only: ``"uniform"`` (default, ``s_l = sparsity``),
      ``"erk"``, or a ``{path: sparsity}`` map (see :mod:`prunejax.masks.distributions`).

  Returns:
    The mask; non-prunable leaves are all True.

  Raises:
    ConfigError: the filter selects no leaf (the error lists the leaves), or a bad argument.
  """
  flags = resolve_filter(scores, filter_fn, what="mask_from_scores")
  counts = _prune_counts(scores, sparsity, scope, filter_fn, distribution, flags)
  return threshold_mask_flags(scores, counts, flags)


@functools.partial(jax.jit, static_argnames=("flags",))
def _magnitude_mask(params, counts, flags):
  return threshold_mask_flags(jax.tree.map(jnp.abs, params), counts, flags)


@functools.partial(jax.jit, static_argnames=("flags",))
def _random_mask(key, params, counts, flags):
  leaves, treedef = jax.tree.flatten(params)
  scores = [jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(l),
                               out_sharding=explicit_sharding(l)) if f
            else jnp.zeros_like(l, jnp.float32) for i, (l, f) in enumerate(zip(leaves, flags))]
  return threshold_mask_flags(jax.tree.unflatten(treedef, scores), counts, flags)


# ----------------------------------------------------------------------------------------------
# Magnitude and random.
# ----------------------------------------------------------------------------------------------


def magnitude(params: Params, sparsity: Any, *, scope: str = "global",
              filter_fn: FilterFn | None = None,
              distribution: str | Mapping[str, float] | None = None) -> Mask:
  """Removes the weights of smallest ``|w|``.

  Args:
    params: the params.
    sparsity: fraction of prunable weights to remove (see :func:`mask_from_scores`).
    scope: ``"global"`` or ``"layerwise"``.
    filter_fn: chooses the prunable leaves.
    distribution: per-layer sparsities for ``scope="layerwise"``.

  Returns:
    The mask.

  References:
    Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks";
    Frankle and Carbin 2019, "The Lottery Ticket Hypothesis" (global magnitude pruning).
  """
  flags = resolve_filter(params, filter_fn, what="magnitude")
  counts = _prune_counts(params, sparsity, scope, filter_fn, distribution, flags)
  return _magnitude_mask(params, counts, flags)


def random(params: Params, sparsity: Any, *, key: jax.Array, scope: str = "global",
           filter_fn: FilterFn | None = None,
           distribution: str | Mapping[str, float] | None = None) -> Mask:
  """Removes uniformly random weights (exact count; independent of sharding).

  Args:
    params: the params (only shapes are used).
    sparsity: fraction of prunable weights to remove.
    key: a PRNG key; leaf ``i`` uses ``fold_in(key, i)``.
    scope: ``"global"`` or ``"layerwise"``.
    filter_fn: chooses the prunable leaves.
    distribution: per-layer sparsities for ``scope="layerwise"``.

  Returns:
    The mask.
  """
  flags = resolve_filter(params, filter_fn, what="random")
  counts = _prune_counts(params, sparsity, scope, filter_fn, distribution, flags)
  return _random_mask(key, params, counts, flags)


# ----------------------------------------------------------------------------------------------
# Gradient scores.
# ----------------------------------------------------------------------------------------------


def mean_cross_entropy(logits_BxC: jax.Array, batch: Batch) -> jax.Array:
  """Mean cross-entropy over the real rows of ``batch`` (``mask`` False rows add nothing): the one
  cross-entropy of :mod:`prunejax.losses`, in float32 or wider (float64 references stay float64)."""
  return losses.masked_mean(losses.cross_entropy(logits_BxC, batch["y"]), batch, weighted=False)


def _loss(apply_fn: ApplyFn, loss_fn: LossFn | None, temperature: float = 1.0):
  loss_fn = loss_fn or mean_cross_entropy

  def loss(params, batch):
    return loss_fn(apply_fn(params, batch["x"]) / temperature, batch)

  return loss


def snip_scores(apply_fn: ApplyFn, params: Params, batch: Batch, *,
                loss_fn: LossFn | None = None) -> PyTree:
  """SNIP connection sensitivity ``|theta * dL/dtheta|`` on one batch.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    params: the params at initialization.
    batch: a dict with ``x``, ``y`` and optionally ``mask``.
    loss_fn: ``loss_fn(logits, batch) -> scalar`` (default: mean cross-entropy over real rows).

  Returns:
    Scores with the structure of ``params``.

  References:
    Lee et al. 2019, "SNIP: Single-shot Network Pruning based on Connection Sensitivity", Eq. 6.
  """
  grads = jax.grad(_loss(apply_fn, loss_fn))(params, batch)
  return jax.tree.map(lambda p, g: jnp.abs(p * g), params, grads)


# apply_fn and loss_fn are static: pass the same function objects to reuse the compilation.
_snip_scores_jit = jax.jit(snip_scores, static_argnums=0, static_argnames=("loss_fn",))


def snip(apply_fn: ApplyFn, params: Params, batch: Batch, sparsity: Any, *,
         scope: str = "global", filter_fn: FilterFn | None = None,
         distribution: str | Mapping[str, float] | None = None,
         loss_fn: LossFn | None = None) -> Mask:
  """Removes the weights of lowest SNIP score (see :func:`snip_scores`)."""
  scores = _snip_scores_jit(apply_fn, params, batch, loss_fn=loss_fn)
  return mask_from_scores(scores, sparsity, scope=scope, filter_fn=filter_fn,
                          distribution=distribution)


def grasp_scores(apply_fn: ApplyFn, params: Params, batch: Batch, *,
                 loss_fn: LossFn | None = None, temperature: float = 1.0) -> PyTree:
  """GraSP scores ``S = -theta * (H g)``; the weights of *highest* ``S`` are removed.

  ``g`` is the loss gradient and ``H g`` the Hessian-gradient product, computed as one
  forward-over-reverse ``jax.jvp`` of ``jax.grad`` (the Hessian is never formed).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    params: the params at initialization.
    batch: a dict with ``x``, ``y`` and optionally ``mask``.
    loss_fn: ``loss_fn(logits, batch) -> scalar`` (default: mean cross-entropy over real rows).
    temperature: logits are divided by it (Wang et al. use 200; 1.0 is the plain loss).

  Returns:
    ``S`` with the structure of ``params``.

  References:
    Wang et al. 2020, "Picking Winning Tickets Before Training by Preserving Gradient Flow", Eq. 8.
  """
  loss = _loss(apply_fn, loss_fn, temperature)
  grad_fn = lambda p: jax.grad(loss)(p, batch)
  g = jax.lax.stop_gradient(grad_fn(params))
  _, hg = jax.jvp(grad_fn, (params,), (g,))
  return jax.tree.map(lambda p, h: -p * h, params, hg)


_grasp_scores_jit = jax.jit(grasp_scores, static_argnums=0,
                            static_argnames=("loss_fn", "temperature"))


def grasp(apply_fn: ApplyFn, params: Params, batch: Batch, sparsity: Any, *,
          scope: str = "global", filter_fn: FilterFn | None = None,
          distribution: str | Mapping[str, float] | None = None,
          loss_fn: LossFn | None = None, temperature: float = 1.0) -> Mask:
  """Removes the weights of highest GraSP score ``-theta * H g`` (see :func:`grasp_scores`)."""
  s = _grasp_scores_jit(apply_fn, params, batch, loss_fn=loss_fn, temperature=temperature)
  return mask_from_scores(jax.tree.map(jnp.negative, s), sparsity, scope=scope,
                          filter_fn=filter_fn, distribution=distribution)


def synflow_scores(apply_fn: ApplyFn, params: Params, input_shape: Sequence[int],
                   mask: Mask | None = None) -> PyTree:
  """SynFlow scores ``|theta| * dR/d|theta|`` with ``R = sum(f(1; |theta * mask|))``.

  Every parameter (biases included) is replaced by its absolute value, so a ReLU network becomes
  linear in positive inputs, and an all-ones input of ``input_shape`` is fed. No data is used. The
  scores obey the conservation law of Tanaka et al.: for a bias-free network the scores of every
  layer sum to ``R``. SynFlow is defined for networks of linear layers and ReLUs (MLPs, CNNs);
  BatchNorm, softmax attention and embeddings make it ill-defined.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    params: the params.
    input_shape: shape of the all-ones input, batch dimension included (e.g. ``(1, 28, 28, 1)``).
    mask: the current mask (pruned weights count as zero).

  Returns:
    Scores with the structure of ``params``.

  References:
    Tanaka et al. 2020, "Pruning neural networks without any data by iteratively conserving
    synaptic flow", Algorithm 1.
  """
  abs_params = jax.tree.map(jnp.abs, params)
  if mask is not None:
    abs_params = apply_mask(abs_params, mask)
  dtype = jax.tree.leaves(params)[0].dtype
  x = jnp.ones(tuple(input_shape), dtype)
  grads = jax.grad(lambda p: jnp.sum(apply_fn(p, x)))(abs_params)
  return jax.tree.map(lambda p, g: p * g, abs_params, grads)


def synflow(apply_fn: ApplyFn, params: Params, sparsity: float, input_shape: Sequence[int], *,
            rounds: int = 100, scope: str = "global", filter_fn: FilterFn | None = None,
            distribution: str | Mapping[str, float] | None = None) -> Mask:
  """Iterative SynFlow: ``rounds`` rounds of scoring and pruning, data-free.

  Round ``r`` (1-based) prunes to sparsity ``1 - (1 - sparsity) ** (r / rounds)`` (the exponential
  density schedule), re-scoring with the weights pruned so far masked out; pruned weights stay
  pruned. The last round reaches exactly ``round(sparsity * n)``.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    params: the params (at initialization).
    sparsity: the final sparsity (concrete).
    input_shape: shape of the all-ones input, batch dimension included.
    rounds: number of pruning rounds (100 in Tanaka et al.).
    scope: ``"global"`` (as in the paper) or ``"layerwise"``.
    filter_fn: chooses the prunable leaves.
    distribution: per-layer sparsities for ``scope="layerwise"``.

  Returns:
    The mask.

  References:
    Tanaka et al. 2020, "Pruning neural networks without any data by iteratively conserving
    synaptic flow", Algorithm 1.
  """
  check_positive_int("rounds", rounds)
  num_to_prune(sparsity, 1)
  flags = resolve_filter(params, filter_fn, what="synflow")

  @jax.jit
  def one_round(params, mask, counts):
    scores = synflow_scores(apply_fn, params, input_shape, mask)
    # Already-pruned weights rank below everything, so masks only ever shrink.
    scores = jax.tree.map(lambda s, m: jnp.where(m, s, -jnp.inf), scores, mask)
    return threshold_mask_flags(scores, counts, flags)

  mask = ones_mask(params)
  for r in range(1, rounds + 1):
    s_r = sparsity if r == rounds else 1.0 - (1.0 - float(sparsity)) ** (r / rounds)
    counts = _prune_counts(params, s_r, scope, filter_fn, distribution, flags)
    mask = one_round(params, mask, counts)
  return mask


def movement_scores(params: Params, grads: PyTree) -> PyTree:
  """One step of movement-pruning importance, ``-theta * dL/dtheta``; sum it over steps.

  A weight moving away from zero (gradient opposite in sign to the weight) gains importance.

  References:
    Sanh et al. 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning", Eq. 3.
  """
  return jax.tree.map(lambda p, g: -p * g, params, grads)


def movement(scores: PyTree, sparsity: Any, *, scope: str = "global",
             filter_fn: FilterFn | None = None,
             distribution: str | Mapping[str, float] | None = None) -> Mask:
  """Removes the weights of lowest accumulated movement score (see :func:`movement_scores`).

  Args:
    scores: ``sum_t movement_scores(params_t, grads_t)``, the structure of the params.
    sparsity: fraction of prunable weights to remove.
    scope: ``"global"`` or ``"layerwise"``.
    filter_fn: chooses the prunable leaves.
    distribution: per-layer sparsities for ``scope="layerwise"``.

  Returns:
    The mask.

  References:
    Sanh et al. 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning".
  """
  return mask_from_scores(scores, sparsity, scope=scope, filter_fn=filter_fn,
                          distribution=distribution)
