"""Wanda (Sun et al. 2023): prune the weights with the lowest ``|W_ij| * ||X_j||_2``.

``X_j`` is input feature ``j`` of the layer over all calibration rows
(:mod:`prunejax.masks.calibration`); the lowest scores are pruned, per output row by default. No
weight is updated. Layers, orders and scopes are those of :mod:`prunejax.masks.posttraining`.

References:
  Sun, Liu, Bair, Kolter. "A Simple and Effective Pruning Approach for Large Language Models."
  ICLR 2024 (arXiv:2306.11695, 2023).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp

from prunejax.masks.calibration import MAX_STATS_BYTES, _dense_stats
from prunejax.masks.core import threshold_mask_flags
from prunejax.masks.pt_driver import _layerwise, _lowest_nm, _rank, _setup
from prunejax.masks.pt_layers import _to_leaves
from prunejax.types import ApplyFn, Batch, FilterFn, Mask, Params, PyTree


def wanda_scores_frame(w_GxKxE: jax.Array, norms_sq_GxK: jax.Array) -> jax.Array:
  """Wanda's score ``|W_ij| * ||X_j||_2`` of a weight frame ``(G, K, E)`` and the squared input
  norms ``(G, K)``."""
  return jnp.abs(w_GxKxE.astype(jnp.float32)) * jnp.sqrt(norms_sq_GxK)[:, :, None]


@functools.partial(jax.jit, static_argnames=("scope", "n_m"))
def _wanda_frame(w_GxKxE: jax.Array, norms_sq_GxK: jax.Array, count: jax.Array, *, scope: str,
                 n_m: tuple[int, int] | None) -> jax.Array:
  """Pruned flags ``(G, K, E)`` of one layer by ``|W_ij| * ||X_j||``."""
  s = wanda_scores_frame(w_GxKxE, norms_sq_GxK)
  g, k, e = s.shape
  if n_m is not None or scope == "row":
    rows = jnp.transpose(s, (0, 2, 1)).reshape(g * e, k)
    pruned = (_lowest_nm(rows, *n_m) if n_m is not None else _rank(rows, 1) < count)
    return jnp.transpose(pruned.reshape(g, e, k), (0, 2, 1))
  return ~threshold_mask_flags([s], count, (True,))[0]


def wanda(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], sparsity: float | str, *,
          scope: str = "row", distribution: str | Mapping[str, float] | None = None,
          sequential: bool | str = True, filter_fn: FilterFn | None = None,
          token_mask_fn: Callable | None = None, mesh: Any = None,
          max_stats_bytes: int = MAX_STATS_BYTES,
          block_fn: Callable[[str], Any] | None = None) -> Mask:
  """Wanda: prunes the weights with the lowest ``|W_ij| * ||X_j||_2``, without updating the rest.

  ``||X_j||_2`` is the norm of the layer's input feature ``j`` over every calibration row (real
  examples; with ``token_mask_fn``, real positions).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` over exactly ``params``; any JAX function.
    params: the trained params (replicated over ``mesh``).
    batches: the calibration batches: dicts with ``x`` and optionally ``mask`` and ``id``, host
      arrays (sharded over ``mesh``, each process passing its rows) or device arrays, all of one
      shape (e.g. ``prunejax.data.batches`` over the calibration ids). Kept on device while
      pruning.
    sparsity: the fraction of each layer's (``scope``) weights removed, or ``"N:M"`` (keep N of
      every M consecutive inputs of each output, e.g. ``"2:4"``; ``scope`` is then ignored).
    scope: ``"row"`` (the paper's default: each output of each layer loses ``round(s * K)`` of
      its ``K`` inputs), ``"layerwise"`` (``round(s * n)`` of each layer's ``n`` weights) or
      ``"global"`` (``round(s * N)`` of all, where the scores are lowest across layers; the
      per-layer counts are fixed on the dense model).
    distribution: per-layer sparsities for ``"row"``/``"layerwise"``: ``"uniform"`` (default),
      ``"erk"`` or a ``{path: sparsity}`` map (:mod:`prunejax.masks.distributions`).
    sequential: ``True``/``"group"``: calibrate each input group on the outputs of the already
      pruned layers before it; ``"block"``: block by block, each block's layers at once on the
      outputs of the pruned blocks before it (the papers' code); False: every layer on the dense
      model. See :mod:`prunejax.masks.pt_layers`.
    filter_fn: the prunable leaves (default :data:`linear_filter_fn`).
    token_mask_fn: ``token_mask_fn(x) -> bool[B, T]``, False at the padding positions of a
      sequence; rows of those positions are left out of every dense layer that sees ``T`` rows
      per example.
    mesh: the device mesh for host batches (default: all devices on a ``data`` axis).
    max_stats_bytes: with ``sequential=False``, the statistics gathered in one pass.
    block_fn: with ``sequential="block"``, ``block_fn(layer name) -> block key`` (default
      :func:`default_block_fn`); each block's layers must be contiguous in program order.

  Returns:
    The mask (bool pytree shaped like ``params``; leaves not chosen are all True).

  Raises:
    ConfigError: a bad sparsity or scope, a filter selecting no leaf or a leaf that is not a dense
      or conv weight, an N:M whose M does not divide a layer's inputs.
    DataError: no calibration batches, or batches of different shapes.

  References:
    Sun, Liu, Bair, Kolter. "A Simple and Effective Pruning Approach for Large Language Models."
    ICLR 2024.
  """
  run = _setup("wanda", apply_fn, params, batches, sparsity, scope, distribution, filter_fn,
               token_mask_fn, mesh, max_stats_bytes, global_score=wanda_scores_frame)

  def layer_fn(layer, frame, stats, count):
    return None, _wanda_frame(frame, stats.norms_sq, jnp.asarray(count, jnp.int32), scope=scope,
                              n_m=run.rule.n_m)

  return _layerwise(run, params, layer_fn, gram=False, sequential=sequential,
                    max_stats_bytes=max_stats_bytes, block_fn=block_fn, what="wanda")[0]


def wanda_scores(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], *,
                 filter_fn: FilterFn | None = None, token_mask_fn: Callable | None = None,
                 mesh: Any = None) -> PyTree:
  """Wanda's ``|W_ij| * ||X_j||_2`` of every prunable weight on the dense model (float32, shaped
  like ``params``, 0 on other leaves); arguments as :func:`wanda`."""
  out = None
  for _, x, ks, frames, stats in _dense_stats("wanda", apply_fn, params, batches, gram=False,
                                              filter_fn=filter_fn, token_mask_fn=token_mask_fn,
                                              mesh=mesh):
    values = {k: wanda_scores_frame(frames[k], stats[k].norms_sq) for k in ks}
    got = _to_leaves(params, x, values, apply_fn=apply_fn, ks=ks)
    out = got if out is None else jax.tree.map(jnp.add, out, got)
  return out
