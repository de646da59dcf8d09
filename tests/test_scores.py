"""Per-batch scores (prunejax.scores.output, .grand, .ghost_norms, the registry), labels outside the
classes, and score files (.io)."""

from __future__ import annotations

import functools
import importlib
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_scores
from prunejax import scores
from prunejax.errors import ConfigError, DataError
from prunejax.models import build_model, make_apply_fn
from prunejax.models.resnet import ResNet
from prunejax.scores import ghost_norms

grand_lib = importlib.import_module("prunejax.scores.grand")  # the module, not the function.

NUM_CLASSES = 3
B = 5


def _random_variables(model, x, rng):
  """Random variables of ``model`` (cheaper than Flax's initializers, which compile slowly on CPU):
  kernels scaled by 1/sqrt(fan-in), non-trivial norm scales and BatchNorm statistics."""
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  dtype = np.float64 if jax.config.jax_enable_x64 else np.float32

  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) >= 2:
      v = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
    elif "var" in name:
      v = rng.uniform(0.5, 1.5, size=s.shape)
    elif "scale" in name:
      v = 1.0 + 0.2 * rng.normal(size=s.shape)
    else:
      v = 0.2 * rng.normal(size=s.shape)
    return jax.device_put(np.asarray(v, dtype))  # jnp.asarray compiles a copy per shape

  return jax.tree_util.tree_map_with_path(leaf, dict(shapes))


def _model(name: str):
  if name == "gpt":
    return build_model("gpt", NUM_CLASSES, vocab_size=50, context=8, depth=2, width=16,
                       num_heads=2)
  if name == "resnet":  # ResNet-18's blocks, two stages: BatchNorm, a strided 1x1 projection.
    return ResNet(NUM_CLASSES, (1, 1), (4, 8))
  kwargs = {"mlp": dict(hidden=(16, 8)), "cnn": dict(features=(4, 8), dense=16),
            "resnet18": dict(width_multiplier=0.125)}[name]
  return build_model(name, NUM_CLASSES, **kwargs)


def _case(name: str, key: int = 0):
  """(apply_fn, variables, batch) for a tiny model, in float64 under ``jax.enable_x64``."""
  rng = np.random.default_rng(key)
  model = _model(name)
  if name == "gpt":
    lengths = np.array([8, 5, 3, 8, 1])
    x = rng.integers(1, 50, (B, 8)) * (np.arange(8)[None] < lengths[:, None])
    x = np.asarray(x, np.int32)
  else:
    x = rng.normal(size=(B, 8, 8, 3)).astype(np.float64 if jax.config.jax_enable_x64
                                               else np.float32)
  variables = _random_variables(model, x[:1], rng)
  batch = jax.device_put({"x": x, "y": np.array([0, 1, 2, 1, 0], np.int32),
                          "mask": np.ones(B, bool)})
  return make_apply_fn(model), variables, batch


def _loop_grad_sq(apply_fn, params, batch):
  """The reference: one jax.grad per example, in a Python loop (jitted once, same shapes), and
  each leaf's squared norm summed on the host in float64: ``[(path_str, f64[B])]``."""

  @jax.jit
  def grad_one(p, x1, y1):
    return jax.grad(lambda p: -jax.nn.log_softmax(apply_fn(p, x1))[0, y1[0]])(p)

  x, y = np.asarray(batch["x"]), np.asarray(batch["y"])  # sliced on the host, not op by op
  sq = []
  for i in range(y.shape[0]):
    leaves = jax.tree_util.tree_leaves_with_path(grad_one(params, x[i:i + 1], y[i:i + 1]))
    if not sq:
      sq = [(jax.tree_util.keystr(p), np.zeros(y.shape[0])) for p, _ in leaves]
    for (_, sq_B), (_, l) in zip(sq, leaves):
      sq_B[i] = np.sum(np.square(np.asarray(l, np.float64)))
  return sq


def _loop_grad_norms(apply_fn, params, batch, leaf_filter=None, sq=None):
  """The per-example gradient norms of :func:`_loop_grad_sq` (or of its result ``sq``);
  ``leaf_filter(path_str)`` restricts the norm to some leaves."""
  sq = _loop_grad_sq(apply_fn, params, batch) if sq is None else sq
  return np.sqrt(sum(sq_B for p, sq_B in sq if leaf_filter is None or leaf_filter(p)))


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b) / np.maximum(np.abs(b), 1e-30)))


# ----------------------------------------------------------------------------------------------
# Output scores: hand-computed cases.
# ----------------------------------------------------------------------------------------------


def _identity_apply(params, x):
  return x * params["scale"]


def test_output_scores_hand_computed():
  logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0], [2.0, -1.0]], np.float32)
  batch = {"x": logits, "y": np.array([0, 0, 1], np.int32), "mask": np.array([True, True, False])}
  params = {"scale": np.float32(1.0)}
  # The four scores in one compiled program (op by op, ~45 single ops compiled).
  el2n, loss, margin, entropy = jax.jit(lambda p, b: [
      fn(_identity_apply, p, b) for fn in (scores.el2n, scores.loss, scores.margin,
                                           scores.entropy)])(params, batch)
  # Row 0: p = (1/2, 1/2), label 0. Row 1: p = (3/4, 1/4), label 0. Row 2: padding.
  np.testing.assert_allclose(el2n, [np.sqrt(0.5), np.sqrt(2) / 4, 0.0], rtol=1e-6)
  np.testing.assert_allclose(loss, [np.log(2), np.log(4 / 3), 0.0], rtol=1e-6)
  np.testing.assert_allclose(margin, [0.0, np.log(3.0), 0.0], atol=1e-6)
  np.testing.assert_allclose(
      entropy, [np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)), 0.0], rtol=1e-6)


def test_margin_is_negative_when_misclassified():
  batch = {"x": np.array([[1.0, 3.0, 2.0]], np.float32), "y": np.array([0], np.int32)}
  # Compiled (op by op, ~15 single ops compiled); the scale is a Python float, as before.
  margin = jax.jit(lambda b: scores.margin(_identity_apply, {"scale": 1.0}, b))(batch)
  np.testing.assert_allclose(margin, [-2.0])


# ----------------------------------------------------------------------------------------------
# GraNd: exact against a float64 per-example loop.
# ----------------------------------------------------------------------------------------------


def _plain_case(key: int = 0):
  """The plain-JAX residual convnet of experiments/bench_scores.py (NCHW, OIHW kernels, a params
  dict, a strided 1x1 projection), tiny."""
  rng = np.random.default_rng(key)
  dtype = np.float64 if jax.config.jax_enable_x64 else np.float32
  # One compiled initialization (op by op, its draws and casts compiled ~20 single ops: 0.5 s).
  init = lambda seed: bench_scores.plain_resnet_init(jax.random.key(seed), (4, 8), 1, NUM_CLASSES)
  params = jax.jit(lambda seed: jax.tree.map(lambda a: a.astype(dtype), init(seed)))(key)
  batch = jax.device_put({"x": rng.normal(size=(B, 3, 8, 8)).astype(dtype),
                          "y": np.array([0, 1, 2, 1, 0], np.int32), "mask": np.ones(B, bool)})
  return bench_scores.plain_resnet_apply, params, batch


# Each model is checked with the forms its layers take by default ("auto") and forced to the
# others: forced "gram" runs the shifted-Gram conv (stride 1) and the patch Gram (the ResNet's
# strided 3x3 and 1x1 convs); forced "explicit" the per-example products of dense, embedding and
# conv layers.
@pytest.mark.parametrize("name,forms", [("mlp", [None]), ("cnn", [None, "gram"]),
                                        ("resnet", [None, "gram"]), ("gpt", [None, "explicit"]),
                                        ("plain", [None, "gram"])])
def test_grand_matches_float64_loop(name, forms, monkeypatch):
  with jax.enable_x64(True):
    apply_fn, variables, batch = _plain_case() if name == "plain" else _case(name)
    expected = _loop_grad_norms(apply_fn, variables, batch)
    for form in forms:
      monkeypatch.setattr(ghost_norms, "FORCE", form)
      got = jax.jit(functools.partial(scores.grand, apply_fn, method="ghost"))(variables, batch)
      assert got.dtype == jnp.float64
      assert _rel_err(got, expected) < 1e-10, (name, form, got, expected)


@pytest.mark.parametrize("name", ["resnet", "gpt"])
def test_grand_exact_with_accelerator_settings(name, monkeypatch):
  """The GPU settings (memory-weighted form choice, all kernel offsets' patches at once,
  optimization barriers instead of row-local zeros) run here by pretending to be on a GPU."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  with jax.enable_x64(True):
    apply_fn, variables, batch = _case(name)
    got = jax.jit(functools.partial(scores.grand, apply_fn))(variables, batch)
    assert _rel_err(got, _loop_grad_norms(apply_fn, variables, batch)) < 1e-10


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "resnet18", "gpt", "plain"])
def test_our_models_take_the_fast_path(name):
  apply_fn, variables, batch = _plain_case() if name == "plain" else _case(name)
  methods = scores.ghost_plan(apply_fn, variables, batch["x"]).describe()
  heavy = [p for p in methods if p.endswith(("['kernel']", "['embedding']", "['w']"))]
  assert heavy, methods
  assert all(methods[p].split("/")[0] in ("dense", "conv", "embed") for p in heavy), methods
  if name == "resnet18":  # 8x8 inputs: explicit products on the first stage, Gram on the rest.
    assert {methods[p] for p in heavy} >= {"conv/gram", "conv/explicit"}
  for p, m in methods.items():
    if p.startswith("['batch_stats']"):
      assert m == "zero"
    else:  # biases, norm scales and offsets, position tables: per-example broadcast cotangents.
      assert m not in ("zero", "materialized"), (p, m)


def test_grand_f32_close_to_vmap_and_jacrev():
  apply_fn, variables, batch = _case("mlp", key=2)
  run = lambda fn, **kw: jax.jit(functools.partial(fn, apply_fn, **kw))(variables, batch)
  fast = run(scores.grand)
  assert fast.dtype == jnp.float32
  np.testing.assert_allclose(fast, run(scores.grand_vmap), rtol=2e-4)
  np.testing.assert_allclose(fast, run(scores.grand_jacrev), rtol=2e-4)
  np.testing.assert_allclose(fast, run(scores.grand, method="vmap", chunk_size=2), rtol=2e-4)


def _handwritten_apply(params, x):
  """A plain function over a dict: a tied weight (used twice), a scan and a bilinear term."""
  h = jnp.tanh(x @ params["w1"] + params["b1"])
  h = jnp.tanh(h @ params["w1"][:, :4].T[:, :4] + h * params["gain"])

  def step(c, w_row):
    return c + jnp.sin(h @ w_row), None

  extra, _ = jax.lax.scan(step, jnp.zeros(h.shape[0]), params["rows"])
  return h @ params["head"] + extra[:, None] * params["head_bias"]


@pytest.mark.parametrize("budget", [1 << 20, 0])  # 0: directly differentiated leaves in chunks.
def test_grand_exact_for_handwritten_function(budget, monkeypatch):
  monkeypatch.setattr(grand_lib, "_MATERIALIZED_BUDGET", budget)
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    params = {"w1": rng.normal(size=(4, 4)), "b1": rng.normal(size=4), "gain": rng.normal(size=4),
              "rows": rng.normal(size=(3, 4)), "head": rng.normal(size=(4, 3)),
              "head_bias": rng.normal(size=3)}
    params = jax.device_put(params)  # jnp.asarray would compile a copy per shape
    batch = jax.device_put({"x": rng.normal(size=(B, 4)), "y": np.array([0, 1, 2, 0, 1])})
    expected = _loop_grad_norms(_handwritten_apply, params, batch)
    plan = scores.ghost_plan(_handwritten_apply, params, batch["x"]).describe()
    assert plan == {"['b1']": "broadcast", "['gain']": "broadcast", "['head']": "dense/vector",
                    "['head_bias']": "broadcast", "['rows']": "materialized",
                    "['w1']": "materialized"}
    for method in ("auto", "vmap"):
      got = jax.jit(functools.partial(scores.grand, _handwritten_apply, method=method,
                                      chunk_size=2))(params, batch)
      assert _rel_err(got, expected) < 1e-10, method


def _grouped_conv(x, w):
  """A grouped (feature_group_count=2), strided, rhs-dilated conv with asymmetric padding."""
  return jax.lax.conv_general_dilated(x, w, (2, 1), [(1, 2), (0, 1)], rhs_dilation=(1, 2),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=2)


def _transposed_conv(x, w):
  """An lhs-dilated (transposed) conv in NCHW/OIHW whose 5x5 kernel overhangs a 3x3 input, so
  some kernel offsets only ever see padding; cropping (negative) padding on one side."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), [(3, -1), (4, 4)], lhs_dilation=(2, 1),
                                      dimension_numbers=("NCHW", "OIHW", "NCHW"))


def _conv1d(x, w):
  """A 1-d conv over (B, T, C) sequences (NWC / WIO), stride 2."""
  return jax.lax.conv_general_dilated(x, w, (2,), "SAME", dimension_numbers=("NWC", "WIO", "NWC"))


@pytest.mark.parametrize("conv,x_shape,w_shape", [(_grouped_conv, (B, 6, 5, 4), (3, 2, 2, 6)),
                                                  (_transposed_conv, (B, 2, 3, 3), (4, 2, 5, 5)),
                                                  (_conv1d, (B, 7, 3), (3, 3, 4))])
def test_grand_exact_for_unusual_convs(conv, x_shape, w_shape, monkeypatch):
  with jax.enable_x64(True):
    rng = np.random.default_rng(1)
    x = jax.device_put(rng.normal(size=x_shape))  # jnp.asarray would compile a copy per shape
    params = {"conv": jax.device_put(rng.normal(size=w_shape)), "head": None}
    h_size = int(np.prod(jax.eval_shape(conv, x, params["conv"]).shape[1:]))
    params["head"] = jax.device_put(rng.normal(size=(h_size, 3)) * 0.1)
    apply_fn = lambda p, x: jnp.tanh(conv(x, p["conv"])).reshape(x.shape[0], -1) @ p["head"]
    batch = {"x": x, "y": jax.device_put(np.array([0, 1, 2, 0, 1]))}
    expected = _loop_grad_norms(apply_fn, params, batch)
    for form in (None, "gram", "explicit"):
      monkeypatch.setattr(ghost_norms, "FORCE", form)
      assert scores.ghost_plan(apply_fn, params, x).describe()["['conv']"].startswith("conv/")
      got = jax.jit(functools.partial(scores.grand, apply_fn))(params, batch)
      assert _rel_err(got, expected) < 1e-10, form


def _einsum_heads_apply(params, x):
  """Dense layers written as einsums: per-head weights (a dot-batch dim) and an (out, in) weight
  applied from the left, as Equinox's Linear is."""
  h = jnp.einsum("btd,hde->bhte", x, params["heads"])  # dot_general with batch dim h.
  h = jnp.tanh(h).mean(axis=2).reshape(x.shape[0], -1)
  return jnp.einsum("cf,bf->bc", params["out"], h)


def test_grand_exact_for_einsum_layers():
  with jax.enable_x64(True):
    rng = np.random.default_rng(2)
    params = jax.device_put({"heads": rng.normal(size=(2, 3, 4)), "out": rng.normal(size=(3, 8))})
    batch = jax.device_put({"x": rng.normal(size=(B, 6, 3)), "y": np.array([0, 1, 2, 0, 1])})
    plan = scores.ghost_plan(_einsum_heads_apply, params, batch["x"]).describe()
    assert plan["['heads']"].startswith("dense/") and plan["['out']"] == "dense/vector"
    got = jax.jit(functools.partial(scores.grand, _einsum_heads_apply))(params, batch)
    assert _rel_err(got, _loop_grad_norms(_einsum_heads_apply, params, batch)) < 1e-10


def _outside_case(library: str):
  """(apply_fn, params) of a small conv + dense model from another library. Each library's own
  initialization, compiled (op by op, its draws compiled ~10 single ops)."""
  key = jax.random.key(3)
  if library == "equinox":
    eqx = pytest.importorskip("equinox")  # not a dependency of prunejax: the test extra's.

    def make(key):
      k1, k2 = jax.random.split(key)
      return eqx.nn.Sequential([eqx.nn.Conv2d(3, 4, 3, key=k1), eqx.nn.Lambda(jnp.tanh),
                                eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(4 * 6 * 6, 3, key=k2)])

    params, static = eqx.partition(eqx.filter_jit(make)(key), eqx.is_array)
    return lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, (B, 3, 8, 8)
  if library == "haiku":
    hk = pytest.importorskip("haiku")
    f = hk.without_apply_rng(hk.transform(lambda x: hk.Sequential(
        [hk.Conv2D(4, 3), jnp.tanh, hk.Flatten(), hk.Linear(3)])(x)))
    return f.apply, jax.jit(f.init)(key, np.zeros((1, 8, 8, 3))), (B, 8, 8, 3)
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.out = nnx.Linear(4 * 8 * 8, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))

  graphdef, state = nnx.split(nnx.jit(lambda k: Net(nnx.Rngs(k)))(jax.random.key(0)))
  return lambda s, x: nnx.merge(graphdef, s)(x), state, (B, 8, 8, 3)


@pytest.mark.parametrize("library", ["equinox", "haiku", "nnx"])
def test_grand_exact_for_other_libraries(library):
  with jax.enable_x64(True):
    apply_fn, params, x_shape = _outside_case(library)
    # Cast on the host (astype on the device compiled one conversion per leaf shape).
    params = jax.device_put(jax.tree.map(lambda a: np.asarray(a, np.float64), params))
    rng = np.random.default_rng(4)
    batch = jax.device_put({"x": rng.normal(size=x_shape), "y": np.array([0, 1, 2, 0, 1])})
    methods = set(scores.ghost_plan(apply_fn, params, batch["x"]).describe().values())
    assert methods <= {"conv/explicit", "conv/gram", "dense/vector", "broadcast"}, methods
    assert {"conv/explicit", "dense/vector"} & methods
    got = jax.jit(functools.partial(scores.grand, apply_fn))(params, batch)
    assert _rel_err(got, _loop_grad_norms(apply_fn, params, batch)) < 1e-10


def _paths_taken(monkeypatch) -> list[str]:
  """Records, as :func:`scores.grand` traces, which path computes its squared norms."""
  taken = []
  for name, path in (("_ghost_sq_norms", "ghost"), ("_vmap_sq_norms", "vmap")):
    fn = getattr(grand_lib, name)
    monkeypatch.setattr(grand_lib, name,
                        lambda *a, fn=fn, path=path, **kw: taken.append(path) or fn(*a, **kw))
  return taken


def test_grand_falls_back_without_layers(monkeypatch):
  def apply_fn(params, x):  # parameters used only elementwise: no ghost rule applies.
    return jnp.stack([jnp.sum(x * params["a"], -1), jnp.sum(jnp.sin(x + params["b"]), -1)], -1)

  params = jax.device_put({"a": np.arange(3.0, dtype=np.float32), "b": np.ones(3, np.float32)})
  batch = jax.device_put({"x": np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32),
                          "y": np.array([0, 1, 1, 0], np.int32)})
  expected = _loop_grad_norms(apply_fn, params, batch)
  # Compiled (op by op, ~70 single ops compiled): the fallback is chosen while tracing, as eagerly.
  taken = _paths_taken(monkeypatch)
  np.testing.assert_allclose(jax.jit(functools.partial(scores.grand, apply_fn))(params, batch),
                             expected, rtol=1e-5)
  assert taken == ["vmap"]
  with pytest.raises(ConfigError, match="method='ghost'"):
    scores.grand(apply_fn, params, batch, method="ghost")
  with pytest.raises(ConfigError, match="grand.method='exact'"):
    scores.grand(apply_fn, params, batch, method="exact")


def test_grand_falls_back_when_apply_fn_branches_on_batch_size(monkeypatch):
  def apply_fn(params, x):  # traces differently for other batch sizes: no example axis is known.
    h = x @ params["w"]
    return h * 2.0 if x.shape[0] <= B else h

  params = jax.device_put({"w": np.random.default_rng(5).normal(size=(3, 3)).astype(np.float32)})
  batch = jax.device_put({"x": np.random.default_rng(6).normal(size=(B, 3)).astype(np.float32),
                          "y": np.array([0, 1, 2, 0, 1], np.int32)})
  assert scores.ghost_plan(apply_fn, params, batch["x"]).describe() == {"['w']": "materialized"}
  # Compiled (op by op, ~60 single ops compiled). Traced, the walk still sees the two batch sizes
  # trace differently and GraNd falls back to vmap.
  taken, plans = _paths_taken(monkeypatch), []

  def grand(p, b):
    plans.append(scores.ghost_plan(apply_fn, p, b["x"]).describe())
    return scores.grand(apply_fn, p, b)

  np.testing.assert_allclose(jax.jit(grand)(params, batch),
                             _loop_grad_norms(apply_fn, params, batch), rtol=1e-5)
  assert plans == [{"['w']": "materialized"}] and taken == ["vmap"]


# ----------------------------------------------------------------------------------------------
# GraNd of the last layer.
# ----------------------------------------------------------------------------------------------


def test_grand_last_layer_closed_form_identity():
  with jax.enable_x64(True):
    apply_fn, variables, batch = _case("mlp")
    model = _model("mlp")
    features = lambda v, x: jax.nn.relu(model.apply(v, x, capture_intermediates=True)[1][
        "intermediates"]["dense_1"]["__call__"][0])
    # The reference's features and EL2N compiled together, its closed form on the host.
    h, el2n = map(np.asarray, jax.jit(lambda v, b: (features(v, b["x"]), scores.el2n(
        apply_fn, v, b)))(variables, batch))
    expected = el2n * np.sqrt(1.0 + np.sum(h * h, axis=-1))
    # The head found by the walk and the one given by features_fn, in one compiled program (op by
    # op, the second compiled ~30 single ops).
    got, got_features_fn = jax.jit(lambda v, b: (
        scores.grand_last_layer(apply_fn, v, b),
        scores.grand_last_layer(apply_fn, v, b, features_fn=features)))(variables, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # It is the exact gradient norm over the head's kernel and bias, and at most the full norm
    # (one per-example loop gives both).
    sq = _loop_grad_sq(apply_fn, variables, batch)
    head_only = _loop_grad_norms(apply_fn, variables, batch, lambda p: "['head']" in p, sq=sq)
    np.testing.assert_allclose(got, head_only, rtol=1e-10)
    assert np.all(np.asarray(got) <= _loop_grad_norms(apply_fn, variables, batch, sq=sq))
    np.testing.assert_allclose(got_features_fn, expected, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# The registry: shapes, jit without re-tracing, padding.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("score_name", scores.BATCH_SCORES)
def test_registry_jit_no_retrace_and_padding(score_name):
  chex.clear_trace_counter()
  apply_fn, variables, batch = _case("mlp")
  fn = scores.SCORES[score_name]

  def score(params, batch):
    return fn(apply_fn, params, batch)

  traced = jax.jit(chex.assert_max_traces(score, n=1))
  other = jax.device_put(jax.tree.map(lambda a: np.asarray(a) * 1.1, variables))  # f32 on host
  s1, s2 = traced(variables, batch), traced(other, batch)
  for s in (s1, s2):
    assert s.shape == (B,) and s.dtype == jnp.float32 and np.all(np.isfinite(s))
  assert not np.allclose(s1, s2)
  # Padding rows (mask False, zero inputs) score 0 and do not change the real rows.
  x, y, mask = (np.asarray(batch[k]) for k in ("x", "y", "mask"))  # padded on the host
  padded = {"x": np.concatenate([x, np.zeros_like(x[:3])]),
            "y": np.concatenate([y, np.zeros(3, np.int32)]),
            "mask": np.concatenate([mask, np.zeros(3, bool)])}
  sp = np.asarray(jax.jit(functools.partial(fn, apply_fn))(variables, padded))
  np.testing.assert_array_equal(sp[B:], 0.0)
  np.testing.assert_allclose(sp[:B], s1, rtol=1e-5)


def test_jit_score_helper_and_gpt_padding():
  apply_fn, variables, batch = _case("gpt")
  fn = scores.jit_score("grand", apply_fn)
  masked = dict(batch, mask=np.array([True, False, True, True, False]))
  s = fn(variables, masked)
  np.testing.assert_array_equal(np.asarray(s)[[1, 4]], 0.0)
  np.testing.assert_allclose(np.asarray(s)[[0, 2, 3]], np.asarray(fn(variables, batch))[[0, 2, 3]],
                             rtol=1e-6)
  with pytest.raises(ConfigError, match="score='nope'"):
    scores.jit_score("nope", apply_fn)


# ----------------------------------------------------------------------------------------------
# Labels outside the classes.
# ----------------------------------------------------------------------------------------------

LABELLED = ["el2n", "loss", "margin", "grand", "grand_last_layer", "grand_vmap", "grand_jacrev"]


@pytest.mark.parametrize("score_name", LABELLED)
def test_labels_outside_the_classes_give_nan(score_name):
  apply_fn, variables, batch = _case("mlp")
  fn = jax.jit(functools.partial(getattr(scores, score_name), apply_fn))
  clean = np.asarray(fn(variables, batch))
  # Rows 1 and 2 have labels 3 and -1 (3 classes); row 4 is padding with label 7.
  bad = dict(batch, y=np.array([0, 3, -1, 1, 7], np.int32),
             mask=np.array([True, True, True, True, False]))
  got = np.asarray(fn(variables, bad))
  assert np.isnan(got[1]) and np.isnan(got[2]), got
  assert got[4] == 0.0
  np.testing.assert_allclose(got[[0, 3]], clean[[0, 3]], rtol=1e-6)  # other rows unchanged.


@pytest.mark.parametrize("score_name", LABELLED)
def test_float_labels_are_an_error(score_name):
  apply_fn, variables, batch = _case("mlp")
  with pytest.raises(DataError, match="labels must be integers in \\[0, 3\\)"):
    getattr(scores, score_name)(apply_fn, variables, dict(batch, y=jax.device_put(
        (np.asarray(batch["y"]) + 0.7).astype(np.float32))))  # as int32 + 0.7 gives, on the host


# ----------------------------------------------------------------------------------------------
# Score files.
# ----------------------------------------------------------------------------------------------


def test_save_load_roundtrip(tmp_path):
  ids = np.array([7, 3, 11])
  path = os.path.join(tmp_path, "sub", "scores.npz")
  scores.save_scores(path, ids, el2n=np.array([0.1, 0.2, 0.3], np.float32),
                     forgetting=np.array([1, 0, 4]))
  got_ids, got = scores.load_scores(path)
  np.testing.assert_array_equal(got_ids, ids)
  assert set(got) == {"el2n", "forgetting"}
  np.testing.assert_array_equal(got["forgetting"], [1, 0, 4])
  assert [f for f in os.listdir(os.path.dirname(path)) if f.startswith(".tmp")] == []
  np.testing.assert_allclose(scores.align([11, 7], got_ids, got["el2n"]), [0.3, 0.1])


def test_save_scores_rejects_bad_input(tmp_path):
  path = os.path.join(tmp_path, "s.npz")
  with pytest.raises(DataError, match="unique"):
    scores.save_scores(path, np.array([1, 1]), a=np.zeros(2))
  with pytest.raises(DataError, match="shape"):
    scores.save_scores(path, np.array([1, 2]), a=np.zeros(3))
  with pytest.raises(DataError, match="no score"):
    scores.align([5], np.array([1, 2]), np.zeros(2))
  assert not os.path.exists(path)
