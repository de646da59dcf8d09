"""Smoke test of the LESS experiment (experiments/configs/less_rotten_tomatoes.py:quick): one seed,
one keep fraction; LESS and its targeted variant against dense, random and EL2N on the same pool,
with the validation split held out of it and the negation slice's test accuracy in every row."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from experiments import common, run, similarity
from experiments.configs import fields
from prunejax import scores
from prunejax.errors import ConfigError
from test_experiments import _check_outputs, _config


def test_less_rotten_tomatoes_quick(tmp_path):
  cfg = _config("less_rotten_tomatoes")
  cfg.train.progress = False
  workdir = str(tmp_path / "w")
  rows = run.run(cfg, workdir)
  _check_outputs(workdir, cfg.strategies)
  by = {r["strategy"]: r for r in rows}
  for r in rows:
    assert 0.0 <= r["slice_test_accuracy"] <= 1.0 and "val_accuracy" in r
  for name in ("less", "less_targeted"):
    assert by[name]["scoring_compute"] > 0 and by[name]["fraction_kept"] == pytest.approx(0.3, 0.05)
    ids, got = scores.load_scores(os.path.join(workdir, "scores", f"{name}_r0.npz"))
    assert np.all(np.isfinite(got[name])) and np.all(np.abs(got[name]) <= 1.0 + 1e-5)
  ctx = common.setup(cfg, str(tmp_path / "ctx"))
  pool, held, _ = ctx.replicate_split(0)
  assert len(np.intersect1d(pool, held)) == 0 and len(held) == round(0.25 * len(ctx.ds.train))
  kept = np.load(os.path.join(workdir, "subsets", "less_keep0.3_r0.npz"))["ids"]
  assert np.all(np.isin(kept, pool))  # the validation split is never trained on
  # The slice: every matched snippet has a negation word, no other snippet has one.
  texts = similarity._rotten_tomatoes_texts()
  neg = similarity.slice_ids(ctx, held, similarity.NEGATION_WORDS)
  assert 0 < len(neg) < len(held)

  def negated(text):
    words = re.findall(r"[a-z']+", text.lower().replace("\u2019", "'"))
    return any(w in similarity.NEGATION_WORDS or w.endswith("n't") for w in words)

  np.testing.assert_array_equal(neg, [i for i in held if negated(texts[i])])
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)


def test_less_config_errors_name_the_field():
  cfg = _config("less_rotten_tomatoes", validation_fraction=0.0)
  with pytest.raises(ConfigError, match="validation_fraction"):
    fields.validate(cfg)
  with pytest.raises(ConfigError, match="less.reduce"):
    fields.validate(_config("less_rotten_tomatoes", **{"less.reduce": "sum"}))
  with pytest.raises(ConfigError, match="less.slice_words"):
    fields.validate(_config("less_rotten_tomatoes", **{"less.slice_words": ()}))
