"""Per-layer sparsity distributions: how a target sparsity is split over the prunable leaves.

Each function returns a pytree with the structure of the params whose leaves are the sparsity of
that leaf (0.0 on leaves that ``filter_fn`` excludes). Combined with a per-leaf exact select, leaf
``l`` loses exactly ``round(s_l * n_l)`` weights.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import numpy as np

from prunejax.errors import ConfigError
from prunejax.masks.core import num_to_prune, path_str, prunable_leaves, resolve_filter
from prunejax.types import FilterFn, Params, PyTree

DISTRIBUTIONS = ("uniform", "erk")


def uniform(params: Params, sparsity: Any, filter_fn: FilterFn | None = None) -> PyTree:
  """Every prunable leaf gets ``sparsity`` (which may be traced)."""
  num_to_prune(sparsity, 1)  # validates a concrete value.
  flags = resolve_filter(params, filter_fn, what="uniform")
  treedef = jax.tree.structure(params)
  return jax.tree.unflatten(treedef, [sparsity if f else 0.0 for f in flags])


def erk(params: Params, sparsity: float, filter_fn: FilterFn | None = None, *,
        power_scale: float = 1.0) -> PyTree:
  """Erdős–Rényi-Kernel sparsities.

  The density of leaf ``l`` is ``eps * (sum of its dims / product of its dims) ** power_scale``
  (for a dense ``(in, out)`` kernel ``(in + out) / (in * out)``, for a conv ``(h, w, in, out)``
  kernel ``(h + w + in + out) / (h * w * in * out)``), with ``eps`` chosen so that the total density
  of the prunable leaves is ``1 - sparsity``. A leaf whose density would exceed 1 is kept dense and
  ``eps`` is solved again over the others.

  Args:
    params: the params (only shapes are used).
    sparsity: overall target sparsity in ``[0, 1]`` over the prunable leaves (concrete).
    filter_fn: chooses the prunable leaves.
    power_scale: exponent of the raw ERK probability (1.0 in Evci et al.; 0.0 gives uniform).

  Returns:
    A pytree of per-leaf sparsities (Python floats).

  References:
    Evci et al. 2020, "Rigging the Lottery: Making All Tickets Winners", Sec. 3 and Appendix; the
    iterative solve follows ``get_sparsities_erdos_renyi`` of the RigL code.
  """
  if isinstance(sparsity, jax.core.Tracer):
    raise ConfigError("erk needs a concrete sparsity (its dense-layer set depends on the value)")
  num_to_prune(sparsity, 1)
  sparsity = float(sparsity)
  resolve_filter(params, filter_fn, what="erk")
  leaves, flags, treedef = prunable_leaves(params, filter_fn)
  # Empty leaves have nothing to prune (sparsity 0); a 0-d leaf counts as density ``eps``.
  shapes = {i: tuple(np.shape(l)) for i, (l, f) in enumerate(zip(leaves, flags))
            if f and math.prod(np.shape(l)) > 0}
  out = [0.0] * len(leaves)
  if not shapes:
    return jax.tree.unflatten(treedef, out)
  raw = {i: (sum(s) / math.prod(s)) ** power_scale if s else 1.0 for i, s in shapes.items()}
  dense: set[int] = set()
  eps = 0.0
  while True:
    rhs, divisor = 0.0, 0.0
    for i, s in shapes.items():
      n = math.prod(s)
      if i in dense:
        rhs -= n * sparsity
      else:
        rhs += n * (1.0 - sparsity)
        divisor += raw[i] * n
    if divisor == 0.0:
      break  # every leaf is dense: only possible for sparsity 0.
    eps = rhs / divisor
    max_raw = max(raw[i] for i in shapes if i not in dense)
    if max_raw * eps > 1.0:
      dense.update(i for i in shapes if i not in dense and raw[i] == max_raw)
    else:
      break
  for i in shapes:
    out[i] = 0.0 if i in dense else float(min(1.0, max(0.0, 1.0 - eps * raw[i])))
  return jax.tree.unflatten(treedef, out)


def custom(params: Params, sparsity_map: Mapping[str, float], filter_fn: FilterFn | None = None, *,
           default: float = 0.0) -> PyTree:
  """Sparsities from a map keyed by path.

  A key matches a leaf whose ``"a/b/kernel"`` path equals it or starts with ``key + "/"`` (so a
  module name covers its kernel); the longest matching key wins. Prunable leaves that no key matches
  get ``default``.

  Args:
    params: the params.
    sparsity_map: ``{path or module prefix: sparsity}``.
    filter_fn: chooses the prunable leaves.
    default: sparsity of prunable leaves without a key.

  Returns:
    A pytree of per-leaf sparsities.

  Raises:
    ConfigError: a key matches no prunable leaf, or a value is not in ``[0, 1]``.
  """
  num_to_prune(default, 1, "default")
  for key, value in sparsity_map.items():
    num_to_prune(value, 1, f"sparsity_map[{key!r}]")
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  flags = resolve_filter(params, filter_fn, what="custom")
  paths = [path_str(p) for p, _ in path_leaves]
  used: set[str] = set()
  out = []
  for p, f in zip(paths, flags):
    if not f:
      out.append(0.0)
      continue
    keys = [k for k in sparsity_map if p == k or p.startswith(k.rstrip("/") + "/")]
    if keys:
      best = max(keys, key=len)
      used.add(best)
      out.append(float(sparsity_map[best]))
    else:
      out.append(float(default))
  unused = [k for k in sparsity_map if k not in used]
  if unused:
    prunable = [p for p, f in zip(paths, flags) if f]
    raise ConfigError(f"sparsity_map keys {unused} match no prunable leaf; prunable leaves: "
                      f"{', '.join(prunable)}")
  return jax.tree.unflatten(treedef, out)


def layer_sparsities(params: Params, sparsity: Any, distribution: Any,
                     filter_fn: FilterFn | None = None) -> PyTree:
  """Per-leaf sparsities from a distribution name (``"uniform"``, ``"erk"``) or a custom map."""
  if isinstance(distribution, Mapping):
    return custom(params, distribution, filter_fn)
  if distribution == "uniform":
    return uniform(params, sparsity, filter_fn)
  if distribution == "erk":
    return erk(params, sparsity, filter_fn)
  raise ConfigError(f"distribution={distribution!r} is not allowed; choose one of: "
                    f"{', '.join(map(repr, DISTRIBUTIONS))} or a {{path: sparsity}} map")
