"""Online data pruning: every epoch (or every batch) decides which examples are back-propagated.

The pruners of :data:`ONLINE_PRUNERS` (``random_dynamic``: a random subset per epoch; ``batch``:
the top of each batch by a score; ``semi_batch``: InfoBatch) and ``rho_loss`` (batch pruning by
reducible loss, RHO-LOSS).
"""

from __future__ import annotations

from typing import Callable

from experiments import scoring, trainer
from experiments.context import Context
from experiments.strategies import base
from experiments.strategies.base import Rows
from prunejax import online


ONLINE_PRUNERS: dict[str, Callable[..., online.OnlinePruner]] = {
    "random_dynamic": lambda cfg: online.RandomSubset(cfg.data_pruning.dynamic_keep),
    "batch": lambda cfg: online.BatchTopK(cfg.batch_pruning.keep_fraction,
                                          cfg.batch_pruning.score, cfg.train.batch_size),
    "semi_batch": lambda cfg: online.InfoBatch(cfg.semi_batch.prune_ratio, cfg.semi_batch.delta),
}
"""The online data pruners by name, built from the config."""


def online_strategy(ctx: Context, name: str) -> Rows:
  """Training with the online pruner ``name``; ``fraction_kept`` is the measured fraction of
  examples back-propagated (the nominal one for batch and random pruning)."""
  pruner = ONLINE_PRUNERS[name](ctx.config)
  reps = list(base.replicates(ctx))

  def row(j, run):
    r, ids, held, _ = reps[j]
    kept = {"batch": ctx.config.batch_pruning.keep_fraction,
            "random_dynamic": ctx.config.data_pruning.dynamic_keep}.get(
                name, run.backward / (len(ids) * ctx.config.train.epochs))
    return trainer.result_row(ctx, name, r, run, held, fraction_kept=kept, nominal_fraction=-1.0)

  return base.replica_units(
      ctx, name, [f"{name}_r{r}" for r, *_ in reps],
      lambda todo, key: trainer.train_models(ctx, [reps[j][1] for j in todo],
                                             [reps[j][3] for j in todo], pruner=pruner,
                                             desc=name, checkpoint=key),
      row)


def rho_loss(ctx: Context) -> Rows:
  """RHO-LOSS (Mindermann et al. 2022): batch pruning by reducible loss, ``loss - irreducible
  loss``, with the irreducible losses of an IL model that never saw the examples
  (``experiments/scoring.irreducible_losses``); its training counts as scoring compute."""
  rows = []
  cfg = ctx.config
  for r, ids, held, seed in base.replicates(ctx):
    def unit(key=f"rho_loss_r{r}"):
      target_ids, il, il_compute = scoring.irreducible_losses(ctx, r, ids, seed)
      pruner = online.BatchTopK(cfg.batch_pruning.keep_fraction, "reducible_loss",
                                cfg.train.batch_size).with_irreducible_loss(target_ids, il)
      run = trainer.train_model(ctx, target_ids, seed=seed, pruner=pruner, desc=f"rho_loss r{r}",
                                checkpoint=key)
      return trainer.result_row(ctx, "rho_loss", r, run, held,
                                fraction_kept=cfg.batch_pruning.keep_fraction,
                                nominal_fraction=-1.0, scoring_compute=il_compute,
                                trained_on=len(target_ids) / len(ids))
    rows.append(ctx.units.run(f"rho_loss_r{r}", unit))
  return rows
