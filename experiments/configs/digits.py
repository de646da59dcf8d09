"""The main job on digits: every strategy of the seed workflow on scikit-learn's digits with LeNet-300-100.

Command:  python -m experiments.run            (this is the default config)
Quick:    python -m experiments.run --config=experiments/configs/digits.py:quick
Machine:  sized for a 2-core CPU; the full config runs in about 25 s there (64 s with
          --config.train.fused=False), :quick in ~15 s.
Expected: dense about 97% test accuracy (3 seeds); see BUILD_NOTES.md for the measured table.
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "digits"
  c.strategies = ("dense", "random", "el2n", "grand", "random_dynamic", "batch", "semi_batch",
                  "iterative", "imp")
  c.replicates = 3
  c.dataset.name = "digits"
  c.model.name = "mlp"
  c.train.epochs = 20
  c.data_pruning.keep_fractions = (0.1, 0.3, 0.5, 0.7, 0.9)
  c.iterative.prune_per_round = 0.3
  c.iterative.target_keep = 0.2
  c.imp.prune_per_round = 0.3
  c.imp.target_sparsity = 0.95
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 2
    c.strategies = tuple(x for x in c.strategies if x != "random_dynamic")
    c.data_pruning.keep_fractions = (0.5,)
    c.data_pruning.score_epochs = 1
    c.data_pruning.score_seeds = 1
    c.iterative.score_epochs = 1
    c.iterative.prune_per_round = 0.5
    c.iterative.target_keep = 0.5
    c.imp.prune_per_round = 0.5
    c.imp.target_sparsity = 0.75
    c.semi_batch.delta = 1.0  # two epochs: prune in the second (the first records the losses)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
