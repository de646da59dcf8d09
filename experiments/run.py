"""The main job: the whole seed workflow of prunejax on one dataset.

    python -m experiments.run                     # digits, under 5 minutes on a 2-core CPU
    python -m experiments.run --config=experiments/configs/digits.py:quick --workdir=/tmp/w
    python -m experiments.run --config=experiments/configs/rotten_tomatoes.py

Runs the strategies named in ``config.strategies`` (dense baseline; random, static score-based, batch and
semi-batch data pruning; iterative data pruning; IMP with rewinding; ...), prints a summary table and
writes report.md, results.json, results.csv, plots and TensorBoard events into the workdir. Rerunning
the same command with the same ``--workdir`` resumes after the last finished unit of work.
"""

from __future__ import annotations

import logging
import time

from experiments import cli, common, reporting, strategies

log = logging.getLogger("prunejax")


def run(config, workdir: str, overwrite: bool = False) -> list[dict]:
  # ------------------------------------------------------------------------------ data, model
  common.validate_config(config)
  common.prepare_workdir(workdir, config, overwrite)
  ctx = common.setup(config, workdir)
  t0 = time.perf_counter()
  print(f"prunejax: {config.get('name', 'run')} on {config.dataset.name} "
        f"({len(ctx.ds.train)} train / {len(ctx.ds.test)} test), model {config.model.name}, "
        f"{ctx.num_replicates} replicates; workdir {workdir}", flush=True)
  # ------------------------------------------------------------------------------ strategies
  rows: list[dict] = []
  for name in config.strategies:
    t = time.perf_counter()
    rows += strategies.REGISTRY[name](ctx)
    print(f"  {name:<18s} done in {time.perf_counter() - t:6.1f} s", flush=True)
  # ------------------------------------------------------------------------------ report
  table = reporting.write_report(workdir, config, rows, strategies.baseline_compute(ctx))
  print(table)
  print(f"total {time.perf_counter() - t0:.1f} s; report: {workdir}/report.md", flush=True)
  return rows


if __name__ == "__main__":
  cli.main(run, "digits.py")
