"""Results of an experiment as files a reader can use: results.json/csv, report.md, plots,
TensorBoard, and the headline and table the main job prints.

Rows (one per training run, written by ``experiments/strategies/``) are grouped by the setting
that was asked for (:func:`setting_key`: strategy, nominal keep fraction or sparsity, convention,
method, round), never by a measured float; the measured fraction kept and sparsity are averaged
beside it.
Every group reports test-split accuracy, and with ``cv_folds=K`` the held-out fold accuracy (the
cross-validated estimate) with a t-interval, a paired difference to dense over the replicates both
ran (per seed or per fold), train and scoring compute relative to one full-data run, and wall time
relative to the dense run of the same replicate. :func:`headline` turns the groups into a few
sentences. Only process 0 writes; every file is written atomically.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections import defaultdict

import jax

from experiments.audit_report import audit_section  # noqa: F401 - re-exported: it lived here
from experiments.figures import plots, write_tensorboard
from experiments.summary import (  # noqa: F401 - re-exported: they lived here
    CONFIDENCE, FAMILIES, Estimate, _is_cv, _setting, estimate, family, reference_rows,
    setting_descriptions, setting_key, summarize)
from prunejax.fileio import atomic_write_json, atomic_write_text

# ----------------------------------------------------------------------------------------------
# Table and headline.
# ----------------------------------------------------------------------------------------------


def _pct(mean: float | None, std: float | None = None) -> str:
  """A percentage, with its std when given (None for a single replicate: no spread to show)."""
  if mean is None:
    return ""
  return f"{100 * mean:.2f}" + ("" if std is None else f" +- {100 * std:.2f}")


def _std(s: dict, metric: str) -> float | None:
  return s[f"{metric}_accuracy_std"] if s["replicates"] > 1 else None


def _interval(low: float | None, high: float | None) -> str:
  return "" if low is None else f"[{100 * low:.2f}, {100 * high:.2f}]"


def _diff(s: dict, metric: str) -> str:
  """The paired difference to dense in points, with its interval."""
  m = s[f"paired_{metric}_diff_mean"]
  if m is None:
    return ""
  low, high = s[f"paired_{metric}_diff_low"], s[f"paired_{metric}_diff_high"]
  return f"{100 * m:+.2f}" + ("" if low is None else f" [{100 * low:+.2f}, {100 * high:+.2f}]")


def _ratio(x: float | None) -> str:
  return "" if x is None else f"{x:.2f}x"


def table(summary: list[dict]) -> str:
  """A fixed-width text table (also valid Markdown), one line per setting.

  Columns: strategy, setting, measured fraction kept, measured sparsity, test accuracy (mean +- std,
  %), with CV the held-out fold accuracy (mean +- std [t-interval]), the paired difference to dense
  in points (held-out fold accuracy with CV, test accuracy otherwise), train compute, wall time
  relative to dense, scoring compute, mean wall seconds, n.
  """
  cv = _is_cv(summary)
  metric = "val" if cv else "test"
  head = ["strategy", "setting", "kept", "sparsity", "test acc %"]
  if cv:
    head += ["held-out fold acc % [95% CI]"]
  head += [f"vs dense, {'held-out' if cv else 'test'} (paired)", "train compute", "wall time",
           "scoring compute", "wall s", "n"]
  timed = any(s.get("reached") is not None for s in summary)
  if timed:  # per-epoch test accuracy was recorded (train.eval_every_epoch)
    head += ["to dense acc: wall / steps (reached)"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    cells = [s["strategy"], s["setting"], f"{s['fraction_kept']:.2f}", f"{s['sparsity']:.3f}",
             _pct(s["test_accuracy_mean"], _std(s, "test"))]
    if cv:
      cells.append(f"{_pct(s['val_accuracy_mean'], _std(s, 'val'))} "
                   f"{_interval(s['val_accuracy_low'], s['val_accuracy_high'])}".strip())
    cells += [_diff(s, metric), _ratio(s["relative_compute"]), _ratio(s["relative_wall_time"]),
              _ratio(s["relative_scoring_compute"]), f"{s['wall_time']:.1f}", str(s["replicates"])]
    if timed:
      cells.append(_time_to(s))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _time_to(s: dict) -> str:
  """``"0.52x / 0.55x (2/2)"``: training wall time and steps to dense's final mean test accuracy
  over dense's whole run, and the replicates that reach it."""
  if s.get("reached") is None:
    return ""
  if not s["reached"]:
    return f"never (0/{s['replicates']})"
  return (f"{_ratio(s['time_to_reference'])} / {_ratio(s['steps_to_reference'])} "
          f"({s['reached']}/{s['replicates']})")


def _time_line(summary: list[dict], ref: dict) -> list[str]:
  """The headline's time to accuracy: the setting that reaches dense's final mean test accuracy
  soonest in every replicate (training wall time, per-epoch evaluation outside the clock)."""
  if ref.get("reached") is None:
    return []
  every = [s for s in summary if not s["reference"] and s.get("reached") == s["replicates"]
           and s["time_to_reference"] is not None]
  head = (f"- Time to dense's final test accuracy ({100 * ref['target_accuracy']:.2f}%), "
          f"as a share of dense's run: ")
  if not every:
    return [head + "no other setting reaches it in every replicate."]
  best = min(every, key=lambda s: s["time_to_reference"])
  return [head + f"{_name(best)} reaches it at {best['time_to_reference']:.2f}x the wall time "
          f"and {best['steps_to_reference']:.2f}x the steps (every replicate); dense itself "
          f"{_time_to(ref)}."]


def _name(s: dict) -> str:
  return s["strategy"] + (f" ({s['setting']})" if s["setting"] else "")


def _acc(s: dict, metric: str) -> str:
  text = f"{_pct(s[f'{metric}_accuracy_mean'], _std(s, metric))}%"
  diff = _diff(s, metric)
  return text + (f", paired vs dense {diff} points" if diff else "")


def _saving(s: dict) -> str:
  wall = s["relative_wall_time"]
  wall_text = f" and {wall:.2f}x wall time" if wall is not None else ""
  if s["relative_scoring_compute"] > 0:
    total = s["relative_compute"] + s["relative_scoring_compute"]
    return (f"{s['relative_compute']:.2f}x train compute (+{s['relative_scoring_compute']:.2f}x "
            f"scoring = {total:.2f}x end to end){wall_text}")
  return f"{s['relative_compute']:.2f}x compute{wall_text}"


def _cost(s: dict) -> float:
  return s["relative_compute"] + s["relative_scoring_compute"]


def headline(summary: list[dict]) -> list[str]:
  """A few sentences computed from the summary: per family, the best setting that stays within
  one standard deviation of dense and what it saved, and where score-based selection fell below
  random.

  "Matches dense" means a mean accuracy of at least dense's mean minus dense's standard deviation
  over replicates (held-out fold accuracy with CV, test accuracy otherwise). The best data-pruning
  setting is the one that matches dense at the least compute (training plus scoring); the best
  weight-pruning setting is the sparsest that matches dense. Every number comes from ``summary``.

  Returns:
    Lines of text, the first a title; empty when there is no dense reference.
  """
  ref = [s for s in summary if s["reference"]]
  if not ref:
    return []
  ref = ref[0]
  cv = _is_cv(summary)
  metric = "val" if cv else "test"
  label = "held-out fold accuracy" if cv else "test accuracy"
  over = "folds" if cv else "seeds"
  floor = ref[f"{metric}_accuracy_mean"] - ref[f"{metric}_accuracy_std"]
  matches = lambda s: s[f"{metric}_accuracy_mean"] >= floor - 1e-12
  n = ref["replicates"]
  within = (f"within one std of {ref['reference_name']}" if n > 1 else
            f"at least {ref['reference_name']}'s accuracy, one {over[:-1]} giving no std")
  lines = [f"Headline ({label}, mean over {n} {over if n > 1 else over[:-1]}; \"matches dense\" = "
           f"{within}, >= {100 * floor:.2f}%):",
           f"- {ref['reference_name']}: {_acc(ref, metric)}, {ref['wall_time']:.1f} s of training "
           "per run."]
  by_family = defaultdict(list)
  for s in summary:
    if not s["reference"]:
      by_family[s["family"]].append(s)
  return (lines + _data_lines(by_family, matches, metric)
          + _weight_lines(by_family, matches, metric, summary) + _time_line(summary, ref))


def _data_lines(by_family, matches, metric: str) -> list[str]:
  """Headline lines of the data-pruning families: the cheapest setting that matches dense."""
  lines = []
  for fam in ("static", "iterative", "online"):
    cands = by_family.get(fam)
    if not cands:
      continue
    ok = sorted((s for s in cands if matches(s)),
                key=lambda s: (_cost(s), -s[f"{metric}_accuracy_mean"]))
    if ok:
      lines.append(f"- {FAMILIES[fam]}: cheapest that matches dense is {_name(ok[0])}, "
                   f"{_acc(ok[0], metric)}, at {_saving(ok[0])}.")
    else:
      best = max(cands, key=lambda s: s[f"{metric}_accuracy_mean"])
      lines.append(f"- {FAMILIES[fam]}: {_no_match(cands, best)}: {_acc(best, metric)}, at "
                   f"{_saving(best)}.")
    if fam == "static":
      lines += _below_random(cands, metric)
  return lines


def _weight_lines(by_family, matches, metric: str, summary: list[dict]) -> list[str]:
  """Headline lines of the weight-pruning families: the sparsest setting that matches dense."""
  lines = []
  for fam in ("imp", "pai", "post_training"):
    cands = [s for s in by_family.get(fam, []) if s["sparsity"] > 0]
    if not cands:
      continue
    ok = sorted((s for s in cands if matches(s)),
                key=lambda s: (-s["sparsity"], -s[f"{metric}_accuracy_mean"]))
    if ok:
      lines.append(f"- {FAMILIES[fam]}: sparsest that matches dense is {_name(ok[0])}, "
                   f"{100 * ok[0]['sparsity']:.1f}% of prunable weights removed, "
                   f"{_acc(ok[0], metric)}{_rounds_cost(ok[0], summary)}.")
    else:
      least = min(cands, key=lambda s: s["sparsity"])
      lines.append(f"- {FAMILIES[fam]}: {_no_match(cands, least)}: at the lowest sparsity, "
                   f"{100 * least['sparsity']:.1f}%, {_acc(least, metric)}.")
  return lines



def _no_match(cands: list[dict], shown: dict) -> str:
  if len(cands) == 1:
    return f"{_name(shown)} does not match dense"
  return f"none of {len(cands)} settings matches dense; {_name(shown)}"


def _below_random(static: list[dict], metric: str) -> list[str]:
  """Where a score-based subset was less accurate than a random subset of the same nominal size
  and convention."""
  random = {(s["nominal_fraction"], s["convention"]): s for s in static
            if s["strategy"] == "random"}
  pairs = [(s, random[(s["nominal_fraction"], s["convention"])]) for s in static
           if s["strategy"] != "random" and (s["nominal_fraction"], s["convention"]) in random]
  if not pairs:
    return []
  below = [(s, r) for s, r in pairs
           if s[f"{metric}_accuracy_mean"] < r[f"{metric}_accuracy_mean"]]
  if not below:
    return [f"- score-based selection was at or above random in all {len(pairs)} settings "
            "compared."]
  items = "; ".join(f"{_name(s)} {_pct(s[f'{metric}_accuracy_mean'])}% vs random "
                    f"{_pct(r[f'{metric}_accuracy_mean'])}%" for s, r in below)
  return [f"- score-based selection fell below random in {len(below)} of {len(pairs)} settings: "
          f"{items}."]


def _rounds_cost(s: dict, summary: list[dict]) -> str:
  """What reaching round k cost: the strategy's rounds up to it, relative to one dense run."""
  if s["round"] is None:
    return ""
  rounds = [t for t in summary if t["strategy"] == s["strategy"] and t["round"] is not None
            and t["round"] <= s["round"] and t["method"] == s["method"]]
  compute = sum(t["relative_compute"] for t in rounds)
  walls = [t["relative_wall_time"] for t in rounds]
  wall = "" if any(w is None for w in walls) else f" and {sum(walls):.2f}x wall time"
  return (f"; its {len(rounds)} training runs (rounds {min(t['round'] for t in rounds)}-"
          f"{s['round']}) cost {compute:.2f}x compute{wall} of one dense run")


# ----------------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------------


def _csv(rows: list[dict]) -> str:
  fields = sorted({k for r in rows for k in r if not isinstance(r[k], (list, dict))})
  fields = ["strategy"] + [f for f in fields if f != "strategy"]
  buf = io.StringIO()
  w = csv.DictWriter(buf, fields, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow(r)
  return buf.getvalue()


@dataclasses.dataclass
class Report:
  """What :func:`write_report` made: the headline lines, the table, and absolute paths."""

  headline: list[str]
  table: str
  report: str
  plots: list[str]
  tensorboard: str
  summary: list[dict]

  def console(self, elapsed_s: float | None = None) -> str:
    """The end of the main job's output: headline, table, and where to look next."""
    lines = self.headline + ([""] if self.headline else []) + [self.table, ""]
    if elapsed_s is not None:
      lines.append(f"total {elapsed_s:.1f} s")
    lines.append(f"report:      {self.report}")
    lines += [f"plot:        {p}" for p in self.plots]
    lines.append(f"TensorBoard: tensorboard --logdir {self.tensorboard}")
    return "\n".join(lines)


def protocol(config, num_train: int | None = None, num_test: int | None = None) -> str:
  """One line on how accuracy was estimated: seeds, or K stratified folds and what was held out."""
  folds = config.get("cv_folds", 0)
  train = f"the {num_train} training examples" if num_train else "the training split"
  test = f"the fixed test split ({num_test} examples)" if num_test else "the fixed test split"
  if folds:
    return (f"Protocol: {folds}-fold cross-validation of {train}, stratified by class (folds "
            f"seeded with seed {config.seed}): replicate k trains on the other {folds - 1} folds; "
            f"held-out fold accuracy is measured on fold k (the cross-validated estimate), test "
            f"accuracy on {test}, which no run trains on.")
  last_seed = config.seed + config.replicates - 1
  return (f"Protocol: {config.replicates} seeds ({config.seed}..{last_seed}), each training on all "
          f"of {train}; accuracy on {test}.")


def write_report(workdir: str, config, rows: list[dict], baseline_compute: float,
                 num_train: int | None = None, num_test: int | None = None,
                 data_notes: list[str] | None = None) -> Report:
  """Writes results.json, results.csv, report.md, plots and TensorBoard events (process 0 only).

  Args:
    workdir: the run's folder.
    config: the experiment config.
    rows: every result row of the run.
    baseline_compute: example passes of one full-data training run.
    num_train: the size of the training split, for the protocol line.
    num_test: the size of the test split, for the protocol line.
    data_notes: lines on what was done to the data first (deduplication, label noise).

  Returns:
    The :class:`Report` (paths absolute); other processes get it without writing anything.
  """
  workdir = os.path.abspath(workdir)
  summary = summarize(rows, baseline_compute, setting_descriptions(config))
  lines, text = headline(summary), table(summary)
  tb = os.path.join(workdir, "tensorboard")
  report = Report(lines, text, os.path.join(workdir, "report.md"), [], tb, summary)
  if jax.process_index() != 0:
    return report
  atomic_write_json(os.path.join(workdir, "results.json"),
                    {"rows": rows, "summary": summary, "baseline_compute": baseline_compute,
                     "headline": lines})
  atomic_write_text(os.path.join(workdir, "results.csv"), _csv(rows))
  made = plots(workdir, rows, summary)
  report.plots = [os.path.join(workdir, m) for m in made]
  write_tensorboard(workdir, rows)
  cv = _is_cv(summary)
  md = [f"# {config.get('name', 'experiment')}: {config.dataset.name}, {config.model.name}", "",
        protocol(config, num_train, num_test), "", *(data_notes or []),
        *([""] if data_notes else []), *lines, "",
        "Rows are settings as asked for (strategy, nominal keep fraction or sparsity, convention, "
        "round); `kept` and `sparsity` are the measured means. Accuracies are mean +- sample std "
        f"over the {'folds' if cv else 'seeds'}"
        + (f"; the held-out fold accuracy has a {100 * CONFIDENCE:.0f}% Student-t interval" if cv
           else "")
        + f". `vs dense (paired)` is the mean per-{'fold' if cv else 'seed'} difference to "
        f"{summary and summary[0]['reference_name'] or 'dense'} in points, with its "
        f"{100 * CONFIDENCE:.0f}% t-interval when n >= 2. Compute is in example passes (forward 1, "
        "backward 2) relative to one full-data training run; scoring compute is what computing "
        "the scores cost, on the same scale. Wall time is relative to the dense run of the same "
        "replicate and counts training after each run's first step (which may include "
        "compilation); scoring's wall time is not measured.", "",
        text, ""] + [f"![{m}]({m})" for m in made]
  atomic_write_text(os.path.join(workdir, "report.md"), "\n".join(md) + "\n")
  return report
