"""Data Diet on CIFAR-10 (Paul et al. 2021): ResNet-18, 200 epochs, batch 128, SGD with Nesterov
momentum 0.9, lr 0.1, weight decay 5e-4, lr x0.2 at epochs 60/120/160, random crop + flip; EL2N (and
GraNd) at epoch 20 averaged over 10 runs; keep the hardest 50%..90% and retrain.

Command:  python -m experiments.static_pruning --config=experiments/configs/datadiet_cifar10.py \
            --config.dataset.data_dir=$TFDS_DIR --config.dataset.download=True --workdir=runs/datadiet
Expected: EL2N at 50% pruned (keep 0.5) matches full-data accuracy (about 95%); random at 50% loses
          about 1 point (Paul et al. 2021, Fig. 1).
Time:     XLA's cost analysis of the compiled train step (ResNet-18, batch 128, 32x32x3) gives 373
          GFLOPs per step; 200 epochs are 78.2k steps = 2.9e16 FLOPs per run, about 10 minutes on one
          H100 at a sustained 50 TFLOP/s (TF32 convolutions; small CIFAR feature maps rarely do better),
          if the input pipeline keeps up. Scoring adds 10 runs x 20 epochs (about one full run); the
          sweep is 5 keep fractions.
Quick:    :quick runs the same code on 64 examples of tfds.testing.mock_data (the tests do this).
"""

from experiments.configs import base


def get_config(variant: str = ""):
  c = base.get_config()
  c.name = "datadiet_cifar10"
  c.strategies = ("dense", "random", "el2n", "grand")
  c.replicates = 1
  c.dataset.name = "cifar10"
  c.dataset.augment = True
  c.model.update(dict(name="resnet18", width_multiplier=1.0))
  c.optimizer.update(dict(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4,
                          schedule="step", step_epochs=(60, 120, 160), step_factor=0.2))
  c.train.epochs = 200
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.data_pruning.keep_fractions = (0.9, 0.7, 0.5, 0.3, 0.1)
  c.data_pruning.conventions = ("epochs",)
  c.data_pruning.score_epochs = 20
  c.data_pruning.score_seeds = 10
  if variant == "quick":
    _quick(c)
    c.model.width_multiplier = 0.0625
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; expected '' or 'quick'")
  return c


def _quick(c):
  c.dataset.num_train = 64
  c.dataset.num_test = 32
  c.train.epochs = 1
  c.train.batch_size = 16
  c.train.eval_batch_size = 32
  c.optimizer.step_epochs = ()
  c.data_pruning.keep_fractions = (0.5,)
  c.data_pruning.score_epochs = 1
  c.data_pruning.score_seeds = 1
