"""Faults: non-finite losses stop the run with where it happened; damaged result files and checkpoints
are detected and the run falls back instead of restarting or crashing."""

import json
import os

import numpy as np
import pytest

from experiments import common, run, strategies, trainer
from experiments.configs import imp as imp_config
from prunejax.train import NumericalError


def _imp_cfg():
  cfg = imp_config.get_config("quick")
  cfg.dataset.num_train = 128
  cfg.train.epochs = 1
  cfg.strategies = ("imp",)
  return cfg


def test_nan_in_the_data_stops_with_epoch_step_and_example_ids(tmp_path):
  from prunejax import data
  x = np.random.default_rng(0).random((96, 8, 8, 1)).astype(np.float32)
  x[7] = np.nan  # a user's float dataset with one bad example (id 1007)
  y = np.arange(96) % 10
  data.register_dataset("with_a_nan", lambda **_: data.Dataset(
      "with_a_nan", data.ArraySource(x[:64], y[:64], np.arange(1000, 1064)),
      data.ArraySource(x[64:], y[64:], np.arange(2000, 2032)), 10, "image", {"scale": 1.0}))
  cfg = _imp_cfg()
  cfg.strategies = ("dense",)
  cfg.dataset.name = "with_a_nan"
  cfg.dataset.num_train = None
  common.prepare_workdir(str(tmp_path), cfg, False)
  ctx = common.setup(cfg, str(tmp_path))
  with pytest.raises(NumericalError, match=r"epoch 0, step \d+.*examples of that batch: \[.*") as e:
    strategies.dense(ctx)
  assert "1007" in str(e.value)
  assert not os.listdir(os.path.join(tmp_path, "units"))  # nothing half-done was recorded


def _rows(workdir):
  rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
  return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def test_damaged_round_checkpoint_falls_back_to_the_previous_round(tmp_path):
  cfg = _imp_cfg()
  clean = str(tmp_path / "clean")
  run.run(cfg, clean)
  ckpt_dir = os.path.join(clean, "checkpoints", "imp_r0")
  rounds = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert rounds == [0, 1, 2]
  # Truncate every file of the last round: orbax cannot read it back.
  last = os.path.join(ckpt_dir, str(rounds[-1]))
  damaged = 0
  for root, _, files in os.walk(last):
    for f in files:
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(os.path.getsize(os.path.join(root, f)) // 3, 1))
        damaged += 1
  assert damaged
  # Also damage a unit file of a round whose checkpoint survives: that round is redone.
  unit = os.path.join(clean, "units", "imp_round1_r0.json")
  with open(unit, "r+") as fh:
    fh.truncate(10)
  expected = _rows(clean)
  run.run(cfg, clean)  # resumes from round 1, redoes round 2
  assert _rows(clean) == expected
  assert any(".corrupt" in d for d in os.listdir(ckpt_dir))
  assert os.path.exists(unit + ".corrupt")
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [0, 1, 2]


def test_config_validation_names_field_value_and_allowed(tmp_path):
  from prunejax.errors import ConfigError
  cases = [
      ({"data_pruning.keep_fractions": (0.001,), "dataset.num_train": 100},
       r"data_pruning.keep_fractions=0.001 keeps no example of 100"),
      ({"cv_folds": 1}, r"cv_folds=1 is not allowed"),
      ({"imp.max_rounds": 1, "imp.target_sparsity": 0.9}, r"imp.max_rounds=1 cannot reach"),
      ({"pai.methods": ("snap",)}, r"pai.methods='snap' is not allowed; choose one of"),
      ({"semi_batch.prune_ratio": 1.0}, r"semi_batch.prune_ratio=1.0 is out of range"),
      ({"dataset.name": "imagenet"}, r"dataset.name='imagenet' is not allowed"),
      ({"model.name": "vgg"}, r"model.name='vgg' is not allowed"),
  ]
  for overrides, match in cases:
    cfg = _imp_cfg()
    for k, v in overrides.items():
      node = cfg
      *parents, leaf = k.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = v
    with pytest.raises(ConfigError, match=match) as e:
      run.run(cfg, str(tmp_path / "w"), overwrite=True)
    assert "\n" not in str(e.value)


def test_labels_outside_the_class_range_and_mismatched_masks(tmp_path, monkeypatch):
  from prunejax import data, masks
  from prunejax.errors import ConfigError
  cfg = _imp_cfg()
  real = data.load_digits

  def bad_digits(**_):
    ds = real()
    ds.train.y[3] = 12
    return ds

  monkeypatch.setitem(data.EMBEDDED, "digits", bad_digits)
  monkeypatch.setattr(data.datasets, "load_digits", bad_digits)
  with pytest.raises(ConfigError, match=r"labels outside \[0, 10\): \[12\]"):
    common.setup(cfg, str(tmp_path))
  monkeypatch.undo()
  ctx = common.setup(cfg, str(tmp_path))
  params = strategies._init_params(ctx, 0)
  wrong = masks.ones_mask({"only": params["head"]})
  with pytest.raises(ConfigError, match="mask structure"):
    trainer.train_model(ctx, ctx.ds.train.ids[:32], seed=0, mask=wrong)
