"""Per-example squared gradient norms of one layer's weight, from its input and output cotangent.

For a layer found by :mod:`prunejax.layer_taps` (rows ``n`` of example ``i``: ``out_n = a_n W``),
example ``i``'s weight gradient is ``G_i = sum_n a_n^T d_n`` where ``d`` is the cotangent of the
layer's output in the backward pass of the summed loss (in evaluation mode row ``i`` of that
cotangent is example ``i``'s own). Its squared norm is computed without forming ``G`` for the whole
batch, by one of these forms, chosen per layer from the shapes at trace time (:func:`choose`):

* ``vector`` (one row per example): ``||a||^2 ||d||^2``;
* ``gram``: ``sum_{n,m} (a_n . a_m)(d_n . d_m)`` (the "ghost norm"); for a stride-1 convolution the
  Gram matrix of the patches is the Gram matrix of the padded input positions summed over the
  kernel offsets, so no im2col patches are formed;
* ``explicit``: ``||A^T D||^2``, the per-example gradient itself; for convolutions the im2col
  patches are built from strided slices of the input in its own layout (no patch-extracting
  convolution), a few kernel offsets at a time on CPU (:data:`CONV_OFFSETS_PER_CHUNK`);
* embeddings: ``sum_{m,n} [tok_m = tok_n] (d_m . d_n)`` (``gram``) or the scatter of ``d`` into the
  table (``explicit``).

The cost of each form is its multiply-adds plus a per-backend weight (:data:`MEMORY_WEIGHT`) times
the elements it writes and reads: the per-layer choice between ghost norm and explicit gradient of
Bu et al.'s mixed ghost clipping, with the conv Gram matrix from the input's own Gram matrix.

References:
  Goodfellow. "Efficient Per-Example Gradient Computations." arXiv:1510.01799, 2015.
  Li, Tramer, Liang, Hashimoto. "Large Language Models Can Be Strong Differentially Private
  Learners." ICLR 2022 (ghost clipping).
  Bu, Mao, Xu. "Scalable and Efficient Training of Large Convolutional Neural Networks with
  Differential Privacy." NeurIPS 2022 (mixed ghost clipping).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from prunejax import layer_rows as lr
from prunejax import layer_taps as lt

FORMS = ("vector", "gram", "explicit")
# Precision of the norm products: None follows ``jax.default_matmul_precision``, the precision of
# the model's own passes (TF32 on recent GPUs unless set to "highest"; exact on CPU).
PRECISION = None
# Forces a form where it applies ("gram" or "explicit"); None chooses by cost. Tests set it.
FORCE: str | None = None
# Multiply-adds one element written or read is worth, per backend (memory-bound accelerators
# weigh traffic more).
MEMORY_WEIGHT = {"cpu": 4.0, "gpu": 32.0, "tpu": 32.0}
# Kernel offsets whose im2col patches the explicit conv form builds at once (each is the size of
# the layer's input), per backend; None: all. Few keep the peak memory low (XLA:CPU schedules
# independent slices early); all make one product per layer (fewer kernel launches on GPUs).
CONV_OFFSETS_PER_CHUNK = {"cpu": 3}


def norm_dtype(*dtypes: Any) -> jnp.dtype:
  return jnp.promote_types(jnp.result_type(*dtypes), jnp.float32)


def _backend() -> str:
  backend = jax.default_backend()
  return "gpu" if backend in ("cuda", "rocm") else backend


def _memory_weight() -> float:
  return MEMORY_WEIGHT.get(_backend(), 8.0)


def _pick(costs: dict[str, tuple[float, float]]) -> str:
  if FORCE in costs:
    return FORCE
  w = _memory_weight()
  return min(costs, key=lambda f: costs[f][0] + w * costs[f][1])


def dense_costs(g: int, n: int, k: int, e: int) -> dict[str, tuple[float, float]]:
  """Form -> (multiply-adds, elements moved) per example of a dense layer."""
  if n == 1:
    return {"vector": (g * (k + e), g * (k + e))}
  return {"gram": (g * n * n * (k + e), 2 * g * n * n + g * n * (k + e)),
          "explicit": (g * n * k * e, 2 * g * k * e + g * n * (k + e))}


def _conv_shift_ok(geo: lr.ConvGeometry) -> bool:
  return geo.groups == 1 and all(s == 1 for s in geo.strides)


def conv_costs(geo: lr.ConvGeometry, padded: tuple[int, ...]) -> dict[str, tuple[float, float]]:
  p = math.prod(geo.out_spatial)
  kk = math.prod(geo.window)
  k, e = kk * geo.c_in, geo.c_out
  patches = 2 * p * k
  costs = {"explicit": (p * k * e // geo.groups, patches + p * e + 2 * k * e // geo.groups)}
  if _conv_shift_ok(geo):
    pp = math.prod(padded)
    costs["gram"] = (pp * pp * geo.c_in + p * p * (e + kk), 2 * pp * pp + (kk + 2) * p * p)
  else:
    costs["gram"] = (p * p * (k + e), patches + 4 * geo.groups * p * p)
  return costs


def embed_costs(m: int, rows: int, row_size: int) -> dict[str, tuple[float, float]]:
  return {"gram": (m * m * (row_size + 1), 3 * m * m),
          "explicit": (m * row_size + rows * row_size, 2 * rows * row_size)}


def _padded_spatial(geo: lr.ConvGeometry, act_shape: tuple[int, ...]) -> tuple[int, ...]:
  shape = [act_shape[d] for d in geo.in_perm]
  spatial = shape[1:-1] if geo.in_last else shape[2:]
  return tuple(lo + hi + n + max(n - 1, 0) * it for n, (lo, hi, it) in zip(spatial, geo.pads))


def choose(layer: lt.Layer) -> str:
  """The cheapest form for ``layer`` (or :data:`FORCE` where it applies)."""
  eqn = layer.eqn
  act_shape = eqn.invars[layer.act_index].aval.shape
  if layer.kind == "dense":
    a_batch, a_free, a_contract, _ = lr.dense_dims(layer)
    w_shape = eqn.invars[1 - layer.act_index].aval.shape
    g = math.prod(act_shape[d] for d in a_batch)
    n = math.prod(act_shape[d] for d in a_free)
    k = math.prod(act_shape[d] for d in a_contract)
    return _pick(dense_costs(g, n, k, math.prod(w_shape) // max(g * k, 1)))
  if layer.kind == "conv":
    geo = lr.conv_geometry(layer)
    return _pick(conv_costs(geo, _padded_spatial(geo, act_shape)))
  w_shape = eqn.invars[0].aval.shape
  m = math.prod(act_shape[:-1]) // act_shape[layer.batch_axis]
  return _pick(embed_costs(m, w_shape[0], math.prod(w_shape[1:])))


# ----------------------------------------------------------------------------------------------
# The forms.
# ----------------------------------------------------------------------------------------------


def _einsum(spec: str, *operands: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *operands, precision=PRECISION)


def dense_sq_norms(layer: lt.Layer, form: str, act: jax.Array, ct: jax.Array) -> jax.Array:
  dtype = norm_dtype(act.dtype, ct.dtype)
  a_BxGxNxK = lr.dense_rows(layer, act).astype(dtype)
  d_BxGxNxE = lr.dense_out_rows(layer, ct).astype(dtype)
  if form == "vector":
    per_group = jnp.sum(jnp.square(a_BxGxNxK), -1) * jnp.sum(jnp.square(d_BxGxNxE), -1)
    return jnp.sum(per_group, (1, 2))
  if form == "gram":
    aa_BxGxNxN = _einsum("bgnk,bgmk->bgnm", a_BxGxNxK, a_BxGxNxK)
    dd_BxGxNxN = _einsum("bgne,bgme->bgnm", d_BxGxNxE, d_BxGxNxE)
    return jnp.sum(aa_BxGxNxN * dd_BxGxNxN, (1, 2, 3))
  g_BxGxKxE = _einsum("bgnk,bgne->bgke", a_BxGxNxK, d_BxGxNxE)
  return jnp.sum(jnp.square(g_BxGxKxE), (1, 2, 3))


def _conv_explicit(geo: lr.ConvGeometry, x: jax.Array, d: jax.Array, d_spec: str) -> jax.Array:
  """``||U^T D||^2`` with the patches ``U`` built a few kernel offsets at a time."""
  offsets = lr.conv_offsets(geo)
  step = CONV_OFFSETS_PER_CHUNK.get(_backend()) or len(offsets)
  total = jnp.zeros(x.shape[:1], x.dtype)
  for i in range(0, len(offsets), step):
    # Each chunk's patches read x through a zero that depends on the previous chunk's norm, so
    # one chunk of patches is alive at a time.
    x = x + lr.along(0 * total, x.ndim, 0)
    u, u_spec = lr.conv_rows(geo, x, offsets[i:i + step])
    g_BxGxKxE = _einsum(f"{u_spec},{d_spec}->bgke", u, d)
    total = total + jnp.sum(jnp.square(g_BxGxKxE), (1, 2, 3))
  return total


def _conv_gram_shift(geo: lr.ConvGeometry, x_pad: jax.Array, d: jax.Array,
                     d_spec: str) -> jax.Array:
  """Stride 1, one group: ``(U U^T)[p, q] = sum_o x[p + o] . x[q + o]`` from the Gram matrix of
  the padded input positions, then ``sum (U U^T) * (D D^T)``."""
  b = x_pad.shape[0]
  spatial = x_pad.shape[1:-1] if geo.in_last else x_pad.shape[2:]
  x_flat = lr.reshape_rows(x_pad, (b, -1, x_pad.shape[-1]) if geo.in_last else (
      b, x_pad.shape[1], -1))
  x_spec = "bpc,bqc" if geo.in_last else "bcp,bcq"
  xx = lr.reshape_rows(_einsum(f"{x_spec}->bpq", x_flat, x_flat), (b,) + spatial + spatial)
  uu = 0.0
  for o in lr.conv_offsets(geo):
    start = [0] + [oi * di for oi, di in zip(o, geo.dilation)] * 2
    limit = [b] + [s + m for s, m in zip(start[1:], geo.out_spatial * 2)]
    uu = uu + lax.slice(xx, start, limit)
  p = math.prod(geo.out_spatial)
  q_spec = d_spec.replace("p", "q")
  dd = _einsum(f"{d_spec},{q_spec}->bpq", d, d)
  return jnp.sum(lr.reshape_rows(uu, (b, p, p)) * dd, (1, 2))


def conv_sq_norms(layer: lt.Layer, form: str, act: jax.Array, ct: jax.Array) -> jax.Array:
  geo = lr.conv_geometry(layer)
  dtype = norm_dtype(act.dtype, ct.dtype)
  x = lr.conv_input(geo, act).astype(dtype)
  d, d_spec = lr.conv_out_rows(geo, ct)
  d = d.astype(dtype)
  if form == "explicit":
    return _conv_explicit(geo, x, d, d_spec)
  if _conv_shift_ok(geo):
    return _conv_gram_shift(geo, lr.conv_padded_input(geo, x), d, d_spec)
  u, u_spec = lr.conv_rows(geo, x)
  uu_BxGxPxP = _einsum(f"{u_spec},{u_spec.replace('p', 'q')}->bgpq", u, u)
  dd_BxGxPxP = _einsum(f"{d_spec},{d_spec.replace('p', 'q')}->bgpq", d, d)
  return jnp.sum(uu_BxGxPxP * dd_BxGxPxP, (1, 2, 3))


def embed_sq_norms(layer: lt.Layer, form: str, idx: jax.Array, ct: jax.Array) -> jax.Array:
  rows, *row_shape = layer.eqn.invars[0].aval.shape
  row_size = math.prod(row_shape)
  idx_BxM = jnp.moveaxis(idx[..., 0], layer.batch_axis, 0)
  b = idx_BxM.shape[0]
  idx_BxM = lr.reshape_rows(idx_BxM, (b, -1)).astype(jnp.int32)
  d_BxMxD = lr.reshape_rows(jnp.moveaxis(ct, layer.out_batch_axis, 0), (b, -1, row_size))
  d_BxMxD = d_BxMxD.astype(norm_dtype(d_BxMxD.dtype))
  if layer.eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
    # Out-of-range rows were filled, and their gradient is dropped.
    inside = (idx_BxM >= 0) & (idx_BxM < rows)
    d_BxMxD = jnp.where(inside[..., None], d_BxMxD, 0.0)
  idx_BxM = jnp.clip(idx_BxM, 0, rows - 1)
  if form == "gram":
    same_BxMxM = idx_BxM[:, :, None] == idx_BxM[:, None, :]
    dd_BxMxM = _einsum("bmd,bnd->bmn", d_BxMxD, d_BxMxD)
    return jnp.sum(jnp.where(same_BxMxM, dd_BxMxM, 0.0), (1, 2))
  g_BxVxD = jnp.zeros((b, rows, row_size), d_BxMxD.dtype)
  g_BxVxD = g_BxVxD.at[jnp.arange(b)[:, None], idx_BxM].add(d_BxMxD)
  return jnp.sum(jnp.square(g_BxVxD), (1, 2))


def sq_norms(layer: lt.Layer, form: str, act: jax.Array, ct: jax.Array) -> jax.Array:
  """``f[B]``: each example's squared gradient norm of ``layer``'s weight, from the layer's input
  ``act`` and output cotangent ``ct`` (batched, example axes as in ``layer``)."""
  fn = {"dense": dense_sq_norms, "conv": conv_sq_norms, "embed": embed_sq_norms}[layer.kind]
  return fn(layer, form, act, ct)
