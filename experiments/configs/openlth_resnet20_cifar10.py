"""OpenLTH's lottery-ticket recipe on CIFAR-10 (Frankle et al. 2020, "Linear mode connectivity and the
lottery ticket hypothesis"): ResNet-20, SGD momentum 0.9, lr 0.1, batch 128, 160 epochs, lr x0.1 at
epochs 80 and 120, weight decay 1e-4, prune 20% per level globally, rewind to step 2000 (about epoch 5).

Command:  python -m experiments.imp --config=experiments/configs/openlth_resnet20_cifar10.py \
            --config.dataset.data_dir=$TFDS_DIR --config.dataset.download=True --workdir=runs/openlth
Expected: about 91.7% dense; winning tickets with rewinding hold that accuracy to about 80-90% sparsity
          and the random-reinit control falls off beyond ~50% (Frankle et al. 2020, Fig. 3).
Time:     XLA's cost analysis of the compiled train step (ResNet-20, batch 128) gives 29.6 GFLOPs per
          step; 160 epochs are 62.5k steps = 1.85e15 FLOPs per level, about 1.5 minutes per level on one
          H100 at a sustained 20 TFLOP/s (narrow convolutions), input pipeline permitting: about 25
          minutes for the dense run and 14 levels, and as much again for the random-reinit control.
Quick:    :quick runs the same code on tfds.testing.mock_data (the tests do this).
"""

from experiments.configs import base
from experiments.configs.datadiet_cifar10 import _quick


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "openlth_resnet20_cifar10"
  c.strategies = ("imp", "imp_random_reinit")
  c.replicates = 1
  c.dataset.name = "cifar10"
  c.dataset.augment = True
  c.model.update(dict(name="resnet20", width_multiplier=1.0))
  c.optimizer.update(dict(name="sgd", lr=0.1, momentum=0.9, nesterov=False, weight_decay=1e-4,
                          schedule="step", step_epochs=(80, 120), step_factor=0.1))
  c.train.epochs = 160
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.imp.prune_per_round = 0.2
  c.imp.target_sparsity = 0.956  # 14 levels of 20%: 1 - 0.8 ** 14
  c.imp.scope = "global"
  c.imp.rewind_step = 2000
  c.imp.prune_head = True
  if variant == "quick":
    _quick(c)
    c.model.width_multiplier = 0.25
    c.imp.prune_per_round = 0.5
    c.imp.target_sparsity = 0.5
    c.imp.rewind_step = 1
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c
