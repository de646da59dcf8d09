"""The statistics of an experiment's rows: each row's family and setting, and per setting the mean,
sample std and Student-t interval of its accuracies, its paired difference to dense and its cost
relative to one full-data run (:func:`summarize`).

Rows (one per training run, written by ``experiments/strategies/``) are grouped by the setting
that was asked for (:func:`setting_key`: strategy, nominal keep fraction or sparsity, convention,
method, round), never by a measured float; the measured fraction kept and sparsity are averaged
beside it.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from typing import Sequence

import numpy as np

from prunejax.errors import DataError

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


def time_to_reference(rows: list[dict], ref: dict[int, dict]) -> dict:
  """How fast ``rows`` (one setting's replicates) reach the reference's final mean test accuracy,
  from their per-epoch test accuracy (``history``, ``train.eval_every_epoch``): the training seconds
  and steps at the first epoch at or above it, over the reference's whole run (mean wall time and
  steps), averaged over the replicates that reach it. This is how RHO-LOSS and InfoBatch state
  their speed-ups. All None without per-epoch accuracies or a reference.

  Returns:
    ``target_accuracy``, ``reached`` (replicates that reach it), ``time_to_reference`` and
    ``steps_to_reference`` (ratios; None when no replicate reaches it).
  """
  curves = [[h for h in r.get("history") or [] if "test_accuracy" in h] for r in rows]
  none = {"target_accuracy": None, "reached": None, "time_to_reference": None,
          "steps_to_reference": None}
  if not ref or not rows or not all(curves):
    return none
  target = float(np.mean([b["test_accuracy"] for b in ref.values()]))
  # History values are rounded to 6 decimals; accuracies differ by at least 1 / (test examples).
  hits = [next((h for h in c if h["test_accuracy"] >= target - 1e-6), None) for c in curves]
  got = [h for h in hits if h is not None]
  wall = float(np.mean([b["wall_time"] for b in ref.values()]))
  steps = float(np.mean([b["steps"] for b in ref.values()]))
  ratio = lambda key, whole: (float(np.mean([h[key] for h in got])) / whole
                              if got and whole > 0 else None)
  return {"target_accuracy": target, "reached": len(got),
          "time_to_reference": ratio("train_seconds", wall),
          "steps_to_reference": ratio("steps", steps)}


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
    ``replicate_ids``; with per-epoch test accuracies, :func:`time_to_reference`'s fields. None
    where a value does not apply.
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
        "replicates": len(rs), "replicate_ids": sorted(int(r["replicate"]) for r in rs),
        **time_to_reference(rs, ref)}
    if entry["family"] == "iterative":  # the round's kept fraction is the schedule's, not measured
      entry["setting"] += f", keep {entry['fraction_kept']:.2f}"
    out.append(entry)
  return out


def _is_cv(summary: list[dict]) -> bool:
  return bool(summary) and all(s["val_accuracy_mean"] is not None for s in summary)
