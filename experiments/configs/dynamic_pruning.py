"""Dynamic data pruning during one run on digits: random (a fresh subset each epoch), batch pruning
(back-propagate the top half of each batch by loss, Selective Backprop) and semi-batch pruning
(InfoBatch, r = 0.5, full data for the last 12.5% of epochs), against full training.

Command:  python -m experiments.dynamic_pruning --workdir=runs/dynamic
Quick:    python -m experiments.dynamic_pruning --config=experiments/configs/dynamic_pruning.py:quick
Machine:  2-core CPU; about 1 minute (quick: seconds).
Reported: examples forwarded, examples back-propagated, wall time and accuracy against full training.
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "dynamic_pruning"
  c.strategies = ("dense", "random_dynamic", "batch", "semi_batch")
  c.replicates = 3
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 3  # InfoBatch prunes in epoch 1 from the losses of epoch 0
    c.dataset.num_train = 300
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
