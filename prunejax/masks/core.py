"""Masks as pytrees of booleans: applying and measuring them, and an exact, sort-free top-k select.

A mask has exactly the structure of the params; ``True`` keeps a weight, ``False`` prunes it. Leaves
that a ``filter_fn(path, leaf)`` marks as not prunable get an all-``True`` mask, never ``None``
(filters: :mod:`prunejax.masks.filters`; meshes: :mod:`prunejax.masks.sharding`, both re-exported
here).

:func:`threshold_mask` prunes exactly ``k`` entries with the lowest scores without sorting: a radix
select over an order-preserving unsigned-integer view of the float scores. Each pass builds a
histogram of one digit (16 bits) of the candidates that match the prefix chosen so far, so two
passes over the data fix the 32-bit threshold. Histograms are sums of counts, so under ``jit`` with
sharded params XLA reduces them across devices and the result does not depend on the sharding.
Ties at the threshold are broken deterministically: the first prunable leaves (in
``jax.tree.leaves`` order) lose first, and inside a leaf the lower row-major flat index loses first.
(Groups of at most ``_SORT_MAX`` entries, where a sort costs nothing, take a stable sort with the
same result.)
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prunejax.errors import ConfigError, DataError
# Filters and mesh helpers, re-exported here where they were defined first.
# pylint: disable=unused-import
from prunejax.masks.filters import (EMBEDDING_MODULE, EMBEDDING_NAME, POSITION_NAME,
                                    PRUNABLE_NAMES, WEIGHT_NAME, default_filter_fn, leaf_paths,
                                    make_filter_fn, nothing_selected_error, path_names, path_str,
                                    prunable_leaves, resolve_filter)
from prunejax.masks.sharding import (check_not_varying, explicit_sharding, has_explicit_axes,
                                     reshard_like, run_sharded, varying_axes)
# pylint: enable=unused-import
from prunejax.types import FilterFn, Mask, Params, PyTree

_MAX_ENTRIES = 2**31 - 1
# Groups this small are selected by a stable sort: as fast, and much quicker to compile. Larger
# groups (the ones that matter) never sort.
_SORT_MAX = 1 << 14


# ----------------------------------------------------------------------------------------------
# Applying and measuring masks.
# ----------------------------------------------------------------------------------------------


@jax.jit
def ones_mask(params: Params) -> Mask:
  """A mask that keeps everything (each leaf sharded like its parameter)."""
  return jax.tree.map(lambda p: jnp.ones_like(p, dtype=bool), params)


def check_mask(mask: Mask, params: Params, what: str = "mask", *, bool_leaves: bool = True
               ) -> None:
  """Raises unless ``mask`` has exactly the structure of ``params`` and each leaf its shape.

  Args:
    mask: the mask (or, with ``bool_leaves=False``, any tree that must match ``params``).
    params: the params.
    what: names ``mask`` in the error.
    bool_leaves: whether the leaves must be bool.

  Raises:
    ConfigError: one line naming the first leaf whose structure, shape or dtype differs.
  """
  p_leaves, p_def = jax.tree_util.tree_flatten_with_path(params)
  m_leaves, m_def = jax.tree_util.tree_flatten_with_path(mask)
  if p_def != m_def:
    p_paths = [path_str(p) for p, _ in p_leaves]
    m_paths = [path_str(p) for p, _ in m_leaves]
    missing = [p for p in p_paths if p not in m_paths]
    extra = [p for p in m_paths if p not in p_paths]
    detail = "; ".join(([f"missing {missing[:3]}"] if missing else [])
                       + ([f"unexpected {extra[:3]}"] if extra else []))
    raise ConfigError(f"{what} does not have the structure of the params "
                      f"({detail or f'{len(m_paths)} leaves against {len(p_paths)}'}); build it "
                      "from these params (prunejax.masks.*) or with jax.tree.map over them")
  for (path, p), (_, m) in zip(p_leaves, m_leaves):
    if tuple(jnp.shape(m)) != tuple(jnp.shape(p)):
      raise ConfigError(f"{what} leaf {path_str(path)} has shape {tuple(jnp.shape(m))}; its "
                        f"parameter has shape {tuple(jnp.shape(p))} (masks are never broadcast)")
    if bool_leaves and getattr(m, "dtype", None) != jnp.bool_:
      raise ConfigError(f"{what} leaf {path_str(path)} has dtype "
                        f"{getattr(m, 'dtype', type(m).__name__)}; expected bool")


@jax.jit
def _apply_mask(params: Params, mask: Mask) -> Params:
  return jax.tree.map(lambda p, m: jnp.where(reshard_like(m, p), p, jnp.zeros_like(p)), params,
                      mask)


def apply_mask(params: Params, mask: Mask) -> Params:
  """``params`` with every pruned entry (mask False) set to exactly zero.

  Raises:
    ConfigError: ``mask`` does not have the structure and leaf shapes of ``params``.
  """
  check_mask(mask, params)
  return _apply_mask(params, mask)


def count_params(tree: PyTree, filter_fn: FilterFn | None = None) -> int:
  """Number of prunable entries of ``tree`` (a static Python int).

  Raises:
    ConfigError: ``filter_fn`` selects no leaf.
  """
  leaves, _, _ = prunable_leaves(tree, filter_fn)
  flags = resolve_filter(tree, filter_fn, what="count_params")
  return int(sum(math.prod(jnp.shape(l)) for l, f in zip(leaves, flags) if f))


def sparsity_of(tree: PyTree, filter_fn: FilterFn | None = None) -> jax.Array:
  """Fraction of pruned prunable entries: ``False`` entries of a mask, or zeros of params.

  Pass the ``filter_fn`` the mask was made with when it was not the default: a mask that prunes
  entries of a leaf the filter does not select is an error, but a mask made with a narrower filter
  (e.g. ``prune_head=False``) is measured over the default filter's leaves.

  Args:
    tree: a mask (bool leaves) or params.
    filter_fn: chooses the prunable leaves (default :func:`default_filter_fn`).

  Returns:
    A float32 scalar in ``[0, 1]``.

  Raises:
    ConfigError: the filter selects no leaf, or a mask prunes entries of a leaf it does not select.
  """
  path_leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [l for _, l in path_leaves]
  flags = resolve_filter(tree, filter_fn, what="sparsity_of")
  n = sum(math.prod(jnp.shape(l)) for l, f in zip(leaves, flags) if f)
  unselected = [(path, leaf) for (path, leaf), f in zip(path_leaves, flags)
                if not f and getattr(leaf, "dtype", None) == jnp.bool_
                and not isinstance(leaf, jax.core.Tracer)]
  if unselected:
    kept_all = _each_leaf(_all_true, jnp.all, [leaf for _, leaf in unselected])
    for (path, _), ok in zip(unselected, kept_all):
      if not ok:
        raise ConfigError(f"sparsity_of: the mask prunes entries of {path_str(path)}, which "
                          "filter_fn does not select; pass the filter_fn the mask was made with")
  if n == 0:
    return jnp.zeros((), jnp.float32)
  selected = [l for l, f in zip(leaves, flags) if f]
  try:
    return _pruned_fraction(selected, n)
  except ValueError:  # leaves committed to different devices: counted one by one on the host
    pruned = sum(int(jnp.sum(_pruned(l), dtype=jnp.int32)) for l in selected)
    return jnp.asarray(np.float32(pruned) / np.float32(n))


# One compiled program over all the leaves (per tree of shapes): op by op, each leaf shape compiled
# two or three single ops, and each check synced the host once per leaf.
@jax.jit
def _all_true(leaves: list) -> jax.Array:
  return jnp.stack([jnp.all(l) for l in leaves])


@functools.partial(jax.jit, static_argnums=1)
def _pruned_fraction(leaves: list, n: int) -> jax.Array:
  pruned = sum(jnp.sum(_pruned(l), dtype=jnp.int32) for l in leaves)
  return pruned.astype(jnp.float32) / n


def _pruned(leaf: Any) -> jax.Array:
  """The pruned entries of a mask leaf (False) or a params leaf (zero)."""
  return jnp.logical_not(leaf) if jnp.result_type(leaf) == jnp.bool_ else leaf == 0


def first_nonfinite(leaves: Sequence[Any]) -> int | None:
  """The index of the first of ``leaves`` (concrete float arrays) that holds NaN or inf, or None:
  one compiled check and one host sync for all of them."""
  if not leaves:
    return None
  bad = np.flatnonzero(~_each_leaf(_all_finite, lambda l: jnp.all(jnp.isfinite(l)), leaves))
  return int(bad[0]) if len(bad) else None


def check_finite_params(params: Params, what: str) -> None:
  """Raises ``DataError`` naming the first concrete float leaf of ``params`` that holds NaN or inf
  (NaN weights give NaN scores and a mask ranked on them); traced leaves are not checked."""
  concrete = [(path, leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
              if isinstance(leaf, (jax.Array, np.ndarray)) and not isinstance(leaf, jax.core.Tracer)
              and jnp.issubdtype(leaf.dtype, jnp.inexact)]
  bad = first_nonfinite([leaf for _, leaf in concrete])
  if bad is not None:
    raise DataError(f"{what}: params leaf {path_str(concrete[bad][0])} has NaN or inf")


def _each_leaf(over_all: Any, one: Any, leaves: Sequence[Any]) -> np.ndarray:
  """``bool[len(leaves)]``: the compiled check of all the leaves at once, or, where they are
  committed to different devices (one program cannot take them), ``one`` leaf by leaf."""
  try:
    return np.asarray(over_all(list(leaves)), bool)
  except ValueError:
    return np.array([bool(one(l)) for l in leaves], bool)


@jax.jit
def _all_finite(leaves: list) -> jax.Array:
  return jnp.stack([jnp.all(jnp.isfinite(l)) for l in leaves])


def num_to_prune(sparsity: Any, n: int, field: str = "sparsity") -> Any:
  """``round(sparsity * n)``: a Python int when ``sparsity`` is concrete, else an int32 tracer.

  A concrete sparsity is checked to lie in ``[0, 1]`` and rounded in float64 (half to even, as
  Python's ``round``). A traced sparsity (a schedule inside a jitted step) is rounded in float32 and
  clipped to ``[0, n]``.
  """
  if isinstance(sparsity, jax.core.Tracer):
    return jnp.clip(jnp.round(sparsity * n), 0, n).astype(jnp.int32)
  try:
    s = float(sparsity)
  except (TypeError, ValueError):
    raise ConfigError(f"{field}={sparsity!r} is not a number; expected a value in [0, 1]") from None
  if not 0.0 <= s <= 1.0:
    raise ConfigError(f"{field}={sparsity!r} is out of range; expected a value in [0, 1]")
  return int(round(s * n))


# ----------------------------------------------------------------------------------------------
# Exact top-k select by radix histograms.
# ----------------------------------------------------------------------------------------------


def ordered_key(x: jax.Array) -> jax.Array:
  """An unsigned-integer view of float ``x`` whose integer order is the float order.

  ``-0.0`` maps to ``+0.0`` and NaN to ``-inf`` (so NaN scores are pruned first). float64 (with x64
  enabled) gives uint64 keys; every other dtype is compared as float32 (exact for bf16/f16).
  """
  if x.dtype == jnp.float64:
    udt, bits = jnp.uint64, 64
  else:
    x = x.astype(jnp.float32)
    udt, bits = jnp.uint32, 32
  x = jnp.where(jnp.isnan(x), -jnp.inf, x)
  x = jnp.where(x == 0, jnp.zeros_like(x), x)
  b = lax.bitcast_convert_type(x, udt)
  sign = b >> (bits - 1)
  return jnp.where(sign == 1, ~b, b | (udt(1) << (bits - 1)))


def _radix_select(keys: Sequence[jax.Array], k: jax.Array,
                  cands: Sequence[jax.Array] | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The ``k``-th smallest key among the candidates of ``keys`` jointly, 16 bits per pass.

  Each pass histograms one 16-bit digit of the keys whose higher digits equal the prefix found so
  far, and picks the bin where the running count reaches ``k``.

  Args:
    keys: unsigned-integer arrays (uint32: 2 passes, uint64: 4).
    k: how many to select (``0 <= k <=`` number of candidates).
    cands: optional bool arrays; only True entries take part.

  Returns:
    ``(t, r, e)``: the threshold key ``t``, how many candidates equal to ``t`` must be taken
    (``k - #{key < t}``, 0 when ``k == 0``) and how many candidates equal ``t``.
  """
  udt = keys[0].dtype.type
  key_bits = 8 * keys[0].dtype.itemsize
  width, bins = 16, 1 << 16
  cands = [None] * len(keys) if cands is None else cands
  prefix = jnp.zeros((), udt)
  k_rem = jnp.asarray(k, jnp.int32)
  hist, digit = None, None
  for done in range(0, key_bits, width):
    shift = key_bits - done - width
    hist = jnp.zeros((bins,), jnp.int32)
    for key, cand in zip(keys, cands):
      d = ((key >> shift) & udt(bins - 1)).astype(jnp.int32)
      match = None if done == 0 else (key >> (shift + width)) == prefix
      if cand is not None:
        match = cand if match is None else match & cand
      hist = hist.at[d].add(1 if match is None else match.astype(jnp.int32))
    digit, before = _find_bin(hist, k_rem)
    k_rem = k_rem - before
    prefix = (prefix << width) | digit.astype(udt)
  return prefix, k_rem, hist[jnp.minimum(digit, bins - 1)]


def _inclusive_sums(v: jax.Array) -> jax.Array:
  n = v.shape[0]
  lower = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
  return jnp.sum(jnp.where(lower, v[None, :], 0), axis=1)


def _find_bin(hist: jax.Array, k: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The first bin whose inclusive prefix count reaches ``k``, and the count before it.

  A two-level search over 256 x 256 bins (row totals, then one row), cheaper than a cumsum.
  """
  rows = hist.reshape(256, -1)
  cum_rows = _inclusive_sums(rows.sum(axis=1))
  r = jnp.sum(cum_rows < k, dtype=jnp.int32)
  before_r = jnp.where(r > 0, cum_rows[jnp.maximum(r - 1, 0)], 0)
  cum_cols = _inclusive_sums(lax.dynamic_index_in_dim(rows, jnp.minimum(r, 255), keepdims=False))
  c = jnp.sum(cum_cols < k - before_r, dtype=jnp.int32)
  before_c = jnp.where(c > 0, cum_cols[jnp.maximum(c - 1, 0)], 0)
  return r * rows.shape[1] + c, before_r + before_c


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """Row-major flat index (uint32) of every entry, from iotas so that it shards like the leaf."""
  if not shape:
    return jnp.zeros((), jnp.uint32)
  idx = jnp.zeros(shape, jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    idx = idx + lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(stride)
    stride *= shape[d]
  return idx


def _select_by_sort(keys: list[jax.Array], k: jax.Array) -> list[jax.Array]:
  """The same selection as the radix path, by a stable sort of the concatenated keys."""
  flat = jnp.concatenate([key.reshape(-1) for key in keys])
  order = jnp.argsort(flat, stable=True)
  pruned = jnp.zeros(flat.shape, bool).at[order].set(jnp.arange(flat.shape[0]) < k)
  out, offset = [], 0
  for key in keys:
    size = math.prod(key.shape)
    out.append(pruned[offset:offset + size].reshape(key.shape))
    offset += size
  return out


def _tie_masks(keys: list[jax.Array], t: jax.Array, r: jax.Array) -> list[jax.Array]:
  """Prune masks when only ``r`` of the entries equal to ``t`` may go: the first ``r`` in
  (leaf order, row-major flat index) order, found by a second radix select over positions."""
  positions, offset = [], 0
  for key in keys:
    positions.append(_flat_index(key.shape) + jnp.uint32(offset))
    offset += math.prod(key.shape)
  eq = [key == t for key in keys]
  last, _, _ = _radix_select(positions, r, cands=eq)
  return [(key < t) | (e & (pos <= last)) for key, e, pos in zip(keys, eq, positions)]


def _select_group(keys: list[jax.Array], k: jax.Array, sort_max: int) -> list[jax.Array]:
  """Prune masks (True = pruned) of exactly ``k`` lowest keys over ``keys`` jointly.

  Entries below the threshold key ``t`` go. Of the ``e`` entries equal to ``t``, ``r`` go: usually
  all of them (or, for ``k == 0``, none); otherwise the first ``r`` in (leaf order, row-major flat
  index) order, found by a second radix select over their positions.
  """
  size = sum(math.prod(x.shape) for x in keys)
  if size <= sort_max:
    return _select_by_sort(keys, k)
  t, r, e = _radix_select(keys, jnp.clip(k, 0, size))
  return lax.cond(r < e, lambda: _tie_masks(keys, t, r),
                  lambda: [(key < t) | ((key == t) & (r > 0)) for key in keys])


@functools.partial(jax.jit, static_argnames=("groups", "layout", "sort_max"))
def _select(scores: list[jax.Array], counts: list[jax.Array], groups: tuple[tuple[int, ...], ...],
            layout: tuple[Any, ...], sort_max: int) -> list[jax.Array]:
  """Keep masks of every leaf: ``layout[i]`` is the index of leaf ``i`` in ``scores``, or the shape
  of a non-prunable leaf (all True)."""
  pruned = [None] * len(scores)
  for g, members in enumerate(groups):
    wide = any(scores[i].dtype == jnp.float64 for i in members)
    keys = [ordered_key(scores[i].astype(jnp.float64) if wide else scores[i]) for i in members]
    for i, p in zip(members, _select_group(keys, counts[g], sort_max)):
      pruned[i] = p
  return [jnp.ones(item, bool) if isinstance(item, tuple) else jnp.logical_not(pruned[item])
          for item in layout]


def threshold_mask(scores: PyTree, num_pruned: Any, *, filter_fn: FilterFn | None = None) -> Mask:
  """Prunes exactly ``num_pruned`` prunable entries with the lowest scores, without sorting.

  A radix select over order-preserving integer keys of the scores (two 16-bit histogram passes for
  float32) finds the threshold; every pass is a sum of counts, so it runs unchanged on sharded
  scores (a classic ``Mesh`` or explicit ``jax.make_mesh`` axes). Cost: a few passes over the
  scores, versus a sort of all of them.

  Args:
    scores: a pytree of float scores with the structure of the params (higher = more important).
    num_pruned: an int (global count over all prunable leaves together), or a pytree with the
      structure of ``scores`` whose leaves are the count for each leaf (ignored on leaves that are
      not prunable). Counts may be traced int32 values; they are clipped to the number of entries.
    filter_fn: chooses the prunable leaves (default :func:`default_filter_fn`).

  Returns:
    A bool mask with the structure of ``scores``, each leaf sharded like its scores; non-prunable
    leaves are all True. Ties at the threshold are broken by leaf order, then by row-major flat
    index (lower index pruned first); NaN scores count as ``-inf`` and ``-0.0`` as ``+0.0``.

  Raises:
    ConfigError: the filter selects no leaf; more than ``2**31 - 1`` entries are selected jointly
      (counts are int32); the scores vary across the shards of a ``jax.shard_map``.
  """
  flags = resolve_filter(scores, filter_fn, what="threshold_mask")
  return threshold_mask_flags(scores, num_pruned, flags)


def threshold_mask_flags(scores: PyTree, num_pruned: Any, flags: Sequence[bool]) -> Mask:
  """:func:`threshold_mask` with the prunable leaves given as one flag per leaf."""
  leaves, treedef = jax.tree.flatten(scores)
  idx = [i for i, f in enumerate(flags) if f]
  check_not_varying([leaves[i] for i in idx], "threshold_mask")
  if jax.tree_util.treedef_is_leaf(jax.tree.structure(num_pruned)):
    groups = (tuple(range(len(idx))),) if idx else ()
    counts = [jnp.asarray(num_pruned, jnp.int32)]
  else:
    try:
      count_leaves = treedef.flatten_up_to(num_pruned)
    except (ValueError, TypeError):
      raise ConfigError("num_pruned is neither one count nor a pytree with the structure of the "
                        "scores (one count per leaf)") from None
    groups = tuple((j,) for j in range(len(idx)))
    counts = [jnp.asarray(count_leaves[i], jnp.int32) for i in idx]
  for members in groups:
    n = sum(math.prod(jnp.shape(leaves[idx[j]])) for j in members)
    if n > _MAX_ENTRIES:
      raise ConfigError(f"{n} prunable entries are selected jointly; at most {_MAX_ENTRIES} are "
                        "supported (use scope='layerwise')")
  position = {i: j for j, i in enumerate(idx)}
  layout = tuple(position[i] if i in position else tuple(jnp.shape(l))
                 for i, l in enumerate(leaves))
  select = functools.partial(_select, groups=groups, layout=layout, sort_max=_SORT_MAX)
  out = run_sharded(select, ([jnp.asarray(leaves[i]) for i in idx], counts), leaves)
  return jax.tree.unflatten(treedef, out)
