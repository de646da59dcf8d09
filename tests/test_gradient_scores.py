"""Gradient similarity (prunejax.scores.gradient_dot, .gradient_features, .influence): exact inner
products against float64 per-example gradients on functions the library never saw, unbiased
projections, Adam preconditioning, and the TracIn / LESS selections."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax import scores
from prunejax.errors import ConfigError, DataError
gf_lib = importlib.import_module("prunejax.scores.gradient_features")

C = 3


# ----------------------------------------------------------------------------------------------
# Three plain-JAX models: dense + layernorm, embeddings with attention-like mixing, a conv net.
# ----------------------------------------------------------------------------------------------


def _layernorm(h, scale, offset):
  mu = jnp.mean(h, -1, keepdims=True)
  var = jnp.mean(jnp.square(h - mu), -1, keepdims=True)
  return (h - mu) * jax.lax.rsqrt(var + 1e-5) * scale + offset


def mlp_apply(p, x):
  h = jnp.tanh(_layernorm(x @ p["w1"] + p["b1"], p["ln_s"], p["ln_b"]))
  return h @ p["w2"] + p["b2"]


def mlp_params(rng, dtype=np.float32):
  return {"w1": rng.normal(size=(6, 8)) / 2.5, "b1": rng.normal(size=8) * 0.1,
          "ln_s": 1 + 0.2 * rng.normal(size=8), "ln_b": 0.1 * rng.normal(size=8),
          "w2": rng.normal(size=(8, C)) / 3, "b2": rng.normal(size=C) * 0.1}


def mlp_x(rng, b):
  return rng.normal(size=(b, 6))


def attn_apply(p, tok):
  h = p["emb"][tok] + p["pos"][None]                          # (B, T, D)
  q, k = jnp.einsum("btd,de->bte", h, p["wq"]), jnp.einsum("btd,de->bte", h, p["wk"])
  att = jax.nn.softmax(jnp.einsum("bte,bse->bts", q, k) / 2.0, -1)
  h = h + jnp.einsum("bts,bsd->btd", att, h) @ p["wo"]
  return jnp.mean(h, 1) @ p["head"]


def attn_params(rng, dtype=np.float32):
  return {"emb": rng.normal(size=(11, 4)), "pos": 0.3 * rng.normal(size=(5, 4)),
          "wq": rng.normal(size=(4, 4)) / 2, "wk": rng.normal(size=(4, 4)) / 2,
          "wo": rng.normal(size=(4, 4)) / 2, "head": rng.normal(size=(4, C))}


def attn_x(rng, b):
  return rng.integers(0, 11, size=(b, 5)).astype(np.int32)


def conv_apply(p, x):
  y = jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["c1"]
  y = jax.nn.relu(y)
  y = jax.lax.conv_general_dilated(y, p["k2"], (2, 2), "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.mean(y, (1, 2)) @ p["head"]


def conv_params(rng, dtype=np.float32):
  return {"k1": rng.normal(size=(3, 3, 2, 4)) / 3, "c1": 0.1 * rng.normal(size=4),
          "k2": rng.normal(size=(2, 2, 4, 5)) / 3, "head": rng.normal(size=(5, C)) / 2}


def conv_x(rng, b):
  return rng.normal(size=(b, 6, 6, 2))


MODELS = {"mlp_layernorm": (mlp_apply, mlp_params, mlp_x),
          "embed_attention": (attn_apply, attn_params, attn_x),
          "conv": (conv_apply, conv_params, conv_x)}


def _case(name, b=6, n_pad=2, seed=0, dtype=np.float32):
  apply_fn, make_params, make_x = MODELS[name]
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, dtype)), make_params(rng))  # host cast
  x = make_x(rng, b)
  x = jnp.asarray(x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x)
  y = rng.integers(0, C, size=b).astype(np.int32)
  mask = np.arange(b) < b - n_pad
  target = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape).astype(dtype)), params)
  return apply_fn, params, {"x": x, "y": jnp.asarray(y), "mask": jnp.asarray(mask)}, target


def _per_example_grads(apply_fn, params, batch):
  """Explicit per-example gradients, one example at a time (the reference); compiled once for all
  examples (one shape), since op by op a GPT's backward pass per example took seconds."""
  def loss(p, x_1, y):
    return -jax.nn.log_softmax(apply_fn(p, x_1))[0, y]
  grad = jax.jit(jax.grad(loss))
  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])  # rows sliced on the host
  return [grad(params, x[i:i + 1], y[i]) for i in range(y.shape[0])]


def _dot_fn(apply_fn):
  """gradient_dot compiled: op by op, a call compiled 100-200 single ops (1.5 s)."""
  return jax.jit(lambda p, b, t: scores.gradient_dot(apply_fn, p, b, t))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


# ----------------------------------------------------------------------------------------------
# gradient_dot
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_dot_matches_float64_per_example_gradients(name):
  apply_fn, params, batch, target = _case(name)
  got = np.asarray(_dot_fn(apply_fn)(params, batch, target))
  with jax.enable_x64(True):
    p64, b64, t64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64))
                                 if np.issubdtype(np.asarray(a).dtype, np.floating)
                                 else jnp.asarray(a), (params, batch, target))
    grads = _per_example_grads(apply_fn, p64, b64)
    ref = np.array([_flat(g) @ _flat(t64) for g in grads])
    exact64 = np.asarray(_dot_fn(apply_fn)(p64, b64, t64))
  real = np.asarray(batch["mask"])
  np.testing.assert_allclose(exact64[real], ref[real], rtol=1e-6)   # the definition, in float64
  np.testing.assert_allclose(got[real], ref[real], rtol=2e-4, atol=1e-5 * np.abs(ref).max())
  assert np.all(got[~real] == 0.0) and got.dtype == np.float32


def test_gradient_dot_rows_in_another_order_padding_and_bad_labels():
  apply_fn, params, batch, target = _case("embed_attention", b=6, n_pad=0)
  dot, batch = _dot_fn(apply_fn), jax.tree.map(np.asarray, batch)  # batches built on the host
  base = np.asarray(dot(params, batch, target))
  perm = np.array([3, 0, 5, 1, 4, 2])
  shuffled = jax.tree.map(lambda a: a[perm], batch)
  np.testing.assert_allclose(np.asarray(dot(params, shuffled, target)), base[perm], rtol=1e-5)
  # Padding on either side leaves every real row's answer unchanged and gives 0.
  pad = lambda a, lo, hi: np.concatenate([np.zeros((lo,) + a.shape[1:], a.dtype), a,
                                          np.zeros((hi,) + a.shape[1:], a.dtype)])
  padded = {k: pad(v, 2, 1) for k, v in batch.items()}
  padded["mask"][2:8] = True
  out = np.asarray(dot(params, padded, target))
  np.testing.assert_allclose(out[2:8], base, rtol=1e-5)
  assert np.all(out[[0, 1, 8]] == 0.0)
  bad = dict(batch, y=np.r_[batch["y"][:1], C, -1, batch["y"][3:]].astype(np.int32))
  out = np.asarray(dot(params, bad, target))
  assert np.isnan(out[1]) and np.isnan(out[2])
  np.testing.assert_allclose(out[[0, 3, 4, 5]], base[[0, 3, 4, 5]], rtol=1e-5)


def test_gradient_dot_input_errors_name_the_field():
  apply_fn, params, batch, target = _case("mlp_layernorm")
  with pytest.raises(DataError, match="target"):
    scores.gradient_dot(apply_fn, params, batch, {"w1": target["w1"]})
  with pytest.raises(DataError, match=r"target\['w2'\] has shape"):
    scores.gradient_dot(apply_fn, params, batch, dict(target, w2=target["w2"].T))
  with pytest.raises(DataError, match="dtype"):
    scores.gradient_dot(apply_fn, params, batch, dict(target, b2=jnp.zeros(C, jnp.int32)))
  with pytest.raises(DataError, match="batch\\['y'\\]"):
    scores.gradient_dot(apply_fn, params, dict(batch, y=batch["y"].astype(jnp.float32)), target)
  # A NaN in the target reaches every real row; padding stays 0.
  nan_b2 = np.where(np.arange(C) == 0, np.nan, target["b2"]).astype(np.float32)
  out = np.asarray(_dot_fn(apply_fn)(params, batch, dict(target, b2=nan_b2)))
  assert np.all(np.isnan(out[:4])) and np.all(out[4:] == 0.0)


def test_mean_gradient_is_the_mean_of_per_example_gradients_over_real_rows():
  apply_fn, params, batch, _ = _case("conv", b=6, n_pad=2)
  halves = [jax.tree.map(lambda a: a[:3], batch), jax.tree.map(lambda a: a[3:], batch)]
  got = _flat(scores.mean_gradient(apply_fn, params, halves))
  ref = np.mean([_flat(g) for g in _per_example_grads(apply_fn, params, batch)[:4]], 0)
  np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  with pytest.raises(DataError, match="no real row"):
    scores.mean_gradient(apply_fn, params, dict(batch, mask=jnp.zeros(6, bool)))
  with pytest.raises(DataError, match="no batches"):
    scores.mean_gradient(apply_fn, params, [])


# ----------------------------------------------------------------------------------------------
# gradient_features
# ----------------------------------------------------------------------------------------------


def _features_fn(apply_fn, dim, **kw):
  return jax.jit(lambda p, b, k: scores.gradient_features(apply_fn, p, b, k, dim=dim, **kw))


@pytest.mark.parametrize("name", list(MODELS))
def test_gradient_features_are_exact_where_every_block_fits(name):
  apply_fn, params, batch, _ = _case(name)
  f = np.asarray(_features_fn(apply_fn, 10_000)(params, batch, jax.random.key(0)))
  n_params = sum(a.size for a in jax.tree.leaves(params))
  assert f.shape == (6, n_params) and f.dtype == np.float32
  g = np.stack([_flat(t) for t in _per_example_grads(apply_fn, params, batch)])[:4]
  np.testing.assert_allclose(f[:4] @ f[:4].T, g @ g.T, rtol=1e-5, atol=1e-6 * np.abs(g @ g.T).max())
  assert np.all(f[4:] == 0.0)


@pytest.mark.parametrize("name", list(MODELS))
def test_projected_inner_products_are_unbiased_over_keys(name):
  """Mean over 400 keys of <f_i, f_j> at dim 12 (every block projected or sketched) is within 5
  standard errors of the exact <g_i, g_j>."""
  apply_fn, params, batch, _ = _case(name)
  fn = _features_fn(apply_fn, 12)
  keys = jax.random.split(jax.random.key(1), 400)
  grams = np.stack([np.asarray(f[:4] @ f[:4].T) for f in
                    (fn(params, batch, k) for k in keys)]).astype(np.float64)
  g = np.stack([_flat(t) for t in _per_example_grads(apply_fn, params, batch)])[:4]
  exact = g @ g.T
  se = grams.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(grams.mean(0) - exact) <= 5 * se + 1e-6), (grams.mean(0), exact, se)
  # One key is one projection: the same key gives the same features, another key others.
  f0 = np.asarray(fn(params, batch, keys[0]))
  np.testing.assert_array_equal(f0, np.asarray(fn(params, batch, keys[0])))
  assert not np.allclose(f0[:4], np.asarray(fn(params, batch, keys[1]))[:4])


def test_gradient_features_rows_in_another_order_padding_and_labels():
  apply_fn, params, batch, _ = _case("conv", b=6, n_pad=0)
  fn, batch = _features_fn(apply_fn, 40), jax.tree.map(np.asarray, batch)  # host-built batches
  key = jax.random.key(3)
  base = np.asarray(fn(params, batch, key))
  perm = np.array([5, 2, 0, 4, 1, 3])
  np.testing.assert_allclose(np.asarray(fn(params, jax.tree.map(lambda a: a[perm], batch), key)),
                             base[perm], rtol=1e-5, atol=1e-7)
  padded = jax.tree.map(lambda a: np.concatenate([a[:1] * 0, a, a[:2] * 0]), batch)
  padded["mask"] = np.r_[False, [True] * 6, False, False]
  out = np.asarray(_features_fn(apply_fn, 40)(params, padded, key))
  np.testing.assert_allclose(out[1:7], base, rtol=1e-5, atol=1e-7)
  assert np.all(out[[0, 7, 8]] == 0.0)
  bad = dict(batch, y=np.where(np.arange(6) == 2, 7, batch["y"]).astype(np.int32))
  out = np.asarray(fn(params, bad, key))
  assert np.all(np.isnan(out[2])) and np.all(np.isfinite(np.delete(out, 2, 0)))


def _adam_reference(g_flat, mu, nu, b1=0.9, b2=0.999, eps=1e-8):
  return ((1 - b1) * g_flat + b1 * _flat(mu)) / np.sqrt(b2 * _flat(nu) + eps)


@pytest.mark.parametrize("name", list(MODELS))
def test_adam_preconditioned_features_match_less_update_direction_where_exact(name):
  apply_fn, params, batch, _ = _case(name)
  rng = np.random.default_rng(5)
  tx = optax.adam(1e-3)
  state = tx.init(params)
  mu = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.normal(size=a.shape), a.dtype), params)
  nu = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.01, 1.0, size=a.shape), a.dtype), params)
  state = (state[0]._replace(mu=mu, nu=nu),) + tuple(state[1:])
  f = np.asarray(_features_fn(apply_fn, 10_000, adam_state=state)(params, batch,
                                                                   jax.random.key(0)))
  g = np.stack([_adam_reference(_flat(t), mu, nu)
                for t in _per_example_grads(apply_fn, params, batch)])[:4]
  np.testing.assert_allclose(f[:4] @ f[:4].T, g @ g.T, rtol=1e-4)
  assert np.all(f[4:] == 0.0)


def test_factored_scale_is_exact_for_a_rank_one_second_moment():
  rng = np.random.default_rng(0)
  v = np.einsum("gk,ge->gke", rng.uniform(0.1, 2, (2, 5)), rng.uniform(0.1, 2, (2, 3)))
  s_in, s_out = gf_lib._factored_scale(jnp.asarray(v))
  np.testing.assert_allclose(np.einsum("gk,ge->gke", s_in, s_out), 1 / np.sqrt(v), rtol=1e-5)


def test_adam_features_with_a_rank_one_second_moment_are_unbiased():
  """Projected layers use the factored scale; with a rank-one nu it is exact, so the mean over
  keys of <f_i, f_j> matches the exact preconditioned inner products."""
  apply_fn, params, batch, _ = _case("mlp_layernorm")
  rng = np.random.default_rng(2)

  def rank_one(a):
    if a.ndim != 2:
      return jnp.asarray(rng.uniform(0.1, 1.0, a.shape), a.dtype)
    return jnp.asarray(np.outer(rng.uniform(0.3, 1, a.shape[0]), rng.uniform(0.3, 1, a.shape[1])),
                       a.dtype)

  nu = jax.tree.map(rank_one, params)
  mu = jax.tree.map(lambda a: jnp.asarray(0.1 * rng.normal(size=a.shape), a.dtype), params)
  state = optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)
  # eps 0 would be exact; LESS's 1e-8 perturbs the rank-one nu by far less than the tolerance.
  fn = _features_fn(apply_fn, 12, adam_state=state)
  keys = jax.random.split(jax.random.key(4), 400)
  grams = np.stack([np.asarray(f[:4] @ f[:4].T) for f in
                    (fn(params, batch, k) for k in keys)]).astype(np.float64)
  g = np.stack([_adam_reference(_flat(t), mu, nu)
                for t in _per_example_grads(apply_fn, params, batch)])[:4]
  se = grams.std(0) / np.sqrt(len(keys))
  assert np.all(np.abs(grams.mean(0) - g @ g.T) <= 5 * se + 1e-5)


def test_gradient_features_input_errors_name_the_field():
  apply_fn, params, batch, _ = _case("mlp_layernorm")
  key = jax.random.key(0)
  with pytest.raises(ConfigError, match="gradient_features.dim"):
    scores.gradient_features(apply_fn, params, batch, key, dim=0)
  with pytest.raises(ConfigError, match="adam_state"):
    scores.gradient_features(apply_fn, params, batch, key, adam_state=optax.sgd(0.1).init(params))
  bad = optax.ScaleByAdamState(count=0, mu=params, nu={"w1": params["w1"]})
  with pytest.raises(DataError, match="adam_state.nu"):
    scores.gradient_features(apply_fn, params, batch, key, adam_state=bad)
  with pytest.raises(ConfigError, match=r"betas\[1\]"):
    scores.gradient_features(apply_fn, params, batch, key, betas=(0.9, 1.0))


# ----------------------------------------------------------------------------------------------
# Selections: TracIn and LESS.
# ----------------------------------------------------------------------------------------------


def test_tracin_sums_learning_rate_weighted_influence_over_checkpoints():
  apply_fn, p0, batch, t0 = _case("embed_attention")
  _, p1, _, t1 = _case("embed_attention", seed=1)
  got = np.asarray(jax.jit(lambda ps, b, ts: scores.tracin(apply_fn, ps, [0.5, 0.25], b, ts))(
      [p0, p1], batch, [t0, t1]))  # compiled: op by op, ~180 single ops (1.7 s)
  g0 = [_flat(g) for g in _per_example_grads(apply_fn, p0, batch)]
  g1 = [_flat(g) for g in _per_example_grads(apply_fn, p1, batch)]
  ref = np.array([0.5 * a @ _flat(t0) + 0.25 * b @ _flat(t1) for a, b in zip(g0, g1)])
  np.testing.assert_allclose(got[:4], ref[:4], rtol=1e-4, atol=1e-5 * np.abs(ref).max())
  assert np.all(got[4:] == 0.0)
  self_inf = np.asarray(jax.jit(lambda ps, b: scores.tracin(apply_fn, ps, 0.1, b))([p0, p1], batch))
  ref = np.array([0.1 * (a @ a + b @ b) for a, b in zip(g0, g1)])
  np.testing.assert_allclose(self_inf[:4], ref[:4], rtol=1e-4)
  assert np.all(self_inf[4:] == 0.0)
  with pytest.raises(ConfigError, match="tracin.checkpoints"):
    scores.tracin(apply_fn, [], 0.1, batch)
  with pytest.raises(ConfigError, match="tracin.learning_rates"):
    scores.tracin(apply_fn, [p0, p1], [0.1], batch)
  with pytest.raises(ConfigError, match="tracin.learning_rates"):
    scores.tracin(apply_fn, [p0], [float("nan")], batch)
  with pytest.raises(ConfigError, match="tracin.targets"):
    scores.tracin(apply_fn, [p0, p1], 0.1, batch, [t0])
  assert scores.SCORES["tracin"].kind == "selection" and scores.SCORES["less"].kind == "selection"
  assert set(scores.SELECTION_SCORES) == {"tracin", "less"}


def _cos(a, b):
  return a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def test_less_is_the_reduced_cosine_to_the_targets():
  rng = np.random.default_rng(0)
  f = rng.normal(size=(7, 5)).astype(np.float32)
  t = rng.normal(size=(4, 5)).astype(np.float32)
  cos = np.array([[_cos(a, b) for b in t] for a in f])
  np.testing.assert_allclose(scores.less(f, t, reduce="max"), cos.max(1), rtol=1e-5)
  np.testing.assert_allclose(scores.less(f, t, reduce="mean"), cos.mean(1), rtol=1e-5, atol=1e-7)
  groups = np.array([0, 0, 1, 1])
  ref = np.maximum(cos[:, :2].mean(1), cos[:, 2:].mean(1))
  np.testing.assert_allclose(scores.less(f, t, target_groups=groups), ref, rtol=1e-5, atol=1e-7)
  # Two checkpoints with learning rates; chunks of rows; rows in another order follow.
  f2, t2 = rng.normal(size=f.shape).astype(np.float32), rng.normal(size=t.shape).astype(np.float32)
  cos2 = np.array([[_cos(a, b) for b in t2] for a in f2])
  got = scores.less([f, f2], [t, t2], learning_rates=[2.0, 0.5], chunk_size=3)
  np.testing.assert_allclose(got, 2 * cos.max(1) + 0.5 * cos2.max(1), rtol=1e-5)
  perm = rng.permutation(7)
  np.testing.assert_allclose(scores.less(f[perm], t), scores.less(f, t)[perm], rtol=1e-6)
  # A zero row (padding) scores 0, a NaN row NaN; the others are unchanged.
  bad = f.copy()
  bad[1], bad[2, 0] = 0.0, np.nan
  out = scores.less(bad, t)
  assert out[1] == 0.0 and np.isnan(out[2])
  np.testing.assert_allclose(np.delete(out, [1, 2]), np.delete(cos.max(1), [1, 2]), rtol=1e-5)
  assert scores.less(np.zeros((0, 5), np.float32), t).shape == (0,)


def test_less_input_errors_name_the_field():
  f, t = np.ones((3, 4), np.float32), np.ones((2, 4), np.float32)
  with pytest.raises(DataError, match="less.target_features has no rows"):
    scores.less(f, t[:0])
  with pytest.raises(DataError, match="less.target_features has 3 features"):
    scores.less(f, t[:, :3])
  with pytest.raises(DataError, match="non-finite"):
    scores.less(f, np.full((2, 4), np.inf, np.float32))
  with pytest.raises(DataError, match="less.train_features"):
    scores.less(np.ones(4, np.float32), t)
  with pytest.raises(DataError, match="less.train_features"):
    scores.less(np.ones((3, 4), np.int32), t)
  with pytest.raises(DataError, match="less.target_groups"):
    scores.less(f, t, target_groups=[0.0, 1.0])
  with pytest.raises(ConfigError, match="less.reduce"):
    scores.less(f, t, reduce="sum")
  with pytest.raises(DataError, match="checkpoints"):
    scores.less([f, f], [t])


# ----------------------------------------------------------------------------------------------
# The GPT-style classifier: projection keeps the ranking of the exact inner products.
# ----------------------------------------------------------------------------------------------


def _spearman(a, b):
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return np.corrcoef(ra, rb)[0, 1]


def gpt_case(b=32, tokens=16, width=32, vocab=512, seed=0):
  from prunejax.models import build_model, init_variables, make_apply_fn
  model = build_model("gpt", 2, vocab_size=vocab, context=tokens, depth=2, width=width,
                      num_heads=2)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(1, vocab, size=(2 * b, tokens)).astype(np.int32))
  y = jnp.asarray(rng.integers(0, 2, size=2 * b).astype(np.int32))
  variables = init_variables(model, jax.random.key(seed), x[:1])
  train = {"x": x[:b], "y": y[:b], "mask": jnp.ones(b, bool)}
  val = {"x": x[b:], "y": y[b:], "mask": jnp.ones(b, bool)}
  return make_apply_fn(model), variables, train, val


def test_gpt_projected_inner_products_keep_the_exact_ranking_at_dim_8192():
  apply_fn, variables, train, val = gpt_case()
  target = scores.mean_gradient(apply_fn, variables, val)
  exact = np.asarray(_dot_fn(apply_fn)(variables, train, target))
  feats = jax.jit(lambda v, b, k: scores.gradient_features(apply_fn, v, b, k, dim=8192))
  plan = scores.feature_plan(apply_fn, variables, train["x"], 8192)
  assert plan.dim <= 8192 and any(not b.exact for b in plan.blocks.values())
  key = jax.random.key(0)
  # Features are linear in the gradient: the mean of the validation features is the feature of
  # the validation mean gradient.
  proj = np.asarray(feats(variables, train, key)) @ np.asarray(feats(variables, val, key)).mean(0)
  assert _spearman(proj, exact) >= 0.9, _spearman(proj, exact)
  np.testing.assert_allclose(proj, exact, atol=0.5 * np.abs(exact).max())


# ----------------------------------------------------------------------------------------------
# Edges shared by both: a non-finite input row, an empty batch, features saved by id.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["dot", "features"])
def test_a_non_finite_row_stays_in_its_row_and_an_empty_batch_is_empty(which):
  apply_fn, params, batch, target = _case("mlp_layernorm")
  dot, feats = _dot_fn(apply_fn), _features_fn(apply_fn, 20)  # compiled once per batch size
  fn = {"dot": lambda b: dot(params, b, target),
        "features": lambda b: feats(params, b, jax.random.key(0))}[which]
  batch = jax.tree.map(np.asarray, batch)  # the batches are built on the host
  base = np.asarray(fn(batch))
  for bad_value in (np.nan, np.inf):
    x = batch["x"].copy()
    x[1, 0] = bad_value
    out = np.asarray(fn(dict(batch, x=x)))
    assert np.all(np.isnan(out[1]))
    np.testing.assert_allclose(np.delete(out, 1, 0), np.delete(base, 1, 0), rtol=1e-5, atol=1e-7)
  empty = np.asarray(fn(jax.tree.map(lambda a: a[:0], batch)))
  assert empty.shape == (0,) + base.shape[1:]


def test_features_saved_by_id_come_back_in_any_order(tmp_path):
  apply_fn, params, batch, _ = _case("conv", b=6, n_pad=2)
  ids = np.array([40, 10, 30, 20, -1, -1])
  fn = jax.jit(lambda p, b: scores.gradient_features(apply_fn, p, b, jax.random.key(0), dim=30))
  got_ids, feats = scores.map_batches(lambda b: fn(params, b),
                                      [dict(jax.tree.map(np.asarray, batch), id=ids)])
  np.testing.assert_array_equal(got_ids, ids[:4])
  path = str(tmp_path / "features.npz")
  scores.save_scores(path, got_ids, meta={"key": 0, "dim": 30}, features=feats)
  loaded_ids, loaded = scores.load_scores(path, meta={"key": 0, "dim": 30})
  order = np.array([20, 40, 10, 30])
  np.testing.assert_array_equal(scores.align(order, loaded_ids, loaded["features"]),
                                feats[[3, 0, 1, 2]])


def _odd_conv_apply(p, x):
  y = jax.lax.conv_general_dilated(x, p["k1"], (2, 1), ((1, 2), (0, 1)), lhs_dilation=(1, 2),
                                   rhs_dilation=(2, 1), dimension_numbers=("NCHW", "OIHW", "NCHW"))
  y = jnp.tanh(y)
  y = jax.lax.conv_general_dilated(y, p["k2"], (1, 1), "SAME", feature_group_count=2,
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return jnp.mean(y, (2, 3)) @ p["head"]


def test_conv_filter_path_equals_the_patch_path(monkeypatch):
  """Projected convs (channels first, strides, padding, both dilations, feature groups): the
  backward-filter path and the im2col path give the same features for one key."""
  rng = np.random.default_rng(0)
  params = {"k1": jnp.asarray(rng.normal(size=(4, 2, 3, 2)) / 3, jnp.float32),
            "k2": jnp.asarray(rng.normal(size=(6, 2, 3, 3)) / 3, jnp.float32),
            "head": jnp.asarray(rng.normal(size=(6, C)), jnp.float32)}
  batch = {"x": rng.normal(size=(5, 2, 7, 6)).astype(np.float32),
           "y": rng.integers(0, C, 5).astype(np.int32), "mask": np.arange(5) < 4}
  plan = scores.feature_plan(_odd_conv_apply, params, batch["x"], 16)
  assert not any(b.exact for b in plan.blocks.values())
  out = {}
  for flag in (True, False):  # compiled (op by op: ~200 single ops, 2 s); CONV_FILTER is read
    monkeypatch.setattr(gf_lib, "CONV_FILTER", flag)  # when traced: a new function for each flag
    out[flag] = np.asarray(_features_fn(_odd_conv_apply, 16)(params, batch, jax.random.key(2)))
  np.testing.assert_allclose(out[True], out[False], rtol=1e-4, atol=1e-6 * np.abs(out[False]).max())
  g = np.stack([_flat(t) for t in _per_example_grads(_odd_conv_apply, params, batch)])[:4]
  exact = np.asarray(_features_fn(_odd_conv_apply, 10_000)(params, batch, jax.random.key(0)))[:4]
  np.testing.assert_allclose(exact @ exact.T, g @ g.T, rtol=1e-4)
