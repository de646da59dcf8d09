"""Post-training pruning from a small calibration set: Wanda and SparseGPT.

Both prune a trained model in one shot, layer by layer, from statistics of each linear layer's
input on a few examples (the papers use 128 sequences), without retraining:

* **Wanda** (Sun et al. 2023) scores ``|W_ij| * ||X_j||_2`` (``X_j``: input feature ``j`` over all
  calibration rows) and prunes the lowest scores, per output row by default. No weight update.
* **SparseGPT** (Frantar & Alistarh 2023, Algorithm 1) reconstructs each layer's output
  ``W X`` with optimal-brain-surgeon updates: columns are pruned left to right and each pruned
  weight's error is spread over the columns not yet visited through the upper Cholesky factor
  ``U`` of the damped inverse Hessian ``(X^T X + lambda I)^-1`` (``lambda`` = ``damp`` times the
  mean diagonal), applied lazily block by block; the mask is chosen every ``blocksize`` columns
  from ``w^2 / U_jj^2`` (adaptive mask selection), or inside every group of ``m`` columns for N:M.

**Layers.** Any ``apply_fn(params, x)`` works: :func:`prunejax.layer_taps.find_layers` finds in its
jaxpr where each parameter leaf meets the batch as a dense (``dot_general``) or conv layer. Each
layer's weight is seen in its frame ``(G, K, E)``: ``G`` groups (conv feature groups, dot-batch
dims), ``K`` inputs (contracted features; conv: kernel offset x input channel of the group), ``E``
outputs, whatever the leaf's layout (Flax ``(in, out)``, Equinox and PyTorch ``(out, in)``, conv
``HWIO`` or ``OIHW``, ``DenseGeneral``). Masks and updated weights go back to the leaf through the
transpose of the linear map from leaf to frame. The prunable leaves are ``filter_fn``'s (default
:data:`linear_filter_fn`: weights and kernels, not embeddings, as in both papers); a chosen leaf
used any other way (an embedding lookup, twice, inside ``scan``) is a one-line error.

**Statistics.** Per layer, the squared norms of its input features over all calibration rows
(``(G, K)``, Wanda) or their Gram matrix ``X^T X`` (``(G, K, K)``, SparseGPT), streamed over the
batches inside ``jit`` with taps on the layers (:func:`prunejax.layer_taps.run`); padding rows
(``batch["mask"]`` False) and, with ``token_mask_fn``, padding positions of sequences count 0. On
a batch sharded over devices and processes XLA sums them, so the result is the same as on one
device. Layers reading the same activation (attention's ``query``, ``key``, ``value``) share one
input group and one statistic.

**Orders.** ``sequential="block"`` is what both papers' code does (SparseGPT's ``opt_sequential``,
Wanda's ``prune_wanda``): transformer block by block, every layer of a block calibrated at once on
the block's dense weights, its inputs the outputs of the already pruned (for SparseGPT, updated)
blocks before it; then the whole block is pruned. Blocks come from the layer names
(:func:`default_block_fn`: ``block_3/attn/query/kernel`` is in ``block_3``, ``h/3/...`` in
``h/3``; a layer outside any numbered block, such as the head, is a block of its own) or from
``block_fn``. ``sequential=True`` (or ``"group"``, the default) is finer: input group by input
group in program order, each calibrated on the outputs of every pruned layer before it (inside a
block too; GPTQ's ``true-sequential``), with only one group's statistics held at a time.
``sequential=False`` calibrates every layer on the dense model, holding statistics of at most
``max_stats_bytes`` at once.

**Inputs.** ``x`` may be a pytree; a mapping with ``attention_mask`` (the GPT's Hugging Face-style
input) is its own token mask when ``token_mask_fn`` is None.

References:
  Sun, Liu, Bair, Kolter. "A Simple and Effective Pruning Approach for Large Language Models."
  ICLR 2024 (arXiv:2306.11695, 2023).
  Frantar, Alistarh. "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot."
  ICML 2023 (arXiv:2301.00774).
  Hassibi, Stork. "Second order derivatives for network pruning: Optimal Brain Surgeon." NeurIPS
  1992.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import jax.scipy.linalg
import numpy as np
from jax import lax

from prunejax import layer_taps as lt
from prunejax import parallel
from prunejax.errors import ConfigError, DataError, check_choice, check_positive_int
from prunejax.layer_rows import conv_geometry, conv_input, conv_rows, dense_rows
from prunejax.masks.core import (make_filter_fn, nothing_selected_error, num_to_prune, path_str,
                                 threshold_mask_flags)
from prunejax.masks.distributions import layer_sparsities
from prunejax.types import ApplyFn, Batch, FilterFn, Mask, Params, PyTree, batch_mask

SCOPES = ("row", "layerwise", "global")
"""Where a sparsity applies: each output row of each layer, each layer, or all layers together."""
linear_filter_fn: FilterFn = make_filter_fn(embeddings=False)
"""The default prunable leaves of :func:`wanda` and :func:`sparsegpt`: weight matrices and conv
kernels (the classifier head included), not embeddings, biases, norms or position tables."""
MAX_STATS_BYTES = 1 << 28
"""Default bound on the statistics held at once with ``sequential=False`` (256 MiB)."""
_HIGHEST = lax.Precision.HIGHEST
_KINDS = ("dense", "conv")


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


class LinearLayer(NamedTuple):
  """A prunable layer: a dense or conv layer whose weight is (part of) a prunable leaf.

  Attributes:
    name: the leaf's path (``a/b/kernel``), with ``#i`` appended when the leaf feeds several layers
      (slices of a fused weight).
    index: the layer's key in the :class:`prunejax.layer_taps.LayerPlan`.
    leaf: the leaf's index in ``jax.tree.leaves(params)``.
    kind: ``"dense"`` or ``"conv"``.
    shape: ``(G, K, E)`` of its weight frame.
    group: its input group (layers reading the same activation share one).
  """

  name: str
  index: int
  leaf: int
  kind: str
  shape: tuple[int, int, int]
  group: int


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
# Layers: which leaves are prunable linear layers, their frames and input groups.
# ----------------------------------------------------------------------------------------------


class _Analysis(NamedTuple):
  layers: tuple[LinearLayer, ...]        # program order
  flags: tuple[bool, ...]                # prunable leaves
  groups: tuple[tuple[int, ...], ...]    # per input group, its layers' plan indices


# The only use of layer_taps' private walker: it has no public hook that returns a layer's weight
# operand (the leaf seen through reshapes, transposes, slices and casts). This class and
# _operands are the place to change if that walker changes or such a hook appears.
class _OperandWalker(lt._Walker):  # pylint: disable=protected-access
  """The parameter-side walk of :func:`prunejax.layer_taps.site_values`, recording the weight
  operand of the wanted layers (the value the layer's equation multiplies the batch by)."""

  def __init__(self, plan: lt.LayerPlan, wanted: frozenset):
    super().__init__(plan.axes, "params", plan)
    self.wanted, self.operands = wanted, {}

  def _frontier(self, eqn, in_metas, in_vals, p_idx, out_axis):
    if self.k in self.wanted:
      self.operands[self.k] = in_vals[1 - self.plan.layers[self.k].act_index]
    return super()._frontier(eqn, in_metas, in_vals, p_idx, out_axis)


def _operands(plan: lt.LayerPlan, params: Params, ks: Iterable[int]) -> dict:
  walker = _OperandWalker(plan, frozenset(ks))
  x_metas = [lt._X] * plan.num_x  # pylint: disable=protected-access
  walker.run(plan.jaxpr, plan.consts, plan.leaf_metas + x_metas,
             jax.tree.leaves(params) + [None] * plan.num_x)
  return walker.operands


def _to_frame(layer: lt.Layer, w: jax.Array) -> jax.Array:
  """A layer's weight operand as ``(G, K, E)`` in the order of :mod:`prunejax.layer_rows`' rows."""
  if layer.kind == "conv":
    _, rhs, _ = layer.eqn.params["dimension_numbers"]
    groups = layer.eqn.params["feature_group_count"]
    w = jnp.transpose(w, tuple(rhs[2:]) + (rhs[1], rhs[0]))
    return jnp.transpose(w.reshape(-1, groups, w.shape[-1] // groups), (1, 0, 2))
  (lc, rc), (lb, rb) = layer.eqn.params["dimension_numbers"]
  contract, batch = (lc, lb) if layer.act_index == 1 else (rc, rb)
  free = [d for d in range(w.ndim) if d not in contract and d not in batch]
  g = math.prod(w.shape[d] for d in batch)
  k = math.prod(w.shape[d] for d in contract)
  return jnp.transpose(w, list(batch) + list(contract) + free).reshape(g, k, -1)


def _frames(plan: lt.LayerPlan, params: Params, ks: Sequence[int]) -> dict:
  ops = _operands(plan, params, ks)
  return {k: _to_frame(plan.layers[k], ops[k]) for k in ks}


def _abstract(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _use_error(what: str, name: str, plan: lt.LayerPlan, uses: list) -> ConfigError:
  kinds = {plan.layers[k].kind if u == "layer" else u for u, k in uses}
  how = ("not used by apply_fn" if not uses else "an embedding lookup" if kinds == {"embed"} else
         "broadcast over the batch like a bias" if kinds == {"site"} else
         "used outside one dense or conv layer (twice, inside scan or a custom derivative)")
  return ConfigError(f"{what}: {name} is {how}; {what} prunes the weights of dense and conv "
                     "layers only: leave it out with filter_fn (e.g. prunejax.masks."
                     f"make_filter_fn(embeddings=False, exclude=[{name!r}]))")


def _input_groups(plan: lt.LayerPlan, params: Params, x: Any, ks: Sequence[int]) -> dict:
  """Layer index -> input group: one abstract trace, where layers whose taps receive the very same
  traced activation (one variable of one call) read the same input."""
  seen, alive, group_of = {}, [], {}

  def make_tap(k):
    def tap(layer, act, out):
      alive.append(act)  # keeps ids unique while the trace lives
      group_of[k] = seen.setdefault(id(act), len(seen))
      return out, None
    return tap

  jax.eval_shape(lambda p, xx: lt.run(plan, p, xx, layer_taps={k: make_tap(k) for k in ks})[0],
                 params, x)
  return group_of


def _analyse(apply_fn: ApplyFn, params: Params, x: Any, filter_fn: FilterFn | None,
             what: str) -> _Analysis:
  """The prunable layers of ``apply_fn`` (host side, from shapes alone)."""
  _check_params(params, what)
  params_a, x_a = _abstract(params), _abstract(x)
  plan = lt.find_layers(apply_fn, params_a, x_a)
  if not plan.layers:
    hint = (" (the example axis is found by tracing at B and 2B, and apply_fn traces differently"
            " at B=1: use batches of at least 2)" if plan.batch_size == 1 else "")
    raise ConfigError(f"{what}: no dense or conv layer found in apply_fn on a batch of "
                      f"{plan.batch_size}{hint}")
  path_leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  chosen = filter_fn or linear_filter_fn
  flags = tuple(bool(chosen(p, l)) for p, l in path_leaves)
  if not any(flags):
    raise nothing_selected_error(params, what, filter_fn)
  by_leaf = {}
  for i, f in enumerate(flags):
    uses = plan.uses.get(i, [])
    name = path_str(path_leaves[i][0])
    if f and (not uses or any(u != "layer" or plan.layers[k].kind not in _KINDS
                              for u, k in uses)):
      raise _use_error(what, name, plan, uses)
    if f:
      by_leaf[i] = [k for _, k in uses]
  ks = sorted(k for v in by_leaf.values() for k in v)
  group_of = _input_groups(plan, params_a, x_a, ks)
  ops = jax.eval_shape(lambda p: _frames(plan, p, ks), params_a)
  for i, mine in by_leaf.items():  # each weight entry must feed exactly one layer
    if sum(math.prod(ops[k].shape) for k in mine) != math.prod(jnp.shape(path_leaves[i][1])):
      raise _use_error(what, path_str(path_leaves[i][0]), plan, [("other", k) for k in mine])
  layers = []
  for k in ks:
    i = plan.layers[k].leaf
    name = path_str(path_leaves[i][0])
    if len(by_leaf[i]) > 1:
      name += f"#{by_leaf[i].index(k)}"
    layers.append(LinearLayer(name, k, i, plan.layers[k].kind, tuple(ops[k].shape), group_of[k]))
  groups = {}
  for layer in layers:
    groups.setdefault(layer.group, []).append(layer.index)
  return _Analysis(tuple(layers), flags, tuple(tuple(v) for v in groups.values()))


def linear_layers(apply_fn: ApplyFn, params: Params, x: Any, *,
                  filter_fn: FilterFn | None = None) -> tuple[LinearLayer, ...]:
  """The layers :func:`wanda` and :func:`sparsegpt` prune, in program order (from shapes alone;
  a sequential pass over the calibration set runs once per distinct ``LinearLayer.group``).

  Raises:
    ConfigError: the filter selects no leaf, or a leaf that is not a dense or conv weight.
  """
  return _analyse(apply_fn, params, x, filter_fn, "linear_layers").layers


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


def _check_params(params: Params, what: str) -> None:
  """NaN or inf in a weight gives NaN scores and a mask ranked on them: refused, naming the leaf."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    if (isinstance(leaf, (jax.Array, np.ndarray)) and not isinstance(leaf, jax.core.Tracer)
        and jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf)))):
      raise DataError(f"{what}: params leaf {path_str(path)} has NaN or inf")


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


def _stages(an: _Analysis, sequential: bool, gram: bool, max_bytes: int) -> list[list[int]]:
  """Lists of input groups gathered in one pass: one group each (sequential), else consecutive
  groups while their statistics fit in ``max_bytes``."""
  if sequential:
    return [[g] for g in range(len(an.groups))]
  first = {layer.index: layer for layer in an.layers}
  stages, size = [[]], 0
  for g, ks in enumerate(an.groups):
    gg, kk, _ = first[ks[0]].shape
    nbytes = 4 * gg * kk * (kk + 1 if gram else 1)
    if stages[-1] and size + nbytes > max_bytes:
      stages.append([])
      size = 0
    stages[-1].append(g)
    size += nbytes
  return stages


ORDERS = ("group", "block")
"""The sequential orders: input group by input group, or block by block (the papers' code)."""
_BLOCK = re.compile(r"^(.*?(?:^|/)(?:[^/#]*_)?\d+)(?:/|#|$)")


def default_block_fn(name: str) -> str:
  """The block of a layer named ``name`` (a :class:`LinearLayer` name): the path up to its first
  numbered entry (``block_3/attn/query/kernel`` -> ``block_3``, ``transformer/h/3/mlp/c_fc`` ->
  ``transformer/h/3``, ``layers_2/Dense_0/kernel`` -> ``layers_2``), else the name itself (a
  block of one layer, such as ``head/kernel``)."""
  m = _BLOCK.match(name)
  return m.group(1) if m else name


def _order(sequential: Any) -> str | None:
  """``"group"``, ``"block"`` or None (dense) from the ``sequential`` argument."""
  if sequential is True or sequential is False:
    return "group" if sequential else None
  if isinstance(sequential, (bool, np.bool_)):
    return "group" if bool(sequential) else None
  check_choice("sequential", sequential, (True, False) + ORDERS)
  return sequential


def _block_stages(an: _Analysis, block_fn: Callable[[str], Any] | None, what: str
                  ) -> list[list[int]]:
  """Lists of input groups, one list per block, in program order."""
  block_fn = block_fn or default_block_fn
  first = {layer.index: layer for layer in an.layers}
  stages, keys = [], []
  for g, ks in enumerate(an.groups):
    names = [first[k].name for k in ks]
    blocks = {block_fn(n) for n in names}
    if len(blocks) != 1:
      raise ConfigError(f"{what}: the layers {names} read one input but block_fn puts them in "
                        f"blocks {sorted(map(str, blocks))}; a block must hold whole input groups")
    (key,) = blocks
    if keys and keys[-1] == key:
      stages[-1].append(g)
    elif key in keys:
      raise ConfigError(f"{what}: block {key!r} of block_fn is not contiguous in program order "
                        f"(layer {names[0]} comes after block {keys[-1]!r}); pass a block_fn "
                        "whose blocks run one after another")
    else:
      stages.append([g])
      keys.append(key)
  return stages


def sequential_passes(layers: Sequence[LinearLayer], sequential: bool | str = True, *,
                      block_fn: Callable[[str], Any] | None = None) -> int:
  """Passes over the calibration set that :func:`wanda` and :func:`sparsegpt` make with
  ``sequential`` on ``layers`` (:func:`linear_layers`): one per input group, one per block, or 1
  with ``sequential=False``."""
  order = _order(sequential)
  if order is None:
    return 1
  if order == "group":
    return len({layer.group for layer in layers})
  return len({(block_fn or default_block_fn)(layer.name) for layer in layers})


def _token_mask_fn(token_mask_fn: Callable | None, x: Any) -> Callable | None:
  """``token_mask_fn``, or for a mapping input with an ``attention_mask``, that mask."""
  if token_mask_fn is None and isinstance(x, Mapping) and "attention_mask" in x:
    return _attention_mask_of
  return token_mask_fn


def _attention_mask_of(x: Mapping) -> Any:
  return x["attention_mask"]


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


# ----------------------------------------------------------------------------------------------
# How many weights each layer loses.
# ----------------------------------------------------------------------------------------------


class _Rule(NamedTuple):
  sparsity: float | None      # unstructured
  n_m: tuple[int, int] | None  # keep n of every m consecutive inputs


def _rule(sparsity: Any) -> _Rule:
  if isinstance(sparsity, str) and ":" in sparsity:
    n, m = sparsity.split(":", 1)
    try:
      n, m = int(n), int(m)
    except ValueError:
      n = m = -1
    if not 0 <= n <= m or m < 1:
      raise ConfigError(f"sparsity={sparsity!r} is not allowed; expected a fraction in [0, 1] or "
                        "'N:M' (keep N of every M consecutive inputs, 0 <= N <= M), e.g. '2:4'")
    return _Rule(None, (n, m))
  num_to_prune(sparsity, 1)
  return _Rule(float(sparsity), None)


def _split(total: int, sizes: Sequence[int]) -> list[int]:
  """``total`` split over parts of ``sizes`` by cumulative rounding: exact sum, proportional."""
  n, out, start = sum(sizes), [], 0
  for s in sizes:
    lo, hi = (2 * total * start + n) // (2 * n), (2 * total * (start + s) + n) // (2 * n)
    out.append(hi - lo)
    start += s
  return out


def _leaf_sparsities(params: Params, an: _Analysis, sparsity: float, distribution: Any) -> dict:
  paths = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  chosen = {p for p, f in zip(paths, an.flags) if f}
  per_leaf = jax.tree.leaves(layer_sparsities(
      params, sparsity, distribution or "uniform", lambda p, _: path_str(p) in chosen))
  return dict(enumerate(per_leaf))


def _counts(params: Params, an: _Analysis, rule: _Rule, scope: str, distribution: Any,
            global_scores: Callable[[], dict] | None) -> dict[int, int]:
  """Plan index -> weights pruned in the layer (``scope="row"``: in each output row)."""
  if rule.n_m is not None:
    return {layer.index: 0 for layer in an.layers}
  if scope == "global":
    if distribution is not None:
      raise ConfigError(f"distribution={distribution!r} needs scope='layerwise' or 'row'")
    scores = global_scores()
    ks = [layer.index for layer in an.layers]
    total = num_to_prune(rule.sparsity, sum(math.prod(layer.shape) for layer in an.layers))
    keep = threshold_mask_flags([scores[k] for k in ks], total, (True,) * len(ks))
    return {k: int(np.sum(~np.asarray(m))) for k, m in zip(ks, keep)}
  s = _leaf_sparsities(params, an, rule.sparsity, distribution)
  if scope == "row":
    return {layer.index: num_to_prune(s[layer.leaf], layer.shape[1]) for layer in an.layers}
  out = {}
  for leaf in sorted({layer.leaf for layer in an.layers}):
    mine = [layer for layer in an.layers if layer.leaf == leaf]
    sizes = [math.prod(layer.shape) for layer in mine]
    for layer, c in zip(mine, _split(num_to_prune(s[leaf], sum(sizes)), sizes)):
      out[layer.index] = c
  return out


# ----------------------------------------------------------------------------------------------
# Selection in a frame.
# ----------------------------------------------------------------------------------------------


def _rank(s: jax.Array, axis: int) -> jax.Array:
  """Each entry's position in a stable ascending sort along ``axis`` (ties: lower index first)."""
  order = jnp.argsort(s, axis=axis, stable=True)
  return jnp.argsort(order, axis=axis, stable=True)


def _lowest_nm(s_RxK: jax.Array, n: int, m: int) -> jax.Array:
  """Pruned flags keeping the ``n`` highest of every ``m`` consecutive entries of each row (the
  ``m - n`` lowest go, ties to the lower index)."""
  r, k = s_RxK.shape
  return (_rank(s_RxK.reshape(r, k // m, m), 2) < m - n).reshape(r, k)


def wanda_scores_frame(w_GxKxE: jax.Array, norms_sq_GxK: jax.Array) -> jax.Array:
  """Wanda's score ``|W_ij| * ||X_j||_2`` of a weight frame ``(G, K, E)`` and the squared input
  norms ``(G, K)``."""
  return jnp.abs(w_GxKxE.astype(jnp.float32)) * jnp.sqrt(norms_sq_GxK)[:, :, None]


@functools.partial(jax.jit, static_argnames=("scope", "n_m"))
def _wanda_frame(w_GxKxE: jax.Array, norms_sq_GxK: jax.Array, count: jax.Array, *, scope: str,
                 n_m: tuple[int, int] | None) -> jax.Array:
  """Pruned flags ``(G, K, E)`` of one layer by ``|W_ij| * ||X_j||``."""
  s = wanda_scores_frame(w_GxKxE, norms_sq_GxK)
  g, k, e = s.shape
  if n_m is not None or scope == "row":
    rows = jnp.transpose(s, (0, 2, 1)).reshape(g * e, k)
    pruned = (_lowest_nm(rows, *n_m) if n_m is not None else _rank(rows, 1) < count)
    return jnp.transpose(pruned.reshape(g, e, k), (0, 2, 1))
  return ~threshold_mask_flags([s], count, (True,))[0]


# ----------------------------------------------------------------------------------------------
# SparseGPT on one layer (Frantar & Alistarh 2023, Algorithm 1).
# ----------------------------------------------------------------------------------------------


def _upper_inverse_cholesky(h_KxK: jax.Array) -> jax.Array:
  """``U`` upper triangular with ``U^T U = H^-1``."""
  eye = jnp.eye(h_KxK.shape[0], dtype=h_KxK.dtype)
  hinv = jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(h_KxK), True), eye)
  return jnp.linalg.cholesky(0.5 * (hinv + hinv.T)).T


def _damped(w_ExK: jax.Array, h_KxK: jax.Array, damp: jax.Array, kp: int):
  """Dead inputs (zero on every row) get ``H_jj = 1`` and zero weights, then ``damp`` times the
  mean diagonal is added to the diagonal; both are padded to ``kp`` columns with identity."""
  e, k = w_ExK.shape
  dead = jnp.diagonal(h_KxK) == 0
  h = h_KxK + jnp.diag(dead.astype(h_KxK.dtype))
  w = jnp.where(dead[None], 0.0, w_ExK)
  h = h + damp * jnp.mean(jnp.diagonal(h)) * jnp.eye(k, dtype=h.dtype)
  h = jnp.pad(h, ((0, kp - k), (0, kp - k))) + jnp.diag((jnp.arange(kp) >= k).astype(h.dtype))
  return jnp.pad(w, ((0, 0), (0, kp - k))), h


def _block_mask(w1_ExB, d1_B, real_B, count, per_row: bool, n_m) -> jax.Array:
  """The block's pruned flags from ``w^2 / U_jj^2`` at the block's start (none yet for N:M)."""
  e, b = w1_ExB.shape
  if n_m is not None:
    return jnp.zeros((e, b), bool)
  sal = jnp.where(real_B[None], jnp.square(w1_ExB) / jnp.square(d1_B)[None], jnp.inf)
  if per_row:
    return _rank(sal, 1) < count
  return (_rank(sal.reshape(-1), 0) < count).reshape(e, b)


def _columns(w1_ExB, m1_ExB, u1_BxB, n_m):
  """Prunes the block's columns left to right, updating the block's later columns (OBS)."""
  e, b = w1_ExB.shape
  d1 = jnp.diagonal(u1_BxB)

  def column(i, carry):
    w1, m1, err1 = carry
    if n_m is not None:  # N:M: each group of m columns is chosen when its first column comes up.
      n, m = n_m
      fresh = _lowest_nm(jnp.square(lax.dynamic_slice(w1, (0, i), (e, m)))
                         / jnp.square(lax.dynamic_slice(d1, (i,), (m,)))[None], n, m)
      m1 = jnp.where(i % m == 0, lax.dynamic_update_slice(m1, fresh, (0, i)), m1)
    w = w1[:, i]
    q = jnp.where(m1[:, i], 0.0, w)
    err = (w - q) / u1_BxB[i, i]
    w1 = (w1 - err[:, None] * u1_BxB[i][None, :]).at[:, i].set(q)
    return w1, m1, err1.at[:, i].set(err)

  return lax.fori_loop(0, b, column, (w1_ExB, m1_ExB, jnp.zeros_like(w1_ExB)))


def _obs_one(w_ExK, h_KxK, counts_nb, damp, *, blocksize: int, per_row: bool, n_m):
  e, k = w_ExK.shape
  nb = -(-k // blocksize)
  kp = nb * blocksize
  w, h = _damped(w_ExK.astype(jnp.float32), h_KxK.astype(jnp.float32), damp, kp)
  u = _upper_inverse_cholesky(h)
  cols = jnp.arange(kp)

  def block(b, carry):
    w, pruned = carry
    i1 = b * blocksize
    w1 = lax.dynamic_slice(w, (0, i1), (e, blocksize))
    u1 = lax.dynamic_slice(u, (i1, i1), (blocksize, blocksize))
    m1 = _block_mask(w1, jnp.diagonal(u1), lax.dynamic_slice(cols, (i1,), (blocksize,)) < k,
                     counts_nb[b], per_row, n_m)
    w1, m1, err1 = _columns(w1, m1, u1, n_m)
    rows = lax.dynamic_slice(u, (i1, 0), (blocksize, kp))
    later = jnp.dot(err1, rows, precision=_HIGHEST)
    w = jnp.where(cols[None] >= i1 + blocksize, w - later, lax.dynamic_update_slice(w, w1, (0, i1)))
    return w, lax.dynamic_update_slice(pruned, m1, (0, i1))

  w, pruned = lax.fori_loop(0, nb, block, (w, jnp.zeros((e, kp), bool)))
  return w[:, :k], pruned[:, :k]


@functools.partial(jax.jit, static_argnames=("blocksize", "per_row", "n_m"))
def obs_prune(w_GxExK: jax.Array, h_GxKxK: jax.Array, counts_GxNB: jax.Array, damp: Any, *,
              blocksize: int = 128, per_row: bool = False,
              n_m: tuple[int, int] | None = None) -> tuple[jax.Array, jax.Array]:
  """SparseGPT's Algorithm 1 on ``G`` weight matrices ``W (E outputs, K inputs)``.

  Columns (inputs) are visited left to right in blocks of ``blocksize``. At the start of each
  block, the weights with the lowest ``w^2 / U_jj^2`` are chosen (``counts_GxNB[g, b]`` of the
  block, or of each row with ``per_row``; ties to the lower row-major index), ``U`` the upper
  Cholesky factor of ``H^-1``. Each column's pruned weights are set to 0 and their error
  ``(w - q) / U_jj`` is subtracted from the block's later columns times ``U_j,:``; the block's
  errors update the columns after the block at once (lazy batch updates). With ``n_m = (n, m)``
  the ``m - n`` lowest of every ``m`` consecutive inputs of each row are chosen when the group's
  first column comes up. Computed in float32.

  Args:
    w_GxExK: the weights, rows = outputs.
    h_GxKxK: the Hessians ``X^T X`` (any positive scale). Inputs whose ``H_jj`` is 0 (never
      active on the calibration rows) get ``H_jj = 1`` and zero weights, as in the reference code.
    counts_GxNB: weights pruned in each block (of each row with ``per_row``); ignored for N:M.
    damp: ``lambda / mean(diag H)``: the dampening added to the diagonal (the paper's 1%).
    blocksize: columns per block ``B_s`` (the paper's 128); a multiple of ``m`` for N:M.
    per_row: counts per row instead of per block.
    n_m: keep ``n`` of every ``m`` consecutive inputs instead of counts.

  Returns:
    ``(updated weights f32[G, E, K], pruned bool[G, E, K])``; pruned weights are exactly 0.
  """
  fn = functools.partial(_obs_one, blocksize=blocksize, per_row=per_row, n_m=n_m)
  return jax.vmap(fn, in_axes=(0, 0, 0, None))(w_GxExK, h_GxKxK, counts_GxNB, damp)


def reconstruction_error(w_GxKxE: jax.Array, new_GxKxE: jax.Array, h_GxKxK: jax.Array) -> jax.Array:
  """``||X W - X W'||_F^2 = sum_g tr((W - W')^T H (W - W'))`` of a layer's frames and ``H = X^T X``
  (float32)."""
  d = w_GxKxE.astype(jnp.float32) - new_GxKxE.astype(jnp.float32)
  return jnp.einsum("gke,gkl,gle->", d, h_GxKxK, d, precision=_HIGHEST)


def _block_counts(shape: tuple[int, int, int], count: int, per_row: bool,
                  blocksize: int) -> np.ndarray:
  """``(G, blocks)`` counts: a layer's (or a row's) count split over its blocks and groups."""
  g, k, e = shape
  cols = [min(blocksize, k - i) for i in range(0, k, blocksize)]
  if per_row:
    return np.tile(np.asarray(_split(count, cols), np.int32), (g, 1))
  return np.asarray(_split(count, [e * c for _ in range(g) for c in cols]), np.int32).reshape(g, -1)


# ----------------------------------------------------------------------------------------------
# From frames back to leaves.
# ----------------------------------------------------------------------------------------------


def _pullback(apply_fn: ApplyFn, params: Params, x: Any, ks: tuple[int, ...]):
  """``(frames, pull)``: the layers' frames and the transpose of the (linear) map from their leaves
  to their frames, ``pull(values by layer) -> values by leaf index``."""
  plan = lt.find_layers(apply_fn, params, x)
  leaves, treedef = jax.tree.flatten(params)
  idx = sorted({plan.layers[k].leaf for k in ks})

  def frames_of(sub):
    full = list(leaves)
    for i, s in zip(idx, sub):
      full[i] = s
    return _frames(plan, jax.tree.unflatten(treedef, full), ks)

  frames, vjp = jax.vjp(frames_of, [leaves[i] for i in idx])

  def pull(values: dict) -> dict:
    (got,) = vjp({k: values[k].astype(frames[k].dtype) for k in ks})
    return dict(zip(idx, got))

  return frames, pull


@functools.partial(jax.jit, static_argnames=("apply_fn", "ks"))
def _stage_frames(params: Params, x: Any, *, apply_fn: ApplyFn, ks: tuple[int, ...]) -> dict:
  return _frames(lt.find_layers(apply_fn, params, x), params, ks)


@functools.partial(jax.jit, static_argnames=("apply_fn", "ks"))
def _write_back(params: Params, mask: Mask, x: Any, new: dict | None, pruned: dict, *,
                apply_fn: ApplyFn, ks: tuple[int, ...]) -> tuple[Params, Mask]:
  """``params`` with the layers' new frames written in and pruned entries zero; ``mask`` with
  pruned entries False."""
  frames, pull = _pullback(apply_fn, params, x, ks)
  gone = pull({k: pruned[k].astype(jnp.float32) for k in ks})
  if new is not None:
    covered = pull({k: jnp.ones(frames[k].shape, jnp.float32) for k in ks})
    vals = pull(new)
  leaves, treedef = jax.tree.flatten(params)
  mask_leaves = treedef.flatten_up_to(mask)
  for i, g in gone.items():
    p = leaves[i] if new is None else jnp.where(covered[i] > 0.5, vals[i], leaves[i])
    leaves[i] = jnp.where(g > 0.5, jnp.zeros((), p.dtype), p)
    mask_leaves[i] = jnp.logical_and(mask_leaves[i], g <= 0.5)
  return jax.tree.unflatten(treedef, leaves), jax.tree.unflatten(treedef, mask_leaves)


@functools.partial(jax.jit, static_argnames=("apply_fn", "ks"))
def _to_leaves(params: Params, x: Any, values: dict, *, apply_fn: ApplyFn,
               ks: tuple[int, ...]) -> PyTree:
  """Frame values (one ``(G, K, E)`` array per layer) as a params-shaped tree (0 elsewhere)."""
  _, pull = _pullback(apply_fn, params, x, ks)
  got = pull(values)
  leaves, treedef = jax.tree.flatten(params)
  return jax.tree.unflatten(treedef, [got[i].astype(jnp.float32) if i in got
                                      else jnp.zeros(jnp.shape(l), jnp.float32)
                                      for i, l in enumerate(leaves)])


# ----------------------------------------------------------------------------------------------
# The layer-by-layer driver.
# ----------------------------------------------------------------------------------------------


class _Run(NamedTuple):
  """One call of :func:`wanda` or :func:`sparsegpt`, checked and set up."""

  an: _Analysis
  batches: list
  x: Any
  rule: _Rule
  counts: dict
  static: dict


def _setup(what: str, apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], sparsity: Any,
           scope: str, distribution: Any, filter_fn: FilterFn | None,
           token_mask_fn: Callable | None, mesh: Any, max_stats_bytes: int,
           blocksize: int | None = None) -> _Run:
  check_choice("scope", scope, SCOPES)
  check_positive_int("max_stats_bytes", max_stats_bytes)
  rule = _rule(sparsity)
  batches, _ = _device_batches(batches, mesh)
  x = batches[0]["x"]
  an = _analyse(apply_fn, params, x, filter_fn, what)
  static = dict(apply_fn=apply_fn, token_mask_fn=_token_mask_fn(token_mask_fn, x))
  if rule.n_m is not None:
    m = rule.n_m[1]
    for layer in an.layers:
      if layer.shape[1] % m:
        raise ConfigError(f"{what}: {layer.name} has {layer.shape[1]} inputs per output, not "
                          f"divisible by M={m} of sparsity={sparsity!r}")
    if blocksize is not None and blocksize % m:
      raise ConfigError(f"{what}: blocksize={blocksize} is not a multiple of M={m}")

  def global_scores():
    ks = tuple(layer.index for layer in an.layers)
    reps = tuple(g[0] for g in an.groups)
    stats = _gather(params, batches, an, reps=reps, gram=False, **static)
    frames = _stage_frames(params, x, apply_fn=apply_fn, ks=ks)
    rep = {k: g[0] for g in an.groups for k in g}
    return {k: wanda_scores_frame(frames[k], stats[rep[k]].norms_sq) for k in ks}

  counts = _counts(params, an, rule, scope, distribution, global_scores)
  return _Run(an, batches, x, rule, counts, static)


def _layerwise(run: _Run, params: Params, layer_fn: Callable, *, gram: bool, sequential: Any,
               max_stats_bytes: int, block_fn: Callable | None = None,
               what: str = "") -> tuple[Mask, Params]:
  """Visits the input groups in program order (in stages: one group, one block, or as many as fit
  in ``max_stats_bytes`` on the dense model); ``layer_fn(layer, frame, stats, count) -> (new frame
  or None, pruned)`` prunes each layer; returns the mask and the new params."""
  an, static = run.an, run.static
  order = _order(sequential)
  if order == "block":
    stages = _block_stages(an, block_fn, what)
  else:
    stages = _stages(an, order is not None, gram, max_stats_bytes)
  sequential = order is not None
  cur, mask = params, jax.tree.map(lambda p: jnp.ones(jnp.shape(p), bool), params)
  layer_of = {layer.index: layer for layer in an.layers}
  # A layer's weight changes only when its own group is pruned, so every frame comes from params.
  frames = _stage_frames(params, run.x, apply_fn=static["apply_fn"],
                         ks=tuple(layer.index for layer in an.layers))
  for stage in stages:
    reps = tuple(an.groups[g][0] for g in stage)
    stats = _gather(cur if sequential else params, run.batches, an, reps=reps, gram=gram,
                    **static)
    ks = tuple(k for g in stage for k in an.groups[g])
    new, pruned = {}, {}
    for g in stage:
      for k in an.groups[g]:
        new[k], pruned[k] = layer_fn(layer_of[k], frames[k], stats[an.groups[g][0]],
                                     run.counts[k])
    cur, mask = _write_back(cur, mask, run.x, None if new[ks[0]] is None else new, pruned,
                            apply_fn=static["apply_fn"], ks=ks)
  return mask, cur


def wanda(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], sparsity: float | str, *,
          scope: str = "row", distribution: str | Mapping[str, float] | None = None,
          sequential: bool | str = True, filter_fn: FilterFn | None = None,
          token_mask_fn: Callable | None = None, mesh: Any = None,
          max_stats_bytes: int = MAX_STATS_BYTES,
          block_fn: Callable[[str], Any] | None = None) -> Mask:
  """Wanda: prunes the weights with the lowest ``|W_ij| * ||X_j||_2``, without updating the rest.

  ``||X_j||_2`` is the norm of the layer's input feature ``j`` over every calibration row (real
  examples; with ``token_mask_fn``, real positions).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits`` over exactly ``params``; any JAX function.
    params: the trained params (replicated over ``mesh``).
    batches: the calibration batches: dicts with ``x`` and optionally ``mask`` and ``id``, host
      arrays (sharded over ``mesh``, each process passing its rows) or device arrays, all of one
      shape (e.g. ``prunejax.data.batches`` over the calibration ids). Kept on device while
      pruning.
    sparsity: the fraction of each layer's (``scope``) weights removed, or ``"N:M"`` (keep N of
      every M consecutive inputs of each output, e.g. ``"2:4"``; ``scope`` is then ignored).
    scope: ``"row"`` (the paper's default: each output of each layer loses ``round(s * K)`` of
      its ``K`` inputs), ``"layerwise"`` (``round(s * n)`` of each layer's ``n`` weights) or
      ``"global"`` (``round(s * N)`` of all, where the scores are lowest across layers; the
      per-layer counts are fixed on the dense model).
    distribution: per-layer sparsities for ``"row"``/``"layerwise"``: ``"uniform"`` (default),
      ``"erk"`` or a ``{path: sparsity}`` map (:mod:`prunejax.masks.distributions`).
    sequential: ``True``/``"group"``: calibrate each input group on the outputs of the already
      pruned layers before it; ``"block"``: block by block, each block's layers at once on the
      outputs of the pruned blocks before it (the papers' code); False: every layer on the dense
      model. See the module docstring.
    filter_fn: the prunable leaves (default :data:`linear_filter_fn`).
    token_mask_fn: ``token_mask_fn(x) -> bool[B, T]``, False at the padding positions of a
      sequence; rows of those positions are left out of every dense layer that sees ``T`` rows
      per example.
    mesh: the device mesh for host batches (default: all devices on a ``data`` axis).
    max_stats_bytes: with ``sequential=False``, the statistics gathered in one pass.
    block_fn: with ``sequential="block"``, ``block_fn(layer name) -> block key`` (default
      :func:`default_block_fn`); each block's layers must be contiguous in program order.

  Returns:
    The mask (bool pytree shaped like ``params``; leaves not chosen are all True).

  Raises:
    ConfigError: a bad sparsity or scope, a filter selecting no leaf or a leaf that is not a dense
      or conv weight, an N:M whose M does not divide a layer's inputs.
    DataError: no calibration batches, or batches of different shapes.

  References:
    Sun, Liu, Bair, Kolter. "A Simple and Effective Pruning Approach for Large Language Models."
    ICLR 2024.
  """
  run = _setup("wanda", apply_fn, params, batches, sparsity, scope, distribution, filter_fn,
               token_mask_fn, mesh, max_stats_bytes)

  def layer_fn(layer, frame, stats, count):
    return None, _wanda_frame(frame, stats.norms_sq, jnp.asarray(count, jnp.int32), scope=scope,
                              n_m=run.rule.n_m)

  mask, _ = _layerwise(run, params, layer_fn, gram=False, sequential=sequential,
                       max_stats_bytes=max_stats_bytes, block_fn=block_fn, what="wanda")
  return mask


def sparsegpt(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], sparsity: float | str,
              *, scope: str = "layerwise", distribution: str | Mapping[str, float] | None = None,
              sequential: bool | str = True, blocksize: int = 128, damp: float = 0.01,
              filter_fn: FilterFn | None = None, token_mask_fn: Callable | None = None,
              mesh: Any = None, max_stats_bytes: int = MAX_STATS_BYTES,
              block_fn: Callable[[str], Any] | None = None) -> tuple[Mask, Params]:
  """SparseGPT: prunes each layer and updates its remaining weights to reconstruct its output.

  Each layer's weight ``W (E outputs, K inputs)`` goes through :func:`obs_prune` with the Gram
  matrix ``H = X^T X`` of its inputs over every calibration row.

  Args:
    apply_fn, params, batches, filter_fn, token_mask_fn, mesh, max_stats_bytes, distribution,
      block_fn: as :func:`wanda`.
    sparsity: the fraction removed, or ``"N:M"`` (keep N of every M consecutive inputs).
    scope: ``"layerwise"`` (the paper: ``round(s * n)`` of each layer's weights, spread over its
      blocks in proportion), ``"row"`` (``round(s * K)`` per output row) or ``"global"``
      (per-layer counts from one ranking of ``|W_ij| * ||X_j||`` over all layers of the dense
      model, the OBS saliency with the Hessian's diagonal; then each layer by SparseGPT).
    sequential: ``True``/``"group"``: calibrate each input group on the outputs of the pruned and
      updated layers before it; ``"block"``: block by block, as the paper's code does
      (``opt_sequential``); False: every layer on the dense model.
    blocksize: columns per lazy-update block and per mask choice (the paper's 128).
    damp: dampening, as a fraction of the mean diagonal of ``H`` (the paper's 0.01).

  Returns:
    ``(mask, params)``: the mask, and the params with every pruned weight exactly 0 and the
    remaining weights of the pruned layers updated (other leaves unchanged).

  Raises:
    ConfigError: as :func:`wanda`, a ``blocksize`` that is not a multiple of M, or a Hessian that
      is not positive definite after dampening (raise ``damp``).
    DataError: as :func:`wanda`.

  References:
    Frantar, Alistarh. "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot."
    ICML 2023.
  """
  check_positive_int("blocksize", blocksize)
  if not damp > 0:
    raise ConfigError(f"damp={damp!r} is not allowed; expected a positive fraction, e.g. 0.01")
  run = _setup("sparsegpt", apply_fn, params, batches, sparsity, scope, distribution, filter_fn,
               token_mask_fn, mesh, max_stats_bytes, blocksize=blocksize)
  per_row = scope == "row"

  def layer_fn(layer, frame, stats, count):
    counts = _block_counts(layer.shape, count, per_row, blocksize)
    w = jnp.transpose(frame, (0, 2, 1))
    new, pruned = obs_prune(w, stats.gram, counts, jnp.float32(damp), blocksize=blocksize,
                            per_row=per_row, n_m=run.rule.n_m)
    if not bool(jnp.all(jnp.isfinite(new))):
      raise ConfigError(f"sparsegpt: the Hessian of {layer.name} is not positive definite after "
                        f"dampening with damp={damp}; raise damp")
    return jnp.transpose(new, (0, 2, 1)), jnp.transpose(pruned, (0, 2, 1))

  return _layerwise(run, params, layer_fn, gram=True, sequential=sequential,
                    max_stats_bytes=max_stats_bytes, block_fn=block_fn, what="sparsegpt")


# ----------------------------------------------------------------------------------------------
# Scores for the registry, and each layer's reconstruction error.
# ----------------------------------------------------------------------------------------------


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


def wanda_scores(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], *,
                 filter_fn: FilterFn | None = None, token_mask_fn: Callable | None = None,
                 mesh: Any = None) -> PyTree:
  """Wanda's ``|W_ij| * ||X_j||_2`` of every prunable weight on the dense model (float32, shaped
  like ``params``, 0 on other leaves); arguments as :func:`wanda`."""
  out = None
  for _, x, ks, frames, stats in _dense_stats("wanda", apply_fn, params, batches, gram=False,
                                              filter_fn=filter_fn, token_mask_fn=token_mask_fn,
                                              mesh=mesh):
    values = {k: wanda_scores_frame(frames[k], stats[k].norms_sq) for k in ks}
    got = _to_leaves(params, x, values, apply_fn=apply_fn, ks=ks)
    out = got if out is None else jax.tree.map(jnp.add, out, got)
  return out


@jax.jit
def _obs_saliency(w_GxKxE: jax.Array, h_GxKxK: jax.Array, damp: jax.Array) -> jax.Array:
  def one(w, h):
    k = h.shape[0]
    wk, hk = _damped(jnp.transpose(w).astype(jnp.float32), h, damp, k)
    return jnp.square(jnp.transpose(wk)) / jnp.square(jnp.diagonal(
        _upper_inverse_cholesky(hk)))[:, None]
  return jax.vmap(one)(w_GxKxE, h_GxKxK)


def sparsegpt_scores(apply_fn: ApplyFn, params: Params, batches: Iterable[Batch], *,
                     damp: float = 0.01, filter_fn: FilterFn | None = None,
                     token_mask_fn: Callable | None = None, mesh: Any = None) -> PyTree:
  """SparseGPT's saliency ``w^2 / U_jj^2`` of the dense weights (the criterion of its first mask
  choice, before any update; ``U`` the upper Cholesky factor of the damped ``H^-1``), shaped like
  ``params`` (0 on other leaves); arguments as :func:`sparsegpt`."""
  out = None
  for _, x, ks, frames, stats in _dense_stats("sparsegpt", apply_fn, params, batches, gram=True,
                                              filter_fn=filter_fn, token_mask_fn=token_mask_fn,
                                              mesh=mesh):
    values = {k: _obs_saliency(frames[k], stats[k].gram, jnp.float32(damp)) for k in ks}
    got = _to_leaves(params, x, values, apply_fn=apply_fn, ks=ks)
    out = got if out is None else jax.tree.map(jnp.add, out, got)
  return out


def layer_errors(apply_fn: ApplyFn, params: Params, pruned_params: Params,
                 batches: Iterable[Batch], *, filter_fn: FilterFn | None = None,
                 token_mask_fn: Callable | None = None, mesh: Any = None) -> dict[str, float]:
  """Each prunable layer's relative reconstruction error on ``batches``.

  ``||X W - X W'||_F^2 / ||X W||_F^2`` with ``X`` the layer's inputs in the dense model (every
  row of ``batches``, as :func:`calibrate`), ``W`` its weight in ``params`` and ``W'`` in
  ``pruned_params`` (a masked copy, or :func:`sparsegpt`'s updated params). The output bias
  cancels; the error is the layer's own, not the accumulated one of the pruned model.

  Returns:
    Layer name (:class:`LinearLayer`) -> error, in program order.
  """
  out = {}
  for an, x, ks, frames, stats in _dense_stats("layer_errors", apply_fn, params, batches,
                                               gram=True, filter_fn=filter_fn,
                                               token_mask_fn=token_mask_fn, mesh=mesh):
    new = _stage_frames(pruned_params, x, apply_fn=apply_fn, ks=ks)
    name = {layer.index: layer.name for layer in an.layers}
    for k in ks:
      zero = jnp.zeros_like(frames[k])
      err = reconstruction_error(frames[k], new[k], stats[k].gram)
      out[name[k]] = float(err / reconstruction_error(frames[k], zero, stats[k].gram))
  return out
