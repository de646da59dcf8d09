"""The jaxpr walk behind :mod:`prunejax.layer_taps`: what it finds, and how.

:class:`Layer`, :class:`Site` and :class:`LayerPlan` (re-exported by :mod:`prunejax.layer_taps`)
are what :func:`prunejax.layer_taps.find_layers` returns. The example axis of every jaxpr variable
comes from two traces, the batch doubled in the second (:func:`_example_axes`); an equation where a
parameter meets the batch is a layer when one of the rules in :data:`_LAYER_RULES` recognises it,
a site when it broadcasts a parameter-side value over the examples; and :class:`_Walker` walks the
jaxpr in one of three modes (analyse, evaluate with taps, parameter side only).
"""

from __future__ import annotations

import collections
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.extend import core as jcore

from prunejax.types import ApplyFn, Params

# Higher-order primitives whose body is inlined when parameters and the batch meet inside them
# (``jax.checkpoint`` binds ``remat2`` in recent JAX). Custom derivatives (custom_jvp/vjp), scans
# and loops are kept whole: their leaves are other uses.
_INLINE = frozenset({"pjit", "jit", "closed_call", "core_call", "checkpoint", "remat", "remat2"})

# Parameter-side ops whose pullback preserves the norm of a gradient (permutations, selections,
# casts): a leaf seen through them is still the layer's weight.
_ISOMETRIC = frozenset({"reshape", "squeeze", "expand_dims", "transpose", "copy", "copy_p",
                        "convert_element_type", "broadcast_in_dim", "slice", "rev", "pvary",
                        "pcast", "reshard", "mesh_cast", "sharding_constraint"})

# Ops that change only an array's type (varying manual axes, sharding): the two traces of
# ``find_layers`` may differ by them.
_TYPE_ONLY = frozenset({"pvary", "pcast", "reshard", "mesh_cast", "sharding_constraint"})

# Elementwise ops that broadcast size-1 dimensions: a parameter operand of one is a site.
_ELEMENTWISE = frozenset({"add", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem",
                          "select_n", "clamp", "nextafter", "add_any"})

_MIXED = "mixed"  # axis of a value whose shape depends on the batch size other than by one axis.


class _P(NamedTuple):
  """Meta of a parameter-side value (independent of the examples)."""

  deps: frozenset        # leaves it depends on
  iso: int | None        # the leaf this value is an isometric image of, if any


_X = "x"  # meta of a value that depends on the examples; None marks a constant.


class Layer(NamedTuple):
  """A dense, conv or embedding layer: one parameter leaf meets the batch in one equation.

  Attributes:
    index: the layer's key in :attr:`LayerPlan.layers` (walk order).
    kind: ``"dense"``, ``"conv"`` or ``"embed"``.
    leaf: index of the parameter leaf (``jax.tree.leaves(params)`` order).
    path: the leaf's path, ``jax.tree_util.keystr`` style.
    act_index: which operand of ``eqn`` is the activation (the other one is the leaf).
    batch_axis: the example axis of the activation.
    out_batch_axis: the example axis of the output.
    eqn: the jaxpr equation (its params and shapes).
  """

  index: int
  kind: str
  leaf: int
  path: str
  act_index: int
  batch_axis: int
  out_batch_axis: int
  eqn: Any


class Site(NamedTuple):
  """A parameter-side value broadcast over the examples (a bias, a norm scale, a position table).

  Attributes:
    key: ``(frontier index, operand index)``, the site's key in :attr:`LayerPlan.sites`.
    deps: leaves the value depends on.
    shape, dtype: the value's shape and dtype.
    pos: where the example axis goes in the broadcast value.
    insert: whether that axis is new (``broadcast_in_dim``) or replaces a size-1 axis.
    new_dims: ``broadcast_dimensions`` of a ``broadcast_in_dim`` site that inserts it.
  """

  key: tuple[int, int]
  deps: frozenset
  shape: tuple[int, ...]
  dtype: Any
  pos: int
  insert: bool
  new_dims: tuple[int, ...] | None


class LayerPlan(NamedTuple):
  """What :func:`prunejax.layer_taps.find_layers` found (see the layer_taps module doc).

  Attributes:
    jaxpr, consts: the batched jaxpr of ``apply_fn`` and its constants.
    axes: jaxpr variable -> example axis (None: no example axis).
    leaf_metas: the walk's starting meta of each parameter leaf (None for non-float leaves).
    num_x: number of input leaves.
    batch_size: ``B``.
    layers: index -> :class:`Layer`, every recognised layer.
    sites: key -> :class:`Site`, every broadcast site.
    uses: leaf index -> its uses, each ``("layer", k)``, ``("site", key)`` or ``("other", k)``.
    paths: a readable name of each leaf.
    head: ``(layer index, bias leaf or None)`` of the last dense layer, or None.
  """

  jaxpr: Any
  consts: list
  axes: dict
  leaf_metas: list
  num_x: int
  batch_size: int
  layers: dict
  sites: dict
  uses: dict
  paths: list
  head: tuple[int, int | None] | None


# ----------------------------------------------------------------------------------------------
# Example axes: two traces, the batch doubled in the second.
# ----------------------------------------------------------------------------------------------


class _Mismatch(Exception):
  pass


def _sub_jaxpr(eqn) -> tuple[Any, list] | None:
  for name in ("jaxpr", "call_jaxpr"):
    j = eqn.params.get(name)
    if isinstance(j, jcore.ClosedJaxpr):
      return j.jaxpr, list(j.consts)
    if isinstance(j, jcore.Jaxpr):
      return j, []
  return None


def _axis(aval_a: Any, aval_b: Any, b: int) -> int | str | None:
  shape_a, shape_b = getattr(aval_a, "shape", ()), getattr(aval_b, "shape", ())
  if len(shape_a) != len(shape_b):
    return _MIXED
  diffs = [d for d, (sa, sb) in enumerate(zip(shape_a, shape_b)) if sa != sb]
  if not diffs:
    return None
  if len(diffs) == 1 and shape_a[diffs[0]] == b and shape_b[diffs[0]] == 2 * b:
    return diffs[0]
  return _MIXED


def _match_axes(ja, jb, b: int, axes: dict) -> None:
  """Example axes of ``ja``'s variables from ``jb`` (the same program, batch ``2b``); equations
  that change only types (:data:`_TYPE_ONLY`) may appear in one of them alone."""
  if len(ja.invars) != len(jb.invars) or len(ja.constvars) != len(jb.constvars):
    raise _Mismatch
  for va, vb in zip(ja.constvars + ja.invars, jb.constvars + jb.invars):
    axes[va] = _axis(va.aval, vb.aval, b)
  i = j = 0
  while i < len(ja.eqns) or j < len(jb.eqns):
    ea = ja.eqns[i] if i < len(ja.eqns) else None
    eb = jb.eqns[j] if j < len(jb.eqns) else None
    if ea is not None and (eb is None or ea.primitive is not eb.primitive) and (
        ea.primitive.name in _TYPE_ONLY):
      src = ea.invars[0]
      axes[ea.outvars[0]] = None if isinstance(src, jcore.Literal) else axes.get(src)
      i += 1
      continue
    if eb is not None and (ea is None or ea.primitive is not eb.primitive) and (
        eb.primitive.name in _TYPE_ONLY):
      j += 1
      continue
    if ea is None or eb is None or ea.primitive is not eb.primitive or (
        len(ea.outvars) != len(eb.outvars)):
      raise _Mismatch
    for va, vb in zip(ea.outvars, eb.outvars):
      if not isinstance(va, jcore.DropVar):
        axes[va] = _axis(va.aval, vb.aval, b)
    sub_a, sub_b = _sub_jaxpr(ea), _sub_jaxpr(eb)
    if sub_a is not None and sub_b is not None:
      _match_axes(sub_a[0], sub_b[0], b, axes)
    i, j = i + 1, j + 1


def _abstract(tree: Any, batch: int | None = None) -> Any:
  def leaf(a):
    shape = tuple(jnp.shape(a))
    if batch is not None:
      shape = (batch,) + shape[1:]
    return jax.ShapeDtypeStruct(shape, jnp.result_type(a))
  return jax.tree.map(leaf, tree)


def _example_axes(apply_fn: ApplyFn, params: Params, x: Any, closed: Any, b: int) -> dict | None:
  """Example axis of every variable of ``closed`` (None: the two traces differ in structure)."""
  try:
    doubled = jax.make_jaxpr(apply_fn)(_abstract(params), _abstract(x, 2 * b))
    axes: dict = {}
    _match_axes(closed.jaxpr, doubled.jaxpr, b, axes)
  except (_Mismatch, TypeError, ValueError):
    return None
  return axes


# ----------------------------------------------------------------------------------------------
# Layer recognition: which operand is the activation, and is its example axis usable.
# ----------------------------------------------------------------------------------------------


def _dense_layer(eqn, w_index: int, act_axis: Any) -> tuple[int, int] | None:
  """``(act_index, out_axis)`` of a ``dot_general`` whose operand ``w_index`` is the weight."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  act_index = 1 - w_index
  a_contract, a_batch = (lc, lb) if act_index == 0 else (rc, rb)
  w_ndim = eqn.invars[w_index].aval.ndim
  w_free = w_ndim - len(lc if w_index == 0 else rc) - len(lb)
  if not isinstance(act_axis, int) or act_axis in a_contract or act_axis in a_batch:
    return None
  a_free = [d for d in range(eqn.invars[act_index].aval.ndim)
            if d not in a_contract and d not in a_batch]
  out_axis = len(lb) + a_free.index(act_axis) + (w_free if act_index == 1 else 0)
  return act_index, out_axis


def _conv_layer(eqn, w_index: int, act_axis: Any) -> tuple[int, int] | None:
  lhs_spec, _, out_spec = eqn.params["dimension_numbers"]
  if w_index != 1 or eqn.params["batch_group_count"] != 1 or act_axis != lhs_spec[0]:
    return None
  return 0, out_spec[0]


def _embed_layer(eqn, w_index: int, act_axis: Any) -> tuple[int, int] | None:
  p = eqn.params
  dn = p["dimension_numbers"]
  w_shape, idx_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  out_ndim = eqn.outvars[0].aval.ndim
  if (w_index != 0 or dn.collapsed_slice_dims != (0,) or dn.start_index_map != (0,)
      or dn.operand_batching_dims or dn.start_indices_batching_dims
      or tuple(p["slice_sizes"]) != (1,) + tuple(w_shape[1:]) or not idx_shape
      or idx_shape[-1] != 1
      or tuple(dn.offset_dims) != tuple(range(out_ndim - len(w_shape) + 1, out_ndim))
      or not isinstance(act_axis, int) or act_axis == len(idx_shape) - 1):
    return None
  return 1, act_axis


_LAYER_RULES: dict[str, tuple[str, Callable]] = {
    "dot_general": ("dense", _dense_layer), "conv_general_dilated": ("conv", _conv_layer),
    "gather": ("embed", _embed_layer)}


def _layer(k: int, eqn, metas: list, p_idx: list, axes: dict, paths: list) -> Layer | None:
  name = eqn.primitive.name
  if len(p_idx) != 1 or name not in _LAYER_RULES:
    return None
  m = metas[p_idx[0]]
  if m.iso is None or m.deps != {m.iso}:
    return None
  kind, rule = _LAYER_RULES[name]
  act_var = eqn.invars[1 - p_idx[0]]
  act_axis = None if isinstance(act_var, jcore.Literal) else axes.get(act_var)
  found = rule(eqn, p_idx[0], act_axis)
  if found is None or axes.get(eqn.outvars[0]) != found[1]:
    return None
  return Layer(k, kind, m.iso, paths[m.iso], found[0], act_axis, found[1], eqn)


def _sites(k: int, eqn, metas: list, p_idx: list, out_axis: Any) -> list[Site] | None:
  """The broadcast sites of an equation whose output has an example axis, or None."""
  name = eqn.primitive.name
  if not isinstance(out_axis, int) or name not in _ELEMENTWISE | {"broadcast_in_dim"}:
    return None
  sites = []
  for i in p_idx:
    shape, dtype = tuple(eqn.invars[i].aval.shape), eqn.invars[i].aval.dtype
    if name != "broadcast_in_dim":
      if len(shape) != eqn.outvars[0].aval.ndim or shape[out_axis] != 1:
        return None
      sites.append(Site((k, i), metas[i].deps, shape, dtype, out_axis, False, None))
      continue
    dims = tuple(eqn.params["broadcast_dimensions"])
    if out_axis in dims:
      pos = dims.index(out_axis)
      if shape[pos] != 1:
        return None
      sites.append(Site((k, i), metas[i].deps, shape, dtype, pos, False, None))
    else:
      pos = sum(d < out_axis for d in dims)
      new_dims = tuple(sorted(dims + (out_axis,)))
      sites.append(Site((k, i), metas[i].deps, shape, dtype, pos, True, new_dims))
  return sites


# ----------------------------------------------------------------------------------------------
# The walk.
# ----------------------------------------------------------------------------------------------


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
  """Walks a jaxpr, tracking which values are parameters; ``mode`` is ``"analyse"`` (no values:
  records layers, sites and uses), ``"eval"`` (evaluates, calling the taps) or ``"params"``
  (evaluates only the parameter side, recording the values of the sites).

  The walk order is deterministic, so frontier ``k`` (the k-th equation where parameters meet the
  batch or gain an example axis) names the same equation in every mode.
  """

  def __init__(self, axes: dict, mode: str, plan: LayerPlan | None = None,
               layer_taps: dict | None = None, site_taps: dict | None = None,
               paths: list | None = None):
    self.axes, self.mode, self.plan = axes, mode, plan
    self.layer_taps, self.site_taps = layer_taps or {}, site_taps or {}
    self.paths = paths
    self.k = 0
    self.records: dict = {}
    self.site_values: dict = {}
    self.weights: dict = {}
    self.layers: dict = {}
    self.sites: dict = {}
    self.uses: dict = collections.defaultdict(list)
    self.dense_out: dict = {}
    self.head_bias: dict = {}

  def run(self, jaxpr, consts, in_metas, in_vals=None):
    metas: dict = {}
    vals: dict = {}

    def read(v):
      if isinstance(v, jcore.Literal):
        return None, v.val
      return metas[v], vals.get(v)

    for v, c in zip(jaxpr.constvars, consts):
      metas[v], vals[v] = None, c
    for i, v in enumerate(jaxpr.invars):
      metas[v] = in_metas[i]
      vals[v] = None if in_vals is None else in_vals[i]
    for eqn in jaxpr.eqns:
      ins = [read(v) for v in eqn.invars]
      out_metas, out_vals = self._eqn(eqn, [m for m, _ in ins], [x for _, x in ins])
      for v, m, x in zip(eqn.outvars, out_metas, out_vals):
        if not isinstance(v, jcore.DropVar):
          metas[v], vals[v] = m, x
    outs = [read(v) for v in jaxpr.outvars]
    return [m for m, _ in outs], [x for _, x in outs]

  def _bind(self, eqn, in_vals, has_x: bool, params: dict | None = None) -> list:
    if self.mode == "analyse" or (self.mode == "params" and has_x):
      return [None] * len(eqn.outvars)
    params = eqn.params if params is None else params
    out = eqn.primitive.bind(*in_vals, **eqn.primitive.get_bind_params(params))
    return list(out) if eqn.primitive.multiple_results else [out]

  def _eqn(self, eqn, in_metas, in_vals):
    name = eqn.primitive.name
    has_x = any(m == _X for m in in_metas)
    p_idx = [i for i, m in enumerate(in_metas) if isinstance(m, _P)]
    if name == "stop_gradient" or not p_idx:
      return [_X if has_x else None] * len(eqn.outvars), self._bind(eqn, in_vals, has_x)
    sub = _sub_jaxpr(eqn) if name in _INLINE else None
    if sub is not None and len(sub[0].invars) == len(in_metas):
      return self.run(sub[0], sub[1], in_metas, None if self.mode == "analyse" else in_vals)
    out_axis = self.axes.get(eqn.outvars[0])
    if not has_x and out_axis is None:
      return self._param_side(eqn, in_metas, in_vals, p_idx), self._bind(eqn, in_vals, False)
    return self._frontier(eqn, in_metas, in_vals, p_idx, out_axis)

  @staticmethod
  def _param_side(eqn, in_metas, in_vals, p_idx) -> list:
    if len(p_idx) == 1 and _is_isometric(eqn):
      return [in_metas[p_idx[0]]]
    deps = frozenset().union(*(in_metas[i].deps for i in p_idx))
    return [_P(deps, None)] * len(eqn.outvars)

  def _frontier(self, eqn, in_metas, in_vals, p_idx, out_axis):
    """An equation where parameters meet the batch, or a parameter gains an example axis."""
    k = self.k
    self.k += 1
    if self.mode == "analyse":
      self._classify(k, eqn, in_metas, p_idx, out_axis)
      return [_X] * len(eqn.outvars), self._bind(eqn, in_vals, True)
    has_x = any(m == _X for m in in_metas)
    vals, params = list(in_vals), None
    for i in p_idx:
      site = self.plan.sites.get((k, i))
      if site is not None and self.mode == "params":
        self.site_values[site.key] = in_vals[i]
      elif self.mode == "params" and k in self.plan.layers and (
          i == 1 - self.plan.layers[k].act_index):
        self.weights[k] = in_vals[i]
      elif site is not None and site.key in self.site_taps:
        vals[i] = self.site_taps[site.key](site, in_vals[i])
        if site.insert:
          params = dict(eqn.params, broadcast_dimensions=site.new_dims)
    outs = self._bind(eqn, vals, has_x or self.mode == "params", params)
    if k in self.layer_taps:
      layer = self.plan.layers[k]
      outs[0], self.records[k] = self.layer_taps[k](layer, in_vals[layer.act_index], outs[0])
    return [_X] * len(eqn.outvars), outs

  def _classify(self, k, eqn, in_metas, p_idx, out_axis) -> None:
    has_x = any(m == _X for m in in_metas)
    layer = _layer(k, eqn, in_metas, p_idx, self.axes, self.paths) if has_x else None
    sites = None if layer is not None else _sites(k, eqn, in_metas, p_idx, out_axis)
    if layer is not None:
      self.layers[k] = layer
      self.uses[layer.leaf].append(("layer", k))
      if layer.kind == "dense":
        self.dense_out[eqn.outvars[0]] = k
    elif sites is not None:
      for site in sites:
        self.sites[site.key] = site
        for leaf in site.deps:
          self.uses[leaf].append(("site", site.key))
      if eqn.primitive.name == "add" and len(sites) == 1 and len(sites[0].deps) == 1:
        for v in eqn.invars:
          if not isinstance(v, jcore.Literal) and v in self.dense_out:
            self.head_bias[self.dense_out[v]] = next(iter(sites[0].deps))
    else:
      for i in p_idx:
        for leaf in in_metas[i].deps:
          self.uses[leaf].append(("other", k))
