"""The layer-by-layer driver shared by Wanda and SparseGPT.

How many weights each layer loses (``scope`` and ``distribution``, or N:M), ranks inside a frame,
and :func:`_layerwise`: stage by stage (:mod:`prunejax.masks.pt_layers`), gather the statistics of
the stage's input groups (:mod:`prunejax.masks.calibration`), prune each layer with the method's
``layer_fn`` and write the result back into the params.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError, check_choice, check_positive_int
from prunejax.masks.calibration import _device_batches, _gather, _token_mask_fn
from prunejax.masks.core import num_to_prune, path_str, threshold_mask_flags
from prunejax.masks.distributions import layer_sparsities
from prunejax.masks.pt_layers import (_analyse, _Analysis, _block_stages, _order, _stage_frames,
                                      _stages, _write_back)
from prunejax.types import ApplyFn, Batch, FilterFn, Mask, Params

SCOPES = ("row", "layerwise", "global")
"""Where a sparsity applies: each output row of each layer, each layer, or all layers together."""


# ----------------------------------------------------------------------------------------------
# How many weights each layer loses.
# ----------------------------------------------------------------------------------------------


class _Rule(NamedTuple):
  sparsity: float | None      # unstructured
  n_m: tuple[int, int] | None  # keep n of every m consecutive inputs


def _rule(sparsity: Any) -> _Rule:
  if isinstance(sparsity, str) and ":" in sparsity:
    n, m = sparsity.split(":", 1)
    try:
      n, m = int(n), int(m)
    except ValueError:
      n = m = -1
    if not 0 <= n <= m or m < 1:
      raise ConfigError(f"sparsity={sparsity!r} is not allowed; expected a fraction in [0, 1] or "
                        "'N:M' (keep N of every M consecutive inputs, 0 <= N <= M), e.g. '2:4'")
    return _Rule(None, (n, m))
  num_to_prune(sparsity, 1)
  return _Rule(float(sparsity), None)


def _split(total: int, sizes: Sequence[int]) -> list[int]:
  """``total`` split over parts of ``sizes`` by cumulative rounding: exact sum, proportional."""
  n, out, start = sum(sizes), [], 0
  for s in sizes:
    lo, hi = (2 * total * start + n) // (2 * n), (2 * total * (start + s) + n) // (2 * n)
    out.append(hi - lo)
    start += s
  return out


def _leaf_sparsities(params: Params, an: _Analysis, sparsity: float, distribution: Any) -> dict:
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  chosen = {p for p, f in zip(paths, an.flags) if f}
  per_leaf = jax.tree.leaves(layer_sparsities(
      params, sparsity, distribution or "uniform", lambda p, _: path_str(p) in chosen))
  return dict(enumerate(per_leaf))


def _counts(params: Params, an: _Analysis, rule: _Rule, scope: str, distribution: Any,
            global_scores: Callable[[], dict] | None) -> dict[int, int]:
  """Plan index -> weights pruned in the layer (``scope="row"``: in each output row)."""
  if rule.n_m is not None:
    return {layer.index: 0 for layer in an.layers}
  if scope == "global":
    if distribution is not None:
      raise ConfigError(f"distribution={distribution!r} needs scope='layerwise' or 'row'")
    scores = global_scores()
    ks = [layer.index for layer in an.layers]
    total = num_to_prune(rule.sparsity, sum(math.prod(layer.shape) for layer in an.layers))
    keep = threshold_mask_flags([scores[k] for k in ks], total, (True,) * len(ks))
    return {k: int(np.sum(~np.asarray(m))) for k, m in zip(ks, keep)}
  s = _leaf_sparsities(params, an, rule.sparsity, distribution)
  if scope == "row":
    return {layer.index: num_to_prune(s[layer.leaf], layer.shape[1]) for layer in an.layers}
  out = {}
  for leaf in sorted({layer.leaf for layer in an.layers}):
    mine = [layer for layer in an.layers if layer.leaf == leaf]
    sizes = [math.prod(layer.shape) for layer in mine]
    for layer, c in zip(mine, _split(num_to_prune(s[leaf], sum(sizes)), sizes)):
      out[layer.index] = c
  return out


# ----------------------------------------------------------------------------------------------
# Ranks in a frame.
# ----------------------------------------------------------------------------------------------


def _rank(s: jax.Array, axis: int) -> jax.Array:
  """Each entry's position in a stable ascending sort along ``axis`` (ties: lower index first)."""
  order = jnp.argsort(s, axis=axis, stable=True)
  return jnp.argsort(order, axis=axis, stable=True)


def _lowest_nm(s_RxK: jax.Array, n: int, m: int) -> jax.Array:
  """Pruned flags keeping the ``n`` highest of every ``m`` consecutive entries of each row (the
  ``m - n`` lowest go, ties to the lower index)."""
  r, k = s_RxK.shape
  return (_rank(s_RxK.reshape(r, k // m, m), 2) < m - n).reshape(r, k)


# ----------------------------------------------------------------------------------------------
# The layer-by-layer driver.
# ----------------------------------------------------------------------------------------------


class _Run(NamedTuple):
  """One call of :func:`wanda` or :func:`sparsegpt`, checked and set up."""

  an: _Analysis
  batches: list
  x: Any
  rule: _Rule
  counts: dict
  static: dict


def _setup(what: str, apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], sparsity: Any,
           scope: str, distribution: Any, filter_fn: FilterFn | None,
           token_mask_fn: Callable | None, mesh: Any, max_stats_bytes: int,
           blocksize: int | None = None, *, global_score: Callable) -> _Run:
  """Checks the arguments, puts the batches on device, finds the layers and counts what each
  loses; ``global_score(frame, norms_sq)`` ranks weights across layers for ``scope="global"``."""
  check_choice("scope", scope, SCOPES)
  check_positive_int("max_stats_bytes", max_stats_bytes)
  rule = _rule(sparsity)
  batches, _ = _device_batches(batches, mesh)
  x = batches[0]["x"]
  an = _analyse(apply_fn, params, x, filter_fn, what)
  static = dict(apply_fn=apply_fn, token_mask_fn=_token_mask_fn(token_mask_fn, x))
  if rule.n_m is not None:
    m = rule.n_m[1]
    for layer in an.layers:
      if layer.shape[1] % m:
        raise ConfigError(f"{what}: {layer.name} has {layer.shape[1]} inputs per output, not "
                          f"divisible by M={m} of sparsity={sparsity!r}")
    if blocksize is not None and blocksize % m:
      raise ConfigError(f"{what}: blocksize={blocksize} is not a multiple of M={m}")

  def global_scores():
    ks = tuple(layer.index for layer in an.layers)
    reps = tuple(g[0] for g in an.groups)
    stats = _gather(params, batches, an, reps=reps, gram=False, **static)
    frames = _stage_frames(params, x, apply_fn=apply_fn, ks=ks)
    rep = {k: g[0] for g in an.groups for k in g}
    return {k: global_score(frames[k], stats[rep[k]].norms_sq) for k in ks}

  counts = _counts(params, an, rule, scope, distribution, global_scores)
  return _Run(an, batches, x, rule, counts, static)


def _layerwise(run: _Run, params: Params, layer_fn: Callable, *, gram: bool, sequential: Any,
               max_stats_bytes: int, block_fn: Callable | None = None,
               what: str = "") -> tuple[Mask, Params]:
  """Visits the input groups in program order (in stages: one group, one block, or as many as fit
  in ``max_stats_bytes`` on the dense model); ``layer_fn(layer, frame, stats, count) -> (new frame
  or None, pruned)`` prunes each layer; returns the mask and the new params."""
  an, static = run.an, run.static
  order = _order(sequential)
  if order == "block":
    stages = _block_stages(an, block_fn, what)
  else:
    stages = _stages(an, order is not None, gram, max_stats_bytes)
  sequential = order is not None
  cur, mask = params, jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
  layer_of = {layer.index: layer for layer in an.layers}
  # A layer's weight changes only when its own group is pruned, so every frame comes from params.
  frames = _stage_frames(params, run.x, apply_fn=static["apply_fn"],
                         ks=tuple(layer.index for layer in an.layers))
  for stage in stages:
    reps = tuple(an.groups[g][0] for g in stage)
    stats = _gather(cur if sequential else params, run.batches, an, reps=reps, gram=gram,
                    **static)
    ks = tuple(k for g in stage for k in an.groups[g])
    new, pruned = {}, {}
    for g in stage:
      for k in an.groups[g]:
        new[k], pruned[k] = layer_fn(layer_of[k], frames[k], stats[an.groups[g][0]],
                                     run.counts[k])
    cur, mask = _write_back(cur, mask, run.x, None if new[ks[0]] is None else new, pruned,
                            apply_fn=static["apply_fn"], ks=ks)
  return mask, cur
