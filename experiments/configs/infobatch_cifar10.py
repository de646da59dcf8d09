"""InfoBatch on CIFAR-10 (Qin et al. 2024): ResNet-18, prune ratio r = 0.5 of the well-learned
examples each epoch with loss rescaling, full data for the last 12.5% of epochs (delta = 0.875);
SGD momentum 0.9, lr 0.1 with cosine decay (OneCycle in the paper), weight decay 5e-4, 200 epochs, batch
128.

Command:  python -m experiments.dynamic_pruning --config=experiments/configs/infobatch_cifar10.py \
            --config.dataset.data_dir=$TFDS_DIR --config.dataset.download=True --workdir=runs/infobatch
Expected: full-data accuracy (about 95.6%) with about 40% fewer examples back-propagated (Qin et al.
          2024, Table 1: 95.6 vs 95.6, 41.3% saved).
Time:     the dense run as in datadiet_cifar10.py (373 GFLOPs per step by XLA's cost analysis, 2.9e16
          FLOPs in 200 epochs, about 10 minutes on one H100 at 50 TFLOP/s), and InfoBatch about 0.6 of it.
Quick:    :quick runs the same code on tfds.testing.mock_data (the tests do this).
"""

from experiments.configs import base
from experiments.configs.datadiet_cifar10 import _quick


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "infobatch_cifar10"
  c.strategies = ("dense", "semi_batch")
  c.replicates = 1
  c.dataset.name = "cifar10"
  c.dataset.augment = True
  c.model.update(dict(name="resnet18", width_multiplier=1.0))
  c.optimizer.update(dict(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          schedule="cosine"))
  c.train.epochs = 200
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.semi_batch.prune_ratio = 0.5
  c.semi_batch.delta = 0.875
  if variant == "quick":
    _quick(c)
    c.model.width_multiplier = 0.0625
    c.train.epochs = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
