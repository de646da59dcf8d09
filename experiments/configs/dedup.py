"""Deduplication as data pruning: SemDeDup (Abbas et al. 2023) against random and EL2N at the same
kept fractions, after cleaning by one data audit (dedup.first="audit": label issues, exact
duplicates and train/test leakage removed; near duplicates and outliers reported).

Command:  python -m experiments.run --config=experiments/configs/dedup.py:mnist5k
          python -m experiments.run --config=experiments/configs/dedup.py:rotten_tomatoes
Quick:    --config=experiments/configs/dedup.py:quick (the tests run it).
Machine:  2-core CPU; mnist5k about 15 minutes, rotten_tomatoes about 60 minutes.
Expected: report.md's data-audit section and workdir/dedup/summary.json say what the audit
          found and the cleaning step removed (Rotten Tomatoes: 28 groups of identical token
          sequences in the training split, 26 training snippets identical to test snippets, plus
          near-duplicates and label issues); the table compares SemDeDup, random and EL2N at keep
          fractions 0.5, 0.7, 0.9. Measured figures, and where deduplication does not help,
          in BUILD_NOTES.md.
"""

from experiments.configs import mnist5k_cnn, rotten_tomatoes


def get_config(variant: str = "mnist5k"):
  if variant in ("mnist5k", "quick"):
    c = mnist5k_cnn.get_config()
  elif variant == "rotten_tomatoes":
    c = rotten_tomatoes.get_config()
  else:
    raise ValueError(f"unknown variant {variant!r}; expected 'mnist5k', 'rotten_tomatoes' or 'quick'")
  c.name = f"dedup_{variant}"
  c.strategies = ("dense", "random", "el2n", "semdedup")
  c.replicates = 2
  c.dedup.first = "audit"
  # Clean label issues, exact duplicates and leakage; report near duplicates and outliers without
  # removing them: SemDeDup is the strategy under test (its eps is set per kept fraction), and at
  # the default eps 0.05 the 2-epoch CNN features of mnist5k make 3,296 of 4,000 images "near
  # duplicates" (median cosine distance 0.019; the cleaning step refuses to remove that much).
  c.dedup.audit_remove = ("label", "exact_duplicate", "leakage")
  c.data_pruning.keep_fractions = (0.5, 0.7, 0.9)
  c.data_pruning.score_epochs = 2
  c.data_pruning.score_seeds = 1
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 1
    c.dataset.num_train = 256
    c.dataset.num_test = 128
    c.data_pruning.keep_fractions = (0.5,)
    c.data_pruning.score_epochs = 1
    c.data_pruning.label_quality_folds = 2
    c.data_pruning.label_quality_epochs = 1
    c.dedup.num_clusters = 8
    c.model.update(dict(features=(8, 16), dense=32))  # the same code paths, a quarter the width
  return c


