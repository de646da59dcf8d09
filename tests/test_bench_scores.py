"""Smoke test of the scores benchmark (experiments/bench/scores.py): ``measure`` returns one row per
model and function, importable by another script (the one-shot accelerator benchmark)."""

from __future__ import annotations

import numpy as np

from experiments.bench import scores as bench_scores


def test_measure_rows():
  rows = bench_scores.measure(("mlp", "plain_resnet"), batch_size=4, repeats=1, quick=True,
                             features_dim=64)
  fns = ["train step", "el2n", "grand", "grand vmap(grad)", "grand jacrev", "gradient_dot",
         "gradient_features d=64"]
  assert [(r["model"], r["fn"]) for r in rows] == [(m, f) for m in ("mlp", "plain_resnet")
                                                     for f in fns]
  for r in rows:
    assert np.isfinite(r["examples_per_s"]) and r["examples_per_s"] > 0, r
    assert r["peak_mb"] > 0 and np.isfinite(r["memory_vs_train"]), r
  for r in rows:
    if r["fn"] == "train step":
      assert r["speed_vs_train"] == 1.0
    if r["fn"] == "grand":  # the fast path agrees with vmap(grad) on this device.
      assert r["max_rel_diff_vs_vmap"] < 1e-4, r
  table = bench_scores.table(rows)
  assert "| plain_resnet | grand |" in table and "plain_resnet: GraNd" in table
