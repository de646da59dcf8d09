"""The layers of post-training pruning: which leaves are prunable linear layers, the order in
which they are visited, and the way from a layer's weight frame back to its leaf.

**Layers.** Any ``apply_fn(params, x)`` works: :func:`prunejax.layer_taps.find_layers` finds in its
jaxpr where each parameter leaf meets the batch as a dense (``dot_general``) or conv layer. Each
layer's weight is seen in its frame ``(G, K, E)``: ``G`` groups (conv feature groups, dot-batch
dims), ``K`` inputs (contracted features; conv: kernel offset x input channel of the group), ``E``
outputs, whatever the leaf's layout (Flax ``(in, out)``, Equinox and PyTorch ``(out, in)``, conv
``HWIO`` or ``OIHW``, ``DenseGeneral``). Masks and updated weights go back to the leaf through the
transpose of the linear map from leaf to frame. The prunable leaves are ``filter_fn``'s (default
:data:`linear_filter_fn`: weights and kernels, not embeddings, as in both papers); a chosen leaf
used any other way (an embedding lookup, twice, inside ``scan``) is a one-line error.

**Orders.** ``sequential="block"`` is what both papers' code does (SparseGPT's ``opt_sequential``,
Wanda's ``prune_wanda``): transformer block by block, every layer of a block calibrated at once on
the block's dense weights, its inputs the outputs of the already pruned (for SparseGPT, updated)
blocks before it; then the whole block is pruned. Blocks come from the layer names
(:func:`default_block_fn`: ``block_3/attn/query/kernel`` is in ``block_3``, ``h/3/...`` in
``h/3``; a layer outside any numbered block, such as the head, is a block of its own) or from
``block_fn``. ``sequential=True`` (or ``"group"``, the default) is finer: input group by input
group in program order, each calibrated on the outputs of every pruned layer before it (inside a
block too; GPTQ's ``true-sequential``), with only one group's statistics held at a time.
``sequential=False`` calibrates every layer on the dense model, holding statistics of at most
``max_stats_bytes`` at once.

Used by :mod:`prunejax.masks.calibration`, :mod:`prunejax.masks.wanda` and
:mod:`prunejax.masks.sparsegpt`; the public names are re-exported by
:mod:`prunejax.masks.posttraining`.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunejax import layer_taps as lt
from prunejax.errors import ConfigError, check_choice
from prunejax.masks.core import (check_finite_params, make_filter_fn, nothing_selected_error,
                                  path_str)
from prunejax.types import ApplyFn, FilterFn, Mask, Params, PyTree

linear_filter_fn: FilterFn = make_filter_fn(embeddings=False)
"""The default prunable leaves of :func:`wanda` and :func:`sparsegpt`: weight matrices and conv
kernels (the classifier head included), not embeddings, biases, norms or position tables."""

_KINDS = ("dense", "conv")


class LinearLayer(NamedTuple):
  """A prunable layer: a dense or conv layer whose weight is (part of) a prunable leaf.

  Attributes:
    name: the leaf's path (``a/b/kernel``), with ``#i`` appended when the leaf feeds several layers
      (slices of a fused weight).
    index: the layer's key in the :class:`prunejax.layer_taps.LayerPlan`.
    leaf: the leaf's index in ``jax.tree.leaves(params)``.
    kind: ``"dense"`` or ``"conv"``.
    shape: ``(G, K, E)`` of its weight frame.
    group: its input group (layers reading the same activation share one).
  """

  name: str
  index: int
  leaf: int
  kind: str
  shape: tuple[int, int, int]
  group: int


# ----------------------------------------------------------------------------------------------
# Layers: which leaves are prunable linear layers, their frames and input groups.
# ----------------------------------------------------------------------------------------------


class _Analysis(NamedTuple):
  layers: tuple[LinearLayer, ...]        # program order
  flags: tuple[bool, ...]                # prunable leaves
  groups: tuple[tuple[int, ...], ...]    # per input group, its layers' plan indices


def _to_frame(layer: lt.Layer, w: jax.Array) -> jax.Array:
  """A layer's weight operand as ``(G, K, E)`` in the order of :mod:`prunejax.layer_rows`' rows."""
  if layer.kind == "conv":
    _, rhs, _ = layer.eqn.params["dimension_numbers"]
    groups = layer.eqn.params["feature_group_count"]
    w = jnp.transpose(w, tuple(rhs[2:]) + (rhs[1], rhs[0]))
    return jnp.transpose(w.reshape(-1, groups, w.shape[-1] // groups), (1, 0, 2))
  (lc, rc), (lb, rb) = layer.eqn.params["dimension_numbers"]
  contract, batch = (lc, lb) if layer.act_index == 1 else (rc, rb)
  free = [d for d in range(w.ndim) if d not in contract and d not in batch]
  g = math.prod(w.shape[d] for d in batch)
  k = math.prod(w.shape[d] for d in contract)
  return jnp.transpose(w, list(batch) + list(contract) + free).reshape(g, k, -1)


def _frames(plan: lt.LayerPlan, params: Params, ks: Sequence[int]) -> dict:
  ops = lt.layer_weights(plan, params)
  return {k: _to_frame(plan.layers[k], ops[k]) for k in ks}


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _use_error(what: str, name: str, plan: lt.LayerPlan, uses: list) -> ConfigError:
  kinds = {plan.layers[k].kind if u == "layer" else u for u, k in uses}
  how = ("not used by apply_fn" if not uses else "an embedding lookup" if kinds == {"embed"} else
         "broadcast over the batch like a bias" if kinds == {"site"} else
         "used outside one dense or conv layer (twice, inside scan or a custom derivative)")
  return ConfigError(f"{what}: {name} is {how}; {what} prunes the weights of dense and conv "
                     "layers only: leave it out with filter_fn (e.g. prunejax.masks."
                     f"make_filter_fn(embeddings=False, exclude=[{name!r}]))")


def _input_groups(plan: lt.LayerPlan, params: Params, x: Any, ks: Sequence[int]) -> dict:
  """Layer index -> input group: one abstract trace, where layers whose taps receive the very same
  traced activation (one variable of one call) read the same input."""
  seen, alive, group_of = {}, [], {}

  def make_tap(k):
    def tap(layer, act, out):
      alive.append(act)  # keeps ids unique while the trace lives
      group_of[k] = seen.setdefault(id(act), len(seen))
      return out, None
    return tap

  jax.eval_shape(lambda p, xx: lt.run(plan, p, xx, layer_taps={k: make_tap(k) for k in ks})[0],
                 params, x)
  return group_of


def _analyse(apply_fn: ApplyFn, params: Params, x: Any, filter_fn: FilterFn | None,
             what: str) -> _Analysis:
  """The prunable layers of ``apply_fn`` (host side, from shapes alone)."""
  check_finite_params(params, what)
  params_a, x_a = _abstract(params), _abstract(x)
  plan = lt.find_layers(apply_fn, params_a, x_a)
  if not plan.layers:
    hint = (" (the example axis is found by tracing at B and 2B, and apply_fn traces differently"
            " at B=1: use batches of at least 2)" if plan.batch_size == 1 else "")
    raise ConfigError(f"{what}: no dense or conv layer found in apply_fn on a batch of "
                      f"{plan.batch_size}{hint}")
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = filter_fn or linear_filter_fn
  flags = tuple(bool(chosen(p, l)) for p, l in path_leaves)
  if not any(flags):
    raise nothing_selected_error(params, what, filter_fn)
  by_leaf = {}
  for i, f in enumerate(flags):
    uses = plan.uses.get(i, [])
    name = path_str(path_leaves[i][0])
    if f and (not uses or any(u != "layer" or plan.layers[k].kind not in _KINDS
                              for u, k in uses)):
      raise _use_error(what, name, plan, uses)
    if f:
      by_leaf[i] = [k for _, k in uses]
  ks = sorted(k for v in by_leaf.values() for k in v)
  group_of = _input_groups(plan, params_a, x_a, ks)
  ops = jax.eval_shape(lambda p: _frames(plan, p, ks), params_a)
  for i, mine in by_leaf.items():  # each weight entry must feed exactly one layer
    if sum(math.prod(ops[k].shape) for k in mine) != math.prod(jnp.shape(path_leaves[i][1])):
      raise _use_error(what, path_str(path_leaves[i][0]), plan, [("other", k) for k in mine])
  layers = []
  for k in ks:
    i = plan.layers[k].leaf
    name = path_str(path_leaves[i][0])
    if len(by_leaf[i]) > 1:
      name += f"#{by_leaf[i].index(k)}"
    layers.append(LinearLayer(name, k, i, plan.layers[k].kind, tuple(ops[k].shape), group_of[k]))
  groups = {}
  for layer in layers:
    groups.setdefault(layer.group, []).append(layer.index)
  return _Analysis(tuple(layers), flags, tuple(tuple(v) for v in groups.values()))


def linear_layers(apply_fn: ApplyFn, params: Params, x: Any, *,
                  filter_fn: FilterFn | None = None) -> tuple[LinearLayer, ...]:
  """The layers :func:`wanda` and :func:`sparsegpt` prune, in program order (from shapes alone;
  a sequential pass over the calibration set runs once per distinct ``LinearLayer.group``).

  Raises:
    ConfigError: the filter selects no leaf, or a leaf that is not a dense or conv weight.
  """
  return _analyse(apply_fn, params, x, filter_fn, "linear_layers").layers


# ----------------------------------------------------------------------------------------------
# Stages: which input groups are gathered in one pass over the calibration set.
# ----------------------------------------------------------------------------------------------


def _stages(an: _Analysis, sequential: bool, gram: bool, max_bytes: int) -> list[list[int]]:
  """Lists of input groups gathered in one pass: one group each (sequential), else consecutive
  groups while their statistics fit in ``max_bytes``."""
  if sequential:
    return [[g] for g in range(len(an.groups))]
  first = {layer.index: layer for layer in an.layers}
  stages, size = [[]], 0
  for g, ks in enumerate(an.groups):
    gg, kk, _ = first[ks[0]].shape
    nbytes = 4 * gg * kk * (kk + 1 if gram else 1)
    if stages[-1] and size + nbytes > max_bytes:
      stages.append([])
      size = 0
    stages[-1].append(g)
    size += nbytes
  return stages


ORDERS = ("group", "block")
"""The sequential orders: input group by input group, or block by block (the papers' code)."""


_BLOCK = re.compile(r"^(.*?(?:^|/)(?:[^/#]*_)?\d+)(?:/|#|$)")


def default_block_fn(name: str) -> str:
  """The block of a layer named ``name`` (a :class:`LinearLayer` name): the path up to its first
  numbered entry (``block_3/attn/query/kernel`` -> ``block_3``, ``transformer/h/3/mlp/c_fc`` ->
  ``transformer/h/3``, ``layers_2/Dense_0/kernel`` -> ``layers_2``), else the name itself (a
  block of one layer, such as ``head/kernel``)."""
  m = _BLOCK.match(name)
  return m.group(1) if m else name


def _order(sequential: Any) -> str | None:
  """``"group"``, ``"block"`` or None (dense) from the ``sequential`` argument."""
  if sequential is True or sequential is False:
    return "group" if sequential else None
  if isinstance(sequential, (bool, np.bool_)):
    return "group" if bool(sequential) else None
  check_choice("sequential", sequential, (True, False) + ORDERS)
  return sequential


def _block_stages(an: _Analysis, block_fn: Callable[[str], Any] | None, what: str
                  ) -> list[list[int]]:
  """Lists of input groups, one list per block, in program order."""
  block_fn = block_fn or default_block_fn
  first = {layer.index: layer for layer in an.layers}
  stages, keys = [], []
  for g, ks in enumerate(an.groups):
    names = [first[k].name for k in ks]
    blocks = {block_fn(n) for n in names}
    if len(blocks) != 1:
      raise ConfigError(f"{what}: the layers {names} read one input but block_fn puts them in "
                        f"blocks {sorted(map(str, blocks))}; a block must hold whole input groups")
    (key,) = blocks
    if keys and keys[-1] == key:
      stages[-1].append(g)
    elif key in keys:
      raise ConfigError(f"{what}: block {key!r} of block_fn is not contiguous in program order "
                        f"(layer {names[0]} comes after block {keys[-1]!r}); pass a block_fn "
                        "whose blocks run one after another")
    else:
      stages.append([g])
      keys.append(key)
  return stages


def sequential_passes(layers: Sequence[LinearLayer], sequential: bool | str = True, *,
                      block_fn: Callable[[str], Any] | None = None) -> int:
  """Passes over the calibration set that :func:`wanda` and :func:`sparsegpt` make with
  ``sequential`` on ``layers`` (:func:`linear_layers`): one per input group, one per block, or 1
  with ``sequential=False``."""
  order = _order(sequential)
  if order is None:
    return 1
  if order == "group":
    return len({layer.group for layer in layers})
  return len({(block_fn or default_block_fn)(layer.name) for layer in layers})


# ----------------------------------------------------------------------------------------------
# From frames back to leaves.
# ----------------------------------------------------------------------------------------------


def _pullback(apply_fn: ApplyFn, params: Params, x: Any, ks: tuple[int, ...]):
  """``(frames, pull)``: the layers' frames and the transpose of the (linear) map from their leaves
  to their frames, ``pull(values by layer) -> values by leaf index``."""
  plan = lt.find_layers(apply_fn, params, x)
  leaves, treedef = jax.tree.flatten(params)
  idx = sorted({plan.layers[k].leaf for k in ks})

  def frames_of(sub):
    full = list(leaves)
    for i, s in zip(idx, sub):
      full[i] = s
    return _frames(plan, jax.tree.unflatten(treedef, full), ks)

  frames, vjp = jax.vjp(frames_of, [leaves[i] for i in idx])

  def pull(values: dict) -> dict:
    (got,) = vjp({k: values[k].astype(frames[k].dtype) for k in ks})
    return dict(zip(idx, got))

  return frames, pull


@functools.partial(jax.jit, static_argnames=("apply_fn", "ks"))
def _stage_frames(params: Params, x: Any, *, apply_fn: ApplyFn, ks: tuple[int, ...]) -> dict:
  return _frames(lt.find_layers(apply_fn, params, x), params, ks)


@functools.partial(jax.jit, static_argnames=("apply_fn", "ks"))
def _write_back(params: Params, mask: Mask, x: Any, new: dict | None, pruned: dict, *,
                apply_fn: ApplyFn, ks: tuple[int, ...]) -> tuple[Params, Mask]:
  """``params`` with the layers' new frames written in and pruned entries zero; ``mask`` with
  pruned entries False."""
  frames, pull = _pullback(apply_fn, params, x, ks)
  gone = pull({k: pruned[k].astype(jnp.float32) for k in ks})
  if new is not None:
    covered = pull({k: jnp.ones(frames[k].shape, jnp.float32) for k in ks})
    vals = pull(new)
  leaves, treedef = jax.tree.flatten(params)
  mask_leaves = treedef.flatten_up_to(mask)
  for i, g in gone.items():
    p = leaves[i] if new is None else jnp.where(covered[i] > 0.5, vals[i], leaves[i])
    leaves[i] = jnp.where(g > 0.5, jnp.zeros((), p.dtype), p)
    mask_leaves[i] = jnp.logical_and(mask_leaves[i], g <= 0.5)
  return jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(treedef, mask_leaves)


@functools.partial(jax.jit, static_argnames=("apply_fn", "ks"))
def _to_leaves(params: Params, x: Any, values: dict, *, apply_fn: ApplyFn,
               ks: tuple[int, ...]) -> PyTree:
  """Frame values (one ``(G, K, E)`` array per layer) as a params-shaped tree (0 elsewhere)."""
  _, pull = _pullback(apply_fn, params, x, ks)
  got = pull(values)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [got[i].astype(jnp.float32) if i in got
                                      else jnp.zeros(jnp.shape(l), jnp.float32)
                                      for i, l in enumerate(leaves)])
