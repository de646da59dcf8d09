"""Alias of ``experiments/bench/check_projection.py`` for the commands and scripts that call
``python -m experiments.check_projection``: importing this name gives that module itself."""

import sys

from experiments.bench import check_projection

if __name__ == "__main__":
  check_projection.cli()
else:
  sys.modules[__name__] = check_projection
