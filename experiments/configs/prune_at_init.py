"""Pruning at initialization on digits: SNIP, GraSP, SynFlow, magnitude and random masks at 50/80/90/95%
sparsity, each trained to completion with its mask fixed.

Command:  python -m experiments.prune_at_init --workdir=runs/pai
Quick:    python -m experiments.prune_at_init --config=experiments/configs/prune_at_init.py:quick
Machine:  2-core CPU; about 3 minutes (quick: seconds).
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "prune_at_init"
  c.strategies = ("dense", "pai")
  c.pai.sparsities = (0.5, 0.8, 0.9, 0.95)
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 1
    c.dataset.num_train = 200
    c.pai.sparsities = (0.8,)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
