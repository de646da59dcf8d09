"""One compiled program per run and per sweep: device-resident data, K steps per dispatch, and
replicas of a run in one ``vmap``-ed program.

A training run on a small dataset spends most of its wall time on the host: one dispatch, one
batch assembly and one transfer per step. Here the split lives on the device (:func:`to_device`),
an epoch is a table of row numbers ``rows_SxB`` (:func:`epoch_rows`; -1 marks padding), and
:func:`make_runner` runs ``K`` steps of any ``(state, pruner_state, batch) -> (state, pruner_state,
metrics)`` step inside one ``lax.scan``, gathering each batch by row on the device.

Equality with the host loader: :func:`epoch_rows` orders an epoch with the loader's own permutation
(:func:`prunejax.data.loader.epoch_order`, from ``(seed, epoch)``) and a gathered batch has the
loader's keys, dtypes and padding (zero inputs, label 0, id -1, ``mask`` False, ``epoch`` on every
row), so each step sees the same examples in the same order with the same augmentation (keyed by
run key, epoch and id) as on the host path. The order is drawn on the host (one permutation of N
integers per epoch, microseconds) rather than on the device, so that the two paths cannot drift
apart; the rows travel once per epoch.

Chunks: a chunk is ``K`` scanned steps of which the first ``num_live`` run; the others are skipped
by ``lax.cond``. So one compiled program serves every epoch length (a subset's, InfoBatch's
shrinking epochs), a remainder, and chunk boundaries placed where the host must look (a rewind
step, a checkpoint).

Replicas: with ``replicas=True`` the state, pruner state, rows and ``num_live`` carry a leading
replica axis ``R`` and the step is ``vmap``-ed; the data are shared. With several devices the
replica axis can be split over a ``replica`` mesh axis (:func:`replica_sharding`), ensemble
parallelism.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prunejax.errors import ConfigError, DataError, check_positive_int

REPLICA_AXIS = "replica"
_INT32_MAX = np.iinfo(np.int32).max

StepFn = Callable[[Any, Any, dict], tuple[Any, Any, dict]]


class DeviceData(NamedTuple):
  """A split on the device, row ``i`` holding example ``id[i]``: inputs in their stored dtype
  (uint8 images stay uint8, tokens int32), labels i32[N], ids i32[N]."""

  x: jax.Array
  y: jax.Array
  id: jax.Array

  @property
  def nbytes(self) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in self))


def source_nbytes(source) -> int:
  """Bytes the split ``source`` takes on the device (inputs, labels, ids), from its spec."""
  shape, dtype = source.spec["x"]
  per_example = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize + 8
  return per_example * len(source)


def fits(source, budget_bytes: int) -> bool:
  """Whether ``source`` fits ``budget_bytes`` on one device."""
  return source_nbytes(source) <= budget_bytes


def to_device(source, *, budget_bytes: int | None = None, mesh: Mesh | None = None,
              what: str = "the training split") -> DeviceData:
  """Reads all of ``source`` and places it on the devices (replicated over ``mesh``).

  Args:
    source: a :class:`prunejax.data.Source` (any: in memory, records, array_record files).
    budget_bytes: refuse a split larger than this (None: no limit).
    mesh: replicate over this mesh's devices (default: the first device).
    what: names the split in errors.

  Raises:
    ConfigError: the split does not fit ``budget_bytes`` (naming both sizes).
    DataError: ids outside int32 (the device keeps ids as int32).
  """
  need = source_nbytes(source)
  if budget_bytes is not None and need > budget_bytes:
    raise ConfigError(f"dataset.device_resident='on' but {what} takes {need / 2**20:.1f} MiB on the "
                      f"device, over the budget of {budget_bytes / 2**20:.1f} MiB "
                      "(dataset.device_budget_mb); use 'auto' or 'off'")
  ids = np.asarray(source.ids, np.int64)
  if len(ids) and (ids.min() < 0 or ids.max() > _INT32_MAX):
    raise DataError(f"ids of {what} must lie in [0, 2**31) to live on the device; got "
                    f"{int(ids.min())} to {int(ids.max())}")
  got = source.read(ids)
  host = DeviceData(np.asarray(got["x"]), np.asarray(got["y"], np.int32), ids.astype(np.int32))
  sharding = NamedSharding(mesh, P()) if mesh is not None else jax.devices()[0]
  return DeviceData(*jax.device_put(tuple(host), sharding))


class EpochRows(NamedTuple):
  """One epoch as row numbers: ``rows_SxB`` (i32, -1 on padding rows), the per-example
  ``columns`` as ``[S, B]`` arrays (0 on padding), and the epoch's ids in visiting order."""

  rows_SxB: np.ndarray
  columns: dict
  ordered_ids: np.ndarray

  @property
  def steps(self) -> int:
    return self.rows_SxB.shape[0]

  def batch_ids(self, step: int) -> np.ndarray:
    """The ids of the real rows of batch ``step`` (for error messages)."""
    b = self.rows_SxB.shape[1]
    return self.ordered_ids[step * b:(step + 1) * b]


def epoch_rows(index, ids: np.ndarray, *, batch_size: int, seed: int, epoch: int,
               shuffle: bool = True, columns: dict | None = None) -> EpochRows:
  """The rows of one epoch over ``ids``, batch by batch, in the host loader's order.

  Args:
    index: the source's :class:`prunejax.data.IdIndex` (``source.index``).
    ids: the epoch's example ids (an online pruner's plan).
    batch_size: rows per batch; the last batch is padded with rows -1.
    seed, epoch, shuffle: the order, as :func:`prunejax.data.batches` draws it.
    columns: per-example arrays aligned with ``ids`` (e.g. InfoBatch's ``weight``).

  Raises:
    DataError: ids that are not in the source.
  """
  from prunejax.data.loader import _positions
  check_positive_int("train.batch_size", batch_size)
  ids = np.asarray(ids, np.int64)
  pos = _positions(len(ids), seed, epoch, shuffle)
  ordered = ids[pos]
  steps = -(-len(ids) // batch_size)
  rows = np.full(steps * batch_size, -1, np.int32)
  rows[:len(ids)] = index.rows(ordered)
  cols = {}
  for name, values in (columns or {}).items():
    values = np.asarray(values)
    if len(values) != len(ids):
      raise ConfigError(f"column {name!r} has {len(values)} values for {len(ids)} ids")
    col = np.zeros((steps * batch_size,) + values.shape[1:], values.dtype)
    col[:len(ids)] = values[pos]
    cols[name] = col.reshape((steps, batch_size) + values.shape[1:])
  return EpochRows(rows.reshape(steps, batch_size), cols, ordered)


def gather_batch(data: DeviceData, rows_B: jax.Array, columns_B: dict, epoch: jax.Array) -> dict:
  """The batch of rows ``rows_B`` (-1: padding) as the host loader builds it."""
  mask_B = rows_B >= 0
  r = jnp.maximum(rows_B, 0)
  x = jnp.take(data.x, r, axis=0)
  x = jnp.where(mask_B.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
  return {"x": x, "y": jnp.where(mask_B, jnp.take(data.y, r), 0),
          "id": jnp.where(mask_B, jnp.take(data.id, r), -1), "mask": mask_B,
          "epoch": jnp.full(rows_B.shape, epoch, jnp.int32), **columns_B}


class ChunkResult(NamedTuple):
  """What a chunk returns: the states, the summed metrics of its live steps, and the fault flags
  f32[K] of each step (non-finite losses plus a non-finite gradient; 0 on skipped steps)."""

  state: Any
  pruner_state: Any
  metrics: dict
  flags: jax.Array


def make_runner(step_fn: StepFn, *, replicas: bool = False, mesh: Mesh | None = None
                ) -> Callable[..., ChunkResult]:
  """A jitted ``chunk(state, pruner_state, data, rows_KxB, columns_KxB, epoch, num_live,
  metrics=None)`` that runs the first ``num_live`` of ``K`` steps of ``step_fn`` in one
  ``lax.scan``, adding each step's metrics to ``metrics`` (the epoch's running sums; None: start
  from zero, a program of its own; :func:`zero_metrics` starts from zero in the same program as
  every later chunk) one after another, so the sums do not depend on where chunks end and equal
  the host loop's step-by-step sums.

  ``step_fn(state, pruner_state, batch) -> (state, pruner_state, summed metrics)`` is any pure step
  whose metrics include ``nonfinite`` and ``grad_nonfinite`` (:func:`prunejax.train.train_step`
  and the online pruners' steps). The states are donated. With ``replicas``, every argument but
  ``data``, ``epoch`` and ``num_live`` has a leading replica axis and the step is ``vmap``-ed. With a ``mesh`` of
  several devices on a ``data`` axis, each gathered batch is split over it (data parallelism).
  """
  return _runner(step_fn, replicas, mesh)


@functools.lru_cache(maxsize=64)
def _runner(step_fn: StepFn, replicas: bool, mesh: Mesh | None):
  from prunejax import parallel
  shard = (mesh is not None and mesh.devices.size > 1 and not replicas
           and parallel.DATA_AXIS in mesh.axis_names)

  def chunk(state, pstate, data, rows_KxB, columns_KxB, epoch, num_live, metrics=None):
    def run(i, state, pstate, rows_B, columns_B):
      batch = gather_batch(data, rows_B, columns_B, epoch)
      if shard:
        batch = jax.lax.with_sharding_constraint(batch, parallel.batch_sharding(mesh))
      return _traced_once(step_fn)(state, pstate, batch)

    def body(carry, xs):
      state, pstate, total = carry
      i, rows_B, columns_B = xs

      def live(operand):
        state, pstate = operand
        new_state, new_pstate, m = run(i, state, pstate, rows_B, columns_B)
        return new_state, new_pstate, m

      def skip(operand):
        state, pstate = operand
        return state, pstate, zeros

      state, pstate, m = jax.lax.cond(i < num_live, live, skip, (state, pstate))
      total = jax.tree.map(jnp.add, total, m)
      return (state, pstate, total), m["nonfinite"] + m["grad_nonfinite"]

    k = rows_KxB.shape[0]
    if k == 1:  # one step, always live: no control flow (see control_flow_is_slow)
      state, pstate, m = run(0, state, pstate, rows_KxB[0], {c: v[0] for c, v in columns_KxB.items()})
      total = m if metrics is None else jax.tree.map(jnp.add, metrics, m)
      return ChunkResult(state, pstate, total, (m["nonfinite"] + m["grad_nonfinite"])[None])
    if metrics is None:
      # The first step's metrics start the sum (0 + m is m exactly, as the host loop's first).
      metrics = zero_metrics(step_fn, state, pstate, data, rows_KxB, columns_KxB)
    # A skipped step adds zeros of the sums' structure: the step is traced once, inside the cond
    # (tracing a large model's step is as slow as compiling it at a low optimization level).
    zeros = jax.tree.map(jnp.zeros_like, metrics)
    (state, pstate, total), flags_K = jax.lax.scan(
        body, (state, pstate, metrics), (jnp.arange(k), rows_KxB, columns_KxB))
    return ChunkResult(state, pstate, total, flags_K)

  if replicas:
    # num_live is shared: the replicas of one program step together, so a skipped step stays a
    # cond (skipped for all) instead of becoming a select that computes it anyway.
    vchunk = jax.vmap(chunk, in_axes=(0, 0, None, 0, 0, None, None, 0))

    def chunk(state, pstate, data, rows_KxB, columns_KxB, epoch, num_live, metrics=None):
      return vchunk(state, pstate, data, rows_KxB, columns_KxB, epoch, num_live, metrics)
  return jax.jit(chunk, donate_argnums=(0, 1))


def zero_metrics(step_fn: StepFn, state, pstate, data: DeviceData, rows_KxB, columns_KxB, *,
                 replicas: bool = False) -> dict:
  """Zero sums of ``step_fn``'s metrics, to pass as the ``metrics`` that start an epoch of a
  :func:`make_runner` chunk: then every chunk of the epoch calls one program (with ``None``, the
  first chunk is a program of its own). Takes the chunk's first five arguments; traces one step."""
  first = _first_step(step_fn, data)
  one = lambda *args: first(*args)[2]
  shapes = jax.eval_shape(jax.vmap(one) if replicas else one, state, pstate, rows_KxB, columns_KxB)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def control_flow_is_slow(step_fn: StepFn, state, pstate, data: DeviceData, rows_KxB,
                         columns_KxB) -> bool:
  """Whether the step should not run inside ``lax.scan`` / ``lax.cond`` on this backend: on CPU,
  XLA runs convolutions inside control flow about 10x slower than at the top level of a program
  (measured: a ResNet-18 step 0.09 s alone, 0.83 s inside a scan or a cond, no XLA flag helps),
  so a step with a convolution runs one per dispatch there. GPUs and TPUs have no such penalty.
  Takes the chunk's first five arguments (one replica's) and traces one step, the trace that
  :func:`zero_metrics` and the chunk then reuse."""
  if jax.default_backend() != "cpu":
    return False
  jaxpr = jax.make_jaxpr(_first_step(step_fn, data))(state, pstate, rows_KxB, columns_KxB)
  return "conv_general_dilated" in str(jaxpr)


def _first_step(step_fn: StepFn, data: DeviceData) -> Callable:
  """``(state, pstate, rows_KxB, columns_KxB) -> step_fn's outputs`` on the chunk's first batch,
  gathered as the chunk gathers it (so the step sees the same input types, shardings included)."""
  def first(state, pstate, rows_KxB, columns_KxB):
    batch = gather_batch(data, rows_KxB[0], {c: v[0] for c, v in columns_KxB.items()}, 0)
    return _traced_once(step_fn)(state, pstate, batch)
  return first


@functools.lru_cache(maxsize=64)
def _traced_once(step_fn: StepFn) -> StepFn:
  """``step_fn`` under ``jit``, one per step: JAX caches a jitted function's trace by its input
  types, so :func:`control_flow_is_slow`, :func:`zero_metrics` and the chunk (inside its scan and
  cond, or under ``vmap``) trace the step once between them rather than once each. Tracing a Flax
  ResNet or GPT step costs about as much as compiling it at a low optimization level. The nested
  ``jit`` is inlined when XLA compiles the chunk: the program is the same."""
  return jax.jit(step_fn)


def check_steps_per_dispatch(k: int) -> int:
  """``train.steps_per_dispatch``: 0 (one epoch per dispatch) or a positive integer."""
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 0:
    raise ConfigError(f"train.steps_per_dispatch={k!r} is not allowed; expected 0 (a whole epoch "
                      "per dispatch) or a positive integer")
  return int(k)


def chunks(num_steps: int, k: int, breaks: tuple[int, ...] = ()) -> list[tuple[int, int]]:
  """``(start, length)`` of the chunks of an epoch of ``num_steps`` steps: at most ``k`` steps
  each, also ending just before each step index in ``breaks`` (where the host must look at the
  state, e.g. a rewind step or a checkpoint)."""
  cuts = sorted({0, num_steps} | {b for b in breaks if 0 < b < num_steps})
  out = []
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    for s in range(lo, hi, k):
      out.append((s, min(k, hi - s)))
  return out


def pad_steps(a: np.ndarray, start: int, length: int, k: int, fill) -> np.ndarray:
  """Steps ``[start, start + length)`` of a ``[S, ...]`` array, padded with ``fill`` to ``k``."""
  out = np.full((k,) + a.shape[1:], fill, a.dtype)
  out[:length] = a[start:start + length]
  return out


def stack(trees: list) -> Any:
  """Trees of equal structure stacked on a new leading (replica) axis."""
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def unstack(tree: Any, n: int) -> list:
  """The inverse of :func:`stack`."""
  return [jax.tree.map(lambda x, i=i: x[i], tree) for i in range(n)]


def replica_sharding(num_replicas: int, devices: list | None = None) -> NamedSharding | None:
  """A sharding that splits a leading replica axis over a ``replica`` mesh axis: over as many
  devices as divide ``num_replicas`` (None with one device: nothing to split)."""
  devices = jax.devices() if devices is None else list(devices)
  n = max(d for d in range(1, len(devices) + 1) if num_replicas % d == 0)
  if n == 1:
    return None
  return NamedSharding(Mesh(np.asarray(devices[:n]), (REPLICA_AXIS,)), P(REPLICA_AXIS))
