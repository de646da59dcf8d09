"""``pai``: pruning at initialization by any registered mask method, then training to completion."""

from __future__ import annotations

import os

from experiments import trainer
from experiments.context import Context
from experiments.files import save_mask
from experiments.strategies import base
from experiments.strategies.base import Rows
from prunejax import masks
from prunejax.masks import RewindPoint


def pai(ctx: Context) -> Rows:
  """Pruning at initialization by the mask methods ``pai.methods`` at ``pai.sparsities``, then
  training to completion. SNIP and GraSP score one batch of ``train.batch_size`` training examples
  (Lee et al. 2019; Wang et al. 2020); SynFlow is data-free with 100 rounds (Tanaka et al. 2020);
  magnitude and random prune the initial weights."""
  cfg = ctx.config.pai
  filter_fn = base.filter_fn(ctx)
  rows = []
  for r, ids, held, seed in base.replicates(ctx):
    init = base.init_params(ctx, seed)
    for name in cfg.methods:
      for sp in cfg.sparsities:
        def unit(name=name, sp=sp):
          method = masks.METHODS[name]
          mask = method.mask(init, sp, base.mask_inputs(ctx, ids, seed, method.needs),
                             filter_fn=filter_fn)
          save_mask(os.path.join(ctx.workdir, "masks", f"pai_{name}_{sp}_r{r}.npz"), mask)
          run = trainer.train_model(ctx, ids, seed=seed, mask=mask, rewind_to=RewindPoint(0, init),
                                    desc=f"pai {name} {sp} r{r}")
          return trainer.result_row(ctx, "pai", r, run, held, method=name, nominal_sparsity=sp,
                                    sparsity=float(masks.sparsity_of(mask, filter_fn)))
        rows.append(ctx.units.run(f"pai_{name}_{sp}_r{r}", unit))
  return rows
