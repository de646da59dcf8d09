"""Alias of ``experiments/bench/sweep.py`` for the commands and scripts that call
``python -m experiments.bench_sweep``: importing this name gives that module itself."""

import sys

from experiments.bench import sweep

if __name__ == "__main__":
  sweep.cli()
else:
  sys.modules[__name__] = sweep
