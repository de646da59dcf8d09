"""The figures of an experiment: accuracy against the data kept and against the weights remaining,
score histograms, the fraction kept per class (PNG files), and TensorBoard events."""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np

from experiments.summary import _is_cv, _setting, setting_key
from prunejax.fileio import atomic_open


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
