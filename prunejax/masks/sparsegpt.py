"""SparseGPT (Frantar & Alistarh 2023): prune each layer and update its remaining weights.

Each layer's output ``W X`` is reconstructed with optimal-brain-surgeon updates: columns are pruned
left to right and each pruned weight's error is spread over the columns not yet visited through
the upper Cholesky factor ``U`` of the damped inverse Hessian ``(X^T X + lambda I)^-1``
(``lambda`` = ``damp`` times the mean diagonal), applied lazily block by block; the mask is chosen
every ``blocksize`` columns from ``w^2 / U_jj^2`` (adaptive mask selection), or inside every group
of ``m`` columns for N:M. :func:`obs_prune` is that kernel on one layer's frames; :func:`sparsegpt`
runs it layer by layer on the Gram matrices of :mod:`prunejax.masks.calibration`.

References:
  Frantar, Alistarh. "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot."
  ICML 2023 (arXiv:2301.00774).
  Hassibi, Stork. "Second order derivatives for network pruning: Optimal Brain Surgeon." NeurIPS
  1992.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
from jax import lax

from prunejax.errors import ConfigError, check_positive_int
from prunejax.masks.calibration import MAX_STATS_BYTES, _dense_stats
from prunejax.masks.pt_driver import _layerwise, _lowest_nm, _rank, _setup, _split
from prunejax.masks.pt_layers import _to_leaves
from prunejax.masks.wanda import wanda_scores_frame
from prunejax.types import ApplyFn, Batch, FilterFn, Mask, Params, PyTree

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# SparseGPT on one layer (Frantar & Alistarh 2023, Algorithm 1).
# ----------------------------------------------------------------------------------------------


def _upper_inverse_cholesky(h_KxK: jax.Array) -> jax.Array:
  """``U`` upper triangular with ``U^T U = H^-1``."""
  eye = jnp.eye(h_KxK.shape[0], dtype=h_KxK.dtype)
  hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h_KxK), True), eye)
  return jnp.linalg.cholesky(0.5 * (hinv + hinv.T)).T


def _damped(w_ExK: jax.Array, h_KxK: jax.Array, damp: jax.Array, kp: int):
  """Dead inputs (zero on every row) get ``H_jj = 1`` and zero weights, then ``damp`` times the
  mean diagonal is added to the diagonal; both are padded to ``kp`` columns with identity."""
  e, k = w_ExK.shape
  dead = jnp.diagonal(h_KxK) == 0
  h = h_KxK + jnp.diag(dead.astype(h_KxK.dtype))
  w = jnp.where(dead[None], 0.0, w_ExK)
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
  h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag((jnp.arange(kp) >= k).astype(h.dtype))
  return jnp.pad(w, ((0, 0), (0, kp - k))), h


def _block_mask(w1_ExB, d1_B, real_B, count, per_row: bool, n_m) -> jax.Array:
  """The block's pruned flags from ``w^2 / U_jj^2`` at the block's start (none yet for N:M)."""
  e, b = w1_ExB.shape
  if n_m is not None:
    return jnp.zeros((e, b), bool)
  sal = jnp.where(real_B[None], jnp.square(w1_ExB) / jnp.square(d1_B)[None], jnp.inf)
  if per_row:
    return _rank(sal, 1) < count
  return (_rank(sal.reshape(-1), 0) < count).reshape(e, b)


def _columns(w1_ExB, m1_ExB, u1_BxB, n_m):
  """Prunes the block's columns left to right, updating the block's later columns (OBS)."""
  e, b = w1_ExB.shape
  d1 = jnp.diagonal(u1_BxB)

  def column(i, carry):
    w1, m1, err1 = carry
    if n_m is not None:  # N:M: each group of m columns is chosen when its first column comes up.
      n, m = n_m
      fresh = _lowest_nm(jnp.square(lax.dynamic_slice(w1, (0, i), (e, m)))
                         / jnp.square(lax.dynamic_slice(d1, (i,), (m,)))[None], n, m)
      m1 = jnp.where(i % m == 0, lax.dynamic_update_slice(m1, fresh, (0, i)), m1)
    w = w1[:, i]
    q = jnp.where(m1[:, i], 0.0, w)
    err = (w - q) / u1_BxB[i, i]
    w1 = (w1 - err[:, None] * u1_BxB[i][None, :]).at[:, i].set(q)
    return w1, m1, err1.at[:, i].set(err)

  return lax.fori_loop(0, b, column, (w1_ExB, m1_ExB, jnp.zeros_like(w1_ExB)))


def _obs_one(w_ExK, h_KxK, counts_nb, damp, *, blocksize: int, per_row: bool, n_m):
  e, k = w_ExK.shape
  nb = -(-k // blocksize)
  kp = nb * blocksize
  w, h = _damped(w_ExK.astype(jnp.float32), h_KxK.astype(jnp.float32), damp, kp)
  u = _upper_inverse_cholesky(h)
  cols = jnp.arange(kp)

  def block(b, carry):
    w, pruned = carry
    i1 = b * blocksize
    w1 = lax.dynamic_slice(w, (0, i1), (e, blocksize))
    u1 = lax.dynamic_slice(u, (i1, i1), (blocksize, blocksize))
    m1 = _block_mask(w1, jnp.diagonal(u1), lax.dynamic_slice(cols, (i1,), (blocksize,)) < k,
                     counts_nb[b], per_row, n_m)
    w1, m1, err1 = _columns(w1, m1, u1, n_m)
    rows = lax.dynamic_slice(u, (i1, 0), (blocksize, kp))
    later = jnp.dot(err1, rows, precision=_HIGHEST)
    w = jnp.where(cols[None] >= i1 + blocksize, w - later, lax.dynamic_update_slice(w, w1, (0, i1)))
    return w, lax.dynamic_update_slice(pruned, m1, (0, i1))

  w, pruned = lax.fori_loop(0, nb, block, (w, jnp.zeros((e, kp), bool)))
  return w[:, :k], pruned[:, :k]


@functools.partial(jax.jit, static_argnames=("blocksize", "per_row", "n_m"))
def obs_prune(w_GxExK: jax.Array, h_GxKxK: jax.Array, counts_GxNB: jax.Array, damp: Any, *,
              blocksize: int = 128, per_row: bool = False,
              n_m: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
  """SparseGPT's Algorithm 1 on ``G`` weight matrices ``W (E outputs, K inputs)``.

  Columns (inputs) are visited left to right in blocks of ``blocksize``. At the start of each
  block, the weights with the lowest ``w^2 / U_jj^2`` are chosen (``counts_GxNB[g, b]`` of the
  block, or of each row with ``per_row``; ties to the lower row-major index), ``U`` the upper
  Cholesky factor of ``H^-1``. Each column's pruned weights are set to 0 and their error
  ``(w - q) / U_jj`` is subtracted from the block's later columns times ``U_j,:``; the block's
  errors update the columns after the block at once (lazy batch updates). With ``n_m = (n, m)``
  the ``m - n`` lowest of every ``m`` consecutive inputs of each row are chosen when the group's
  first column comes up. Computed in float32.

  Args:
    w_GxExK: the weights, rows = outputs.
    h_GxKxK: the Hessians ``X^T X`` (any positive scale). Inputs whose ``H_jj`` is 0 (never
      active on the calibration rows) get ``H_jj = 1`` and zero weights, as in the reference code.
    counts_GxNB: weights pruned in each block (of each row with ``per_row``); ignored for N:M.
    damp: ``lambda / mean(diag H)``: the dampening added to the diagonal (the paper's 1%).
    blocksize: columns per block ``B_s`` (the paper's 128); a multiple of ``m`` for N:M.
    per_row: counts per row instead of per block.
    n_m: keep ``n`` of every ``m`` consecutive inputs instead of counts.

  Returns:
    ``(updated weights f32[G, E, K], pruned bool[G, E, K])``; pruned weights are exactly 0.
  """
  fn = functools.partial(_obs_one, blocksize=blocksize, per_row=per_row, n_m=n_m)
  return jax.vmap(fn, in_axes=(0, 0, 0, None))(w_GxExK, h_GxKxK, counts_GxNB, damp)


def _block_counts(shape: tuple[int, int, int], count: int, per_row: bool,
                  blocksize: int) -> np.ndarray:
  """``(G, blocks)`` counts: a layer's (or a row's) count split over its blocks and groups."""
  g, k, e = shape
  cols = [min(blocksize, k - i) for i in range(0, k, blocksize)]
  if per_row:
    return np.tile(np.asarray(_split(count, cols), np.int32), (g, 1))
  return np.asarray(_split(count, [e * c for _ in range(g) for c in cols]), np.int32).reshape(g, -1)


# ----------------------------------------------------------------------------------------------
# SparseGPT on a model.
# ----------------------------------------------------------------------------------------------


def sparsegpt(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], sparsity: float | str,
              *, scope: str = "layerwise", distribution: str | Mapping[str, float] | None = None,
              sequential: bool | str = True, blocksize: int = 128, damp: float = 0.01,
              filter_fn: FilterFn | None = None, token_mask_fn: Callable | None = None,
              mesh: Any = None, max_stats_bytes: int = MAX_STATS_BYTES,
              block_fn: Callable[[str], Any] | None = None) -> tuple[Mask, Params]:
  """SparseGPT: prunes each layer and updates its remaining weights to reconstruct its output.

  Each layer's weight ``W (E outputs, K inputs)`` goes through :func:`obs_prune` with the Gram
  matrix ``H = X^T X`` of its inputs over every calibration row.

  Args:
    apply_fn, params, batches, filter_fn, token_mask_fn, mesh, max_stats_bytes, distribution,
      block_fn: as :func:`wanda`.
    sparsity: the fraction removed, or ``"N:M"`` (keep N of every M consecutive inputs).
    scope: ``"layerwise"`` (the paper: ``round(s * n)`` of each layer's weights, spread over its
      blocks in proportion), ``"row"`` (``round(s * K)`` per output row) or ``"global"``
      (per-layer counts from one ranking of ``|W_ij| * ||X_j||`` over all layers of the dense
      model, the OBS saliency with the Hessian's diagonal; then each layer by SparseGPT).
    sequential: ``True``/``"group"``: calibrate each input group on the outputs of the pruned and
      updated layers before it; ``"block"``: block by block, as the paper's code does
      (``opt_sequential``); False: every layer on the dense model.
    blocksize: columns per lazy-update block and per mask choice (the paper's 128).
    damp: dampening, as a fraction of the mean diagonal of ``H`` (the paper's 0.01).

  Returns:
    ``(mask, params)``: the mask, and the params with every pruned weight exactly 0 and the
    remaining weights of the pruned layers updated (other leaves unchanged).

  Raises:
    ConfigError: as :func:`wanda`, a ``blocksize`` that is not a multiple of M, or a Hessian that
      is not positive definite after dampening (raise ``damp``).
    DataError: as :func:`wanda`.

  References:
    Frantar, Alistarh. "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot."
    ICML 2023.
  """
  check_positive_int("blocksize", blocksize)
  if not damp > 0:
    raise ConfigError(f"damp={damp!r} is not allowed; expected a positive fraction, e.g. 0.01")
  run = _setup("sparsegpt", apply_fn, params, batches, sparsity, scope, distribution, filter_fn,
               token_mask_fn, mesh, max_stats_bytes, blocksize=blocksize,
               global_score=wanda_scores_frame)
  per_row = scope == "row"

  def layer_fn(layer, frame, stats, count):
    counts = _block_counts(layer.shape, count, per_row, blocksize)
    w = jnp.transpose(frame, (0, 2, 1))
    new, pruned = obs_prune(w, stats.gram, counts, jnp.float32(damp), blocksize=blocksize,
                            per_row=per_row, n_m=run.rule.n_m)
    if not bool(jnp.all(jnp.isfinite(new))):
      raise ConfigError(f"sparsegpt: the Hessian of {layer.name} is not positive definite after "
                        f"dampening with damp={damp}; raise damp")
    return jnp.transpose(new, (0, 2, 1)), jnp.transpose(pruned, (0, 2, 1))

  return _layerwise(run, params, layer_fn, gram=True, sequential=sequential,
                    max_stats_bytes=max_stats_bytes, block_fn=block_fn, what="sparsegpt")


@jax.jit
def _obs_saliency(w_GxKxE: jax.Array, h_GxKxK: jax.Array, damp: jax.Array) -> jax.Array:
  def one(w, h):
    k = h.shape[0]
    wk, hk = _damped(jnp.transpose(w).astype(jnp.float32), h, damp, k)
    return jnp.square(jnp.transpose(wk)) / jnp.square(jnp.diagonal(
        _upper_inverse_cholesky(hk)))[:, None]
  return jax.vmap(one)(w_GxKxE, h_GxKxK)


def sparsegpt_scores(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], *,
                     damp: float = 0.01, filter_fn: FilterFn | None = None,
                     token_mask_fn: Callable | None = None, mesh: Any = None) -> PyTree:
  """SparseGPT's saliency ``w^2 / U_jj^2`` of the dense weights (the criterion of its first mask
  choice, before any update; ``U`` the upper Cholesky factor of the damped ``H^-1``), shaped like
  ``params`` (0 on other leaves); arguments as :func:`sparsegpt`."""
  out = None
  for _, x, ks, frames, stats in _dense_stats("sparsegpt", apply_fn, params, batches, gram=True,
                                              filter_fn=filter_fn, token_mask_fn=token_mask_fn,
                                              mesh=mesh):
    values = {k: _obs_saliency(frames[k], stats[k].gram, jnp.float32(damp)) for k in ks}
    got = _to_leaves(params, x, values, apply_fn=apply_fn, ks=ks)
    out = got if out is None else jax.tree.map(jnp.add, out, got)
  return out
