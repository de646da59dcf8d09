"""Faults: non-finite losses stop the run with where it happened; damaged result files and checkpoints
are detected and the run falls back instead of restarting or crashing."""

import json
import os

import numpy as np
import pytest

from experiments import common, files, run, strategies, trainer
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


# ----------------------------------------------------------------------------------------------
# Fingerprints, damaged outputs, IMP's optimizer state, stopping at a step (issue 13).
# ----------------------------------------------------------------------------------------------


def _unit_mtimes(workdir):
  d = os.path.join(workdir, "units")
  return {f: os.stat(os.path.join(d, f)).st_mtime_ns for f in os.listdir(d)}


def test_units_are_reused_only_by_the_config_data_and_code_that_made_them(tmp_path):
  cfg = _imp_cfg()
  cfg.strategies = ("dense",)
  w = str(tmp_path / "w")
  seed0 = _rows_of(run.run(cfg, w))
  # Adding a strategy to a finished run reuses its finished units.
  more = _imp_cfg()
  more.strategies = ("dense", "random")
  more.data_pruning.keep_fractions = (0.5,)
  before = _unit_mtimes(w)
  rows = _rows_of(run.run(more, w))
  assert rows[0] == seed0[0] and _unit_mtimes(w)["dense_r0.json"] == before["dense_r0.json"]
  # Without the stamp (config.json deleted), another config recomputes every unit: no old row is
  # reused, and the rows equal a fresh run of that config.
  os.remove(os.path.join(w, "config.json"))
  other = _imp_cfg()
  other.strategies = ("dense",)
  other.seed = 5
  mixed = _rows_of(run.run(other, w))
  fresh = _rows_of(run.run(other, str(tmp_path / "fresh")))
  assert mixed == fresh and mixed[0]["history"] != seed0[0]["history"]
  fp = json.load(open(os.path.join(w, "units", "dense_r0.json")))["fingerprint"]
  assert fp == json.load(open(os.path.join(tmp_path, "fresh", "units", "dense_r0.json")))[
      "fingerprint"]


def _rows_of(rows):
  return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def test_damaged_outputs_are_detected_and_recomputed(tmp_path):
  from prunejax import fileio
  cfg = _imp_cfg()
  cfg.strategies = ("random", "el2n", "imp")
  cfg.data_pruning.keep_fractions = (0.5,)
  cfg.data_pruning.score_epochs = 1
  cfg.data_pruning.score_seeds = 1
  cfg.imp.target_sparsity = 0.5
  w = tmp_path / "w"
  clean = _rows_of(run.run(cfg, str(w)))
  files = {p: p.read_bytes() for p in w.rglob("*.npz")}
  (w / "subsets" / "random_keep0.5_r0.npz").write_bytes(b"PK\x03\x04")  # truncated
  (w / "masks" / "imp_round1_r0.npz").unlink()  # deleted
  score = w / "scores" / "el2n_r0.npz"
  score.write_bytes(score.read_bytes()[:-50])  # truncated
  (w / "units" / "el2n_keep0.5_epochs_r0.json").write_text("{}")  # parses, no record
  (w / "config.json").write_text("{not json")
  assert _rows_of(run.run(cfg, str(w))) == clean
  for p, content in files.items():  # every output rewritten, the same arrays as before
    got = fileio.load_npz(str(p))
    p.write_bytes(content)
    assert fileio.content_digest(got[0]) == fileio.content_digest(fileio.load_npz(str(p))[0]), p
  before = _unit_mtimes(str(w))
  assert _rows_of(run.run(cfg, str(w))) == clean
  assert _unit_mtimes(str(w)) == before  # all intact now: nothing recomputed


def test_imp_rounds_keep_the_optimizer_state_of_the_rewind_step(tmp_path):
  def cfg(reset):
    c = _imp_cfg()
    c.imp.target_sparsity = 0.5  # rounds 0 and 1
    c.imp.reset_optimizer = reset
    assert c.imp.rewind_step == 3
    return c

  reset = _rows_of(run.run(cfg(True), str(tmp_path / "reset")))
  w = tmp_path / "kept"
  kept = _rows_of(run.run(cfg(False), str(w)))
  assert reset[0] == kept[0]  # round 0 trains dense either way
  assert reset[1]["history"] != kept[1]["history"]  # momentum of step 3 vs a fresh optimizer
  # The state of the rewind step is part of the round checkpoint: a run that stopped after round 0
  # resumes round 1 from it and gets the same result.
  import shutil
  shutil.rmtree(w / "checkpoints" / "imp_r0" / "1")
  os.remove(w / "units" / "imp_round1_r0.json")
  assert _rows_of(run.run(cfg(False), str(w))) == kept


@pytest.mark.parametrize("fused", [False, True])
def test_a_stop_request_saves_the_run_at_the_next_step_and_resumes_exactly(tmp_path, monkeypatch,
                                                                           fused):
  """The host loop checks after every step; the fused path (here one step per dispatch) after
  every dispatch."""
  import jax
  from experiments import fused_loop
  from prunejax import checkpoint
  cfg = _imp_cfg()
  cfg.strategies = ("dense",)
  cfg.train.epochs = 2  # 8 steps
  cfg.train.fused, cfg.train.steps_per_dispatch = fused, 1
  common.prepare_workdir(str(tmp_path), cfg, False).release()
  ctx = common.setup(cfg, str(tmp_path))
  assert (ctx.device_data() is not None) == fused
  ids = ctx.ds.train.ids
  ref = trainer.train_model(ctx, ids, seed=0)
  calls = []

  def stop_at_step(steps=1):
    calls.append(steps)
    return sum(calls) == 5  # SIGTERM during step 5 (the second epoch's first)

  monkeypatch.setattr(fused_loop if fused else trainer, "stop_at_step", stop_at_step)
  with pytest.raises(checkpoint.Interrupted, match="saved the training run in progress at step 5"):
    trainer.train_model(ctx, ids, seed=0, checkpoint="dense_r0")
  monkeypatch.undo()
  assert os.listdir(os.path.join(tmp_path, "checkpoints", "runs", "dense_r0"))
  resumed = trainer.train_model(ctx, ids, seed=0, checkpoint="dense_r0")
  assert resumed.steps == ref.steps and resumed.history == ref.history
  for a, b in zip(jax.tree.leaves(ref.state.params), jax.tree.leaves(resumed.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Between units: a pending stop request ends the run before the next unit starts.
  checkpoint.request_stop(15)
  try:
    with pytest.raises(checkpoint.Interrupted, match="stopped before unit dense_r0") as e:
      ctx.units.run("dense_r0", lambda: pytest.fail("the unit must not start"))
    assert e.value.exit_code == 143
  finally:
    checkpoint.clear_stop()


def test_a_rerun_after_a_code_change_recomputes_every_unit(tmp_path, monkeypatch):
  cfg = _imp_cfg()
  cfg.strategies = ("dense",)
  w = str(tmp_path / "w")
  rows = _rows_of(run.run(cfg, w))
  before = _unit_mtimes(w)
  monkeypatch.setattr(files, "code_version", lambda: "a-fixed-version")
  assert _rows_of(run.run(cfg, w)) == rows  # same numbers here, but computed again
  after = _unit_mtimes(w)
  assert after["dense_r0.json"] != before["dense_r0.json"]
  record = json.load(open(os.path.join(w, "units", "dense_r0.json")))
  assert json.load(open(os.path.join(w, "config.json")))["code_version"] == "a-fixed-version"
  assert record["fingerprint"] == common.run_fingerprint(cfg, common.load_data(cfg))
