"""Per-example gradient features: each example's loss gradient, randomly projected layer by layer
with a Kronecker-structured projection, without forming any per-example gradient (LoGra), and
optionally Adam-preconditioned (LESS).

``gradient_features(apply_fn, params, batch, key, dim=8192)`` returns ``f[B, D]`` (``D <= dim``,
:meth:`FeaturePlan.dim`) such that ``<f_i, f_j>`` is an unbiased estimate of ``<g_i, g_j>`` (over
``key``), where ``g_i`` is example ``i``'s cross-entropy gradient over all parameters.

How: :func:`prunejax.scores.ghost_taps.ghost_plan` finds, for each parameter leaf, where it meets the
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
from prunejax.scores import ghost_taps as gt
from prunejax.scores import gradient_projections as gp
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

  ghost: gt.GhostPlan
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
  ghost = gt.ghost_plan(apply_fn, params, x)
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
# Per-layer projections: the random matrices and the layer taps (kernels in gradient_projections).
# ----------------------------------------------------------------------------------------------


def _matrices(key: jax.Array, k: int, block: Block, dtype) -> tuple[jax.Array, jax.Array]:
  """``(R_in kxK, R_out exE)`` of a projected block: Gaussian with variance 1/k and 1/e."""
  k_in, k_out = jax.random.split(jax.random.fold_in(key, k))
  r_in = jax.random.normal(k_in, (block.k_in, block.k_full), dtype) / math.sqrt(block.k_in)
  r_out = jax.random.normal(k_out, (block.e_out, block.e_full), dtype) / math.sqrt(block.e_out)
  return r_in, r_out


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
    act = gt._after(act, layer.batch_axis, ct, layer.out_batch_axis)
    features = gp.FEATURES[layer.kind]
    if (layer.kind == "conv" and not exact and CONV_FILTER
        and layer.eqn.params["feature_group_count"] == 1):
      features = gp._conv_features_filter
    f = features(layer, act, ct, *((None, None) if exact else (r_in, r_out)))
    f_BxF = lr.reshape_rows(f, (f.shape[0], -1))
    return (gt._after(ct, layer.out_batch_axis, f_BxF, 0), None,
            gt._like(f_BxF, like), None, None)

  tap.defvjp(fwd, bwd)
  return tap


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
  """``f[B, D]`` of one batch (what :func:`gradient_features` runs over the batch's axes)."""
  ghost = plan.ghost
  y_B, valid_B, w_B = grand_lib._labels(apply_fn, params, batch, ghost.num_classes)
  dtype = ghost_norms.norm_dtype(*[jnp.result_type(l) for l in jax.tree.leaves(params)
                                   if grand_lib._is_float(l)])
  key_layers, key_rest = jax.random.split(key)
  mats, scales, offsets = _projections(plan, key_layers, dtype, moments, betas, eps)
  grads = _tapped_grads(plan, params, batch["x"], y_B, w_B, mats, dtype)
  parts = []
  for k in plan.blocks:
    f_BxF = grads["layers"][k].astype(dtype)
    if moments is not None:
      f_BxF = (1.0 - betas[0]) * f_BxF * scales.get(k, 1.0) + offsets[k]
    parts.append(f_BxF)
  if plan.rest_leaves:
    parts.append(_rest_features(apply_fn, plan, params, batch["x"], y_B, w_B, grads["sites"],
                                key_rest, moments, betas, eps, chunk_size, dtype))
  f_BxD = jnp.concatenate(parts, axis=1)
  real_B = batch["mask"].astype(bool) if "mask" in batch else jnp.ones_like(valid_B)
  # Padding rows have no gradient; with Adam the shared offset would otherwise show there.
  f_BxD = jnp.where(real_B[:, None], jnp.where(valid_B[:, None], f_BxD, jnp.nan), 0.0)
  return f_BxD


def _projections(plan: FeaturePlan, key: jax.Array, dtype, moments, betas, eps
                 ) -> tuple[dict, dict, dict]:
  """``(mats, scales, offsets)`` by layer index: each block's ``(R_in GxkxK, R_out GxexE)``
  (empty for an exact block), and with Adam's moments LESS's preconditioner: the exact
  per-coordinate scale of an exact block (a projected block's is factored into its matrices) and
  the projected ``b1 mu / sqrt(b2 nu + eps)`` offset of every block."""
  lp = plan.ghost.layers
  b1, b2 = betas
  mats, scales, offsets = {}, {}, {}
  if moments is not None:
    mu_w = lt.layer_weights(lp, moments[0])
    nu_w = lt.layer_weights(lp, moments[1])
  empty = jnp.zeros((0,), dtype)
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
    r_in, r_out = _matrices(key, k, block, dtype)
    r_in_GxkxK = jnp.broadcast_to(r_in, (block.groups,) + r_in.shape)
    r_out_GxexE = jnp.broadcast_to(r_out, (block.groups,) + r_out.shape)
    if moments is not None:
      s_in_GxK, s_out_GxE = _factored_scale(v_GxKxE)
      r_in_GxkxK = r_in_GxkxK * s_in_GxK[:, None, :]
      r_out_GxexE = r_out_GxexE * s_out_GxE[:, None, :]
      offsets[k] = b1 * gp._einsum("gkK,gKE,geE->gke", r_in_GxkxK, m_GxKxE,
                                   r_out_GxexE).reshape(-1)
    mats[k] = (r_in_GxkxK, r_out_GxexE)
  return mats, scales, offsets


def _tapped_grads(plan: FeaturePlan, params, x, y_B, w_B, mats: dict, dtype) -> dict:
  """One forward and one backward pass of the summed loss with taps: the gradient of the layer
  dummies (``{"layers": {k: f_BxF}}``, each layer's projected per-example gradient) and of the
  broadcast sites' dummies (``"sites"``, their per-example cotangents)."""
  ghost, lp = plan.ghost, plan.ghost.layers
  zeros_B = gt._zeros_B(x)
  dummies = {"layers": {k: jnp.zeros((zeros_B.shape[0], b.size), dtype) + zeros_B[:, None]
                        for k, b in plan.blocks.items()},
             "sites": gt._dummies(ghost, x)["sites"]}

  def loss(dummies):
    layer_taps = {}
    for k in plan.blocks:
      tap = _layer_tap(lp.layers[k], dummies["layers"][k], plan.blocks[k].exact)
      layer_taps[k] = (lambda tap, k: lambda layer, act, out: (
          tap(out, act, dummies["layers"][k], *mats[k]), None))(tap, k)
    site_taps = {key: gt._site_tap(dummies["sites"][key], lp.batch_size)
                 for key in ghost.sites}
    (logits_BxC,), _ = lt.run(lp, params, x, layer_taps=layer_taps, site_taps=site_taps)
    return jnp.sum(grand_lib._example_losses(logits_BxC, y_B, w_B))

  return jax.grad(loss)(dummies)


def _rest_features(apply_fn, plan: FeaturePlan, params, x, y_B, w_B, site_cts, key, moments,
                   betas, eps, chunk_size, dtype) -> jax.Array:
  """The other leaves' per-example gradients (pulled back from the sites' cotangents, or by
  ``vmap(grad)``), preconditioned with Adam's moments, exact or count-sketched: ``f[B, rest_dim]``."""
  ghost = plan.ghost
  b1, b2 = betas
  rest = gt.site_grads(ghost, params, site_cts) if ghost.sites else {}
  if ghost.materialized:
    rest.update(gp._vmap_grads(apply_fn, params, x, y_B, w_B, ghost.materialized, chunk_size))
  flat = []
  for i in plan.rest_leaves:
    g = rest[i].reshape(rest[i].shape[0], -1).astype(dtype)
    if moments is not None:
      m = jax.tree.leaves(moments[0])[i].reshape(-1).astype(dtype)
      v = jax.tree.leaves(moments[1])[i].reshape(-1).astype(dtype)
      g = ((1.0 - b1) * g + b1 * m) / jnp.sqrt(b2 * v + eps)
    flat.append(g)
  g_BxP = jnp.concatenate(flat, axis=1)
  return (g_BxP if plan.rest_dim == plan.rest_size
          else gp._count_sketch(key, g_BxP, plan.rest_dim))
