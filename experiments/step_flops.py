"""Alias of ``experiments/bench/step_flops.py`` for the commands and scripts that call
``python -m experiments.step_flops``: importing this name gives that module itself."""

import sys

from experiments.bench import step_flops

if __name__ == "__main__":
  step_flops.cli()
else:
  sys.modules[__name__] = step_flops
