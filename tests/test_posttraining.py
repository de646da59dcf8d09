"""Wanda and SparseGPT (prunejax.masks.posttraining) against independent float64 NumPy references:
SparseGPT's Algorithm 1 written out column by column, Wanda's scores from explicit per-example
activations; calibration statistics from intercepted layer inputs; layouts, fused weights, errors,
memory of a GPT-2-small-shaped model, and 8 devices equal to one."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import masks
from prunejax.models import init_variables
from prunejax.errors import ConfigError, DataError
from prunejax.masks import posttraining as pt

# ----------------------------------------------------------------------------------------------
# References (float64 NumPy).
# ----------------------------------------------------------------------------------------------


def _split_ref(total, sizes):
  n, out, start = sum(sizes), [], 0
  for s in sizes:
    out.append(math.floor(total * (start + s) / n + 0.5) - math.floor(total * start / n + 0.5))
    start += s
  return out


def _lowest(s, k):
  """Flags of the k lowest entries of a 1-D array, ties to the lower index."""
  flags = np.zeros(s.size, bool)
  flags[np.argsort(s, kind="stable")[:k]] = True
  return flags


def sparsegpt_ref(w, h, count, *, blocksize, damp=0.01, per_row=False, n_m=None):
  """SparseGPT's Algorithm 1 (Frantar & Alistarh 2023) in float64: W (rows = outputs) and
  H = X^T X; the count (of the layer, or of each row) is spread over the blocks in proportion.
  The OBS update is applied to all later columns at once, which the lazy block updates equal."""
  w, h = np.array(w, np.float64), np.array(h, np.float64)
  rows, cols = w.shape
  dead = np.diag(h) == 0
  h[dead, dead] = 1.0
  w[:, dead] = 0.0
  h += damp * np.mean(np.diag(h)) * np.eye(cols)
  u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper, U^T U = H^-1
  pruned = np.zeros(w.shape, bool)
  starts = list(range(0, cols, blocksize))
  sizes = [min(blocksize, cols - s) for s in starts]
  per_block = _split_ref(count, sizes if per_row else [rows * s for s in sizes])
  for b, i1 in enumerate(starts):
    i2 = i1 + sizes[b]
    if n_m is None:
      sal = w[:, i1:i2] ** 2 / np.diag(u)[i1:i2] ** 2
      if per_row:
        for r in range(rows):
          pruned[r, i1:i2] = _lowest(sal[r], per_block[b])
      else:
        pruned[:, i1:i2] = _lowest(sal.reshape(-1), per_block[b]).reshape(sal.shape)
    for j in range(i1, i2):
      if n_m is not None and (j - i1) % n_m[1] == 0:
        n, m = n_m
        sal = w[:, j:j + m] ** 2 / np.diag(u)[j:j + m] ** 2
        for r in range(rows):
          pruned[r, j:j + m] = _lowest(sal[r], m - n)
      q = np.where(pruned[:, j], 0.0, w[:, j])
      err = (w[:, j] - q) / u[j, j]
      w[:, j:] -= np.outer(err, u[j, j:])
      w[:, j] = q
  return w, pruned


def magnitude_ref(w, count, *, per_row=False, n_m=None):
  a = np.abs(w)
  if n_m is not None:
    n, m = n_m
    flags = np.stack([_lowest(g, m - n) for g in a.reshape(-1, m)]).reshape(w.shape)
  elif per_row:
    flags = np.stack([_lowest(r, count) for r in a])
  else:
    flags = _lowest(a.reshape(-1), count).reshape(w.shape)
  return np.where(flags, 0.0, w)


def recon_error(w, new, h):
  d = np.asarray(w, np.float64) - np.asarray(new, np.float64)
  return float(np.trace(d @ h @ d.T))


def _correlated_x(rng, n, k):
  return rng.normal(size=(n, k)) @ rng.normal(size=(k, k)) * 0.4 + rng.normal(size=(n, k))


# ----------------------------------------------------------------------------------------------
# SparseGPT on random layers.
# ----------------------------------------------------------------------------------------------

LAYERS = [  # (outputs E, inputs K, blocksize, mode)
    (24, 40, 16, "layerwise"), (16, 37, 16, "layerwise"), (24, 40, 16, "row"),
    (24, 40, 8, "2:4"), (12, 64, 128, "layerwise"), (32, 20, 8, "row")]


@pytest.mark.parametrize("e,k,bs,mode", LAYERS)
def test_sparsegpt_layer_equals_float64_algorithm_and_beats_magnitude(e, k, bs, mode):
  rng = np.random.default_rng(e * k + bs)
  x = _correlated_x(rng, 3 * k, k)
  if k == 37:
    x[:, 5] = 0.0  # a dead input: H_jj = 0
  w, h = rng.normal(size=(e, k)), x.T @ x
  per_row, n_m = mode == "row", ((2, 4) if mode == "2:4" else None)
  count = round(0.6 * (k if per_row else e * k))
  ref_w, ref_pruned = sparsegpt_ref(w, h, count, blocksize=bs, per_row=per_row, n_m=n_m)
  counts = pt._block_counts((1, k, e), count, per_row, bs)
  got_w, got_pruned = pt.obs_prune(jnp.asarray(w[None], jnp.float32),
                                   jnp.asarray(h[None], jnp.float32), counts, 0.01,
                                   blocksize=bs, per_row=per_row, n_m=n_m)
  got_w, got_pruned = np.asarray(got_w[0], np.float64), np.asarray(got_pruned[0])
  np.testing.assert_array_equal(got_pruned, ref_pruned)
  assert np.all(got_w[got_pruned] == 0.0)
  assert int(got_pruned.sum()) == (e * k // 2 if n_m else count * (e if per_row else 1))
  ref_err, got_err = recon_error(w, ref_w, h), recon_error(w, got_w, h)
  assert abs(got_err - ref_err) <= 1e-5 * ref_err, (got_err, ref_err)
  mag_err = recon_error(w, magnitude_ref(w, count, per_row=per_row, n_m=n_m), h)
  assert got_err < mag_err, (got_err, mag_err)


# ----------------------------------------------------------------------------------------------
# The whole pipeline on a plain-dict MLP: (in, out) and (out, in) layouts, padding rows.
# ----------------------------------------------------------------------------------------------

D, H1, H2, C = 24, 32, 16, 4


def _mlp(params, x):
  h = jnp.tanh(x @ params["l1"]["w"] + params["l1"]["b"])
  h = jnp.tanh(h @ params["l2"]["weight"].T + params["l2"]["bias"])  # (out, in), PyTorch-like
  return h @ params["head"]["kernel"]


def _mlp_params(seed=0):
  ks = jax.random.split(jax.random.key(seed), 5)
  return {"l1": {"w": jax.random.normal(ks[0], (D, H1)) / np.sqrt(D),
                 "b": 0.1 * jax.random.normal(ks[1], (H1,))},
          "l2": {"weight": jax.random.normal(ks[2], (H2, H1)) / np.sqrt(H1),
                 "bias": 0.1 * jax.random.normal(ks[3], (H2,))},
          "head": {"kernel": jax.random.normal(ks[4], (H2, C)) / np.sqrt(H2)}}


def _mlp_batches(num=5, rows=16, pad=3, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    x = _correlated_x(rng, rows, D).astype(np.float32)
    mask = np.arange(rows) < rows - pad
    x[~mask] = 100.0  # padding rows with large values: they must not count
    out.append({"x": x, "mask": mask, "id": np.arange(rows) + rows * i})
  return out


def _real_x(batches):
  return np.concatenate([b["x"][b["mask"]] for b in batches]).astype(np.float64)


def _mlp_frames(params):
  """Each layer's weight as (E outputs, K inputs), in program order, float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  return [p["l1"]["w"].T, p["l2"]["weight"], p["head"]["kernel"].T]


def _mlp_forward(frames, params, x):
  """Inputs of each layer (float64), computed with the given (possibly pruned) frames."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  a0 = x
  a1 = np.tanh(a0 @ frames[0].T + p["l1"]["b"])
  a2 = np.tanh(a1 @ frames[1].T + p["l2"]["bias"])
  return [a0, a1, a2]


def _mlp_leaves(new_frames):
  return {"l1/w": new_frames[0].T, "l2/weight": new_frames[1], "head/kernel": new_frames[2].T}


def test_sparsegpt_sequential_pipeline_equals_reference_and_beats_magnitude():
  params, batches = _mlp_params(), _mlp_batches()
  x = _real_x(batches)
  mask, new = pt.sparsegpt(jax.jit(_mlp), params, batches, 0.5, blocksize=8)
  frames, done = _mlp_frames(params), []
  for i, w in enumerate(frames):
    a = _mlp_forward(done + frames[len(done):], params, x)[i]  # inputs after the pruned layers
    h = a.T @ a
    ref_w, ref_pruned = sparsegpt_ref(w, h, round(0.5 * w.size), blocksize=8)
    got_w = _mlp_frames(new)[i]
    got_pruned = ~np.asarray(_mlp_frames(mask)[i], bool)
    np.testing.assert_array_equal(got_pruned, ref_pruned)
    ref_err, got_err = recon_error(w, ref_w, h), recon_error(w, got_w, h)
    assert abs(got_err - ref_err) <= 1e-5 * ref_err, (i, got_err, ref_err)
    assert got_err < recon_error(w, magnitude_ref(w, round(0.5 * w.size)), h), i
    np.testing.assert_allclose(got_w, ref_w, atol=2e-5)
    done.append(got_w)
  # Leaves that are not chosen are untouched and fully kept; pruned entries are exactly zero.
  np.testing.assert_array_equal(new["l1"]["b"], params["l1"]["b"])
  assert bool(jnp.all(mask["l2"]["bias"]))
  for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(new)):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def _wanda_ref_mask(w, norms_sq, sparsity, scope, n_m=None):
  s = np.abs(w) * np.sqrt(norms_sq)[None, :]
  e, k = w.shape
  if n_m is not None:
    n, m = n_m
    return np.stack([_lowest(g, m - n) for g in s.reshape(-1, m)]).reshape(w.shape)
  if scope == "row":
    return np.stack([_lowest(r, round(sparsity * k)) for r in s])
  return _lowest(s.reshape(-1), round(sparsity * e * k)).reshape(w.shape)


@pytest.mark.parametrize("scope,sparsity,sequential", [
    ("row", 0.5, True), ("layerwise", 0.6, True), ("row", "2:4", True), ("row", 0.7, False)])
def test_wanda_mask_equals_numpy_reference_exactly(scope, sparsity, sequential):
  params, batches = _mlp_params(1), _mlp_batches(seed=1)
  x = _real_x(batches)
  mask = pt.wanda(jax.jit(_mlp), params, batches, sparsity, scope=scope, sequential=sequential)
  n_m = (2, 4) if sparsity == "2:4" else None
  frames, done = _mlp_frames(params), []
  for i, w in enumerate(frames):
    a = _mlp_forward(done + frames[len(done):] if sequential else frames, params, x)[i]
    ref = _wanda_ref_mask(w, np.sum(a * a, axis=0), sparsity, scope, n_m)
    np.testing.assert_array_equal(~np.asarray(_mlp_frames(mask)[i], bool), ref)
    done.append(np.where(ref, 0.0, w))


def test_wanda_scores_and_layer_errors_equal_numpy():
  params, batches = _mlp_params(2), _mlp_batches(seed=2)
  x = _real_x(batches)
  frames = _mlp_frames(params)
  acts = _mlp_forward(frames, params, x)
  scores = pt.wanda_scores(jax.jit(_mlp), params, batches)
  for i, (w, a) in enumerate(zip(frames, acts)):
    ref = np.abs(w) * np.sqrt(np.sum(a * a, axis=0))[None, :]
    np.testing.assert_allclose(_mlp_frames(scores)[i], ref, rtol=1e-5)
  assert float(jnp.sum(scores["l1"]["b"])) == 0.0
  mask = masks.magnitude(params, 0.5, scope="layerwise", filter_fn=pt.linear_filter_fn)
  errors = pt.layer_errors(jax.jit(_mlp), params, masks.apply_mask(params, mask), batches)
  assert list(errors) == ["l1/w", "l2/weight", "head/kernel"]
  for (name, got), w, new, a in zip(errors.items(), frames, _mlp_frames(
      masks.apply_mask(params, mask)), acts):
    ref = np.sum((a @ (w - new).T) ** 2) / np.sum((a @ w.T) ** 2)
    assert abs(got - ref) <= 1e-5 * ref, (name, got, ref)


def test_global_scope_prunes_exact_total_and_follows_the_scores():
  params, batches = _mlp_params(3), _mlp_batches(seed=3)
  mask = pt.wanda(jax.jit(_mlp), params, batches, 0.6, scope="global", sequential=False)
  n = D * H1 + H1 * H2 + H2 * C
  assert sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(mask)) == round(0.6 * n)
  scores = pt.wanda_scores(jax.jit(_mlp), params, batches)
  pruned = np.concatenate([np.asarray(s)[~np.asarray(m)].ravel() for s, m in
                           zip(jax.tree.leaves(scores), jax.tree.leaves(mask))])
  flags = masks.core.prunable_leaves(params, pt.linear_filter_fn)[1]
  kept = np.concatenate([np.asarray(s)[np.asarray(m)].ravel() for s, m, f in
                         zip(jax.tree.leaves(scores), jax.tree.leaves(mask), flags) if f])
  assert sum(flags) == 3
  assert pruned.max() <= kept.min()
  m2, p2 = pt.sparsegpt(jax.jit(_mlp), params, batches, 0.6, scope="global", blocksize=8)
  assert sum(int((~np.asarray(m)).sum()) for m in jax.tree.leaves(m2)) == round(0.6 * n)
  # Same per-layer counts as Wanda's global ranking on the dense model.
  assert [int((~np.asarray(a)).sum()) for a in jax.tree.leaves(m2)] == [
      int((~np.asarray(a)).sum()) for a in jax.tree.leaves(mask)]


# ----------------------------------------------------------------------------------------------
# Statistics of a Flax GPT with padding rows and padding tokens, against intercepted inputs.
# ----------------------------------------------------------------------------------------------


def _gpt():
  from prunejax.models import GPTClassifier
  return GPTClassifier(vocab_size=50, num_classes=2, context=8, depth=1, width=16, num_heads=2,
                       pad_id=0)


def _gpt_batches(num=2, rows=4, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    lengths = rng.integers(2, 9, rows)
    x = np.where(np.arange(8)[None] < lengths[:, None], rng.integers(1, 50, (rows, 8)), 0)
    out.append({"x": x.astype(np.int32), "mask": np.arange(rows) < rows - 1,
                "id": np.arange(rows) + rows * i})
  return out


def _not_pad(x):
  return x != 0


def test_calibration_statistics_equal_intercepted_dense_inputs():
  model = _gpt()
  batches = _gpt_batches()
  params = init_variables(model, jax.random.key(0), batches[0]["x"])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  cal = pt.calibrate(apply_fn, params, batches, token_mask_fn=_not_pad)

  @jax.jit  # one compile for every example (op by op, ~70 single ops compiled: 0.9 s)
  def dense_inputs(params, x):
    """Every Dense module's input in one forward pass, by module path."""
    got = {}
    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, nn.Dense):
        got["/".join(context.module.path)] = args[0]
      return next_fun(*args, **kwargs)
    with nn.intercept_methods(record):
      model.apply({"params": params}, x)
    return got

  seen = {}
  for b in batches:
    for i in np.flatnonzero(b["mask"]):  # one real example at a time
      keep = b["x"][i] != 0
      for name, a in dense_inputs(params, b["x"][i:i + 1]).items():
        a = np.asarray(a, np.float64)[0]
        seen.setdefault(name, []).append(a[keep] if a.ndim == 2 else a[None])
  for name, stats in cal.stats.items():
    module = name.rsplit("/", 1)[0]
    a = np.concatenate(seen[module])
    np.testing.assert_allclose(np.asarray(stats.gram)[0], a.T @ a, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.norms_sq)[0], np.sum(a * a, 0), rtol=1e-5,
                               atol=1e-4)
    assert float(stats.rows) == len(a)
  assert cal.stats["block_0/attn/query/kernel"] is cal.stats["block_0/attn/value/kernel"]
  assert len({layer.group for layer in cal.layers}) == 5  # qkv, out, fc, proj, head
  np.testing.assert_array_equal(cal.ids, [0, 1, 2, 4, 5, 6])


def test_one_example_batches_calibrate_the_gpt_as_one_batch_does():
  """Batches of one example (where the GPT's last-token read traces differently) give the same
  statistics, ids and Wanda mask as the same examples in one batch."""
  model = _gpt()
  (big,) = _gpt_batches(num=1, rows=3)
  big["mask"][:] = True
  params = init_variables(model, jax.random.key(0), big["x"])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  ones = [{k: v[i:i + 1] for k, v in big.items()} for i in range(3)]
  ones[1]["mask"][:] = False  # a padding row alone: counts nothing
  together = {k: v[[0, 2]] for k, v in big.items()}
  cal_1 = pt.calibrate(apply_fn, params, ones, token_mask_fn=_not_pad)
  cal_2 = pt.calibrate(apply_fn, params, [together], token_mask_fn=_not_pad)
  np.testing.assert_array_equal(cal_1.ids, [0, 2])
  np.testing.assert_array_equal(cal_2.ids, [0, 2])
  assert set(cal_1.stats) == set(cal_2.stats) and len(cal_1.layers) == len(cal_2.layers) > 0
  for name, s2 in cal_2.stats.items():
    s1 = cal_1.stats[name]
    assert float(s1.rows) == float(s2.rows) > 0
    np.testing.assert_allclose(s1.gram, s2.gram, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(s1.norms_sq, s2.norms_sq, rtol=1e-5, atol=1e-5)
  m1 = pt.wanda(apply_fn, params, ones, 0.5, token_mask_fn=_not_pad)
  m2 = pt.wanda(apply_fn, params, [together], 0.5, token_mask_fn=_not_pad)
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------------------------
# Convolutions (both layouts, feature groups) and a fused weight sliced into three layers.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
def test_wanda_on_grouped_conv_equals_im2col_reference(layout):
  rng = np.random.default_rng(4)
  g, cin, cout, kh, kw = 2, 4, 6, 3, 2
  kernel_hwio = rng.normal(size=(kh, kw, cin // g, cout)).astype(np.float32)
  x_nhwc = rng.normal(size=(3, 5, 6, cin)).astype(np.float32)
  if layout == "NHWC":
    params, x, dn = {"conv": {"kernel": kernel_hwio}}, x_nhwc, ("NHWC", "HWIO", "NHWC")
  else:
    params = {"conv": {"weight": np.transpose(kernel_hwio, (3, 2, 0, 1))}}  # OIHW
    x, dn = np.transpose(x_nhwc, (0, 3, 1, 2)), ("NCHW", "OIHW", "NCHW")

  def apply_fn(p, x):
    w = p["conv"]["kernel" if layout == "NHWC" else "weight"]
    y = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (0, 1)), dimension_numbers=dn,
                                     feature_group_count=g)
    return y.reshape(y.shape[0], -1)

  mask = pt.wanda(apply_fn, params, [{"x": x}], 0.5)
  # im2col by hand: patch (kh, kw, c of group) of every output position of every example.
  xp = np.pad(x_nhwc.astype(np.float64), ((0, 0), (1, 1), (0, 1), (0, 0)))
  norms = np.zeros((g, kh * kw * (cin // g)))
  for i in range(5):
    for j in range(6):
      patch = xp[:, i:i + kh, j:j + kw, :].reshape(3, kh, kw, g, cin // g)
      for gg in range(g):
        norms[gg] += np.sum(patch[:, :, :, gg].reshape(3, -1) ** 2, axis=0)
  eg = cout // g
  ref = np.zeros(kernel_hwio.shape, bool)
  for o in range(cout):
    w = kernel_hwio[..., o].reshape(-1).astype(np.float64)
    ref[..., o] = _lowest(np.abs(w) * np.sqrt(norms[o // eg]), round(0.5 * w.size)).reshape(
        kh, kw, cin // g)
  got = ~np.asarray(jax.tree.leaves(mask)[0])
  if layout == "NCHW":
    got = np.transpose(got, (2, 3, 1, 0))
  np.testing.assert_array_equal(got, ref)


def test_fused_weight_sliced_into_layers_equals_separate_leaves():
  rng = np.random.default_rng(5)
  fused = {"wqkv": rng.normal(size=(8, 24)).astype(np.float32),
           "head": {"kernel": rng.normal(size=(24, 2)).astype(np.float32)}}
  split = {"wq": fused["wqkv"][:, :8], "wk": fused["wqkv"][:, 8:16], "wv": fused["wqkv"][:, 16:],
           "head": fused["head"]}

  def f_fused(p, x):
    w = p["wqkv"]
    q, k, v = x @ w[:, :8], jnp.tanh(x @ w[:, 8:16]), x @ w[:, 16:]
    return jnp.concatenate([q, k, v], -1) @ p["head"]["kernel"]

  def f_split(p, x):
    q, k, v = x @ p["wq"], jnp.tanh(x @ p["wk"]), x @ p["wv"]
    return jnp.concatenate([q, k, v], -1) @ p["head"]["kernel"]

  batches = [{"x": rng.normal(size=(32, 8)).astype(np.float32)}]
  cal = pt.calibrate(f_fused, fused, batches)
  assert [layer.name for layer in cal.layers] == ["wqkv#0", "wqkv#1", "wqkv#2", "head/kernel"]
  m1, p1 = pt.sparsegpt(f_fused, fused, batches, 0.5, blocksize=4)
  m2, p2 = pt.sparsegpt(f_split, split, batches, 0.5, blocksize=4)
  np.testing.assert_array_equal(m1["wqkv"], np.concatenate([m2["wq"], m2["wk"], m2["wv"]], 1))
  np.testing.assert_allclose(p1["wqkv"], np.concatenate([p2["wq"], p2["wk"], p2["wv"]], 1),
                             atol=1e-6)
  np.testing.assert_allclose(p1["head"]["kernel"], p2["head"]["kernel"], atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bad input: one-line errors.
# ----------------------------------------------------------------------------------------------


def test_bad_input_gives_one_line_errors():
  params, batches = _mlp_params(), _mlp_batches(num=1)
  f = jax.jit(_mlp)
  cases = [
      (lambda: pt.wanda(f, params, batches, 1.5), ConfigError, "out of range"),
      (lambda: pt.wanda(f, params, batches, "4:2"), ConfigError, "'N:M'"),
      (lambda: pt.wanda(f, params, batches, "1:3"), ConfigError, "not divisible by M=3"),
      (lambda: pt.wanda(f, params, batches, 0.5, scope="neuron"), ConfigError, "scope"),
      (lambda: pt.wanda(f, params, [], 0.5), DataError, "empty"),
      (lambda: pt.wanda(f, params, batches + _mlp_batches(num=1, rows=8), 0.5), DataError,
       "different shapes"),
      (lambda: pt.sparsegpt(f, params, batches, 0.5, damp=0.0), ConfigError, "damp"),
      (lambda: pt.sparsegpt(f, params, batches, "2:4", blocksize=6), ConfigError, "blocksize"),
      (lambda: pt.wanda(f, params, batches, 0.5, filter_fn=lambda p, l: False), ConfigError,
       "selects none"),
      (lambda: pt.wanda(f, params, batches, 0.5, scope="global", distribution="erk"),
       ConfigError, "distribution"),
  ]
  for call, error, text in cases:
    with pytest.raises(error, match=text) as info:
      call()
    assert "\n" not in str(info.value)
  # A chosen leaf that is not a dense or conv weight: an embedding, a weight used twice.
  model = _gpt()
  gpt_batches = _gpt_batches(num=1)
  gpt_params = init_variables(model, jax.random.key(0), gpt_batches[0]["x"])["params"]
  with pytest.raises(ConfigError, match=r"wte/embedding is an embedding lookup.*filter_fn"):
    pt.wanda(lambda p, x: model.apply({"params": p}, x), gpt_params, gpt_batches, 0.5,
             filter_fn=masks.make_filter_fn())
  tied = {"w": params["l1"]["w"][:, :D]}
  with pytest.raises(ConfigError, match="w is used outside one dense or conv layer"):
    pt.wanda(lambda p, x: (x @ p["w"]) @ p["w"], tied, batches, 0.5)


def test_nan_in_calibration_or_params_is_refused_naming_the_ids():
  # Wanda used to return a 50% mask ranked on NaN scores, SparseGPT to advise "raise damp".
  params, batches = _mlp_params(), _mlp_batches(num=2)
  f = jax.jit(_mlp)
  bad = [dict(b) for b in batches]
  bad[1]["x"] = bad[1]["x"].copy()
  bad[1]["x"][4, 2] = np.nan
  bad[1]["x"][6, 0] = np.inf
  for call in (lambda: pt.wanda(f, params, bad, 0.5), lambda: pt.sparsegpt(f, params, bad, 0.5),
               lambda: pt.wanda_scores(f, params, bad), lambda: pt.sparsegpt_scores(f, params, bad),
               lambda: pt.calibrate(f, params, bad),
               lambda: masks.METHODS["wanda"].mask(params, 0.5, masks.MaskInputs(f, bad[1]))):
    with pytest.raises(DataError, match=r"'x' has NaN or inf in 2 real rows \(ids \[20, 22\]\)"):
      call()
  # NaN on a padding row (mask False) counts for nothing: the same mask as without it.
  pad = [dict(b) for b in batches]
  pad[0]["x"] = pad[0]["x"].copy()
  pad[0]["x"][~pad[0]["mask"]] = np.nan
  ref = pt.wanda(f, params, batches, 0.5)
  got = pt.wanda(f, params, pad, 0.5)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  nan_params = jax.tree.map(lambda p: p, params)
  nan_params["l2"]["weight"] = nan_params["l2"]["weight"].at[0, 0].set(jnp.nan)
  with pytest.raises(DataError, match=r"params leaf l2/weight has NaN or inf"):
    pt.sparsegpt(f, nan_params, batches, 0.5)
  with pytest.raises(DataError, match=r"'mask' must be bool\[B\]"):
    pt.wanda(f, params, [dict(batches[0], mask=batches[0]["mask"].astype(np.int32))], 0.5)


def test_calibration_batch_of_the_wrong_shape_is_one_data_error():
  params, batches = _mlp_params(), _mlp_batches(num=1)
  f = jax.jit(_mlp)
  wrong = [dict(batches[0], x=batches[0]["x"][:, :D - 3])]
  for call in (lambda: pt.wanda(f, params, wrong, 0.5), lambda: pt.sparsegpt(f, params, wrong, 0.5),
               lambda: pt.calibrate(f, params, wrong)):
    with pytest.raises(DataError, match=r"apply_fn\(params, x\) fails on a batch x of shape "
                       r"\(16, 21\).*does the batch match") as info:
      call()
    assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------------------------
# Memory of a GPT-2-small-shaped model, from shapes alone.
# ----------------------------------------------------------------------------------------------


def test_gpt2_small_calibration_statistics_fit_in_half_a_gigabyte():
  from prunejax.models import GPTClassifier
  model = GPTClassifier(vocab_size=50257, num_classes=2, context=1024, depth=12, width=768,
                        num_heads=12)
  x = jax.ShapeDtypeStruct((2, 1024), jnp.int32)
  params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((2, 1024), jnp.int32)),
                          jax.random.key(0))["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  sgpt = pt.calibration_nbytes(apply_fn, params, x)
  wanda = pt.calibration_nbytes(apply_fn, params, x, gram=False)
  # The largest input group is mlp_proj's 3072 inputs: one 3072 x 3072 float32 Gram matrix.
  assert sgpt["largest_group"] == 4 * (3072 * 3073 + 1)
  assert sgpt["largest_group"] <= 0.5e9 and wanda["all_groups"] <= 0.5e9
  # What calibrating every layer at once would hold (12 x (3 x 768^2 + 3072^2) + head): over
  # 0.5 GB, hence the layer-sequential statistics.
  assert sgpt["all_groups"] == 4 * (12 * (3 * 768 * 769 + 3072 * 3073 + 4) + 768 * 769 + 1)
  assert sgpt["all_groups"] > 0.5e9
  # The analytic sizes are the shapes the compiled pass returns (one group, traced abstractly).
  shapes = jax.eval_shape(lambda p, b: pt._batch_stats(
      p, b, apply_fn=apply_fn, reps=(pt._analyse(apply_fn, params, x, None, "t").groups[3][0],),
      gram=True, token_mask_fn=None), params, {"x": x})
  assert sum(math.prod(s.shape) * 4 for s in jax.tree.leaves(shapes)) == sgpt["largest_group"]
  # SparseGPT's own working set on that layer (768 outputs x 3072 inputs), compiled.
  compiled = pt.obs_prune.lower(jax.ShapeDtypeStruct((1, 768, 3072), jnp.float32),
                                jax.ShapeDtypeStruct((1, 3072, 3072), jnp.float32),
                                jax.ShapeDtypeStruct((1, 24), jnp.int32), 0.01).compile()
  mem = compiled.memory_analysis()
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
           - mem.alias_size_in_bytes)
  assert total <= 0.5e9, total


# ----------------------------------------------------------------------------------------------
# Sharded over 8 devices equals one device.
# ----------------------------------------------------------------------------------------------


def test_sharded_over_8_devices_equals_one_device(on_devices):
  got = on_devices(f"""
      import json, sys, jax, numpy as np
      sys.path.insert(0, {repr(__file__.rsplit('/', 1)[0])})
      from prunejax import parallel
      from prunejax.masks import posttraining as pt
      from test_posttraining import _gpt, _gpt_batches, _not_pad, init_variables
      model = _gpt()
      batches = _gpt_batches(num=2, rows=16)
      params = init_variables(model, jax.random.key(0), batches[0]["x"])["params"]
      apply_fn = lambda p, x: model.apply({{"params": p}}, x)
      one = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
      out = {{}}
      for name, mesh in (("one", one), ("eight", parallel.data_mesh())):
        p = parallel.replicate(params, mesh)
        cal = pt.calibrate(apply_fn, p, batches, token_mask_fn=_not_pad, mesh=mesh)
        # One pass (sequential=False) keeps the compiles few; the taps and sums are the same.
        sm, sp = pt.sparsegpt(apply_fn, p, batches, 0.6, blocksize=8, token_mask_fn=_not_pad,
                              mesh=mesh, sequential=False)
        out[name] = (cal, sm, sp)
      (c1, m1, p1), (c8, m8, p8) = out["one"], out["eight"]
      rel = lambda a, b: float(np.max(np.abs(np.asarray(a) - np.asarray(b)))
                               / (np.max(np.abs(np.asarray(a))) + 1e-12))
      diff = lambda a, b: int(sum(np.sum(np.asarray(x) != np.asarray(y))
                                  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
      print(json.dumps({{
          "devices": jax.device_count(),
          "gram": max(rel(c1.stats[k].gram, c8.stats[k].gram) for k in c1.stats),
          "norms": max(rel(c1.stats[k].norms_sq, c8.stats[k].norms_sq) for k in c1.stats),
          "rows": [float(c1.stats[k].rows) - float(c8.stats[k].rows) for k in c1.stats],
          "ids": [c1.ids.tolist(), c8.ids.tolist()], "sparsegpt_mask": diff(m1, m8),
          "sparsegpt_params": max(rel(a, b) for a, b in zip(jax.tree.leaves(p1),
                                                            jax.tree.leaves(p8)))}}))
  """)
  assert got["devices"] == 8
  assert got["gram"] <= 1e-6 and got["norms"] <= 1e-6 and not any(got["rows"]), got
  assert got["ids"][0] == got["ids"][1] and len(got["ids"][0]) == 30
  assert got["sparsegpt_mask"] == 0, got
  # The updates go through H^-1 (nearly singular after a LayerNorm), which magnifies the ~3e-7
  # differences of the summation order; observed 3e-5 of each leaf's largest entry.
  assert got["sparsegpt_params"] <= 1e-4, got
