"""Smoke test of the post-training pruning experiment (experiments/configs/post_training.py:quick):
one seed of a one-block text classifier, magnitude vs Wanda vs SparseGPT at 50% and 2:4 with
random and EL2N-hardest calibration sets; a rerun in the same workdir resumes without work, and a
run in a fresh workdir gives the same results."""

import json
import os
import time

import numpy as np

from experiments import run as run_lib
from experiments.configs import post_training

LAYERS = ["block_0/attn/query/kernel", "block_0/attn/key/kernel", "block_0/attn/value/kernel",
          "block_0/attn/out/kernel", "block_0/mlp_fc/kernel", "block_0/mlp_proj/kernel"]


def test_post_training_quick_runs_saves_calibration_ids_and_resumes(tmp_path):
  config = post_training.get_config("quick")
  workdir = str(tmp_path / "pt")
  rows = run_lib.run(config, workdir)
  dense = [r for r in rows if r["strategy"] == "dense"]
  pruned = [r for r in rows if r["strategy"] == "post_training"]
  assert len(dense) == 1 and len(pruned) == 2 + 2 * 2 * 2  # magnitude, (wanda, sparsegpt) x calib
  assert {r["method"] for r in pruned} == {
      "magnitude", "magnitude 2:4", *(f"{m}{s} ({c} calibration)" for m in ("wanda", "sparsegpt")
                                       for s in ("", " 2:4") for c in ("random", "el2n_hard"))}
  for r in pruned:
    assert r["nominal_sparsity"] == 0.5 and abs(r["sparsity"] - 0.5) < 1e-3, r["method"]
    assert sorted(r["layer_errors"]) == sorted(LAYERS)  # the head and embeddings stay dense
    errors = np.array(list(r["layer_errors"].values()))
    assert np.all(np.isfinite(errors)) and np.all(errors > 0) and np.all(errors < 1)
    assert 0.0 <= r["test_accuracy"] <= 1.0
    # Calibration passes: one per input group (qkv, out, fc, proj) over 32 examples, plus one
    # EL2N pass over the 256 training examples for the EL2N-chosen set.
    want = 0 if r["calibration"] == "none" else 4 * 32 + (256 if "el2n" in r["calibration"] else 0)
    assert r["scoring_compute"] == want, r["method"]
  random_ids = np.load(os.path.join(workdir, "calibration", "random_r0.npz"))["ids"]
  hard_ids = np.load(os.path.join(workdir, "calibration", "el2n_hard_r0.npz"))["ids"]
  assert len(random_ids) == len(hard_ids) == 32 and len(set(random_ids)) == 32
  assert not np.array_equal(random_ids, hard_ids)
  assert len(np.load(os.path.join(workdir, "calibration", "error_ids_r0.npz"))["ids"]) == 32
  assert len(os.listdir(os.path.join(workdir, "masks"))) == len(pruned)
  with open(os.path.join(workdir, "post_training.md")) as f:
    assert len(f.read().strip().splitlines()) == 2 + len(pruned)
  with open(os.path.join(workdir, "results.json")) as f:
    summary = json.load(f)["summary"]
  assert {s["family"] for s in summary if s["strategy"] == "post_training"} == {"post_training"}
  # A rerun in the same workdir reads every unit back: same rows, no training, no pruning.
  t0 = time.perf_counter()
  again = run_lib.run(config, workdir)
  assert time.perf_counter() - t0 < 60
  assert again == rows
  # A fresh workdir gives the same rows (times aside) and the same masks, bit for bit.
  fresh = run_lib.run(config, str(tmp_path / "fresh"))
  timeless = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_time", "pruning_seconds")}
                         for r in rs]
  assert timeless(fresh) == timeless(rows)
  for name in os.listdir(os.path.join(workdir, "masks")):
    with np.load(os.path.join(workdir, "masks", name)) as a, \
         np.load(str(tmp_path / "fresh" / "masks" / name)) as b:
      assert all(np.array_equal(a[k], b[k]) for k in a.files)


def test_post_training_of_a_loaded_gpt2_checkpoint(tmp_path):
  from test_pretrained import write_tiny_gpt2_dir
  ckpt = write_tiny_gpt2_dir(tmp_path / "gpt2")
  config = post_training.get_config("gpt2_quick")
  config.model.checkpoint_dir = str(ckpt)
  config.post_training.methods = ("magnitude", "sparsegpt")
  config.post_training.calibration = ("random",)
  config.post_training.sparsities = (0.5,)
  rows = run_lib.run(config, str(tmp_path / "w"))
  pruned = [r for r in rows if r["strategy"] == "post_training"]
  assert len(pruned) == 2 and all(abs(r["sparsity"] - 0.5) < 1e-3 for r in pruned)
  # GPT-2's fused c_attn was loaded as query, key and value; two blocks, the head left dense.
  names = sorted(pruned[0]["layer_errors"])
  assert len(names) == 12 and names[0] == "block_0/attn/key/kernel"
  magnitude, sparsegpt = sorted(pruned, key=lambda r: r["method"])
  # Reconstruction beats magnitude on the mean layer error over held-out snippets.
  assert sparsegpt["mean_layer_error"] < magnitude["mean_layer_error"]
