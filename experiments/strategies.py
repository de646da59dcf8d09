"""The strategies an experiment can run, each producing result rows (see ``experiments/common.py``).

Data pruning: ``dense`` (full data), ``random`` (a static random subset), ``random_dynamic`` (a fresh
random subset every epoch), static score-based subsets (``el2n``, ``grand``, ``forgetting``, ``aum``,
``prototypes``, ``label_quality``), ``batch`` (online top-k back-propagation), ``semi_batch``
(InfoBatch), ``iterative`` (train, score, prune, retrain). Model pruning: ``imp`` (lottery tickets with
rewinding) and its controls, ``pai`` (pruning at initialization). ``joint``: data and weights pruned in
the same run.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import numpy as np

from experiments import common
from prunejax import data, parallel, scores as scores_lib, select
from prunejax.models import make_apply_fn

Rows = list[dict]


def _replicates(ctx: common.Context):
  for r in range(ctx.num_replicates):
    yield (r,) + ctx.replicate_split(r)


def baseline_compute(ctx: common.Context) -> float:
  """Compute of one full-data training run (example passes), the unit of every compute ratio."""
  ids, _, _ = ctx.replicate_split(0)
  return 3.0 * len(ids) * ctx.config.train.epochs


# ----------------------------------------------------------------------------------------------
# Full data, random, dynamic.
# ----------------------------------------------------------------------------------------------


def dense(ctx: common.Context) -> Rows:
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    def unit():
      run = common.train_model(ctx, ids, seed=seed, desc=f"dense r{r}")
      return common.result_row(ctx, "dense", r, run, held)
    rows.append(ctx.units.run(f"dense_r{r}", unit))
  return rows


def _subset_runs(ctx, strategy: str, kept_fn: Callable[[int, np.ndarray, int, float], np.ndarray],
                 *, scoring_compute: Callable[[int], float] = lambda r: 0.0) -> Rows:
  """Trains on the kept subset for each keep fraction, convention and replicate."""
  rows = []
  dp = ctx.config.data_pruning
  for r, ids, held, seed in _replicates(ctx):
    for frac in dp.keep_fractions:
      for conv in dp.conventions:
        def unit(frac=frac, conv=conv):
          kept = kept_fn(r, ids, seed, frac)
          common.atomic_save_npz(os.path.join(ctx.workdir, "subsets",
                                              f"{strategy}_keep{frac}_r{r}.npz"), ids=kept)
          epochs = ctx.config.train.epochs
          if conv == "steps":  # same number of optimizer steps as full data
            epochs = int(round(epochs * len(ids) / max(len(kept), 1)))
          run = common.train_model(ctx, kept, seed=seed, epochs=epochs,
                                   desc=f"{strategy} keep={frac} r{r}")
          per_class = np.bincount(ctx.ds.train.select(kept).y, minlength=ctx.ds.num_classes) / \
              np.maximum(np.bincount(ctx.ds.train.select(ids).y, minlength=ctx.ds.num_classes), 1)
          return common.result_row(ctx, strategy, r, run, held, fraction_kept=len(kept) / len(ids),
                                   convention=conv, scoring_compute=scoring_compute(r),
                                   per_class_kept=per_class.round(4).tolist())
        rows.append(ctx.units.run(f"{strategy}_keep{frac}_{conv}_r{r}", unit))
  return rows


def random_static(ctx: common.Context) -> Rows:
  def kept(r, ids, seed, frac):
    return select.select(ids, np.zeros(len(ids), np.float32), fraction=frac, keep="random",
                         seed=seed)
  return _subset_runs(ctx, "random", kept)


def _dynamic(ctx: common.Context, strategy: str) -> Rows:
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    def unit():
      run = common.train_model(ctx, ids, seed=seed, dynamic_strategy=strategy,
                               desc=f"{strategy} r{r}")
      kept = {"batch": ctx.config.batch_pruning.keep_fraction,
              "random_dynamic": ctx.config.data_pruning.dynamic_keep}.get(
                  strategy, run.backward / (len(ids) * ctx.config.train.epochs))
      return common.result_row(ctx, strategy, r, run, held, fraction_kept=kept,
                               nominal_fraction=-1.0)
    rows.append(ctx.units.run(f"{strategy}_r{r}", unit))
  return rows


# ----------------------------------------------------------------------------------------------
# Static score-based subsets.
# ----------------------------------------------------------------------------------------------


def score_examples(ctx: common.Context, state, ids: np.ndarray, score_fn) -> np.ndarray:
  """``score_fn(apply_fn, params, batch)`` over the training examples ``ids``, in that order."""
  apply_fn = make_apply_fn(state.model)
  fn = jax.jit(functools.partial(score_fn, apply_fn))
  out = common.map_examples(ctx, ids, lambda b: fn(state.variables, b)).astype(np.float32)
  if not np.all(np.isfinite(out)):
    from prunejax.train import NumericalError
    raise NumericalError(f"non-finite {getattr(score_fn, '__name__', 'score')} for examples "
                         f"{ids[~np.isfinite(out)][:16].tolist()}")
  return out


SCORE_PASS_COST = {"el2n": 1.0, "grand": 3.0}  # example passes per scored example


def static_scores(ctx: common.Context, name: str, r: int, ids: np.ndarray, seed: int
                  ) -> tuple[np.ndarray, float]:
  """Scores of replicate ``r``'s training ids, high = hard. EL2N and GraNd: after ``score_epochs``
  epochs, averaged over ``score_seeds`` seeds (Paul et al. 2021); the others as their functions say.
  Saved to ``workdir/scores`` keyed by id; returns (scores, scoring compute in example passes)."""
  dp = ctx.config.data_pruning
  path = os.path.join(ctx.workdir, "scores", f"{name}_r{r}.npz")
  if os.path.exists(path):
    loaded_ids, loaded = scores_lib.load_scores(path)
    np.testing.assert_array_equal(loaded_ids, ids)
    return loaded[name], float(loaded["compute"][0])
  if name in ("forgetting", "aum"):
    avg, compute = dynamics_scores(ctx, name, ids, seed)
  elif name == "prototypes":
    avg, compute = prototype_scores(ctx, ids, seed)
  elif name == "label_quality":
    avg, compute = label_quality_scores(ctx, ids, seed)
  else:
    fn = {"el2n": scores_lib.el2n, "grand": scores_lib.grand}[name]
    total, compute = np.zeros(len(ids), np.float64), 0.0
    for s in range(dp.score_seeds):
      run = common.train_model(ctx, ids, seed=seed * 1000 + s, epochs=dp.score_epochs,
                               desc=f"score {name} seed {s}")
      total += score_examples(ctx, run.state, ids, fn)
      compute += run.compute + SCORE_PASS_COST[name] * len(ids)
    avg = (total / dp.score_seeds).astype(np.float32)
  if jax.process_index() == 0:
    scores_lib.save_scores(path, ids, **{name: avg, "compute": np.full(len(ids), compute)})
  return avg, compute


def score_based(ctx: common.Context, name: str) -> Rows:
  dp = ctx.config.data_pruning
  cache = {}

  def get(r, ids, seed):
    if r not in cache:
      cache[r] = static_scores(ctx, name, r, ids, seed)
    return cache[r]

  # Label quality removes the probably-mislabeled: it always keeps the most self-confident.
  keep = "easy" if name == "label_quality" else dp.keep

  def kept(r, ids, seed, frac):
    s, _ = get(r, ids, seed)
    return select.select(ids, s, fraction=frac, keep=keep, labels=ctx.ds.train.select(ids).y,
                         class_balanced=dp.class_balanced, offset=dp.offset, seed=seed)

  def scoring_compute(r):
    ids, _, seed = ctx.replicate_split(r)
    return get(r, ids, seed)[1]

  return _subset_runs(ctx, name, kept, scoring_compute=scoring_compute)


# ----------------------------------------------------------------------------------------------
# Iterative data pruning.
# ----------------------------------------------------------------------------------------------


def iterative(ctx: common.Context) -> Rows:
  """Train, score (``iterative.score``), keep the hardest part of the remaining data, retrain from
  scratch; repeat until ``iterative.target_keep`` of the data remains. One row per round."""
  it = ctx.config.iterative
  fn = {"el2n": scores_lib.el2n, "grand": scores_lib.grand}[it.score]
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    kept = ids
    keeps = common.iterative_keeps(it.prune_per_round, it.target_keep)
    scoring = 0.0
    for rnd, target in enumerate(keeps):
      def unit(kept=kept, target=target, rnd=rnd, scoring=scoring):
        run = common.train_model(ctx, kept, seed=seed, epochs=it.score_epochs,
                                 desc=f"iterative score round {rnd} r{r}")
        s = score_examples(ctx, run.state, kept, fn)
        scoring = scoring + run.compute + SCORE_PASS_COST[it.score] * len(kept)
        n_keep = int(round(target * len(ids)))
        new_kept = select.select(kept, s, fraction=n_keep / len(kept), keep="hard", seed=seed)
        common.atomic_save_npz(os.path.join(ctx.workdir, "subsets", f"iterative_round{rnd}_r{r}.npz"),
                               ids=new_kept)
        final = common.train_model(ctx, new_kept, seed=seed, desc=f"iterative round {rnd} r{r}")
        row = common.result_row(ctx, "iterative", r, final, held, fraction_kept=target,
                                round=rnd, scoring_compute=scoring)
        row["kept_ids"] = new_kept.tolist()
        return row
      row = ctx.units.run(f"iterative_round{rnd}_r{r}", unit)
      kept, scoring = np.asarray(row["kept_ids"], np.int64), row["scoring_compute"]
      rows.append({k: v for k, v in row.items() if k != "kept_ids"})
  return rows


# ----------------------------------------------------------------------------------------------
# Scores from training dynamics, embeddings and cross-validation.
# ----------------------------------------------------------------------------------------------


def _track(ctx, state, ids, tracker_state, update):
  """One tracker update per example from the logits of the model after an epoch."""
  apply_fn = make_apply_fn(state.model)
  logits_fn = jax.jit(apply_fn)
  for b in ctx.batches(ids, shuffle=False):
    gb = parallel.shard_batch(b, ctx.mesh)
    tracker_state = update(tracker_state, gb, logits_fn(state.variables, gb["x"]))
  return tracker_state


def dynamics_scores(ctx: common.Context, name: str, ids: np.ndarray, seed: int
                    ) -> tuple[np.ndarray, float]:
  """Forgetting counts or AUM, high = hard, averaged over ``score_seeds`` runs of
  ``forgetting_epochs`` epochs. Each example is presented to the tracker once per epoch, with the
  model at the end of the epoch (Toneva et al. record at every mini-batch; an epoch-end pass costs one
  forward per example and gives every example the same number of presentations)."""
  dp = ctx.config.data_pruning
  tracker = {"forgetting": scores_lib.forgetting, "aum": scores_lib.aum}[name]()
  update = jax.jit(tracker.update)
  total, compute = np.zeros(len(ids), np.float64), 0.0
  for s in range(dp.score_seeds):
    holder = {"state": tracker.init(ids)}

    def on_epoch(epoch, state):
      holder["state"] = _track(ctx, state, ids, holder["state"], update)

    run = common.train_model(ctx, ids, seed=seed * 1000 + s, epochs=dp.forgetting_epochs,
                             desc=f"score {name} seed {s}", on_epoch=on_epoch)
    st = holder["state"]
    raw = np.asarray(st.scores() if name == "forgetting" else -st.mean())  # AUM: low = hard
    order = np.searchsorted(np.asarray(st.ids), ids)  # tracker state is sorted by id
    total += raw[order]
    compute += run.compute + dp.forgetting_epochs * len(ids)
  return (total / dp.score_seeds).astype(np.float32), compute


def prototype_scores(ctx: common.Context, ids: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
  """Distance to the nearest of ``prototypes_k`` k-means centroids of the penultimate features of a
  model trained ``score_epochs`` epochs (Sorscher et al. 2022 use a self-supervised embedding; a
  briefly trained supervised one is the cheap stand-in). High = atypical = hard."""
  dp = ctx.config.data_pruning
  run = common.train_model(ctx, ids, seed=seed * 1000, epochs=dp.score_epochs,
                           desc="score prototypes")
  apply_fn = make_apply_fn(run.state.model)
  feats_fn = jax.jit(lambda v, x: scores_lib.penultimate(apply_fn, v, x)[0])
  emb = common.map_examples(ctx, ids, lambda b: feats_fn(run.state.variables, b["x"]))
  s = scores_lib.prototypes(emb, num_clusters=dp.prototypes_k, key=jax.random.key(seed))
  return np.asarray(s, np.float32), run.compute + len(ids)


def label_quality_scores(ctx: common.Context, ids: np.ndarray, seed: int
                         ) -> tuple[np.ndarray, float]:
  """Self-confidence of out-of-fold predicted probabilities from K-fold training (Northcutt et al.
  2021), as hardness (1 - self-confidence: high = probably mislabeled). Each fold model trains
  ``label_quality_epochs`` epochs."""
  dp = ctx.config.data_pruning
  labels = ctx.ds.train.select(ids).y
  spent = [0.0]

  def fit_predict(train_ids, heldout_ids):
    run = common.train_model(ctx, train_ids, seed=seed, epochs=dp.label_quality_epochs,
                             desc="label quality fold")
    spent[0] += run.compute + len(heldout_ids)
    return common.predict_probs(ctx, run.state, heldout_ids)

  probs = scores_lib.out_of_fold_probs(fit_predict, ids, labels, num_folds=dp.label_quality_folds,
                                       seed=seed)
  issues = scores_lib.find_label_issues(probs, labels)
  path = os.path.join(ctx.workdir, "scores", f"label_issues_seed{seed}.npz")
  if jax.process_index() == 0:
    scores_lib.save_scores(path, ids, probably_mislabeled=issues.astype(np.float32))
  return (1.0 - scores_lib.self_confidence(probs, labels)).astype(np.float32), spent[0]


REGISTRY: dict[str, Callable[[common.Context], Rows]] = {  # completed at the end of the module
    "dense": dense,
    "random": random_static,
    "random_dynamic": lambda ctx: _dynamic(ctx, "random_dynamic"),
    "batch": lambda ctx: _dynamic(ctx, "batch"),
    "semi_batch": lambda ctx: _dynamic(ctx, "semi_batch"),
    **{name: functools.partial(score_based, name=name)
       for name in ("el2n", "grand", "forgetting", "aum", "prototypes", "label_quality")},
    "iterative": iterative,
}


# ----------------------------------------------------------------------------------------------
# Model pruning: IMP with rewinding and its controls, pruning at initialization.
# ----------------------------------------------------------------------------------------------


def imp_sparsities(prune_per_round: float, target: float) -> list[float]:
  """Sparsity after each IMP round: ``1 - (1 - p)^r``, the last round exactly the target."""
  return [round(1 - (1 - prune_per_round) ** r, 6) for r in
          range(1, common.imp_rounds(prune_per_round, target))] + [target]


def _filter_fn(ctx):
  from prunejax import masks
  return masks.make_filter_fn(prune_head=ctx.config.imp.prune_head)


def imp(ctx: common.Context, data_strategy: str | None = None, strategy: str = "imp") -> Rows:
  """Iterative magnitude pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

  Round 0 trains dense and records the rewind point (the weights after ``imp.rewind_step`` steps;
  0 = the initialization). Each round prunes the smallest-magnitude weights of the trained network
  (globally or layer-wise) to the next sparsity of the geometric schedule, rewinds the surviving
  weights and retrains with the mask. The mask, the rewind point and the trained weights of every
  round are checkpointed, so a rerun resumes after the last finished round.
  """
  from prunejax import masks
  cfg = ctx.config.imp
  filter_fn = _filter_fn(ctx)
  sparsities = imp_sparsities(cfg.prune_per_round, cfg.target_sparsity)
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    ckpt = common.RoundCheckpoints(ctx.workdir, f"{strategy}_r{r}")
    init = _init_params(ctx, seed)
    like = {"trained": init, "rewind": init, "mask": masks.ones_mask(init)}
    last, state = ckpt.restore_latest(like)
    missing = [k for k in range(last + 1 if last is not None else 0)
               if ctx.units.get(f"{strategy}_round{k}_r{r}") is None]
    if missing:  # a round's result was lost (a damaged unit file): redo from the round before it
      last = missing[0] - 1 if missing[0] > 0 else None
      state = ckpt.restore(last, like) if last is not None else None
    if last is None:
      run0 = common.train_model(ctx, ids, seed=seed, rewind_step=cfg.rewind_step or None,
                                dynamic_strategy=data_strategy, desc=f"{strategy} dense r{r}")
      rewind = run0.rewind_params if cfg.rewind_step else init
      if rewind is None:
        raise common.ConfigError(f"imp.rewind_step={cfg.rewind_step} is beyond the {run0.steps} "
                                 "steps of a training run")
      ctx.units.run(f"{strategy}_round0_r{r}", lambda: common.result_row(
          ctx, strategy, r, run0, held, sparsity=0.0, round=0, **_data_kept(ctx, run0, ids)))
      state = {"trained": run0.state.params, "rewind": rewind, "mask": like["mask"]}
      ckpt.save(0, state)
      last = 0
    for rnd in range(last + 1, len(sparsities) + 1):
      mask = masks.magnitude(state["trained"], sparsities[rnd - 1], scope=cfg.scope,
                             filter_fn=filter_fn)
      common.save_mask(os.path.join(ctx.workdir, "masks", f"{strategy}_round{rnd}_r{r}.npz"), mask)
      run = common.train_model(ctx, ids, seed=seed, mask=mask, init_params=state["rewind"],
                               dynamic_strategy=data_strategy, desc=f"{strategy} round {rnd} r{r}")
      ctx.units.run(f"{strategy}_round{rnd}_r{r}", lambda: common.result_row(
          ctx, strategy, r, run, held, round=rnd,
          sparsity=float(masks.sparsity_of(mask, filter_fn)), **_data_kept(ctx, run, ids)))
      state = {"trained": run.state.params, "rewind": state["rewind"], "mask": mask}
      ckpt.save(rnd, state)
    ckpt.close()
    rows += [ctx.units.get(f"{strategy}_round{rnd}_r{r}") for rnd in range(len(sparsities) + 1)]
  return rows


def _data_kept(ctx, run, ids) -> dict:
  """The fraction of examples back-propagated (for IMP with online data pruning, ``joint``)."""
  return {"fraction_kept": run.backward / (len(ids) * ctx.config.train.epochs),
          "nominal_fraction": -1.0}


def _init_params(ctx, seed):
  from prunejax.models import init_variables
  return init_variables(ctx.model(), jax.random.key(seed), ctx.x_example)["params"]


def imp_controls(ctx: common.Context, control: str) -> Rows:
  """The controls of Frankle & Carbin (2019) for every IMP round's sparsity.

  ``imp_random_reinit``: the IMP mask of the round, trained from a fresh random initialization.
  ``imp_random_mask``: a random mask with the IMP mask's per-layer sparsities, trained from the
  IMP rewind point. Runs IMP first if it has not run yet.
  """
  from prunejax import masks
  imp(ctx)  # finished rounds are read back from the workdir
  filter_fn = _filter_fn(ctx)
  sparsities = imp_sparsities(ctx.config.imp.prune_per_round, ctx.config.imp.target_sparsity)
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    ckpt = common.RoundCheckpoints(ctx.workdir, f"imp_r{r}")
    init = _init_params(ctx, seed)
    like = {"trained": init, "rewind": init, "mask": masks.ones_mask(init)}
    for rnd in range(1, len(sparsities) + 1):
      def unit(rnd=rnd):
        imp_state = ckpt.restore(rnd, like)
        mask, start = imp_state["mask"], imp_state["rewind"]
        if control == "imp_random_reinit":
          start = _init_params(ctx, seed + 7919)
        else:
          per_layer = layer_sparsity_map(mask, filter_fn)
          mask = masks.random(init, sparsities[rnd - 1], key=jax.random.key(seed + rnd),
                              scope="layerwise", filter_fn=filter_fn, distribution=per_layer)
        run = common.train_model(ctx, ids, seed=seed, mask=mask, init_params=start,
                                 desc=f"{control} round {rnd} r{r}")
        return common.result_row(ctx, control, r, run, held, round=rnd,
                                 sparsity=float(masks.sparsity_of(mask, filter_fn)))
      rows.append(ctx.units.run(f"{control}_round{rnd}_r{r}", unit))
    ckpt.close()
  return rows


def layer_sparsity_map(mask, filter_fn) -> dict[str, float]:
  """``{path: fraction pruned}`` of every prunable leaf of ``mask``."""
  from prunejax.masks import core
  out = {}
  leaves, flags, _ = core.prunable_leaves(mask, filter_fn)
  for path, leaf, flag in zip(core.leaf_paths(mask), leaves, flags):
    if flag:
      out[path] = 1.0 - float(np.mean(np.asarray(leaf)))
  return out


def pai(ctx: common.Context) -> Rows:
  """Pruning at initialization (``pai.methods`` x ``pai.sparsities``), then training to completion.

  SNIP and GraSP score one batch of ``train.batch_size`` training examples (Lee et al. 2019; Wang et al.
  2020); SynFlow is data-free with 100 rounds (Tanaka et al. 2020); magnitude and random prune the
  initial weights.
  """
  from prunejax import masks
  cfg = ctx.config.pai
  filter_fn = _filter_fn(ctx)
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    init = _init_params(ctx, seed)
    model = ctx.model()
    apply_fn = lambda p, x: model.apply({"params": p}, x, train=False)
    score_ids = np.random.default_rng(seed).choice(ids, min(len(ids), ctx.config.train.batch_size),
                                                   replace=False)
    batch = next(data.batches(ctx.ds.train, score_ids, batch_size=len(score_ids), shuffle=False))
    for method in cfg.methods:
      for sp in cfg.sparsities:
        def unit(method=method, sp=sp):
          if method == "magnitude":
            mask = masks.magnitude(init, sp, filter_fn=filter_fn)
          elif method == "random":
            mask = masks.random(init, sp, key=jax.random.key(seed), filter_fn=filter_fn)
          elif method == "snip":
            mask = masks.snip(apply_fn, init, batch, sp, filter_fn=filter_fn)
          elif method == "grasp":
            mask = masks.grasp(apply_fn, init, batch, sp, filter_fn=filter_fn)
          else:
            mask = masks.synflow(apply_fn, init, sp, (1,) + ctx.x_example.shape[1:],
                                 filter_fn=filter_fn)
          common.save_mask(os.path.join(ctx.workdir, "masks", f"pai_{method}_{sp}_r{r}.npz"), mask)
          run = common.train_model(ctx, ids, seed=seed, mask=mask, init_params=init,
                                   desc=f"pai {method} {sp} r{r}")
          return common.result_row(ctx, "pai", r, run, held, method=method,
                                   sparsity=float(masks.sparsity_of(mask, filter_fn)))
        rows.append(ctx.units.run(f"pai_{method}_{sp}_r{r}", unit))
  return rows


REGISTRY.update({
    "imp": imp,
    "imp_random_reinit": lambda ctx: imp_controls(ctx, "imp_random_reinit"),
    "imp_random_mask": lambda ctx: imp_controls(ctx, "imp_random_mask"),
    "pai": pai,
    "joint": lambda ctx: imp(ctx, data_strategy=ctx.config.joint.data, strategy="joint"),
})
