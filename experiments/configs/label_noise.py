"""Batch pruning under label noise: back-propagating the highest-loss half of each batch (``batch``)
against RHO-LOSS's reducible loss (``rho_loss``), on digits with 20% of the training labels flipped.

Command:  python -m experiments.run --config=experiments/configs/label_noise.py
Variant:  :rotten_tomatoes runs the same comparison on Rotten Tomatoes (no added noise: the snippets
          are noisy already) with the config of experiments/configs/rotten_tomatoes.py.
Quick:    --config=experiments/configs/label_noise.py:quick (the tests run it).
Machine:  2-core CPU; digits about 2 minutes, rotten_tomatoes about 25 minutes.
Expected: every row reports corrupted_backprop_fraction, the share of back-propagated examples whose
          label was flipped: about 0.2 for dense, above it for loss-based selection (the corrupted
          examples have the highest losses), below it for RHO-LOSS (Mindermann et al. 2022, Fig. 3).
          Measured figures in BUILD_NOTES.md.
"""

from experiments.configs import base, rotten_tomatoes


def get_config(variant: str = ""):
  if variant == "rotten_tomatoes":
    c = rotten_tomatoes.get_config()
    c.name = "rho_loss_rotten_tomatoes"
    c.strategies = ("dense", "batch", "rho_loss")
    c.replicates = 2
    c.rho_loss.epochs = 2
    return c
  c = base.get_config()
  c.name = "label_noise"
  c.strategies = ("dense", "batch", "rho_loss")
  c.replicates = 3
  c.dataset.name = "digits"
  c.dataset.label_noise = 0.2
  c.model.name = "mlp"
  c.train.epochs = 20
  c.rho_loss.epochs = 10
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 2
    c.rho_loss.epochs = 1
    c.dataset.num_train = 256
    c.dataset.num_test = 128
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '', 'quick' or 'rotten_tomatoes'")
  return c
