"""Smoke tests of every experiment's :quick config, resumption after a kill, and the command line."""

import csv
import json
import os
import pathlib
import signal
import subprocess
import sys

import numpy as np
import pytest
from conftest import once_per_run

from experiments import common, run
from prunejax.errors import ConfigError

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")


def _config(name, variant="quick", /, **overrides):
  import importlib
  cfg = importlib.import_module(f"experiments.configs.{name}").get_config(variant)
  for k, v in overrides.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return cfg


def _read_csv(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def _check_outputs(workdir, strategies):
  for f in ("report.md", "results.json", "results.csv", "config.json"):
    assert os.path.exists(os.path.join(workdir, f)), f
  rows = _read_csv(os.path.join(workdir, "results.csv"))
  assert {r["strategy"] for r in rows} == set(strategies)
  for r in rows:
    assert 0.0 <= float(r["test_accuracy"]) <= 1.0
    assert float(r["backward_examples"]) <= float(r["forward_examples"])
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  return rows


def _npz_files(workdir):
  out = {}
  for sub in ("scores", "subsets", "masks"):
    d = os.path.join(workdir, sub)
    for f in sorted(os.listdir(d)) if os.path.isdir(d) else []:
      with np.load(os.path.join(d, f)) as z:
        out[f"{sub}/{f}"] = {k: z[k] for k in z.files}
  return out


def _strip(rows):
  return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def run_twice(cfg, tmp_path, first=None):
  """Runs ``cfg`` in two fresh workdirs and checks that scores, kept ids, masks and every result
  (but wall time) are bitwise identical; returns the first workdir.

  ``first``: the workdir of a run of ``cfg`` made elsewhere (a run shared with other tests, perhaps
  in another process); then only the second run is made here, and compared with it."""
  a, b = first or str(tmp_path / "a"), str(tmp_path / "b")
  if first is None:
    run.run(cfg, a)
  run.run(cfg, b)
  ra = json.load(open(os.path.join(a, "results.json")))["rows"]
  rb = json.load(open(os.path.join(b, "results.json")))["rows"]
  assert _strip(ra) == _strip(rb)
  fa, fb = _npz_files(a), _npz_files(b)
  assert fa.keys() == fb.keys()
  for name in fa:
    assert fa[name].keys() == fb[name].keys(), name
    for k in fa[name]:
      np.testing.assert_array_equal(fa[name][k], fb[name][k], err_msg=f"{name}:{k}")
  return a


def shared_quick_run(tmp_path_factory, name):
  """The workdir of one in-process run of ``name``'s quick config, made once per test run and
  shared by the tests that read it (the determinism check and the kill test's clean run)."""
  def make(d):
    run.run(_config(name), str(d / "w"))
    return str(d / "w")
  return once_per_run(tmp_path_factory, f"quick_{name}", make)[1]


def test_main_job_quick_runs_every_strategy_deterministically(tmp_path, main_job_cli):
  """The main job's command line (shared with test_reporting's console test) and a run here, in
  another process, give the same bits."""
  cfg = _config("digits")
  assert main_job_cli["returncode"] == 0, main_job_cli["stderr"][-3000:]
  tmp_path = run_twice(cfg, tmp_path, first=main_job_cli["workdir"])
  rows = _check_outputs(str(tmp_path), cfg.strategies)
  by = {r["strategy"]: r for r in rows}
  dense_fwd = float(by["dense"]["forward_examples"])
  # batch pruning forwards everything, back-propagates keep_fraction of it, and counts the second
  # forward of the selected rows: compute = B + 3k per batch
  bwd = float(by["batch"]["backward_examples"])
  assert bwd == pytest.approx(cfg.batch_pruning.keep_fraction * dense_fwd, rel=0.02)
  assert float(by["batch"]["forward_examples"]) == dense_fwd + bwd
  assert float(by["batch"]["compute"]) == dense_fwd + 3 * bwd
  # semi-batch pruning dropped some well-learned examples in its pruned epoch
  assert float(by["semi_batch"]["backward_examples"]) < dense_fwd
  assert float(by["semi_batch"]["forward_examples"]) == float(by["semi_batch"]["backward_examples"])
  # static subsets keep exactly the fraction asked for
  assert float(by["el2n"]["fraction_kept"]) == pytest.approx(0.5, abs=1e-3)
  imp_rows = [r for r in rows if r["strategy"] == "imp"]
  assert max(float(r["sparsity"]) for r in imp_rows) == pytest.approx(cfg.imp.target_sparsity,
                                                                     abs=1e-3)
  for png in ("accuracy_vs_data_kept.png", "accuracy_vs_weights_remaining.png",
              "score_histograms.png", "per_class_kept.png"):
    assert os.path.getsize(os.path.join(tmp_path, png)) > 1000, png
  # scores are published keyed by id
  from prunejax.scores import load_scores
  ids, scores = load_scores(os.path.join(tmp_path, "scores", "el2n_r0.npz"))
  assert len(ids) == len(np.unique(ids)) and np.all(np.isfinite(scores["el2n"]))


@pytest.mark.parametrize("name", ["static_pruning", "iterative_data_pruning", "dynamic_pruning",
                                  "imp", "prune_at_init", "data_and_weights", "rotten_tomatoes"])
def test_experiment_quick_configs_run_deterministically(name, tmp_path, tmp_path_factory):
  cfg = _config(name)
  workdir = run_twice(cfg, tmp_path, first=shared_quick_run(tmp_path_factory, name))
  rows = _check_outputs(workdir, cfg.strategies)
  assert rows


@pytest.mark.parametrize("name", ["datadiet_cifar10", "openlth_resnet20_cifar10",
                                  "infobatch_cifar10"])
def test_paper_scale_configs_quick_on_mock_data(name, tmp_path):
  import tensorflow_datasets as tfds
  cfg = _config(name)
  with tfds.testing.mock_data(num_examples=64, policy=tfds.testing.MockPolicy.USE_CODE):
    run.run(cfg, str(tmp_path))
  _check_outputs(str(tmp_path), cfg.strategies)


def test_cross_validation_reports_each_setting_once_with_fold_estimates(tmp_path):
  """digits quick with K=3 folds: every setting asked for is one row with n=3 (the static subsets
  keep 0.5 of 958 or 959 examples: the measured fraction differs between folds), its held-out
  mean and t-interval and its paired differences to dense equal those computed by hand from the
  per-fold rows of results.csv, and report.md says which accuracy is which."""
  cfg = _config("digits", cv_folds=3)
  cfg.strategies = ("dense", "random", "el2n", "batch", "imp")
  run.run(cfg, str(tmp_path))
  rows = _read_csv(os.path.join(tmp_path, "results.csv"))
  assert len({r["fraction_kept"] for r in rows if r["strategy"] == "random"}) > 1  # the trap
  results = json.load(open(os.path.join(tmp_path, "results.json")))
  summary = results["summary"]
  by_hand = {}
  for r in rows:  # the setting asked for, from the csv's columns
    key = (r["strategy"], r["nominal_fraction"] if float(r["nominal_fraction"] or -1) >= 0 else "",
           r["round"])
    by_hand.setdefault(key, []).append(r)
  assert len(summary) == len(by_hand) == 1 + 1 + 1 + 1 + 3  # imp: rounds 0, 1, 2
  dense = {r["replicate"]: r for r in by_hand[("dense", "", "")]}
  t_975_2 = 4.302652729911275  # Student t, 2 degrees of freedom
  for s in summary:
    key = (s["strategy"], "" if s["nominal_fraction"] is None else str(s["nominal_fraction"]),
           "" if s["round"] is None else str(s["round"]))
    folds = by_hand[key]
    assert s["replicates"] == 3 and sorted(r["replicate"] for r in folds) == ["0", "1", "2"]
    val = [float(r["val_accuracy"]) for r in folds]
    mean = sum(val) / 3
    half = t_975_2 * (sum((v - mean) ** 2 for v in val) / 2) ** 0.5 / 3 ** 0.5
    assert s["val_accuracy_mean"] == pytest.approx(mean, abs=1e-12)
    assert (s["val_accuracy_low"], s["val_accuracy_high"]) == (
        pytest.approx(mean - half, abs=1e-9), pytest.approx(mean + half, abs=1e-9))
    assert s["test_accuracy_mean"] == pytest.approx(
        sum(float(r["test_accuracy"]) for r in folds) / 3, abs=1e-12)
    assert s["fraction_kept"] == pytest.approx(
        sum(float(r["fraction_kept"]) for r in folds) / 3, abs=1e-12)
    if s["strategy"] == "dense":
      continue
    for metric in ("val", "test"):
      diffs = [float(r[f"{metric}_accuracy"]) - float(dense[r["replicate"]][f"{metric}_accuracy"])
               for r in folds]
      assert s[f"paired_{metric}_diff_mean"] == pytest.approx(sum(diffs) / 3, abs=1e-12)
    ratios = [float(r["wall_time"]) / float(dense[r["replicate"]]["wall_time"]) for r in folds]
    assert s["relative_wall_time"] == pytest.approx(sum(ratios) / 3, rel=1e-9)
  report = open(os.path.join(tmp_path, "report.md")).read()
  assert "3-fold cross-validation of the 1438 training examples, stratified by class" in report
  assert "held-out fold acc % [95% CI]" in report and "test acc %" in report
  assert results["headline"][0].startswith("Headline (held-out fold accuracy, mean over 3 folds")
  el2n = next(s for s in summary if s["strategy"] == "el2n")
  assert (f"{100 * el2n['paired_val_diff_mean']:+.2f} [{100 * el2n['paired_val_diff_low']:+.2f}, "
          f"{100 * el2n['paired_val_diff_high']:+.2f}]") in report


def test_workdir_of_another_config_is_refused(tmp_path):
  cfg = _config("dynamic_pruning")
  cfg.strategies = ("dense",)
  run.run(cfg, str(tmp_path))
  other = _config("dynamic_pruning")
  other.strategies = ("dense",)
  other.train.epochs = cfg.train.epochs + 1
  with pytest.raises(ConfigError, match="holds a run of a different config"):
    run.run(other, str(tmp_path))
  run.run(other, str(tmp_path), overwrite=True)
  stamped = json.load(open(os.path.join(tmp_path, "config.json")))["config"]
  assert stamped["train"]["epochs"] == cfg.train.epochs + 1


def _cli(args, cwd, timeout=600):
  return subprocess.run([sys.executable, "-m", "experiments.run"] + args, cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.mark.parametrize("args,match", [
    (["--config=experiments/configs/nope.py"], "--config"),
    (["--bogus_flag=1"], "bogus_flag"),
    (["--config=experiments/configs/digits.py:quick", "--config.train.nonexistent=3"], "nonexistent"),
    (["--config=experiments/configs/digits.py:quick", "--config.strategies=('magic',)"],
     "strategies='magic' is not allowed"),
    (["--config=experiments/configs/digits.py:quick", "--config.imp.target_sparsity=1.5"],
     "imp.target_sparsity=1.5 is out of range"),
    (["--config=experiments/configs/digits.py:quick", "--config.train.batch_size=0"],
     "train.batch_size=0"),
])
def test_cli_user_errors_are_one_line_exit_2(args, match, tmp_path):
  proc = _cli(args + [f"--workdir={tmp_path}/w"], ROOT)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and match in lines[0], proc.stderr
  assert "Traceback" not in proc.stderr


def test_cli_workdir_that_is_a_file(tmp_path):
  f = tmp_path / "file"
  f.write_text("x")
  proc = _cli(["--config=experiments/configs/digits.py:quick", f"--workdir={f}"], ROOT)
  assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr


def test_killed_run_resumes_to_the_same_results(tmp_path, tmp_path_factory):
  """SIGKILL a run at three known points (mid-way through a training run, right after a unit is
  written, mid-way through a later run); each rerun resumes; results equal a clean run (the imp
  quick run that test_experiment_quick_configs_run_deterministically also reads).

  The kills come from the run itself (``PRUNEJAX_KILL_AT``, :func:`prunejax.checkpoint.kill_point`),
  so where the run dies does not depend on how fast the machine is."""
  from prunejax.checkpoint import KILL_AT_ENV
  args = ["--config=experiments/configs/imp.py:quick"]
  clean = pathlib.Path(shared_quick_run(tmp_path_factory, "imp"))
  killed = tmp_path / "killed"
  resumable = args + [f"--workdir={killed}", "--config.train.checkpoint_every_steps=4"]
  units = lambda: sorted(p.name for p in (killed / "units").glob("*.json"))
  seen = []
  for point in ("step:15", "unit:2", "step:25"):
    proc = subprocess.run([sys.executable, "-m", "experiments.run"] + resumable, cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, KILL_AT_ENV: point})
    assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-3000:])
    assert not (killed / "results.json").exists()
    for p in killed.rglob("*.json"):  # never half-written
      json.loads(p.read_text())
    seen.append(units())
  # Step 15 is inside the first training run: nothing finished, its mid-run checkpoint saved.
  assert seen[0] == [] and any((killed / "checkpoints").rglob("*"))
  # The second process finished exactly two more units; the third died inside a later run.
  assert len(seen[1]) == 2 and set(seen[1]) <= set(seen[2]) and len(seen[2]) < 7
  assert _cli(resumable, ROOT).returncode == 0
  a = json.load(open(clean / "results.json"))["rows"]
  b = json.load(open(killed / "results.json"))["rows"]
  assert _strip(a) == _strip(b)


def test_label_noise_rows_report_the_corrupted_share_and_rho_loss_saves_il_by_id(tmp_path):
  cfg = _config("label_noise")
  workdir = run_twice(cfg, tmp_path)
  rows = _check_outputs(workdir, cfg.strategies)
  with np.load(os.path.join(workdir, "label_noise.npz")) as f:
    flipped = f["flipped_ids"]
    assert len(flipped) == round(0.2 * cfg.dataset.num_train) and np.all(f["true_labels"] !=
                                                                         f["noisy_labels"])
  by = {r["strategy"]: float(r["corrupted_backprop_fraction"]) for r in rows}
  # full training back-propagates every example once per epoch: exactly the noise rate
  assert by["dense"] == pytest.approx(len(flipped) / cfg.dataset.num_train)
  from prunejax.scores import load_scores
  il_ids, il = load_scores(os.path.join(workdir, "scores", "irreducible_loss_r0.npz"))
  assert len(il_ids) == cfg.dataset.num_train and np.all(np.isfinite(il["irreducible_loss"]))


def test_dedup_config_saves_what_the_cleaning_step_removed(tmp_path, monkeypatch):
  from experiments import scoring
  cfg = _config("dedup")
  workdir = run_twice(cfg, tmp_path)
  # Rerunning the same workdir reads the audit's embeddings and K-fold probabilities back.
  with monkeypatch.context() as m:
    m.setattr(scoring, "out_of_fold_probs",
              lambda *a, **k: pytest.fail("audit inputs recomputed"))
    run.run(cfg, workdir)
  _check_outputs(workdir, cfg.strategies)
  summary = json.load(open(os.path.join(workdir, "dedup", "summary.json")))
  assert summary["step"] == "audit" and summary["train_before"] == 256
  # The audit ran every issue type, and cleaning removed exactly the flagged types' ids.
  assert all(summary["audit"][t]["ran"] for t in ("label", "exact_duplicate", "near_duplicate",
                                                  "outlier", "leakage"))
  with np.load(os.path.join(workdir, "dedup", "audit.npz")) as f:
    flagged = np.zeros(len(f["id"]), bool)
    for t in summary["audit_removed_by"]:
      flagged |= f[f"is_{t}_issue"]
    assert sorted(f["id"]) == f["id"].tolist() and len(f["id"]) == 256
    assert summary["train_after"] == 256 - flagged.sum() == 256 - summary["audit_removed"]
  with np.load(os.path.join(workdir, "subsets", "semdedup_keep0.5_r0.npz")) as f:
    assert len(f["ids"]) == int(np.floor(0.5 * summary["train_after"] + 0.5))
  report = open(os.path.join(workdir, "report.md")).read()
  assert "## Data audit" in report and "| outlier | yes |" in report
  assert os.path.exists(os.path.join(workdir, "audit", "outlier.png"))
  # An audit that would remove most of the data (collapsed 1-epoch features: nearly everything is a
  # near duplicate) is refused with the counts and the fix, not run on what is left.
  # With label noise, the report says how many flagged label issues are flipped labels.
  noisy = _config("dedup", **{"dataset.label_noise": 0.3, "strategies": ("dense",)})
  workdir = str(tmp_path / "noisy")
  run.run(noisy, workdir)
  summary = json.load(open(os.path.join(workdir, "dedup", "summary.json")))
  with np.load(os.path.join(workdir, "label_noise.npz")) as f:
    flipped = f["flipped_ids"]
  with np.load(os.path.join(workdir, "dedup", "audit.npz")) as f:
    flagged = f["id"][f["is_label_issue"]]
  assert summary["flipped"] == len(flipped)
  assert summary["label_issues_flipped"] == np.isin(flagged, flipped).sum()
  assert f"are among the {len(flipped)} flipped labels" in open(
      os.path.join(workdir, "report.md")).read()
  with pytest.raises(ConfigError, match="would remove .* near_duplicate .*dedup.audit_remove"):
    run.run(_config("dedup", **{"dedup.audit_remove": ("near_duplicate",),
                                "strategies": ("dense",)}), str(tmp_path / "refused"))


def test_gpt2_fine_tuning_config_on_a_tiny_checkpoint(tmp_path):
  from test_pretrained import write_tiny_gpt2_dir
  ckpt = write_tiny_gpt2_dir(tmp_path / "gpt2")
  cfg = _config("gpt2_rotten_tomatoes")
  with pytest.raises(ConfigError, match="model.checkpoint_dir is not set.*huggingface-cli"):
    run.run(cfg, str(tmp_path / "none"))
  cfg.model.checkpoint_dir = str(ckpt)
  run.run(cfg, str(tmp_path / "w"))
  rows = _check_outputs(str(tmp_path / "w"), cfg.strategies)
  assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
