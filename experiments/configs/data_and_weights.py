"""Data and weights pruned together on digits: semi-batch data pruning (InfoBatch) inside IMP, against
each alone, to see whether the savings compound (examples back-propagated x remaining weights).

Command:  python -m experiments.data_and_weights --workdir=runs/joint
Quick:    python -m experiments.data_and_weights --config=experiments/configs/data_and_weights.py:quick
Machine:  2-core CPU; about 3 minutes (quick: seconds).
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "data_and_weights"
  c.strategies = ("dense", "semi_batch", "imp", "joint")
  c.joint.data = "semi_batch"
  c.imp.prune_per_round = 0.5
  c.imp.target_sparsity = 0.9
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 2
    c.dataset.num_train = 300
    c.imp.target_sparsity = 0.5
    c.semi_batch.delta = 1.0  # two epochs: InfoBatch prunes in the second
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
