"""Text classification with a GPT-2-style model (2 layers, width 128, 4 heads, 64 tokens, BPE vocab
8192 trained locally) on Rotten Tomatoes critics' snippets (fresh vs rotten): the same data- and
weight-pruning strategies as on digits, only the config differs.

Command:  python -m experiments.run --config=experiments/configs/rotten_tomatoes.py --workdir=runs/rt
Other data (network needed once): add --config.dataset.name=imdb_reviews (or glue/sst2, ag_news_subset)
          --config.dataset.download=True --config.dataset.data_dir=/path/to/tfds
Quick:    python -m experiments.run --config=experiments/configs/rotten_tomatoes.py:quick
Machine:  2-core CPU; about 25 minutes (quick: under a minute). Majority class: 57.8% of the test split.
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "rotten_tomatoes"
  c.strategies = ("dense", "random", "el2n", "batch", "rho_loss", "semi_batch", "imp")
  c.rho_loss.epochs = 2
  c.replicates = 1
  c.dataset.name = "rotten_tomatoes"
  c.dataset.vocab_size = 8192
  c.dataset.max_len = 64
  c.model.update(dict(name="gpt", depth=2, width=128, num_heads=4))
  c.optimizer.update(dict(name="adamw", lr=5e-4, weight_decay=0.05, schedule="cosine",
                          warmup_epochs=0.2))
  c.train.epochs = 2
  c.train.batch_size = 64
  # With two epochs InfoBatch can only prune the second (the first records the losses), so the
  # full-data annealing of the last 12.5% of epochs is off.
  c.semi_batch.delta = 1.0
  c.data_pruning.keep_fractions = (0.5, 0.7)
  c.data_pruning.score_epochs = 1
  c.data_pruning.score_seeds = 1
  c.imp.prune_per_round = 0.5
  c.imp.target_sparsity = 0.75
  c.imp.prune_head = False
  if variant == "quick":
    c.train.epochs = 1
    c.train.batch_size = 32
    c.dataset.num_train = 256
    c.dataset.num_test = 128
    c.dataset.vocab_size = 512
    c.dataset.max_len = 16
    c.model.width = 32
    c.model.num_heads = 2
    c.data_pruning.keep_fractions = (0.5,)
    c.imp.target_sparsity = 0.5
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
