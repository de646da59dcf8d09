"""Alias of ``experiments/bench/audit.py`` for the commands and scripts that call
``python -m experiments.bench_audit``: importing this name gives that module itself."""

import sys

from experiments.bench import audit

if __name__ == "__main__":
  audit.cli()
else:
  sys.modules[__name__] = audit
