"""The one trainer of the experiments, composed from library pieces, and the passes around it.

:func:`train_model` builds a train state (fresh, or rewound with :func:`prunejax.masks.rewind`), then
for each epoch asks the online pruner (:mod:`prunejax.online`) for the epoch's plan, streams its
batches through :func:`prunejax.data.batches` and runs :func:`prunejax.train.run_epoch`. With a
``checkpoint`` key it saves the run mid-way (:class:`prunejax.checkpoint.RunCheckpoint`) and a rerun
resumes at the batch where it stopped. Compute is counted in example passes (forward 1, backward 2).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments import fused_loop, slices
from prunejax import online, parallel, train
from prunejax.checkpoint import interrupted_at_step, stop_at_step
from prunejax.errors import ConfigError
from prunejax.masks import RewindPoint, apply_mask, rewind, save_rewind_point
from prunejax.scores import jit_score, map_batches, score_dataset


@dataclasses.dataclass
class Run:
  """A finished training run: its state and what it cost (in example passes: forward 1, backward 2)."""

  state: train.TrainState
  forward: float = 0.0
  backward: float = 0.0
  steps: int = 0
  wall: float = 0.0
  rewind_point: RewindPoint | None = None
  corrupted: float = 0.0  # back-propagated examples whose label was corrupted (label noise)
  history: list = dataclasses.field(default_factory=list)  # per epoch: train loss and accuracy
  first_step_end: float | None = None  # perf_counter after the first step (compile included)
  eval_seconds: float = 0.0  # per-epoch evaluation (train.eval_every_epoch): outside the wall time
  clock: Callable[[], float] | None = None  # the training loop's seconds so far (what wall counts)

  @property
  def compute(self) -> float:
    return self.forward + 2.0 * self.backward

  def add_epoch(self, epoch: int, metrics: dict | None, steps: int) -> None:
    self.steps += steps
    if metrics is None:
      return
    m = train.summarize(metrics)
    self.forward += m["forward_count"]
    self.backward += m["count"]
    self.corrupted += m.get("corrupted", 0.0)
    self.history.append({"epoch": epoch, "loss": m["loss"], "accuracy": m["accuracy"]})


@functools.lru_cache(maxsize=64)
def _optimizer(cfg_json: str, steps_per_epoch: int, epochs: int, masked: bool,
               traced: bool = False):
  """One optimizer object per (config, schedule length, masked): runs that share it share the
  compiled train step (the optimizer is a static part of the state; the mask lives in its state).
  ``traced``: the schedule's length lives in the optimizer state (the fused path), so runs of any
  length share one optimizer; ``steps_per_epoch`` and ``epochs`` are then 0."""
  tx = train.make_optimizer(ml_collections.ConfigDict(json.loads(cfg_json)), steps_per_epoch, epochs,
                            traced_schedule=traced)
  if masked:
    from prunejax import optim
    tx = optim.masked(tx)
  return tx


def _copy(tree):
  # Steps donate the state's buffers: copy what the caller passed in so it stays usable.
  return None if tree is None else jax.tree.map(lambda a: jnp.array(a, copy=True), tree)


def initial_state(ctx, ids: np.ndarray, *, seed: int, epochs: int, pruner: online.OnlinePruner,
                  mask: Any = None, rewind_to: RewindPoint | None = None,
                  model_overrides: dict | None = None) -> train.TrainState:
  """A fresh train state, or the rewind point's weights with ``mask`` (and the optimizer state
  ``imp.reset_optimizer`` asks for), replicated over the mesh. ``model_overrides`` change fields
  of the config's model (e.g. a smaller irreducible-loss model), always freshly initialized."""
  cfg = ctx.config
  steps = pruner.steps_per_epoch(len(ids), cfg.train.batch_size)
  traced = ctx.device_data() is not None
  tx = _optimizer(json.dumps(cfg.optimizer.to_dict(), sort_keys=True, default=str),
                  0 if traced else steps, 0 if traced else epochs, mask is not None, traced)
  variables = None if model_overrides else ctx.initial_variables(seed)
  state = train.create_train_state(ctx.model(**(model_overrides or {})), tx, jax.random.key(seed),
                                   ctx.x_example, ctx.preprocess, variables,
                                   accumulation_steps=cfg.train.get("accumulation_steps", 1),
                                   loss_scale=cfg.train.get("loss_scale", 1.0))
  mask = _copy(mask)
  if mask is not None and jax.tree.structure(mask) != jax.tree.structure(state.params):
    raise ConfigError(f"mask structure {jax.tree.structure(mask)} does not match the params "
                      f"{jax.tree.structure(state.params)}")
  if rewind_to is not None:
    point = RewindPoint(rewind_to.step, _copy(rewind_to.params), _copy(rewind_to.opt_state))
    params, opt_state = rewind(point, mask if mask is not None else _ones(point.params), tx,
                               state.opt_state,
                               reset_optimizer=bool(cfg.imp.get("reset_optimizer", True))
                               or point.opt_state is None)
    state = state.replace(params=params, opt_state=opt_state)
  elif mask is not None:
    from prunejax import optim
    state = state.replace(params=apply_mask(state.params, mask),
                          opt_state=optim.set_mask(state.opt_state, mask))
  if traced:
    state = state.replace(opt_state=train.set_schedule(state.opt_state, cfg.optimizer, steps,
                                                       epochs))
  return parallel.replicate(state, ctx.mesh)


def _ones(params):
  from prunejax.masks import ones_mask
  return ones_mask(params)


class _Checkpointing(fused_loop.Cadence):
  """Mid-run checkpoints of one training run on the host loop (cadence: :class:`Cadence`).

  The saved tree holds the train and pruner states, the epoch's plan, the epoch's partial metric
  sums and the rewind point once recorded; ``meta`` the position (epoch, next batch) and the
  counters of the finished epochs.
  """

  def __init__(self, ctx, key: str | None):
    super().__init__(ctx, key)
    self.mesh = ctx.mesh

  def save(self, run: Run, state, pstate, plan: online.EpochPlan, metrics, epoch: int,
           next_batch: int, global_step: int) -> None:
    tree = {"state": state, "pruner": pstate, "plan_ids": plan.ids, "plan": plan.columns,
            "metrics": metrics, "rewind": _rewind_tree(run.rewind_point)}
    meta = {"epoch": epoch, "next_batch": next_batch, "steps": global_step,
            "forward": run.forward, "backward": run.backward, "history": run.history,
            "plan_len": len(plan.ids), "plan_columns": sorted(plan.columns),
            "metric_keys": sorted(metrics), "rewind_step": None if run.rewind_point is None
            else int(run.rewind_point.step)}
    self.ckpt.save(tree, meta)
    self.last = time.monotonic()

  def resume(self, run: Run, state, pstate):
    """(state, pruner state, epoch, next batch, plan, metrics) of a saved run, or None; restores
    the counters of ``run``."""
    meta = self.ckpt.meta() if self.ckpt is not None else None
    if meta is None:
      return None
    got = self.ckpt.restore(fused_loop.checkpoint_like(state, pstate, meta, (meta["plan_len"],),
                                                       ()))
    if got is None:
      return None
    tree, meta = got
    run.forward, run.backward, run.steps = meta["forward"], meta["backward"], meta["steps"]
    run.history = meta["history"]
    if meta["rewind_step"] is not None:
      run.rewind_point = RewindPoint(meta["rewind_step"], tree["rewind"]["params"],
                                     tree["rewind"]["opt_state"])
    state = parallel.replicate(tree["state"], self.mesh)
    plan = online.EpochPlan(np.asarray(tree["plan_ids"]), dict(tree["plan"]))
    return state, parallel.replicate(tree["pruner"], self.mesh), meta["epoch"], \
        meta["next_batch"], plan, jax.tree.map(jnp.asarray, tree["metrics"])


def _with_corrupted(ctx, plan: online.EpochPlan) -> online.EpochPlan:
  """Under label noise, marks the plan's examples whose label was corrupted (a ``corrupted``
  column), so the steps count how many of them are back-propagated."""
  if ctx.corrupted_ids is None:
    return plan
  flags = np.isin(plan.ids, ctx.corrupted_ids).astype(np.float32)
  return online.EpochPlan(plan.ids, {**plan.columns, "corrupted": flags})


def _rewind_tree(point: RewindPoint | None) -> dict:
  return {} if point is None else {"params": point.params, "opt_state": point.opt_state}


def train_model(ctx, ids: np.ndarray, *, seed: int, epochs: int | None = None,
                pruner: online.OnlinePruner | None = None, mask: Any = None,
                rewind_to: RewindPoint | None = None, rewind_step: int | None = None,
                desc: str = "train", checkpoint: str | None = None,
                on_epoch: Callable[[int, train.TrainState], None] | None = None,
                model_overrides: dict | None = None) -> Run:
  """Trains a fresh model (or one rewound to ``rewind_to``) on the examples ``ids``.

  Args:
    ctx: the experiment context.
    ids: training example ids.
    seed: seeds the initialization, the order of the batches, augmentation and random pruning.
    epochs: defaults to ``config.train.epochs``.
    pruner: the online data pruner (default: every example every epoch).
    mask: a weight mask; training keeps the masked weights at exactly zero.
    rewind_to: start from this rewind point's weights (IMP) instead of a fresh initialization.
    rewind_step: record the rewind point after this many steps (``Run.rewind_point``).
    desc: names the run in progress bars and errors.
    checkpoint: a key under which the run is checkpointed mid-way (``train.checkpoint_*``), so that
      an interrupted run resumes at the batch where it stopped.
    on_epoch: called after each epoch with (epoch, state), e.g. to record training dynamics.
    model_overrides: fields of the config's model to change for this run.
  """
  cfg = ctx.config
  epochs = epochs or cfg.train.epochs
  pruner = pruner or online.FullData()
  ids = np.asarray(ids, np.int64)
  if ctx.device_data() is not None:
    return train_models(ctx, [ids], [seed], epochs=epochs, pruner=pruner, masks=[mask],
                        rewind_to=[rewind_to], rewind_step=rewind_step, desc=desc,
                        checkpoint=checkpoint, on_epoch=on_epoch,
                        model_overrides=model_overrides)[0]
  state = initial_state(ctx, ids, seed=seed, epochs=epochs, pruner=pruner, mask=mask,
                        rewind_to=rewind_to, model_overrides=model_overrides)
  pstate = parallel.replicate(pruner.init(ids), ctx.mesh)
  run, ck = Run(state), _Checkpointing(ctx, checkpoint)
  resumed = ck.resume(run, state, pstate)
  start_epoch = resumed[2] if resumed else 0
  step = pruner.step()
  t0 = time.perf_counter()
  run.clock = lambda: time.perf_counter() - (run.first_step_end or t0)
  on_epoch = with_epoch_eval(ctx, run, on_epoch)
  bar = _progress(cfg, desc, epochs, start_epoch)
  for epoch in range(start_epoch, epochs):
    if resumed and epoch == start_epoch:
      state, pstate, _, start, plan, metrics = resumed
    else:
      plan, start, metrics = _with_corrupted(ctx, pruner.plan(
          pstate, ids, seed=seed, epoch=epoch, num_epochs=epochs)), 0, None
    batches = ctx.batches(plan.ids, batch_size=cfg.train.batch_size, seed=seed, epoch=epoch,
                          shuffle=True, columns=plan.columns, start=start)
    hook = _after_step(run, ck, rewind_step, epoch, start, plan)
    res = train.run_epoch(state, batches, step, ctx.mesh, pruner_state=pstate, metrics=metrics,
                          desc=f"{desc}, epoch {epoch}", after_step=hook)
    state, pstate = res.state, res.pruner_state
    run.add_epoch(epoch, res.metrics, res.steps)
    _postfix(bar, run)
    if on_epoch is not None:
      on_epoch(epoch, state)
  return _finished(run, state, ck, t0)


def _finished(run: Run, state: train.TrainState, ck: _Checkpointing, t0: float) -> Run:
  """``run`` with its final state and wall time, once the device is done; its mid-run checkpoint
  is dropped."""
  jax.block_until_ready(state.params)
  # Wall time of the steps after the first: the first step of a run pays for compilation when no
  # earlier run compiled the same program, which would make the first strategy look slow.
  run.wall = time.perf_counter() - (run.first_step_end or t0) - run.eval_seconds
  run.state = state
  ck.finish()
  return run


def with_epoch_eval(ctx, run: Run, on_epoch: Callable | None) -> Callable | None:
  """``on_epoch`` that, with ``train.eval_every_epoch``, first adds to the epoch's history entry
  the test accuracy and the training seconds and steps so far (``train_seconds``, ``steps``): the
  report's time to dense accuracy. The device is waited on and the evaluation is outside the
  clock (``run.eval_seconds`` leaves the wall time), so the figures are the training's own."""
  if not ctx.config.train.get("eval_every_epoch", False):
    return on_epoch
  before = []  # training seconds of a resumed run's earlier process (from its saved history)

  def hook(epoch: int, state: train.TrainState) -> None:
    jax.block_until_ready(state.params)
    t = time.perf_counter()
    if not run.history or run.history[-1]["epoch"] != epoch:  # an epoch without steps
      run.history.append({"epoch": epoch})
    if not before:
      before.append(max([h.get("train_seconds", 0.0) for h in run.history[:-1]], default=0.0))
    seconds = before[0] + run.clock() - run.eval_seconds
    run.history[-1].update(test_accuracy=evaluate(ctx, state), train_seconds=seconds,
                           steps=run.steps)
    run.eval_seconds += time.perf_counter() - t
    if on_epoch is not None:
      on_epoch(epoch, state)
  return hook


def groupable(ctx, sizes: list[int], pruner: online.OnlinePruner | None = None) -> bool:
  """Whether runs on ``sizes`` examples each can train as replicas of one program: the fused path
  applies, ``train.vmap_replicas`` is on, and they share the number of steps per epoch (so the
  optimizer and its schedule) and a pruner whose epochs have a fixed length (InfoBatch's do not).
  ``train.vmap_replicas="auto"`` groups on accelerators and not on CPU, where R replicas in one
  program ran slower than R runs one after another (batched matmuls and grouped convolutions)."""
  pruner = pruner or online.FullData()
  cfg = ctx.config
  vmap = {"on": True, "off": False,  # "auto": measured slower than one run after another on CPU
          "auto": jax.default_backend() != "cpu"}[cfg.train.get("vmap_replicas", "auto")]
  return (len(sizes) > 1 and ctx.device_data() is not None and vmap
          and not cfg.train.get("eval_every_epoch", False)  # evaluated one run at a time
          and pruner.fixed_epoch_length
          and len({pruner.steps_per_epoch(n, cfg.train.batch_size) for n in sizes}) == 1)


def train_models(ctx, ids_list: list[np.ndarray], seeds: list[int], *, epochs: int | None = None,
                 pruner: online.OnlinePruner | None = None, masks: list | None = None,
                 rewind_to: list | None = None, rewind_step: int | None = None,
                 desc: str = "train", checkpoint: str | None = None,
                 on_epoch: Callable[[int, train.TrainState], None] | None = None,
                 model_overrides: dict | None = None) -> list[Run]:
  """:func:`train_model` for several runs at once (replicates, score seeds, IMP seeds): one
  ``vmap``-ed program on the device-resident split when :func:`groupable`, else one after another.
  ``masks`` and ``rewind_to`` give each run its own (default: none); ``checkpoint`` keys the
  group's mid-run checkpoint; ``on_epoch`` is for single runs."""
  cfg = ctx.config
  epochs = epochs or cfg.train.epochs
  pruner = pruner or online.FullData()
  n = len(ids_list)
  masks, rewind_to = masks or [None] * n, rewind_to or [None] * n
  ids_list = [np.asarray(i, np.int64) for i in ids_list]
  data = ctx.device_data()
  if data is None or (n > 1 and not groupable(ctx, [len(i) for i in ids_list], pruner)):
    return [train_model(ctx, i, seed=s, epochs=epochs, pruner=pruner, mask=m, rewind_to=w,
                        rewind_step=rewind_step, desc=f"{desc} [{j}]" if n > 1 else desc,
                        checkpoint=checkpoint and (f"{checkpoint}_{j}" if n > 1 else checkpoint),
                        on_epoch=on_epoch, model_overrides=model_overrides)
            for j, (i, s, m, w) in enumerate(zip(ids_list, seeds, masks, rewind_to))]
  if n > 1 and on_epoch is not None:
    raise ValueError("on_epoch is for single runs; train the replicas one by one")
  states = [initial_state(ctx, i, seed=s, epochs=epochs, pruner=pruner, mask=m, rewind_to=w,
                          model_overrides=model_overrides)
            for i, s, m, w in zip(ids_list, seeds, masks, rewind_to)]
  tc = cfg.train
  ck = fused_loop.FusedCheckpoint(ctx, checkpoint)
  runs = [Run(s) for s in states]
  if n == 1:
    on_epoch = with_epoch_eval(ctx, runs[0], on_epoch)
  finals, points = fused_loop.run_fused(
      data=data, index=ctx.ds.train.index, ids_list=ids_list, seeds=list(seeds), epochs=epochs,
      pruner=pruner, states=states, runs=runs, batch_size=cfg.train.batch_size,
      steps_per_dispatch=int(tc.get("steps_per_dispatch", 0)),
      epoch_steps=-(-len(ctx.ds.train) // cfg.train.batch_size), checkpoint=ck,
      rewind_step=rewind_step, desc=desc, mark=lambda plan: _with_corrupted(ctx, plan),
      mesh=ctx.mesh, on_epoch=on_epoch)
  for run, state, point in zip(runs, finals, points):
    run.state, run.rewind_point = state, point
  ck.finish()
  return runs


def _after_step(run: Run, ck: _Checkpointing, rewind_step, epoch: int, start: int,
                plan: online.EpochPlan):
  def hook(i, state, pstate, metrics):
    global_step = run.steps + i + 1
    if run.first_step_end is None:
      jax.block_until_ready(metrics)
      run.first_step_end = time.perf_counter()
    if rewind_step is not None and run.rewind_point is None and global_step == rewind_step:
      run.rewind_point = save_rewind_point(global_step, state.params, state.opt_state)
    stop = stop_at_step()  # SIGTERM / SIGINT / a preemption notice: save here, then stop
    if ck.due(global_step) or (stop and ck.ckpt is not None):
      ck.save(run, state, pstate, plan, metrics, epoch, start + i + 1, global_step)
    if stop:
      raise interrupted_at_step(global_step, saved=ck.ckpt is not None)
  return hook


def _progress(cfg, desc: str, epochs: int, start: int):
  from tqdm.auto import tqdm
  return tqdm(range(start, epochs), desc=desc, leave=False, unit="epoch",
              disable=not (cfg.train.get("progress", True) and sys.stderr.isatty()))


def _postfix(bar, run: Run) -> None:
  bar.update(1)
  if run.history:
    bar.set_postfix(loss=f"{run.history[-1]['loss']:.4f}", acc=f"{run.history[-1]['accuracy']:.3f}")


# ----------------------------------------------------------------------------------------------
# Passes over data with a trained model.
# ----------------------------------------------------------------------------------------------


def evaluate(ctx, state: train.TrainState, ids: np.ndarray | None = None,
             split: str = "test") -> float:
  """Accuracy on ``split`` (``ids`` of it, or all)."""
  return train.evaluate(state, ctx.batches(ids, split=split), ctx.mesh)["accuracy"]


def score_ids(ctx, state: train.TrainState, ids: np.ndarray, score: str) -> np.ndarray:
  """The registered per-batch score ``score`` of the training examples ``ids``, in that order."""
  fn = _jit_score(score, ctx.apply_fn(state.model))
  got_ids, values = score_dataset(fn, state.variables, ctx.batches(ids), ctx.mesh, name=score)
  return _in_order(ids, got_ids, values)


@functools.lru_cache(maxsize=64)
def _jit_score(score: str, apply_fn):
  return jit_score(score, apply_fn)


def map_ids(ctx, ids: np.ndarray, fn: Callable[[dict], jax.Array]) -> np.ndarray:
  """``fn(batch) -> [B, ...]`` over the training examples ``ids``; rows in the order of ``ids``."""
  got_ids, values = map_batches(fn, ctx.batches(ids), ctx.mesh)
  return _in_order(ids, got_ids, values)


def _in_order(ids, got_ids, values):
  from prunejax.scores import align
  return align(ids, got_ids, values)


def predict_probs(ctx, state: train.TrainState, ids: np.ndarray) -> np.ndarray:
  """Softmax probabilities f32[len(ids), C] of the training examples ``ids``, in that order."""
  apply_fn = ctx.apply_fn(state.model)
  probs_fn = _probs_fn(apply_fn)
  return map_ids(ctx, ids, lambda b: probs_fn(state.variables, b["x"]))


@functools.lru_cache(maxsize=64)
def _probs_fn(apply_fn):
  return jax.jit(lambda v, x: jax.nn.softmax(apply_fn(v, x), -1))


def result_row(ctx, strategy: str, r: int, run: Run, held_out: np.ndarray | None,
               **fields) -> dict:
  """One row of results.csv: test (and CV-fold) accuracy, compute, wall time."""
  row = {"strategy": strategy, "replicate": r, "test_accuracy": evaluate(ctx, run.state),
         "compute": run.compute, "forward_examples": run.forward,
         "backward_examples": run.backward, "steps": run.steps, "wall_time": run.wall,
         "history": [{k: round(v, 6) for k, v in h.items()} for h in run.history]}
  if held_out is not None:
    row["val_accuracy"] = evaluate(ctx, run.state, held_out, split="train")
  slice_acc = slices.slice_accuracy(ctx, run.state)
  if slice_acc is not None:  # the test slice the targeted selection aims at
    row["slice_test_accuracy"] = slice_acc
  if ctx.corrupted_ids is not None:  # label noise: the share of corrupted back-propagated examples
    row["corrupted_backprop_fraction"] = run.corrupted / max(run.backward, 1.0)
  row.setdefault("fraction_kept", 1.0)
  row.setdefault("sparsity", 0.0)
  row.update(fields)
  return row
