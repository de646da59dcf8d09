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
import math
import os
from collections import defaultdict
from typing import Callable, Mapping, Sequence

import jax
import numpy as np

from prunejax.errors import DataError
from prunejax.fileio import atomic_open, atomic_write_json, atomic_write_text

CONFIDENCE = 0.95
"""Coverage of every interval in the report (two-sided Student t)."""

FAMILIES = {"dense": "dense", "static": "static subsets", "iterative": "iterative data pruning",
            "online": "online data pruning", "imp": "IMP", "pai": "pruning at initialization",
            "post_training": "post-training pruning (no retraining)"}
"""The families of strategies the headline speaks of, by :func:`family`."""

# ----------------------------------------------------------------------------------------------
# Statistics.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Mean, sample standard deviation (0 for one value) and a two-sided t-interval of the mean
  (None below two values) of ``n`` values."""

  mean: float
  std: float
  low: float | None
  high: float | None
  n: int


def estimate(values: Sequence[float], confidence: float = CONFIDENCE) -> Estimate:
  """Mean +- sample std of ``values`` and the Student-t interval ``mean +- t * std / sqrt(n)``.

  Args:
    values: n >= 1 numbers (per seed or per fold).
    confidence: the interval's coverage, e.g. 0.95.

  Returns:
    An :class:`Estimate`; ``std`` uses ``n - 1`` degrees of freedom.
  """
  v = np.asarray(values, np.float64)
  n = len(v)
  if n == 0:
    raise DataError("estimate of values=[]: expected at least one value")
  mean = float(v.mean())
  if n < 2:
    return Estimate(mean, 0.0, None, None, 1)
  from scipy import stats
  std = float(v.std(ddof=1))
  half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
  return Estimate(mean, std, mean - half, mean + half, n)


# ----------------------------------------------------------------------------------------------
# Grouping rows by the setting that was asked for.
# ----------------------------------------------------------------------------------------------


def family(row: dict) -> str:
  """The family of a result row: ``dense``, ``static`` (a fixed subset: random or by a score),
  ``iterative``, ``online`` (an online pruner), ``imp`` (rounds of weight pruning: IMP, its
  controls, IMP with data pruning), ``pai`` (pruning at initialization) or ``post_training``
  (a trained model pruned without retraining)."""
  if row["strategy"] == "dense":
    return "dense"
  if row["strategy"] == "post_training":
    return "post_training"
  if "method" in row:
    return "pai"
  if "round" in row:
    return "iterative" if row["strategy"] == "iterative" else "imp"
  if row.get("nominal_fraction", 0.0) < 0:
    return "online"
  return "static"


def setting_key(row: dict) -> tuple:
  """The setting a row was asked to run: (strategy, convention, method, round, nominal keep
  fraction, nominal sparsity), with None where it does not apply.

  Static subsets carry ``nominal_fraction`` (the measured ``fraction_kept`` differs between folds
  by an example); online rows carry ``nominal_fraction=-1`` (their one setting is the config's);
  rounds are identified by ``round`` and PaI by ``method`` and ``nominal_sparsity``. Rows written
  before these fields existed fall back to the measured value rounded to 0.01.
  """
  fam = family(row)
  nominal = row.get("nominal_fraction")
  if fam == "static" and nominal is None:
    nominal = round(float(row.get("fraction_kept", 1.0)), 2)
  sparsity = row.get("nominal_sparsity")
  if fam in ("pai", "post_training") and sparsity is None:
    sparsity = round(float(row.get("sparsity", 0.0)), 2)
  return (row["strategy"], row.get("convention") or None, row.get("method"), row.get("round"),
          float(nominal) if fam == "static" else None,
          float(sparsity) if fam in ("pai", "post_training") else None)


def setting_descriptions(config) -> dict[str, str]:
  """What the online strategies of ``config`` were asked to do, by strategy name."""
  dp, bp, sb = config.data_pruning, config.batch_pruning, config.semi_batch
  return {"random_dynamic": f"random {dp.dynamic_keep:g} of the data each epoch",
          "batch": f"top {bp.keep_fraction:g} of each batch by {bp.score}",
          "semi_batch": f"InfoBatch r={sb.prune_ratio:g}, delta={sb.delta:g}",
          "rho_loss": f"top {bp.keep_fraction:g} of each batch by reducible loss",
          "joint": f"with {config.joint.data}"}


def _setting(key: tuple, descriptions: dict[str, str]) -> str:
  strategy, convention, method, rnd, nominal, sparsity = key
  parts = []
  if method is not None:
    parts.append(str(method))
  if sparsity is not None:
    parts.append(f"sparsity {sparsity:g}")
  if nominal is not None:
    parts.append(f"keep {nominal:g}")
  if convention:
    parts.append(f"same {convention}")
  if rnd is not None:
    parts.append(f"round {rnd}")
  if descriptions.get(strategy):
    parts.append(descriptions[strategy])
  return ", ".join(parts)


def reference_rows(rows: list[dict]) -> tuple[str, dict[int, dict]]:
  """The dense reference of every comparison, by replicate: the ``dense`` rows, or IMP's round 0
  (dense training with the same seed) where the experiment ran no ``dense``. ("", {}) if neither."""
  for name, pick in (("dense", lambda r: r["strategy"] == "dense"),
                     ("imp round 0", lambda r: r["strategy"] == "imp" and r.get("round") == 0)):
    chosen = {int(r["replicate"]): r for r in rows if pick(r)}
    if chosen:
      return name, chosen
  return "", {}


def _fields(prefix: str, e: Estimate | None) -> dict:
  if e is None:
    return {f"{prefix}_mean": None, f"{prefix}_std": None, f"{prefix}_low": None,
            f"{prefix}_high": None}
  return {f"{prefix}_mean": e.mean, f"{prefix}_std": e.std, f"{prefix}_low": e.low,
          f"{prefix}_high": e.high}


def summarize(rows: list[dict], baseline_compute: float,
              descriptions: dict[str, str] | None = None) -> list[dict]:
  """One entry per setting asked for (:func:`setting_key`), in the order the rows first name it.

  Args:
    rows: result rows (``experiments.trainer.result_row``), one per replicate and setting.
    baseline_compute: example passes of one full-data training run; compute ratios divide by it.
    descriptions: text for the setting of some strategies (:func:`setting_descriptions`).

  Returns:
    Dicts with the setting (``strategy``, ``family``, ``setting``, ``convention``, ``method``,
    ``round``, ``nominal_fraction``, ``nominal_sparsity``), the measured means ``fraction_kept`` and
    ``sparsity``; ``test_accuracy_{mean,std,low,high}`` and with CV rows
    ``val_accuracy_{mean,std,low,high}`` (held-out fold), t-intervals at :data:`CONFIDENCE`;
    ``paired_test_diff_*`` / ``paired_val_diff_*``: the per-replicate difference to the dense
    reference (:func:`reference_rows`) over the replicates both ran; ``relative_compute``,
    ``relative_scoring_compute``; ``relative_wall_time`` (mean over replicates of the wall time over
    the reference's of the same replicate), ``wall_time`` (mean seconds); ``replicates`` (n) and
    ``replicate_ids``. None where a value does not apply.
  """
  if not baseline_compute > 0:
    raise DataError(f"baseline_compute={baseline_compute!r}: expected the positive example passes "
                    "of one full-data training run")
  descriptions = descriptions or {}
  ref_name, ref = reference_rows(rows)
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for row in rows:
    groups[setting_key(row)].append(row)
  out = []
  for key, rs in groups.items():
    strategy, convention, method, rnd, nominal, sparsity = key
    cv = all("val_accuracy" in r for r in rs)
    paired = [(r, ref[int(r["replicate"])]) for r in rs if int(r["replicate"]) in ref]
    is_ref = bool(rs) and all(ref.get(int(r["replicate"])) is r for r in rs)
    walls = [r["wall_time"] / b["wall_time"] for r, b in paired if b["wall_time"] > 0]
    entry = {
        "strategy": strategy, "family": family(rs[0]), "setting": _setting(key, descriptions),
        "convention": convention, "method": method, "round": rnd, "nominal_fraction": nominal,
        "nominal_sparsity": sparsity, "reference": is_ref,
        "fraction_kept": float(np.mean([r.get("fraction_kept", 1.0) for r in rs])),
        "sparsity": float(np.mean([r.get("sparsity", 0.0) for r in rs])),
        **_fields("test_accuracy", estimate([r["test_accuracy"] for r in rs])),
        **_fields("val_accuracy", estimate([r["val_accuracy"] for r in rs]) if cv else None),
        **_fields("paired_test_diff", None if is_ref or not paired else estimate(
            [r["test_accuracy"] - b["test_accuracy"] for r, b in paired])),
        **_fields("paired_val_diff", None if is_ref or not paired or not cv else estimate(
            [r["val_accuracy"] - b["val_accuracy"] for r, b in paired])),
        "paired_replicates": len(paired), "reference_name": ref_name,
        "relative_compute": float(np.mean([r["compute"] for r in rs])) / baseline_compute,
        "relative_scoring_compute": float(np.mean([r.get("scoring_compute", 0.0) or 0.0
                                                   for r in rs])) / baseline_compute,
        "relative_wall_time": float(np.mean(walls)) if len(walls) == len(rs) else None,
        "wall_time": float(np.mean([r["wall_time"] for r in rs])),
        "replicates": len(rs), "replicate_ids": sorted(int(r["replicate"]) for r in rs)}
    if entry["family"] == "iterative":  # the round's kept fraction is the schedule's, not measured
      entry["setting"] += f", keep {entry['fraction_kept']:.2f}"
    out.append(entry)
  return out


# ----------------------------------------------------------------------------------------------
# Table and headline.
# ----------------------------------------------------------------------------------------------


def _is_cv(summary: list[dict]) -> bool:
  return bool(summary) and all(s["val_accuracy_mean"] is not None for s in summary)


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
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    cells = [s["strategy"], s["setting"], f"{s['fraction_kept']:.2f}", f"{s['sparsity']:.3f}",
             _pct(s["test_accuracy_mean"], _std(s, "test"))]
    if cv:
      cells.append(f"{_pct(s['val_accuracy_mean'], _std(s, 'val'))} "
                   f"{_interval(s['val_accuracy_low'], s['val_accuracy_high'])}".strip())
    cells += [_diff(s, metric), _ratio(s["relative_compute"]), _ratio(s["relative_wall_time"]),
              _ratio(s["relative_scoring_compute"]), f"{s['wall_time']:.1f}", str(s["replicates"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


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
  return lines + _data_lines(by_family, matches, metric) + _weight_lines(by_family, matches,
                                                                          metric, summary)


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


def _panels(summary: list[dict]) -> list[tuple[str, str]]:
  """(metric, axis label) of each accuracy panel: held-out fold accuracy first under CV."""
  if _is_cv(summary):
    return [("val", "held-out fold accuracy (CV)"), ("test", "test split accuracy")]
  return [("test", "test accuracy")]


def plots(workdir: str, rows: list[dict], summary: list[dict]) -> list[str]:
  """Accuracy vs fraction kept, accuracy vs remaining weights, score histograms, per-class kept;
  returns the file names written."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = _panels(summary)
  ref = [s for s in summary if s["reference"]]
  curves, weights = defaultdict(list), defaultdict(list)
  for s in summary:
    if s["family"] in ("static", "iterative", "online") and s["convention"] in (None, "epochs"):
      curves[s["strategy"]].append(s)
    if s["family"] in ("imp", "pai", "post_training") and s["sparsity"] > 0:
      weights[s["strategy"] + (f" {s['method']}" if s["method"] else "")].append(s)
  figures = {
      "accuracy_vs_data_kept.png": curves and _accuracy_figure(
          plt, panels, curves, ref, lambda s: s["fraction_kept"],
          "fraction of training data kept (or back-propagated)", log_x=False),
      "accuracy_vs_weights_remaining.png": weights and _accuracy_figure(
          plt, panels, weights, ref, lambda s: 1 - s["sparsity"],
          "fraction of prunable weights remaining", log_x=True),
      "score_histograms.png": _score_histograms(plt, workdir),
      "per_class_kept.png": _per_class_figure(plt, rows),
  }
  made = []
  for name, fig in figures.items():
    if fig:
      with atomic_open(os.path.join(workdir, name), "wb") as f:
        fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
      plt.close(fig)
      made.append(name)
  return made


def _accuracy_figure(plt, panels, curves: dict, ref: list, x_of, xlabel: str, log_x: bool):
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
  for ax, (metric, label) in zip(axes[0], panels):
    for name, ss in curves.items():
      pts = sorted((x_of(s), s[f"{metric}_accuracy_mean"], s[f"{metric}_accuracy_std"])
                   for s in ss)
      f, m, e = zip(*pts)
      ax.errorbar(f, m, yerr=e, marker="o", capsize=2, label=name)
    if ref:
      ax.axhline(ref[0][f"{metric}_accuracy_mean"], color="k", ls="--", label="dense")
    if log_x:
      ax.set_xscale("log")
      ax.invert_xaxis()
    else:
      ax.set_xlim(0, 1.05)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
  return fig


def _score_histograms(plt, workdir: str):
  from prunejax.scores import load_scores
  score_dir = os.path.join(workdir, "scores")
  files = sorted(f for f in os.listdir(score_dir) if f.endswith("_r0.npz")) if os.path.isdir(
      score_dir) else []
  if not files:
    return None
  fig, axes = plt.subplots(1, len(files), figsize=(4 * len(files), 3), squeeze=False)
  for ax, f in zip(axes[0], files):
    name = f[:-len("_r0.npz")]
    _, sc = load_scores(os.path.join(score_dir, f))
    ax.hist(sc[name], bins=40)
    ax.set_title(name)
  return fig


def _per_class_figure(plt, rows: list[dict]):
  pc = [r for r in rows if r.get("per_class_kept") and r.get("replicate") == 0
        and r.get("convention", "epochs") == "epochs"]
  if not pc:
    return None
  nominal = lambda r: setting_key(r)[4]
  fracs = sorted({nominal(r) for r in pc})
  f0 = fracs[len(fracs) // 2]
  chosen = [r for r in pc if nominal(r) == f0]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  width = 0.8 / max(len(chosen), 1)
  for i, r in enumerate(chosen):
    c = np.arange(len(r["per_class_kept"]))
    ax.bar(c + i * width, r["per_class_kept"], width, label=r["strategy"])
  ax.set_xlabel("class")
  ax.set_ylabel(f"fraction kept (overall {f0:g})")
  ax.legend(fontsize=7)
  return fig


def write_tensorboard(workdir: str, rows: list[dict]) -> None:
  """Per-row scalars (tagged by strategy and setting) and per-run train curves."""
  from tensorboardX import SummaryWriter
  w = SummaryWriter(os.path.join(workdir, "tensorboard"))
  for i, r in enumerate(rows):
    setting = _setting(setting_key(r), {}) or "default"
    tag = f"{r['strategy']}/{setting}".replace(" ", "_").replace(",", "")
    w.add_scalar(f"{tag}/test_accuracy", r["test_accuracy"], i)
    if "val_accuracy" in r:
      w.add_scalar(f"{tag}/val_accuracy", r["val_accuracy"], i)
    w.add_scalar(f"{tag}/fraction_kept", r.get("fraction_kept", 1.0), i)
    w.add_scalar(f"{tag}/sparsity", r.get("sparsity", 0.0), i)
    run_tag = f"runs/{tag.replace('/', '_')}_r{r['replicate']}"
    for h in r.get("history", []):
      w.add_scalar(f"{run_tag}/train_loss", h["loss"], h["epoch"])
      w.add_scalar(f"{run_tag}/train_accuracy", h["accuracy"], h["epoch"])
  w.close()


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


# ------------------------------------------------------------------------------ data audit


def audit_section(workdir: str, result, *, kind: str, read_x: Callable | None = None,
                  texts: Mapping[int, str] | None = None,
                  test_texts: Mapping[int, str] | None = None,
                  removed_by: Sequence[str] = (), top: int = 8) -> list[str]:
  """The report's data-audit section: the summary table, then the top issues of each type.

  Args:
    workdir: the run's folder; image grids are written to ``workdir/audit/<type>.png``.
    result: a :class:`prunejax.audit.Audit`.
    kind: ``"image"`` (a PNG grid per issue type, each image titled with its id, given and
      predicted label) or ``"text"`` (the snippets, quoted).
    read_x: ``read_x(ids) -> [n, H, W, C]`` stored images (image datasets).
    texts, test_texts: ``{id: text}`` of the training and test splits (text datasets).
    removed_by: the issue types the cleaning step removed.
    top: how many examples per issue type.

  Returns:
    Markdown lines.
  """
  from prunejax import audit as audit_lib
  lines = ["## Data audit", "",
           "One audit of the training split (`prunejax.audit`, Datalab's issue types); flagged "
           "counts, share of the training split, and duplicate groups / near-duplicate sets / "
           "leaked (train, test) pairs. Scores are in [0, 1], low = more severe; the full table "
           "by id is `dedup/audit.npz`.", "", audit_lib.summary_markdown(result), ""]
  if removed_by:
    lines += [f"Removed before any strategy: the examples flagged as {', '.join(removed_by)} "
              f"({len(result.remove_ids(removed_by)):,} ids).", ""]
  g, p = result.given_label, result.predicted_label
  row = {int(i): k for k, i in enumerate(result.ids)}
  labels_of = lambda i: ", ".join(([] if g is None else [f"given {g[row[i]]}"])
                                  + ([] if p is None else [f"predicted {p[row[i]]}"]))
  for t in result.is_issue:
    ids = [int(i) for i in result.top(t, top)]
    if not ids:
      continue
    lines.append(f"**{t}** (top {len(ids)} of {result.summary[t]['count']:,}, most severe first)")
    lines.append("")
    if kind == "image" and read_x is not None:
      path = _issue_grid(workdir, t, read_x(np.asarray(ids)),
                         [f"id {i}\n{labels_of(i)}" for i in ids])
      lines += [f"![{t}]({path})", ""]
    elif texts is not None:
      for i in ids:
        extra = ""
        if t == "leakage":
          te = result.leakage_pairs[result.leakage_pairs[:, 0] == i, 1]
          te_text = (test_texts or {}).get(int(te[0]), "") if len(te) else ""
          extra = (f" = test id {int(te[0])}" if len(te) else "") + (
              f" (\"{te_text[:80]}\")" if te_text and te_text != texts.get(i) else "")
        elif t in ("exact_duplicate", "near_duplicate"):
          sets = result.exact_duplicate_sets if t == "exact_duplicate" else \
              result.near_duplicate_sets
          mates = next((s for s in sets if i in s), np.zeros(0, np.int64))
          extra = f" (set {[int(m) for m in mates]})" if len(mates) else ""
        text = " ".join(str(texts.get(i, "")).split())
        labels = f" ({labels_of(i)})" if labels_of(i) else ""
        lines.append(f"- id {i}{labels}{extra}: \"{text[:160]}\"")
      lines.append("")
  return lines


def _issue_grid(workdir: str, issue_type: str, images, titles: list[str]) -> str:
  """A one-row PNG grid of images with titles; returns its path relative to ``workdir``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  images = np.asarray(images)
  fig, axes = plt.subplots(1, len(images), figsize=(1.6 * len(images), 2.0), squeeze=False)
  for ax, img, title in zip(axes[0], images, titles):
    img = img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img
    ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
    ax.set_title(title, fontsize=7)
    ax.axis("off")
  rel = os.path.join("audit", f"{issue_type}.png")
  fig.tight_layout()
  with atomic_open(os.path.join(workdir, rel), "wb") as f:
    fig.savefig(f, dpi=100, format="png")
  plt.close(fig)
  return rel


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

