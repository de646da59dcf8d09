"""Mixed precision, gradient accumulation and rematerialization: bfloat16 models against float32
ones, accumulated steps against the large-batch step and an explicit per-example reference, float16
loss scaling, masks and the masked optimizer on bfloat16 trees, scores from bfloat16 models, and
bfloat16 runs of the digits and Rotten Tomatoes quick configs against the float32 runs' spread."""

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax import masks, online, optim, train
from prunejax.errors import ConfigError
from prunejax.models import ResNet, build_model, init_variables, make_apply_fn

# Tiny versions of the four model families, with an input batch each. The ResNet has one block
# per stage at ResNet-20's widths / 4: the same stem, BatchNorm, stride-2 blocks with projection
# shortcuts, rematerialized blocks and dtypes as a ResNet-20, with a third of its layers to compile.
MODELS = {
    "mlp": (dict(hidden=(16, 8)), lambda k: jax.random.normal(k, (6, 8, 8, 1))),
    "cnn": (dict(features=(4, 8), dense=16), lambda k: jax.random.normal(k, (6, 8, 8, 1))),
    "resnet": (dict(stage_sizes=(1, 1, 1), stage_widths=(4, 8, 16)),
               lambda k: jax.random.normal(k, (6, 8, 8, 3))),
    "gpt": (dict(vocab_size=50, context=8, depth=2, width=16, num_heads=2),
            lambda k: jax.random.randint(k, (6, 8), 1, 50).at[:2, 6:].set(0)),
}


def _model(name, **fields):
  kw, make_x = MODELS[name]
  model = ResNet(5, **kw, **fields) if name == "resnet" else build_model(name, 5, **kw, **fields)
  return model, make_x(jax.random.key(0))


def _tree_close(a, b, *, rtol, atol, atol_of_scale=False):
  """``atol_of_scale``: ``atol`` is relative to each leaf's largest magnitude (float32 rounding of
  the leaf's own scale, which differs between two compilations of the same sums)."""
  def close(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    scale = max(1.0, float(np.abs(u).max(initial=0.0))) if atol_of_scale else 1.0
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol * scale)
  jax.tree.map(close, a, b)


# ----------------------------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_bfloat16_model_computes_in_bfloat16_with_float32_params_and_logits(name):
  m32, x = _model(name)
  m16, _ = _model(name, compute_dtype="bfloat16")
  v = init_variables(m32, jax.random.key(1), x)
  # Same parameter tree, all float32, whatever the compute dtype (traced, not run).
  v16 = jax.eval_shape(lambda k: init_variables(m16, k, x), jax.random.key(1))
  assert jax.tree.structure(v16) == jax.tree.structure(v)
  assert {l.dtype for l in jax.tree.leaves(v16)} == {jnp.dtype(jnp.float32)}
  # Compiled, one program (op by op, the GPT's first call took most of a minute on a small CPU).
  logits32, logits16 = jax.jit(lambda v: (make_apply_fn(m32)(v, x), make_apply_fn(m16)(v, x)))(v)
  assert logits16.dtype == jnp.float32
  # bfloat16 has an 8-bit mantissa: close to float32, but not equal (it did compute in bf16).
  logits32, logits16 = np.asarray(logits32, np.float64), np.asarray(logits16, np.float64)
  assert 0 < np.abs(logits16 - logits32).max() < 0.05 * np.abs(logits32).max() + 0.02
  # The matrix multiplies (Dense layers) return bfloat16 (their dtypes: traced, not run).
  _, state = jax.eval_shape(lambda v, x: m16.apply(
      v, x, capture_intermediates=lambda mdl, _: isinstance(mdl, nn_dense()),
      mutable=["intermediates"]), v, x)
  outs = jax.tree.leaves(state["intermediates"])
  assert outs and all(o.dtype == jnp.bfloat16 for o in outs)


def nn_dense():
  import flax.linen as nn
  return nn.Dense


def test_param_dtype_sets_the_params_dtype():
  model, x = _model("gpt", compute_dtype="bfloat16", param_dtype="bfloat16")
  # Dtypes only: traced, not run.
  v = jax.eval_shape(lambda k: init_variables(model, k, x), jax.random.key(0))
  assert {l.dtype for l in jax.tree.leaves(v)} == {jnp.dtype(jnp.bfloat16)}
  assert jax.eval_shape(make_apply_fn(model), v, x).dtype == jnp.float32


def test_bad_dtype_and_remat_are_one_line_errors():
  with pytest.raises(ConfigError, match=r"model.compute_dtype='float8' is not allowed; choose one "
                     r"of: 'float32', 'bfloat16', 'float16'") as e:
    build_model("mlp", 3, compute_dtype="float8")
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match=r"model.param_dtype='int8' is not allowed"):
    build_model("gpt", 3, param_dtype="int8")
  with pytest.raises(ConfigError, match=r"model.remat=True is not supported by model 'mlp'; "
                     r"rematerialization is per block of: 'resnet18', 'resnet20', 'gpt'"):
    build_model("mlp", 3, remat=True)
  build_model("cnn", 3, remat=False)  # False is every model's default
  from prunejax.models import MLP
  with pytest.raises(ConfigError, match=r"MLP.compute_dtype='int32' is not allowed"):
    MLP(compute_dtype="int32").init(jax.random.key(0), jnp.ones((1, 4)))


def _loss_fn(model, variables, x, y):
  """The mean training loss as a function of the params (BatchNorm in train mode)."""
  has_bn = "batch_stats" in variables

  def loss(p):
    if has_bn:
      logits, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x,
                              train=True, mutable=["batch_stats"])
    else:
      logits = model.apply({"params": p}, x, train=True)
    return train.per_example_ce(logits, y).mean()

  return loss


@pytest.mark.parametrize("name", ["resnet", "gpt"])
@pytest.mark.parametrize("compute_dtype", [None, "bfloat16"])
def test_remat_gives_the_same_outputs_and_gradients_and_stores_less(name, compute_dtype):
  plain, x = _model(name, compute_dtype=compute_dtype)
  remat, _ = _model(name, compute_dtype=compute_dtype, remat=True)
  v = init_variables(plain, jax.random.key(1), x)
  v_remat = jax.eval_shape(lambda k: init_variables(remat, k, x), jax.random.key(1))  # structure
  assert jax.tree.structure(v_remat) == jax.tree.structure(v)
  y = np.arange(6, dtype=np.int32) % 5
  loss_p, loss_r = _loss_fn(plain, v, x, y), _loss_fn(remat, v, x, y)
  # Compiled, as training runs them (op by op, ResNet-20's gradients took minutes on a small CPU):
  # one program per model for its logits and its gradient.
  grad_p, grad_r = jax.jit(jax.grad(loss_p)), jax.jit(jax.grad(loss_r))
  (logits_p, g_plain), (logits_r, g_remat) = (
      jax.jit(lambda v, m=m, grad=grad: (make_apply_fn(m)(v, x), grad(v["params"])))(v)
      for m, grad in ((plain, grad_p), (remat, grad_r)))
  np.testing.assert_allclose(logits_p, logits_r, rtol=1e-6, atol=1e-6)
  # 1e-6 of each leaf's scale: a GPT gradient leaf of magnitude 14 is summed in another order once
  # rematerialized (3e-6 apart in an entry of 0.14 with XLA:CPU's elemental emitters).
  _tree_close(g_plain, g_remat, rtol=1e-5, atol=1e-6, atol_of_scale=True)
  # The backward pass keeps fewer bytes of activations (the residuals of the VJP).
  (bytes_r, _), (bytes_p, _) = (_residuals_and_grad(loss, v["params"]) for loss in (loss_r, loss_p))
  assert bytes_r < 0.7 * bytes_p
  # The gradients' equations (their traces above, from JAX's cache).
  remats = lambda grad: sum(e.primitive.name in ("checkpoint", "remat2")
                            for e in _equations(grad.trace(v["params"]).jaxpr.jaxpr))
  assert remats(grad_r) >= remats(grad_p) + 2  # one per block (and none lost)


def _residuals_and_grad(loss, params):
  """Bytes of what the backward pass of ``loss`` keeps from its forward pass, and the shapes and
  dtypes of its gradient (one trace, nothing runs)."""
  def residuals_and_grad(p):
    loss_value, vjp_fn = jax.vjp(loss, p)
    return jax.tree.leaves(vjp_fn), vjp_fn(jnp.ones_like(loss_value))[0]
  leaves, grad = jax.eval_shape(residuals_and_grad, params)
  return sum(math.prod(l.shape) * l.dtype.itemsize for l in leaves), grad


@pytest.mark.parametrize("name,kw,x_shape", [
    ("gpt", dict(vocab_size=64, context=32, depth=2, width=64, num_heads=4), (32, 32)),
    ("resnet18", dict(width_multiplier=0.125), (16, 16, 16, 3)),
])
def test_bfloat16_backward_keeps_under_60_percent_of_the_float32_activation_bytes(name, kw,
                                                                                 x_shape):
  # Shapes and dtypes only, nothing runs: any inputs and variables of the right shapes will do.
  rng = np.random.default_rng(0)
  x = (rng.integers(1, 64, x_shape).astype(np.int32) if name == "gpt"
       else rng.normal(size=x_shape).astype(np.float32))
  y = np.zeros(x_shape[0], np.int32)
  m32, m16 = build_model(name, 2, **kw), build_model(name, 2, compute_dtype="bfloat16", **kw)
  v = jax.tree.map(lambda l: np.zeros(l.shape, l.dtype), jax.eval_shape(
      lambda k: init_variables(m32, k, x[:1]), jax.random.key(1)))
  loss32, loss16 = _loss_fn(m32, v, x, y), _loss_fn(m16, v, x, y)
  # Float32 LayerNorm / BatchNorm statistics and softmax are recomputed, not stored in float32.
  (bytes16, g16), (bytes32, _) = (_residuals_and_grad(l, v["params"]) for l in (loss16, loss32))
  assert bytes16 < 0.6 * bytes32
  assert {g.dtype for g in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_norm_statistics_and_softmax_are_float32():
  model, x = _model("resnet", compute_dtype="bfloat16")
  v = init_variables(model, jax.random.key(1), x)
  # Compiled with every bfloat16 rounding kept, as op by op (XLA's default may skip roundings).
  _, upd = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                   compiler_options={"xla_allow_excess_precision": False})(v, x)
  assert {l.dtype for l in jax.tree.leaves(upd)} == {jnp.dtype(jnp.float32)}
  # The running mean is the float32 mean of the bfloat16 stem convolution's output.
  stem = jax.lax.conv_general_dilated(
      x.astype(jnp.bfloat16), v["params"]["stem"]["kernel"].astype(jnp.bfloat16), (1, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref = 0.1 * np.asarray(stem, np.float64).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(upd["batch_stats"]["stem_bn"]["bn"]["mean"], ref, rtol=1e-5,
                             atol=1e-7)
  # In the forward pass of a bfloat16 GPT every exponential, maximum, reciprocal square root and
  # sum (softmax, LayerNorm statistics, the loss) runs in float32; the matrix multiplies in bf16.
  gpt, tokens = _model("gpt", compute_dtype="bfloat16")
  vg = jax.eval_shape(lambda k: init_variables(gpt, k, tokens), jax.random.key(1))  # traced only
  loss = _loss_fn(gpt, vg, tokens, np.arange(6, dtype=np.int32) % 5)
  eqns = _equations(jax.make_jaxpr(loss)(vg["params"]).jaxpr)
  float_in = lambda names: {str(v.aval.dtype) for e in eqns if e.primitive.name in names
                            for v in e.invars if jnp.issubdtype(v.aval.dtype, jnp.floating)}
  assert sum(e.primitive.name in ("exp", "rsqrt") for e in eqns) >= 2 * 2 + 1
  assert float_in(("exp", "reduce_max", "rsqrt", "reduce_sum", "log")) == {"float32"}
  assert float_in(("dot_general",)) == {"bfloat16"}


def _equations(jaxpr):
  """Every equation of ``jaxpr`` and of the jaxprs nested in it (jit, checkpoint, custom rules)."""
  out = []
  for eqn in jaxpr.eqns:
    out.append(eqn)
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          out += _equations(inner)
  return out


# ----------------------------------------------------------------------------------------------
# Gradient accumulation.
# ----------------------------------------------------------------------------------------------


def _state(accumulation_steps=1, tx=None):
  return train.create_train_state(build_model("mlp", 3, hidden=(8,)),
                                  tx or optax.sgd(0.5, momentum=0.9), jax.random.key(0),
                                  jnp.zeros((1, 4)), accumulation_steps=accumulation_steps)


def _mlp_batch(n=16, n_real=13, weights=True, seed=1):
  k = jax.random.split(jax.random.key(seed), 3)
  batch = {"x": jax.random.normal(k[0], (n, 4)), "y": jax.random.randint(k[1], (n,), 0, 3),
           "id": jnp.arange(n), "mask": jnp.arange(n) < n_real}
  if weights:
    batch["weight"] = jax.random.uniform(k[2], (n,), minval=0.5, maxval=2.0)
  return batch


def _step_twice(state, batch):
  step = jax.jit(train.train_step_with_losses)
  state, m1, _ = step(state, batch)
  state, m2, ce = step(state, batch)  # a second step: momentum from the first one
  return state, m2, ce


@pytest.mark.parametrize("n,n_real", [(16, 13), (10, 10), (10, 3)])
def test_accumulating_4_micro_batches_equals_the_4x_batch_step(n, n_real):
  """With padding rows, InfoBatch-style weights and a batch size that is not a multiple of 4
  (the step pads it); (10, 3): micro-batch 3 holds padding rows only."""
  batch = _mlp_batch(n, n_real)
  big, m_big, ce_big = _step_twice(_state(), batch)
  acc, m_acc, ce_acc = _step_twice(_state(accumulation_steps=4), batch)
  _tree_close(acc.params, big.params, rtol=1e-6, atol=1e-6)
  _tree_close(acc.opt_state, big.opt_state, rtol=1e-6, atol=1e-6)
  assert m_acc.keys() == m_big.keys()
  for k in m_big:
    assert float(m_acc[k]) == pytest.approx(float(m_big[k]), rel=1e-6, abs=1e-6), k
  real = np.asarray(batch["mask"])
  np.testing.assert_allclose(np.asarray(ce_acc)[real], np.asarray(ce_big)[real], rtol=1e-6)


def test_accumulated_gradient_matches_an_explicit_per_example_loop():
  """SGD without momentum at lr 1: the update is minus the gradient of the weighted mean over the
  real rows, here summed example by example in float64."""
  batch = _mlp_batch(12, 9)
  state = _state(accumulation_steps=4, tx=optax.sgd(1.0))
  new, _, _ = jax.jit(train.train_step_with_losses)(state, batch)
  model, params = state.model, state.params

  def ce_one(p, x_1, y):
    logits = model.apply({"params": p}, x_1)
    return -jax.nn.log_softmax(logits[0])[y]

  grad_one = jax.jit(jax.grad(ce_one))  # one compile for the nine examples (one shape)
  grads64 = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  host = jax.tree.map(np.asarray, batch)  # rows read on the host: no eager op per index
  for i in range(9):
    g = grad_one(params, host["x"][i:i + 1], host["y"][i])
    grads64 = jax.tree.map(lambda acc, gi: acc + float(host["weight"][i]) * np.asarray(gi, float),
                           grads64, g)
  expected = jax.tree.map(lambda p, g: np.asarray(p, np.float64) - g / 9, params, grads64)
  _tree_close(new.params, expected, rtol=1e-5, atol=1e-6)


def test_accumulation_with_batch_pruning_and_infobatch_equals_the_large_batch():
  batch = _mlp_batch(16, 14)
  # Batch pruning: top-k of the whole batch (k = 6, not a multiple of 4), then 4 micro-batches.
  pruner = online.BatchTopK(keep_fraction=0.375, batch_size=16)
  outs = [jax.jit(pruner.train_step)(_state(accumulation_steps=a), (), batch) for a in (1, 4)]
  _tree_close(outs[1][0].params, outs[0][0].params, rtol=1e-6, atol=1e-6)
  assert float(outs[1][2]["count"]) == float(outs[0][2]["count"]) == 6
  assert float(outs[1][2]["forward_count"]) == float(outs[0][2]["forward_count"]) == 14 + 6
  # InfoBatch: weighted rows; the losses it records under the batch's ids are the same too.
  ib = online.InfoBatch(prune_ratio=0.5)
  ib_state = ib.init(np.arange(16))
  outs = [jax.jit(ib.train_step)(_state(accumulation_steps=a), ib_state, batch) for a in (1, 4)]
  _tree_close(outs[1][0].params, outs[0][0].params, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(outs[1][1].scores_N, outs[0][1].scores_N, rtol=1e-6)
  assert not np.allclose(outs[0][1].scores_N[:14], 3.0)  # the losses were recorded


def test_accumulation_on_gpt_equals_the_large_batch_in_float32():
  model, tokens = _model("gpt")
  rows = np.arange(12, dtype=np.int32)
  batch = {"x": np.concatenate([tokens, tokens[::-1]]), "y": rows % 5, "id": rows,
           "mask": rows < 11}
  # SGD: Adam would turn the rounding of near-zero gradient entries into full-size updates.
  states = [train.create_train_state(model, optax.sgd(0.5, momentum=0.9), jax.random.key(0),
                                     tokens, accumulation_steps=a) for a in (1, 4)]
  (big, _, _), (acc, _, _) = [_step_twice(s, batch) for s in states]
  _tree_close(acc.params, big.params, rtol=1e-5, atol=1e-6)


def test_accumulation_with_batchnorm_weights_micro_batch_statistics_by_real_rows():
  """BatchNorm statistics are per micro-batch: the step's gradient is the real-row-weighted mean of
  the micro-batches' gradients and its running statistics the weighted mean of their updates, even
  when a micro-batch holds padding rows only."""
  model, _ = _model("resnet")
  x = np.asarray(jax.random.normal(jax.random.key(3), (16, 8, 8, 3)))
  rows = np.arange(16, dtype=np.int32)
  # Micro-batch m holds rows m, m + 4, m + 8, m + 12: real rows 2, 4, 4 and 0 of them.
  mask = (rows % 4 != 3) & (rows != 0) & (rows != 4)
  batch = {"x": x, "y": rows % 5, "mask": mask}
  state = train.create_train_state(model, optax.sgd(1.0), jax.random.key(0), x[:1],
                                   accumulation_steps=4)
  new, metrics, _ = jax.jit(train.train_step_with_losses)(state, batch)
  assert np.all([np.all(np.isfinite(l)) for l in jax.tree.leaves((new.params, new.batch_stats))])
  assert float(metrics["count"]) == 10 and float(metrics["grad_nonfinite"]) == 0
  plain = jax.jit(train.train_step)
  singles = [plain(state.replace(accumulation_steps=1),
                   {k: v[m::4] for k, v in batch.items()})[0] for m in range(3)]
  # The weighted mean in float64 (numpy: no eager op to compile per leaf shape).
  mean = lambda a, b, c: (2 * np.asarray(a, np.float64) + 4 * np.asarray(b, np.float64)
                          + 4 * np.asarray(c, np.float64)) / 10
  _tree_close(new.params, jax.tree.map(mean, *[s.params for s in singles]), rtol=1e-5, atol=1e-5)
  _tree_close(new.batch_stats, jax.tree.map(mean, *[s.batch_stats for s in singles]), rtol=1e-5,
              atol=1e-6)


def test_accumulation_on_a_sharded_batch_equals_one_device(on_devices):
  out = on_devices("""
    import json, jax, jax.numpy as jnp, numpy as np, optax
    from prunejax import parallel, train
    from prunejax.models import build_model
    model = build_model("mlp", 3, hidden=(8,))
    k = jax.random.split(jax.random.key(1), 2)
    batch = {"x": np.asarray(jax.random.normal(k[0], (32, 4))),
             "y": np.asarray(jax.random.randint(k[1], (32,), 0, 3)),
             "id": np.arange(32), "mask": np.arange(32) < 29}
    state = train.create_train_state(model, optax.sgd(0.5), jax.random.key(0), jnp.zeros((1, 4)),
                                     accumulation_steps=2)
    one, _ = jax.jit(train.train_step)(state, jax.tree.map(jnp.asarray, batch))
    mesh = parallel.data_mesh()
    sharded, _ = jax.jit(train.train_step)(parallel.replicate(state, mesh),
                                           parallel.shard_batch(batch, mesh))
    diff = max(float(jnp.abs(a - b).max()) for a, b in
               zip(jax.tree.leaves(one.params), jax.tree.leaves(sharded.params)))
    print(json.dumps({"devices": mesh.devices.size, "diff": diff}))
  """)
  assert out["devices"] == 8 and out["diff"] < 1e-6


def test_bad_accumulation_and_loss_scale_are_one_line_errors():
  with pytest.raises(ConfigError, match=r"train.accumulation_steps=0 is not allowed; expected a "
                     "positive integer"):
    _state(accumulation_steps=0)
  with pytest.raises(ConfigError, match=r"train.loss_scale=0.0 is out of range"):
    train.create_train_state(build_model("mlp", 3), optax.sgd(0.1), jax.random.key(0),
                             jnp.zeros((1, 4)), loss_scale=0.0)


# ----------------------------------------------------------------------------------------------
# float16 and the loss scale.
# ----------------------------------------------------------------------------------------------


def test_loss_scale_rescues_float16_gradients_that_underflow():
  """Tiny per-example weights (1e-8) make the float16 backward pass underflow to zero; a loss scale
  of 2**20 brings the gradient back to the float32 one (powers of two scale exactly). The learning
  rate 2**20 makes the tiny updates visible next to the params."""
  batch = {**_mlp_batch(8, 8, weights=False), "weight": jnp.full((8,), 1e-8)}
  tx = optax.sgd(2.0 ** 20)
  mk = lambda cd, scale: train.create_train_state(
      build_model("mlp", 3, hidden=(8,), compute_dtype=cd), tx, jax.random.key(0),
      jnp.zeros((1, 4)), loss_scale=scale)
  delta = lambda s: jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b),
                                 jax.jit(train.train_step)(s, batch)[0].params, s.params)
  ref = delta(mk("float32", 1.0))
  unscaled = delta(mk("float16", 1.0))
  scaled = delta(mk("float16", 2.0 ** 20))
  assert all(np.all(g == 0) for g in jax.tree.leaves(unscaled))  # underflow: no update at all
  ref_norm = np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(ref)))
  err = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(scaled),
                                                          jax.tree.leaves(ref))))
  assert ref_norm > 1e-3 and err < 0.02 * ref_norm
  # In float32 a power-of-two loss scale changes nothing.
  _tree_close(delta(mk("float32", 2.0 ** 10)), ref, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------------------------
# Masks and the masked optimizer on bfloat16 trees.
# ----------------------------------------------------------------------------------------------


def _reference_prune(tree, count):
  """The ``count`` prunable entries of lowest |w| in float64, ties by (leaf order, flat index)."""
  leaves, flags, treedef = masks.core.prunable_leaves(tree, None)
  keys = []
  for li, (leaf, f) in enumerate(zip(leaves, flags)):
    if f:
      a = np.abs(np.asarray(leaf, np.float64)).ravel()
      keys += [(v, li, j) for j, v in enumerate(a)]
  pruned = set((li, j) for _, li, j in sorted(keys)[:count])
  out = [np.array([(li, j) not in pruned for j in range(leaf.size)]).reshape(leaf.shape)
         if f else np.ones(leaf.shape, bool) for li, (leaf, f) in enumerate(zip(leaves, flags))]
  return jax.tree.unflatten(treedef, out)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_magnitude_masks_on_half_precision_trees_are_exact_with_ties(dtype):
  # Above the sort threshold (the radix path); multiples of 1/64: many ties at the threshold.
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(np.round(64 * rng.normal(size=shape)) / 64, dtype)
  params = {"a": {"kernel": normal(96, 128)}, "b": {"kernel": normal(64, 100), "bias": normal(100)}}
  n = 96 * 128 + 64 * 100
  assert n > masks.core._SORT_MAX
  for sparsity in (0.3, 0.77):
    got = masks.magnitude(params, sparsity)
    want = _reference_prune(params, int(round(sparsity * n)))
    kernels = [(np.abs(np.asarray(params[k]["kernel"], np.float32)), np.asarray(got[k]["kernel"]))
               for k in ("a", "b")]
    pruned_max = max(a[~m].max() for a, m in kernels)
    assert sum(np.sum(a == pruned_max) for a, _ in kernels) > 1  # a tie at the threshold
    assert any(np.any(a[m] == pruned_max) for a, m in kernels)  # split by the tie-breaking
    jax.tree.map(np.testing.assert_array_equal, got, want)
    # The same mask as on the float32 copy of the tree (the cast is exact).
    f32 = masks.magnitude(jax.tree.map(lambda l: l.astype(jnp.float32), params), sparsity)
    jax.tree.map(np.testing.assert_array_equal, got, f32)
  layer = masks.magnitude(params, 0.5, scope="layerwise")
  assert int((~layer["a"]["kernel"]).sum()) == 96 * 128 // 2
  assert int((~layer["b"]["kernel"]).sum()) == 64 * 100 // 2


@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
def test_masked_optimizer_keeps_pruned_weights_exactly_zero_in_bfloat16(param_dtype):
  """bfloat16 compute with bfloat16 or float32 params, AdamW with weight decay, 5 steps."""
  model = build_model("mlp", 3, hidden=(32,), compute_dtype="bfloat16", param_dtype=param_dtype)
  state = train.create_train_state(model, optim.masked(optax.adamw(1e-2, weight_decay=0.1)),
                                   jax.random.key(0), jnp.zeros((1, 4)))
  mask = masks.magnitude(state.params, 0.6)
  state = state.replace(params=masks.apply_mask(state.params, mask),
                        opt_state=optim.set_mask(state.opt_state, mask))
  batch = _mlp_batch(16, 16)
  before = state.params
  step = jax.jit(train.train_step)
  for _ in range(5):
    state, _ = step(state, batch)
  for p, p0, m in zip(jax.tree.leaves(state.params), jax.tree.leaves(before),
                      jax.tree.leaves(mask)):
    assert p.dtype == jnp.dtype(param_dtype)
    p, p0, m = np.asarray(p, np.float32), np.asarray(p0, np.float32), np.asarray(m)
    assert np.all(p[~m] == 0.0)
    if p.ndim == 2:  # kept kernel weights train (not all: those of dead ReLUs get no gradient)
      assert np.mean(p[m] != p0[m]) > 0.1


# ----------------------------------------------------------------------------------------------
# Scores from bfloat16 models.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_grand_and_el2n_in_bfloat16_within_1_percent_of_float32(name):
  """GraNd from a bfloat16 forward and backward pass (float32 params, float32 norm accumulation)
  against the float32 model: within 1% in relative L2 over the batch, with the same ranking of
  clearly separated examples; EL2N likewise."""
  from prunejax import scores
  m32, x = _model(name)
  m16, _ = _model(name, compute_dtype="bfloat16")
  v = init_variables(m32, jax.random.key(1), x)
  batch = {"x": x, "y": np.arange(6, dtype=np.int32) % 5, "mask": np.arange(6) < 5}
  both = lambda m: lambda v, b: [s(make_apply_fn(m), v, b) for s in (scores.grand, scores.el2n)]
  # Both scores in one program per model (op by op, ResNet-20's GraNd took over a minute). The
  # bfloat16 one keeps every bfloat16 rounding, as op by op (bitwise the op-by-op scores under the
  # tests' XLA flags, within float32 rounding of them under XLA's defaults); by default XLA fuses
  # across the roundings (a ResNet-20's GraNd then landed 1.2% from float32): this bound is for
  # the rounded path.
  s32_all = jax.jit(both(m32))(v, batch)
  s16_all = jax.jit(both(m16), compiler_options={"xla_allow_excess_precision": False})(v, batch)
  for s32, s16_arr in zip(s32_all, s16_all):
    s32 = np.asarray(s32, np.float64)
    assert s16_arr.dtype == jnp.float32
    s16 = np.asarray(s16_arr, np.float64)
    assert s16[5] == 0.0
    assert np.linalg.norm(s16 - s32) < 0.01 * np.linalg.norm(s32)
    gaps = np.abs(s32[:, None] - s32[None, :]) > 0.05 * s32.max()
    agree = np.sign(s32[:, None] - s32[None, :]) == np.sign(s16[:, None] - s16[None, :])
    assert np.all(agree[gaps])


@pytest.mark.parametrize("name", ["resnet", "gpt"])
def test_grand_handles_every_leaf_of_bfloat16_and_remat_models_as_of_the_float32_model(name):
  """The float32 islands (norms, softmax) and rematerialized blocks sit inside ``jax.checkpoint``;
  GraNd's layer taps look inside it, so no leaf falls back to per-example gradients."""
  from prunejax import scores
  m32, x = _model(name)
  v = jax.eval_shape(lambda k: init_variables(m32, k, x), jax.random.key(1))  # plans trace only
  want = scores.ghost_plan(make_apply_fn(m32), v, x).describe()
  assert "materialized" not in want.values()
  for fields in ({"compute_dtype": "bfloat16"}, {"remat": True},
                 {"compute_dtype": "bfloat16", "remat": True}):
    model, _ = _model(name, **fields)
    assert scores.ghost_plan(make_apply_fn(model), v, x).describe() == want, fields


# ----------------------------------------------------------------------------------------------
# Runs of the experiment configs.
# ----------------------------------------------------------------------------------------------


def _dense_runs(name, replicates, compute_dtype, tmp_path, **train_fields):
  from experiments import run
  cfg = importlib.import_module(f"experiments.configs.{name}").get_config("quick")
  cfg.strategies = ("dense",)
  cfg.replicates = replicates
  cfg.train.progress = False
  cfg.train.update(train_fields)
  cfg.model.compute_dtype = compute_dtype
  rows = run.run(cfg, str(tmp_path / f"{name}_{compute_dtype}"))
  return (np.array([r["test_accuracy"] for r in rows]),
          np.array([r["history"][-1]["loss"] for r in rows]))


@pytest.mark.parametrize("name,replicates", [("digits", 3), ("rotten_tomatoes", 2)])
def test_bfloat16_run_of_a_quick_config_lands_within_the_float32_spread(name, replicates,
                                                                        tmp_path):
  acc32, loss32 = _dense_runs(name, replicates, "float32", tmp_path)
  acc16, loss16 = _dense_runs(name, replicates, "bfloat16", tmp_path)
  assert not np.array_equal(loss16, loss32)  # the runs did compute in bfloat16
  n_test = {"digits": 359, "rotten_tomatoes": 128}[name]  # test examples of the quick configs
  assert abs(acc16.mean() - acc32.mean()) <= max(np.ptp(acc32), 1 / n_test)
  assert abs(loss16.mean() - loss32.mean()) <= np.ptp(loss32)


def test_config_fields_are_validated_in_one_line():
  from experiments.configs import fields
  cfg = importlib.import_module("experiments.configs.digits").get_config("quick")
  for field, value, match in [
      ("model.compute_dtype", "fp8", r"model.compute_dtype='fp8' is not allowed; choose one of"),
      ("model.remat", True, r"model.remat=True is not supported by model 'mlp'"),
      ("train.accumulation_steps", 3,
       r"train.accumulation_steps=3 must divide train.batch_size=32"),
      ("train.loss_scale", -1.0, r"train.loss_scale=-1.0 is out of range")]:
    bad = cfg.copy_and_resolve_references()
    section, leaf = field.split(".")
    bad[section][leaf] = value
    with pytest.raises(ConfigError, match=match) as e:
      fields.validate(bad)
    assert "\n" not in str(e.value)
  fields.validate(cfg)
