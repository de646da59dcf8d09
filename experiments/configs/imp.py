"""Iterative magnitude pruning with rewinding (lottery tickets) on digits with LeNet-300-100, with the
random-reinit and random-mask controls (Frankle & Carbin 2019).

Prunes 20% of the remaining weights per round, globally, down to 95% sparsity (14 rounds), rewinding to
the initialization (set imp.rewind_step > 0 to rewind to an early step, Frankle et al. 2020).

Command:  python -m experiments.imp --workdir=runs/imp
Quick:    python -m experiments.imp --config=experiments/configs/imp.py:quick
Machine:  2-core CPU; about 5 minutes (quick: seconds).
Expected: winning tickets keep dense accuracy to high sparsity; both controls fall off earlier.
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "imp"
  c.strategies = ("imp", "imp_random_reinit", "imp_random_mask")
  c.imp.prune_per_round = 0.2
  c.imp.target_sparsity = 0.95
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 2
    c.dataset.num_train = 300
    c.imp.prune_per_round = 0.5
    c.imp.target_sparsity = 0.75
    c.imp.rewind_step = 3
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
