"""The experiments' report: grouping by the setting asked for, intervals, paired differences,
wall-time ratios, the headline computed from the rows, the quiet console of the main job."""

import json
import logging
import math
import os
import re

import ml_collections
import numpy as np
import pytest

from experiments import cli, reporting
from prunejax.errors import DataError

T_975 = {2: 4.302652729911275, 4: 2.7764451051977987}  # Student t quantiles (tables), by dof
BASE = 3.0 * 1000 * 20  # example passes of one full-data run in the rows below


def _row(strategy, r, acc, *, wall=1.0, compute=BASE, val=None, **fields):
  row = {"strategy": strategy, "replicate": r, "test_accuracy": acc, "compute": compute,
         "wall_time": wall, "fraction_kept": 1.0, "sparsity": 0.0, **fields}
  if val is not None:
    row["val_accuracy"] = val
  return row


def _by_setting(summary):
  return {(s["strategy"], s["setting"]): s for s in summary}


# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------


def test_estimate_is_mean_sample_std_and_t_interval_by_hand():
  values = [0.90, 0.92, 0.97]
  e = reporting.estimate(values)
  mean = sum(values) / 3
  std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
  half = T_975[2] * std / math.sqrt(3)
  assert (e.mean, e.n) == (pytest.approx(mean, abs=1e-15), 3)
  assert e.std == pytest.approx(std, rel=1e-12)
  assert (e.low, e.high) == (pytest.approx(mean - half, rel=1e-9), pytest.approx(mean + half,
                                                                                 rel=1e-9))
  one = reporting.estimate([0.5])
  assert (one.mean, one.std, one.low, one.high, one.n) == (0.5, 0.0, None, None, 1)
  with pytest.raises(DataError, match=r"values=\[\]"):
    reporting.estimate([])
  with pytest.raises(DataError, match="baseline_compute=0"):
    reporting.summarize([_row("dense", 0, 0.9)], 0)


# ----------------------------------------------------------------------------------------------
# Grouping.
# ----------------------------------------------------------------------------------------------


def test_folds_of_one_setting_form_one_row_whatever_fraction_they_measured():
  """The issue's case: the kept fraction is 0.5 on fold 0 and 0.50052 on folds 1 and 2."""
  measured = [0.5, 0.50052, 0.50052]
  rows = [_row("dense", r, 0.9, val=0.91) for r in range(3)]
  for strategy in ("random", "el2n"):
    rows += [_row(strategy, r, 0.8 + 0.01 * r, val=0.85 - 0.01 * r, fraction_kept=measured[r],
                  nominal_fraction=0.5, convention="epochs", compute=BASE * measured[r])
             for r in range(3)]
  # online rows: a measured back-propagated fraction, nominal -1
  rows += [_row("semi_batch", r, 0.9, val=0.9, fraction_kept=0.8 + 0.01 * r, nominal_fraction=-1.0)
           for r in range(3)]
  # IMP rounds with slightly different measured sparsities; PaI by method and nominal sparsity
  rows += [_row("imp", r, 0.9, val=0.9, round=k, sparsity=[0.0, 0.5, 0.75][k] + 1e-4 * r,
                nominal_fraction=-1.0) for r in range(3) for k in range(3)]
  rows += [_row("pai", r, 0.9, val=0.9, method=m, nominal_sparsity=0.8, sparsity=0.8 + 1e-4 * r)
           for r in range(3) for m in ("snip", "synflow")]
  summary = reporting.summarize(rows, BASE)
  keys = [(s["strategy"], s["setting"]) for s in summary]
  assert keys == [("dense", ""), ("random", "keep 0.5, same epochs"),
                  ("el2n", "keep 0.5, same epochs"), ("semi_batch", ""), ("imp", "round 0"),
                  ("imp", "round 1"), ("imp", "round 2"), ("pai", "snip, sparsity 0.8"),
                  ("pai", "synflow, sparsity 0.8")]
  assert all(s["replicates"] == 3 and s["replicate_ids"] == [0, 1, 2] for s in summary)
  s = _by_setting(summary)[("random", "keep 0.5, same epochs")]
  assert s["fraction_kept"] == pytest.approx(sum(measured) / 3, abs=1e-15)
  assert s["nominal_fraction"] == 0.5 and s["family"] == "static"
  assert s["test_accuracy_mean"] == pytest.approx(0.81, abs=1e-12)
  assert s["val_accuracy_mean"] == pytest.approx(0.84, abs=1e-12)
  assert s["relative_compute"] == pytest.approx(sum(measured) / 3, abs=1e-12)
  assert [x["family"] for x in summary] == ["dense", "static", "static", "online", "imp", "imp",
                                           "imp", "pai", "pai"]


def test_rows_of_another_setting_stay_apart():
  rows = [_row("random", 0, 0.8, nominal_fraction=0.3, fraction_kept=0.3, convention="epochs"),
          _row("random", 0, 0.9, nominal_fraction=0.3, fraction_kept=0.3, convention="steps"),
          _row("random", 0, 0.7, nominal_fraction=0.5, fraction_kept=0.5, convention="epochs")]
  assert len(reporting.summarize(rows, BASE)) == 3


# ----------------------------------------------------------------------------------------------
# Paired differences and wall-time ratios.
# ----------------------------------------------------------------------------------------------


def test_paired_differences_and_wall_ratios_by_hand():
  rng = np.random.default_rng(0)
  dense_acc, dense_val = rng.uniform(0.8, 0.95, 5), rng.uniform(0.8, 0.95, 5)
  dense_wall = rng.uniform(1.0, 2.0, 5)
  acc, val, wall = rng.uniform(0.8, 0.95, 5), rng.uniform(0.8, 0.95, 5), rng.uniform(0.4, 1.0, 5)
  rows = [_row("dense", r, dense_acc[r], val=dense_val[r], wall=dense_wall[r]) for r in range(5)]
  rows += [_row("batch", r, acc[r], val=val[r], wall=wall[r], nominal_fraction=-1.0,
                compute=BASE * 0.83) for r in range(5)]
  dense, batch = reporting.summarize(rows, BASE)
  assert dense["reference"] and dense["paired_val_diff_mean"] is None
  assert dense["relative_wall_time"] == 1.0
  for metric, a, b in (("test", acc, dense_acc), ("val", val, dense_val)):
    diffs = [float(a[r]) - float(b[r]) for r in range(5)]
    mean = sum(diffs) / 5
    std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 4)
    half = T_975[4] * std / math.sqrt(5)
    assert batch[f"paired_{metric}_diff_mean"] == pytest.approx(mean, abs=1e-12)
    assert batch[f"paired_{metric}_diff_low"] == pytest.approx(mean - half, abs=1e-9)
    assert batch[f"paired_{metric}_diff_high"] == pytest.approx(mean + half, abs=1e-9)
  ratios = [float(wall[r]) / float(dense_wall[r]) for r in range(5)]
  assert batch["relative_wall_time"] == pytest.approx(sum(ratios) / 5, rel=1e-12)
  assert batch["relative_compute"] == pytest.approx(0.83)
  # the table shows both ratios, the paired interval and the held-out estimate
  line = [l for l in reporting.table([dense, batch]).splitlines() if l.startswith("| batch")][0]
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[6] == (f"{100 * batch['paired_val_diff_mean']:+.2f} "
                      f"[{100 * batch['paired_val_diff_low']:+.2f}, "
                      f"{100 * batch['paired_val_diff_high']:+.2f}]")
  assert cells[7:9] == ["0.83x", f"{sum(ratios) / 5:.2f}x"]
  assert cells[5].startswith(f"{100 * val.mean():.2f} +- {100 * val.std(ddof=1):.2f} [")


def test_paired_difference_uses_only_replicates_both_ran_and_reference_falls_back_to_imp():
  rows = [_row("imp", r, 0.9 + 0.01 * r, round=0, nominal_fraction=-1.0, wall=2.0)
          for r in range(3)]
  rows += [_row("imp", r, 0.88 + 0.02 * r, round=1, sparsity=0.5, nominal_fraction=-1.0, wall=1.0)
           for r in range(2)]  # replicate 2's round 1 is missing
  ref0, rnd1 = reporting.summarize(rows, BASE)
  assert ref0["reference"] and ref0["reference_name"] == "imp round 0"
  assert rnd1["paired_replicates"] == 2
  assert rnd1["paired_test_diff_mean"] == pytest.approx(((0.88 - 0.90) + (0.90 - 0.91)) / 2)
  assert rnd1["relative_wall_time"] == pytest.approx(0.5)
  assert reporting.summarize([_row("random", 0, 0.8, nominal_fraction=0.5)], BASE)[0][
      "relative_wall_time"] is None  # no dense reference: no ratio


# ----------------------------------------------------------------------------------------------
# The headline.
# ----------------------------------------------------------------------------------------------


def _digits_like_rows(changes=None):
  """Three seeds of dense, random / el2n at keep 0.1 and 0.3, batch, semi_batch and IMP rounds;
  ``changes[(strategy, setting)] = accuracy`` overrides one setting's accuracy on every seed."""
  changes = changes or {}
  rows, dense = [], [0.969, 0.965, 0.974]
  accs = {("random", 0.1): 0.91, ("random", 0.3): 0.947, ("el2n", 0.1): 0.898,
          ("el2n", 0.3): 0.971}
  for r in range(3):
    rows.append(_row("dense", r, dense[r], wall=1.2))
    for (strategy, frac), acc in accs.items():
      acc = changes.get((strategy, frac), acc)
      rows.append(_row(strategy, r, acc + 0.001 * r, wall=1.2 * frac, compute=BASE * frac,
                       fraction_kept=frac, nominal_fraction=frac, convention="epochs",
                       scoring_compute=0.33 * BASE if strategy == "el2n" else 0.0))
    for strategy, comp, wall in (("batch", 0.83, 1.3), ("semi_batch", 0.65, 0.9)):
      rows.append(_row(strategy, r, changes.get((strategy, None), 0.973), wall=wall,
                       compute=BASE * comp, fraction_kept=comp, nominal_fraction=-1.0))
    for k, (sp, acc) in enumerate([(0.0, 0.969), (0.5, 0.968), (0.75, 0.966), (0.875, 0.95)]):
      rows.append(_row("imp", r, changes.get(("imp", k), acc), wall=1.2, round=k, sparsity=sp,
                       nominal_fraction=-1.0))
  return rows


def _headline(rows):
  return reporting.headline(reporting.summarize(rows, BASE))


def _line(lines, start):
  found = [l for l in lines if l.startswith(start)]
  assert len(found) == 1, (start, lines)
  return found[0]


def test_headline_claims_follow_the_rows():
  lines = _headline(_digits_like_rows())
  dense = np.array([0.969, 0.965, 0.974])
  floor = dense.mean() - dense.std(ddof=1)
  assert f">= {100 * floor:.2f}%" in lines[0] and "mean over 3 seeds" in lines[0]
  # static: el2n keep 0.3 matches dense at 0.3 + 0.33 = 0.63x; random keep 0.3 (0.947) does not
  static = _line(lines, "- static subsets:")
  assert "cheapest that matches dense is el2n (keep 0.3, same epochs)" in static
  assert "0.30x train compute (+0.33x scoring = 0.63x end to end) and 0.30x wall time" in static
  below = _line(lines, "- score-based selection")
  assert "fell below random in 1 of 2 settings: el2n (keep 0.1, same epochs) 89.90% vs random " \
         "91.10%" in below
  # online: semi_batch is the cheaper of the two that match
  online = _line(lines, "- online data pruning:")
  assert "semi_batch" in online and "0.65x compute and 0.75x wall time" in online
  # IMP: round 2 (75%) is the sparsest within one std; round 3 (95.0%) is not
  imp = _line(lines, "- IMP:")
  assert "imp (round 2), 75.0% of prunable weights removed" in imp
  assert "3 training runs (rounds 0-2) cost 3.00x compute and 3.00x wall time" in imp


def test_changing_a_row_changes_the_sentence():
  before = _headline(_digits_like_rows())
  # el2n at 30% now falls short of dense: no static subset matches
  after = _headline(_digits_like_rows({("el2n", 0.3): 0.95}))
  static = _line(after, "- static subsets:")
  assert static != _line(before, "- static subsets:")
  assert static.startswith("- static subsets: none of 4 settings matches dense; el2n (keep 0.3")
  assert "fell below random in 1 of 2" in _line(after, "- score-based selection")
  # el2n at 10% now beats random: no score falls below random
  after = _headline(_digits_like_rows({("el2n", 0.1): 0.92}))
  assert _line(after, "- score-based selection") == (
      "- score-based selection was at or above random in all 2 settings compared.")
  # semi_batch drops below dense: batch becomes the cheapest online match
  after = _headline(_digits_like_rows({("semi_batch", None): 0.9}))
  assert "cheapest that matches dense is batch" in _line(after, "- online data pruning:")
  # IMP round 3 recovers: it becomes the sparsest match
  after = _headline(_digits_like_rows({("imp", 3): 0.97}))
  assert "imp (round 3), 87.5% of prunable weights removed" in _line(after, "- IMP:")


def test_headline_with_cross_validation_speaks_of_held_out_folds():
  rows = []
  for r, (d, s) in enumerate([(0.95, 0.96), (0.94, 0.93), (0.96, 0.96)]):
    rows.append(_row("dense", r, 0.9, val=d))
    rows.append(_row("random", r, 0.5, val=s, nominal_fraction=0.5, fraction_kept=0.5,
                     compute=BASE / 2))
  lines = _headline(rows)
  assert lines[0].startswith("Headline (held-out fold accuracy, mean over 3 folds")
  diffs = [0.01, -0.01, 0.0]
  assert "paired vs dense +0.00 [" in _line(lines, "- static subsets:")
  assert reporting.summarize(rows, BASE)[1]["paired_val_diff_mean"] == pytest.approx(
      sum(diffs) / 3, abs=1e-12)
  assert reporting.headline(reporting.summarize([rows[1]], BASE)) == []  # no dense: no headline


# ----------------------------------------------------------------------------------------------
# Logging and the main job's console.
# ----------------------------------------------------------------------------------------------


def _record(name, level, pathname):
  return logging.LogRecord(name, level, pathname, 1, "message", None, None)


def test_third_party_info_is_filtered_and_verbosity_lifts_the_filter():
  f = cli.OwnProgressFilter()
  orbax = "/site-packages/orbax/checkpoint/checkpoint_manager.py"
  assert not f.filter(_record("absl", logging.INFO, orbax))
  assert f.filter(_record("absl", logging.WARNING, orbax))
  assert not f.filter(_record("jax._src.dispatch", logging.INFO, "/site-packages/jax/x.py"))
  assert f.filter(_record("absl", logging.INFO, os.path.abspath(reporting.__file__)))
  assert f.filter(_record("prunejax", logging.INFO, "/anywhere/checkpoint.py"))
  root = logging.getLogger()
  handler = logging.StreamHandler()
  root.addHandler(handler)
  try:
    cli.configure_logging(verbosity_given=False)
    cli.configure_logging(verbosity_given=False)  # idempotent
    assert sum(isinstance(x, cli.OwnProgressFilter) for x in handler.filters) == 1
    cli.configure_logging(verbosity_given=True)
    assert not handler.filters
  finally:
    root.removeHandler(handler)


def test_main_job_console_is_short_and_ends_with_headline_table_and_paths(main_job_cli):
  """The main job's CLI (quick variant: the same strategies and log paths) prints at most 60 lines
  besides the table, no third-party INFO, the headline computed from its results, and absolute
  paths to the report, the plots and the TensorBoard events. (The run is shared with
  test_experiments' main-job test: conftest.main_job_cli.)"""
  proc = main_job_cli
  workdir = proc["workdir"]
  assert proc["returncode"] == 0, proc["stderr"][-3000:]
  lines = (proc["stdout"] + proc["stderr"]).splitlines()
  table = [l for l in lines if l.startswith("|")]
  assert len(lines) - len(table) <= 60, "\n".join(lines)
  assert not [l for l in lines if re.search(r"(orbax|checkpoint_manager|async_checkpointer|"
                                            r"atomicity|tensorflow_datasets|grain)", l)]
  results = json.load(open(os.path.join(workdir, "results.json")))
  config = json.load(open(os.path.join(workdir, "config.json")))["config"]
  config = ml_collections.ConfigDict(config)
  summary = reporting.summarize(results["rows"], results["baseline_compute"],
                                reporting.setting_descriptions(config))
  expected = reporting.headline(summary)
  assert len(expected) >= 5 and results["headline"] == expected
  out = proc["stdout"].splitlines()
  start = out.index(expected[0])
  assert out[start:start + len(expected)] == expected
  assert len(table) == 2 + len(summary)
  tail = out[-8:]
  report = _line(tail, "report:").split()[-1]
  plots = [l.split()[-1] for l in tail if l.startswith("plot:")]
  assert os.path.isabs(report) and os.path.isfile(report)
  assert plots and all(os.path.isabs(p) and os.path.getsize(p) > 1000 for p in plots)
  tb = _line(tail, "TensorBoard: tensorboard --logdir ").split()[-1]
  assert os.path.isabs(tb) and os.listdir(tb)


def test_audit_section_shows_snippets_and_image_grids(tmp_path):
  from prunejax import audit
  texts = {4: "A good film.", 2: "a  GOOD film.", 9: "Bad.", 7: "Fine", 1: "fine", 3: "other"}
  order = [4, 2, 9, 7, 1, 3]
  res = audit.audit(np.array(order), labels_N=np.array([1, 1, 0, 1, 1, 0]),
                    probs_NxC=np.array([[0.2, 0.8]] * 5 + [[0.9, 0.1]]),
                    content=[texts[i] for i in order], kind="text", test_ids=np.array([0, 1]),
                    test_content=["BAD.", "nothing"])
  lines = reporting.audit_section(str(tmp_path), res, kind="text", texts=texts,
                                  test_texts={0: "BAD.", 1: "nothing"}, removed_by=["leakage"])
  md = "\n".join(lines)
  assert "| leakage | yes | 1 |" in md and "(1 ids)" in md
  assert '- id 4 (given 1, predicted 1) (set [2, 4]): "A good film."' in md
  assert '- id 9 (given 0, predicted 1) = test id 0 ("BAD."): "Bad."' in md
  images = np.zeros((6, 4, 4, 1), np.uint8)
  images[1] = images[0] + 1  # ids 2 and 4 differ, the rest are copies of each other.
  res = audit.audit(np.array(order), content=images, kind="image")
  lines = reporting.audit_section(str(tmp_path), res, kind="image",
                                  read_x=lambda ids: images[[order.index(i) for i in ids]])
  assert "![exact_duplicate](audit/exact_duplicate.png)" in lines
  assert (tmp_path / "audit" / "exact_duplicate.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------
# Time to dense accuracy (train.eval_every_epoch).
# ----------------------------------------------------------------------------------------------


def _curve(accs, seconds, steps):
  return [{"epoch": e, "loss": 1.0, "accuracy": 0.5, "test_accuracy": a, "train_seconds": t,
           "steps": s} for e, (a, t, s) in enumerate(zip(accs, seconds, steps))]


def _timed_rows():
  # dense: final accuracies 0.96 and 0.98 (target 0.97); seed 0 never reaches 0.97 itself
  rows = [_row("dense", 0, 0.96, wall=10.0, steps=100,
               history=_curve([0.90, 0.95, 0.96], [3.0, 6.0, 10.0], [33, 66, 100])),
          _row("dense", 1, 0.98, wall=12.0, steps=100,
               history=_curve([0.91, 0.97, 0.98], [4.0, 8.0, 12.0], [33, 66, 100]))]
  # InfoBatch: seed 0 reaches 0.97 at epoch 1 (4.0 s, 40 steps), seed 1 at epoch 2 (7.0 s, 64)
  rows += [_row("semi_batch", 0, 0.975, wall=6.0, steps=64, nominal_fraction=-1.0,
                history=_curve([0.92, 0.97, 0.975], [2.0, 4.0, 6.0], [20, 40, 64])),
           _row("semi_batch", 1, 0.972, wall=7.0, steps=64, nominal_fraction=-1.0,
                history=_curve([0.93, 0.96, 0.972], [2.5, 4.5, 7.0], [21, 42, 64]))]
  # random per epoch: only seed 1 reaches it (epoch 2: 9.0 s, 90 steps)
  rows += [_row("random_dynamic", 0, 0.95, wall=9.0, steps=90, nominal_fraction=0.5,
                history=_curve([0.90, 0.93, 0.95], [3.0, 6.0, 9.0], [30, 60, 90])),
           _row("random_dynamic", 1, 0.97, wall=9.0, steps=90, nominal_fraction=0.5,
                history=_curve([0.90, 0.95, 0.97], [3.0, 6.0, 9.0], [30, 60, 90]))]
  return rows


def test_time_to_dense_accuracy_by_hand():
  summary = reporting.summarize(_timed_rows(), BASE)
  by = {s["strategy"]: s for s in summary}
  dense_wall, dense_steps = 11.0, 100.0
  assert by["dense"]["target_accuracy"] == pytest.approx(0.97)
  assert by["dense"]["reached"] == 1  # seed 1 at epoch 1: 8.0 s, 66 steps
  assert by["dense"]["time_to_reference"] == pytest.approx(8.0 / dense_wall)
  assert by["semi_batch"]["reached"] == 2
  assert by["semi_batch"]["time_to_reference"] == pytest.approx((4.0 + 7.0) / 2 / dense_wall)
  assert by["semi_batch"]["steps_to_reference"] == pytest.approx((40 + 64) / 2 / dense_steps)
  assert by["random_dynamic"]["reached"] == 1
  assert by["random_dynamic"]["time_to_reference"] == pytest.approx(9.0 / dense_wall)
  # the table's last column, and the headline names the setting that reaches it in every seed
  table = reporting.table(summary)
  assert table.splitlines()[0].endswith("to dense acc: wall / steps (reached) |")
  line = [l for l in table.splitlines() if l.startswith("| semi_batch")][0]
  assert line.rstrip(" |").endswith(f"{5.5 / 11:.2f}x / {0.52:.2f}x (2/2)")
  time_line = _line(reporting.headline(summary), "- Time to dense's final test accuracy")
  assert "(97.00%)" in time_line and "semi_batch" in time_line
  assert f"{5.5 / 11:.2f}x the wall time and 0.52x the steps" in time_line
  assert "dense itself 0.73x / 0.66x (1/2)" in time_line


def test_time_to_dense_accuracy_is_absent_without_per_epoch_accuracy_and_row_order_free():
  rows = _timed_rows()
  plain = [{k: v for k, v in r.items() if k != "history"} for r in rows]
  summary = reporting.summarize(plain, BASE)
  assert all(s["reached"] is None for s in summary)
  assert "to dense acc" not in reporting.table(summary)
  assert not [l for l in reporting.headline(summary) if l.startswith("- Time to")]
  # one setting without per-epoch accuracy: no figure for it, the others keep theirs
  rows[-1] = plain[-1]
  by = {s["strategy"]: s for s in reporting.summarize(rows, BASE)}
  assert by["random_dynamic"]["reached"] is None and by["semi_batch"]["reached"] == 2
  # the rows' order does not matter
  shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
  again = {s["strategy"]: s for s in reporting.summarize(shuffled, BASE)}
  for k in by:
    assert again[k]["time_to_reference"] == by[k]["time_to_reference"]
  # nobody but dense reaches it in every seed: the headline says so
  slow = [r for r in _timed_rows() if r["strategy"] != "semi_batch"]
  time_line = _line(reporting.headline(reporting.summarize(slow, BASE)), "- Time to")
  assert "no other setting reaches it in every replicate" in time_line
