"""``dense``: every replicate trains on the full data, the baseline every row is compared with."""

from __future__ import annotations

from experiments import trainer
from experiments.context import Context
from experiments.strategies import base
from experiments.strategies.base import Rows


def dense(ctx: Context) -> Rows:
  reps = list(base.replicates(ctx))
  return base.replica_units(
      ctx, "dense", [f"dense_r{r}" for r, *_ in reps],
      lambda todo, key: trainer.train_models(ctx, [reps[j][1] for j in todo],
                                             [reps[j][3] for j in todo], desc="dense",
                                             checkpoint=key),
      lambda j, run: trainer.result_row(ctx, "dense", reps[j][0], run, reps[j][2]))
