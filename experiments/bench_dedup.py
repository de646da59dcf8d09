"""Alias of ``experiments/bench/dedup.py`` for the commands and scripts that call
``python -m experiments.bench_dedup``: importing this name gives that module itself."""

import sys

from experiments.bench import dedup

if __name__ == "__main__":
  dedup.cli()
else:
  sys.modules[__name__] = dedup
