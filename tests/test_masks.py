"""Unstructured masks: filters, the exact select, magnitude/random/SNIP/GraSP/SynFlow/movement and
per-layer distributions, against hand-computed masks and float64 references."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from prunejax import masks
from prunejax.errors import ConfigError
from prunejax.masks import core
from prunejax.models import MLP, GPTClassifier


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _tree(*leaves):
  return {f"l{i}": {"kernel": jnp.asarray(l, jnp.float32)} for i, l in enumerate(leaves)}


def _ref_global(leaves, k):
  """Reference: a stable sort of all scores in leaf order; the first k are pruned."""
  flat = np.concatenate([np.where(np.isnan(l), -np.inf, l).ravel() for l in leaves])
  pruned = np.zeros(flat.size, bool)
  pruned[np.argsort(flat, kind="stable")[:k]] = True
  out, o = [], 0
  for l in leaves:
    out.append(~pruned[o:o + l.size].reshape(l.shape))
    o += l.size
  return out


@pytest.fixture(params=["radix", "sort"])
def select_path(request, monkeypatch):
  """Runs a test with the radix select (forced even on tiny trees) and with the small-group sort."""
  if request.param == "radix":
    monkeypatch.setattr(core, "_SORT_MAX", 0)
  return request.param


@pytest.fixture(scope="module")
def mlp_params():
  model = MLP(num_classes=5, hidden=(12, 8))
  return model, jax.jit(model.init)(jax.random.key(0), jnp.ones((2, 4, 4, 1)))["params"]


# ----------------------------------------------------------------------------------------------
# Filters and helpers.
# ----------------------------------------------------------------------------------------------


def test_default_filter_prunes_kernels_and_embeddings_only():
  gpt = GPTClassifier(vocab_size=11, num_classes=2, context=4, depth=1, width=8, num_heads=2)
  params = jax.eval_shape(gpt.init, jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  leaves, flags, _ = core.prunable_leaves(params)
  chosen = {p for p, f in zip(masks.leaf_paths(params), flags) if f}
  assert "wte/embedding" in chosen and "head/kernel" in chosen
  assert "block_0/attn/query/kernel" in chosen and "block_0/mlp_fc/kernel" in chosen
  assert not any(p.endswith(("bias", "scale")) for p in chosen)
  assert "wpe" not in chosen
  no_head = masks.make_filter_fn(prune_head=False)
  assert not no_head(jax.tree_util.tree_flatten_with_path({"head": {"kernel": jnp.ones((2, 2))}})
                     [0][0][0], jnp.ones((2, 2)))


def test_filter_include_exclude_and_unnamed_leaves():
  tree = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((2, 2))},
          "c": [jnp.ones((3, 3)), jnp.ones((3,))]}
  paths = masks.leaf_paths(tree)
  assert paths == ["a/kernel", "b/kernel", "c/0", "c/1"]
  flags = lambda fn: core.prunable_leaves(tree, fn)[1]
  assert flags(None) == [True, True, True, False]  # unnamed: >= 2-D counts as a kernel.
  assert flags(masks.make_filter_fn(include=[r"^a/"])) == [True, False, False, False]
  assert flags(masks.make_filter_fn(exclude=[r"^b/", r"^c/"])) == [True, False, False, False]


def test_apply_mask_sparsity_of_and_count_params(mlp_params):
  _, params = mlp_params
  mask = masks.magnitude(params, 0.5)
  pruned = masks.apply_mask(params, mask)
  n = masks.count_params(params)
  assert n == 16 * 12 + 12 * 8 + 8 * 5
  assert float(masks.sparsity_of(mask)) == pytest.approx(round(0.5 * n) / n)
  assert float(masks.sparsity_of(pruned)) == pytest.approx(round(0.5 * n) / n)
  for p, m in zip(jax.tree.leaves(pruned), jax.tree.leaves(mask)):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0)


# ----------------------------------------------------------------------------------------------
# The exact select on hand-made trees.
# ----------------------------------------------------------------------------------------------


def test_threshold_mask_hand_made_global(select_path):
  tree = _tree([[3.0, 1.0], [2.0, 5.0]], [[1.0, 4.0]])
  tree["l1"]["bias"] = jnp.zeros((2,))
  m = _np(masks.threshold_mask(tree, 3))
  np.testing.assert_array_equal(m["l0"]["kernel"], [[True, False], [False, True]])
  np.testing.assert_array_equal(m["l1"]["kernel"], [[False, True]])
  np.testing.assert_array_equal(m["l1"]["bias"], [True, True])  # never pruned.
  # A tie at 1.0 across leaves: the first leaf loses first.
  m = _np(masks.threshold_mask(tree, 1))
  np.testing.assert_array_equal(m["l0"]["kernel"], [[True, False], [True, True]])
  np.testing.assert_array_equal(m["l1"]["kernel"], [[True, True]])
  for k, kept in [(0, 6), (6, 0)]:
    m = masks.threshold_mask(tree, k)
    assert sum(int(np.sum(m[f"l{i}"]["kernel"])) for i in range(2)) == kept


def test_threshold_mask_ties_within_leaf_signed_zero_nan_and_negatives(select_path):
  m = _np(masks.threshold_mask(_tree([[2.0, 2.0], [2.0, 1.0]]), 2))
  np.testing.assert_array_equal(m["l0"]["kernel"], [[False, True], [True, False]])
  m = _np(masks.threshold_mask(_tree([[-0.0, 0.0], [0.0, -0.0]]), 3))
  np.testing.assert_array_equal(m["l0"]["kernel"], [[False, False], [False, True]])
  m = _np(masks.threshold_mask(_tree([[1.0, np.nan], [2.0, 3.0]]), 1))
  np.testing.assert_array_equal(m["l0"]["kernel"], [[True, False], [True, True]])
  m = _np(masks.threshold_mask(_tree([[-1.0, 2.0], [-3.0, 0.0]]), 2))
  np.testing.assert_array_equal(m["l0"]["kernel"], [[False, True], [False, True]])


def test_threshold_mask_per_leaf_counts(select_path):
  tree = _tree([[3.0, 1.0], [2.0, 5.0]], [[1.0, 4.0]])
  counts = {"l0": {"kernel": 1}, "l1": {"kernel": 2}}
  m = _np(masks.threshold_mask(tree, counts))
  np.testing.assert_array_equal(m["l0"]["kernel"], [[True, False], [True, True]])
  np.testing.assert_array_equal(m["l1"]["kernel"], [[False, False]])


_shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1,
                   max_size=3)


@settings(max_examples=10, deadline=None)
@given(shapes=_shapes, seed=st.integers(0, 2**31 - 1), frac=st.floats(0.0, 1.0),
       coarse=st.booleans(), radix=st.booleans())
def test_threshold_mask_matches_stable_sort_reference(shapes, seed, frac, coarse, radix):
  rng = np.random.default_rng(seed)
  leaves = [(rng.integers(-2, 3, s) if coarse else rng.standard_normal(s)).astype(np.float32)
            for s in shapes]  # coarse values force many ties.
  n = sum(l.size for l in leaves)
  k = round(frac * n)
  saved = core._SORT_MAX
  core._SORT_MAX = 0 if radix else saved
  try:
    m = masks.threshold_mask(_tree(*leaves), k)
  finally:
    core._SORT_MAX = saved
  for i, expected in enumerate(_ref_global(leaves, k)):
    np.testing.assert_array_equal(np.asarray(m[f"l{i}"]["kernel"]), expected)


@settings(max_examples=10, deadline=None)
@given(shapes=_shapes, seed=st.integers(0, 2**31 - 1), sparsity=st.floats(-0.5, 1.5),
       scope=st.sampled_from(["global", "layerwise"]))
def test_magnitude_exact_sparsity_or_config_error(shapes, seed, sparsity, scope):
  rng = np.random.default_rng(seed)
  leaves = [rng.standard_normal(s).astype(np.float32) for s in shapes]
  tree = _tree(*leaves)
  if not 0.0 <= sparsity <= 1.0:
    with pytest.raises(ConfigError, match="sparsity"):
      masks.magnitude(tree, sparsity, scope=scope)
    return
  m = masks.magnitude(tree, sparsity, scope=scope)
  pruned = [int(np.sum(~np.asarray(m[f"l{i}"]["kernel"]))) for i in range(len(leaves))]
  if scope == "global":
    assert sum(pruned) == round(sparsity * sum(l.size for l in leaves))
  else:
    assert pruned == [round(sparsity * l.size) for l in leaves]


def test_float64_scores_use_64_bit_keys(select_path):
  with jax.enable_x64(True):
    a = 1.0 + 2.0**-40  # equal to 1.0 in float32.
    scores = {"w": {"kernel": jnp.asarray([[a, 1.0]], jnp.float64)}}
    np.testing.assert_array_equal(np.asarray(masks.threshold_mask(scores, 1)["w"]["kernel"]),
                                  [[True, False]])


# ----------------------------------------------------------------------------------------------
# Magnitude, random, jit.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["global", "layerwise"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.75, 1.0])
def test_magnitude_exact(mlp_params, scope, sparsity):
  _, params = mlp_params
  m = masks.magnitude(params, sparsity, scope=scope)
  kernels = ["dense_0", "dense_1", "head"]
  pruned = {k: int(np.sum(~np.asarray(m[k]["kernel"]))) for k in kernels}
  sizes = {k: params[k]["kernel"].size for k in kernels}
  if scope == "global":
    assert sum(pruned.values()) == round(sparsity * sum(sizes.values()))
    kept = np.concatenate([np.abs(np.asarray(params[k]["kernel"]))[np.asarray(m[k]["kernel"])]
                           for k in kernels])
    gone = np.concatenate([np.abs(np.asarray(params[k]["kernel"]))[~np.asarray(m[k]["kernel"])]
                           for k in kernels])
    if kept.size and gone.size:
      assert gone.max() <= kept.min()
  else:
    assert pruned == {k: round(sparsity * s) for k, s in sizes.items()}
  assert all(np.all(m[k]["bias"]) for k in kernels)


def test_magnitude_head_excluded_by_filter(mlp_params):
  _, params = mlp_params
  m = masks.magnitude(params, 0.9, filter_fn=masks.make_filter_fn(prune_head=False))
  assert np.all(m["head"]["kernel"])
  assert not np.all(m["dense_0"]["kernel"])


def test_random_exact_and_keyed(mlp_params):
  _, params = mlp_params
  n = masks.count_params(params)
  a = masks.random(params, 0.6, key=jax.random.key(1))
  b = masks.random(params, 0.6, key=jax.random.key(1))
  c = masks.random(params, 0.6, key=jax.random.key(2))
  assert sum(int(np.sum(~np.asarray(x))) for x in jax.tree.leaves(a)) == round(0.6 * n)
  assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  assert not all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


def test_magnitude_jits_with_traced_sparsity_without_recompiling(mlp_params):
  model, params = mlp_params
  traces = []

  @jax.jit
  def f(params, sparsity):
    traces.append(1)
    return masks.magnitude(params, sparsity)

  other = jax.jit(model.init)(jax.random.key(7), jnp.ones((2, 4, 4, 1)))["params"]
  for p, s in [(params, 0.5), (other, 0.25)]:
    got = f(p, jnp.float32(s))
    want = masks.magnitude(p, s)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
  assert len(traces) == 1


def test_mask_from_scores_rejects_bad_scope_and_distribution(mlp_params):
  _, params = mlp_params
  with pytest.raises(ConfigError, match="scope"):
    masks.magnitude(params, 0.5, scope="per-layer")
  with pytest.raises(ConfigError, match="layerwise"):
    masks.magnitude(params, 0.5, distribution="erk")
  with pytest.raises(ConfigError, match="distribution"):
    masks.magnitude(params, 0.5, scope="layerwise", distribution="exponential")


# ----------------------------------------------------------------------------------------------
# Distributions.
# ----------------------------------------------------------------------------------------------


def test_erk_values_by_hand():
  # Dense (4, 6): raw (4+6)/24; conv (3,3,2,4): raw (3+3+2+4)/72. Keep 48 of 96:
  # eps = 48 / (10 + 12), densities 10/24 * eps and 12/72 * eps.
  params = {"d": {"kernel": jnp.ones((4, 6))}, "c": {"kernel": jnp.ones((3, 3, 2, 4))}}
  s = masks.erk(params, 0.5)
  eps = 48 / 22
  assert s["d"]["kernel"] == pytest.approx(1 - 10 / 24 * eps)
  assert s["c"]["kernel"] == pytest.approx(1 - 12 / 72 * eps)
  m = masks.magnitude(params, 0.5, scope="layerwise", distribution="erk")
  assert int(np.sum(~np.asarray(m["d"]["kernel"]))) == round(24 * (1 - 10 / 24 * eps))  # 2
  assert int(np.sum(~np.asarray(m["c"]["kernel"]))) == round(72 * (1 - 12 / 72 * eps))  # 46


def test_erk_keeps_a_layer_dense_when_its_density_would_exceed_one():
  # (2,2): raw 1, (10,10): raw 0.2. eps = 52/24 makes (2,2) denser than 1, so it stays dense and
  # (10,10) keeps 48 of 100: sparsity 0.52. Total kept 4 + 48 = 52 = half of 104.
  params = {"a": {"kernel": jnp.ones((2, 2))}, "b": {"kernel": jnp.ones((10, 10))}}
  s = masks.erk(params, 0.5)
  assert s["a"]["kernel"] == 0.0
  assert s["b"]["kernel"] == pytest.approx(0.52)


def test_uniform_and_custom_distributions(mlp_params):
  _, params = mlp_params
  u = masks.uniform(params, 0.4)
  assert u["dense_0"]["kernel"] == 0.4 and u["dense_0"]["bias"] == 0.0
  c = masks.custom(params, {"dense_0": 0.5, "head/kernel": 0.25}, default=0.1)
  assert (c["dense_0"]["kernel"], c["dense_1"]["kernel"], c["head"]["kernel"]) == (0.5, 0.1, 0.25)
  m = masks.magnitude(params, 0.0, scope="layerwise", distribution={"dense_1": 0.5})
  assert int(np.sum(~np.asarray(m["dense_1"]["kernel"]))) == 48
  assert np.all(m["dense_0"]["kernel"]) and np.all(m["head"]["kernel"])
  with pytest.raises(ConfigError, match="match no prunable leaf"):
    masks.custom(params, {"dense_0/bias": 0.5})
  with pytest.raises(ConfigError, match="out of range"):
    masks.custom(params, {"dense_0": 1.5})


# ----------------------------------------------------------------------------------------------
# SNIP, GraSP, SynFlow, movement.
# ----------------------------------------------------------------------------------------------


def _tiny_net(dtype):
  rng = np.random.default_rng(3)
  params = {"dense_0": {"kernel": rng.standard_normal((5, 4)), "bias": rng.standard_normal(4)},
            "head": {"kernel": rng.standard_normal((4, 3)), "bias": rng.standard_normal(3)}}
  batch = {"x": rng.standard_normal((6, 5)), "y": np.array([0, 1, 2, 0, 1, 2]),
           "mask": np.array([True, True, True, True, True, False])}
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, dtype) if a.dtype.kind == "f"
                                else jnp.asarray(a), t)
  return cast(params), cast(batch)


def _tiny_apply(p, x):
  return jnp.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"]) @ p["head"]["kernel"] \
      + p["head"]["bias"]


def test_snip_matches_hand_written_float64_backprop():
  with jax.enable_x64(True):
    params, batch = _tiny_net(jnp.float64)
    scores = jax.jit(functools.partial(masks.snip_scores, _tiny_apply))(params, batch)
    p = jax.tree.map(np.asarray, params)
    x, y, keep = (np.asarray(batch[k]) for k in ("x", "y", "mask"))
    h = np.tanh(x @ p["dense_0"]["kernel"] + p["dense_0"]["bias"])
    logits = h @ p["head"]["kernel"] + p["head"]["bias"]
    prob = np.exp(logits - logits.max(1, keepdims=True))
    prob /= prob.sum(1, keepdims=True)
    dlogits = (prob - np.eye(3)[y]) * keep[:, None] / keep.sum()
    g_head = h.T @ dlogits
    g_0 = x.T @ ((dlogits @ p["head"]["kernel"].T) * (1 - h**2))
    np.testing.assert_allclose(scores["head"]["kernel"], np.abs(p["head"]["kernel"] * g_head),
                               rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(scores["dense_0"]["kernel"], np.abs(p["dense_0"]["kernel"] * g_0),
                               rtol=1e-12, atol=1e-15)
    m = masks.snip(_tiny_apply, params, batch, 0.5)
    ref = _ref_global([np.abs(p["dense_0"]["kernel"] * g_0), np.abs(p["head"]["kernel"] * g_head)],
                      16)
    np.testing.assert_array_equal(m["dense_0"]["kernel"], ref[0])
    np.testing.assert_array_equal(m["head"]["kernel"], ref[1])


@jax.jit
def _explicit_hessian_grasp(params, batch):
  """``-theta * (H g)`` with the Hessian formed explicitly over the flat params (one program: op by
  op, the gradient, the product and the unravel compiled some fifty single ops)."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  loss = lambda f: masks.mean_cross_entropy(_tiny_apply(unravel(f), batch["x"]), batch)
  g = jax.grad(loss)(flat)
  hg = jax.hessian(loss)(flat) @ g
  return unravel(-flat * hg)


def test_grasp_matches_explicit_hessian_in_float64():
  with jax.enable_x64(True):
    params, batch = _tiny_net(jnp.float64)
    scores = jax.jit(functools.partial(masks.grasp_scores, _tiny_apply))(params, batch)
    expected = _np(_explicit_hessian_grasp(params, batch))
    for a, b in zip(jax.tree.leaves(scores), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    m = masks.grasp(_tiny_apply, params, batch, 0.25)
    ref = _ref_global([-np.asarray(expected["dense_0"]["kernel"]),
                       -np.asarray(expected["head"]["kernel"])], 8)
    np.testing.assert_array_equal(m["dense_0"]["kernel"], ref[0])
    np.testing.assert_array_equal(m["head"]["kernel"], ref[1])


def _relu_net(p, x):
  h = jax.nn.relu(x @ p["l0"]["kernel"])
  h = jax.nn.relu(h @ p["l1"]["kernel"])
  return h @ p["l2"]["kernel"]


def _relu_params(seed):
  # Cast on the host and put as is: jnp.asarray(float64, float32) compiles a conversion per shape.
  rng = np.random.default_rng(seed)
  return {f"l{i}": {"kernel": jax.device_put(rng.standard_normal(s).astype(np.float32))}
          for i, s in enumerate([(6, 5), (5, 4), (4, 3)])}


_relu_synflow_scores = jax.jit(functools.partial(masks.synflow_scores, _relu_net,
                                                 input_shape=(1, 6)))


def test_synflow_conserves_flow_per_layer():
  params = _relu_params(0)
  scores = _np(_relu_synflow_scores(params))
  # R = sum(f(1; |theta|)), the same network in float64 on the host.
  h = np.ones((1, 6))
  for i in range(3):
    h = h @ np.abs(np.asarray(params[f"l{i}"]["kernel"], np.float64))
    h = np.maximum(h, 0.0) if i < 2 else h
  r = float(np.sum(h))
  for leaf in jax.tree.leaves(scores):
    assert float(np.sum(leaf)) == pytest.approx(r, rel=1e-5)
  # Neuron-wise: the flow into each hidden neuron equals the flow out of it.
  np.testing.assert_allclose(np.sum(scores["l0"]["kernel"], 0), np.sum(scores["l1"]["kernel"], 1),
                             rtol=1e-5)


def test_synflow_iterative_exact_and_one_round_equals_scores():
  params = _relu_params(1)
  n = masks.count_params(params)
  m = masks.synflow(_relu_net, params, 0.6, (1, 6), rounds=10)
  assert sum(int(np.sum(~np.asarray(x))) for x in jax.tree.leaves(m)) == round(0.6 * n)
  one = masks.synflow(_relu_net, params, 0.6, (1, 6), rounds=1)
  direct = masks.mask_from_scores(_relu_synflow_scores(params), 0.6)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(direct)))


def test_movement_prunes_weights_moving_towards_zero():
  params = _tree([[1.0, -1.0, 2.0, -2.0]])
  grads = _tree([[1.0, -1.0, -1.0, 1.0]])  # the first two shrink, the last two grow.
  scores = masks.movement_scores(params, grads)
  np.testing.assert_array_equal(scores["l0"]["kernel"], [[-1.0, -1.0, 2.0, 2.0]])
  m = masks.movement(scores, 0.5)
  np.testing.assert_array_equal(m["l0"]["kernel"], [[False, False, True, True]])
