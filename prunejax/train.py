"""Training: a ``TrainState``, pure train and eval steps, and the one epoch loop (data-parallel,
metrics accumulated on device, one host sync per epoch). Optimizers and schedules from config are in
:mod:`prunejax.optimizers` (re-exported here).

The loss of a batch is ``sum_i mask_i * w_i * CE_i / sum_i mask_i`` (:func:`prunejax.losses.masked_mean`):
padding rows (``mask`` False) add nothing, and optional per-example weights ``w`` (``batch["weight"]``,
e.g. InfoBatch's rescaling) scale each example's contribution. Inputs go through the state's
:class:`~prunejax.data.Preprocess` on device (normalization; crop + flip in training, keyed by the run
key, the epoch and the example id). Models with dropout draw it from ``fold_in(run key, step)``.

Gradient accumulation (``TrainState.accumulation_steps = A``): one step splits its batch into ``A``
micro-batches, the strided rows ``m, m + A, m + 2A, ...`` of micro-batch ``m`` (so each one is
sharded over the devices like the batch, and the padding at the end of a batch spreads over all of
them), runs the forward and backward pass of one micro-batch at a time (``lax.scan``: the activation
memory of ``B / A`` rows) and applies one optimizer update with the summed gradients. The loss is
the same masked mean over the real rows of the *whole* batch, per-example weights included, so the
update equals the one of the large batch up to float rounding. Dropout draws one key per
micro-batch (another draw than the large batch's). BatchNorm is the exception: its batch statistics
are those of each micro-batch, and the running statistics the real-row-weighted mean of the
micro-batches' updates.

Mixed precision lives in the model (:mod:`prunejax.models.precision`): params, gradients and
optimizer state keep the params' dtype (float32), the loss reduces in float32. ``loss_scale`` (for
float16 compute) multiplies the loss before the backward pass and divides the gradients after it.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from prunejax import losses, parallel
from prunejax.data.augment import Preprocess
from prunejax.errors import ConfigError, check_positive_int, check_range
# Optimizers and schedules live in prunejax.optimizers; their names stay importable from here.
from prunejax.optimizers import (OPTIMIZERS, SCHEDULES, TracedScheduleState,  # noqa: F401
                                 make_optimizer, make_schedule, set_schedule, traced_lr_schedule)
from prunejax.types import PyTree, batch_mask

_DROPOUT_STREAM = 0xD50


class TrainState(struct.PyTreeNode):
  """Everything a step changes, plus the static model, optimizer, input preprocessing and step
  options.

  ``batch_stats`` is ``{}`` for models without BatchNorm; ``rng`` is the raw data of the run's key
  (augmentation and dropout randomness derive from it). ``accumulation_steps`` and ``loss_scale``
  are static, so every step function (:func:`train_step` and the online pruners' steps) honours them
  without an argument; see the module doc.
  """

  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: optax.OptState
  rng: jax.Array
  model: nn.Module = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)
  preprocess: Preprocess = struct.field(pytree_node=False, default=Preprocess())
  accumulation_steps: int = struct.field(pytree_node=False, default=1)
  loss_scale: float = struct.field(pytree_node=False, default=1.0)

  @property
  def variables(self) -> dict:
    """The Flax variables dict, the ``params`` argument of :func:`prunejax.models.make_apply_fn`."""
    return {"params": self.params, **({"batch_stats": self.batch_stats} if self.batch_stats else {})}

  @property
  def key(self) -> jax.Array:
    return jax.random.wrap_key_data(self.rng)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       x_example: jax.Array, preprocess: Preprocess | None = None,
                       variables: dict | None = None, *, accumulation_steps: int = 1,
                       loss_scale: float = 1.0) -> TrainState:
  """A fresh state: variables initialized from ``key`` (on ``preprocess.eval(x_example)``), or the
  given ``variables`` (e.g. a pretrained checkpoint's, ``{"params": ...}``); ``key`` is also the
  run key.

  Args:
    model: a Flax module (its ``compute_dtype`` / ``param_dtype`` set the precision).
    tx: the optimizer.
    key: the run key.
    x_example: an input batch of the model, for the initialization.
    preprocess: on-device input preprocessing (default: none).
    variables: initial variables instead of a fresh initialization.
    accumulation_steps: micro-batches per optimizer step (1: none).
    loss_scale: the loss is multiplied by it before the backward pass and the gradients divided
      after (1: none); for float16 compute, e.g. ``2.0 ** 12``.

  Raises:
    ConfigError: ``accumulation_steps`` not a positive integer, or ``loss_scale`` not in
      ``(0, 2**24]``.
  """
  from prunejax.models import init_variables
  check_positive_int("train.accumulation_steps", accumulation_steps)
  check_range("train.loss_scale", loss_scale, 0.0, 2.0 ** 24, lo_open=True)
  preprocess = preprocess or Preprocess()
  if variables is None:
    variables = init_variables(model, key, preprocess.eval(jnp.asarray(x_example)))
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params),
                    rng=jax.random.key_data(key), model=model, tx=tx, preprocess=preprocess,
                    accumulation_steps=accumulation_steps, loss_scale=float(loss_scale))


# ----------------------------------------------------------------------------------------------
# Loss and steps.
# ----------------------------------------------------------------------------------------------


def per_example_ce(logits_BxC: jax.Array, y_B: jax.Array) -> jax.Array:
  """Cross-entropy of each example, f32[B] (:func:`prunejax.losses.cross_entropy`)."""
  return losses.cross_entropy(logits_BxC, y_B)


def masked_mean_loss(logits_BxC: jax.Array, batch: dict) -> tuple[jax.Array, jax.Array]:
  """(mean loss over real rows, per-example CE). Padding rows and ``weight`` as in the module doc."""
  ce_B = per_example_ce(logits_BxC, batch["y"])
  return losses.masked_mean(ce_B, batch), ce_B


def metrics_of(logits_BxC: jax.Array, ce_B: jax.Array, batch: dict) -> dict[str, jax.Array]:
  """Summed metrics of the real rows: loss, correct predictions, count, non-finite losses, and
  (when the batch marks them in a ``corrupted`` column) how many of the rows have corrupted labels."""
  mask_B = batch_mask(batch, ce_B.shape[0])
  correct = (jnp.argmax(logits_BxC, -1) == batch["y"]) & mask_B
  metrics = {"loss_sum": jnp.sum(jnp.where(mask_B, ce_B, 0.0)),
             "correct": correct.sum().astype(jnp.float32),
             "count": mask_B.sum().astype(jnp.float32),
             "nonfinite": jnp.sum(mask_B & ~jnp.isfinite(ce_B)).astype(jnp.float32)}
  if "corrupted" in batch:
    metrics["corrupted"] = jnp.sum(mask_B & (batch["corrupted"] > 0)).astype(jnp.float32)
  return metrics


def train_inputs(state: TrainState, batch: dict) -> jax.Array:
  """The model input of a training step: the batch through the state's preprocessing."""
  if not state.preprocess.augments:
    return state.preprocess.eval(batch["x"])
  b = batch["y"].shape[0]
  epoch_B = batch["epoch"] if "epoch" in batch else jnp.zeros((b,), jnp.int32)
  return state.preprocess.train(batch["x"], batch["id"], epoch_B, state.key)


def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on ``batch``; returns the new state and summed metrics of the batch."""
  state, metrics, _ = train_step_with_losses(state, batch)
  return state, metrics


def train_step_with_losses(state: TrainState, batch: dict
                           ) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
  """:func:`train_step` that also returns the per-example losses f32[B] of its forward pass."""
  dropout_key = jax.random.fold_in(jax.random.fold_in(state.key, _DROPOUT_STREAM), state.step)
  if state.accumulation_steps == 1:
    grads, batch_stats, metrics, ce_B = _grads(state, batch, dropout_key)
  else:
    grads, batch_stats, metrics, ce_B = _accumulated_grads(state, batch, dropout_key)
  if state.loss_scale != 1.0:
    unscale = lambda g: (g.astype(jnp.float32) / state.loss_scale).astype(g.dtype)
    grads = jax.tree.map(unscale, grads)
  updates_p, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates_p)
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            batch_stats=batch_stats)
  # On-device fault detection: a non-finite gradient makes the update and so the new params
  # non-finite. Their plain sum is finite exactly when every param is (short of an overflow, which
  # would flag, never hide) and XLA fuses it into the update it already computes; a separate norm of
  # the gradients cost 30% of a small model's step on CPU (BUILD_NOTES, issue 22).
  total = sum(jnp.sum(p.astype(jnp.float32)) for p in jax.tree.leaves(params))
  metrics["grad_nonfinite"] = (~jnp.isfinite(total)).astype(jnp.float32)
  return new_state, metrics, ce_B


def _grads(state: TrainState, batch: dict, dropout_key: jax.Array,
           denominator: jax.Array | None = None) -> tuple[PyTree, PyTree, dict, jax.Array]:
  """(gradients, updated batch statistics, summed metrics, per-example losses) of ``batch``.

  The loss is the masked mean of the batch, or with ``denominator`` the weighted sum of its real
  rows' losses divided by it (a micro-batch's share of the whole batch's mean); times the state's
  ``loss_scale``.
  """
  has_bn = bool(state.batch_stats)
  x = train_inputs(state, batch)
  rngs = {"dropout": dropout_key}

  def loss_fn(params):
    variables = {"params": params, **({"batch_stats": state.batch_stats} if has_bn else {})}
    if has_bn:
      logits, updates = state.model.apply(variables, x, train=True, rngs=rngs,
                                          mask=batch_mask(batch, batch["y"].shape[0]),
                                          mutable=["batch_stats"])
    else:
      logits, updates = state.model.apply(variables, x, train=True, rngs=rngs), {}
    ce_B = per_example_ce(logits, batch["y"])
    if denominator is None:
      loss = losses.masked_mean(ce_B, batch)
    else:
      loss = losses.masked_mean(ce_B, batch) * (_real_rows(batch, ce_B) / denominator)
    if state.loss_scale != 1.0:
      loss = loss * state.loss_scale
    return loss, (logits, ce_B, updates)

  (_, (logits, ce_B, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return (grads, updates.get("batch_stats", state.batch_stats), metrics_of(logits, ce_B, batch),
          ce_B)


def _real_rows(batch: dict, values_B: jax.Array) -> jax.Array:
  """The masked mean's denominator: the number of real rows, at least 1."""
  return jnp.maximum(batch_mask(batch, values_B.shape[0]).sum().astype(values_B.dtype), 1.0)


def micro_batches(batch: dict, num: int) -> dict:
  """``batch`` as ``num`` micro-batches along a new leading axis: micro-batch ``m`` holds rows
  ``m, m + num, m + 2 num, ...``; the batch is first padded with padding rows (``mask`` False,
  zeros elsewhere) to a multiple of ``num``. Every value has shape ``[num, ceil(B / num), ...]``."""
  b = jax.tree.leaves(batch)[0].shape[0]
  pad = -b % num
  if pad and "mask" not in batch:
    batch = {**batch, "mask": jnp.ones((b,), bool)}

  def split(v):
    if pad:
      v = jnp.concatenate([v, jnp.zeros((pad,) + v.shape[1:], v.dtype)])
    return v.reshape((-1, num) + v.shape[1:]).swapaxes(0, 1)

  return {k: split(v) for k, v in batch.items()}


def _unsplit(values: jax.Array, b: int) -> jax.Array:
  """The inverse of :func:`micro_batches` on one array: ``[num, M, ...] -> [B, ...]``."""
  return values.swapaxes(0, 1).reshape((-1,) + values.shape[2:])[:b]


def _accumulated_grads(state: TrainState, batch: dict, dropout_key: jax.Array
                       ) -> tuple[PyTree, PyTree, dict, jax.Array]:
  """:func:`_grads` of the whole batch, summed over ``state.accumulation_steps`` micro-batches."""
  num = state.accumulation_steps
  b = batch["y"].shape[0]
  micro = micro_batches(batch, num)
  n_real = batch_mask(batch, b).sum().astype(jnp.float32)
  denominator = jnp.maximum(n_real, 1.0)
  wide = lambda x: jnp.zeros(x.shape, jnp.promote_types(x.dtype, jnp.float32))

  def body(grads_acc, xs):
    i, mb = xs
    grads, stats, metrics, ce = _grads(state, mb, jax.random.fold_in(dropout_key, i), denominator)
    # A micro-batch of padding rows only (the end of a last batch) adds nothing, even where its
    # forward pass is not finite (BatchNorm statistics of no rows).
    live = metrics["count"] > 0
    grads_acc = jax.tree.map(lambda acc, g: acc + jnp.where(live, g, 0).astype(acc.dtype),
                             grads_acc, grads)
    stats = jax.tree.map(lambda s: jnp.where(live, metrics["count"] * s, 0), stats)
    return grads_acc, (stats, metrics, ce)

  grads, (stats_A, metrics_A, ce_AxM) = jax.lax.scan(
      body, jax.tree.map(wide, state.params), (jnp.arange(num), micro))
  grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
  batch_stats = jax.tree.map(
      lambda s_A, old: jnp.where(n_real > 0, s_A.sum(0) / denominator, old).astype(old.dtype),
      stats_A, state.batch_stats)
  metrics = jax.tree.map(lambda m_A: m_A.sum(0), metrics_A)
  return grads, batch_stats, metrics, _unsplit(ce_AxM, b)


def eval_logits(state: TrainState, x: jax.Array) -> jax.Array:
  """Logits in evaluation mode (frozen BatchNorm statistics, no dropout, no augmentation); with
  ``state.accumulation_steps > 1`` computed one micro-batch at a time."""
  apply = lambda x: state.model.apply(state.variables, state.preprocess.eval(x), train=False)
  if state.accumulation_steps == 1:
    return apply(x)
  x_AxM = micro_batches({"x": x}, state.accumulation_steps)["x"]
  return _unsplit(jax.lax.map(apply, x_AxM), x.shape[0])


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_metrics(model: nn.Module, preprocess: Preprocess, variables: dict,
                  batch: dict) -> dict[str, jax.Array]:
  logits = model.apply(variables, preprocess.eval(batch["x"]), train=False)
  return metrics_of(logits, per_example_ce(logits, batch["y"]), batch)


def eval_step(state: TrainState, batch: dict) -> dict[str, jax.Array]:
  """Summed metrics of ``batch`` in evaluation mode, jitted on (model, preprocessing, variables)
  only, so runs that differ in optimizer share one compilation."""
  return _eval_metrics(state.model, state.preprocess, state.variables, batch)


jit_train_step = jax.jit(train_step, donate_argnums=0)


# ----------------------------------------------------------------------------------------------
# The epoch loop.
# ----------------------------------------------------------------------------------------------


class NumericalError(RuntimeError):
  """A NaN or inf appeared in a loss, a gradient or a score."""


def summarize(metrics: dict) -> dict[str, float]:
  """Host summary of summed metrics: mean loss and accuracy over the back-propagated examples, and
  the example counts (``forward_count`` defaults to ``count``)."""
  m = {k: float(v) for k, v in jax.device_get(metrics).items()}
  n = max(m["count"], 1.0)
  return {**m, "loss": m["loss_sum"] / n, "accuracy": m["correct"] / n,
          "forward_count": m.get("forward_count", m["count"])}


class EpochResult(NamedTuple):
  """What one pass over an epoch's batches returns: the new states, the summed metrics (on device,
  ``None`` when there was no batch) and the number of steps."""

  state: Any
  pruner_state: Any
  metrics: dict | None
  steps: int


StepFn = Callable[[Any, Any, dict], tuple[Any, Any, dict]]


@jax.jit
def _add_metrics(total: dict, m: dict) -> dict:
  """``total + m`` leaf by leaf in one dispatch (eager ``jnp.add`` per leaf costs a dispatch each,
  which for small models outweighed the step itself)."""
  return jax.tree.map(jnp.add, total, m)


def run_epoch(state: Any, host_batches: Iterable[dict], step_fn: StepFn, mesh=None, *,
              pruner_state: Any = (), metrics: dict | None = None, desc: str = "train",
              after_step: Callable[[int, Any, Any, dict], None] | None = None) -> EpochResult:
  """Trains over ``host_batches`` once: ``step_fn(state, pruner_state, batch) -> (state,
  pruner_state, summed metrics)`` on each batch, sharded over ``mesh``'s ``data`` axis.

  Batches are put on the devices by a background thread two ahead; metrics stay on device, summed
  into ``metrics`` (pass a partial sum to continue a resumed epoch), with one host sync at the end.
  A non-finite loss or gradient then raises :class:`NumericalError` naming ``desc``, the step and
  the ids of its batch. ``after_step(i, state, pruner_state, metrics)`` runs after step ``i``
  (0-based within this call), e.g. to checkpoint or capture a rewind point.
  """
  from prunejax.data.loader import prefetch
  mesh = mesh or parallel.data_mesh()
  put = lambda b: (b["id"][b["mask"]], parallel.shard_batch(b, mesh))
  faults, batch_ids, steps = [], [], 0
  for host_ids, batch in prefetch(iter(host_batches), 2, put):
    state, pruner_state, m = step_fn(state, pruner_state, batch)
    batch_ids.append(host_ids)
    faults.append((m["nonfinite"], m["grad_nonfinite"]))
    metrics = m if metrics is None else _add_metrics(metrics, m)
    if after_step is not None:
      after_step(steps, state, pruner_state, metrics)
    steps += 1
  if faults:
    flags = np.asarray(jax.device_get(faults)).sum(axis=1)  # the epoch's one host sync
    if np.any(flags > 0):
      bad = int(np.argmax(flags > 0))
      raise NumericalError(f"non-finite loss or gradient in {desc}, step {bad + 1} of this pass; "
                           f"examples of that batch: {batch_ids[bad][:16].tolist()}")
  return EpochResult(state, pruner_state, metrics, steps)


def plain_step(step: Callable[[Any, dict], tuple[Any, dict]]) -> StepFn:
  """A ``(state, batch) -> (state, metrics)`` step as a :data:`StepFn` (the pruner state passes
  through unchanged)."""

  def fn(state, pruner_state, batch):
    state, m = step(state, batch)
    return state, pruner_state, m

  return fn


def evaluate(state: TrainState, host_batches: Iterable[dict], mesh=None) -> dict[str, float]:
  """Mean loss and accuracy over ``host_batches`` (padding rows excluded)."""
  mesh = mesh or parallel.data_mesh()
  acc = None
  for batch in host_batches:
    m = eval_step(state, parallel.shard_batch(batch, mesh))
    acc = m if acc is None else _add_metrics(acc, m)
  if acc is None:
    raise ConfigError("evaluate got no batches")
  return summarize(acc)
