"""The strategies an experiment can run, each producing result rows; :data:`REGISTRY` names them.

Data pruning: ``dense`` (full data), ``random`` (a static random subset), a static subset by any
registered score (``el2n``, ``grand``, ``forgetting``, ``aum``, ``prototypes``, ``knn_outlier``,
``label_quality``, ...; ``experiments/scoring.py``), ``semdedup`` (semantic deduplication), the
online pruners of :data:`ONLINE_PRUNERS` (``random_dynamic``, ``batch``, ``semi_batch``),
``rho_loss`` (batch pruning by reducible loss), and ``iterative`` (train, score, prune, retrain). Model pruning: ``imp``
(lottery tickets with rewinding, any registered mask method) and its controls, ``pai`` (pruning at
initialization by any registered mask method). ``joint``: data and weights pruned in the same run.

A strategy's work is split into units (one training run, one round) whose result rows are written
once finished (``prunejax.checkpoint.Units``), so a rerun skips what is done.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import jax
import numpy as np

from experiments import common, scoring, trainer
from prunejax import masks, online, report, schedules, select
from prunejax.masks import RewindPoint

Rows = list[dict]


def _replicates(ctx: common.Context):
  for r in range(ctx.num_replicates):
    yield (r,) + ctx.replicate_split(r)


def baseline_compute(ctx: common.Context) -> float:
  """Compute of one full-data training run (example passes), the unit of every compute ratio."""
  ids, _, _ = ctx.replicate_split(0)
  return 3.0 * len(ids) * ctx.config.train.epochs


# ----------------------------------------------------------------------------------------------
# Full data, online pruning.
# ----------------------------------------------------------------------------------------------

ONLINE_PRUNERS: dict[str, Callable[..., online.OnlinePruner]] = {
    "random_dynamic": lambda cfg: online.RandomSubset(cfg.data_pruning.dynamic_keep),
    "batch": lambda cfg: online.BatchTopK(cfg.batch_pruning.keep_fraction,
                                          cfg.batch_pruning.score, cfg.train.batch_size),
    "semi_batch": lambda cfg: online.InfoBatch(cfg.semi_batch.prune_ratio, cfg.semi_batch.delta),
}
"""The online data pruners by name, built from the config."""


def replica_units(ctx: common.Context, prefix: str, keys: list[str],
                  train: Callable[[list[int], str], list[trainer.Run]],
                  row: Callable[[int, trainer.Run], dict]) -> Rows:
  """Units ``keys`` whose training runs are replicas of one setting: the unfinished ones train
  together (``train(todo, checkpoint_key) -> runs``, one program where
  :func:`trainer.train_models` can) and unit ``keys[j]`` records ``row(j, run)``. A rerun trains
  only the replicas whose unit is not finished; the group's mid-run checkpoint key names them."""
  todo = [j for j, k in enumerate(keys) if ctx.units.get(k) is None]
  # One replica left: its checkpoint is keyed by its unit, as a run of its own always was.
  group_key = keys[todo[0]] if len(todo) == 1 else f"{prefix}_g{'-'.join(map(str, todo))}"
  runs = dict(zip(todo, train(todo, group_key))) if todo else {}
  return [ctx.units.run(k, lambda j=j: row(j, runs[j])) for j, k in enumerate(keys)]


def dense(ctx: common.Context) -> Rows:
  reps = list(_replicates(ctx))
  return replica_units(
      ctx, "dense", [f"dense_r{r}" for r, *_ in reps],
      lambda todo, key: trainer.train_models(ctx, [reps[j][1] for j in todo],
                                             [reps[j][3] for j in todo], desc="dense",
                                             checkpoint=key),
      lambda j, run: trainer.result_row(ctx, "dense", reps[j][0], run, reps[j][2]))


def online_strategy(ctx: common.Context, name: str) -> Rows:
  """Training with the online pruner ``name``; ``fraction_kept`` is the measured fraction of
  examples back-propagated (the nominal one for batch and random pruning)."""
  pruner = ONLINE_PRUNERS[name](ctx.config)
  reps = list(_replicates(ctx))

  def row(j, run):
    r, ids, held, _ = reps[j]
    kept = {"batch": ctx.config.batch_pruning.keep_fraction,
            "random_dynamic": ctx.config.data_pruning.dynamic_keep}.get(
                name, run.backward / (len(ids) * ctx.config.train.epochs))
    return trainer.result_row(ctx, name, r, run, held, fraction_kept=kept, nominal_fraction=-1.0)

  return replica_units(
      ctx, name, [f"{name}_r{r}" for r, *_ in reps],
      lambda todo, key: trainer.train_models(ctx, [reps[j][1] for j in todo],
                                             [reps[j][3] for j in todo], pruner=pruner,
                                             desc=name, checkpoint=key),
      row)


def rho_loss(ctx: common.Context) -> Rows:
  """RHO-LOSS (Mindermann et al. 2022): batch pruning by reducible loss, ``loss - irreducible
  loss``, with the irreducible losses of an IL model that never saw the examples
  (``experiments/scoring.irreducible_losses``); its training counts as scoring compute."""
  rows = []
  cfg = ctx.config
  for r, ids, held, seed in _replicates(ctx):
    def unit(key=f"rho_loss_r{r}"):
      target_ids, il, il_compute = scoring.irreducible_losses(ctx, r, ids, seed)
      pruner = online.BatchTopK(cfg.batch_pruning.keep_fraction, "reducible_loss",
                                cfg.train.batch_size).with_irreducible_loss(target_ids, il)
      run = trainer.train_model(ctx, target_ids, seed=seed, pruner=pruner, desc=f"rho_loss r{r}",
                                checkpoint=key)
      return trainer.result_row(ctx, "rho_loss", r, run, held,
                                fraction_kept=cfg.batch_pruning.keep_fraction,
                                nominal_fraction=-1.0, scoring_compute=il_compute,
                                trained_on=len(target_ids) / len(ids))
    rows.append(ctx.units.run(f"rho_loss_r{r}", unit))
  return rows


# ----------------------------------------------------------------------------------------------
# Static subsets: random and score-based.
# ----------------------------------------------------------------------------------------------


def _per_class_kept(ctx, kept: np.ndarray, ids: np.ndarray) -> list[float]:
  c = ctx.ds.num_classes
  return (np.bincount(ctx.labels(kept), minlength=c)
          / np.maximum(np.bincount(ctx.labels(ids), minlength=c), 1)).round(4).tolist()


def _subset_runs(ctx, strategy: str, kept_fn: Callable[[int, np.ndarray, int, float], np.ndarray],
                 *, scoring_compute: Callable[[int], float] = lambda r: 0.0) -> Rows:
  """Trains on the kept subset for each keep fraction, convention and replicate."""
  rows = []
  dp = ctx.config.data_pruning
  reps = list(_replicates(ctx))
  for frac in dp.keep_fractions:
    for conv in dp.conventions:
      kept = {}

      def epochs_of(j, frac=frac, conv=conv):
        epochs = ctx.config.train.epochs
        if conv == "steps":  # same number of optimizer steps as full data
          epochs = int(round(epochs * len(reps[j][1]) / max(len(kept[j]), 1)))
        return epochs

      def train(todo, key, frac=frac):
        for j in todo:
          r, ids, _, seed = reps[j]
          kept[j] = kept_fn(r, ids, seed, frac)
        by_epochs = {}  # replicas of one program share the number of epochs
        for j in todo:
          by_epochs.setdefault(epochs_of(j), []).append(j)
        runs = {}
        for epochs, js in by_epochs.items():
          got = trainer.train_models(ctx, [kept[j] for j in js], [reps[j][3] for j in js],
                                     epochs=epochs, desc=f"{strategy} keep={frac}",
                                     checkpoint=key if len(by_epochs) == 1 else f"{key}_e{epochs}")
          runs.update(zip(js, got))
        return [runs[j] for j in todo]

      def row(j, run, frac=frac, conv=conv):
        r, ids, held, _ = reps[j]
        common.save_npz(os.path.join(ctx.workdir, "subsets", f"{strategy}_keep{frac}_r{r}.npz"),
                        ids=kept[j])
        return trainer.result_row(ctx, strategy, r, run, held,
                                  fraction_kept=len(kept[j]) / len(ids), nominal_fraction=frac,
                                  convention=conv, scoring_compute=scoring_compute(r),
                                  per_class_kept=_per_class_kept(ctx, kept[j], ids))

      rows += replica_units(ctx, f"{strategy}_keep{frac}_{conv}",
                            [f"{strategy}_keep{frac}_{conv}_r{r}" for r, *_ in reps], train, row)
  return rows


def random_static(ctx: common.Context) -> Rows:
  def kept(r, ids, seed, frac):
    return select.select(ids, np.zeros(len(ids), np.float32), fraction=frac, keep="random",
                         seed=seed)
  return _subset_runs(ctx, "random", kept)


def score_based(ctx: common.Context, name: str) -> Rows:
  """Keeps ``data_pruning.keep`` (hard, easy, random) examples by the score ``name``."""
  dp = ctx.config.data_pruning
  get = functools.lru_cache(maxsize=None)(
      lambda r: scoring.static_scores(ctx, name, r, *_split_and_seed(ctx, r)))
  # Label quality removes the probably-mislabeled: it always keeps the most self-confident.
  # LESS keeps the examples most similar to its target.
  keep = ("easy" if name == "label_quality" else "hard" if name in scoring.similarity.SCORES
          else dp.keep)

  def kept(r, ids, seed, frac):
    return select.select(ids, get(r)[0], fraction=frac, keep=keep, labels=ctx.labels(ids),
                         class_balanced=dp.class_balanced, offset=dp.offset, seed=seed)

  return _subset_runs(ctx, name, kept, scoring_compute=lambda r: get(r)[1])


def semdedup(ctx: common.Context) -> Rows:
  """SemDeDup (Abbas et al. 2023) as a static strategy: at each of ``data_pruning.keep_fractions``
  it removes the most redundant examples (highest similarity to a kept example of their k-means
  cluster), i.e. the threshold ``eps`` is chosen per fraction; the row records ``eps``."""
  from prunejax import dedup
  cfg = ctx.config
  cache = {}

  def result(r, ids, seed):
    if r not in cache:
      emb, compute = scoring.embeddings(ctx, ids, seed, f"semdedup embeddings r{r}")
      res = dedup.semdedup(emb, ids_N=ids, num_clusters=min(cfg.dedup.num_clusters, len(ids)),
                           key=jax.random.key(seed), keep=cfg.dedup.keep)
      common.save_npz(os.path.join(ctx.workdir, "dedup", f"semdedup_r{r}.npz"), ids=res.ids,
                      max_similarity=res.max_similarity, duplicate_of=res.duplicate_of)
      cache[r] = (res, compute)
    return cache[r]

  def kept(r, ids, seed, frac):
    res, _ = result(r, ids, seed)
    n_keep = online.count_of(frac, len(ids))
    order = np.lexsort((res.ids, res.max_similarity))  # least redundant first
    return np.sort(res.ids[order[:n_keep]])

  return _subset_runs(ctx, "semdedup", kept,
                      scoring_compute=lambda r: result(r, *_split_and_seed(ctx, r))[1])


def _split_and_seed(ctx, r):
  ids, _, seed = ctx.replicate_split(r)
  return ids, seed


# ----------------------------------------------------------------------------------------------
# Iterative data pruning.
# ----------------------------------------------------------------------------------------------


def iterative(ctx: common.Context) -> Rows:
  """Train, score (``iterative.score``, any per-batch score), keep the hardest part of the
  remaining data, retrain from scratch; repeat until ``iterative.target_keep`` of the data
  remains (``prunejax.schedules.geometric_levels``). One row per round."""
  it = ctx.config.iterative
  spec = scoring.scores_lib.SCORES[it.score]
  keeps = schedules.geometric_levels(it.prune_per_round, it.target_keep, remaining=True)
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    kept, spent = ids, 0.0
    for rnd, target in enumerate(keeps):
      def unit(kept=kept, target=target, rnd=rnd, spent=spent):
        run = trainer.train_model(ctx, kept, seed=seed, epochs=it.score_epochs,
                                  desc=f"iterative score round {rnd} r{r}")
        hardness = spec.hardness(trainer.score_ids(ctx, run.state, kept, it.score))
        spent = spent + run.compute + spec.passes * len(kept)
        n_keep = online.count_of(target, len(ids))
        new_kept = select.select(kept, hardness, fraction=n_keep / len(kept), keep="hard",
                                 seed=seed)
        common.save_npz(os.path.join(ctx.workdir, "subsets", f"iterative_round{rnd}_r{r}.npz"),
                        ids=new_kept)
        final = trainer.train_model(ctx, new_kept, seed=seed, desc=f"iterative round {rnd} r{r}",
                                    checkpoint=f"iterative_round{rnd}_r{r}")
        row = trainer.result_row(ctx, "iterative", r, final, held, fraction_kept=target,
                                 round=rnd, scoring_compute=spent)
        return {**row, "kept_ids": new_kept.tolist()}
      row = ctx.units.run(f"iterative_round{rnd}_r{r}", unit)
      kept, spent = np.asarray(row["kept_ids"], np.int64), row["scoring_compute"]
      rows.append({k: v for k, v in row.items() if k != "kept_ids"})
  return rows


# ----------------------------------------------------------------------------------------------
# Model pruning: IMP with rewinding and its controls, pruning at initialization.
# ----------------------------------------------------------------------------------------------


def _filter_fn(ctx):
  return masks.make_filter_fn(prune_head=ctx.config.imp.prune_head)


def _init_params(ctx, seed):
  from prunejax.models import init_variables
  variables = ctx.initial_variables(seed) or init_variables(
      ctx.model(), jax.random.key(seed), ctx.preprocess.eval(ctx.x_example))
  return variables["params"]


def _data_kept(ctx, run, ids) -> dict:
  """The fraction of examples back-propagated (for IMP with online data pruning, ``joint``)."""
  return {"fraction_kept": run.backward / (len(ids) * ctx.config.train.epochs),
          "nominal_fraction": -1.0}


def _keeps_optimizer(ctx) -> bool:
  """Whether IMP rounds start from the optimizer state of the rewind step (``imp.reset_optimizer``
  False, ``imp.rewind_step`` > 0) rather than a fresh one."""
  cfg = ctx.config.imp
  return bool(cfg.rewind_step) and not cfg.get("reset_optimizer", True)


def _imp_round0(ctx, strategy, reps, pruner, inits) -> list[dict]:
  """Round 0 of IMP for the replicates ``reps`` (trained together where they can share a program):
  dense training; returns each one's round checkpoint tree."""
  cfg = ctx.config.imp
  runs = trainer.train_models(ctx, [ids for _, ids, _, _ in reps], [seed for *_, seed in reps],
                              rewind_step=cfg.rewind_step or None, pruner=pruner,
                              desc=f"{strategy} dense")
  states = []
  for (r, ids, held, _), run0, init in zip(reps, runs, inits):
    rewind = run0.rewind_point.params if cfg.rewind_step else init
    if run0.rewind_point is None and cfg.rewind_step:
      raise common.ConfigError(f"imp.rewind_step={cfg.rewind_step} is beyond the {run0.steps} "
                               "steps of a training run")
    ctx.units.run(f"{strategy}_round0_r{r}", lambda r=r, run0=run0, held=held, ids=ids:
                  trainer.result_row(ctx, strategy, r, run0, held, sparsity=0.0, round=0,
                                     **_data_kept(ctx, run0, ids)))
    state = {"trained": run0.state.params, "rewind": rewind, "mask": masks.ones_mask(init)}
    if _keeps_optimizer(ctx):
      state["rewind_opt"] = run0.rewind_point.opt_state
    states.append(state)
  return states


def _imp_like(ctx, ids, pruner, init) -> dict:
  """The structure of an IMP round's checkpoint (with the dense optimizer state at the rewind step
  when the rounds keep it)."""
  like = {"trained": init, "rewind": init, "mask": masks.ones_mask(init)}
  if _keeps_optimizer(ctx):
    like["rewind_opt"] = trainer.initial_state(ctx, ids, seed=0, epochs=ctx.config.train.epochs,
                                               pruner=pruner or online.FullData()).opt_state
  return like


def _imp_rewind_point(ctx, state, mask) -> RewindPoint:
  """Where round ``k`` starts: the rewind weights, and the optimizer state of the rewind step
  (wrapped for the masked optimizer) when ``imp.reset_optimizer`` is False."""
  opt_state = None
  if "rewind_opt" in state:
    from prunejax import optim
    opt_state = optim.MaskedState(state["rewind_opt"], mask, jax.numpy.zeros((), jax.numpy.int32))
  return RewindPoint(ctx.config.imp.rewind_step, state["rewind"], opt_state)


def _imp_checkpoints(ctx, strategy: str, r: int):
  from prunejax.checkpoint import RoundCheckpoints
  return RoundCheckpoints(ctx.workdir, f"{strategy}_r{r}", fingerprint=ctx.units.fingerprint)


def _imp_resume(ckpt, ctx, strategy, r, like):
  """The last round whose checkpoint and result both survive, and its state (None, None if none)."""
  last, state = ckpt.restore_latest(like)
  missing = [k for k in range(last + 1 if last is not None else 0)
             if ctx.units.get(f"{strategy}_round{k}_r{r}") is None]
  if missing:  # a round's result was lost (a damaged unit file): redo from the round before it
    last = missing[0] - 1 if missing[0] > 0 else None
    state = ckpt.restore(last, like) if last is not None else None
  return last, state


def imp(ctx: common.Context, data_strategy: str | None = None, strategy: str = "imp") -> Rows:
  """Iterative pruning with rewinding (Frankle & Carbin 2019; Frankle et al. 2020).

  Round 0 trains dense and records the rewind point (the weights after ``imp.rewind_step`` steps;
  0 = the initialization). Each round prunes the trained network with the mask method
  ``imp.method`` (magnitude by default; globally or layer-wise) to the next sparsity of the geometric
  schedule (``prunejax.schedules.geometric_levels``), rewinds the surviving weights
  (``prunejax.masks.rewind``) and retrains with the mask, from a fresh optimizer state or, with
  ``imp.reset_optimizer=False``, from the optimizer state of the rewind step. The mask, the rewind
  point (with that optimizer state) and the trained weights of every round are checkpointed, so a
  rerun resumes after the last finished round.
  """
  cfg = ctx.config.imp
  filter_fn, method = _filter_fn(ctx), masks.METHODS[cfg.get("method", "magnitude")]
  sparsities = schedules.geometric_levels(cfg.prune_per_round, cfg.target_sparsity)
  pruner = ONLINE_PRUNERS[data_strategy](ctx.config) if data_strategy else None
  reps = list(_replicates(ctx))
  ckpts = {r: _imp_checkpoints(ctx, strategy, r) for r, *_ in reps}
  try:
    # Each replicate resumes after its own last finished round; the replicates that are at the same
    # round train it together (one program where trainer.train_models can).
    last, state = {}, {}
    for r, ids, _, seed in reps:
      init = _init_params(ctx, seed)
      last[r], state[r] = _imp_resume(ckpts[r], ctx, strategy, r,
                                      _imp_like(ctx, ids, pruner, init))
    fresh = [rep for rep in reps if last[rep[0]] is None]
    if fresh:
      inits = [_init_params(ctx, seed) for *_, seed in fresh]
      for rep, st in zip(fresh, _imp_round0(ctx, strategy, fresh, pruner, inits)):
        last[rep[0]], state[rep[0]] = 0, st
        ckpts[rep[0]].save(0, st)
    for rnd in range(1, len(sparsities) + 1):
      todo = [rep for rep in reps if last[rep[0]] < rnd]
      if not todo:
        continue
      mask_of = {r: method.mask(state[r]["trained"], sparsities[rnd - 1],
                                _mask_inputs(ctx, ids, seed + rnd, method.needs),
                                scope=cfg.scope, filter_fn=filter_fn)
                 for r, ids, _, seed in todo}
      runs = trainer.train_models(
          ctx, [ids for _, ids, _, _ in todo], [seed for *_, seed in todo],
          masks=[mask_of[r] for r, *_ in todo], pruner=pruner,
          rewind_to=[_imp_rewind_point(ctx, state[r], mask_of[r]) for r, *_ in todo],
          desc=f"{strategy} round {rnd}")
      for (r, ids, held, _), run in zip(todo, runs):
        mask = mask_of[r]
        mask_path = os.path.join(ctx.workdir, "masks", f"{strategy}_round{rnd}_r{r}.npz")

        def unit(mask=mask, run=run, r=r, held=held, ids=ids, mask_path=mask_path):
          common.save_mask(mask_path, mask)  # recorded with the unit: redone if it is damaged
          return trainer.result_row(ctx, strategy, r, run, held, round=rnd,
                                    sparsity=float(masks.sparsity_of(mask, filter_fn)),
                                    **_data_kept(ctx, run, ids))
        ctx.units.run(f"{strategy}_round{rnd}_r{r}", unit)
        state[r] = {**state[r], "trained": run.state.params, "mask": mask}
        last[r] = rnd
        ckpts[r].save(rnd, state[r])
  finally:
    for c in ckpts.values():
      c.close()
  return [ctx.units.get(f"{strategy}_round{rnd}_r{r}") for r, *_ in reps
          for rnd in range(len(sparsities) + 1)]


def _mask_inputs(ctx, ids: np.ndarray, seed: int, needs: tuple[str, ...]) -> masks.MaskInputs:
  """What a mask method needs: a batch of ``train.batch_size`` training examples among ``ids``
  (normalized), an ``apply_fn`` over the params alone, a key, the input shape."""
  inputs = masks.MaskInputs(key=jax.random.key(seed),
                            input_shape=(1,) + ctx.preprocess.eval(ctx.x_example).shape[1:])
  if "apply_fn" in needs:
    inputs.apply_fn = _params_apply_fn(ctx.model())
  if "batch" in needs:
    chosen = np.random.default_rng(seed).choice(ids, min(len(ids), ctx.config.train.batch_size),
                                                replace=False)
    host = next(iter(ctx.batches(chosen, batch_size=len(chosen))))
    inputs.batch = {"x": ctx.preprocess.eval(host["x"]), "y": host["y"], "mask": host["mask"]}
  return inputs


@functools.lru_cache(maxsize=16)
def _params_apply_fn(model):
  return lambda p, x: model.apply({"params": p}, x, train=False)


def imp_controls(ctx: common.Context, control: str) -> Rows:
  """The controls of Frankle & Carbin (2019) for every IMP round's sparsity.

  ``imp_random_reinit``: the IMP mask of the round, trained from a fresh random initialization.
  ``imp_random_mask``: a random mask with the IMP mask's per-layer sparsities, trained from the
  IMP rewind point. Runs IMP first if it has not run yet.
  """
  imp(ctx)  # finished rounds are read back from the workdir
  filter_fn = _filter_fn(ctx)
  sparsities = schedules.geometric_levels(ctx.config.imp.prune_per_round,
                                          ctx.config.imp.target_sparsity)
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    ckpt = _imp_checkpoints(ctx, "imp", r)
    init = _init_params(ctx, seed)
    like = _imp_like(ctx, ids, None, init)
    for rnd in range(1, len(sparsities) + 1):
      def unit(rnd=rnd):
        imp_state = ckpt.restore(rnd, like)
        mask, start = imp_state["mask"], imp_state["rewind"]
        if control == "imp_random_reinit":
          start = _init_params(ctx, seed + 7919)
        else:
          layers = report.sparsity_report(mask, mask, filter_fn)["layers"]
          mask = masks.random(init, sparsities[rnd - 1], key=jax.random.key(seed + rnd),
                              scope="layerwise", filter_fn=filter_fn,
                              distribution={p: v["sparsity"] for p, v in layers.items()})
        run = trainer.train_model(ctx, ids, seed=seed, mask=mask,
                                  rewind_to=RewindPoint(0, start),
                                  desc=f"{control} round {rnd} r{r}")
        return trainer.result_row(ctx, control, r, run, held, round=rnd,
                                  sparsity=float(masks.sparsity_of(mask, filter_fn)))
      rows.append(ctx.units.run(f"{control}_round{rnd}_r{r}", unit))
    ckpt.close()
  return rows


def pai(ctx: common.Context) -> Rows:
  """Pruning at initialization by the mask methods ``pai.methods`` at ``pai.sparsities``, then
  training to completion. SNIP and GraSP score one batch of ``train.batch_size`` training examples
  (Lee et al. 2019; Wang et al. 2020); SynFlow is data-free with 100 rounds (Tanaka et al. 2020);
  magnitude and random prune the initial weights."""
  cfg = ctx.config.pai
  filter_fn = _filter_fn(ctx)
  rows = []
  for r, ids, held, seed in _replicates(ctx):
    init = _init_params(ctx, seed)
    for name in cfg.methods:
      for sp in cfg.sparsities:
        def unit(name=name, sp=sp):
          method = masks.METHODS[name]
          mask = method.mask(init, sp, _mask_inputs(ctx, ids, seed, method.needs),
                             filter_fn=filter_fn)
          common.save_mask(os.path.join(ctx.workdir, "masks", f"pai_{name}_{sp}_r{r}.npz"), mask)
          run = trainer.train_model(ctx, ids, seed=seed, mask=mask, rewind_to=RewindPoint(0, init),
                                    desc=f"pai {name} {sp} r{r}")
          return trainer.result_row(ctx, "pai", r, run, held, method=name, nominal_sparsity=sp,
                                    sparsity=float(masks.sparsity_of(mask, filter_fn)))
        rows.append(ctx.units.run(f"pai_{name}_{sp}_r{r}", unit))
  return rows


# ----------------------------------------------------------------------------------------------
# Post-training pruning: magnitude, Wanda and SparseGPT on a trained model, no retraining.
# ----------------------------------------------------------------------------------------------

POST_TRAINING_METHODS = ("magnitude", "wanda", "sparsegpt")
CALIBRATION_SETS = ("random", "el2n_hard", "el2n_easy")


def _pt_trained(ctx, r: int, ids, held, seed: int):
  """The trained dense model of replicate ``r`` (trained once, then restored from its checkpoint)
  and its ``dense`` row, which the ``dense`` strategy shares (same seed, same run)."""
  from prunejax.checkpoint import RoundCheckpoints
  from prunejax import online, parallel
  ckpt = RoundCheckpoints(ctx.workdir, f"post_training_r{r}")
  dense_row = ctx.units.get(f"dense_r{r}")
  init = _init_params(ctx, seed)
  saved = ckpt.restore_latest({"trained": init})[1] if dense_row is not None else None
  if saved is None:
    run = trainer.train_model(ctx, ids, seed=seed, desc=f"post_training dense r{r}",
                              checkpoint=f"post_training_r{r}")
    dense_row = ctx.units.run(f"dense_r{r}", lambda: trainer.result_row(ctx, "dense", r, run,
                                                                        held))
    ckpt.save(0, {"trained": run.state.params})
    state = run.state
  else:
    state = trainer.initial_state(ctx, ids, seed=seed, epochs=ctx.config.train.epochs,
                                  pruner=online.FullData())
    state = state.replace(params=parallel.replicate(saved["trained"], ctx.mesh))
  ckpt.close()
  return state, dense_row


def _pt_calibration_sets(ctx, r: int, ids, seed: int, state) -> dict:
  """Calibration set name -> (ids, scoring compute): ``post_training.calibration_size`` training
  examples, random or the hardest / easiest by the trained model's EL2N; saved by id."""
  cfg = ctx.config.post_training
  n = min(cfg.calibration_size, len(ids))
  out, el2n = {}, None
  for name in cfg.calibration:
    if name == "random":
      chosen, cost = np.sort(np.random.default_rng(seed).choice(ids, n, replace=False)), 0.0
    else:
      if el2n is None:
        el2n = trainer.score_ids(ctx, state, ids, "el2n")
      chosen = select.select(ids, el2n, fraction=n / len(ids),
                             keep="hard" if name == "el2n_hard" else "easy")
      cost = float(len(ids))  # one forward pass over the training examples
    common.save_npz(os.path.join(ctx.workdir, "calibration", f"{name}_r{r}.npz"), ids=chosen)
    out[name] = (chosen, cost)
  return out


@functools.lru_cache(maxsize=16)
def _pt_apply_fn(model, preprocess):
  return lambda p, x: model.apply({"params": p}, preprocess.eval(x), train=False)


@functools.lru_cache(maxsize=4)
def _pt_token_mask(pad_id: int):
  return lambda x: x != pad_id


def _pt_label(method: str, sparsity, calibration: str | None) -> tuple[str, float]:
  """(method label, nominal sparsity) of a row; ``N:M`` keeps ``N`` of ``M``."""
  nm = isinstance(sparsity, str) and ":" in sparsity
  label = method + (f" {sparsity}" if nm else "")
  if calibration is not None:
    label += f" ({calibration} calibration)"
  nominal = 1 - int(sparsity.split(":")[0]) / int(sparsity.split(":")[1]) if nm else sparsity
  return label, float(nominal)


def _pt_prune(ctx, state, method: str, sparsity, calib_ids, filter_fn):
  """(mask, pruned params, calibration passes) of one method on the trained params."""
  from prunejax.masks import posttraining as pt
  cfg, params = ctx.config.post_training, state.params
  if method == "magnitude":
    if isinstance(sparsity, str):
      n, m = (int(v) for v in sparsity.split(":"))
      mask = masks.n_m(params, n, m, filter_fn=filter_fn)
    else:
      mask = masks.magnitude(params, sparsity, scope="layerwise", filter_fn=filter_fn)
    return mask, masks.apply_mask(params, mask), 0.0
  apply_fn = _pt_apply_fn(state.model, ctx.preprocess)
  batches = list(ctx.batches(calib_ids, batch_size=cfg.batch_size))
  pad = ctx.ds.meta.get("pad_id") if ctx.ds.meta else None
  kw = dict(sequential=cfg.sequential, filter_fn=filter_fn, mesh=ctx.mesh,
            token_mask_fn=None if pad is None else _pt_token_mask(int(pad)))
  layers = pt.linear_layers(apply_fn, params, batches[0]["x"], filter_fn=filter_fn)
  passes = pt.sequential_passes(layers, cfg.sequential)
  if method == "wanda":
    mask = pt.wanda(apply_fn, params, batches, sparsity, scope=cfg.wanda_scope, **kw)
    return mask, masks.apply_mask(params, mask), float(passes * len(calib_ids))
  mask, new = pt.sparsegpt(apply_fn, params, batches, sparsity, scope=cfg.sparsegpt_scope,
                           blocksize=cfg.blocksize, damp=cfg.damp, **kw)
  return mask, new, float(passes * len(calib_ids))


def _pt_unit(ctx, r, held, state, dense_row, method, sparsity, calibration, calib, err_batches):
  """One pruned model: its test accuracy, sparsity, cost and per-layer reconstruction errors."""
  import dataclasses
  import time
  from prunejax import parallel
  from prunejax.masks import posttraining as pt
  cfg = ctx.config.post_training
  filter_fn = masks.make_filter_fn(prune_head=cfg.prune_head, embeddings=False)
  calib_ids, select_cost = calib.get(calibration, (None, 0.0))
  t0 = time.perf_counter()
  mask, new, passes = _pt_prune(ctx, state, method, sparsity, calib_ids, filter_fn)
  jax.block_until_ready(new)
  seconds = time.perf_counter() - t0
  label, nominal = _pt_label(method, sparsity, calibration)
  common.save_mask(os.path.join(ctx.workdir, "masks", f"post_training_{method}_{sparsity}_"
                                f"{calibration or 'none'}_r{r}.npz".replace(":", "of")),
                    mask)
  errors = pt.layer_errors(_pt_apply_fn(state.model, ctx.preprocess), state.params, new,
                           err_batches, filter_fn=filter_fn, mesh=ctx.mesh,
                           token_mask_fn=_pt_token_mask(int(ctx.ds.meta["pad_id"]))
                           if ctx.ds.meta and "pad_id" in ctx.ds.meta else None)
  run = trainer.Run(state.replace(params=parallel.replicate(new, ctx.mesh)),
                    forward=dense_row["forward_examples"], backward=dense_row["backward_examples"],
                    steps=dense_row["steps"], wall=dense_row["wall_time"] + seconds)
  return trainer.result_row(
      ctx, "post_training", r, run, held, method=label, nominal_sparsity=nominal,
      sparsity=float(masks.sparsity_of(mask, filter_fn)), calibration=calibration or "none",
      scoring_compute=passes + select_cost, pruning_seconds=seconds, layer_errors=errors,
      mean_layer_error=float(np.mean(list(errors.values()))))


def _pt_keys(ctx, r: int) -> list[tuple]:
  cfg = ctx.config.post_training
  return [(m, sp, c, f"post_training_{m}_{sp}_{c or 'none'}_r{r}")
          for m in cfg.methods for sp in cfg.sparsities
          for c in ((None,) if m == "magnitude" else cfg.calibration)]


def post_training(ctx: common.Context) -> Rows:
  """Post-training pruning without retraining (``prunejax.masks.posttraining``).

  Per replicate: trains the dense model once (``model.checkpoint_dir`` fine-tunes a pretrained
  GPT-2), then prunes the trained weights at each of ``post_training.sparsities`` (fractions or
  ``"N:M"``) by magnitude (per layer; N:M per block), Wanda (``wanda_scope``, per output row by
  default) and SparseGPT (``sparsegpt_scope``, per layer), the latter two calibrated on each of
  ``post_training.calibration``: ``calibration_size`` random training examples, or the hardest
  or easiest by the trained model's EL2N (the ids are saved under ``calibration/``). Each row has
  the test accuracy of the pruned model, its sparsity, the calibration passes as scoring compute
  and every layer's relative reconstruction error on ``error_size`` random test examples
  (``layer_errors``); ``post_training.md`` tabulates them over replicates.
  """
  cfg = ctx.config.post_training
  rows, own_dense = [], "dense" not in ctx.config.strategies
  for r, ids, held, seed in _replicates(ctx):
    keys = _pt_keys(ctx, r)
    if ctx.units.get(f"dense_r{r}") is None or any(ctx.units.get(k[-1]) is None for k in keys):
      state, dense_row = _pt_trained(ctx, r, ids, held, seed)
      calib = _pt_calibration_sets(ctx, r, ids, seed, state)
      err_ids = np.sort(np.random.default_rng(seed).choice(
          ctx.ds.test.ids, min(cfg.error_size, len(ctx.ds.test)), replace=False))
      common.save_npz(os.path.join(ctx.workdir, "calibration", f"error_ids_r{r}.npz"), ids=err_ids)
      err_batches = list(ctx.batches(err_ids, split="test", batch_size=cfg.batch_size))
      for method, sp, c, key in keys:
        ctx.units.run(key, lambda m=method, sp=sp, c=c: _pt_unit(
            ctx, r, held, state, dense_row, m, sp, c, calib, err_batches))
    rows += [ctx.units.get(f"dense_r{r}")] if own_dense else []
    rows += [ctx.units.get(k[-1]) for k in keys]
  _pt_write_table(ctx, rows)
  return rows


def _pt_write_table(ctx: common.Context, rows: Rows) -> None:
  """``post_training.md``: per method, sparsity and calibration set, the test accuracy (mean +-
  std over replicates), its paired drop from dense, and the mean and largest layer error."""
  from prunejax.fileio import atomic_write_text
  dense = {r: ctx.units.get(f"dense_r{r}")["test_accuracy"] for r in range(ctx.num_replicates)}
  groups: dict = {}
  for row in rows:
    if row["strategy"] == "post_training":
      groups.setdefault((row["method"], row["nominal_sparsity"]), []).append(row)
  lines = ["| method | sparsity | test acc % | loss vs dense (points) | mean layer error | "
           "max layer error | n |", "|---|---|---|---|---|---|---|"]
  for (method, sp), rs in groups.items():
    acc = np.array([x["test_accuracy"] for x in rs]) * 100
    drop = np.array([100 * (dense[x["replicate"]] - x["test_accuracy"]) for x in rs
                     if x["replicate"] in dense])
    err = np.array([x["mean_layer_error"] for x in rs])
    worst = max(max(x["layer_errors"].values()) for x in rs)
    sd = lambda v: f" +- {v.std(ddof=1):.2f}" if len(v) > 1 else ""
    lines.append(f"| {method} | {sp:g} | {acc.mean():.2f}{sd(acc)} | "
                 f"{drop.mean():.2f}{sd(drop) if len(drop) else ''} | {err.mean():.4f} | "
                 f"{worst:.4f} | {len(rs)} |")
  if jax.process_index() == 0:
    atomic_write_text(os.path.join(ctx.workdir, "post_training.md"), "\n".join(lines) + "\n")


REGISTRY: dict[str, Callable[[common.Context], Rows]] = {
    "dense": dense,
    "random": random_static,
    **{name: functools.partial(online_strategy, name=name) for name in ONLINE_PRUNERS},
    "rho_loss": rho_loss,
    "semdedup": semdedup,
    **{name: functools.partial(score_based, name=name) for name in scoring.STATIC_SCORES},
    "iterative": iterative,
    "imp": imp,
    "imp_random_reinit": functools.partial(imp_controls, control="imp_random_reinit"),
    "imp_random_mask": functools.partial(imp_controls, control="imp_random_mask"),
    "pai": pai,
    "joint": lambda ctx: imp(ctx, data_strategy=ctx.config.joint.data, strategy="joint"),
    "post_training": post_training,
}
"""Every strategy by the name configs use."""
