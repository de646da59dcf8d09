"""GraNd: the exact norm of each example's full loss gradient, without per-example gradients.

``grand(apply_fn, params, batch)`` returns ``||d CE(f(params, x_i), y_i) / d params||_2`` for every
row ``i``, over all parameter leaves. It never forms the ``B x P`` matrix of per-example gradients.

How (``method="ghost"``, the "ghost norm" of Goodfellow 2015 and Li et al. 2022, applied to any
JAX function): ``apply_fn`` is traced once for a single example into a jaxpr. A walk over that
jaxpr finds where each parameter leaf meets the example: a ``dot_general`` (dense layers, on vectors
or sequences), a ``conv_general_dilated`` or a row ``gather`` (embeddings), reached from the leaf
through reshapes, transposes, slices or dtype casts only. At each such use the walk records the
activation ``a`` and wraps the output in an identity whose backward rule receives the output
cotangent ``d`` and returns the squared norm of the leaf's gradient:

* dense on ``[D]``: ``||a||^2 ||d||^2``; on ``[T, D]``: the Gram form
  ``sum_{t,s} (a_t . a_s)(d_t . d_s)`` or the explicit ``||a^T d||^2``, whichever is smaller;
* conv: from the im2col patches ``U`` of the example, the Gram form over output positions or the
  explicit ``||U^T d||^2``, whichever is smaller;
* embedding: ``sum_{t,s} [tok_t = tok_s] (d_t . d_s)`` or the explicit scatter, whichever is
  smaller.

The backward pass is the usual one, run for the example's summed cross-entropy, except that no
weight gradient is formed: each layer's contribution is reduced to one number per example as soon
as its cotangent exists. Every other leaf (biases, LayerNorm and BatchNorm scales, position tables,
a weight used twice, anything the walk does not recognise) is differentiated directly, per example;
such leaves are small in common models, and when they are not the batch is processed in chunks.
Leaves behind ``stop_gradient`` (BatchNorm statistics in :func:`prunejax.models.make_apply_fn`)
contribute 0. All of this is vectorized over the batch with ``vmap``.

``method="vmap"`` is the direct definition, chunked ``vmap(grad)`` with at most ``chunk_size``
examples' gradients alive at once; ``method="auto"`` (default) uses the ghost path whenever it
finds at least one such layer. Both assume, as every per-example gradient does, that the logits of
an example do not depend on the other rows of the batch (evaluation mode).

References:
  Paul, Ganguli, Dziugaite. "Deep Learning on a Data Diet: Finding Important Examples Early in
  Training." NeurIPS 2021 (GraNd).
  Goodfellow. "Efficient Per-Example Gradient Computations." arXiv:1510.01799, 2015.
  Li, Tramer, Liang, Hashimoto. "Large Language Models Can Be Strong Differentially Private
  Learners." ICLR 2022 (ghost clipping for sequences).
  Guo et al. "DeepCore: A Comprehensive Library for Coreset Selection in Deep Learning."
  DEXA 2022 (the last-layer closed form).
"""

from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore

from prunejax.errors import ConfigError, check_choice, check_positive_int
from prunejax.scores.output import as_float, batch_mask, cross_entropy, el2n_from_logits
from prunejax.types import ApplyFn, Batch, Params, Scores

METHODS = ("auto", "ghost", "vmap")

# Precision of the per-layer norm products: None follows ``jax.default_matmul_precision``, the
# precision of the model's own forward and backward passes (TF32 on recent GPUs unless set to
# "highest"; exact float32/float64 on CPU).
_PRECISION = None
# Which form the ghost rules use: "auto" picks the smaller; tests force "gram" and "explicit".
_FORM = "auto"
# Elements of per-example gradients of directly differentiated leaves (B x their size) allowed at
# once, besides a full gradient's worth; past it the ghost path goes ``chunk_size`` rows at a time.
_MATERIALIZED_BUDGET = 1 << 20

# Higher-order primitives whose body is inlined when parameters and the example meet inside them.
# Custom derivatives (custom_jvp/vjp) are not inlined: their rule is kept and their leaves are
# differentiated directly.
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat"})
# Parameter-side ops whose pullback preserves the norm of a gradient (permutations, selections,
# casts): a leaf seen through them still has a ghost rule.
_ISOMETRIC = frozenset({"reshape", "squeeze", "expand_dims", "transpose", "copy", "copy_p",
                        "convert_element_type", "broadcast_in_dim", "slice", "rev"})


def _norm_dtype(*dtypes: Any) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _choose(gram_cost: int, explicit_cost: int) -> str:
  if _FORM != "auto":
    return _FORM
  return "gram" if gram_cost <= explicit_cost else "explicit"


def _outer_sq_norm(a_NxK: jax.Array, d_NxE: jax.Array, form: str) -> jax.Array:
  """``||a^T d||_F^2`` without (gram) or with (explicit) forming the ``K x E`` product."""
  dtype = _norm_dtype(a_NxK.dtype, d_NxE.dtype)
  a_NxK, d_NxE = a_NxK.astype(dtype), d_NxE.astype(dtype)
  if a_NxK.shape[0] == 1:
    return jnp.sum(jnp.square(a_NxK)) * jnp.sum(jnp.square(d_NxE))
  if form == "gram":
    aa_NxN = jnp.einsum("nk,mk->nm", a_NxK, a_NxK, precision=_PRECISION)
    dd_NxN = jnp.einsum("ne,me->nm", d_NxE, d_NxE, precision=_PRECISION)
    return jnp.sum(aa_NxN * dd_NxN)
  g_KxE = jnp.einsum("nk,ne->ke", a_NxK, d_NxE, precision=_PRECISION)
  return jnp.sum(jnp.square(g_KxE))


# ----------------------------------------------------------------------------------------------
# Ghost rules: the squared norm of a leaf's per-example gradient from (activation, cotangent).
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _DenseRule:
  """``out = dot_general(act, w)`` (either operand order) with no batch dimensions."""

  kind = "dense"
  act_index: int
  act_perm: tuple[int, ...]   # act -> (free..., contracting...)
  out_perm: tuple[int, ...]   # out -> (act free..., w free...)
  n: int
  k: int
  e: int
  form: str

  def sq_norm(self, act: jax.Array, delta: jax.Array) -> jax.Array:
    a_NxK = jnp.transpose(act, self.act_perm).reshape(self.n, self.k)
    d_NxE = jnp.transpose(delta, self.out_perm).reshape(self.n, self.e)
    return _outer_sq_norm(a_NxK, d_NxE, self.form)


def _dense_rule(eqn, w_index: int) -> _DenseRule | None:
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  if lb or rb:
    return None
  act_index = 1 - w_index
  a_shape = eqn.invars[act_index].aval.shape
  w_shape = eqn.invars[w_index].aval.shape
  ca, cw = (rc, lc) if w_index == 0 else (lc, rc)
  a_free = [d for d in range(len(a_shape)) if d not in ca]
  n_w_free = len(w_shape) - len(cw)
  if w_index == 1:   # out = (act free..., w free...)
    out_perm = tuple(range(len(a_free) + n_w_free))
  else:              # out = (w free..., act free...)
    out_perm = tuple(range(n_w_free, n_w_free + len(a_free))) + tuple(range(n_w_free))
  n = math.prod(a_shape[d] for d in a_free)
  k = math.prod(a_shape[d] for d in ca)
  e = math.prod(w_shape[d] for d in range(len(w_shape)) if d not in cw)
  return _DenseRule(act_index, tuple(a_free) + tuple(ca), out_perm, n, k, e,
                    _choose(n * n, k * e))


@dataclasses.dataclass(frozen=True)
class _ConvRule:
  """``out = conv_general_dilated(act, w)``: from the im2col patches ``U`` (positions x patch) and
  the cotangent ``D`` (positions x out channels), the Gram form or the explicit ``||U^T D||^2``
  (per feature group).

  The explicit form is a batched matmul, not the vmapped transpose convolution: that one is a
  convolution grouped over examples, which XLA's SPMD partitioner gets wrong on a batch-sharded
  input (jax 0.10, CPU), and partitions poorly elsewhere.
  """

  kind = "conv"
  act_index = 0
  params: tuple[tuple[str, Any], ...]
  w_shape: tuple[int, ...]
  form: str

  def sq_norm(self, act: jax.Array, delta: jax.Array) -> jax.Array:
    params = dict(self.params)
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    groups = params["feature_group_count"]
    x_NxCxS = jnp.transpose(act, lhs_spec)
    filter_shape = [self.w_shape[d] for d in rhs_spec[2:]]
    patches = lax.conv_general_dilated_patches(
        x_NxCxS, filter_shape, params["window_strides"], params["padding"],
        params["lhs_dilation"], params["rhs_dilation"], precision=_PRECISION)
    k = patches.shape[1]
    u_PxK = jnp.moveaxis(patches, 1, -1).reshape(-1, k)
    d = jnp.transpose(delta, out_spec)
    d_PxE = jnp.moveaxis(d, 1, -1).reshape(-1, d.shape[1])
    if groups == 1:
      return _outer_sq_norm(u_PxK, d_PxE, self.form)
    # Patch features are ordered (input channel, filter position); channels split into groups.
    dtype = _norm_dtype(u_PxK.dtype, d_PxE.dtype)
    u_PxGxK = u_PxK.reshape(u_PxK.shape[0], groups, k // groups).astype(dtype)
    d_PxGxE = d_PxE.reshape(d_PxE.shape[0], groups, -1).astype(dtype)
    g_GxKxE = jnp.einsum("pgk,pge->gke", u_PxGxK, d_PxGxE, precision=_PRECISION)
    return jnp.sum(jnp.square(g_GxKxE))


def _conv_rule(eqn, w_index: int) -> _ConvRule | None:
  p = eqn.params
  if w_index != 1 or p["batch_group_count"] != 1:
    return None
  w_shape = tuple(eqn.invars[1].aval.shape)
  out_shape = eqn.outvars[0].aval.shape
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  positions = math.prod(out_shape[d] for d in (out_spec[0],) + tuple(out_spec[2:]))
  form = _choose(positions * positions, math.prod(w_shape))
  if p["feature_group_count"] != 1:
    form = "explicit"
  return _ConvRule(tuple(sorted(p.items())), w_shape, form)


@dataclasses.dataclass(frozen=True)
class _EmbedRule:
  """``out = table[idx]`` (a row gather, as in ``nn.Embed`` / ``jnp.take(table, idx, axis=0)``)."""

  kind = "embed"
  act_index = 1
  rows: int
  row_size: int
  m: int
  clip: bool
  form: str

  def sq_norm(self, idx: jax.Array, delta: jax.Array) -> jax.Array:
    idx_M = idx.reshape(self.m).astype(jnp.int32)
    d_MxD = delta.reshape(self.m, self.row_size)
    d_MxD = d_MxD.astype(_norm_dtype(d_MxD.dtype))
    if self.clip:
      idx_M = jnp.clip(idx_M, 0, self.rows - 1)
    else:  # FILL_OR_DROP: out-of-range rows were filled, and their gradient is dropped.
      d_MxD = jnp.where(((idx_M >= 0) & (idx_M < self.rows))[:, None], d_MxD, 0.0)
    if self.form == "gram":
      same_MxM = idx_M[:, None] == idx_M[None, :]
      dd_MxM = jnp.einsum("md,nd->mn", d_MxD, d_MxD, precision=_PRECISION)
      return jnp.sum(jnp.where(same_MxM, dd_MxM, 0.0))
    g_VxD = jnp.zeros((self.rows, self.row_size), d_MxD.dtype).at[idx_M].add(d_MxD, mode="drop")
    return jnp.sum(jnp.square(g_VxD))


def _gather_rule(eqn, w_index: int) -> _EmbedRule | None:
  p = eqn.params
  dn = p["dimension_numbers"]
  w_shape = eqn.invars[0].aval.shape
  idx_shape = eqn.invars[1].aval.shape
  out_ndim = len(eqn.outvars[0].aval.shape)
  if (w_index != 0 or dn.collapsed_slice_dims != (0,) or dn.start_index_map != (0,)
      or dn.operand_batching_dims or dn.start_indices_batching_dims
      or tuple(p["slice_sizes"]) != (1,) + tuple(w_shape[1:]) or not idx_shape
      or idx_shape[-1] != 1
      or tuple(dn.offset_dims) != tuple(range(out_ndim - len(w_shape) + 1, out_ndim))):
    return None
  mode = p["mode"]
  clip = mode != lax.GatherScatterMode.FILL_OR_DROP
  m = math.prod(idx_shape[:-1])
  row_size = math.prod(w_shape[1:])
  return _EmbedRule(w_shape[0], row_size, m, clip, _choose(m * m, w_shape[0] * row_size))


_RULES: dict[str, Callable] = {"dot_general": _dense_rule, "conv_general_dilated": _conv_rule,
                               "gather": _gather_rule}


def _make_tap(rule: Any, norm_dtype: Any) -> Callable:
  """Identity on ``out``; its backward turns the cotangent into the leaf's squared grad norm."""

  @jax.custom_vjp
  def tap(out, act, dummy):
    del act, dummy
    return out

  def fwd(out, act, dummy):
    del dummy
    return out, act

  def bwd(act, delta):
    # Data dependencies sequence the work (optimization barriers are dropped by XLA:CPU): the
    # layer's norm reads the activation only through a zero that depends on the cotangent, so the
    # patches or Gram matrices are not hoisted into the forward pass, and the cotangent flows on
    # to earlier layers only after the norm, so one layer's temporaries are alive at a time.
    # (XLA does not fold ``0 * x`` for floats: it is NaN for infinite x.)
    if jnp.issubdtype(act.dtype, jnp.floating):
      act = act + 0 * delta.reshape(-1)[0].astype(act.dtype)
    sq = rule.sq_norm(act, delta).astype(norm_dtype)
    return delta + (0 * sq).astype(delta.dtype), None, sq

  tap.defvjp(fwd, bwd)
  return tap


# ----------------------------------------------------------------------------------------------
# The jaxpr walk.
# ----------------------------------------------------------------------------------------------

_X = "x"  # meta of a value that depends on the example; None marks a constant.


class _P(NamedTuple):
  """Meta of a parameter-side value (independent of the example)."""

  deps: frozenset
  iso: int | None   # the leaf this value is an isometric image of, if any.


def _sub_jaxpr(eqn):
  for name in ("jaxpr", "call_jaxpr"):
    j = eqn.params.get(name)
    if isinstance(j, jcore.ClosedJaxpr):
      return j.jaxpr, list(j.consts)
    if isinstance(j, jcore.Jaxpr):
      return j, []
  return None


def _is_isometric(eqn) -> bool:
  name = eqn.primitive.name
  if name not in _ISOMETRIC or len(eqn.invars) != 1:
    return False
  a_in, a_out = eqn.invars[0].aval, eqn.outvars[0].aval
  if not (jnp.issubdtype(a_in.dtype, jnp.floating) and jnp.issubdtype(a_out.dtype, jnp.floating)):
    return False
  if name == "broadcast_in_dim":
    return math.prod(a_in.shape) == math.prod(a_out.shape)
  return True


class _Walker:
  """Evaluates (or, with no values, only analyses) a jaxpr, tracking which values are parameters.

  The walk order is deterministic, so frontier ``k`` (the k-th equation where a parameter meets the
  example) names the same equation in the analysis and in every evaluation.
  """

  def __init__(self, taps: dict[int, Callable] | None = None,
               capture: tuple[int, int] | None = None):
    self.analysis = taps is None
    self.taps = taps or {}
    self.capture = capture
    self.captured = None
    self.k = 0
    self.uses: dict[int, list] = collections.defaultdict(list)
    self.rules: dict[int, tuple[Any, int, Any]] = {}
    self.dense_out: dict[Any, int] = {}
    self.head_bias: dict[int, int] = {}

  def run(self, jaxpr, consts, in_metas, in_vals=None):
    metas: dict[Any, Any] = {}
    vals: dict[Any, Any] = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return None, v.val
      return metas[v], vals.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      metas[v], vals[v] = None, c
    for i, v in enumerate(jaxpr.invars):
      metas[v] = in_metas[i]
      if in_vals is not None:
        vals[v] = in_vals[i]
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      out_metas, out_vals = self._eqn(eqn, [m for m, _ in ins], [x for _, x in ins])
      for v, m, x in zip(eqn.outvars, out_metas, out_vals):
        if not isinstance(v, jcore.DropVar):
          metas[v], vals[v] = m, x
    outs = [read(v) for v in jaxpr.outvars]
    return [m for m, _ in outs], [x for _, x in outs]

  def _bind(self, eqn, in_vals):
    if self.analysis:
      return [None] * len(eqn.outvars)
    out = eqn.primitive.bind(*in_vals, **eqn.primitive.get_bind_params(eqn.params))
    return list(out) if eqn.primitive.multiple_results else [out]

  def _eqn(self, eqn, in_metas, in_vals):
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    has_x = any(m == _X for m in in_metas)
    p_idx = [i for i, m in enumerate(in_metas) if isinstance(m, _P)]
    if name == "stop_gradient" or not p_idx:
      return [_X if has_x else None] * n_out, self._bind(eqn, in_vals)
    if not has_x:
      if len(p_idx) == 1 and _is_isometric(eqn):
        m = in_metas[p_idx[0]]
        return [_P(m.deps, m.iso)], self._bind(eqn, in_vals)
      deps = frozenset().union(*(in_metas[i].deps for i in p_idx))
      return [_P(deps, None)] * n_out, self._bind(eqn, in_vals)
    sub = _sub_jaxpr(eqn) if name in _INLINE else None
    if sub is not None and len(sub[0].invars) == len(in_metas):
      return self.run(sub[0], sub[1], in_metas, None if self.analysis else in_vals)
    return self._frontier(eqn, in_metas, in_vals, p_idx)

  def _frontier(self, eqn, in_metas, in_vals, p_idx):
    """An equation where parameters meet the example."""
    k = self.k
    self.k += 1
    name = eqn.primitive.name
    if self.analysis:
      rule = None
      m = in_metas[p_idx[0]]
      if len(p_idx) == 1 and name in _RULES and m.iso is not None and m.deps == {m.iso}:
        rule = _RULES[name](eqn, p_idx[0])
      if rule is not None:
        self.uses[m.iso].append(k)
        dtype = _norm_dtype(eqn.outvars[0].aval.dtype)
        self.rules[k] = (rule, m.iso, dtype)
        if rule.kind == "dense":
          self.dense_out[eqn.outvars[0]] = k
      else:
        for i in p_idx:
          for leaf in in_metas[i].deps:
            self.uses[leaf].append(None)
      if name == "add" and len(p_idx) == 1:
        for v in eqn.invars:
          if not isinstance(v, jcore.Literal) and v in self.dense_out:
            bias = in_metas[p_idx[0]]
            if len(bias.deps) == 1:
              self.head_bias[self.dense_out[v]] = next(iter(bias.deps))
    outs = self._bind(eqn, in_vals)
    if not self.analysis:
      if self.capture is not None and k == self.capture[0]:
        self.captured = in_vals[self.capture[1]]
      if k in self.taps:
        tap, act_index, dummy = self.taps[k]
        outs = [tap(outs[0], in_vals[act_index], dummy)]
    return [_X] * len(outs), outs


# ----------------------------------------------------------------------------------------------
# Plans.
# ----------------------------------------------------------------------------------------------


class GhostPlan(NamedTuple):
  """How :func:`grand` differentiates each parameter leaf (from :func:`ghost_plan`).

  Attributes:
    jaxpr, consts: the per-example jaxpr of ``apply_fn`` and its constants.
    leaf_metas: the walk's starting meta of each parameter leaf.
    ghost: frontier index -> (rule, leaf index, norm dtype), one per ghost leaf.
    rules: frontier index -> rule, for every recognised layer (ghost or not).
    materialized: indices of leaves differentiated directly, per example.
    zero: indices of float leaves with no gradient (unused or behind ``stop_gradient``).
    paths: a readable name for each leaf.
    head: (frontier index, bias leaf or None) of the last dense layer, or None.
  """

  jaxpr: Any
  consts: list
  leaf_metas: list
  ghost: dict
  rules: dict
  materialized: tuple[int, ...]
  zero: tuple[int, ...]
  paths: list[str]
  head: tuple[int, int | None] | None

  def describe(self) -> dict[str, str]:
    """Leaf path -> ``"dense/gram"``, ``"conv/explicit"``, ``"materialized"``, ``"zero"``, ..."""
    out = {p: "not float" for p in self.paths}
    for rule, leaf, _ in self.ghost.values():
      out[self.paths[leaf]] = f"{rule.kind}/{rule.form}"
    out.update({self.paths[i]: "materialized" for i in self.materialized})
    out.update({self.paths[i]: "zero" for i in self.zero})
    return out


def _example_fn(apply_fn: ApplyFn) -> Callable:
  """``(params, x_1) -> logits_C``: ``apply_fn`` on a batch of one example."""

  def fn(params, x1):
    return apply_fn(params, jax.tree.map(lambda a: a[None], x1))[0]

  return fn


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), tree)


def _is_float(leaf: Any) -> bool:
  return jnp.issubdtype(jnp.result_type(leaf), jnp.floating)


def ghost_plan(apply_fn: ApplyFn, params: Params, x: Any) -> GhostPlan:
  """Analyses ``apply_fn`` once and says how :func:`grand` will handle each parameter leaf.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: parameters (arrays or ``ShapeDtypeStruct``s).
    x: a batch of inputs (only shapes and dtypes are used; its first axis is the batch).

  Returns:
    A :class:`GhostPlan`; ``plan.describe()`` maps each leaf to its method.
  """
  x1 = jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a)[1:], jnp.result_type(a)), x)
  closed = jax.make_jaxpr(_example_fn(apply_fn))(_abstract(params), x1)
  path_leaves, _ = jax.tree_util.tree_flatten_with_path(params)
  paths = [jax.tree_util.keystr(p) for p, _ in path_leaves]
  leaves = [l for _, l in path_leaves]
  leaf_metas = [_P(frozenset({i}), i) if _is_float(l) else None for i, l in enumerate(leaves)]
  x_metas = [_X] * len(jax.tree.leaves(x1))
  walker = _Walker()
  out_metas, _ = walker.run(closed.jaxpr, closed.consts, leaf_metas + x_metas)
  for m in out_metas:  # a logit that is a parameter: differentiate those leaves directly.
    if isinstance(m, _P):
      for leaf in m.deps:
        walker.uses[leaf].append(None)
  ghost, materialized, zero = {}, [], []
  for i, leaf in enumerate(leaves):
    if leaf_metas[i] is None:
      continue
    uses = walker.uses.get(i, [])
    if len(uses) == 1 and uses[0] is not None:
      ghost[uses[0]] = walker.rules[uses[0]]
    elif uses:
      materialized.append(i)
    else:
      zero.append(i)
  head = None
  dense = [k for k, (rule, _, _) in walker.rules.items() if rule.kind == "dense"]
  if dense:
    head = (max(dense), walker.head_bias.get(max(dense)))
  rules = {k: rule for k, (rule, _, _) in walker.rules.items()}
  return GhostPlan(closed.jaxpr, list(closed.consts), leaf_metas, ghost, rules, tuple(materialized),
                   tuple(zero), paths, head)


# ----------------------------------------------------------------------------------------------
# Per-example squared gradient norms.
# ----------------------------------------------------------------------------------------------


def _map_chunks(fn: Callable, chunk_size: int | None, *batched: Any) -> jax.Array:
  """``vmap(fn)`` over the leading axis, ``chunk_size`` rows at a time (all at once if None)."""
  n = jax.tree.leaves(batched)[0].shape[0]
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(fn)(*batched)
  num_chunks = -(-n // chunk_size)
  pad = num_chunks * chunk_size - n

  def split(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape((num_chunks, chunk_size) + a.shape[1:])

  out = lax.map(lambda args: jax.vmap(fn)(*args), jax.tree.map(split, batched))
  return out.reshape((num_chunks * chunk_size,) + out.shape[2:])[:n]


def _example_loss(logits_C: jax.Array, y1: jax.Array, m1: jax.Array) -> jax.Array:
  ce = cross_entropy(as_float(logits_C)[None], y1[None])[0]
  return jnp.where(m1, ce, 0.0)


def _ghost_sq_norms(plan: GhostPlan, params: Params, batch: Batch, chunk_size: int) -> jax.Array:
  leaves = jax.tree.leaves(params)
  x_leaves = jax.tree.leaves(batch["x"])
  ghost = sorted(plan.ghost.items())
  dummies = [jnp.zeros((), dtype) for _, (_, _, dtype) in ghost]
  taps_spec = [(k, _make_tap(rule, dtype), rule.act_index) for k, (rule, _, dtype) in ghost]
  mat_vals = [leaves[i] for i in plan.materialized]
  x_metas = [_X] * len(x_leaves)

  def example(x1_leaves, y1, m1):
    def loss_fn(mat, dums):
      vals = list(leaves)
      for i, v in zip(plan.materialized, mat):
        vals[i] = v
      taps = {k: (tap, act_index, d) for (k, tap, act_index), d in zip(taps_spec, dums)}
      _, (logits,) = _Walker(taps).run(plan.jaxpr, plan.consts, plan.leaf_metas + x_metas,
                                       vals + list(x1_leaves))
      return _example_loss(logits, y1, m1)

    g_mat, g_dums = jax.grad(loss_fn, argnums=(0, 1))(mat_vals, dummies)
    sq = sum((jnp.sum(jnp.square(g.astype(_norm_dtype(g.dtype)))) for g in g_mat), 0.0)
    return sq + sum(g_dums, 0.0)

  b = batch["y"].shape[0]
  mat_size = sum(int(np.prod(jnp.shape(v))) for v in mat_vals)
  total = sum(int(np.prod(jnp.shape(l))) for l in leaves)
  # Materialized leaves cost B x their size; past a full gradient's worth, go in chunks.
  chunk = None if mat_size * b <= max(total, _MATERIALIZED_BUDGET) else chunk_size
  return _map_chunks(example, chunk, x_leaves, batch["y"], batch_mask(batch, b))


def _vmap_sq_norms(apply_fn: ApplyFn, params: Params, batch: Batch,
                   chunk_size: int | None) -> jax.Array:
  leaves, treedef = jax.tree.flatten(params)
  float_idx = [i for i, l in enumerate(leaves) if _is_float(l)]
  fn = _example_fn(apply_fn)

  def example(x1, y1, m1):
    def loss_fn(float_leaves):
      vals = list(leaves)
      for i, v in zip(float_idx, float_leaves):
        vals[i] = v
      return _example_loss(fn(jax.tree.unflatten(treedef, vals), x1), y1, m1)

    grads = jax.grad(loss_fn)([leaves[i] for i in float_idx])
    return sum((jnp.sum(jnp.square(g.astype(_norm_dtype(g.dtype)))) for g in grads), 0.0)

  b = batch["y"].shape[0]
  return _map_chunks(example, chunk_size, batch["x"], batch["y"], batch_mask(batch, b))


# ----------------------------------------------------------------------------------------------
# Public scores.
# ----------------------------------------------------------------------------------------------


def grand(apply_fn: ApplyFn, params: Params, batch: Batch, *, method: str = "auto",
          chunk_size: int = 32) -> Scores:
  """GraNd: the exact L2 norm of each example's cross-entropy gradient over all parameters.

  ``||grad_params CE(apply_fn(params, x_i), y_i)||_2``, over every float leaf of ``params`` (leaves
  behind ``stop_gradient``, such as BatchNorm statistics, contribute 0). High means hard.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``, any JAX function whose rows are independent.
    params: the parameters ``apply_fn`` takes; the gradient is taken with respect to all of them.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.
    method: ``"ghost"`` (per-layer norms from activations and output cotangents, see the module
      doc), ``"vmap"`` (chunked ``vmap(grad)``) or ``"auto"``: ghost when ``apply_fn`` has at least
      one dense, conv or embedding layer the walk recognises, else vmap.
    chunk_size: examples whose full gradients may be alive at once (vmap path, and the ghost path's
      directly differentiated leaves when they are large).

  Returns:
    f32[B] (the params' dtype when wider), 0 on padding rows.

  References:
    Paul, Ganguli, Dziugaite. "Deep Learning on a Data Diet: Finding Important Examples Early in
    Training." NeurIPS 2021.
  """
  check_choice("grand.method", method, METHODS)
  check_positive_int("grand.chunk_size", chunk_size)
  b = batch["y"].shape[0]
  mask_B = batch_mask(batch, b)
  plan = ghost_plan(apply_fn, params, batch["x"]) if method != "vmap" else None
  if method == "ghost" and not plan.ghost:
    raise ConfigError("grand.method='ghost' found no dense, conv or embedding layer in apply_fn; "
                      "use method='auto' or 'vmap'")
  if plan is not None and plan.ghost:
    sq_B = _ghost_sq_norms(plan, params, batch, chunk_size)
  else:
    sq_B = _vmap_sq_norms(apply_fn, params, batch, chunk_size)
  return jnp.where(mask_B, jnp.sqrt(jnp.maximum(sq_B, 0.0)), 0.0)


def grand_vmap(apply_fn: ApplyFn, params: Params, batch: Batch, *,
               chunk_size: int | None = None) -> Scores:
  """GraNd by ``vmap(grad)`` of the one-example loss: all ``B`` full gradients at once when
  ``chunk_size`` is None. The reference the fast path is measured against.

  References:
    Paul, Ganguli, Dziugaite. NeurIPS 2021.
  """
  b = batch["y"].shape[0]
  sq_B = _vmap_sq_norms(apply_fn, params, batch, chunk_size)
  return jnp.where(batch_mask(batch, b), jnp.sqrt(sq_B), 0.0)


def grand_jacrev(apply_fn: ApplyFn, params: Params, batch: Batch) -> Scores:
  """GraNd as Data Diet computes it: ``jacrev`` of the vector of per-example losses of the
  batched forward pass, i.e. the full ``B x P`` Jacobian, then row norms.

  References:
    Paul, Ganguli, Dziugaite. NeurIPS 2021 (github.com/mansheej/data_diet).
  """
  leaves, treedef = jax.tree.flatten(params)
  float_idx = [i for i, l in enumerate(leaves) if _is_float(l)]
  b = batch["y"].shape[0]
  mask_B = batch_mask(batch, b)

  def losses_B(float_leaves):
    vals = list(leaves)
    for i, v in zip(float_idx, float_leaves):
      vals[i] = v
    logits_BxC = as_float(apply_fn(jax.tree.unflatten(treedef, vals), batch["x"]))
    return jnp.where(mask_B, cross_entropy(logits_BxC, batch["y"]), 0.0)

  jac = jax.jacrev(losses_B)([leaves[i] for i in float_idx])
  sq_B = sum((jnp.sum(jnp.square(j.reshape(b, -1)), axis=1) for j in jac), 0.0)
  return jnp.where(mask_B, jnp.sqrt(sq_B), 0.0)


def penultimate(apply_fn: ApplyFn, params: Params, x: Any) -> tuple[jax.Array, jax.Array, bool]:
  """``(h_BxD, logits_BxC, has_bias)``: the input of ``apply_fn``'s last dense layer.

  The last dense layer is the last ``dot_general`` with a parameter kernel in program order, as a
  linear classifier head is; ``has_bias`` says whether a parameter is added to its output.

  Raises:
    ConfigError: ``apply_fn`` has no such layer, or its last one sees several rows per example.
  """
  plan = ghost_plan(apply_fn, params, x)
  if plan.head is None:
    raise ConfigError("apply_fn has no dense layer with a parameter kernel; pass features_fn")
  k, bias_leaf = plan.head
  rule = plan.rules[k]
  if rule.n != 1:
    raise ConfigError(f"the last dense layer of apply_fn sees {rule.n} rows per example; the "
                      "last-layer closed form needs one; pass features_fn")
  leaves = jax.tree.leaves(params)
  x_metas = [_X] * len(jax.tree.leaves(x))

  def example(x1_leaves):
    walker = _Walker(taps={}, capture=(k, rule.act_index))
    _, (logits,) = walker.run(plan.jaxpr, plan.consts, plan.leaf_metas + x_metas,
                              leaves + list(x1_leaves))
    return walker.captured.reshape(-1), logits

  h_BxD, logits_BxC = jax.vmap(example)(jax.tree.leaves(x))
  return h_BxD, logits_BxC, bias_leaf is not None


def grand_last_layer(apply_fn: ApplyFn, params: Params, batch: Batch, *,
                     features_fn: Callable[[Params, Any], jax.Array] | None = None,
                     bias: bool | None = None) -> Scores:
  """GraNd restricted to a linear head, in closed form: ``el2n * sqrt(||h||^2 + 1)``.

  For ``logits = W h + b`` the per-example gradient is ``(softmax - onehot) h^T`` for ``W`` and
  ``softmax - onehot`` for ``b``, so its norm is ``EL2N * sqrt(||h||^2 + 1)`` (``+ 0`` without a
  bias). One forward pass; an approximation of :func:`grand` that ignores every other layer.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``.
    params: the parameters ``apply_fn`` takes.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.
    features_fn: ``features_fn(params, x) -> h_BxD``, the head's input. By default it is found in
      ``apply_fn`` as the input of its last dense layer (see :func:`penultimate`).
    bias: whether the head has a bias; found with the head by default, else True.

  Returns:
    f32[B], 0 on padding rows.

  References:
    Guo, Zhao, Bai. "DeepCore: A Comprehensive Library for Coreset Selection in Deep Learning."
    DEXA 2022.
    Paul, Ganguli, Dziugaite. NeurIPS 2021.
  """
  if features_fn is None:
    h_BxD, logits_BxC, found_bias = penultimate(apply_fn, params, batch["x"])
    bias = found_bias if bias is None else bias
  else:
    h_BxD = features_fn(params, batch["x"]).reshape(batch["y"].shape[0], -1)
    logits_BxC = apply_fn(params, batch["x"])
    bias = True if bias is None else bias
  h_BxD = as_float(h_BxD)
  scores_B = el2n_from_logits(logits_BxC, batch["y"]) * jnp.sqrt(
      jnp.sum(jnp.square(h_BxD), axis=-1) + (1.0 if bias else 0.0))
  return jnp.where(batch_mask(batch, scores_B.shape[0]), scores_B, 0.0)
