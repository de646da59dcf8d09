"""Which leaves are prunable: key paths, names and ``filter_fn(path, leaf)`` filters.

A mask leaf that a ``filter_fn`` marks as not prunable is all ``True``, never ``None``. The default
filter finds the weights of Flax linen and NNX, Equinox, Haiku and plain dicts by their names
(:data:`WEIGHT_NAME`, :data:`EMBEDDING_NAME`); :func:`make_filter_fn` builds others. Masks resolve
a filter to one flag per leaf on the host (:func:`resolve_filter`) before anything is compiled.
Re-exported by :mod:`prunejax.masks.core` and :mod:`prunejax.masks`.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp

from prunejax.errors import ConfigError
from prunejax.types import FilterFn, PyTree

PRUNABLE_NAMES = ("kernel", "embedding")
"""Flax's names of prunable leaves (``make_filter_fn(names=PRUNABLE_NAMES)`` is the filter of
prunejax 0.1; the default filter now also finds the weights of other frameworks)."""

WEIGHT_NAME = re.compile(r"(?i)^(kernel|weights?|w|w_\w+|w\d+|w[qkvo]|wqkv)$")
"""Leaf names of weight matrices and conv kernels: Flax ``kernel``, Equinox / PyTorch ``weight``,
Haiku ``w``, plain-dict ``W``, ``W_q``, ``w1``, ``wq`` (case-insensitive)."""

EMBEDDING_NAME = re.compile(
    r"(?i)^(embedding|embeddings|embed|wte|(tok|token|word)_?embed(ding)?s?)$")
"""Leaf names of token embedding tables: Flax ``embedding``, Haiku ``embeddings``, ``wte``."""

POSITION_NAME = re.compile(r"(?i)^(wpe|w_?pos)$|pos(ition)?(al)?_?(emb|enc)|position")
"""Path entries of learned position tables (``wpe``, ``W_pos``, ``pos_embedding``), never
pruned by the default filter."""

EMBEDDING_MODULE = re.compile(r"(?i)emb|^wte$")
"""Path entries of embedding modules (``embedding``, ``tok_emb``, ``wte``), whose weights
``make_filter_fn(embeddings=False)`` leaves out whatever the leaf is called."""

_LISTED_PATHS = 12  # leaves named in a "selects nothing" error.


# ----------------------------------------------------------------------------------------------
# Paths.
# ----------------------------------------------------------------------------------------------


def _key_name(key: Any) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _is_variable_value(path: Sequence[Any]) -> bool:
  """Whether ``path`` ends in the ``.value`` of a Flax NNX ``Variable`` (``nnx.split`` state)."""
  return (len(path) >= 2 and isinstance(path[-1], jax.tree_util.GetAttrKey)
          and path[-1].name == "value")


def _leaf_key(path: Sequence[Any]) -> Any:
  """The key that names a leaf: the last one, or the one before an NNX ``.value``."""
  if not path:
    return None
  return path[-2] if _is_variable_value(path) else path[-1]


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
  """The names along a ``jax.tree_util`` key path, e.g. ``("dense_0", "kernel")``.

  The ``.value`` that ends the path of a Flax NNX ``Variable`` is left out, so an ``nnx.split``
  state has the same paths as the linen params of the same model.
  """
  names = tuple(_key_name(k) for k in path)
  return names[:-1] if _is_variable_value(path) else names


def path_str(path: Sequence[Any]) -> str:
  """A key path as ``"dense_0/kernel"``."""
  return "/".join(path_names(path))


def _is_named(key: Any) -> bool:
  if isinstance(key, jax.tree_util.DictKey):
    return isinstance(key.key, str)
  return isinstance(key, jax.tree_util.GetAttrKey)


# ----------------------------------------------------------------------------------------------
# Filters.
# ----------------------------------------------------------------------------------------------


def make_filter_fn(*, prune_head: bool = True, include: Iterable[str] | None = None,
                   exclude: Iterable[str] | None = None, names: Sequence[str] | None = None,
                   head_name: str = "head", embeddings: bool = True) -> FilterFn:
  """A ``filter_fn(path, leaf) -> bool`` choosing prunable leaves.

  A leaf is prunable when all of these hold:

  * it is a float (or, for measuring masks, bool) array;
  * with ``names=None`` (the default): its name (the last path entry; for a Flax NNX state the
    entry before ``.value``) is Flax's ``kernel`` or ``embedding``, or it has at least two
    dimensions and its name is another weight name (:data:`WEIGHT_NAME`: ``weight`` of Equinox
    and PyTorch, ``w`` of Haiku, ``W``, ``W_q``, ``w1``, ``wq`` of plain dicts) or embedding name
    (:data:`EMBEDDING_NAME`: ``embeddings`` of Haiku, ``wte``); embeddings only with
    ``embeddings``; and no path entry is a position table (:data:`POSITION_NAME`: ``wpe``,
    ``W_pos``, ``pos_embedding``). So biases, norm scales (1-D even when called ``weight``) and
    learned position tables are never pruned;
  * with ``names`` given: its name is one of ``names`` exactly (any number of dimensions);
  * a leaf without a name (an entry of a list or tuple of arrays) counts as a kernel when it has
    at least two dimensions;
  * if ``include`` is given, its ``"a/b/kernel"`` path (:func:`path_str`) matches at least one of
    these regular expressions (``re.search``);
  * its path matches none of the ``exclude`` regular expressions;
  * ``prune_head`` is True or no path entry equals ``head_name`` (the classifier of our models).

  Masks resolve the filter to one flag per leaf on the host before anything is compiled, so a
  fresh ``filter_fn`` (a new lambda) that selects the same leaves reuses the compiled mask.

  Args:
    prune_head: whether the classifier head is prunable.
    include: regular expressions; if given, only matching leaves are prunable.
    exclude: regular expressions of leaves that are never prunable.
    names: exact leaf names that are prunable (e.g. ``PRUNABLE_NAMES``), instead of the name rules.
    head_name: the module name of the classifier head.
    embeddings: whether embedding tables are prunable (with ``names=None``). ``False`` also
      leaves out every leaf under a path entry like ``embedding``, ``tok_emb`` or ``wte``
      (:data:`EMBEDDING_MODULE`), since Equinox and PyTorch call embedding tables ``weight``.

  Returns:
    The filter function.
  """
  include_res = None if include is None else [re.compile(p) for p in include]
  exclude_res = [re.compile(p) for p in (exclude or ())]
  names = None if names is None else tuple(names)

  def filter_fn(path, leaf) -> bool:
    dtype = getattr(leaf, "dtype", None)
    if dtype is None or not (jnp.issubdtype(dtype, jnp.inexact) or dtype == jnp.bool_):
      return False
    parts = path_names(path)
    if not _name_rules(_leaf_key(path), len(jnp.shape(leaf)), parts, names, embeddings):
      return False
    if not prune_head and head_name in parts:
      return False
    s = "/".join(parts)
    if include_res is not None and not any(r.search(s) for r in include_res):
      return False
    return not any(r.search(s) for r in exclude_res)

  return filter_fn


def _name_rules(key: Any, ndim: int, parts: tuple[str, ...], names: tuple[str, ...] | None,
                embeddings: bool) -> bool:
  """The name part of :func:`make_filter_fn`'s rules (see its docstring)."""
  if key is None or not _is_named(key):
    if ndim < 2:
      return False
  elif names is not None:
    return _key_name(key) in names
  else:
    name = _key_name(key)
    if name == "embedding":  # Flax's names, never a bias or a norm: any number of dimensions.
      if not embeddings:
        return False
    elif name != "kernel" and (ndim < 2 or not (
        WEIGHT_NAME.match(name) or (embeddings and EMBEDDING_NAME.match(name)))):
      return False
  if names is None and any(POSITION_NAME.search(p) for p in parts):
    return False
  # e.g. the ``weight`` of an Equinox ``Embedding`` stored as ``tok_emb``.
  return names is not None or embeddings or not any(EMBEDDING_MODULE.search(p)
                                                      for p in parts[:-1])


default_filter_fn: FilterFn = make_filter_fn()
"""Weight matrices, conv kernels and embeddings of Flax linen / NNX, Equinox, Haiku and plain dicts
are prunable (the classifier head included); biases, norms and position tables are not."""


def prunable_leaves(tree: PyTree, filter_fn: FilterFn | None = None
                    ) -> tuple[list, list[bool], Any]:
  """``(leaves, prunable flags, treedef)`` of ``tree`` in ``jax.tree.leaves`` order."""
  filter_fn = filter_fn or default_filter_fn
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in path_leaves]
  flags = [bool(filter_fn(path, leaf)) for path, leaf in path_leaves]
  return leaves, flags, treedef


def _describe(path: Sequence[Any], leaf: Any) -> str:
  dtype = getattr(leaf, "dtype", type(leaf).__name__)
  return f"{path_str(path) or '<root>'} {dtype}{list(jnp.shape(leaf))}"


def nothing_selected_error(tree: PyTree, what: str, filter_fn: FilterFn | None) -> ConfigError:
  """The one-line error for a filter that selects no leaf of ``tree``: it lists the leaves."""
  path_leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  if not path_leaves:
    return ConfigError(f"{what}: the parameter tree has no array leaves; nothing can be pruned")
  listed = ", ".join(_describe(p, l) for p, l in path_leaves[:_LISTED_PATHS])
  more = len(path_leaves) - _LISTED_PATHS
  listed += f" and {more} more" if more > 0 else ""
  which = ("the default filter (float leaves named kernel or embedding, or of >= 2 dims named "
           "weight, w, W_*, embeddings, ...)") if filter_fn is None else "filter_fn"
  return ConfigError(
      f"{what}: {which} selects none of the {len(path_leaves)} leaves ({listed}); choose the "
      "prunable leaves with filter_fn=prunejax.masks.make_filter_fn(names=(...)) or "
      "make_filter_fn(include=[r'...']) (regular expressions on these paths)")


def resolve_filter(tree: PyTree, filter_fn: FilterFn | None = None, *, what: str = "mask"
                   ) -> tuple[bool, ...]:
  """One prunable flag per leaf of ``tree`` (``jax.tree.leaves`` order), computed on the host.

  Masks pass these flags (a hashable tuple) to their compiled functions instead of ``filter_fn``,
  so filters that select the same leaves share one compilation.

  Raises:
    ConfigError: the filter selects no leaf (the error lists the leaves and says how to choose).
  """
  _, flags, _ = prunable_leaves(tree, filter_fn)
  if not any(flags):
    raise nothing_selected_error(tree, what, filter_fn)
  return tuple(flags)


def leaf_paths(tree: PyTree) -> list[str]:
  """The ``"a/b/kernel"`` path of every leaf, in ``jax.tree.leaves`` order."""
  return [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
