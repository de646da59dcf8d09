"""Alias of ``experiments/bench/scores.py`` for the commands and scripts that call
``python -m experiments.bench_scores``: importing this name gives that module itself."""

import sys

from experiments.bench import scores

if __name__ == "__main__":
  scores.cli()
else:
  sys.modules[__name__] = scores
