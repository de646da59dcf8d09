"""Fisher pruning: the diagonal empirical Fisher as a Hessian-free stand-in for the curvature of
Optimal Brain Damage."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from prunejax.losses import cross_entropy
from prunejax.types import ApplyFn, Batch, Params, PyTree, batch_mask


def fisher_scores(apply_fn: ApplyFn, params: Params, batch: Batch) -> PyTree:
  """``0.5 * w^2 * mean_i (d loss_i / d w)^2`` per weight: the loss increase Optimal Brain Damage
  predicts for removing ``w``, with the Hessian's diagonal replaced by the empirical Fisher's.

  Per-example gradients come from ``vmap(grad)`` over the real rows of ``batch`` (padding rows count
  0 and are not in the mean), so memory grows with batch size times parameters: score on a modest
  batch.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits``.
    params: the params.
    batch: ``x``, ``y`` and optionally ``mask``.

  Returns:
    Scores with the structure of ``params`` (higher = keep).

  References:
    LeCun, Denker, Solla. "Optimal Brain Damage." NeurIPS 1989; Theis et al. "Faster gaze
    prediction with dense networks and Fisher pruning." arXiv:1801.05787, 2018.
  """
  mask_B = batch_mask(batch, batch["y"].shape[0]).astype(jnp.float32)

  def example_loss(p, x1, y1):
    return cross_entropy(apply_fn(p, x1[None]), y1[None])[0]

  grads = jax.vmap(jax.grad(example_loss), in_axes=(None, 0, 0))(params, batch["x"], batch["y"])
  n = jnp.maximum(mask_B.sum(), 1.0)
  fisher = jax.tree.map(
      lambda g: jnp.tensordot(mask_B, jnp.square(g.astype(jnp.float32)), axes=1) / n, grads)
  return jax.tree.map(lambda w, f: 0.5 * jnp.square(w.astype(jnp.float32)) * f, params, fisher)


fisher_scores_jit = jax.jit(fisher_scores, static_argnums=0)
