"""The main job: the whole seed workflow of prunejax on one dataset.

    python -m experiments.run                     # digits, under 5 minutes on a 2-core CPU
    python -m experiments.run --config=experiments/configs/digits.py:quick --workdir=/tmp/w
    python -m experiments.run --config=experiments/configs/rotten_tomatoes.py

Runs the strategies named in ``config.strategies`` (dense baseline; random, static score-based, batch and
semi-batch data pruning; iterative data pruning; IMP with rewinding; ...), prints a headline computed
from the results, a summary table and the absolute paths of report.md, the plots and the TensorBoard
events, and writes them (with results.json and results.csv) into the workdir. Rerunning
the same command with the same ``--workdir`` resumes after the last finished unit of work.
"""

from __future__ import annotations

import time

import jax
from absl import logging

from experiments import cleaning, cli, common, reporting, strategies
from experiments.configs import fields
from prunejax import checkpoint


def run(config, workdir: str, overwrite: bool = False) -> list[dict]:
  # ------------------------------------------------------------------------------ data, model
  fields.validate(config)
  # The workdir's lock is held for the whole run: a second run on it is refused before it touches
  # anything, and the lock goes with the process on any exit.
  with common.prepare_workdir(workdir, config, overwrite):
    try:
      return _run(config, workdir)
    finally:
      checkpoint.close_all()  # no checkpoint thread outlives the run, whatever stopped it


def _run(config, workdir: str) -> list[dict]:
  ctx = common.setup(config, workdir)
  t0 = time.perf_counter()
  logging.info("%s on %s (%d train / %d test), model %s, %d replicates; workdir %s",
               config.get("name", "run"), config.dataset.name, len(ctx.ds.train), len(ctx.ds.test),
               config.model.name, ctx.num_replicates, workdir)
  # ------------------------------------------------------------------------------ strategies
  rows: list[dict] = []
  for name in config.strategies:
    t = time.perf_counter()
    rows += strategies.REGISTRY[name](ctx)
    logging.info("%-18s done in %6.1f s", name, time.perf_counter() - t)
  # ------------------------------------------------------------------------------ report
  report = reporting.write_report(workdir, config, rows, strategies.baseline_compute(ctx),
                                  num_train=len(ctx.ds.train), num_test=len(ctx.ds.test),
                                  data_notes=cleaning.notes(ctx))
  if jax.process_index() == 0:  # the headline and table are the script's output, not log lines
    print(report.console(time.perf_counter() - t0), flush=True)
  return rows


if __name__ == "__main__":
  cli.main(run, "digits.py")
