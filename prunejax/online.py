"""Online data pruning inside one training run: which examples an epoch visits, and which rows of a
batch are back-propagated.

* **Batch pruning** (Selective Backprop, Jiang et al. 2019; RHO-LOSS, Mindermann et al. 2022): forward
  the whole mini-batch without gradients, then back-propagate only the ``k`` examples with the highest
  selection score (the loss, or the reducible loss ``loss - irreducible_loss``).
* **Semi-batch pruning** (InfoBatch, Qin et al. 2024): each epoch, randomly drop a fraction ``r`` of
  the examples whose last recorded loss is below the mean, scale the loss of the kept well-learned
  examples by ``1 / (1 - r)`` so the expected gradient is unchanged, and train on all data from epoch
  ``delta * num_epochs`` on. An ``(init, update)`` pair keyed by example id with a ``NamedTuple`` state,
  plus ``plan`` which draws one epoch's subset (the epoch may be traced).
* **Random**: a fresh uniform random subset of a fixed size every epoch (the honest baseline).

Each strategy is also an :class:`OnlinePruner` object, which is what a training loop takes:
``init(ids)`` gives its state, ``plan(state, ids, seed=, epoch=, num_epochs=)`` the epoch's ids and
per-example columns (host side), ``step()`` the jitted ``(train_state, pruner_state, batch) ->
(train_state, pruner_state, metrics)`` step, and ``steps_per_epoch(n, batch_size)`` the length of an
epoch for the learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError, check_choice, check_device_ids, check_range
from prunejax.types import batch_mask

SELECTION_SCORES = ("loss", "reducible_loss")


def count_of(fraction: float, n: int) -> int:
  """``floor(fraction * n + 0.5)``: the one rule by which prunejax turns a fraction into a count."""
  return int(math.floor(fraction * n + 0.5))


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
  """Rows back-propagated per batch: ``count_of(keep_fraction, batch_size)``, at least 1."""
  check_range("batch_pruning.keep_fraction", keep_fraction, 0.0, 1.0, lo_open=True)
  return max(1, count_of(keep_fraction, batch_size))


def batch_pruned_train_step(state, batch: dict, *, k: int, score: str = "loss"):
  """Forward the whole batch, then one train step on its top-``k`` rows by ``score``.

  Returns ``(state, metrics)`` where metrics are those of the back-propagated rows plus
  ``forward_count``: every forward pass that ran, the selection forward of the real rows and the
  training forward of the selected real rows (compute is ``forward + 2 * backward`` example
  passes, so a step costs ``B + 3k``, not ``B + 2k``), and ``count`` (real rows back-propagated).
  """
  from prunejax import train
  logits_BxC = train.eval_logits(state, batch["x"])
  ce_B = train.per_example_ce(logits_BxC, batch["y"])
  mask_B = batch_mask(batch, ce_B.shape[0])
  idx_k = select_top_k(jax.lax.stop_gradient(selection_score(ce_B, batch, score)), mask_B, k)
  state, metrics = train.train_step(state, gather_rows(batch, idx_k))
  return state, {**metrics, "forward_count": mask_B.sum().astype(jnp.float32) + metrics["count"]}


# ----------------------------------------------------------------------------------------------
# Semi-batch pruning (InfoBatch), keyed by example id.
# ----------------------------------------------------------------------------------------------


class InfoBatchState(NamedTuple):
  """``ids_N`` (sorted) and ``scores_N``, the last recorded loss of each example."""

  ids_N: jax.Array
  scores_N: jax.Array


def infobatch_init(ids: Any, initial_score: float = 3.0) -> InfoBatchState:
  """All examples start with the same score (InfoBatch uses 3), so epoch 0 prunes nothing."""
  if isinstance(ids, jax.core.Tracer):  # under jit: no host checks.
    return InfoBatchState(jnp.sort(ids.astype(jnp.int32)),
                          jnp.full(ids.shape, initial_score, jnp.float32))
  ids_N = jnp.sort(jnp.asarray(check_ids(ids, "InfoBatch ids"), jnp.int32))
  return InfoBatchState(ids_N, jnp.full(ids_N.shape, initial_score, jnp.float32))


def infobatch_update(state: InfoBatchState, ids_B: jax.Array, losses_B: jax.Array,
                     mask_B: jax.Array) -> InfoBatchState:
  """Records the losses of a batch's real rows under their ids; padding rows and ids the state
  does not hold change nothing."""
  n = state.ids_N.shape[0]
  ids_B = ids_B.astype(state.ids_N.dtype)
  pos = jnp.clip(jnp.searchsorted(state.ids_N, ids_B), 0, max(n - 1, 0))
  known = mask_B & (state.ids_N[pos] == ids_B)
  pos = jnp.where(known, pos, n)  # out of range -> dropped
  return state._replace(scores_N=state.scores_N.at[pos].set(losses_B.astype(jnp.float32),
                                                            mode="drop"))


def infobatch_plan(state: InfoBatchState, key: jax.Array, *, prune_ratio: float, epoch: Any,
                   num_epochs: int, delta: float = 0.875) -> tuple[jax.Array, jax.Array]:
  """One epoch's subset, aligned with ``state.ids_N``: (keep bool[N], weight f32[N]).

  Examples with score below the mean are "well learned"; each is dropped with probability
  ``prune_ratio`` and, if kept, weighted ``1 / (1 - prune_ratio)``. Pruning stops at epoch
  ``delta * num_epochs`` (InfoBatch's annealing, ``epoch < delta * num_epochs`` prunes, as in the
  paper's code); from then on everything is kept with weight 1. ``epoch`` may be traced.
  """
  check_range("semi_batch.prune_ratio", prune_ratio, 0.0, 1.0, hi_open=True)
  check_range("semi_batch.delta", delta, 0.0, 1.0)
  scores = state.scores_N
  n = scores.shape[0]
  pruning = jnp.asarray(epoch, jnp.float32) < jnp.float32(delta * num_epochs)
  well_learned = (scores < jnp.mean(scores)) & pruning
  drop = well_learned & (jax.random.uniform(key, (n,)) < prune_ratio)
  weight = jnp.where(well_learned, 1.0 / (1.0 - prune_ratio), 1.0).astype(jnp.float32)
  return ~drop, jnp.where(drop, 0.0, weight)


def infobatch_train_step(state, ib_state: InfoBatchState, batch: dict):
  """One train step on a semi-batch-pruned batch (with ``weight``) that records the losses of its
  forward pass under the batch's ids (InfoBatch reuses the training forward; no extra pass)."""
  from prunejax import train
  state, metrics, ce_B = train.train_step_with_losses(state, batch)
  mask_B = batch_mask(batch, ce_B.shape[0])
  return state, infobatch_update(ib_state, batch["id"], ce_B, mask_B), metrics


# ----------------------------------------------------------------------------------------------
# Random dynamic subsets.
# ----------------------------------------------------------------------------------------------


def check_ids(ids: Any, field: str = "ids") -> np.ndarray:
  """``ids`` as int64 after the checks every pruner's ``plan`` needs: a 1-D integer array (a float
  id would be truncated into another example's), unique, and within int32 (they go to the device).
  """
  a = np.asarray(ids)
  if a.ndim != 1 or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
    raise ConfigError(f"{field} must be a 1-D integer array; got dtype {a.dtype}, shape {a.shape}")
  check_device_ids(field, a)
  a = a.astype(np.int64)
  if len(np.unique(a)) != len(a):
    raise ConfigError(f"{field} must be unique; {len(a) - len(np.unique(a))} are repeated")
  return a


def random_epoch_subset(ids: np.ndarray, keep_fraction: float, *, seed: int, epoch: int) -> np.ndarray:
  """A fresh uniform subset of ``count_of(keep_fraction, len(ids))`` ids (at least 1, none of
  none) for this epoch, sorted; drawn over the ids in sorted order, so it does not depend on the
  order they come in."""
  check_range("random.keep_fraction", keep_fraction, 0.0, 1.0, lo_open=True)
  ids = np.sort(check_ids(ids, "random.ids"))
  if not len(ids):
    return ids
  k = max(1, count_of(keep_fraction, len(ids)))
  rng = np.random.default_rng([seed, epoch, 0xD1CE])
  return np.sort(ids[rng.choice(len(ids), k, replace=False)])


# ----------------------------------------------------------------------------------------------
# The pruners a training loop takes.
# ----------------------------------------------------------------------------------------------


class EpochPlan(NamedTuple):
  """The ids an epoch visits and per-example columns aligned with them (e.g. ``weight``)."""

  ids: np.ndarray
  columns: dict


def _checked_plan(plan):
  @functools.wraps(plan)
  def checked(self, state, ids, **kwargs):
    return plan(self, state, check_ids(ids, f"{self.name}.plan ids"), **kwargs)
  return checked


@functools.lru_cache(maxsize=64)
def _jit_step(pruner: "OnlinePruner"):
  return jax.jit(pruner.train_step, donate_argnums=(0, 1))


@dataclasses.dataclass(frozen=True)
class OnlinePruner:
  """Every example every epoch, every row back-propagated: plain training (and the base class)."""

  name = "full_data"
  fixed_epoch_length = True  # every epoch has steps_per_epoch steps (replicas can share a program)

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "plan" in vars(cls):  # every pruner's plan sees checked ids, whoever writes it
      cls.plan = _checked_plan(vars(cls)["plan"])

  def init(self, ids: np.ndarray) -> Any:
    return ()

  def plan(self, state: Any, ids: np.ndarray, *, seed: int, epoch: int,
           num_epochs: int) -> EpochPlan:
    return EpochPlan(check_ids(ids, f"{self.name}.plan ids"), {})

  def steps_per_epoch(self, num_ids: int, batch_size: int) -> int:
    return -(-num_ids // batch_size)

  def train_step(self, state, pruner_state, batch):
    from prunejax import train
    state, metrics = train.train_step(state, batch)
    return state, pruner_state, metrics

  def step(self):
    """The jitted step (train and pruner state buffers donated), one per pruner setting."""
    return _jit_step(self)


FullData = OnlinePruner


@dataclasses.dataclass(frozen=True)
class RandomSubset(OnlinePruner):
  """A fresh random ``keep_fraction`` of the examples every epoch."""

  keep_fraction: float = 0.5
  name = "random_dynamic"

  def plan(self, state, ids, *, seed, epoch, num_epochs):
    return EpochPlan(random_epoch_subset(ids, self.keep_fraction, seed=seed, epoch=epoch), {})

  def steps_per_epoch(self, num_ids, batch_size):
    return -(-max(1, count_of(self.keep_fraction, num_ids)) // batch_size)


@dataclasses.dataclass(frozen=True)
class BatchTopK(OnlinePruner):
  """Back-propagate the ``keep_fraction`` of each batch with the highest loss (``score="loss"``) or
  reducible loss (``"reducible_loss"``; :meth:`with_irreducible_loss` gives the per-example
  irreducible losses, keyed by id).

  Attributes:
    keep_fraction: fraction of each batch back-propagated.
    score: ``"loss"`` or ``"reducible_loss"``.
    batch_size: the global batch size (k = ``num_selected(batch_size, keep_fraction)``).
  """

  keep_fraction: float = 0.5
  score: str = "loss"
  batch_size: int = 32
  irreducible: tuple | None = dataclasses.field(default=None, compare=False, hash=False)
  name = "batch"

  def __post_init__(self):
    check_choice("batch_pruning.score", self.score, SELECTION_SCORES)
    num_selected(self.batch_size, self.keep_fraction)

  def with_irreducible_loss(self, ids: np.ndarray, losses: np.ndarray) -> "BatchTopK":
    """This pruner with per-example irreducible losses (``losses[i]`` of example ``ids[i]``)."""
    from prunejax.data.ids import IdIndex
    return dataclasses.replace(self, irreducible=(IdIndex(ids, "the irreducible losses"),
                                                  np.asarray(losses, np.float32)))

  def plan(self, state, ids, *, seed, epoch, num_epochs):
    ids = np.asarray(ids, np.int64)
    if self.score != "reducible_loss":
      return EpochPlan(ids, {})
    if self.irreducible is None:
      raise ConfigError("batch_pruning.score='reducible_loss' needs irreducible losses; give them "
                        "with BatchTopK.with_irreducible_loss(ids, losses)")
    index, values = self.irreducible
    return EpochPlan(ids, {"irreducible_loss": values[index.rows(ids)]})

  def train_step(self, state, pruner_state, batch):
    k = num_selected(self.batch_size, self.keep_fraction)
    state, metrics = batch_pruned_train_step(state, batch, k=k, score=self.score)
    return state, pruner_state, metrics


@dataclasses.dataclass(frozen=True)
class InfoBatch(OnlinePruner):
  """InfoBatch (see the module doc); the state is keyed by example id."""

  prune_ratio: float = 0.5
  delta: float = 0.875
  initial_score: float = 3.0
  name = "semi_batch"
  fixed_epoch_length = False  # an epoch visits the examples its plan keeps

  def __post_init__(self):
    check_range("semi_batch.prune_ratio", self.prune_ratio, 0.0, 1.0, hi_open=True)
    check_range("semi_batch.delta", self.delta, 0.0, 1.0)

  def init(self, ids):
    return infobatch_init(ids, self.initial_score)

  def plan(self, state, ids, *, seed, epoch, num_epochs):
    keep_N, weight_N = infobatch_plan(state, jax.random.fold_in(jax.random.key(seed), epoch),
                                      prune_ratio=self.prune_ratio, epoch=epoch,
                                      num_epochs=num_epochs, delta=self.delta)
    keep_N, weight_N = np.asarray(keep_N), np.asarray(weight_N)
    plan_ids = np.asarray(state.ids_N, np.int64)
    if not np.array_equal(np.sort(np.asarray(ids, np.int64)), plan_ids):
      raise ConfigError("InfoBatch.plan: ids differ from those the state was initialized with")
    return EpochPlan(plan_ids[keep_N], {"weight": weight_N[keep_N]})

  def train_step(self, state, pruner_state, batch):
    state, pruner_state, metrics = infobatch_train_step(state, pruner_state, batch)
    return state, pruner_state, metrics
