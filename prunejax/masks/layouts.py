"""Where the output units of a weight are: kernel layouts, sibling biases, the chosen weights.

Structured masks (:mod:`prunejax.masks.structured`) remove whole units; this module finds them.

**Kernel layout.** Which axis of a weight holds the units depends on the framework. ``layout``
says it per leaf:

* ``"in_out"``: ``(..., in, out)``, the output units on the last axis: Flax linen and NNX
  ``kernel`` (Dense ``(in, out)``, Conv ``(h, w, in, out)``), Haiku ``w`` (Linear ``(in, out)``,
  Conv2D ``(h, w, in, out)``), and a plain ``x @ W``. When the sibling bias has several axes
  (Flax ``DenseGeneral``: kernel ``(in, H, d)``, bias ``(H, d)``) the units are the bias's axes.
* ``"out_in"``: ``(out, in, ...)``, the output units on the first axis: Equinox and PyTorch
  ``weight`` (Linear ``(out, in)``, Conv ``(out, in, h, w)``) and converted PyTorch checkpoints.
* ``"auto"`` (default): ``in_out`` for leaves named ``kernel`` or ``w``, ``out_in`` for
  ``weight``; any other name (``W``, ``W_q``, ``w1``) is ambiguous and an error that asks for
  ``layout``. A ``{path regular expression: layout}`` map sets it per leaf (first match; ``auto``
  for the rest).

A layout that disagrees with the sibling bias (the bias has as many entries as the units) is an
error, never a prune along the wrong axis. A square weight without a bias cannot be checked: its
layout is what the name or ``layout`` says.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from prunejax.errors import ConfigError, check_choice
from prunejax.masks.filters import make_filter_fn, nothing_selected_error, path_names, path_str
from prunejax.masks.sharding import check_not_varying
from prunejax.types import FilterFn

LAYOUTS = ("auto", "in_out", "out_in")

IN_OUT_NAMES = ("kernel", "w")
"""Leaf names whose layout is ``(..., in, out)``: Flax linen and NNX, Haiku."""

OUT_IN_NAMES = ("weight",)
"""Leaf names whose layout is ``(out, in, ...)``: Equinox, PyTorch."""

BIAS_NAMES = ("bias", "b")

Layout = str | Mapping[str, str]

structured_filter_fn: FilterFn = make_filter_fn(prune_head=False, embeddings=False)
"""Default for structured masks: weights of any framework (not embeddings), never the classifier
head (its outputs are classes)."""


# ----------------------------------------------------------------------------------------------
# Layouts.
# ----------------------------------------------------------------------------------------------


def _flat(tree):
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = [path_names(p) for p, _ in path_leaves]
  return [p for p, _ in path_leaves], [l for _, l in path_leaves], names, treedef


def _check_layout_arg(layout: Any) -> None:
  if isinstance(layout, Mapping):
    for pattern, value in layout.items():
      check_choice(f"layout[{pattern!r}]", value, LAYOUTS)
  else:
    check_choice("layout", layout, LAYOUTS)


def leaf_layout(path: Sequence[Any], leaf: Any, layout: Layout = "auto", *,
                what: str = "structured mask") -> str:
  """``"in_out"`` or ``"out_in"`` for one weight leaf (see the module doc).

  Raises:
    ConfigError: ``layout`` is ``"auto"`` and the leaf's name does not tell its layout.
  """
  name = path_str(path)
  if isinstance(layout, Mapping):
    layout = next((v for p, v in layout.items() if re.search(p, name)), "auto")
  if layout != "auto":
    return layout
  leaf_name = path_names(path)[-1] if path else ""
  if leaf_name in IN_OUT_NAMES:
    return "in_out"
  if leaf_name in OUT_IN_NAMES:
    return "out_in"
  raise ConfigError(
      f"{what}: the name of {name} (shape {tuple(jnp.shape(leaf))}) does not tell which axis holds "
      "its output units; pass layout='in_out' ((..., in, out): Flax, Haiku, x @ W), "
      "layout='out_in' ((out, in, ...): Equinox, PyTorch) or a {path regex: layout} map")


def _bias_names(weight_name: str) -> tuple[str, ...]:
  """Names of the bias beside a weight: ``bias``, ``b``, and ``b_in`` / ``b1`` beside plain-dict
  weights named ``W_in`` / ``w1``."""
  suffix = re.match(r"(?i)^w_?(.+)$", weight_name)
  if suffix is None:
    return BIAS_NAMES
  return BIAS_NAMES + (f"b_{suffix.group(1)}", f"b{suffix.group(1)}")


def _sibling_bias(i: int, names: list[tuple[str, ...]], index: dict, leaves: list) -> int | None:
  if not names[i]:
    return None
  for b in _bias_names(names[i][-1]):
    j = index.get(names[i][:-1] + (b,))
    if j is not None and j != i:
      return j
  return None


def _unit_axes(shape: tuple[int, ...], layout: str, bias_shape: tuple[int, ...] | None,
               where: str, what: str) -> tuple[int, ...]:
  """The axes of a weight of ``shape`` that index its output units, checked against its bias."""
  nd = len(shape)
  if layout == "out_in":
    axes = (0,)
  elif (bias_shape is not None and 1 < len(bias_shape) < nd
        and tuple(shape[nd - len(bias_shape):]) == tuple(bias_shape)):
    axes = tuple(range(nd - len(bias_shape), nd))  # DenseGeneral: the bias has the unit axes.
  else:
    axes = (nd - 1,)
  units = math.prod(shape[a] for a in axes)
  if bias_shape is not None and math.prod(bias_shape) != units:
    other = "out_in" if layout == "in_out" else "in_out"
    raise ConfigError(
        f"{what}: with layout '{layout}' {where} (shape {shape}) has {units} output units on axis "
        f"{axes[0] if len(axes) == 1 else axes}, but its bias has {math.prod(bias_shape)} entries; "
        f"the layout looks wrong: pass layout='{other}' (or a {{path regex: layout}} map)")
  return axes


def _chosen(params, filter_fn, layout, what):
  """``(leaf index, unit axes)`` of every weight ``filter_fn`` selects, with layouts checked."""
  _check_layout_arg(layout)
  paths, leaves, names, _ = _flat(params)
  filter_fn = filter_fn or structured_filter_fn
  index = {n: i for i, n in enumerate(names)}
  chosen = []
  for i, (p, l) in enumerate(zip(paths, leaves)):
    if not (filter_fn(p, l) and jnp.ndim(l) >= 2):
      continue
    b = _sibling_bias(i, names, index, leaves)
    bias_shape = None if b is None else tuple(jnp.shape(leaves[b]))
    lay = leaf_layout(p, l, layout, what=what)
    chosen.append((i, _unit_axes(tuple(jnp.shape(l)), lay, bias_shape, path_str(p), what), b))
  if not chosen:
    raise nothing_selected_error(params, what, filter_fn)
  check_not_varying([leaves[i] for i, _, _ in chosen], what)
  return tuple(chosen)
