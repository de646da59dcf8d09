"""The experiments' fused training loop: one run, or R replicas of a run in one ``vmap``-ed program,
on a device-resident split, ``train.steps_per_dispatch`` steps per dispatch
(:mod:`prunejax.fused`).

The host decides per epoch what it decides on the host path (the online pruner's plan, the order of
the batches) and then dispatches chunks of steps; an epoch's flags and metric sums are fetched
after the next epoch is queued, so the device does not wait on the host between epochs. A chunk
also ends where the host must look at the state: at the rewind step, and at every
``train.checkpoint_every_steps``; minute-based checkpoints, stop requests (SIGTERM, SIGINT) and
kill points are honoured at the end of each chunk. Fault flags come back once per epoch (while the
next one runs); a non-finite loss or gradient raises
:class:`prunejax.train.NumericalError` naming the run, epoch, step and example ids as the host loop
does.

Replicas: every replica has the same model, optimizer (so the same schedule length), pruner and
number of steps per epoch; their ids, seeds, masks and rewind points may differ. A group is
checkpointed and resumed as one unit of work. Each replica's wall time is the group's divided by R
(the program runs them together).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from prunejax import fused, online, parallel, train
from prunejax.checkpoint import RunCheckpoint, interrupted_at_step, stop_at_step
from prunejax.masks import RewindPoint, save_rewind_point

_COMPILED: dict = {}
_COMPILE_SECONDS = [0.0]  # spent in _compiled, subtracted from the runs' wall time


_CANONICAL: dict = {}


def _canonical(sharding, ndim: int):
  """One representative of the shardings equivalent to ``sharding`` for an ``ndim`` array: a
  program compiled for one of them runs on all (a fresh zero placed on the one device and the same
  value returned by a program on a 1-device mesh are equivalent, and were two compiles)."""
  if sharding is None:
    return None
  key = (sharding, ndim)
  if key not in _CANONICAL:
    same = [s for (s, n), c in _CANONICAL.items() if n == ndim and s is c
            and s.is_equivalent_to(sharding, ndim)]
    _CANONICAL[key] = same[0] if same else sharding
  return _CANONICAL[key]


def _key(fn, args) -> tuple:
  """``fn`` and what a program of it is compiled for: ``args``' structure, shapes, dtypes and
  (canonical) shardings."""
  leaves, treedef = jax.tree.flatten(args)
  return (fn, treedef, tuple((np.shape(l), getattr(l, "dtype", None) or np.result_type(l),
                              _canonical(getattr(l, "sharding", None), np.ndim(l)))
                             for l in leaves))


_ZEROS: dict = {}


def _zero_metrics(runner, step_fn, group: bool, args) -> dict:
  """The zero metric sums that start an epoch of ``runner`` (of ``step_fn``) on ``args`` (the
  chunk's first five): made once per program (cached; never donated), not once per run."""
  key = _key(runner, args)
  if key not in _ZEROS:
    _ZEROS[key] = fused.zero_metrics(step_fn, *args, replicas=group)
  return _ZEROS[key]


def _compiled(fn, args):
  """``fn`` compiled ahead of time for ``args``' shapes, dtypes and shardings (cached, equivalent
  shardings sharing a program), so a run's wall time does not include compilation and runs of one
  shape share the program."""
  key = _key(fn, args)
  if key not in _COMPILED:
    t0 = time.perf_counter()
    _COMPILED[key] = fn.lower(*args).compile()
    _COMPILE_SECONDS[0] += time.perf_counter() - t0
  return _COMPILED[key]


_SLOW: dict = {}


def _slow_in_control_flow(pruner, loop, batch_size) -> bool:
  """:func:`prunejax.fused.control_flow_is_slow` on one replica of ``loop``, traced on the inputs
  the loop's chunks pass (so the chunk and its zero sums reuse this trace of the step)."""
  key = (pruner, loop.state.model, loop.state.preprocess)
  if key not in _SLOW:
    state, pstate = loop.state, loop.pstate
    if loop.group:  # one replica's types
      state, pstate = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype),
                                   (state, pstate))
    plan = pruner.plan(jax.device_get(pruner.init(loop.ids_list[0])), loop.ids_list[0], seed=0,
                       epoch=0, num_epochs=1)
    rows = np.zeros((1, batch_size), np.int32)
    cols = {c: np.zeros((1, batch_size) + np.shape(v)[1:], np.asarray(v).dtype)
            for c, v in plan.columns.items()}
    _SLOW[key] = fused.control_flow_is_slow(_step(pruner), state, pstate, loop.data, rows, cols)
  return _SLOW[key]


@functools.lru_cache(maxsize=64)
def _step(pruner: online.OnlinePruner):
  """``pruner``'s train step, one bound method for equal pruners (a bound method compares by its
  instance's identity): the runner, its zero sums and the control-flow check pass the same step
  and so share its one trace (:func:`prunejax.fused.zero_metrics`)."""
  return pruner.train_step


@functools.lru_cache(maxsize=64)
def _runner(pruner: online.OnlinePruner, group: bool, mesh):
  # Keyed on the pruner (equal settings, one program).
  return fused.make_runner(_step(pruner), replicas=group, mesh=mesh)


def _stack_plans(plans: list[online.EpochPlan]) -> tuple[np.ndarray, dict, list[int]]:
  lens = [len(p.ids) for p in plans]
  n = max(lens)
  ids = np.full((len(plans), n), -1, np.int64)
  cols = {k: np.zeros((len(plans), n) + np.shape(v)[1:], np.asarray(v).dtype)
          for k, v in plans[0].columns.items()}
  for r, p in enumerate(plans):
    ids[r, :lens[r]] = p.ids
    for k, v in p.columns.items():
      cols[k][r, :lens[r]] = v
  return ids, cols, lens


def _unstack_plans(ids, cols, lens) -> list[online.EpochPlan]:
  return [online.EpochPlan(np.asarray(ids[r, :n]), {k: np.asarray(v[r, :n]) for k, v in cols.items()})
          for r, n in enumerate(lens)]


class Cadence:
  """When a training run saves itself mid-way: every ``train.checkpoint_every_steps`` steps and
  every ``train.checkpoint_minutes`` minutes (0 turns either off), into the run's
  :class:`RunCheckpoint` under ``workdir/checkpoints/runs/<key>`` (none without a key)."""

  def __init__(self, ctx, key: str | None):
    tc = ctx.config.train
    self.every = int(tc.get("checkpoint_every_steps", 0) or 0)
    self.minutes = float(tc.get("checkpoint_minutes", 0) or 0)
    self.ckpt = (RunCheckpoint(os.path.join(ctx.workdir, "checkpoints", "runs", key),
                               fingerprint=ctx.units.fingerprint)
                 if key and (self.every or self.minutes) else None)
    self.last = time.monotonic()

  def due(self, global_step: int) -> bool:
    if self.ckpt is None:
      return False
    return bool((self.every and global_step % self.every == 0)
                or (self.minutes and time.monotonic() - self.last >= 60 * self.minutes))

  def finish(self) -> None:
    if self.ckpt is not None:
      self.ckpt.delete()


def checkpoint_like(state, pstate, meta: dict, plan_shape: tuple, metric_shape: tuple) -> dict:
  """The structure of a mid-run checkpoint to restore into: the states, the epoch's plan (ids and
  columns of ``plan_shape``), the partial metric sums and the rewind point if one was saved."""
  return {"state": state, "pruner": pstate, "plan_ids": np.zeros(plan_shape, np.int64),
          "plan": {k: np.zeros(plan_shape, np.float32) for k in meta["plan_columns"]},
          "metrics": {k: np.zeros(metric_shape, np.float32) for k in meta["metric_keys"]},
          "rewind": {} if meta["rewind_step"] is None else
          {"params": state.params, "opt_state": state.opt_state}}


class FusedCheckpoint(Cadence):
  """Mid-run checkpoints of a fused run or replica group."""

  def save(self, runs, state, pstate, plans, metrics, epoch, next_batch, global_step, rewind):
    ids, cols, lens = _stack_plans(plans)
    tree = {"state": state, "pruner": pstate, "plan_ids": ids, "plan": cols, "metrics": metrics,
            "rewind": {} if rewind is None else {"params": rewind.params,
                                                 "opt_state": rewind.opt_state}}
    meta = {"fused": True, "epoch": epoch, "next_batch": next_batch, "steps": global_step,
            "runs": [{"forward": r.forward, "backward": r.backward, "history": r.history,
                      "corrupted": r.corrupted} for r in runs],
            "plan_lens": lens, "plan_columns": sorted(cols), "metric_keys": sorted(metrics),
            "metric_shape": list(np.shape(next(iter(metrics.values())))),
            "rewind_step": None if rewind is None else int(rewind.step)}
    self.ckpt.save(tree, meta)
    self.last = time.monotonic()

  def resume(self, runs, state, pstate):
    meta = self.ckpt.meta() if self.ckpt is not None else None
    if meta is None or not meta.get("fused") or len(meta["runs"]) != len(runs):
      return None
    like = checkpoint_like(state, pstate, meta, (len(meta["plan_lens"]), max(meta["plan_lens"])),
                           tuple(meta["metric_shape"]))
    got = self.ckpt.restore(like)
    if got is None:
      return None
    tree, meta = got
    for run, m in zip(runs, meta["runs"]):
      run.forward, run.backward, run.history = m["forward"], m["backward"], m["history"]
      run.corrupted, run.steps = m["corrupted"], meta["steps"]
    rewind = (None if meta["rewind_step"] is None else
              RewindPoint(meta["rewind_step"], tree["rewind"]["params"], tree["rewind"]["opt_state"]))
    plans = _unstack_plans(tree["plan_ids"], tree["plan"], meta["plan_lens"])
    return (tree["state"], tree["pruner"], meta["epoch"], meta["next_batch"], plans,
            jax.tree.map(jnp.asarray, tree["metrics"]), rewind)


def run_fused(*, data: fused.DeviceData, index, ids_list: list[np.ndarray], seeds: list[int],
              epochs: int, pruner: online.OnlinePruner, states: list, runs: list,
              batch_size: int, steps_per_dispatch: int, epoch_steps: int,
              checkpoint: FusedCheckpoint,
              rewind_step: int | None, desc: str, mark: Callable, mesh,
              on_epoch: Callable | None = None) -> tuple[list, list]:
  """Trains ``states`` (one per replica) on ``ids_list``; fills ``runs`` (counters, history, wall
  time) and returns ``(final states, rewind points or None)``, one per replica.

  ``steps_per_dispatch`` is the scan length K of every dispatch; runs with the same K, model,
  optimizer and pruner share one compiled program whatever their length (give every run of an
  experiment the same K). 0: ``epoch_steps`` (a whole epoch of the full split), or 1 where the step
  is slow inside control flow (:func:`prunejax.fused.control_flow_is_slow`: convolutions on CPU).
  ``mark(plan) -> plan`` adds per-example columns to each epoch's plan (label-noise flags).
  """
  loop = _FusedLoop(data, index, ids_list, seeds, epochs, pruner, states, runs, batch_size,
                    checkpoint, rewind_step, desc, mark, mesh)
  k = steps_per_dispatch or (1 if _slow_in_control_flow(pruner, loop, batch_size) else epoch_steps)
  resumed = checkpoint.resume(runs, loop.state, loop.pstate)
  if resumed is not None:
    loop.restore(resumed[0], resumed[1], resumed[6])
  start_epoch = resumed[2] if resumed else 0
  global_done = runs[0].steps  # steps finished before the next epoch's first step
  for epoch in range(start_epoch, epochs):
    if resumed is not None and epoch == start_epoch:
      start, plans, metrics = resumed[3], resumed[4], resumed[5]
    else:
      start, plans, metrics = 0, loop.plans(epoch), None
    global_done = loop.epoch(epoch, plans, start, metrics, global_done, k)
    if on_epoch is not None and not loop.group:
      loop.finish()
      on_epoch(epoch, loop.state)
  loop.finish()
  return loop.results()


class _FusedLoop:
  """One call of :func:`run_fused`: the replicas' state on the device between dispatches, and what
  every epoch shares (the compiled runner, the pruner, the checkpoint, the runs to fill)."""

  def __init__(self, data, index, ids_list, seeds, epochs, pruner, states, runs, batch_size,
               checkpoint, rewind_step, desc, mark, mesh):
    self.index, self.ids_list, self.seeds, self.epochs = index, ids_list, seeds, epochs
    self.pruner, self.runs, self.batch_size, self.checkpoint = pruner, runs, batch_size, checkpoint
    self.rewind_step, self.desc, self.mark, self.mesh = rewind_step, desc, mark, mesh
    self.n_rep = len(states)
    self.group = self.n_rep > 1
    self.sharding = fused.replica_sharding(self.n_rep) if self.group else None
    if self.group:
      state = fused.stack(states)
      pstate = fused.stack([pruner.init(i) for i in ids_list])
      if self.sharding is not None:
        state, pstate = jax.device_put((state, pstate), self.sharding)
        data = jax.device_put(data, jax.sharding.NamedSharding(self.sharding.mesh,
                                                               jax.sharding.PartitionSpec()))
    else:
      state, pstate = states[0], parallel.replicate(pruner.init(ids_list[0]), mesh)
    self.data, self.state, self.pstate = data, state, pstate
    self.runner = _runner(pruner, self.group, None if self.group else mesh)
    self.rewind = None
    self.zeros = None
    self.t_start = None  # the clock starts at the first dispatch (the host loop: its first step)
    self.compile_before = 0.0
    # An epoch's flags and sums come back while the next epoch runs (one host sync per epoch, not a
    # stall): ``pending`` is finished after the next epoch's first dispatch, and before anything
    # that reads the runs' counters (a checkpoint, a stop, on_epoch, the end).
    self.pending = []

  def restore(self, state, pstate, rewind) -> None:
    """Continues from a saved run's state, pruner state and rewind point, placed as at the start."""
    if self.sharding is not None:
      state, pstate = jax.device_put((state, pstate), self.sharding)
    elif not self.group:
      state, pstate = parallel.replicate((state, pstate), self.mesh)
    self.state, self.pstate, self.rewind = state, pstate, rewind

  def finish(self) -> None:
    """Fetches the pending epochs' flags and sums (their one host sync) into the runs."""
    while self.pending:
      ep, fl, mt, ers_ep, done = self.pending.pop(0)
      fl, mt = jax.device_get((fl, mt))  # the epoch's one host sync
      _check_flags(fl, ers_ep, self.desc, ep, self.group)
      for r, run in enumerate(self.runs):
        run.add_epoch(ep, mt if not self.group else jax.tree.map(lambda a, r=r: a[r], mt), done)

  def plans(self, epoch: int) -> list[online.EpochPlan]:
    """Each replica's plan of ``epoch`` from the pruner's state."""
    host_p = jax.device_get(self.pstate)
    return [self.mark(self.pruner.plan(
        host_p if not self.group else jax.tree.map(lambda a, r=r: a[r], host_p),
        self.ids_list[r], seed=self.seeds[r], epoch=epoch, num_epochs=self.epochs))
            for r in range(self.n_rep)]

  def epoch(self, epoch: int, plans, start: int, metrics, global_done: int, k: int) -> int:
    """Dispatches ``epoch`` from its batch ``start`` in chunks of up to ``k`` steps (a chunk ends at
    the rewind step and at every checkpoint step); returns the global steps done after it."""
    ers = [fused.epoch_rows(self.index, p.ids, batch_size=self.batch_size, seed=self.seeds[r],
                            epoch=epoch, columns=p.columns) for r, p in enumerate(plans)]
    steps = ers[0].steps
    if any(er.steps != steps for er in ers):
      raise ValueError("replicas of one program need equal epoch lengths; got "
                       f"{[er.steps for er in ers]}")
    rows = np.stack([er.rows_SxB for er in ers])
    cols = {c: np.stack([er.columns[c] for er in ers]) for c in ers[0].columns}
    base = global_done - start  # global steps before this epoch's first step
    breaks = []
    if self.rewind_step is not None and self.rewind is None:
      breaks.append(self.rewind_step - base)
    if self.checkpoint.every:
      breaks += [j for j in range(start + 1, steps) if (base + j) % self.checkpoint.every == 0]
    flags = []
    for s, n in fused.chunks(steps - start, k, tuple(b - start for b in breaks)):
      s += start
      metrics = self._dispatch(epoch, rows, cols, s, n, k, metrics, flags)
      global_step = base + s + n
      if (self.rewind_step is not None and self.rewind is None
          and global_step == self.rewind_step):
        self.rewind = save_rewind_point(global_step, self.state.params, self.state.opt_state)
      stop = stop_at_step(n)
      ckpt = self.checkpoint
      if ckpt.due(global_step) or (stop and ckpt.ckpt is not None):
        ckpt.save(self.runs, self.state, self.pstate, plans, metrics, epoch, s + n, global_step,
                  self.rewind)
      if stop:
        raise interrupted_at_step(global_step, saved=ckpt.ckpt is not None)
    self.pending.append((epoch, flags, metrics, ers, steps - start))
    return base + steps

  def _dispatch(self, epoch: int, rows, cols, s: int, n: int, k: int, metrics, flags: list):
    """Runs steps ``s .. s + n`` of the epoch in one dispatch (padded to ``k``); returns the epoch's
    metric sums so far and appends the chunk's fault flags to ``flags``."""
    n_rep = self.n_rep
    rows_k = np.stack([fused.pad_steps(rows[r], s, n, k, -1) for r in range(n_rep)])
    cols_k = {c: np.stack([fused.pad_steps(v[r], s, n, k, 0) for r in range(n_rep)])
              for c, v in cols.items()}
    if not self.group:
      rows_k, cols_k = rows_k[0], {c: v[0] for c, v in cols_k.items()}
    if metrics is None:  # the epoch's sums start at zero (one program for every chunk)
      if self.zeros is None:
        self.zeros = _zero_metrics(self.runner, _step(self.pruner), self.group,
                                   (self.state, self.pstate, self.data, rows_k, cols_k))
      metrics = self.zeros  # never donated: one zero tree serves every epoch
    args = (self.state, self.pstate, self.data, rows_k, cols_k, np.int32(epoch), np.int32(n),
            metrics)
    fn = _compiled(self.runner, args)
    if self.t_start is None:
      self.t_start, self.compile_before = time.perf_counter(), _COMPILE_SECONDS[0]
      for run in self.runs:
        run.clock = self.seconds
    res = fn(*args)
    self.state, self.pstate, metrics = res.state, res.pruner_state, res.metrics
    flags.append((s, res.flags))
    self.finish()  # the previous epoch, now that this one is queued
    return metrics

  def results(self) -> tuple[list, list]:
    """(final states, rewind points or None), one per replica; sets each run's wall time."""
    n_rep, rewind = self.n_rep, self.rewind
    jax.block_until_ready(self.state.params)
    finals = fused.unstack(self.state, n_rep) if self.group else [self.state]
    points = [None] * n_rep
    if rewind is not None and self.group:
      opt = (fused.unstack(rewind.opt_state, n_rep) if rewind.opt_state is not None
             else [None] * n_rep)
      points = [RewindPoint(rewind.step, p, o)
                for p, o in zip(fused.unstack(rewind.params, n_rep), opt)]
    elif rewind is not None:
      points = [rewind]
    wall = 0.0 if self.t_start is None else self.seconds()
    for run in self.runs:
      run.wall = wall / n_rep - run.eval_seconds
    return finals, points

  def seconds(self) -> float:
    """Seconds since the first dispatch, compilation left out."""
    return time.perf_counter() - self.t_start - (_COMPILE_SECONDS[0] - self.compile_before)


def _check_flags(flags, ers, desc, epoch, group) -> None:
  """Raises :class:`prunejax.train.NumericalError` for the first step with a non-finite loss or
  gradient in this epoch (one host sync per epoch)."""
  for s, f in flags:
    f = np.asarray(f)
    f = f if group else f[None]
    bad = np.argwhere(f > 0)
    if len(bad):
      r, i = int(bad[0][0]), int(bad[0][1])
      who = f"{desc}" + (f" replica {r}" if group else "")
      raise train.NumericalError(
          f"non-finite loss or gradient in {who}, epoch {epoch}, step {s + i + 1} of this epoch; "
          f"examples of that batch: {ers[r].batch_ids(s + i)[:16].tolist()}")
