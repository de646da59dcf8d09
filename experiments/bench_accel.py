"""Alias of ``experiments/bench/accel.py`` for the commands and scripts that call
``python -m experiments.bench_accel``: importing this name gives that module itself."""

import sys

from experiments.bench import accel

if __name__ == "__main__":
  accel.cli()
else:
  sys.modules[__name__] = accel
