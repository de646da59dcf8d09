"""Results of an experiment as files a reader can use: results.json/csv, report.md, plots, TensorBoard.

Only process 0 writes; every file is written atomically.
"""

from __future__ import annotations

import csv
import io
import os
from collections import defaultdict

import jax
import numpy as np


from prunejax.fileio import atomic_open, atomic_write_json, atomic_write_text

SUMMARY_FIELDS = ("strategy", "setting", "fraction_kept", "sparsity", "test_accuracy_mean",
                  "test_accuracy_std", "val_accuracy_mean", "relative_compute",
                  "relative_scoring_compute", "wall_time", "replicates")


def _setting(row: dict) -> str:
  parts = []
  if "round" in row:
    parts.append(f"round {row['round']}")
  if row.get("convention"):
    parts.append(f"same {row['convention']}")
  if row.get("method"):
    parts.append(str(row["method"]))
  return ", ".join(parts)


def summarize(rows: list[dict], baseline_compute: float) -> list[dict]:
  """Mean and std over replicates of each (strategy, setting, fraction kept, sparsity)."""
  groups: dict[tuple, list[dict]] = defaultdict(list)
  for row in rows:
    # Dynamic strategies keep a measured (not chosen) fraction: they group by their nominal one.
    key = (row["strategy"], _setting(row),
           round(row.get("nominal_fraction", row.get("fraction_kept", 1.0)), 4),
           round(row.get("sparsity", 0.0), 4))
    groups[key].append(row)
  out = []
  for (strategy, setting, _, sp), rs in groups.items():
    frac = float(np.mean([r.get("fraction_kept", 1.0) for r in rs]))
    acc = np.array([r["test_accuracy"] for r in rs])
    val = [r["val_accuracy"] for r in rs if "val_accuracy" in r]
    out.append({
        "strategy": strategy, "setting": setting, "fraction_kept": frac, "sparsity": sp,
        "test_accuracy_mean": float(acc.mean()), "test_accuracy_std": float(acc.std()),
        "val_accuracy_mean": float(np.mean(val)) if val else float("nan"),
        "relative_compute": float(np.mean([r["compute"] for r in rs])) / baseline_compute,
        "relative_scoring_compute": float(np.mean([r.get("scoring_compute", 0.0) for r in rs]))
        / baseline_compute,
        "wall_time": float(np.mean([r["wall_time"] for r in rs])),
        "replicates": len(rs)})
  return out


def table(summary: list[dict]) -> str:
  """A fixed-width text table (also valid Markdown)."""
  head = ("| strategy | setting | kept | sparsity | test acc (mean +- std) | train compute | "
          "scoring compute | wall s | n |")
  lines = [head, "|" + "---|" * 9]
  for s in summary:
    lines.append(
        f"| {s['strategy']} | {s['setting']} | {s['fraction_kept']:.2f} | {s['sparsity']:.3f} | "
        f"{100 * s['test_accuracy_mean']:.2f} +- {100 * s['test_accuracy_std']:.2f} | "
        f"{s['relative_compute']:.2f}x | {s['relative_scoring_compute']:.2f}x | "
        f"{s['wall_time']:.1f} | {s['replicates']} |")
  return "\n".join(lines)


def _csv(rows: list[dict]) -> str:
  fields = sorted({k for r in rows for k in r if not isinstance(r[k], (list, dict))})
  fields = ["strategy"] + [f for f in fields if f != "strategy"]
  buf = io.StringIO()
  w = csv.DictWriter(buf, fields, extrasaction="ignore")
  w.writeheader()
  for r in rows:
    w.writerow(r)
  return buf.getvalue()


def plots(workdir: str, rows: list[dict], summary: list[dict]) -> list[str]:
  """Accuracy vs fraction kept, accuracy vs remaining weights, score histograms, per-class kept."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  from prunejax.scores import load_scores
  made = []

  def save(fig, name):
    with atomic_open(os.path.join(workdir, name), "wb") as f:
      fig.savefig(f, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    made.append(name)

  by = defaultdict(list)
  for s in summary:
    by[s["strategy"]].append(s)
  data_strats = [k for k, v in by.items() if any(s["fraction_kept"] < 1 for s in v)
                 and all(s["sparsity"] == 0 for s in v)]
  dense = by.get("dense")
  if data_strats:
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in data_strats:
      pts = sorted((s["fraction_kept"], s["test_accuracy_mean"], s["test_accuracy_std"]) for s in by[k]
                   if s["setting"] in ("", "same epochs") or k == "iterative")
      if pts:
        f, m, e = zip(*pts)
        ax.errorbar(f, m, yerr=e, marker="o", capsize=2, label=k)
    if dense:
      ax.axhline(dense[0]["test_accuracy_mean"], color="k", ls="--", label="dense")
    ax.set_xlabel("fraction of training data kept")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_data_kept.png")
  weight_strats = [k for k, v in by.items() if any(s["sparsity"] > 0 for s in v)]
  if weight_strats:
    fig, ax = plt.subplots(figsize=(6, 4))
    for k in weight_strats:
      pts = sorted((1 - s["sparsity"], s["test_accuracy_mean"], s["test_accuracy_std"]) for s in by[k])
      f, m, e = zip(*pts)
      ax.errorbar(f, m, yerr=e, marker="o", capsize=2, label=k)
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("fraction of prunable weights remaining")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    save(fig, "accuracy_vs_weights_remaining.png")
  score_dir = os.path.join(workdir, "scores")
  files = sorted(f for f in os.listdir(score_dir) if f.endswith("_r0.npz")) if os.path.isdir(
      score_dir) else []
  if files:
    fig, axes = plt.subplots(1, len(files), figsize=(4 * len(files), 3), squeeze=False)
    for ax, f in zip(axes[0], files):
      name = f[:-len("_r0.npz")]
      _, sc = load_scores(os.path.join(score_dir, f))
      ax.hist(sc[name], bins=40)
      ax.set_title(name)
    save(fig, "score_histograms.png")
  pc = [r for r in rows if r.get("per_class_kept") and r.get("replicate") == 0
        and r.get("convention", "epochs") == "epochs"]
  if pc:
    fracs = sorted({r["fraction_kept"] for r in pc})
    f0 = fracs[len(fracs) // 2]
    chosen = [r for r in pc if r["fraction_kept"] == f0]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / max(len(chosen), 1)
    for i, r in enumerate(chosen):
      c = np.arange(len(r["per_class_kept"]))
      ax.bar(c + i * width, r["per_class_kept"], width, label=r["strategy"])
    ax.set_xlabel("class")
    ax.set_ylabel(f"fraction kept (overall {f0:.2f})")
    ax.legend(fontsize=7)
    save(fig, "per_class_kept.png")
  return made


def write_tensorboard(workdir: str, rows: list[dict]) -> None:
  from tensorboardX import SummaryWriter
  w = SummaryWriter(os.path.join(workdir, "tensorboard"))
  for i, r in enumerate(rows):
    tag = f"{r['strategy']}/{_setting(r) or 'default'}".replace(" ", "_").replace(",", "")
    w.add_scalar(f"{tag}/test_accuracy", r["test_accuracy"], i)
    w.add_scalar(f"{tag}/fraction_kept", r.get("fraction_kept", 1.0), i)
    w.add_scalar(f"{tag}/sparsity", r.get("sparsity", 0.0), i)
    run_tag = (f"runs/{r['strategy']}_keep{r.get('fraction_kept', 1.0):.2f}"
               f"_sparsity{r.get('sparsity', 0.0):.3f}_{r.get('convention', '')}_r{r['replicate']}")
    for h in r.get("history", []):
      w.add_scalar(f"{run_tag}/train_loss", h["loss"], h["epoch"])
      w.add_scalar(f"{run_tag}/train_accuracy", h["accuracy"], h["epoch"])
  w.close()


def write_report(workdir: str, config, rows: list[dict], baseline_compute: float) -> str:
  """Writes results.json, results.csv, report.md, plots and TensorBoard events; returns the table."""
  summary = summarize(rows, baseline_compute)
  text = table(summary)
  if jax.process_index() != 0:
    return text
  atomic_write_json(os.path.join(workdir, "results.json"),
                           {"rows": rows, "summary": summary, "baseline_compute": baseline_compute})
  atomic_write_text(os.path.join(workdir, "results.csv"), _csv(rows))
  made = plots(workdir, rows, summary)
  write_tensorboard(workdir, rows)
  md = [f"# {config.get('name', 'experiment')}: {config.dataset.name}, {config.model.name}", "",
        "Test accuracy is mean +- std over replicates"
        + (f" ({config.cv_folds}-fold cross-validation)" if config.get("cv_folds") else " (seeds)")
        + ". Compute is in example passes (forward 1, backward 2) relative to one full-data "
        "training run; scoring compute is what computing the scores cost, on the same scale. "
        "Wall time is training time after the first step (which may include compilation).", "",
        text, ""] + [f"![{m}]({m})" for m in made]
  atomic_write_text(os.path.join(workdir, "report.md"), "\n".join(md) + "\n")
  return text
