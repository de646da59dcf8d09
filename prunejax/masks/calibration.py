"""Calibration: statistics of each prunable layer's input over a small calibration set.

**Statistics.** Per layer, the squared norms of its input features over all calibration rows
(``(G, K)``, Wanda) or their Gram matrix ``X^T X`` (``(G, K, K)``, SparseGPT), streamed over the
batches inside ``jit`` with taps on the layers (:func:`prunejax.layer_taps.run`); padding rows
(``batch["mask"]`` False) and, with ``token_mask_fn``, padding positions of sequences count 0. On
a batch sharded over devices and processes XLA sums them, so the result is the same as on one
device. Layers reading the same activation (attention's ``query``, ``key``, ``value``) share one
input group and one statistic.

**Inputs.** ``x`` may be a pytree; a mapping with ``attention_mask`` (the GPT's Hugging Face-style
input) is its own token mask when ``token_mask_fn`` is None.

The calibration batches are checked here (shapes, masks, NaN or inf in real rows) and kept on
device while pruning. Used by :mod:`prunejax.masks.wanda` and :mod:`prunejax.masks.sparsegpt`;
re-exported by :mod:`prunejax.masks.posttraining`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prunejax import layer_taps as lt
from prunejax import parallel
from prunejax.errors import DataError
from prunejax.layer_rows import conv_geometry, conv_input, conv_rows, dense_rows
from prunejax.masks.pt_layers import (LinearLayer, _analyse, _Analysis, _stage_frames,
                                      _stages)
from prunejax.types import ApplyFn, Batch, FilterFn, Params, batch_mask

MAX_STATS_BYTES = 1 << 28
"""Default bound on the statistics held at once with ``sequential=False`` (256 MiB)."""

_HIGHEST = lax.Precision.HIGHEST


class LayerStats(NamedTuple):
  """Statistics of one layer's input over the calibration rows.

  Attributes:
    norms_sq: ``f32[G, K]``, ``sum_rows x_k^2`` per group and input feature.
    gram: ``f32[G, K, K]``, ``X^T X`` per group, or None when not gathered.
    rows: the number of rows summed (real examples times positions).
  """

  norms_sq: jax.Array
  gram: jax.Array | None
  rows: jax.Array


@dataclasses.dataclass(frozen=True)
class Calibration:
  """What :func:`calibrate` gathered.

  Attributes:
    layers: the prunable layers in program order.
    stats: layer name -> its :class:`LayerStats` (layers of one input group share the object).
    ids: the ids of the real calibration examples seen, sorted.
  """

  layers: tuple[LinearLayer, ...]
  stats: dict[str, LayerStats]
  ids: np.ndarray


# ----------------------------------------------------------------------------------------------
# Statistics: a tap per input group, summed over the batches inside jit.
# ----------------------------------------------------------------------------------------------


def _row_weights(w_B: jax.Array, tok: jax.Array | None, n: int) -> jax.Array:
  """``(B, N)`` weights of a dense layer's rows: the example mask, times the token mask when the
  layer sees one row per position."""
  if tok is not None and tok.shape[1] == n:
    return w_B[:, None] * tok
  return jnp.broadcast_to(w_B[:, None], (w_B.shape[0], n))


def _layer_stats(layer: lt.Layer, act: jax.Array, w_B: jax.Array, tok: jax.Array | None,
                 gram: bool) -> LayerStats:
  if layer.kind == "conv":
    geo = conv_geometry(layer)
    u, spec = conv_rows(geo, conv_input(geo, act))
    u = u.astype(jnp.float32)
    uw = u * w_B.reshape((-1,) + (1,) * (u.ndim - 1))
    positions = u.shape[1] if spec == "bpgk" else u.shape[-1]
    rows = jnp.sum(w_B) * positions
    other = spec.replace("k", "l")
  else:
    u = dense_rows(layer, act).astype(jnp.float32)  # (B, G, N, K)
    wt = _row_weights(w_B, tok, u.shape[2])
    uw, rows = u * wt[:, None, :, None], jnp.sum(wt)
    spec, other = "bgnk", "bgnl"
  if not gram:
    return LayerStats(jnp.einsum(f"{spec},{spec}->gk", uw, u, precision=_HIGHEST), None, rows)
  g = jnp.einsum(f"{spec},{other}->gkl", uw, u, precision=_HIGHEST)
  return LayerStats(jnp.diagonal(g, axis1=1, axis2=2), g, rows)


def _batch_stats(params: Params, batch: Batch, *, apply_fn: ApplyFn, reps: tuple[int, ...],
                 gram: bool, token_mask_fn: Callable | None) -> dict:
  x = batch["x"]
  plan = lt.find_layers(apply_fn, params, x)
  w_B = batch_mask(batch, lt.batch_size(x)).astype(jnp.float32)
  tok = None if token_mask_fn is None else jnp.asarray(token_mask_fn(x)).astype(jnp.float32)

  def tap(layer, act, out):
    return out, _layer_stats(layer, act, w_B, tok, gram)

  _, records = lt.run(plan, params, x, layer_taps={k: tap for k in reps})
  return records


_STATIC = ("apply_fn", "reps", "gram", "token_mask_fn")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _accumulate(acc: dict, params: Params, batch: Batch, **static) -> dict:
  return jax.tree.map(jnp.add, acc, _batch_stats(params, batch, **static))


def _gather(params: Params, batches: list[dict], an: _Analysis, **static) -> dict:
  """Plan index of each group's first layer (``reps``) -> its :class:`LayerStats` summed over
  ``batches``."""
  shape = {layer.index: layer.shape for layer in an.layers}
  acc = {}
  for k in static["reps"]:
    g, kk, _ = shape[k]
    acc[k] = LayerStats(jnp.zeros((g, kk), jnp.float32),
                        jnp.zeros((g, kk, kk), jnp.float32) if static["gram"] else None,
                        jnp.zeros((), jnp.float32))
  for batch in batches:
    acc = _accumulate(acc, params, batch, **static)
  return acc


# ----------------------------------------------------------------------------------------------
# The calibration batches: checked, on device, of one shape.
# ----------------------------------------------------------------------------------------------


def _at_least_two_rows(b: dict) -> dict:
  """A one-example batch as two rows, the second a masked copy of the first (id -1).

  :func:`prunejax.layer_taps.find_layers` tells the example axis by tracing at ``B`` and ``2B``,
  and some functions trace differently at ``B = 1`` (``jnp.take_along_axis`` over a size-1 axis,
  as the GPT's last-token read): with two rows they do not. A masked row adds nothing to any
  statistic (rows are weighted by ``mask``). Several processes pass their own rows: left as is.
  """
  if jax.process_count() > 1 or lt.batch_size(b["x"]) != 1:
    return b
  twice = lambda v: (np.concatenate([v, v]) if isinstance(v, np.ndarray)
                     else jnp.concatenate([v, v]))
  out = {"x": jax.tree.map(twice, b["x"])}
  first = bool(np.asarray(b["mask"]).reshape(-1)[0]) if "mask" in b else True
  out["mask"] = np.array([first, False])
  if "id" in b:
    out["id"] = np.array([int(np.asarray(b["id"]).reshape(-1)[0]), -1], np.int64)
  return out


@jax.jit
def _finite_rows(x: Any) -> jax.Array:
  """bool[B]: rows whose float inputs are all finite."""
  ok_B = jnp.ones((lt.batch_size(x),), bool)
  for leaf in jax.tree.leaves(x):
    if jnp.issubdtype(leaf.dtype, jnp.inexact):
      ok_B &= jnp.all(jnp.isfinite(leaf).reshape(leaf.shape[0], -1), axis=1)
  return ok_B


def _check_batch(b: int, batch: Batch) -> Batch:
  """Calibration input checks: a NaN or inf in a real row would turn every statistic it touches
  into NaN (Wanda then ranks NaN scores, SparseGPT reports a Hessian that is not positive
  definite), so it is refused here, naming the batch and the ids. Padding rows count for nothing,
  whatever they hold: non-finite ones are zeroed (a weight of 0 times NaN is still NaN)."""
  rows = lt.batch_size(batch["x"]) if jax.tree.leaves(batch["x"]) else 0
  if not rows:
    raise DataError(f"calibration batch {b}: 'x' has no rows")
  for key in ("mask", "id", "y"):
    if key in batch and tuple(np.shape(batch[key])) != (rows,):
      raise DataError(f"calibration batch {b}: {key!r} has shape {tuple(np.shape(batch[key]))}; "
                      f"expected ({rows},), one value per row of 'x'")
  mask = batch.get("mask")
  if mask is not None:
    m = np.asarray(parallel.gather(mask) if isinstance(mask, jax.Array) else mask)
    if m.dtype != bool or m.ndim != 1:
      raise DataError(f"calibration batch {b}: 'mask' must be bool[B]; got dtype {m.dtype}, shape "
                      f"{m.shape}")
  ok = parallel.gather(_finite_rows(batch["x"]))
  bad = ~ok if mask is None else ~ok & m
  if bad.any():
    ids = batch.get("id")
    if ids is not None:
      ids = np.asarray(parallel.gather(ids) if isinstance(ids, jax.Array) else ids)
    where = (f"ids {ids[bad][:5].tolist()}" if ids is not None and ids.shape == bad.shape
             else f"rows {np.flatnonzero(bad)[:5].tolist()}")
    raise DataError(f"calibration batch {b}: 'x' has NaN or inf in {int(bad.sum())} real rows "
                    f"({where}); clean or drop them before calibrating")
  if not ok.all():  # only padding rows: zero them.
    keep_B = jnp.asarray(ok)
    zero = lambda v: (jnp.where(keep_B.reshape((-1,) + (1,) * (v.ndim - 1)), v, 0)
                      if jnp.issubdtype(v.dtype, jnp.inexact) else v)
    batch = dict(batch, x=jax.tree.map(zero, batch["x"]))
  return batch


def _device_batches(batches: Iterable[Batch], mesh: Any) -> tuple[list[dict], np.ndarray]:
  """The calibration batches on device (sharded over ``mesh`` when given as host arrays) and
  the ids of their real rows. The calibration set is small by design, so it is kept."""
  out, ids = [], []
  for batch in batches:
    if "x" not in batch:
      raise DataError(f"a calibration batch needs 'x'; got keys {sorted(batch)}")
    batch = _check_batch(len(out), batch)
    b = _at_least_two_rows({k: batch[k] for k in ("x", "mask", "id") if k in batch})
    if any(isinstance(v, np.ndarray) for v in jax.tree.leaves(b)):
      b = parallel.shard_batch(b, mesh or parallel.data_mesh())
    out.append(b)
    if "id" in b:
      real = parallel.gather(b["mask"]).astype(bool) if "mask" in b else slice(None)
      ids.append(parallel.gather(b["id"])[real])
  if not out:
    raise DataError("the calibration batches are empty; pass at least one batch")
  shapes = {str(jax.tree.map(jnp.shape, b["x"])) for b in out}
  if len(shapes) > 1:
    raise DataError(f"calibration batches have different shapes {sorted(shapes)}; pad them to "
                    "one batch size (prunejax.data.batches does)")
  return out, np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def _token_mask_fn(token_mask_fn: Callable | None, x: Any) -> Callable | None:
  """``token_mask_fn``, or for a mapping input with an ``attention_mask``, that mask."""
  if token_mask_fn is None and isinstance(x, Mapping) and "attention_mask" in x:
    return _attention_mask_of
  return token_mask_fn


def _attention_mask_of(x: Mapping) -> Any:
  return x["attention_mask"]


# ----------------------------------------------------------------------------------------------
# Public entry points.
# ----------------------------------------------------------------------------------------------


def calibrate(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], *, gram: bool = True,
              filter_fn: FilterFn | None = None, token_mask_fn: Callable | None = None,
              mesh: Any = None) -> Calibration:
  """Input statistics of every prunable layer of ``apply_fn`` on the calibration batches.

  One pass over ``batches`` with the dense ``params`` (for SparseGPT's sequential mode, which
  calibrates each layer on the pruned layers before it, use :func:`sparsegpt` directly).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` over exactly ``params``.
    params: the trained params (replicated over ``mesh``).
    batches: dicts with ``x`` (and ``mask``, ``id``), host arrays (sharded over ``mesh``, each
      process passing its rows) or device arrays; all of one shape.
    gram: also gather the Gram matrices ``X^T X`` (SparseGPT); else only the norms (Wanda).
    filter_fn: the prunable leaves (default :data:`linear_filter_fn`).
    token_mask_fn: ``token_mask_fn(x) -> bool[B, T]``, False at padding positions of a sequence;
      applied to every dense layer that sees ``T`` rows per example.
    mesh: the device mesh of host batches (default: all devices on a ``data`` axis).

  Returns:
    A :class:`Calibration`.

  Raises:
    ConfigError: the filter selects no leaf, or a leaf that is not a dense or conv weight.
    DataError: no batches, or batches of different shapes.
  """
  batches, ids = _device_batches(batches, mesh)
  an = _analyse(apply_fn, params, batches[0]["x"], filter_fn, "calibrate")
  reps = tuple(ks[0] for ks in an.groups)
  got = _gather(params, batches, an, apply_fn=apply_fn, reps=reps, gram=gram,
                token_mask_fn=_token_mask_fn(token_mask_fn, batches[0]["x"]))
  stats = {layer.name: got[an.groups[layer.group][0]] for layer in an.layers}
  return Calibration(an.layers, stats, ids)


def calibration_nbytes(apply_fn: ApplyFn, params: Params, x: Any, *, gram: bool = True,
                       filter_fn: FilterFn | None = None) -> dict[str, int]:
  """Bytes of the calibration statistics, from shapes alone (nothing is allocated or compiled).

  Args:
    apply_fn, params, x: as :func:`calibrate` (``jax.ShapeDtypeStruct`` leaves are enough).
    gram: with the Gram matrices (SparseGPT) or the norms only (Wanda).
    filter_fn: the prunable leaves.

  Returns:
    ``{"largest_group": ..., "all_groups": ...}``: the float32 statistics of the largest input
    group (all that :func:`sparsegpt` and :func:`wanda` hold at once in sequential mode) and of
    all groups together (what :func:`calibrate` returns).
  """
  an = _analyse(apply_fn, params, x, filter_fn, "calibration_nbytes")
  shape = {layer.index: layer.shape for layer in an.layers}
  sizes = []
  for ks in an.groups:
    g, k, _ = shape[ks[0]]
    sizes.append(4 * (g * k * (k + 1 if gram else 1) + 1))
  return {"largest_group": max(sizes), "all_groups": sum(sizes)}


def _dense_stats(what: str, apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], *,
                 gram: bool, filter_fn: FilterFn | None, token_mask_fn: Callable | None,
                 mesh: Any, max_stats_bytes: int = MAX_STATS_BYTES):
  """Yields ``(an, x, ks, frames, stats by layer)`` stage by stage on the dense model."""
  batches, _ = _device_batches(batches, mesh)
  x = batches[0]["x"]
  an = _analyse(apply_fn, params, x, filter_fn, what)
  for stage in _stages(an, False, gram, max_stats_bytes):
    reps = tuple(an.groups[g][0] for g in stage)
    got = _gather(params, batches, an, apply_fn=apply_fn, reps=reps, gram=gram,
                  token_mask_fn=_token_mask_fn(token_mask_fn, x))
    ks = tuple(k for g in stage for k in an.groups[g])
    frames = _stage_frames(params, x, apply_fn=apply_fn, ks=ks)
    yield an, x, ks, frames, {k: got[an.groups[g][0]] for g in stage for k in an.groups[g]}
