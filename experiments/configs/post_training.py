"""Post-training pruning of the Rotten Tomatoes classifier: magnitude vs Wanda vs SparseGPT at 50%,
60%, 70% and 2:4, without retraining, and which 128 examples to calibrate on (random, or the
hardest or easiest by EL2N): data pruning of the calibration set.

The GPT-style classifier and recipe of ``rotten_tomatoes.py`` (2 layers, width 128, 4 heads, 64
tokens, AdamW, 2 epochs) is trained once per seed; its dense and attention layers (not the
embeddings, not the head) are then pruned per layer (Wanda per output row, as its paper). Each
row holds the test accuracy, the calibration ids (``calibration/*.npz``) and every layer's relative
reconstruction error on 256 test snippets; ``post_training.md`` tabulates them over the seeds.

Command:  python -m experiments.run --config=experiments/configs/post_training.py --workdir=runs/pt
Quick:    python -m experiments.run --config=experiments/configs/post_training.py:quick
          (gpt2_quick: the same on a pretrained checkpoint, for tests on a tiny random one)
Pretrained GPT-2 (fine-tuned first, as gpt2_rotten_tomatoes.py; one GPU):
          python -m experiments.run --config=experiments/configs/post_training.py:gpt2 \\
            --config.model.checkpoint_dir=~/gpt2 --workdir=runs/pt_gpt2
Machine:  2-core CPU; 32 minutes for the 3 seeds under load (quick: about a minute).
Expected: (measured, 3 seeds) dense 74.8%; at 50% magnitude -0.83, Wanda -0.73, SparseGPT -0.56
          points (within the seed spread); at 70% -3.1 / -4.4 / -1.7 and 2:4 -2.6 / -2.5 / -0.2;
          EL2N-easiest calibration snippets the worst set, hardest about as good as random.
"""

from experiments.configs import base, gpt2_rotten_tomatoes, rotten_tomatoes


def get_config(variant: str = ""):
  gpt2 = variant.startswith("gpt2")
  quick = variant in ("quick", "gpt2_quick")
  if variant not in ("", "quick", "gpt2", "gpt2_quick"):
    raise ValueError(f"unknown variant {variant!r}; expected '', 'quick', 'gpt2' or 'gpt2_quick'")
  if gpt2:  # gpt2_quick: the tests run it on a tiny random checkpoint they write
    c = gpt2_rotten_tomatoes.get_config("quick" if quick else "")
  else:
    c = rotten_tomatoes.get_config("quick" if quick else "")
  c.name = "post_training" + ("_gpt2" if gpt2 else "")
  c.strategies = ("post_training",)
  c.replicates = 3
  c.post_training = base.get_config().post_training
  if quick:
    c.replicates = 1
    c.post_training.sparsities = (0.5, "2:4")
    c.post_training.calibration = ("random", "el2n_hard")
    c.post_training.calibration_size = 32
    c.post_training.error_size = 32
    c.post_training.batch_size = 16
    c.post_training.blocksize = 16
  if variant == "quick":  # rotten_tomatoes.py's quick sizes, one block
    c.model.depth = 1
  return c
