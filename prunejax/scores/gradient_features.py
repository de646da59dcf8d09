"""Per-example gradient features: each example's loss gradient, randomly projected layer by layer
with a Kronecker-structured projection, without forming any per-example gradient (LoGra), and
optionally Adam-preconditioned (LESS).

``gradient_features(apply_fn, params, batch, key, dim=8192)`` returns ``f[B, D]`` (``D <= dim``,
:meth:`FeaturePlan.dim`) such that ``<f_i, f_j>`` is an unbiased estimate of ``<g_i, g_j>`` (over
``key``), where ``g_i`` is example ``i``'s cross-entropy gradient over all parameters.

How: :func:`prunejax.scores.grand.ghost_plan` finds, for each parameter leaf, where it meets the
examples. One forward and ONE backward pass of the summed loss run with taps:

* a leaf used once as the weight of a dense, conv or embedding layer (rows ``n``: ``out_n = a_n W``,
  so ``G_i = sum_n a_n^T d_n``, ``K x E`` per dot-batch group): the tap's backward projects the
  layer's input rows and output cotangent rows, ``(R_in a_n)`` and ``(R_out d_n)``, and returns
  ``sum_n (R_in a_n)(R_out d_n)^T = R_in G_i R_out^T``, ``k x e`` features per group. ``R_in`` and
  ``R_out`` have i.i.d. ``N(0, 1/k)`` and ``N(0, 1/e)`` entries, so ``E[(R_in (x) R_out)^T
  (R_in (x) R_out)] = I`` and inner products are unbiased. A layer whose gradient fits its share
  of ``dim`` is kept exactly (no projection). Embedding rows project by a gather of ``R_in``'s
  columns. A projected conv with one feature group projects its output cotangent onto ``e``
  channels and takes each example's gradient of a conv with ``e`` output channels (a vmapped
  backward-filter convolution, no im2col patches); exact and grouped convs use im2col patches,
  built a few kernel offsets at a time.
* the other leaves (biases, norm scales, position tables, weights used twice): their per-example
  gradients (broadcast sites' cotangents pulled back, or ``vmap(grad)``) are small; they are kept
  exactly when they fit their share, else count-sketched (each coordinate added with a random sign
  to a random one of ``d`` buckets, also unbiased; Charikar et al. 2002).

Adam preconditioning (LESS): given Adam's moments ``mu, nu`` (an optax ``ScaleByAdamState`` or any
object with ``mu`` and ``nu`` shaped like ``params``), the features are those of
``((1 - b1) g_i + b1 mu) / sqrt(b2 nu + eps)``, LESS's Adam update direction without the
example's own ``(1 - b2) g_i^2`` in the denominator (which would make it non-linear in ``g_i``).
For the projected layers the per-coordinate scale ``1 / sqrt(b2 nu + eps)`` is factored as
``s_in s_out^T`` from its row and column sums (Adafactor's factored second moment, exact when the
second moment is rank one), so the projection stays Kronecker; the other leaves use it exactly.

Every block is deterministic given ``key`` (each layer's matrices come from ``fold_in(key,
layer index)``), so features of different batches, shards and checkpoints share one projection.

References:
  Choe et al. "What is Your Data Worth to GPT? LLM-Scale Data Valuation with Influence Functions."
  arXiv:2405.13954, 2024 (LoGra).
  Xia, Malladi, Gururangan, Arora, Chen. "LESS: Selecting Influential Data for Targeted
  Instruction Tuning." ICML 2024.
  Shazeer, Stern. "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost." ICML 2018.
  Charikar, Chen, Farach-Colton. "Finding Frequent Items in Data Streams." ICALP 2002.
"""

from __future__ import annotations

import importlib
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from prunejax import layer_rows as lr
from prunejax import layer_taps as lt
from prunejax.errors import ConfigError, check_positive_int, check_range
from prunejax.scores import ghost_norms
from prunejax.scores.gradient_dot import check_target
from prunejax.types import ApplyFn, Batch, Params

# The module (the package re-exports its function ``grand`` under the same name).
grand_lib = importlib.import_module("prunejax.scores.grand")

__all__ = ["FeaturePlan", "feature_plan", "gradient_features", "adam_moments"]

# Projected conv layers with one feature group: per-example backward-filter convolutions onto the
# projected output channels (True) instead of im2col patches (False). Tests set it.
CONV_FILTER = True
# Adam's defaults as LESS uses them (its collect_grad_reps.py).
ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


class Block(NamedTuple):
  """One layer's features: ``groups`` x ``k`` x ``e`` (``exact``: ``k = K``, ``e = E``, no
  projection)."""

  groups: int
  k_in: int
  e_out: int
  k_full: int
  e_full: int
  exact: bool

  @property
  def size(self) -> int:
    return self.groups * self.k_in * self.e_out


class FeaturePlan(NamedTuple):
  """How :func:`gradient_features` builds each block of features (from :func:`feature_plan`).

  Attributes:
    ghost: the :class:`prunejax.scores.grand.GhostPlan` of ``apply_fn``.
    blocks: layer index -> :class:`Block`, in feature order.
    rest_leaves: the other differentiated leaves (broadcast and materialized), in feature order.
    rest_size: their total size.
    rest_dim: the features they get (``rest_size`` when exact, else count-sketch buckets).
  """

  ghost: grand_lib.GhostPlan
  blocks: dict
  rest_leaves: tuple[int, ...]
  rest_size: int
  rest_dim: int

  @property
  def dim(self) -> int:
    """``D``, the number of features."""
    return sum(b.size for b in self.blocks.values()) + self.rest_dim

  def describe(self) -> dict[str, str]:
    """Leaf path -> how its gradient enters the features."""
    paths = self.ghost.layers.paths
    out = {p: "not float" for p in paths}
    out.update({paths[i]: "zero" for i in self.ghost.zero})
    for k, b in self.blocks.items():
      layer = self.ghost.layers.layers[k]
      how = "exact" if b.exact else f"{b.k_in}x{b.e_out} of {b.k_full}x{b.e_full}"
      out[paths[layer.leaf]] = f"{layer.kind}: {b.groups} x {how}"
    exact = self.rest_dim == self.rest_size
    for i in self.rest_leaves:
      out[paths[i]] = "exact" if exact else f"count sketch ({self.rest_dim} of {self.rest_size})"
    return out


def _gke(layer: lt.Layer) -> tuple[int, int, int]:
  """(groups, K, E) of a layer's per-example weight gradient."""
  eqn = layer.eqn
  if layer.kind == "dense":
    a_batch, _, a_contract, _ = lr.dense_dims(layer)
    act_shape = eqn.invars[layer.act_index].aval.shape
    w_size = math.prod(eqn.invars[1 - layer.act_index].aval.shape)
    g = math.prod(act_shape[d] for d in a_batch)
    k = math.prod(act_shape[d] for d in a_contract)
    return g, k, w_size // max(g * k, 1)
  if layer.kind == "conv":
    geo = lr.conv_geometry(layer)
    return geo.groups, math.prod(geo.window) * geo.c_in // geo.groups, geo.c_out // geo.groups
  rows, *row_shape = eqn.invars[0].aval.shape
  return 1, rows, math.prod(row_shape)


def _block(g: int, k: int, e: int, budget: int) -> Block:
  if g * k * e <= budget:
    return Block(g, k, e, k, e, True)
  per_group = max(1, budget // g)
  k_in = int(min(k, max(1, round(math.sqrt(per_group * k / e)))))
  e_out = int(min(e, max(1, per_group // k_in)))
  k_in = int(min(k, max(1, per_group // e_out)))
  return Block(g, k_in, e_out, k, e, False)


def feature_plan(apply_fn: ApplyFn, params: Params, x: Any, dim: int = 8192) -> FeaturePlan:
  """Analyses ``apply_fn`` and shares ``dim`` features among its layers and other leaves.

  Blocks whose exact gradient fits an equal share are kept exactly; what they leave is shared
  equally by the others (the layers get ``k x e`` with ``k / e`` close to ``K / E``).
  """
  check_positive_int("gradient_features.dim", dim)
  ghost = grand_lib.ghost_plan(apply_fn, params, x)
  leaves = jax.tree.leaves(params)
  rest = tuple(sorted(ghost.broadcast + ghost.materialized))
  rest_size = sum(math.prod(jnp.shape(leaves[i])) for i in rest)
  sizes = {k: _gke(ghost.layers.layers[k]) for k in sorted(ghost.ghost)}
  full = {k: math.prod(s) for k, s in sizes.items()}
  if rest_size:
    full["rest"] = rest_size
  if not full:
    raise ConfigError("gradient_features: apply_fn has no parameter with a gradient")
  budget, todo, share = dim, dict(full), {}
  while todo:  # blocks that fit an equal share are exact; the others share what is left.
    each = max(1, budget // len(todo))
    fits = {k: n for k, n in todo.items() if n <= each}
    if not fits:
      share.update({k: each for k in todo})
      break
    for k, n in fits.items():
      share[k] = n
      budget -= n
      del todo[k]
  blocks = {k: _block(*sizes[k], share[k]) for k in sorted(sizes)}
  rest_dim = min(rest_size, share.get("rest", 0))
  return FeaturePlan(ghost, blocks, rest, rest_size, rest_dim)


# ----------------------------------------------------------------------------------------------
# Adam moments and the factored preconditioner.
# ----------------------------------------------------------------------------------------------


def adam_moments(opt_state: Any) -> tuple[Params, Params]:
  """``(mu, nu)`` of the first Adam state found in ``opt_state`` (an optax state, a chain of
  them, or any object with ``mu`` and ``nu`` attributes).

  Raises:
    ConfigError: none found.
  """
  if hasattr(opt_state, "mu") and hasattr(opt_state, "nu"):
    return opt_state.mu, opt_state.nu
  if isinstance(opt_state, (tuple, list)):
    for s in opt_state:
      try:
        return adam_moments(s)
      except ConfigError:
        pass
  for attr in ("inner_state", "inner_opt_state"):
    if hasattr(opt_state, attr):
      return adam_moments(getattr(opt_state, attr))
  raise ConfigError("gradient_features.adam_state has no Adam state (an object with 'mu' and "
                    "'nu', e.g. optax.ScaleByAdamState); pass the optimizer state of adam/adamw")


def weight_gke(layer: lt.Layer, w: jax.Array) -> jax.Array:
  """A layer's weight operand as ``(G, K, E)``, in the feature order of :mod:`layer_rows`."""
  eqn = layer.eqn
  if layer.kind == "dense":
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    w_contract, w_batch = (rc, rb) if layer.act_index == 0 else (lc, lb)
    w_free = [d for d in range(w.ndim) if d not in w_contract and d not in w_batch]
    g, k, e = _gke(layer)
    return jnp.transpose(w, list(w_batch) + list(w_contract) + w_free).reshape(g, k, e)
  if layer.kind == "conv":
    geo = lr.conv_geometry(layer)
    rhs = eqn.params["dimension_numbers"][1]
    kk, cg, eg = math.prod(geo.window), geo.c_in // geo.groups, geo.c_out // geo.groups
    w = jnp.transpose(w, tuple(rhs[2:]) + (rhs[1], rhs[0])).reshape(kk, cg, geo.groups, eg)
    return jnp.transpose(w, (2, 0, 1, 3)).reshape(geo.groups, kk * cg, eg)
  return w.reshape(1, w.shape[0], -1)


def _factored_scale(v_GxKxE: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(s_in_GxK, s_out_GxE)`` with ``s_in s_out^T = 1 / sqrt(v)`` when ``v`` is rank one per
  group: ``v ~ r c^T / sum(r)`` from its row sums ``r`` and column sums ``c`` (Adafactor)."""
  r_GxK = jnp.sum(v_GxKxE, 2)
  c_GxE = jnp.sum(v_GxKxE, 1)
  total_G = jnp.sum(r_GxK, 1, keepdims=True)
  return lax.rsqrt(r_GxK), lax.rsqrt(c_GxE / total_G)


# ----------------------------------------------------------------------------------------------
# Per-layer projected features.
# ----------------------------------------------------------------------------------------------


def _matrices(key: jax.Array, k: int, block: Block, dtype) -> tuple[jax.Array, jax.Array]:
  """``(R_in kxK, R_out exE)`` of a projected block: Gaussian with variance 1/k and 1/e."""
  k_in, k_out = jax.random.split(jax.random.fold_in(key, k))
  r_in = jax.random.normal(k_in, (block.k_in, block.k_full), dtype) / math.sqrt(block.k_in)
  r_out = jax.random.normal(k_out, (block.e_out, block.e_full), dtype) / math.sqrt(block.e_out)
  return r_in, r_out


def _einsum(spec: str, *ops: jax.Array) -> jax.Array:
  return jnp.einsum(spec, *ops, precision=ghost_norms.PRECISION)


# Each takes the layer's input and output cotangent and ``(R_in GxkxK, R_out GxexE)``, or
# ``(None, None)`` for an exact block, and returns ``f[B, G, k, e]``.


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


_FEATURES = {"dense": _dense_features, "conv": _conv_features, "embed": _embed_features}


def _layer_tap(layer: lt.Layer, dummy_BxF: jax.Array, exact: bool) -> Callable:
  """Identity on the layer's output; its backward returns the layer's projected per-example
  gradient ``f[B, G*k*e]`` as the cotangent of ``dummy_BxF``."""
  like = jax.typeof(dummy_BxF)

  @jax.custom_vjp
  def tap(out, act, dummy, r_in, r_out):
    del act, dummy, r_in, r_out
    return out

  def fwd(out, act, dummy, r_in, r_out):
    del dummy
    return out, (act, r_in, r_out)

  def bwd(res, ct):
    act, r_in, r_out = res
    act = grand_lib._after(act, layer.batch_axis, ct, layer.out_batch_axis)
    features = _FEATURES[layer.kind]
    if (layer.kind == "conv" and not exact and CONV_FILTER
        and layer.eqn.params["feature_group_count"] == 1):
      features = _conv_features_filter
    f = features(layer, act, ct, *((None, None) if exact else (r_in, r_out)))
    f_BxF = lr.reshape_rows(f, (f.shape[0], -1))
    return (grand_lib._after(ct, layer.out_batch_axis, f_BxF, 0), None,
            grand_lib._like(f_BxF, like), None, None)

  tap.defvjp(fwd, bwd)
  return tap


# ----------------------------------------------------------------------------------------------
# The other leaves: exact per-example gradients, count-sketched when large.
# ----------------------------------------------------------------------------------------------




def _vmap_grads(apply_fn, params, x, y_B, w_B, leaf_ids, chunk_size) -> dict[int, jax.Array]:
  leaves, treedef = jax.tree.flatten(params)
  ids = list(leaf_ids)

  def example(x1, y1, w1):
    def loss_fn(selected):
      vals = list(leaves)
      for i, v in zip(ids, selected):
        vals[i] = v
      logits_1xC = apply_fn(jax.tree.unflatten(treedef, vals), jax.tree.map(lambda a: a[None], x1))
      return grand_lib._example_losses(logits_1xC, y1[None], w1[None])[0]

    g = jax.grad(loss_fn)([leaves[i] for i in ids])
    return jnp.concatenate([a.reshape(-1).astype(ghost_norms.norm_dtype(a.dtype)) for a in g])

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


# ----------------------------------------------------------------------------------------------
# Public entry point.
# ----------------------------------------------------------------------------------------------


def gradient_features(apply_fn: ApplyFn, params: Params, batch: Batch, key: jax.Array, *,
                      dim: int = 8192, adam_state: Any = None,
                      betas: tuple[float, float] = ADAM_BETAS, eps: float = ADAM_EPS,
                      chunk_size: int = 32) -> jax.Array:
  """Kronecker-projected per-example gradient features ``f[B, D]``, ``D <= dim``.

  ``<f_i, f_j>`` estimates ``<g_i, g_j>`` without bias over ``key`` (exactly where a block fits
  its share of ``dim``), where ``g_i`` is example ``i``'s cross-entropy gradient over every float
  leaf of ``params``, or its Adam update direction when ``adam_state`` is given (see the module
  doc). Cost: one forward and one backward pass with per-layer taps, plus the projections.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits_BxC``, any JAX function whose rows are independent.
    params: the parameters ``apply_fn`` takes.
    batch: ``x``, ``y`` (int labels) and optionally ``mask``.
    key: a PRNG key; the same key gives the same projection for every batch and checkpoint.
    dim: the number of features asked for (:func:`feature_plan` says how it is shared).
    adam_state: Adam's state for ``params`` (optax ``ScaleByAdamState``, a chain holding one, or an
      object with ``mu`` and ``nu``), for LESS's preconditioned features; None: plain gradients.
    betas, eps: Adam's ``b1, b2`` and the ``eps`` inside LESS's ``sqrt(b2 nu + eps)``.
    chunk_size: examples whose gradients of leaves outside recognised layers are formed at once.

  Returns:
    ``f[B, D]`` (float32, or the params' dtype when wider): 0 on padding rows, NaN on real rows
    whose label is outside ``[0, C)`` (and on a row whose input is not finite; the other rows are
    unchanged); ``[0, D]`` for an empty batch.

  Raises:
    ConfigError: ``dim`` or ``chunk_size`` is not a positive integer, ``betas`` are outside
      ``[0, 1)``, ``adam_state`` has no Adam moments, or ``apply_fn`` has no parameter with a
      gradient.
    DataError: the moments are not shaped like ``params``; labels are not integers.

  References:
    Choe et al. arXiv:2405.13954, 2024 (LoGra). Xia et al. ICML 2024 (LESS).
  """
  check_positive_int("gradient_features.chunk_size", chunk_size)
  check_range("gradient_features.betas[0]", betas[0], 0.0, 1.0, hi_open=True)
  check_range("gradient_features.betas[1]", betas[1], 0.0, 1.0, hi_open=True)
  check_range("gradient_features.eps", eps, 0.0, float("inf"), lo_open=True)
  moments = None
  if adam_state is not None:
    mu, nu = adam_moments(adam_state)
    check_target(params, mu, "gradient_features.adam_state.mu")
    check_target(params, nu, "gradient_features.adam_state.nu")
    moments = (mu, nu)

  if lt.batch_size(batch["x"]) == 0:  # no rows: no features, of the width a row would get.
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct((1,) + tuple(jnp.shape(a))[1:],
                                                      jnp.result_type(a)), batch["x"])
    return jnp.zeros((0, feature_plan(apply_fn, params, one, dim).dim), jnp.float32)

  def features(params, batch):
    params = grand_lib._vary_like(params, batch["x"])
    plan = feature_plan(apply_fn, params, batch["x"], dim)
    return _features(apply_fn, plan, params, batch, key, moments, betas, eps, chunk_size)

  return grand_lib._auto_axes(features, params, batch)


def _features(apply_fn, plan: FeaturePlan, params, batch, key, moments, betas, eps, chunk_size):
  ghost, lp = plan.ghost, plan.ghost.layers
  x = batch["x"]
  y_B, valid_B, w_B = grand_lib._labels(apply_fn, params, batch, ghost.num_classes)
  dtype = ghost_norms.norm_dtype(*[jnp.result_type(l) for l in jax.tree.leaves(params)
                                   if grand_lib._is_float(l)])
  key_layers, key_rest = jax.random.split(key)
  b1, b2 = betas
  mats, offsets = {}, {}
  if moments is not None:
    mu_w = lt.layer_weights(lp, moments[0])
    nu_w = lt.layer_weights(lp, moments[1])
  scales, empty = {}, jnp.zeros((0,), dtype)
  for k, block in plan.blocks.items():
    layer = lp.layers[k]
    if moments is not None:
      v_GxKxE = b2 * weight_gke(layer, nu_w[k]).astype(dtype) + eps
      m_GxKxE = weight_gke(layer, mu_w[k]).astype(dtype)
    if block.exact:
      mats[k] = (empty, empty)
      if moments is not None:  # exact blocks take the exact per-coordinate scale.
        scales[k] = lax.rsqrt(v_GxKxE).reshape(-1)
        offsets[k] = b1 * (m_GxKxE * lax.rsqrt(v_GxKxE)).reshape(-1)
      continue
    r_in, r_out = _matrices(key_layers, k, block, dtype)
    r_in_GxkxK = jnp.broadcast_to(r_in, (block.groups,) + r_in.shape)
    r_out_GxexE = jnp.broadcast_to(r_out, (block.groups,) + r_out.shape)
    if moments is not None:
      s_in_GxK, s_out_GxE = _factored_scale(v_GxKxE)
      r_in_GxkxK = r_in_GxkxK * s_in_GxK[:, None, :]
      r_out_GxexE = r_out_GxexE * s_out_GxE[:, None, :]
      offsets[k] = b1 * _einsum("gkK,gKE,geE->gke", r_in_GxkxK, m_GxKxE, r_out_GxexE).reshape(-1)
    mats[k] = (r_in_GxkxK, r_out_GxexE)

  zeros_B = grand_lib._zeros_B(x)
  dummies = {"layers": {k: jnp.zeros((zeros_B.shape[0], b.size), dtype) + zeros_B[:, None]
                        for k, b in plan.blocks.items()},
             "sites": grand_lib._dummies(ghost, x)["sites"]}

  def loss(dummies):
    layer_taps = {}
    for k in plan.blocks:
      tap = _layer_tap(lp.layers[k], dummies["layers"][k], plan.blocks[k].exact)
      layer_taps[k] = (lambda tap, k: lambda layer, act, out: (
          tap(out, act, dummies["layers"][k], *mats[k]), None))(tap, k)
    site_taps = {key: grand_lib._site_tap(dummies["sites"][key], lp.batch_size)
                 for key in ghost.sites}
    (logits_BxC,), _ = lt.run(lp, params, x, layer_taps=layer_taps, site_taps=site_taps)
    return jnp.sum(grand_lib._example_losses(logits_BxC, y_B, w_B))

  grads = jax.grad(loss)(dummies)
  parts = []
  for k in plan.blocks:
    f_BxF = grads["layers"][k].astype(dtype)
    if moments is not None:
      f_BxF = (1.0 - b1) * f_BxF * scales.get(k, 1.0) + offsets[k]
    parts.append(f_BxF)
  if plan.rest_leaves:
    rest = grand_lib.site_grads(ghost, params, grads["sites"]) if ghost.sites else {}
    if ghost.materialized:
      rest.update(_vmap_grads(apply_fn, params, x, y_B, w_B, ghost.materialized, chunk_size))
    flat = []
    for i in plan.rest_leaves:
      g = rest[i].reshape(rest[i].shape[0], -1).astype(dtype)
      if moments is not None:
        m = jax.tree.leaves(moments[0])[i].reshape(-1).astype(dtype)
        v = jax.tree.leaves(moments[1])[i].reshape(-1).astype(dtype)
        g = ((1.0 - b1) * g + b1 * m) / jnp.sqrt(b2 * v + eps)
      flat.append(g)
    g_BxP = jnp.concatenate(flat, axis=1)
    parts.append(g_BxP if plan.rest_dim == plan.rest_size
                 else _count_sketch(key_rest, g_BxP, plan.rest_dim))
  f_BxD = jnp.concatenate(parts, axis=1)
  real_B = batch["mask"].astype(bool) if "mask" in batch else jnp.ones_like(valid_B)
  # Padding rows have no gradient; with Adam the shared offset would otherwise show there.
  f_BxD = jnp.where(real_B[:, None], jnp.where(valid_B[:, None], f_BxD, jnp.nan), 0.0)
  return f_BxD
