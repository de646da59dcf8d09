"""Online data pruning during one training run.

* **Batch pruning** (Selective Backprop, Jiang et al. 2019; RHO-LOSS, Mindermann et al. 2022): forward the
  whole mini-batch without gradients, then back-propagate only the ``k`` examples with the highest
  selection score (the loss, or the reducible loss ``loss - irreducible_loss``).
* **Semi-batch pruning** (InfoBatch, Qin et al. 2024): each epoch, randomly drop a fraction ``r`` of the
  examples whose last recorded loss is below the mean, scale the loss of the kept well-learned examples
  by ``1 / (1 - r)`` so the expected gradient is unchanged, and train on all data for the last
  ``1 - delta`` of the epochs. An ``(init, update)`` pair with a ``NamedTuple`` state, plus ``plan``
  which draws one epoch's subset.
* **Random**: a fresh uniform random subset of a fixed size every epoch (the honest baseline).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError, check_choice, check_range

SELECTION_SCORES = ("loss", "reducible_loss")


# ----------------------------------------------------------------------------------------------
# Batch pruning.
# ----------------------------------------------------------------------------------------------


def select_top_k(scores_B: jax.Array, mask_B: jax.Array, k: int) -> jax.Array:
  """Row indices i32[k] of the ``k`` highest scores among real rows (ties: lower row first).

  Padding rows rank below every real row; if fewer than ``k`` rows are real, padding rows fill the
  remaining slots (their ``mask`` stays False, so they add nothing to the loss).
  """
  scores_B = jnp.where(mask_B, scores_B.astype(jnp.float32), -jnp.inf)
  # top_k is stable for ties (lower index first) and avoids a full sort.
  _, idx_k = jax.lax.top_k(scores_B, k)
  return idx_k


def selection_score(ce_B: jax.Array, batch: dict, score: str) -> jax.Array:
  """Per-example selection score from the forward losses: ``loss`` or ``reducible_loss``."""
  check_choice("batch_pruning.score", score, SELECTION_SCORES)
  if score == "loss":
    return ce_B
  if "irreducible_loss" not in batch:
    raise ConfigError("batch_pruning.score='reducible_loss' needs batch['irreducible_loss'] "
                      "(per-example loss of an irreducible-loss model)")
  return ce_B - batch["irreducible_loss"]


def gather_rows(batch: dict, idx_k: jax.Array) -> dict:
  return {k: jnp.take(v, idx_k, axis=0) for k, v in batch.items()}


def num_selected(batch_size: int, keep_fraction: float) -> int:
  check_range("batch_pruning.keep_fraction", keep_fraction, 0.0, 1.0, lo_open=True)
  return max(1, int(round(batch_size * keep_fraction)))


# ----------------------------------------------------------------------------------------------
# Semi-batch pruning (InfoBatch).
# ----------------------------------------------------------------------------------------------


class InfoBatchState(NamedTuple):
  """``scores_N``: last recorded loss of each example (by position in the id array given to init)."""

  scores_N: jax.Array


def infobatch_init(num_examples: int, initial_score: float = 3.0) -> InfoBatchState:
  """All examples start with the same score (InfoBatch uses 3), so epoch 0 prunes nothing."""
  return InfoBatchState(jnp.full((num_examples,), initial_score, jnp.float32))


def infobatch_update(state: InfoBatchState, positions_B: jax.Array, losses_B: jax.Array,
                     mask_B: jax.Array) -> InfoBatchState:
  """Records the losses of a batch's real rows at their positions; padding rows change nothing."""
  n = state.scores_N.shape[0]
  pos = jnp.where(mask_B, positions_B, n)  # out-of-range index -> dropped
  return InfoBatchState(state.scores_N.at[pos].set(losses_B.astype(jnp.float32), mode="drop"))


def infobatch_plan(state: InfoBatchState, key: jax.Array, *, prune_ratio: float, epoch: int,
                   num_epochs: int, delta: float = 0.875) -> tuple[jax.Array, jax.Array]:
  """One epoch's subset: (keep bool[N], weight f32[N]).

  Examples with score below the mean are "well learned"; each is dropped with probability
  ``prune_ratio`` and, if kept, weighted ``1 / (1 - prune_ratio)``. From epoch ``delta * num_epochs``
  on, everything is kept with weight 1 (InfoBatch's annealing).
  """
  check_range("semi_batch.prune_ratio", prune_ratio, 0.0, 1.0, hi_open=True)
  check_range("semi_batch.delta", delta, 0.0, 1.0)
  scores = state.scores_N
  n = scores.shape[0]
  if epoch >= int(delta * num_epochs):
    return jnp.ones((n,), bool), jnp.ones((n,), jnp.float32)
  well_learned = scores < jnp.mean(scores)
  drop = well_learned & (jax.random.uniform(key, (n,)) < prune_ratio)
  weight = jnp.where(well_learned, 1.0 / (1.0 - prune_ratio), 1.0).astype(jnp.float32)
  return ~drop, jnp.where(drop, 0.0, weight)


# ----------------------------------------------------------------------------------------------
# Random dynamic subsets.
# ----------------------------------------------------------------------------------------------


def random_epoch_subset(ids: np.ndarray, keep_fraction: float, *, seed: int, epoch: int) -> np.ndarray:
  """A fresh uniform subset of ``round(keep_fraction * len(ids))`` ids for this epoch, sorted."""
  check_range("random.keep_fraction", keep_fraction, 0.0, 1.0, lo_open=True)
  ids = np.asarray(ids, np.int64)
  k = max(1, int(round(keep_fraction * len(ids))))
  rng = np.random.default_rng([seed, epoch, 0xD1CE])
  return np.sort(ids[rng.choice(len(ids), k, replace=False)])


# ----------------------------------------------------------------------------------------------
# The batch-pruned train step.
# ----------------------------------------------------------------------------------------------


def batch_pruned_train_step(state, batch: dict, *, k: int, score: str = "loss"):
  """Forward the whole batch, then one train step on its top-``k`` rows by ``score``.

  Returns ``(state, metrics)`` where metrics are those of the back-propagated rows plus
  ``forward_count`` (real rows forwarded) and ``count`` (real rows back-propagated).
  """
  from prunejax import train
  logits_BxC = state.model.apply(state.variables, batch["x"], train=False)
  ce_B = train.per_example_ce(logits_BxC, batch["y"])
  mask_B = train.batch_mask(batch, ce_B.shape[0])
  idx_k = select_top_k(jax.lax.stop_gradient(selection_score(ce_B, batch, score)), mask_B, k)
  state, metrics = train.train_step(state, gather_rows(batch, idx_k))
  return state, {**metrics, "forward_count": mask_B.sum().astype(jnp.float32)}


def infobatch_train_step(state, ib_state: InfoBatchState, batch: dict):
  """One train step on a semi-batch-pruned batch (with ``weight``) that records the losses of its
  forward pass at ``batch["position"]`` (InfoBatch reuses the training forward; no extra pass)."""
  from prunejax import train
  state, metrics, ce_B = train.train_step_with_losses(state, batch)
  mask_B = train.batch_mask(batch, ce_B.shape[0])
  return state, infobatch_update(ib_state, batch["position"], ce_B, mask_B), metrics


jit_infobatch_train_step = jax.jit(infobatch_train_step, donate_argnums=(0, 1))


@functools.lru_cache(maxsize=32)
def make_batch_pruned_step(k: int, score: str = "loss"):
  """A jitted :func:`batch_pruned_train_step` for a fixed ``k`` (state buffers donated)."""
  check_choice("batch_pruning.score", score, SELECTION_SCORES)
  return jax.jit(lambda s, b: batch_pruned_train_step(s, b, k=k, score=score), donate_argnums=0)
