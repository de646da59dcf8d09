"""Structured masks: whole output neurons, conv channels and attention heads, and N:M patterns.

A structured mask removes a unit entirely: the kernel column of an output neuron (or channel) *and*
its bias entry, so the unit's pre-activation is exactly zero. For activations with ``f(0) = 0``
(ReLU, GELU) the unit then outputs zero and the model equals the physically smaller model that
:func:`prunejax.masks.compact.compact` builds. (BatchNorm after a pruned conv channel outputs its
shift, not zero: such models need their norm parameters masked too and are not compacted here.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError, check_choice
from prunejax.masks.core import (make_filter_fn, num_to_prune, ordered_key, path_names,
                                 threshold_mask)
from prunejax.types import FilterFn, Mask, Params, PyTree

CRITERIA = ("l1", "l2")
SCOPES = ("layerwise", "global")

structured_filter_fn: FilterFn = make_filter_fn(prune_head=False, names=("kernel",))
"""Default for structured masks: kernels, never the classifier head (its outputs are classes)."""


def _flat(tree):
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [path_names(p) for p, _ in path_leaves]
  return [p for p, _ in path_leaves], [l for _, l in path_leaves], names, treedef


def _group_score(x: jax.Array, axes: tuple[int, ...], criterion: str | None) -> jax.Array:
  if criterion is None:  # a score pytree: sum of the scores of the group.
    return jnp.sum(x, axis=axes)
  if criterion == "l1":
    return jnp.sum(jnp.abs(x), axis=axes)
  return jnp.sum(jnp.square(x), axis=axes)  # the squared L2 norm ranks units like the norm.


def _everything(path, leaf) -> bool:
  return True


def _unit_counts(units: Sequence[int], sparsity: Any, scope: str) -> Any:
  """Units to remove: one count over all layers (``"global"``) or one per layer."""
  check_choice("scope", scope, SCOPES)
  if scope == "global":
    return num_to_prune(sparsity, sum(units))
  return [num_to_prune(sparsity, u) for u in units]


def neurons(params: Params, sparsity: Any, *, criterion: str = "l2", scores: PyTree | None = None,
            scope: str = "layerwise", filter_fn: FilterFn | None = None) -> Mask:
  """Removes whole output units (last kernel axis): neurons of Dense layers, channels of Convs.

  Unit ``j`` of a kernel of shape ``(..., out)`` is scored by the L1 or L2 norm of
  ``kernel[..., j]`` (or by the sum of ``scores[..., j]``). Exactly ``round(sparsity * out)`` units
  of each kernel (``scope="layerwise"``) or ``round(sparsity * total units)`` over all kernels
  (``"global"``) are removed, ties going to the lower unit index; the mask is False on their kernel
  entries and on the matching entries of the sibling ``bias`` leaf.

  Args:
    params: the params.
    sparsity: fraction of units to remove, in ``[0, 1]``.
    criterion: ``"l1"`` or ``"l2"``; ignored when ``scores`` is given.
    scores: optional importance pytree with the structure of ``params`` (e.g. SNIP scores).
    scope: ``"layerwise"`` or ``"global"``.
    filter_fn: chooses the kernels (default :data:`structured_filter_fn`: every kernel but the
      head's). For a GPT-style model pick the MLP, e.g. ``make_filter_fn(include=[r"mlp_fc/"])``.

  Returns:
    The mask.

  References:
    Li et al. 2017, "Pruning Filters for Efficient ConvNets" (L1-norm filter pruning).
  """
  check_choice("criterion", criterion, CRITERIA)
  filter_fn = filter_fn or structured_filter_fn
  paths, leaves, _, _ = _flat(params)
  chosen = tuple(i for i, (p, l) in enumerate(zip(paths, leaves))
                 if filter_fn(p, l) and jnp.ndim(l) >= 2)
  counts = _unit_counts([jnp.shape(leaves[i])[-1] for i in chosen], sparsity, scope)
  return _neurons_mask(params, scores, counts, chosen=chosen,
                       criterion=None if scores is not None else criterion)


@functools.partial(jax.jit, static_argnames=("chosen", "criterion"))
def _neurons_mask(params, scores, counts, *, chosen, criterion):
  _, leaves, names, treedef = _flat(params)
  score_leaves = leaves if scores is None else treedef.flatten_up_to(scores)
  index = {n: i for i, n in enumerate(names)}
  unit_scores = [_group_score(score_leaves[i], tuple(range(jnp.ndim(leaves[i]) - 1)), criterion)
                 for i in chosen]
  keep = threshold_mask(unit_scores, counts, filter_fn=_everything) if chosen else []
  out = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  for i, keep_U in zip(chosen, keep):
    out[i] = jnp.broadcast_to(keep_U, jnp.shape(leaves[i]))
    b = index.get(names[i][:-1] + ("bias",))
    if b is not None and jnp.shape(leaves[b]) == keep_U.shape:
      out[b] = keep_U
  return jax.tree.unflatten(treedef, out)


channels = neurons
"""Conv channels are the output units of conv kernels ``(h, w, in, out)``: see :func:`neurons`."""


def _attention_modules(params, filter_fn, names, num_heads):
  """``((query, key, value, out) leaf indices, heads)`` of every attention module, validated."""
  q_name, k_name, v_name, o_name = names
  paths, leaves, leaf_names, _ = _flat(params)
  index = {n: i for i, n in enumerate(leaf_names)}
  modules = []
  for i, n in enumerate(leaf_names):
    if not (len(n) >= 2 and n[-2:] == (q_name, "kernel") and filter_fn(paths[i], leaves[i])):
      continue
    ids = tuple(index.get(n[:-2] + (c, "kernel")) for c in (q_name, k_name, v_name, o_name))
    if None in ids:
      continue
    where = "/".join(n[:-2])
    counts = set()
    for j, leaf_id in enumerate(ids):
      shape = jnp.shape(leaves[leaf_id])
      axis = 0 if j == 3 else 1
      if len(shape) == 3:
        counts.add(shape[axis])
      elif len(shape) == 2:
        if num_heads is None:
          raise ConfigError(f"heads: 2-D attention kernels need num_heads ({where})")
        if shape[axis] % num_heads:
          raise ConfigError(f"heads: {where} kernel of shape {shape} does not split into "
                            f"num_heads={num_heads}")
        counts.add(num_heads)
      else:
        raise ConfigError(f"heads: {where} kernel has shape {shape}; expected 2-D or 3-D")
    if len(counts) != 1:
      raise ConfigError(f"heads: {where} projections disagree on the number of heads")
    modules.append((ids, counts.pop()))
  return tuple(modules)


def heads(params: Params, sparsity: Any, *, num_heads: int | None = None, criterion: str = "l2",
          scores: PyTree | None = None, scope: str = "layerwise",
          filter_fn: FilterFn | None = None,
          names: Sequence[str] = ("query", "key", "value", "out")) -> Mask:
  """Removes whole attention heads.

  An attention module is a node with children ``query``, ``key``, ``value`` and ``out`` (``names``)
  each holding a ``kernel``. Their kernels are either 2-D (Dense: ``q/k/v`` of shape
  ``(D, H * hd)``, ``out`` of shape ``(H * hd, D)``; ``num_heads`` required) or 3-D (DenseGeneral
  as in ``flax.linen.MultiHeadDotProductAttention``: ``(D, H, hd)`` and ``(H, hd, D)``). A head is
  scored by the norm of all its q/k/v columns and out rows together (or the sum of ``scores``
  there); the mask is False on those entries and on the head's q/k/v bias entries, so the head
  outputs zero.

  Args:
    params: the params.
    sparsity: fraction of heads to remove, per module (``"layerwise"``) or over all (``"global"``).
    num_heads: heads per module, for 2-D kernels.
    criterion: ``"l1"`` or ``"l2"``; ignored when ``scores`` is given.
    scores: optional importance pytree with the structure of ``params``.
    scope: ``"layerwise"`` or ``"global"``.
    filter_fn: an attention module is pruned if its query kernel passes (default: not the head).
    names: child names of the query, key, value and output projections.

  Returns:
    The mask.

  References:
    Michel et al. 2019, "Are Sixteen Heads Really Better than One?".
  """
  check_choice("criterion", criterion, CRITERIA)
  names = tuple(names)
  modules = _attention_modules(params, filter_fn or structured_filter_fn, names, num_heads)
  counts = _unit_counts([h for _, h in modules], sparsity, scope)
  return _heads_mask(params, scores, counts, modules=modules,
                     criterion=None if scores is not None else criterion, names=names)


@functools.partial(jax.jit, static_argnames=("modules", "criterion", "names"))
def _heads_mask(params, scores, counts, *, modules, criterion, names):
  _, leaves, leaf_names, treedef = _flat(params)
  score_leaves = leaves if scores is None else treedef.flatten_up_to(scores)
  index = {n: i for i, n in enumerate(leaf_names)}

  def to_heads(x, h, is_out):  # [..] -> [H, rest]
    if is_out:
      return x.reshape((h, -1))
    return jnp.moveaxis(x.reshape((x.shape[0], h, -1)), 1, 0).reshape((h, -1))

  def from_heads(keep_H, shape, is_out):
    h = keep_H.shape[0]
    if is_out:
      return jnp.broadcast_to(keep_H[:, None], (h, math.prod(shape) // h)).reshape(shape)
    m = jnp.broadcast_to(keep_H[:, None, None], (h, shape[0], math.prod(shape[1:]) // h))
    return jnp.moveaxis(m, 0, 1).reshape(shape)

  head_scores = []
  for ids, h in modules:
    head_scores.append(sum(_group_score(to_heads(score_leaves[i], h, j == 3), (1,), criterion)
                           for j, i in enumerate(ids)))
  keep = threshold_mask(head_scores, counts, filter_fn=_everything) if modules else []
  out = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  for (ids, h), keep_H in zip(modules, keep):
    for j, i in enumerate(ids):
      out[i] = from_heads(keep_H, jnp.shape(leaves[i]), j == 3)
    base = leaf_names[ids[0]][:-2]
    for c in names[:3]:
      b = index.get(base + (c, "bias"))
      if b is not None and math.prod(jnp.shape(leaves[b])) % h == 0:
        out[b] = from_heads(keep_H, jnp.shape(leaves[b]), True)
  return jax.tree.unflatten(treedef, out)


def n_m(params: Params, n: int, m: int, *, scores: PyTree | None = None,
        filter_fn: FilterFn | None = None) -> Mask:
  """N:M sparsity: in every block of ``m`` consecutive weights along the input axis, keep ``n``.

  The input axis of a kernel is its second-to-last (Dense ``(in, out)``: rows; Conv
  ``(h, w, in, out)``: input channels), as sparse tensor cores expect (e.g. 2:4). Within a block the
  ``m - n`` entries of lowest ``|w|`` (or ``scores``) are removed, ties going to the lower index.

  Args:
    params: the params.
    n: weights kept per block.
    m: block length; the input dimension of every chosen kernel must be divisible by it.
    scores: optional importance pytree (default ``|params|``).
    filter_fn: chooses the kernels (default: every kernel, the head included).

  Returns:
    The mask.

  References:
    Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (2:4 structured sparsity).
  """
  if isinstance(m, bool) or not isinstance(m, int) or m < 1:
    raise ConfigError(f"m={m!r} is not allowed; expected a positive integer")
  if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= m:
    raise ConfigError(f"n={n!r} is not allowed; expected an integer in [0, m={m}]")
  filter_fn = filter_fn or _n_m_filter_fn
  paths, leaves, names, _ = _flat(params)
  chosen = tuple(i for i, (p, l) in enumerate(zip(paths, leaves))
                 if filter_fn(p, l) and jnp.ndim(l) >= 2)
  for i in chosen:
    if jnp.shape(leaves[i])[-2] % m:
      raise ConfigError(f"n_m: {'/'.join(names[i])} has input dimension "
                        f"{jnp.shape(leaves[i])[-2]}, not divisible by m={m}")
  return _n_m_mask(params, scores, chosen=chosen, n=n, m=m)


_n_m_filter_fn = make_filter_fn(names=("kernel",))


@functools.partial(jax.jit, static_argnames=("chosen", "n", "m"))
def _n_m_mask(params, scores, *, chosen, n, m):
  leaves, treedef = jax.tree.flatten(params)
  score_leaves = None if scores is None else treedef.flatten_up_to(scores)
  out = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  earlier = jnp.asarray(np.tri(m, k=-1, dtype=bool))  # earlier[i, j] = j < i
  for i in chosen:
    shape = jnp.shape(leaves[i])
    s = jnp.abs(leaves[i]) if score_leaves is None else score_leaves[i]
    key = jnp.moveaxis(ordered_key(s), -2, -1)
    moved = key.shape
    key = key.reshape(moved[:-1] + (shape[-2] // m, m))
    a, b = key[..., :, None], key[..., None, :]  # a: entry i, b: entry j of the same block.
    rank = jnp.sum((b < a) | ((b == a) & earlier), axis=-1)
    out[i] = jnp.moveaxis((rank >= m - n).reshape(moved), -1, -2)
  return jax.tree.unflatten(treedef, out)
