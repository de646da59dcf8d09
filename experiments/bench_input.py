"""Alias of ``experiments/bench/input.py`` for the commands and scripts that call
``python -m experiments.bench_input``: importing this name gives that module itself."""

import sys

from experiments.bench import input

if __name__ == "__main__":
  input.cli()
else:
  sys.modules[__name__] = input
