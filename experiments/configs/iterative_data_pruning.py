"""Iterative data pruning on digits: train, score (EL2N), drop 30% of the remaining data, retrain from
scratch; repeat down to 20% kept. Reports the accuracy curve against the fraction kept.

Command:  python -m experiments.iterative_data_pruning --workdir=runs/iterative
Quick:    python -m experiments.iterative_data_pruning --config=experiments/configs/iterative_data_pruning.py:quick
Machine:  2-core CPU; about 2 minutes (quick: seconds).
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "iterative_data_pruning"
  c.strategies = ("dense", "iterative", "random")
  c.iterative.prune_per_round = 0.3
  c.iterative.target_keep = 0.2
  c.data_pruning.keep_fractions = (0.2, 0.49, 0.7)  # random at the iterative rounds' fractions
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 2
    c.dataset.num_train = 300
    c.iterative.score_epochs = 1
    c.iterative.target_keep = 0.5
    c.data_pruning.keep_fractions = (0.5,)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
