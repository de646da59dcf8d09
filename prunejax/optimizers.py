"""Optimizers and learning-rate schedules from a config (``config.optimizer``): SGD (momentum,
Nesterov, L2 weight decay) or AdamW/Adam, with a constant, cosine or step schedule and a linear
warmup; optionally with the schedule's length in the optimizer state (:func:`traced_lr_schedule`),
so runs of any length share one compiled step.

The names are re-exported by :mod:`prunejax.train`. (Masked optimizers for model pruning are in
:mod:`prunejax.optim`.)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prunejax.errors import ConfigError, check_choice, check_range

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(cfg: Any, steps_per_epoch: int, epochs: float) -> optax.Schedule:
  """Learning-rate schedule over ``epochs`` from ``cfg`` (fields: lr, schedule, warmup_epochs, and for
  "step": step_epochs, step_factor)."""
  check_choice("optimizer.schedule", cfg.schedule, SCHEDULES)
  check_range("optimizer.lr", cfg.lr, 0.0, 10.0, lo_open=True)
  total = max(1, int(round(epochs * steps_per_epoch)))
  warmup = int(round(cfg.get("warmup_epochs", 0) * steps_per_epoch))
  if warmup >= total and warmup > 0:
    raise ConfigError(f"optimizer.warmup_epochs={cfg.warmup_epochs} must be below the number of "
                      f"epochs ({epochs})")
  if cfg.schedule == "constant":
    main = optax.constant_schedule(cfg.lr)
  elif cfg.schedule == "cosine":
    main = optax.cosine_decay_schedule(cfg.lr, max(1, total - warmup))
  else:
    boundaries = {int(round(e * steps_per_epoch)) - warmup: cfg.get("step_factor", 0.1)
                  for e in cfg.get("step_epochs", ())}
    main = optax.piecewise_constant_schedule(cfg.lr, boundaries)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), main], [warmup])


def make_optimizer(cfg: Any, steps_per_epoch: int | None, epochs: float | None, *,
                   traced_schedule: bool = False) -> optax.GradientTransformation:
  """SGD (+momentum, Nesterov, L2 weight decay added to the gradient as in PyTorch) or AdamW/Adam.

  Args:
    cfg: fields name, lr, schedule, warmup_epochs, weight_decay, momentum, nesterov, b1, b2,
      step_epochs, step_factor.
    steps_per_epoch: optimizer steps in one epoch.
    epochs: length of the schedule in epochs.
    traced_schedule: the learning-rate schedule's length lives in the optimizer state, not in the
      program (:func:`traced_lr_schedule`): runs of any length share one optimizer object and so
      one compiled step. ``steps_per_epoch`` and ``epochs`` are then unused; give each run its
      schedule with :func:`set_schedule` after ``tx.init``. The learning rates equal the static
      schedule's bit for bit.
  """
  check_choice("optimizer.name", cfg.name, OPTIMIZERS)
  check_range("optimizer.weight_decay", cfg.get("weight_decay", 0.0), 0.0, 1.0)
  wd = cfg.get("weight_decay", 0.0)
  b1, b2 = cfg.get("b1", 0.9), cfg.get("b2", 0.999)
  momentum = cfg.get("momentum", 0.9)
  if cfg.name == "sgd":
    check_range("optimizer.momentum", momentum, 0.0, 1.0, hi_open=True)
  if not traced_schedule:
    lr = make_schedule(cfg, steps_per_epoch, epochs)
    if cfg.name == "sgd":
      return optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                         optax.sgd(lr, momentum=momentum or None,
                                   nesterov=cfg.get("nesterov", False)))
    if cfg.name == "adamw":
      return optax.adamw(lr, b1=b1, b2=b2, weight_decay=wd)
    return optax.adam(lr, b1=b1, b2=b2)
  check_choice("optimizer.schedule", cfg.schedule, SCHEDULES)
  check_range("optimizer.lr", cfg.lr, 0.0, 10.0, lo_open=True)
  scale_lr = traced_lr_schedule(cfg)
  # optax.sgd / adamw / adam's own chains, with the traced learning rate as the last link.
  if cfg.name == "sgd":
    trace = (optax.trace(decay=momentum, nesterov=cfg.get("nesterov", False)) if momentum
             else optax.identity())
    return optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                       optax.chain(trace, scale_lr))
  if cfg.name == "adamw":
    return optax.chain(optax.scale_by_adam(b1=b1, b2=b2), optax.add_decayed_weights(wd), scale_lr)
  return optax.chain(optax.scale_by_adam(b1=b1, b2=b2), scale_lr)


class TracedScheduleState(NamedTuple):
  """The state of :func:`traced_lr_schedule`: the step count and the run's schedule (set by
  :func:`set_schedule`; ``lr_total_steps`` -1 until then, which makes every update NaN)."""

  count: jax.Array
  lr_total_steps: jax.Array
  lr_warmup_steps: jax.Array
  lr_boundaries: jax.Array


def traced_lr_schedule(cfg: Any) -> optax.GradientTransformation:
  """``scale_by_learning_rate(make_schedule(cfg, ...))`` whose length (total and warmup steps, and
  the "step" schedule's boundaries) is read from its state; the same formulas as optax's
  ``cosine_decay_schedule``, ``piecewise_constant_schedule``, ``linear_schedule`` and
  ``join_schedules``, so each step's learning rate equals the static schedule's."""
  kind, lr, factor = cfg.schedule, cfg.lr, cfg.get("step_factor", 0.1)
  num_bounds = len(tuple(cfg.get("step_epochs", ()))) if kind == "step" else 0
  warms = cfg.get("warmup_epochs", 0) > 0

  def main(count, state):
    if kind == "constant":
      return lr
    if kind == "cosine":
      decay_steps = jnp.maximum(1, state.lr_total_steps - state.lr_warmup_steps).astype(jnp.float32)
      count = jnp.minimum(count, decay_steps)
      return lr * ((1 - 0.0) * (0.5 * (1 + jnp.cos(jnp.pi * count / decay_steps))) ** 1.0 + 0.0)
    v = lr
    for i in range(num_bounds):  # sorted on the host, as optax sorts its dict
      indicator = jnp.maximum(0.0, jnp.sign(state.lr_boundaries[i] - count))
      v = v * indicator + (1 - indicator) * factor * v
    return v

  def rate(state):
    count = state.count
    if warms:
      w = state.lr_warmup_steps
      ramp = (0.0 - lr) * ((1 - jnp.clip(count, 0, w) / w) ** 1) + lr
      out = jnp.where(count < w, ramp, main(count - w, state))
    else:
      out = main(count, state)
    return jnp.where(state.lr_total_steps < 0, jnp.nan, out)

  def init_fn(params):
    del params
    # At least one boundary slot: checkpoints cannot hold zero-size arrays.
    return TracedScheduleState(jnp.zeros([], jnp.int32), jnp.full([], -1, jnp.int32),
                               jnp.zeros([], jnp.int32),
                               jnp.full([max(1, num_bounds)], np.iinfo(np.int32).max, jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    step_size = -1 * rate(state)
    updates = jax.tree.map(lambda g: jnp.array(step_size, dtype=g.dtype) * g, updates)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def set_schedule(opt_state: optax.OptState, cfg: Any, steps_per_epoch: int,
                 epochs: float) -> optax.OptState:
  """``opt_state`` of a ``traced_schedule`` optimizer with the schedule of a run of ``epochs``
  epochs of ``steps_per_epoch`` steps (what :func:`make_schedule` would build)."""
  total = max(1, int(round(epochs * steps_per_epoch)))
  warmup = int(round(cfg.get("warmup_epochs", 0) * steps_per_epoch))
  if warmup >= total and warmup > 0:
    raise ConfigError(f"optimizer.warmup_epochs={cfg.warmup_epochs} must be below the number of "
                      f"epochs ({epochs})")
  bounds = sorted({int(round(e * steps_per_epoch)) - warmup for e in cfg.get("step_epochs", ())}
                  ) if cfg.schedule == "step" else []
  is_schedule = lambda s: isinstance(s, TracedScheduleState)
  if not any(map(is_schedule, jax.tree.leaves(opt_state, is_leaf=is_schedule))):
    raise ConfigError("set_schedule: the optimizer state has no traced schedule; build the "
                      "optimizer with make_optimizer(..., traced_schedule=True)")

  def put(s):
    if not is_schedule(s):
      return s
    # Repeated boundaries count once (as in optax's dict); unused slots are never reached.
    padded = bounds + [np.iinfo(np.int32).max] * (s.lr_boundaries.shape[0] - len(bounds))
    return s._replace(lr_total_steps=jnp.asarray(total, jnp.int32),
                      lr_warmup_steps=jnp.asarray(warmup, jnp.int32),
                      lr_boundaries=jnp.asarray(padded, jnp.int32))

  return jax.tree.map(put, opt_state, is_leaf=is_schedule)
