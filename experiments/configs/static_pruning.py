"""Static data pruning (Data Diet, Paul et al. 2021) on digits with LeNet-300-100.

Trains briefly over several seeds, scores every example (EL2N, GraNd, forgetting, AUM, prototypes,
cross-validated label quality), keeps a fraction by each score and by random, retrains from scratch and
compares against full data, under both conventions (same epochs, same steps), with the scoring compute
reported next to the training compute.

Command:  python -m experiments.static_pruning --workdir=runs/static
Quick:    python -m experiments.static_pruning --config=experiments/configs/static_pruning.py:quick
Machine:  2-core CPU; about 10 minutes (quick: under a minute).
Expected: at 70% kept, EL2N/GraNd within about 1 point of dense; at 30% kept, random is as good or
          better than the hardest-first scores on this small, clean dataset (Sorscher et al. 2022).
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "static_pruning"
  c.strategies = ("dense", "random", "el2n", "grand", "forgetting", "aum", "prototypes",
                  "label_quality")
  c.train.epochs = 15
  c.data_pruning.keep_fractions = (0.3, 0.5, 0.7, 0.9)
  c.data_pruning.conventions = ("epochs", "steps")
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 2
    c.dataset.num_train = 400
    c.data_pruning.keep_fractions = (0.5,)
    c.data_pruning.score_epochs = 1
    c.data_pruning.score_seeds = 1
    c.data_pruning.tracker_epochs = 2
    c.data_pruning.label_quality_folds = 2
    c.data_pruning.label_quality_epochs = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
