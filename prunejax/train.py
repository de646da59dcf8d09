"""Training: a ``TrainState``, pure ``train_step`` / ``eval_step``, optimizers and schedules from config,
and a data-parallel epoch loop with metrics accumulated on device.

The loss of a batch is ``sum_i mask_i * w_i * CE_i / sum_i mask_i``: padding rows (``mask`` False) add
nothing, and optional per-example weights ``w`` (``batch["weight"]``, e.g. InfoBatch's rescaling) scale
each example's contribution.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from prunejax import parallel
from prunejax.errors import ConfigError, check_choice, check_range
from prunejax.types import PyTree, batch_mask

OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "cosine", "step")


class TrainState(struct.PyTreeNode):
  """Everything a step changes. ``batch_stats`` is ``{}`` for models without BatchNorm."""

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  model: nn.Module = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @property
  def variables(self) -> dict:
    """The Flax variables dict, the ``params`` argument of :func:`prunejax.models.make_apply_fn`."""
    return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       x_example: jax.Array) -> TrainState:
  from prunejax.models import init_variables
  variables = init_variables(model, key, x_example)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    model=model, tx=tx)


# ----------------------------------------------------------------------------------------------
# Loss and steps.
# ----------------------------------------------------------------------------------------------


def per_example_ce(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
  """Cross-entropy of each example, f32[B]."""
  return optax.softmax_cross_entropy_with_integer_labels(logits_BxC.astype(jnp.float32), y_B)


def masked_mean_loss(logits_BxC: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(mean loss over real rows, per-example CE). Padding rows and ``weight`` as in the module doc."""
  ce_B = per_example_ce(logits_BxC, batch["y"])
  mask_B = batch_mask(batch, ce_B.shape[0]).astype(jnp.float32)
  w_B = mask_B * batch["weight"] if "weight" in batch else mask_B
  return jnp.sum(jnp.where(mask_B > 0, ce_B * w_B, 0.0)) / jnp.maximum(mask_B.sum(), 1.0), ce_B


def _metrics(logits_BxC, ce_B, batch) -> dict[str, jax.Array]:
  mask_B = batch_mask(batch, ce_B.shape[0])
  correct = (jnp.argmax(logits_BxC, -1) == batch["y"]) & mask_B
  return {"loss_sum": jnp.sum(jnp.where(mask_B, ce_B, 0.0)),
          "correct": correct.sum().astype(jnp.float32),
          "count": mask_B.sum().astype(jnp.float32),
          "nonfinite": jnp.sum(mask_B & ~jnp.isfinite(ce_B)).astype(jnp.float32)}


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on ``batch``; returns the new state and summed metrics of the batch."""
  state, metrics, _ = train_step_with_losses(state, batch)
  return state, metrics


def train_step_with_losses(state: TrainState, batch: dict
                           ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
  """:func:`train_step` that also returns the per-example losses f32[B] of its forward pass."""
  has_bn = bool(state.batch_stats)

  def loss_fn(params):
    variables = {"params": params, **({"batch_stats": state.batch_stats} if has_bn else {})}
    if has_bn:
      logits, updates = state.model.apply(variables, batch["x"], train=True,
                                          mask=batch_mask(batch, batch["y"].shape[0]),
                                          mutable=["batch_stats"])
    else:
      logits, updates = state.model.apply(variables, batch["x"], train=True), {}
    loss, ce_B = masked_mean_loss(logits, batch)
    return loss, (logits, ce_B, updates)

  (_, (logits, ce_B, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates_p, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates_p)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=updates.get("batch_stats", state.batch_stats))
  metrics = _metrics(logits, ce_B, batch)
  # Cheap on-device fault detection: one reduction over the gradient norm.
  metrics["grad_nonfinite"] = (~jnp.isfinite(optax.tree.norm(grads))).astype(jnp.float32)
  return new_state, metrics, ce_B


@functools.partial(jax.jit, static_argnums=0)
def _eval_metrics(model: nn.Module, variables: dict, batch: dict) -> dict[str, jax.Array]:
  logits = model.apply(variables, batch["x"], train=False)
  return _metrics(logits, per_example_ce(logits, batch["y"]), batch)


def eval_step(state: TrainState, batch: dict) -> dict[str, jax.Array]:
  """Summed metrics of ``batch`` in evaluation mode. Jitted on (model, variables) only, so runs that
  differ in optimizer share one compilation."""
  return _eval_metrics(state.model, state.variables, batch)


jit_train_step = jax.jit(train_step, donate_argnums=0)
jit_eval_step = eval_step


# ----------------------------------------------------------------------------------------------
# Optimizers and schedules.
# ----------------------------------------------------------------------------------------------


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


def make_optimizer(cfg: Any, steps_per_epoch: int, epochs: float) -> optax.GradientTransformation:
  """SGD (+momentum, Nesterov, L2 weight decay added to the gradient as in PyTorch) or AdamW/Adam.

  Args:
    cfg: fields name, lr, schedule, warmup_epochs, weight_decay, momentum, nesterov, b1, b2,
      step_epochs, step_factor.
    steps_per_epoch: optimizer steps in one epoch.
    epochs: length of the schedule in epochs.
  """
  check_choice("optimizer.name", cfg.name, OPTIMIZERS)
  check_range("optimizer.weight_decay", cfg.get("weight_decay", 0.0), 0.0, 1.0)
  lr = make_schedule(cfg, steps_per_epoch, epochs)
  wd = cfg.get("weight_decay", 0.0)
  if cfg.name == "sgd":
    momentum = cfg.get("momentum", 0.9)
    check_range("optimizer.momentum", momentum, 0.0, 1.0, hi_open=True)
    return optax.chain(optax.add_decayed_weights(wd) if wd else optax.identity(),
                       optax.sgd(lr, momentum=momentum or None, nesterov=cfg.get("nesterov", False)))
  if cfg.name == "adamw":
    return optax.adamw(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999), weight_decay=wd)
  return optax.adam(lr, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999))


# ----------------------------------------------------------------------------------------------
# Loops.
# ----------------------------------------------------------------------------------------------


def _sum_metrics(acc, m):
  return m if acc is None else jax.tree.map(jnp.add, acc, m)


class NumericalError(RuntimeError):
  """A NaN or inf appeared in a loss, a gradient or a score."""


def summarize(metrics: dict) -> dict[str, float]:
  """Host summary of summed metrics: mean loss, accuracy, example count."""
  m = jax.device_get(metrics)
  n = max(float(m["count"]), 1.0)
  return {"loss": float(m["loss_sum"]) / n, "accuracy": float(m["correct"]) / n,
          "count": float(m["count"])}


def run_epoch(state: TrainState, host_batches: Iterable[dict], mesh=None, *,
              step_fn: Callable = jit_train_step, log_every: int = 0,
              log_fn: Callable[[int, dict], None] | None = None, progress: bool = False,
              desc: str = "train", total: int | None = None) -> tuple[TrainState, dict[str, float]]:
  """Trains over ``host_batches`` once; metrics stay on device until a log point or the end."""
  from prunejax.data.pipeline import prefetch
  from tqdm.auto import tqdm
  mesh = mesh or parallel.data_mesh()
  put = functools.partial(parallel.shard_batch, mesh=mesh)
  acc, window = None, None
  bar = tqdm(total=total, desc=desc, disable=not progress, leave=False)
  for i, batch in enumerate(prefetch(iter(host_batches), 2, put)):
    state, m = step_fn(state, batch)
    acc, window = _sum_metrics(acc, m), _sum_metrics(window, m)
    bar.update(1)
    if log_every and (i + 1) % log_every == 0:
      s = summarize(window)  # one host sync per log interval.
      bar.set_postfix(loss=f"{s['loss']:.4f}", acc=f"{s['accuracy']:.3f}")
      if log_fn:
        log_fn(int(state.step), s)
      window = None
  bar.close()
  return state, (summarize(acc) if acc is not None else {"loss": float("nan"), "accuracy": float("nan"), "count": 0.0})


def evaluate(state: TrainState, host_batches: Iterable[dict], mesh=None) -> dict[str, float]:
  """Mean loss and accuracy over ``host_batches`` (padding rows excluded)."""
  mesh = mesh or parallel.data_mesh()
  acc = None
  for batch in host_batches:
    acc = _sum_metrics(acc, jit_eval_step(state, parallel.shard_batch(batch, mesh)))
  return summarize(acc)
