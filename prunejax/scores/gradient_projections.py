"""The kernels of :func:`prunejax.scores.gradient_features`: per-layer Kronecker projections of
per-example weight gradients (dense, conv, embedding), and the per-example gradients of the other
leaves, exact or count-sketched.

A layer kernel takes the layer's input and output cotangent and ``(R_in GxkxK, R_out GxexE)``, or
``(None, None)`` for an exact block, and returns ``f[B, G, k, e]``: ``R_in G_i R_out^T`` per
feature group, without forming any per-example weight gradient ``G_i``.
"""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
from jax import lax

from prunejax import layer_rows as lr
from prunejax.scores import ghost_norms

# The module (the package re-exports its function ``grand`` under the same name).
grand_lib = importlib.import_module("prunejax.scores.grand")


def _einsum(spec: str, *ops: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *ops, precision=ghost_norms.PRECISION)


def _dense_features(layer, act, ct, r_in_GxkxK, r_out_GxexE):
  dtype = ghost_norms.norm_dtype(act.dtype, ct.dtype)
  a = lr.dense_rows(layer, act).astype(dtype)
  d = lr.dense_out_rows(layer, ct).astype(dtype)
  if r_in_GxkxK is not None:
    a = _einsum("bgnK,gkK->bgnk", a, r_in_GxkxK)
    d = _einsum("bgnE,geE->bgne", d, r_out_GxexE)
  return _einsum("bgnk,bgne->bgke", a, d)


def _conv_features(layer, act, ct, r_in_GxkxK, r_out_GxexE):
  geo = lr.conv_geometry(layer)
  dtype = ghost_norms.norm_dtype(act.dtype, ct.dtype)
  x = lr.conv_input(geo, act).astype(dtype)
  d, d_spec = lr.conv_out_rows(geo, ct)
  d = d.astype(dtype)
  if r_out_GxexE is not None:
    d = _einsum(f"{d_spec},gfe->{d_spec.replace('e', 'f')}", d, r_out_GxexE)
  d_spec = d_spec.replace("e", "f")
  offsets = lr.conv_offsets(geo)
  cg = geo.c_in // geo.groups
  step = ghost_norms.CONV_OFFSETS_PER_CHUNK.get(ghost_norms._backend()) or len(offsets)
  parts, acc = [], None
  for i in range(0, len(offsets), step):
    if acc is not None:  # one chunk of patches alive at a time (as in ghost_norms).
      x = x + lr.along(0 * acc.reshape(acc.shape[0], -1)[:, 0], x.ndim, 0)
    u, u_spec = lr.conv_rows(geo, x, offsets[i:i + step])
    n = len(offsets[i:i + step])
    if r_in_GxkxK is None:  # exact: this chunk's rows of G_i.
      acc = _einsum(f"{u_spec},{d_spec}->bgkf", u, d)
      parts.append(acc)
      continue
    r = r_in_GxkxK.reshape(r_in_GxkxK.shape[:2] + (len(offsets), cg))[:, :, i:i + n]
    chunk = _einsum(f"{u_spec},gjk->{u_spec.replace('k', 'j')}", u,
                    r.reshape(r.shape[:2] + (-1,)))
    acc = chunk if acc is None else acc + chunk
  if r_in_GxkxK is None:
    return jnp.concatenate(parts, axis=2)
  return _einsum(f"{u_spec.replace('k', 'j')},{d_spec}->bgjf", acc, d)


def _conv_features_filter(layer, act, ct, r_in_GxkxK, r_out_GxexE):
  """A projected conv block with one feature group, without im2col patches: the output cotangent
  is projected onto ``e`` channels, and each example's gradient of a conv with ``e`` output
  channels (a backward-filter convolution, ``K x e``) is projected by ``R_in``."""
  p = layer.eqn.params
  lhs, rhs, out = p["dimension_numbers"]
  dtype = ghost_norms.norm_dtype(act.dtype, ct.dtype)
  ct_e = jnp.moveaxis(_einsum("...E,eE->...e", jnp.moveaxis(ct.astype(dtype), out[1], -1),
                              r_out_GxexE[0]), -1, out[1])
  w_shape = list(layer.eqn.invars[1].aval.shape)
  w_shape[rhs[0]] = ct_e.shape[out[1]]

  def example(x1, d1):
    x1, d1 = jnp.expand_dims(x1, lhs[0]), jnp.expand_dims(d1, out[0])
    conv = lambda w: lax.conv_general_dilated(
        x1, w, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
        p["dimension_numbers"], precision=ghost_norms.PRECISION)
    _, pullback = jax.vjp(conv, jnp.zeros(w_shape, dtype))
    return pullback(d1)[0]

  g_B = jax.vmap(example, in_axes=(lhs[0], out[0]))(act.astype(dtype), ct_e)
  # (B, *rhs layout) -> (B, spatial..., I, e) -> (B, K, e), K in layer_rows' (offset, channel) order.
  perm = (0,) + tuple(1 + d for d in rhs[2:]) + (1 + rhs[1], 1 + rhs[0])
  g_BxKxe = lr.reshape_rows(jnp.transpose(g_B, perm), (g_B.shape[0], -1, ct_e.shape[out[1]]))
  return _einsum("bKe,kK->bke", g_BxKxe, r_in_GxkxK[0])[:, None]


def _embed_features(layer, idx, ct, r_in_GxkxK, r_out_GxexE):
  rows, *row_shape = layer.eqn.invars[0].aval.shape
  idx_BxM = jnp.moveaxis(idx[..., 0], layer.batch_axis, 0)
  b = idx_BxM.shape[0]
  idx_BxM = lr.reshape_rows(idx_BxM, (b, -1)).astype(jnp.int32)
  d_BxMxD = lr.reshape_rows(jnp.moveaxis(ct, layer.out_batch_axis, 0),
                            (b, -1, math.prod(row_shape)))
  d_BxMxD = d_BxMxD.astype(ghost_norms.norm_dtype(d_BxMxD.dtype))
  if layer.eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
    inside = (idx_BxM >= 0) & (idx_BxM < rows)
    d_BxMxD = jnp.where(inside[..., None], d_BxMxD, 0.0)
  idx_BxM = jnp.clip(idx_BxM, 0, rows - 1)
  if r_in_GxkxK is None:
    g_BxVxD = jnp.zeros((b, rows, d_BxMxD.shape[-1]), d_BxMxD.dtype)
    return g_BxVxD.at[jnp.arange(b)[:, None], idx_BxM].add(d_BxMxD)[:, None]
  pa_BxMxk = jnp.take(r_in_GxkxK[0].T.astype(d_BxMxD.dtype), idx_BxM, axis=0)
  pd_BxMxe = _einsum("bmD,eD->bme", d_BxMxD, r_out_GxexE[0])
  return _einsum("bmk,bme->bke", pa_BxMxk, pd_BxMxe)[:, None]


FEATURES = {"dense": _dense_features, "conv": _conv_features, "embed": _embed_features}


# ----------------------------------------------------------------------------------------------
# The other leaves: exact per-example gradients, count-sketched when large.
# ----------------------------------------------------------------------------------------------


def _vmap_grads(apply_fn, params, x, y_B, w_B, leaf_ids, chunk_size) -> dict[int, jax.Array]:
  leaves = jax.tree.leaves(params)
  ids = list(leaf_ids)
  grads_of = grand_lib.example_grads(apply_fn, params, ids)

  def example(x1, y1, w1):
    return jnp.concatenate([a.reshape(-1).astype(ghost_norms.norm_dtype(a.dtype))
                            for a in grads_of(x1, y1, w1)])

  flat_BxP = grand_lib._map_chunks(example, chunk_size, x, y_B, w_B)
  out, start = {}, 0
  for i in ids:
    n = math.prod(jnp.shape(leaves[i]))
    out[i] = flat_BxP[:, start:start + n].reshape((-1,) + jnp.shape(leaves[i]))
    start += n
  return out


def _count_sketch(key: jax.Array, g_BxP: jax.Array, dim: int) -> jax.Array:
  k_bucket, k_sign = jax.random.split(key)
  size = g_BxP.shape[1]
  bucket_P = jax.random.randint(k_bucket, (size,), 0, dim)
  sign_P = jnp.where(jax.random.bernoulli(k_sign, 0.5, (size,)), 1.0, -1.0).astype(g_BxP.dtype)
  out = jnp.zeros((g_BxP.shape[0], dim), g_BxP.dtype)
  return out.at[:, bucket_P].add(g_BxP * sign_P)
