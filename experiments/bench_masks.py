"""Alias of ``experiments/bench/masks.py`` for the commands and scripts that call
``python -m experiments.bench_masks``: importing this name gives that module itself."""

import sys

from experiments.bench import masks

if __name__ == "__main__":
  masks.cli()
else:
  sys.modules[__name__] = masks
