"""Cleaning before pruning: label noise for noise experiments, and deduplication as a first step.

* ``dataset.label_noise = f``: a seeded fraction ``f`` of the training labels is flipped to another
  class (``prunejax.data.flip_labels``); the flipped ids and their true labels are saved to
  ``workdir/label_noise.npz`` and every row reports the share of corrupted examples that were
  back-propagated.
* ``dedup.first``: ``"exact"`` removes exact duplicates within the training split (all but the
  lowest id of each group of equal content), ``"exact_and_leakage"`` also removes training examples
  whose content occurs in the test split, ``"semantic"`` removes SemDeDup near-duplicates at
  ``dedup.eps`` (embeddings of a briefly trained model), ``"audit"`` runs one
  :func:`prunejax.audit.audit` of the training split (label issues from K-fold out-of-fold
  probabilities, exact duplicates and train/test leakage by content hash, SemDeDup near-duplicates
  and kNN outliers on the embeddings of a briefly trained model) and removes every example flagged
  with a type in ``dedup.audit_remove``; what was removed is saved by id under ``workdir/dedup/``
  with a summary (the audit's table in ``dedup/audit.npz``), the report gets a data-audit section,
  and every strategy then runs on what remains.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import jax
import numpy as np

from experiments.context import Context
from experiments.files import save_npz
from prunejax import audit as audit_lib
from prunejax import data, dedup
from prunejax.errors import ConfigError
from prunejax.fileio import atomic_write_json

log = logging.getLogger("prunejax")
FIRST_STEPS = ("off", "exact", "exact_and_leakage", "semantic", "audit")
# What dedup.first="audit" removes unless dedup.audit_remove says otherwise: outliers are reported
# but kept (Datalab's outliers are often the hard, informative examples pruning wants to keep).
AUDIT_REMOVE = ("label", "exact_duplicate", "near_duplicate", "leakage")


def add_label_noise(ctx: Context) -> Context:
  """``ctx`` with ``dataset.label_noise`` of its training labels flipped (seeded by ``seed``)."""
  frac = float(ctx.config.dataset.get("label_noise", 0.0) or 0.0)
  if frac <= 0:
    return ctx
  train = ctx.ds.train
  noisy, flipped = data.flip_labels(train.ids, train.labels(), frac,
                                    num_classes=ctx.ds.num_classes, seed=int(ctx.config.seed))
  save_npz(os.path.join(ctx.workdir, "label_noise.npz"), flipped_ids=flipped,
                  true_labels=train.labels(flipped), noisy_labels=noisy[train.index.rows(flipped)])
  log.info("label noise: flipped %d of %d training labels (ids saved to label_noise.npz)",
           len(flipped), len(train))
  ds = dataclasses.replace(ctx.ds, train=data.RelabeledSource(train, noisy))
  return dataclasses.replace(ctx, ds=ds, corrupted_ids=flipped)


def _kind(ctx) -> tuple[str, int | None]:
  return ("tokens", ctx.ds.meta["pad_id"]) if ctx.ds.kind == "text" else ("image", None)


def _hashes(ctx, split: str) -> tuple[np.ndarray, np.ndarray]:
  kind, pad = _kind(ctx)
  return dedup.hash_batches(ctx.batches(split=split), kind=kind, pad_id=pad)


def _exact(ctx, with_leakage: bool) -> tuple[np.ndarray, dict]:
  tr_ids, tr_h = _hashes(ctx, "train")
  te_ids, te_h = _hashes(ctx, "test")
  groups = dedup.exact_duplicates(tr_ids, tr_h)
  redundant = dedup.redundant_ids(groups)
  leak_tr, leak_te = dedup.leakage(tr_ids, tr_h, te_ids, te_h)
  out = os.path.join(ctx.workdir, "dedup")
  save_npz(os.path.join(out, "exact_duplicates.npz"), removed_ids=redundant,
                  group_sizes=np.asarray([len(g) for g in groups], np.int64))
  save_npz(os.path.join(out, "leakage.npz"), train_ids=leak_tr, test_ids=leak_te)
  removed = np.union1d(redundant, leak_tr) if with_leakage else redundant
  summary = {"exact_duplicate_groups": len(groups), "exact_duplicates_removed": len(redundant),
             "leaked_train_examples": int(len(np.unique(leak_tr))),
             "leaked_test_examples": int(len(np.unique(leak_te))),
             "leakage_removed": bool(with_leakage)}
  return removed, summary


def _semantic(ctx) -> tuple[np.ndarray, dict]:
  from experiments import scoring
  ids = np.sort(ctx.ds.train.ids)
  cfg = ctx.config.dedup
  emb, compute = scoring.embeddings(ctx, ids, int(ctx.config.seed), "dedup embeddings")
  res = dedup.semdedup(emb, ids_N=ids, num_clusters=min(cfg.num_clusters, len(ids)),
                       key=jax.random.key(int(ctx.config.seed)), keep=cfg.keep)
  removed = res.removed_ids(cfg.eps)
  save_npz(os.path.join(ctx.workdir, "dedup", "semantic.npz"), ids=res.ids,
                  max_similarity=res.max_similarity, duplicate_of=res.duplicate_of,
                  removed_ids=removed)
  return removed, {"semantic_removed": len(removed), "eps": cfg.eps, "compute": compute}


def _audit(ctx) -> tuple[np.ndarray, dict]:
  from experiments import audit_report, scoring
  cfg = ctx.config.dedup
  seed = int(ctx.config.seed)
  ids = np.sort(ctx.ds.train.ids)
  tr_ids, tr_h = _hashes(ctx, "train")
  te_ids, te_h = _hashes(ctx, "test")
  inputs = os.path.join(ctx.workdir, "dedup", "audit_inputs.npz")

  def compute_inputs() -> dict:
    emb, emb_compute = scoring.embeddings(ctx, ids, seed, "audit embeddings")
    probs, probs_compute = scoring.out_of_fold_probs(ctx, ids, seed, desc="audit fold")
    save_npz(inputs, ids=ids, embeddings=emb, probs=probs)
    return {"compute": emb_compute + probs_compute}

  # A unit of work: rerunning the same workdir reads the embeddings and K-fold probabilities back.
  spent = ctx.units.run("audit_inputs", compute_inputs)["compute"]
  with np.load(inputs) as f:
    if not np.array_equal(f["ids"], ids):
      raise ConfigError(f"{inputs} holds other ids than the training split; rerun with --overwrite")
    emb, probs = f["embeddings"], f["probs"]
  result = audit_lib.audit(ids, labels_N=ctx.labels(ids), probs_NxC=probs, embeddings_NxD=emb,
                           hashes_N=tr_h[np.argsort(tr_ids)],  # in id order, as ids
                           test_ids=te_ids, test_hashes=te_h, near_duplicate_eps=cfg.eps,
                           num_clusters=min(cfg.num_clusters, len(ids)), keep=cfg.keep, seed=seed)
  if jax.process_index() == 0:
    result.save(os.path.join(ctx.workdir, "dedup", "audit.npz"))
  remove_by = tuple(t for t in cfg.get("audit_remove", AUDIT_REMOVE) if t in result.is_issue)
  removed = result.remove_ids(remove_by)
  max_share = float(cfg.get("audit_max_removed", 0.5))
  if len(removed) > max_share * len(ids):
    # Collapsed embeddings (a briefly trained model's ReLU features can all be within 1e-3 cosine
    # distance) make "near duplicates" of nearly everything: refuse rather than train on scraps.
    counts = ", ".join(f"{t} {result.summary[t]['count']:,}" for t in remove_by)
    raise ConfigError(
        f"dedup.first='audit' would remove {len(removed):,} of {len(ids):,} training examples "
        f"(more than dedup.audit_max_removed={max_share}): {counts}. Lower dedup.eps, train the "
        f"embedding model longer (data_pruning.score_epochs), or leave a type out of "
        f"dedup.audit_remove; the audit's table is in dedup/audit.npz")
  texts = ctx.ds.texts or {}
  section = audit_report.audit_section(
      ctx.workdir, result, kind=ctx.ds.kind,
      read_x=(lambda i: ctx.ds.train.read(i)["x"]) if ctx.ds.kind == "image" else None,
      texts=texts.get("train"), test_texts=texts.get("test"),
      removed_by=remove_by) if jax.process_index() == 0 else []
  summary = {"audit": result.summary, "audit_removed_by": list(remove_by),
             "audit_removed": len(removed), "compute": spent,
             "audit_section": section}
  if ctx.corrupted_ids is not None and "label" in result.is_issue:
    # With dataset.label_noise, how many of the flagged label issues are the flipped labels.
    flagged = result.issue_ids("label")
    summary["label_issues_flipped"] = int(np.isin(flagged, ctx.corrupted_ids).sum())
    summary["flipped"] = int(len(ctx.corrupted_ids))
  return removed, summary


def deduplicate(ctx: Context) -> Context:
  """``ctx`` whose training split lost what ``dedup.first`` removes (see the module doc)."""
  step = ctx.config.dedup.get("first", "off")
  if step == "off":
    return ctx
  if step == "audit":
    removed, summary = _audit(ctx)
  elif step == "semantic":
    removed, summary = _semantic(ctx)
  else:
    removed, summary = _exact(ctx, step == "exact_and_leakage")
  train = ctx.ds.train
  keep = np.setdiff1d(train.ids, removed)
  summary.update(step=step, train_before=len(train), train_after=len(keep))
  on_disk = {k: v for k, v in summary.items() if k != "audit_section"}
  if jax.process_index() == 0:
    atomic_write_json(os.path.join(ctx.workdir, "dedup", "summary.json"), on_disk)
  log.info("deduplication (%s): %s", step, json.dumps(on_disk))
  ds = dataclasses.replace(ctx.ds, train=data.SubsetSource(train, keep))
  return dataclasses.replace(ctx, ds=ds, cleaning=summary)


def notes(ctx: Context) -> list[str]:
  """What was done to the data before the strategies, as report lines."""
  out = []
  if ctx.corrupted_ids is not None:
    out.append(f"Label noise: {len(ctx.corrupted_ids):,} training labels "
               f"({ctx.config.dataset.label_noise:.0%}) were flipped to another class (ids in "
               "label_noise.npz); `corrupted_backprop_fraction` in results.csv is the share of "
               "back-propagated examples whose label was flipped.")
  c = ctx.cleaning
  if c:
    if c["step"] == "audit":
      what = (f"{c['audit_removed']:,} examples flagged by the data audit as "
              f"{', '.join(c['audit_removed_by'])} (see the data-audit section)")
    elif c["step"] == "semantic":
      what = f"{c['semantic_removed']:,} SemDeDup near-duplicates at eps={c['eps']}"
    else:
      what = (f"{c['exact_duplicates_removed']:,} exact duplicates (in "
              f"{c['exact_duplicate_groups']:,} groups)")
      leak = (f"{c['leaked_train_examples']:,} training examples equal to "
              f"{c['leaked_test_examples']:,} test examples")
      what += f" and {leak}" if c["leakage_removed"] else f"; found (not removed) {leak}"
    out.append(f"Deduplication ({c['step']}): removed {what}; {c['train_after']:,} of "
               f"{c['train_before']:,} training examples remain (ids under dedup/).")
    if c["step"] == "audit" and "flipped" in c:
      out.append(f"Of the {c['audit']['label']['count']:,} label issues the audit flagged, "
                 f"{c['label_issues_flipped']:,} are among the {c['flipped']:,} flipped labels.")
    if c["step"] == "audit":
      out += [""] + c["audit_section"]
  return out
