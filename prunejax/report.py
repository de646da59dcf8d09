"""Reporting helpers for pruned models: sparsity per layer and overall, remaining parameters, and
the FLOPs of a forward pass before and after pruning.

FLOPs come two ways: :func:`forward_flops` asks XLA (``cost_analysis`` of the compiled forward pass:
every op, but dense, so unstructured zeros still count), and :func:`linear_flops` counts the
multiply-adds of each Dense and Conv layer analytically (``2 * output positions * kernel entries``),
once for the dense kernels and once for only the kept entries, the FLOPs a sparse kernel would need.
Compaction makes the XLA count itself drop.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np

from prunejax.masks.core import path_str, prunable_leaves
from prunejax.types import FilterFn, Mask, Params


def _kept(leaf: Any, mask_leaf: Any | None) -> int:
  if mask_leaf is None:
    return int(np.count_nonzero(np.asarray(leaf)))
  return int(np.count_nonzero(np.asarray(mask_leaf)))


def sparsity_report(params: Params, mask: Mask | None = None,
                    filter_fn: FilterFn | None = None) -> dict[str, Any]:
  """Sparsity of every prunable leaf, of the prunable leaves together, and of all parameters.

  A weight counts as kept when its mask entry is True (or, without a mask, when it is nonzero).

  Args:
    params: the params.
    mask: optional mask with the structure of ``params``.
    filter_fn: chooses the prunable leaves.

  Returns:
    ``{"layers": {path: {"size", "remaining", "sparsity"}}, "prunable": {...}, "total": {...}}``.
  """
  leaves, flags, treedef = prunable_leaves(params, filter_fn)
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  mask_leaves = [None] * len(leaves) if mask is None else treedef.flatten_up_to(mask)
  layers = {}
  totals = {"prunable": [0, 0], "total": [0, 0]}
  for path, leaf, f, m in zip(paths, leaves, flags, mask_leaves):
    size, kept = math.prod(np.shape(leaf)), _kept(leaf, m)
    totals["total"][0] += size
    totals["total"][1] += kept
    if f:
      totals["prunable"][0] += size
      totals["prunable"][1] += kept
      layers[path] = {"size": size, "remaining": kept, "sparsity": 1.0 - kept / max(size, 1)}
  out = {"layers": layers}
  for name, (size, kept) in totals.items():
    out[name] = {"size": size, "remaining": kept, "sparsity": 1.0 - kept / max(size, 1)}
  return out


def remaining_params(params: Params, mask: Mask | None = None) -> int:
  """Number of parameters kept (mask True, or nonzero without a mask), over all leaves."""
  leaves = jax.tree.leaves(params)
  masks = [None] * len(leaves) if mask is None else jax.tree.structure(params).flatten_up_to(mask)
  return sum(_kept(l, m) for l, m in zip(leaves, masks))


def forward_flops(apply_fn: Callable[[Params, jax.Array], jax.Array], params: Params,
                  x: jax.Array) -> float:
  """FLOPs of one forward pass ``apply_fn(params, x)`` as XLA's cost analysis counts them."""
  cost = jax.jit(apply_fn).lower(params, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", float("nan")))


def linear_flops(model: nn.Module, params: Params, x: jax.Array, mask: Mask | None = None, *,
                 extra_variables: dict | None = None) -> dict[str, dict[str, float]]:
  """Analytic FLOPs of every Dense and Conv layer of a Flax model, dense and sparse.

  Each layer call costs ``2 * (output entries / output features) * kernel entries`` FLOPs densely
  and the same with only the kept kernel entries (mask True, or nonzero without a mask) for the
  sparse count. Shapes come from an abstract evaluation (nothing is computed).

  Args:
    model: a Flax module, applied as ``model.apply({"params": params, **extra_variables}, x)``.
    params: its params.
    x: an example input (its batch size scales the counts).
    mask: optional mask with the structure of ``params``.
    extra_variables: other collections (e.g. ``{"batch_stats": ...}``).

  Returns:
    ``{module path: {"dense": flops, "sparse": flops}}``, plus ``"total"``.
  """
  calls = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, (nn.Dense, nn.Conv)) and context.method_name == "__call__":
      calls.append((tuple(context.module.path), out.shape))
    return out

  variables = {"params": params, **(extra_variables or {})}
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: model.apply(v, x), variables, x)
  kept_tree = params if mask is None else mask
  out: dict[str, dict[str, float]] = {}
  for path, out_shape in calls:
    node_p, node_k = params, kept_tree
    for name in path:
      node_p, node_k = node_p[name], node_k[name]
    kernel = node_p["kernel"]
    positions = math.prod(out_shape) // kernel.shape[-1]
    dense = 2.0 * positions * math.prod(kernel.shape)
    sparse = 2.0 * positions * _kept(kernel, None if mask is None else node_k["kernel"])
    key = "/".join(path)
    prev = out.get(key, {"dense": 0.0, "sparse": 0.0})
    out[key] = {"dense": prev["dense"] + dense, "sparse": prev["sparse"] + sparse}
  out["total"] = {"dense": sum(v["dense"] for v in out.values()),
                  "sparse": sum(v["sparse"] for v in out.values())}
  return out


def pruning_report(model: nn.Module, params: Params, x: jax.Array, mask: Mask | None = None, *,
                   compacted: tuple[nn.Module, Params] | None = None,
                   filter_fn: FilterFn | None = None) -> dict[str, Any]:
  """Sparsity, remaining parameters and forward FLOPs of a pruned model, before and after.

  Args:
    model: a Flax module without non-param collections.
    params: its params (dense, before pruning).
    x: an example input batch.
    mask: the mask.
    compacted: optional ``(model, params)`` from :func:`prunejax.masks.compact`.
    filter_fn: chooses the prunable leaves.

  Returns:
    A dict with ``sparsity`` (see :func:`sparsity_report`), ``params_before``, ``params_after``,
    ``xla_flops_before``, ``linear_flops_before`` / ``_after`` (dense / kept kernel entries) and,
    with ``compacted``, ``params_compacted`` and ``xla_flops_compacted``.
  """
  apply = lambda m: (lambda p, x: m.apply({"params": p}, x))
  lin = linear_flops(model, params, x, mask)["total"]
  report = {
      "sparsity": sparsity_report(params, mask, filter_fn),
      "params_before": sum(math.prod(np.shape(l)) for l in jax.tree.leaves(params)),
      "params_after": remaining_params(params, mask),
      "xla_flops_before": forward_flops(apply(model), params, x),
      "linear_flops_before": lin["dense"],
      "linear_flops_after": lin["sparse"],
  }
  if compacted is not None:
    c_model, c_params = compacted
    report["params_compacted"] = sum(math.prod(np.shape(l)) for l in jax.tree.leaves(c_params))
    report["xla_flops_compacted"] = forward_flops(apply(c_model), c_params, x)
  return report


def format_report(report: dict[str, Any]) -> str:
  """A short text table of :func:`pruning_report` (or of :func:`sparsity_report`'s dict)."""
  sp = report.get("sparsity", report)
  lines = [f"{'layer':<40} {'size':>12} {'kept':>12} {'sparsity':>9}"]
  for path, row in sp["layers"].items():
    lines.append(f"{path:<40} {row['size']:>12,} {row['remaining']:>12,} {row['sparsity']:>9.4f}")
  for name in ("prunable", "total"):
    row = sp[name]
    lines.append(f"{name:<40} {row['size']:>12,} {row['remaining']:>12,} {row['sparsity']:>9.4f}")
  for key in ("params_before", "params_after", "params_compacted", "xla_flops_before",
              "linear_flops_before", "linear_flops_after", "xla_flops_compacted"):
    if key in report:
      lines.append(f"{key:<40} {report[key]:>12,.0f}")
  return "\n".join(lines)
