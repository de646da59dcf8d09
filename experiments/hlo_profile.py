"""Alias of ``experiments/bench/hlo_profile.py``: importing this name gives that module itself."""

import sys

from experiments.bench import hlo_profile

sys.modules[__name__] = hlo_profile
