"""Post-training pruning from a small calibration set: Wanda and SparseGPT.

Both prune a trained model in one shot, layer by layer, from statistics of each linear layer's
input on a few examples (the papers use 128 sequences), without retraining:

* **Wanda** (Sun et al. 2023) scores ``|W_ij| * ||X_j||_2`` (``X_j``: input feature ``j`` over all
  calibration rows) and prunes the lowest scores, per output row by default. No weight update.
* **SparseGPT** (Frantar & Alistarh 2023, Algorithm 1) reconstructs each layer's output
  ``W X`` with optimal-brain-surgeon updates: columns are pruned left to right and each pruned
  weight's error is spread over the columns not yet visited through the upper Cholesky factor
  ``U`` of the damped inverse Hessian ``(X^T X + lambda I)^-1`` (``lambda`` = ``damp`` times the
  mean diagonal), applied lazily block by block; the mask is chosen every ``blocksize`` columns
  from ``w^2 / U_jj^2`` (adaptive mask selection), or inside every group of ``m`` columns for N:M.

The pieces live in files by what they do, and every public name is re-exported here:

* :mod:`~prunejax.masks.pt_layers`: the prunable layers (any ``apply_fn``, any kernel layout), the
  sequential orders (``sequential=``, :func:`default_block_fn`) and the write-back to the leaves.
* :mod:`~prunejax.masks.calibration`: the layer input statistics and their accumulation over
  (sharded) batches: :func:`calibrate`, :func:`calibration_nbytes`.
* :mod:`~prunejax.masks.pt_driver`: per-layer counts (``scope``, ``distribution``, N:M) and the
  stage-by-stage driver shared by both methods.
* :mod:`~prunejax.masks.wanda`: :func:`wanda`, :func:`wanda_scores`.
* :mod:`~prunejax.masks.sparsegpt`: :func:`obs_prune` (Algorithm 1 on one layer),
  :func:`sparsegpt`, :func:`sparsegpt_scores`.
* here: :func:`layer_errors`, each layer's reconstruction error.

References:
  Sun, Liu, Bair, Kolter. "A Simple and Effective Pruning Approach for Large Language Models."
  ICLR 2024 (arXiv:2306.11695, 2023).
  Frantar, Alistarh. "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot."
  ICML 2023 (arXiv:2301.00774).
  Hassibi, Stork. "Second order derivatives for network pruning: Optimal Brain Surgeon." NeurIPS
  1992.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
from jax import lax

# Public names, re-exported from the files that define them.
from prunejax.masks.calibration import (MAX_STATS_BYTES, Calibration, LayerStats, calibrate,
                                        calibration_nbytes)
from prunejax.masks.pt_driver import SCOPES
from prunejax.masks.pt_layers import (ORDERS, LinearLayer, default_block_fn, linear_filter_fn,
                                      linear_layers, sequential_passes)
from prunejax.masks.sparsegpt import obs_prune, sparsegpt, sparsegpt_scores
from prunejax.masks.wanda import wanda, wanda_scores, wanda_scores_frame
from prunejax.types import ApplyFn, Batch, FilterFn, Params
# Private names that tests, prunejax.masks.methods and experiments reach through this module.
# pylint: disable=unused-import
from prunejax.masks.calibration import _batch_stats, _check_batch, _dense_stats
from prunejax.masks.pt_driver import _rule
from prunejax.masks.pt_layers import _analyse, _stage_frames
from prunejax.masks.sparsegpt import _block_counts
# pylint: enable=unused-import

__all__ = ["MAX_STATS_BYTES", "ORDERS", "SCOPES", "Calibration", "LayerStats", "LinearLayer",
           "calibrate", "calibration_nbytes", "default_block_fn", "layer_errors",
           "linear_filter_fn", "linear_layers", "obs_prune", "reconstruction_error",
           "sequential_passes", "sparsegpt", "sparsegpt_scores", "wanda", "wanda_scores",
           "wanda_scores_frame"]

_HIGHEST = lax.Precision.HIGHEST


# ----------------------------------------------------------------------------------------------
# Each layer's reconstruction error.
# ----------------------------------------------------------------------------------------------


def reconstruction_error(w_GxKxE: jax.Array, new_GxKxE: jax.Array, h_GxKxK: jax.Array) -> jax.Array:
  """``||X W - X W'||_F^2 = sum_g tr((W - W')^T H (W - W'))`` of a layer's frames and ``H = X^T X``
  (float32)."""
  d = w_GxKxE.astype(jnp.float32) - new_GxKxE.astype(jnp.float32)
  return jnp.einsum("gke,gkl,gle->", d, h_GxKxK, d, precision=_HIGHEST)


def layer_errors(apply_fn: ApplyFn, params: Params, pruned_params: Params,
                 batches: Iterable[Batch], *, filter_fn: FilterFn | None = None,
                 token_mask_fn: Callable | None = None, mesh: Any = None) -> dict[str, float]:
  """Each prunable layer's relative reconstruction error on ``batches``.

  ``||X W - X W'||_F^2 / ||X W||_F^2`` with ``X`` the layer's inputs in the dense model (every
  row of ``batches``, as :func:`calibrate`), ``W`` its weight in ``params`` and ``W'`` in
  ``pruned_params`` (a masked copy, or :func:`sparsegpt`'s updated params). The output bias
  cancels; the error is the layer's own, not the accumulated one of the pruned model.

  Returns:
    Layer name (:class:`LinearLayer`) -> error, in program order.
  """
  out = {}
  for an, x, ks, frames, stats in _dense_stats("layer_errors", apply_fn, params, batches,
                                               gram=True, filter_fn=filter_fn,
                                               token_mask_fn=token_mask_fn, mesh=mesh):
    new = _stage_frames(pruned_params, x, apply_fn=apply_fn, ks=ks)
    name = {layer.index: layer.name for layer in an.layers}
    for k in ks:
      zero = jnp.zeros_like(frames[k])
      err = reconstruction_error(frames[k], new[k], stats[k].gram)
      out[name[k]] = float(err / reconstruction_error(frames[k], zero, stats[k].gram))
  return out
