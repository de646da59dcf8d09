"""Lottery tickets: ``imp`` (iterative magnitude pruning with rewinding, any registered mask
method) and its controls ``imp_random_reinit`` and ``imp_random_mask`` (Frankle & Carbin 2019).
"""

from __future__ import annotations

import os

import jax

from experiments import trainer
from experiments.context import Context
from experiments.files import save_mask
from experiments.strategies import base
from experiments.strategies.base import Rows
from experiments.strategies.online_pruning import ONLINE_PRUNERS
from prunejax import masks, online, report, schedules
from prunejax.errors import ConfigError
from prunejax.masks import RewindPoint


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
      raise ConfigError(f"imp.rewind_step={cfg.rewind_step} is beyond the {run0.steps} "
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


def imp(ctx: Context, data_strategy: str | None = None, strategy: str = "imp") -> Rows:
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
  sparsities = schedules.geometric_levels(cfg.prune_per_round, cfg.target_sparsity)
  pruner = ONLINE_PRUNERS[data_strategy](ctx.config) if data_strategy else None
  reps = list(base.replicates(ctx))
  ckpts = {r: _imp_checkpoints(ctx, strategy, r) for r, *_ in reps}
  try:
    last, state = _imp_start(ctx, strategy, reps, ckpts, pruner)
    for rnd in range(1, len(sparsities) + 1):
      todo = [rep for rep in reps if last[rep[0]] < rnd]
      if todo:
        _imp_round(ctx, strategy, rnd, sparsities[rnd - 1], todo, state, ckpts, pruner)
        last.update({r: rnd for r, *_ in todo})
  finally:
    for c in ckpts.values():
      c.close()
  return [ctx.units.get(f"{strategy}_round{rnd}_r{r}") for r, *_ in reps
          for rnd in range(len(sparsities) + 1)]


def _imp_start(ctx, strategy: str, reps, ckpts, pruner) -> tuple[dict, dict]:
  """Each replicate's last finished round and its checkpoint tree: resumed after its own last
  finished round, or round 0 (dense) trained now for the replicates with none, together."""
  last, state = {}, {}
  for r, ids, _, seed in reps:
    init = base.init_params(ctx, seed)
    last[r], state[r] = _imp_resume(ckpts[r], ctx, strategy, r,
                                    _imp_like(ctx, ids, pruner, init))
  fresh = [rep for rep in reps if last[rep[0]] is None]
  if fresh:
    inits = [base.init_params(ctx, seed) for *_, seed in fresh]
    for rep, st in zip(fresh, _imp_round0(ctx, strategy, fresh, pruner, inits)):
      last[rep[0]], state[rep[0]] = 0, st
      ckpts[rep[0]].save(0, st)
  return last, state


def _imp_round(ctx, strategy: str, rnd: int, sparsity: float, todo, state: dict, ckpts,
               pruner) -> None:
  """Round ``rnd`` for the replicates ``todo`` (one program where trainer.train_models can):
  prunes each one's trained weights to ``sparsity`` with ``imp.method``, rewinds and retrains;
  records each one's row and mask, updates ``state`` and saves its round checkpoint."""
  cfg = ctx.config.imp
  filter_fn, method = base.filter_fn(ctx), masks.METHODS[cfg.get("method", "magnitude")]
  mask_of = {r: method.mask(state[r]["trained"], sparsity,
                            base.mask_inputs(ctx, ids, seed + rnd, method.needs),
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
      save_mask(mask_path, mask)  # recorded with the unit: redone if it is damaged
      return trainer.result_row(ctx, strategy, r, run, held, round=rnd,
                                sparsity=float(masks.sparsity_of(mask, filter_fn)),
                                **_data_kept(ctx, run, ids))
    ctx.units.run(f"{strategy}_round{rnd}_r{r}", unit)
    state[r] = {**state[r], "trained": run.state.params, "mask": mask}
    ckpts[r].save(rnd, state[r])


def imp_controls(ctx: Context, control: str) -> Rows:
  """The controls of Frankle & Carbin (2019) for every IMP round's sparsity.

  ``imp_random_reinit``: the IMP mask of the round, trained from a fresh random initialization.
  ``imp_random_mask``: a random mask with the IMP mask's per-layer sparsities, trained from the
  IMP rewind point. Runs IMP first if it has not run yet.
  """
  imp(ctx)  # finished rounds are read back from the workdir
  filter_fn = base.filter_fn(ctx)
  sparsities = schedules.geometric_levels(ctx.config.imp.prune_per_round,
                                          ctx.config.imp.target_sparsity)
  rows = []
  for r, ids, held, seed in base.replicates(ctx):
    ckpt = _imp_checkpoints(ctx, "imp", r)
    init = base.init_params(ctx, seed)
    like = _imp_like(ctx, ids, None, init)
    for rnd in range(1, len(sparsities) + 1):
      def unit(rnd=rnd):
        imp_state = ckpt.restore(rnd, like)
        mask, start = imp_state["mask"], imp_state["rewind"]
        if control == "imp_random_reinit":
          start = base.init_params(ctx, seed + 7919)
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
