"""A layer's input and output (or output cotangent) as per-example rows, for the layers of
:mod:`prunejax.layer_taps`.

Row ``n`` of example ``i`` is one application of the weight: ``out_n = a_n W``. Dense layers: the
rows are the activation's free positions (tokens of a sequence) within each dot-batch group, the
features its contracted dims. Conv layers: the rows are the output positions and the features the
im2col patch, built from strided slices of the input (never a patch-extracting convolution), in the
input's own layout (channels first or last), so no activation is transposed.

Public helpers: :func:`layer_rows` (``a_BxNxK`` of any layer, for calibration statistics),
:func:`dense_rows` / :func:`dense_out_rows`, :func:`conv_geometry`, :func:`conv_input`,
:func:`conv_padded_input`, :func:`conv_tap`, :func:`conv_rows`, :func:`conv_out_rows`, and
:func:`reshape_rows` / :func:`along`, reshapes that keep the example axis first and its sharding on
explicit-axes meshes.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# ----------------------------------------------------------------------------------------------
# Reshapes that keep the example axis (and its sharding) in place.
# ----------------------------------------------------------------------------------------------


def explicit_sharding(x: Any) -> NamedSharding | None:
  """``x``'s sharding when it is typed on an explicit-axes mesh (``jax.make_mesh``), else None."""
  sharding = getattr(jax.typeof(x), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or mesh.empty or not any(t == AxisType.Explicit for t in mesh.axis_types):
    return None
  return sharding


def reshape_rows(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """``x.reshape(shape)`` for an array whose leading axis is the examples and stays the leading
  axis; on an explicit-axes mesh that axis keeps its sharding and the others are unsharded."""
  shape = tuple(int(n) for n in np.empty(x.shape, np.bool_).reshape(shape).shape)
  sharding = explicit_sharding(x)
  if sharding is None:
    return x.reshape(shape)
  lead = sharding.spec[0] if len(sharding.spec) else None
  spec = PartitionSpec(lead, *([None] * (len(shape) - 1)))
  return lax.reshape(x, shape, out_sharding=NamedSharding(sharding.mesh, spec))


def along(z_B: jax.Array, ndim: int, axis: int) -> jax.Array:
  """``z_B`` as an ``ndim``-d array with its values along ``axis`` (size 1 elsewhere)."""
  shape = tuple(z_B.shape[0] if d == axis else 1 for d in range(ndim))
  return lax.broadcast_in_dim(z_B, shape, (axis,))


# ----------------------------------------------------------------------------------------------
# Dense layers.
# ----------------------------------------------------------------------------------------------


def dense_dims(layer: Any) -> tuple[list[int], list[int], list[int], list[int]]:
  """A dense layer's activation dims (dot batch, free but the example axis, contracting) and the
  output's dims in (example, dot batch, activation free, weight free) order."""
  eqn = layer.eqn
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  a_contract, a_batch = (lc, lb) if layer.act_index == 0 else (rc, rb)
  a_free = [d for d in range(eqn.invars[layer.act_index].aval.ndim)
            if d not in a_contract and d not in a_batch]
  w_ndim = eqn.invars[1 - layer.act_index].aval.ndim
  n_w_free = w_ndim - len(lc) - len(lb)
  first_a = len(lb) + (n_w_free if layer.act_index == 1 else 0)
  first_w = len(lb) + (len(a_free) if layer.act_index == 0 else 0)
  out_a = [first_a + j for j, d in enumerate(a_free) if d != layer.batch_axis]
  out_order = ([layer.out_batch_axis] + list(range(len(lb))) + out_a
               + list(range(first_w, first_w + n_w_free)))
  return list(a_batch), [d for d in a_free if d != layer.batch_axis], list(a_contract), out_order


def dense_rows(layer: Any, act: jax.Array) -> jax.Array:
  """A dense layer's input as ``a_BxGxNxK``: G dot-batch groups, N rows, K features."""
  a_batch, a_free, a_contract, _ = dense_dims(layer)
  a = jnp.transpose(act, [layer.batch_axis] + a_batch + a_free + a_contract)
  g = math.prod(act.shape[d] for d in a_batch)
  k = math.prod(act.shape[d] for d in a_contract)
  return reshape_rows(a, (a.shape[0], g, -1, k))


def dense_out_rows(layer: Any, out: jax.Array) -> jax.Array:
  """A dense layer's output (or its cotangent) as ``d_BxGxNxE``."""
  a_batch, a_free, _, out_order = dense_dims(layer)
  d = jnp.transpose(out, out_order)
  g = math.prod(d.shape[1:1 + len(a_batch)])
  e = math.prod(d.shape[1 + len(a_batch) + len(a_free):])
  return reshape_rows(d, (d.shape[0], g, -1, e))


# ----------------------------------------------------------------------------------------------
# Convolutions.
# ----------------------------------------------------------------------------------------------


class ConvGeometry(NamedTuple):
  """A conv layer with the example axis first and channels first or last (whichever the input's
  and output's own layouts are; channels last when neither)."""

  in_perm: tuple[int, ...]      # act -> (B, C_in, spatial...) or (B, spatial..., C_in)
  in_last: bool                 # whether C_in is last
  out_perm: tuple[int, ...]     # out -> (B, C_out, spatial...) or (B, spatial..., C_out)
  out_last: bool
  pads: tuple[tuple[int, int, int], ...]  # (low, high, interior) per spatial dim
  strides: tuple[int, ...]
  dilation: tuple[int, ...]     # rhs (kernel) dilation
  window: tuple[int, ...]       # kernel spatial size
  out_spatial: tuple[int, ...]
  groups: int
  c_in: int
  c_out: int


def _layout(spec: tuple[int, ...]) -> tuple[tuple[int, ...], bool]:
  """(perm, channels_last): channels first if that is the array's own order, else last."""
  first = (spec[0], spec[1]) + tuple(spec[2:])
  natural = (spec[0],) + tuple(sorted(spec[1:]))
  if first == natural:
    return first, False
  return (spec[0],) + tuple(spec[2:]) + (spec[1],), True


def conv_geometry(layer: Any) -> ConvGeometry:
  """The :class:`ConvGeometry` of a conv layer (from its equation's params and shapes)."""
  p = layer.eqn.params
  lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
  w_shape = layer.eqn.invars[1].aval.shape
  out_shape = layer.eqn.outvars[0].aval.shape
  lhs_dil = p["lhs_dilation"] or (1,) * (len(lhs_spec) - 2)
  pads = tuple((lo, hi, d - 1) for (lo, hi), d in zip(p["padding"], lhs_dil))
  (in_perm, in_last), (out_perm, out_last) = _layout(lhs_spec), _layout(out_spec)
  return ConvGeometry(
      in_perm, in_last, out_perm, out_last, pads, tuple(p["window_strides"]),
      tuple(p["rhs_dilation"] or (1,) * len(pads)), tuple(w_shape[d] for d in rhs_spec[2:]),
      tuple(out_shape[d] for d in out_spec[2:]), p["feature_group_count"],
      layer.eqn.invars[0].aval.shape[lhs_spec[1]], w_shape[rhs_spec[0]])


def _spatial_axes(geo: ConvGeometry, ndim: int, last: bool) -> list[int]:
  return list(range(1, ndim - 1)) if last else list(range(2, ndim))


def _pad_config(geo: ConvGeometry, ndim: int, last: bool, spatial: list) -> list:
  config = [(0, 0, 0)] * ndim
  for axis, pad in zip(_spatial_axes(geo, ndim, last), spatial):
    config[axis] = pad
  return config


def conv_input(geo: ConvGeometry, act: jax.Array) -> jax.Array:
  """The conv's input with the example axis first and lhs dilation as interior zeros (no edge
  padding: :func:`conv_tap` adds it per kernel offset)."""
  x = jnp.transpose(act, geo.in_perm)
  if all(it == 0 for _, _, it in geo.pads):
    return x
  config = _pad_config(geo, x.ndim, geo.in_last, [(0, 0, it) for _, _, it in geo.pads])
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def conv_padded_input(geo: ConvGeometry, x: jax.Array) -> jax.Array:
  """:func:`conv_input` with the conv's edge padding."""
  config = _pad_config(geo, x.ndim, geo.in_last, [(lo, hi, 0) for lo, hi, _ in geo.pads])
  return lax.pad(x, jnp.zeros((), x.dtype), config)


def _tap_range(base: int, stride: int, n_out: int, size: int) -> tuple[int, int]:
  """First and last output index ``t`` whose input index ``base + t * stride`` is inside."""
  first = 0 if base >= 0 else (stride - 1 - base) // stride
  return first, min(n_out - 1, (size - 1 - base) // stride)


def conv_tap(geo: ConvGeometry, x: jax.Array, offset: tuple[int, ...]) -> jax.Array:
  """The inputs that kernel position ``offset`` sees (layout of ``x`` with the output's spatial
  size), from the output of :func:`conv_input`: a strided slice, zero-padded where the window
  leaves the input."""
  start, limit, strides, pads = [0] * x.ndim, list(x.shape), [1] * x.ndim, []
  axes = _spatial_axes(geo, x.ndim, geo.in_last)
  for axis, o, dil, st, n, (lo, _, _) in zip(axes, offset, geo.dilation, geo.strides,
                                             geo.out_spatial, geo.pads):
    base = o * dil - lo
    first, last = _tap_range(base, st, n, x.shape[axis])
    if first > last:  # this offset only ever sees padding: an empty slice padded to size n.
      start[axis], limit[axis] = 0, 0
      pads.append((n, 0, 0))
      continue
    start[axis], limit[axis], strides[axis] = base + first * st, base + last * st + 1, st
    pads.append((first, n - 1 - last, 0))
  tap = lax.slice(x, start, limit, strides)
  return lax.pad(tap, jnp.zeros((), x.dtype), _pad_config(geo, x.ndim, geo.in_last, pads))


def conv_offsets(geo: ConvGeometry) -> list[tuple[int, ...]]:
  return list(itertools.product(*(range(w) for w in geo.window)))


def conv_rows(geo: ConvGeometry, x: jax.Array,
              offsets: list[tuple[int, ...]] | None = None) -> tuple[jax.Array, str]:
  """im2col patches of ``offsets`` (all by default) from the output of :func:`conv_input`, and
  their einsum subscripts: ``"bpgk"`` (``B, P, G, K``) for channels-last inputs, ``"bgkp"`` for
  channels-first; P output positions, G feature groups, K = (offset, input channel of the group)."""
  offsets = conv_offsets(geo) if offsets is None else offsets
  taps = [conv_tap(geo, x, o) for o in offsets]
  b, cg = x.shape[0], geo.c_in // geo.groups
  if geo.in_last:
    u = reshape_rows(jnp.stack(taps, axis=-2), (b, -1, len(offsets), geo.groups, cg))
    return reshape_rows(jnp.swapaxes(u, 2, 3), (b, u.shape[1], geo.groups, -1)), "bpgk"
  u = reshape_rows(jnp.stack(taps, axis=1), (b, len(offsets), geo.groups, cg, -1))
  return reshape_rows(jnp.swapaxes(u, 1, 2), (b, geo.groups, -1, u.shape[-1])), "bgkp"


def conv_out_rows(geo: ConvGeometry, out: jax.Array) -> tuple[jax.Array, str]:
  """A conv's output (or its cotangent) and its einsum subscripts: ``"bpge"`` (``B, P, G,
  C_out / G``) channels last or ``"bgep"`` channels first."""
  d = jnp.transpose(out, geo.out_perm)
  eg = geo.c_out // geo.groups
  if geo.out_last:
    return reshape_rows(d, (d.shape[0], -1, geo.groups, eg)), "bpge"
  return reshape_rows(d, (d.shape[0], geo.groups, eg, -1)), "bgep"


def layer_rows(layer: Any, act: jax.Array) -> jax.Array:
  """A layer's input as per-example rows ``a_BxNxK`` (the rows its output rows are computed
  from): dense ``N`` = rows per example over all dot-batch groups, ``K`` = contracted features;
  conv ``N`` = (feature group, output position), ``K`` = (kernel offset, input channel of the
  group); embeddings: the token ids, ``(B, N, 1)``."""
  if layer.kind == "dense":
    a = dense_rows(layer, act)
    return reshape_rows(a, (a.shape[0], -1, a.shape[-1]))
  if layer.kind == "conv":
    geo = conv_geometry(layer)
    u, spec = conv_rows(geo, conv_input(geo, act))
    u = jnp.einsum(f"{spec}->bgpk", u)
    return reshape_rows(u, (u.shape[0], -1, u.shape[-1]))
  idx = jnp.moveaxis(act, layer.batch_axis, 0)
  return reshape_rows(idx, (idx.shape[0], -1, 1))
