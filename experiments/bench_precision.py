"""Alias of ``experiments/bench/precision.py`` for the commands and scripts that call
``python -m experiments.bench_precision``: importing this name gives that module itself."""

import sys

from experiments.bench import precision

if __name__ == "__main__":
  precision.cli()
else:
  sys.modules[__name__] = precision
