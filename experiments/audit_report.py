"""The report's data-audit section: the audit's summary table and the top issues of each type,
as image grids or quoted snippets."""

from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import numpy as np

from prunejax.fileio import atomic_open


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
