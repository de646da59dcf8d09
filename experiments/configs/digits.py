"""The main job on digits: every strategy of the seed workflow on scikit-learn's digits with LeNet-300-100.

Command:  python -m experiments.run            (this is the default config)
Quick:    python -m experiments.run --config=experiments/configs/digits.py:quick
Machine:  sized for a 2-core CPU; the full config runs in under 5 minutes there, :quick in ~30 s.
Expected: dense about 97-98% test accuracy; see BUILD_NOTES.md for the measured table.
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "digits"
  c.strategies = ("dense", "random", "el2n", "grand", "batch", "semi_batch", "iterative", "imp")
  c.dataset.name = "digits"
  c.model.name = "mlp"
  c.train.epochs = 20
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 2
    c.data_pruning.keep_fractions = (0.5,)
    c.data_pruning.score_epochs = 1
    c.data_pruning.score_seeds = 1
    c.iterative.score_epochs = 1
    c.iterative.target_keep = 0.5
    c.imp.target_sparsity = 0.75
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
