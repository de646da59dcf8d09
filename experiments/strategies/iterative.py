"""``iterative``: iterative data pruning (train, score, keep the hardest, retrain; repeat)."""

from __future__ import annotations

import os

import numpy as np

from experiments import scoring, trainer
from experiments.context import Context
from experiments.files import save_npz
from experiments.strategies import base
from experiments.strategies.base import Rows
from prunejax import online, schedules, select


def iterative(ctx: Context) -> Rows:
  """Train, score (``iterative.score``, any per-batch score), keep the hardest part of the
  remaining data, retrain from scratch; repeat until ``iterative.target_keep`` of the data
  remains (``prunejax.schedules.geometric_levels``). One row per round."""
  it = ctx.config.iterative
  spec = scoring.scores_lib.SCORES[it.score]
  keeps = schedules.geometric_levels(it.prune_per_round, it.target_keep, remaining=True)
  rows = []
  for r, ids, held, seed in base.replicates(ctx):
    kept, spent = ids, 0.0
    for rnd, target in enumerate(keeps):
      def unit(kept=kept, target=target, rnd=rnd, spent=spent):
        run = trainer.train_model(ctx, kept, seed=seed, epochs=it.score_epochs,
                                  desc=f"iterative score round {rnd} r{r}")
        hardness = spec.hardness(trainer.score_ids(ctx, run.state, kept, it.score))
        spent = spent + run.compute + spec.passes * len(kept)
        n_keep = online.count_of(target, len(ids))
        new_kept = select.select(kept, hardness, fraction=n_keep / len(kept), keep="hard",
                                 seed=seed)
        save_npz(os.path.join(ctx.workdir, "subsets", f"iterative_round{rnd}_r{r}.npz"),
                        ids=new_kept)
        final = trainer.train_model(ctx, new_kept, seed=seed, desc=f"iterative round {rnd} r{r}",
                                    checkpoint=f"iterative_round{rnd}_r{r}")
        row = trainer.result_row(ctx, "iterative", r, final, held, fraction_kept=target,
                                 round=rnd, scoring_compute=spent)
        return {**row, "kept_ids": new_kept.tolist()}
      row = ctx.units.run(f"iterative_round{rnd}_r{r}", unit)
      kept, spent = np.asarray(row["kept_ids"], np.int64), row["scoring_compute"]
      rows.append({k: v for k, v in row.items() if k != "kept_ids"})
  return rows
