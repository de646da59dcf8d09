"""Structured masks: whole output neurons, conv channels and attention heads, and N:M patterns.

A structured mask removes a unit entirely: the kernel column of an output neuron (or channel) *and*
its bias entry, so the unit's pre-activation is exactly zero. For activations with ``f(0) = 0``
(ReLU, GELU) the unit then outputs zero and the model equals the physically smaller model that
:func:`prunejax.masks.compact.compact` builds. (BatchNorm after a pruned conv channel outputs its
shift, not zero: such models need their norm parameters masked too and are not compacted here.)

**Kernel layout.** Which axis of a weight holds the units depends on the framework (Flax, Haiku:
``(..., in, out)``; Equinox, PyTorch: ``(out, in, ...)``); ``layout`` says it per leaf, as
:mod:`prunejax.masks.layouts` describes, and a layout that disagrees with the sibling bias is an
error, never a prune along the wrong axis.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError, check_choice
from prunejax.masks.core import (check_mask, check_not_varying, make_filter_fn, num_to_prune,
                                 ordered_key, path_str, run_sharded, threshold_mask_flags)
# LAYOUTS is re-exported (prunejax.masks imports it from here).
from prunejax.masks.layouts import (BIAS_NAMES, IN_OUT_NAMES, LAYOUTS, OUT_IN_NAMES, Layout,
                                    _check_layout_arg, _chosen, _flat, leaf_layout,
                                    structured_filter_fn)
from prunejax.types import FilterFn, Mask, Params, PyTree

CRITERIA = ("l1", "l2")
SCOPES = ("layerwise", "global")
ATTENTION_NAMES = (("query", "key", "value", "out"),  # Flax linen and NNX.
                   ("query", "key", "value", "linear"),  # Haiku MultiHeadAttention.
                   ("query_proj", "key_proj", "value_proj", "output_proj"))  # Equinox.
"""Child names of the query, key, value and output projections that :func:`heads` looks for."""

_n_m_filter_fn = make_filter_fn(embeddings=False)


def _group_score(x: jax.Array, axes: tuple[int, ...], criterion: str | None) -> jax.Array:
  if criterion is None:  # a score pytree: sum of the scores of the group.
    return jnp.sum(x, axis=axes)
  if criterion == "l1":
    return jnp.sum(jnp.abs(x), axis=axes)
  return jnp.sum(jnp.square(x), axis=axes)  # the squared L2 norm ranks units like the norm.


def _check_scores(scores: PyTree | None, params: Params, what: str) -> None:
  if scores is not None:
    check_mask(scores, params, f"{what}: scores", bool_leaves=False)


def _unit_counts(units: Sequence[int], sparsity: Any, scope: str) -> Any:
  """Units to remove: one count over all layers (``"global"``) or one per layer."""
  check_choice("scope", scope, SCOPES)
  if scope == "global":
    return num_to_prune(sparsity, sum(units))
  return [num_to_prune(sparsity, u) for u in units]


# ----------------------------------------------------------------------------------------------
# Neurons and channels.
# ----------------------------------------------------------------------------------------------


def neurons(params: Params, sparsity: Any, *, criterion: str = "l2", scores: PyTree | None = None,
            scope: str = "layerwise", filter_fn: FilterFn | None = None,
            layout: Layout = "auto") -> Mask:
  """Removes whole output units: neurons of Dense / Linear layers, channels of Convs.

  Unit ``j`` of a weight is scored by the L1 or L2 norm of its slice along the unit axis
  (``kernel[..., j]`` for ``in_out``, ``weight[j]`` for ``out_in``; see ``layout``), or by the sum
  of ``scores`` there. Exactly ``round(sparsity * units)`` units of each weight
  (``scope="layerwise"``) or ``round(sparsity * total units)`` over all weights (``"global"``) are
  removed, ties going to the lower unit index; the mask is False on their weight entries and on
  the matching entries of the sibling bias (``bias`` or ``b``; ``b_in`` beside a plain-dict
  ``W_in``).

  Args:
    params: the params (Flax linen / NNX, Equinox, Haiku, a plain dict).
    sparsity: fraction of units to remove, in ``[0, 1]``.
    criterion: ``"l1"`` or ``"l2"``; ignored when ``scores`` is given.
    scores: optional importance pytree with the structure of ``params`` (e.g. SNIP scores).
    scope: ``"layerwise"`` or ``"global"``.
    filter_fn: chooses the weights. Default :data:`structured_filter_fn`: every weight but the
      classifier's, which it knows by the name ``head``; in a tree where the output layer has
      another name (``layers/2``, ``mlp/~/linear_1``) exclude it yourself, e.g.
      ``make_filter_fn(exclude=[r"^layers/2/"])``, or its units (the classes) are pruned too.
      For a GPT-style model pick the MLP, e.g. ``make_filter_fn(include=[r"mlp_fc/"])``.
    layout: ``"auto"``, ``"in_out"``, ``"out_in"`` or a ``{path regex: layout}`` map: which axis
      holds the units (see :mod:`prunejax.masks.layouts`).

  Returns:
    The mask.

  Raises:
    ConfigError: the filter selects nothing, or a layout is ambiguous or disagrees with its bias.

  References:
    Li et al. 2017, "Pruning Filters for Efficient ConvNets" (L1-norm filter pruning).
  """
  check_choice("criterion", criterion, CRITERIA)
  _check_scores(scores, params, "neurons")
  chosen = _chosen(params, filter_fn, layout, "neurons")
  leaves = jax.tree.leaves(params)
  units = [math.prod(jnp.shape(leaves[i])[a] for a in axes) for i, axes, _ in chosen]
  counts = _unit_counts(units, sparsity, scope)
  fn = functools.partial(_neurons_mask, chosen=chosen,
                         criterion=None if scores is not None else criterion)
  return jax.tree.unflatten(jax.tree.structure(params),
                            run_sharded(fn, (params, scores, counts), leaves))


def _to_units(x, axes):
  """``x`` with its unit axes moved to the front and the rest flattened: ``[units..., rest]``."""
  moved = jnp.moveaxis(x, axes, tuple(range(len(axes))))
  return moved.reshape(moved.shape[:len(axes)] + (-1,))


def _from_units(keep, shape, axes):
  """The mask of a weight of ``shape`` from the keep flags of its units (unit axes ``axes``)."""
  expand = [1] * len(shape)
  for a in axes:
    expand[a] = shape[a]
  return jnp.broadcast_to(keep.reshape(expand), shape)


@functools.partial(jax.jit, static_argnames=("chosen", "criterion"))
def _neurons_mask(params, scores, counts, *, chosen, criterion):
  leaves, treedef = jax.tree.flatten(params)
  score_leaves = leaves if scores is None else treedef.flatten_up_to(scores)
  unit_scores = [_group_score(_to_units(score_leaves[i], axes), (len(axes),), criterion)
                 for i, axes, _ in chosen]
  keep = threshold_mask_flags(unit_scores, counts, (True,) * len(chosen))
  out = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  for (i, axes, b), keep_U in zip(chosen, keep):
    out[i] = _from_units(keep_U, jnp.shape(leaves[i]), axes)
    if b is not None:
      out[b] = keep_U.reshape(jnp.shape(leaves[b]))
  return out


channels = neurons
"""Conv channels are the output units of conv kernels (``(h, w, in, out)`` in Flax and Haiku,
``(out, in, h, w)`` in Equinox and PyTorch): see :func:`neurons`."""


# ----------------------------------------------------------------------------------------------
# Attention heads.
# ----------------------------------------------------------------------------------------------


def _attention_modules(params, filter_fn, names, num_heads, layout):
  """``(((leaf, head axis, split) for q, k, v, out), biases, heads)`` of every attention module.

  ``split`` is True where the head axis holds ``H * head_dim`` entries (2-D projections) and
  False where it holds ``H`` (3-D DenseGeneral projections).
  """
  paths, leaves, _, _ = _flat(params)
  parts = [tuple(path_str(p).split("/")) for p in paths]  # Haiku's "mha/query" splits too.
  index = {n: i for i, n in enumerate(parts)}
  name_sets = ATTENTION_NAMES if names is None else (tuple(names),)
  modules = []
  for i, n in enumerate(parts):
    for q_name, k_name, v_name, o_name in name_sets:
      if not (len(n) >= 2 and n[-2] == q_name and n[-1] in IN_OUT_NAMES + OUT_IN_NAMES
              and filter_fn(paths[i], leaves[i])):
        continue
      ids = tuple(index.get(n[:-2] + (c, n[-1])) for c in (q_name, k_name, v_name, o_name))
      if None in ids:
        continue
      modules.append(_attention_module(n[:-2], ids, paths, leaves, index, num_heads, layout,
                                       (q_name, k_name, v_name)))
      break
  return tuple(modules)


def _attention_module(base, ids, paths, leaves, index, num_heads, layout, qkv_names):
  where = "/".join(base) or "<root>"
  layouts = {leaf_layout(paths[i], leaves[i], layout, what="heads") for i in ids}
  if len(layouts) != 1:
    raise ConfigError(f"heads: the projections of {where} have different layouts {layouts}")
  lay = layouts.pop()
  other = "out_in" if lay == "in_out" else "in_out"
  shapes = [tuple(jnp.shape(leaves[i])) for i in ids]
  ndims = {len(s) for s in shapes}
  if lay == "in_out" and ndims == {3}:  # DenseGeneral: q/k/v (D, H, hd), out (H, hd, D).
    axes = ((1, False),) * 3 + ((0, False),)
    inner = {s[1:] for s in shapes[:3]} | {shapes[3][:2]}
  elif ndims == {2}:  # in_out: q/k/v (D, H * hd), out (H * hd, D); out_in: transposed.
    qkv_axis, out_axis = (1, 0) if lay == "in_out" else (0, 1)
    axes = ((qkv_axis, True),) * 3 + ((out_axis, True),)
    inner = {s[qkv_axis] for s in shapes[:3]} | {shapes[3][out_axis]}
  else:
    raise ConfigError(f"heads: {where} projections have shapes {shapes}; expected 2-D kernels "
                      "(any layout) or 3-D DenseGeneral kernels (layout 'in_out')")
  if len(inner) != 1:
    raise ConfigError(f"heads: with layout '{lay}' the projections of {where} (shapes {shapes}) "
                      f"disagree on the attention width; the layout looks wrong: pass "
                      f"layout='{other}'")
  inner = inner.pop()
  if ndims == {3}:
    h, width = inner[0], math.prod(inner)
  else:
    if num_heads is None:
      raise ConfigError(f"heads: 2-D attention kernels need num_heads ({where})")
    if inner % num_heads:
      raise ConfigError(f"heads: {where} kernel of shape {shapes[0]} does not split into "
                        f"num_heads={num_heads}")
    h, width = num_heads, inner
  biases = []
  for c in qkv_names:
    for b in BIAS_NAMES:
      j = index.get(base + (c, b))
      if j is not None:
        if math.prod(jnp.shape(leaves[j])) != width:
          raise ConfigError(f"heads: with layout '{lay}' the {c} projection of {where} has "
                            f"{width} outputs but its bias has shape {tuple(jnp.shape(leaves[j]))};"
                            f" the layout looks wrong: pass layout='{other}'")
        biases.append(j)
  return tuple(zip(ids, axes)), tuple(biases), h


def heads(params: Params, sparsity: Any, *, num_heads: int | None = None, criterion: str = "l2",
          scores: PyTree | None = None, scope: str = "layerwise",
          filter_fn: FilterFn | None = None, names: Sequence[str] | None = None,
          layout: Layout = "auto") -> Mask:
  """Removes whole attention heads.

  An attention module is a node with query, key, value and output projection children each
  holding a weight: ``query/key/value/out`` with ``kernel`` (Flax linen and NNX),
  ``query/key/value/linear`` with ``w`` (Haiku ``MultiHeadAttention``) or
  ``query_proj/key_proj/value_proj/output_proj`` with ``weight`` (Equinox
  ``MultiheadAttention``); ``names`` picks one set. The projections are either 2-D (``in_out``:
  ``q/k/v`` of shape ``(D, H * hd)``, ``out`` of shape ``(H * hd, D)``; ``out_in``: transposed;
  ``num_heads`` required) or 3-D (``DenseGeneral`` as in ``flax.linen.MultiHeadDotProductAttention``
  and ``nnx.MultiHeadAttention``: ``(D, H, hd)`` and ``(H, hd, D)``). A head is scored by the norm
  of all its q/k/v outputs and out inputs together (or the sum of ``scores`` there); the mask is
  False on those entries and on the head's q/k/v bias entries, so the head outputs zero.

  Args:
    params: the params.
    sparsity: fraction of heads to remove, per module (``"layerwise"``) or over all (``"global"``).
    num_heads: heads per module, for 2-D kernels.
    criterion: ``"l1"`` or ``"l2"``; ignored when ``scores`` is given.
    scores: optional importance pytree with the structure of ``params``.
    scope: ``"layerwise"`` or ``"global"``.
    filter_fn: an attention module is pruned if its query weight passes (default: not the head).
    names: child names of the query, key, value and output projections (default: every set of
      :data:`ATTENTION_NAMES`).
    layout: ``"auto"`` (by the weight's name), ``"in_out"``, ``"out_in"`` or a map; see the module
      doc.

  Returns:
    The mask.

  Raises:
    ConfigError: no attention module is found, or its shapes, heads or layout do not fit.

  References:
    Michel et al. 2019, "Are Sixteen Heads Really Better than One?".
  """
  check_choice("criterion", criterion, CRITERIA)
  _check_layout_arg(layout)
  _check_scores(scores, params, "heads")
  filter_fn = filter_fn or structured_filter_fn
  modules = _attention_modules(params, filter_fn, names, num_heads, layout)
  if not modules:
    sets = ATTENTION_NAMES if names is None else (tuple(names),)
    raise ConfigError(f"heads: no attention module (children {' or '.join(map(str, sets))} each "
                      f"with a kernel, w or weight) passes filter_fn in these params "
                      f"({', '.join(path_str(p) for p in _flat(params)[0][:12])}); pass names=")
  leaves = jax.tree.leaves(params)
  check_not_varying([leaves[i] for m in modules for i, _ in m[0]], "heads")
  counts = _unit_counts([h for _, _, h in modules], sparsity, scope)
  fn = functools.partial(_heads_mask, modules=modules,
                         criterion=None if scores is not None else criterion)
  return jax.tree.unflatten(jax.tree.structure(params),
                            run_sharded(fn, (params, scores, counts), leaves))


def _split_heads(shape, axis, split, h):
  """The shape of a projection with its head axis split out: ``[..., H, (hd), ...]``."""
  if not split:
    return shape
  return shape[:axis] + (h, shape[axis] // h) + shape[axis + 1:]


@functools.partial(jax.jit, static_argnames=("modules", "criterion"))
def _heads_mask(params, scores, counts, *, modules, criterion):
  leaves, treedef = jax.tree.flatten(params)
  score_leaves = leaves if scores is None else treedef.flatten_up_to(scores)

  def to_heads(x, axis, split, h):  # -> [H, rest]
    y = x.reshape(_split_heads(x.shape, axis, split, h))
    return jnp.moveaxis(y, axis, 0).reshape((h, -1))

  def from_heads(keep_H, shape, axis, split):
    h = keep_H.shape[0]
    split_shape = _split_heads(shape, axis, split, h)
    expand = [1] * len(split_shape)
    expand[axis] = h
    return jnp.broadcast_to(keep_H.reshape(expand), split_shape).reshape(shape)

  head_scores = []
  for projections, _, h in modules:
    head_scores.append(sum(_group_score(to_heads(score_leaves[i], a, s, h), (1,), criterion)
                           for i, (a, s) in projections))
  keep = threshold_mask_flags(head_scores, counts, (True,) * len(modules))
  out = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  for (projections, biases, h), keep_H in zip(modules, keep):
    for i, (a, s) in projections:
      out[i] = from_heads(keep_H, jnp.shape(leaves[i]), a, s)
    for b in biases:
      out[b] = from_heads(keep_H, jnp.shape(leaves[b]), 0, jnp.ndim(leaves[b]) == 1)
  return out


# ----------------------------------------------------------------------------------------------
# N:M.
# ----------------------------------------------------------------------------------------------


def n_m(params: Params, n: int, m: int, *, scores: PyTree | None = None,
        filter_fn: FilterFn | None = None, layout: Layout = "auto") -> Mask:
  """N:M sparsity: in every block of ``m`` consecutive weights along the input axis, keep ``n``.

  The input axis is the one before the output axes for ``in_out`` weights (Dense ``(in, out)``:
  rows; Conv ``(h, w, in, out)``: input channels) and axis 1 for ``out_in`` weights (Linear
  ``(out, in)``, Conv ``(out, in, h, w)``), as sparse tensor cores expect (e.g. 2:4). Within a block
  the ``m - n`` entries of lowest ``|w|`` (or ``scores``) are removed, ties going to the lower
  index.

  Args:
    params: the params.
    n: weights kept per block.
    m: block length; the input dimension of every chosen weight must be divisible by it.
    scores: optional importance pytree (default ``|params|``).
    filter_fn: chooses the weights (default: every weight, the head included, not embeddings).
    layout: which axis holds the units, hence the inputs (:mod:`prunejax.masks.layouts`).

  Returns:
    The mask.

  Raises:
    ConfigError: bad ``n`` or ``m``, an input dimension not divisible by ``m``, a filter that
      selects nothing, or an ambiguous or wrong layout.

  References:
    Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks" (2:4 structured sparsity).
  """
  if isinstance(m, bool) or not isinstance(m, int) or m < 1:
    raise ConfigError(f"m={m!r} is not allowed; expected a positive integer")
  if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= m:
    raise ConfigError(f"n={n!r} is not allowed; expected an integer in [0, m={m}]")
  _check_scores(scores, params, "n_m")
  chosen = _chosen(params, filter_fn or _n_m_filter_fn, layout, "n_m")
  paths, leaves, _, _ = _flat(params)
  inputs = []
  for i, axes, _ in chosen:
    in_axis = 1 if axes == (0,) else axes[0] - 1
    size = jnp.shape(leaves[i])[in_axis]
    if size % m:
      raise ConfigError(f"n_m: {path_str(paths[i])} has input dimension {size} (axis {in_axis}), "
                        f"not divisible by m={m}")
    inputs.append((i, in_axis))
  fn = functools.partial(_n_m_mask, chosen=tuple(inputs), n=n, m=m)
  return jax.tree.unflatten(jax.tree.structure(params),
                            run_sharded(fn, (params, scores), leaves))


@functools.partial(jax.jit, static_argnames=("chosen", "n", "m"))
def _n_m_mask(params, scores, *, chosen, n, m):
  leaves, treedef = jax.tree.flatten(params)
  score_leaves = None if scores is None else treedef.flatten_up_to(scores)
  out = [jnp.ones(jnp.shape(l), bool) for l in leaves]
  earlier = jnp.asarray(np.tri(m, k=-1, dtype=bool))  # earlier[i, j] = j < i
  for i, in_axis in chosen:
    s = jnp.abs(leaves[i]) if score_leaves is None else score_leaves[i]
    key = jnp.moveaxis(ordered_key(s), in_axis, -1)
    moved = key.shape
    key = key.reshape(moved[:-1] + (moved[-1] // m, m))
    a, b = key[..., :, None], key[..., None, :]  # a: entry i, b: entry j of the same block.
    rank = jnp.sum((b < a) | ((b == a) & earlier), axis=-1)
    out[i] = jnp.moveaxis((rank >= m - n).reshape(moved), -1, in_axis)
  return out
