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
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
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
    return jnp.asarray(v, dtype)

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
    x = jnp.asarray(x, jnp.int32)
  else:
    x = jnp.asarray(rng.normal(size=(B, 8, 8, 3)),
                    jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
  variables = _random_variables(model, x[:1], rng)
  batch = {"x": x, "y": jnp.asarray([0, 1, 2, 1, 0], jnp.int32), "mask": jnp.ones(B, bool)}
  return make_apply_fn(model), variables, batch


def _loop_grad_norms(apply_fn, params, batch, leaf_filter=None):
  """The reference: one jax.grad per example, in a Python loop (jitted once, same shapes).

  ``leaf_filter(path_str)`` restricts the norm to some leaves."""

  @jax.jit
  def grad_one(p, x1, y1):
    return jax.grad(lambda p: -jax.nn.log_softmax(apply_fn(p, x1))[0, y1[0]])(p)

  out = []
  for i in range(batch["y"].shape[0]):
    g = grad_one(params, batch["x"][i:i + 1], batch["y"][i:i + 1])
    leaves = jax.tree_util.tree_leaves_with_path(g)
    out.append(np.sqrt(sum(float(jnp.sum(jnp.square(l))) for p, l in leaves
                           if leaf_filter is None or leaf_filter(jax.tree_util.keystr(p)))))
  return np.asarray(out)


def _rel_err(a, b):
  return float(np.max(np.abs(np.asarray(a) - b) / np.maximum(np.abs(b), 1e-30)))


# ----------------------------------------------------------------------------------------------
# Output scores: hand-computed cases.
# ----------------------------------------------------------------------------------------------


def _identity_apply(params, x):
  return x * params["scale"]


def test_output_scores_hand_computed():
  logits = jnp.array([[0.0, 0.0], [np.log(3.0), 0.0], [2.0, -1.0]], jnp.float32)
  batch = {"x": logits, "y": jnp.array([0, 0, 1]), "mask": jnp.array([True, True, False])}
  params = {"scale": jnp.float32(1.0)}
  # Row 0: p = (1/2, 1/2), label 0. Row 1: p = (3/4, 1/4), label 0. Row 2: padding.
  np.testing.assert_allclose(scores.el2n(_identity_apply, params, batch),
                             [np.sqrt(0.5), np.sqrt(2) / 4, 0.0], rtol=1e-6)
  np.testing.assert_allclose(scores.loss(_identity_apply, params, batch),
                             [np.log(2), np.log(4 / 3), 0.0], rtol=1e-6)
  np.testing.assert_allclose(scores.margin(_identity_apply, params, batch),
                             [0.0, np.log(3.0), 0.0], atol=1e-6)
  np.testing.assert_allclose(
      scores.entropy(_identity_apply, params, batch),
      [np.log(2), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25)), 0.0], rtol=1e-6)


def test_margin_is_negative_when_misclassified():
  batch = {"x": jnp.array([[1.0, 3.0, 2.0]]), "y": jnp.array([0])}
  np.testing.assert_allclose(scores.margin(_identity_apply, {"scale": 1.0}, batch), [-2.0])


# ----------------------------------------------------------------------------------------------
# GraNd: exact against a float64 per-example loop.
# ----------------------------------------------------------------------------------------------


def _plain_case(key: int = 0):
  """The plain-JAX residual convnet of experiments/bench_scores.py (NCHW, OIHW kernels, a params
  dict, a strided 1x1 projection), tiny."""
  rng = np.random.default_rng(key)
  params = bench_scores.plain_resnet_init(jax.random.key(key), (4, 8), 1, NUM_CLASSES)
  dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
  params = jax.tree.map(lambda a: a.astype(dtype), params)
  batch = {"x": jnp.asarray(rng.normal(size=(B, 3, 8, 8)), dtype),
           "y": jnp.asarray([0, 1, 2, 1, 0], jnp.int32), "mask": jnp.ones(B, bool)}
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
    params = jax.tree.map(jnp.asarray, params)
    batch = {"x": jnp.asarray(rng.normal(size=(B, 4))), "y": jnp.array([0, 1, 2, 0, 1])}
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
    x = jnp.asarray(rng.normal(size=x_shape))
    params = {"conv": jnp.asarray(rng.normal(size=w_shape)), "head": None}
    h_size = int(np.prod(jax.eval_shape(conv, x, params["conv"]).shape[1:]))
    params["head"] = jnp.asarray(rng.normal(size=(h_size, 3)) * 0.1)
    apply_fn = lambda p, x: jnp.tanh(conv(x, p["conv"])).reshape(x.shape[0], -1) @ p["head"]
    batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1])}
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
    params = {"heads": jnp.asarray(rng.normal(size=(2, 3, 4))),
              "out": jnp.asarray(rng.normal(size=(3, 8)))}
    batch = {"x": jnp.asarray(rng.normal(size=(B, 6, 3))), "y": jnp.array([0, 1, 2, 0, 1])}
    plan = scores.ghost_plan(_einsum_heads_apply, params, batch["x"]).describe()
    assert plan["['heads']"].startswith("dense/") and plan["['out']"] == "dense/vector"
    got = jax.jit(functools.partial(scores.grand, _einsum_heads_apply))(params, batch)
    assert _rel_err(got, _loop_grad_norms(_einsum_heads_apply, params, batch)) < 1e-10


def _outside_case(library: str):
  """(apply_fn, params) of a small conv + dense model from another library, float64."""
  key = jax.random.key(3)
  if library == "equinox":
    eqx = pytest.importorskip("equinox")  # not a dependency of prunejax: the test extra's.
    k1, k2 = jax.random.split(key)
    model = eqx.nn.Sequential([eqx.nn.Conv2d(3, 4, 3, key=k1), eqx.nn.Lambda(jnp.tanh),
                               eqx.nn.Lambda(jnp.ravel), eqx.nn.Linear(4 * 6 * 6, 3, key=k2)])
    params, static = eqx.partition(model, eqx.is_array)
    return lambda p, x: jax.vmap(eqx.combine(p, static))(x), params, (B, 3, 8, 8)
  if library == "haiku":
    hk = pytest.importorskip("haiku")
    f = hk.without_apply_rng(hk.transform(lambda x: hk.Sequential(
        [hk.Conv2D(4, 3), jnp.tanh, hk.Flatten(), hk.Linear(3)])(x)))
    return f.apply, f.init(key, jnp.zeros((1, 8, 8, 3))), (B, 8, 8, 3)
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
      self.out = nnx.Linear(4 * 8 * 8, 3, rngs=rngs)

    def __call__(self, x):
      return self.out(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))

  graphdef, state = nnx.split(Net(nnx.Rngs(0)))
  return lambda s, x: nnx.merge(graphdef, s)(x), state, (B, 8, 8, 3)


@pytest.mark.parametrize("library", ["equinox", "haiku", "nnx"])
def test_grand_exact_for_other_libraries(library):
  with jax.enable_x64(True):
    apply_fn, params, x_shape = _outside_case(library)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    rng = np.random.default_rng(4)
    batch = {"x": jnp.asarray(rng.normal(size=x_shape)), "y": jnp.array([0, 1, 2, 0, 1])}
    methods = set(scores.ghost_plan(apply_fn, params, batch["x"]).describe().values())
    assert methods <= {"conv/explicit", "conv/gram", "dense/vector", "broadcast"}, methods
    assert {"conv/explicit", "dense/vector"} & methods
    got = jax.jit(functools.partial(scores.grand, apply_fn))(params, batch)
    assert _rel_err(got, _loop_grad_norms(apply_fn, params, batch)) < 1e-10


def test_grand_falls_back_without_layers():
  def apply_fn(params, x):  # parameters used only elementwise: no ghost rule applies.
    return jnp.stack([jnp.sum(x * params["a"], -1), jnp.sum(jnp.sin(x + params["b"]), -1)], -1)

  params = {"a": jnp.arange(3.0), "b": jnp.ones(3)}
  batch = {"x": jnp.asarray(np.random.default_rng(0).normal(size=(4, 3)), jnp.float32),
           "y": jnp.array([0, 1, 1, 0])}
  expected = _loop_grad_norms(apply_fn, params, batch)
  np.testing.assert_allclose(scores.grand(apply_fn, params, batch), expected, rtol=1e-5)
  with pytest.raises(ConfigError, match="method='ghost'"):
    scores.grand(apply_fn, params, batch, method="ghost")
  with pytest.raises(ConfigError, match="grand.method='exact'"):
    scores.grand(apply_fn, params, batch, method="exact")


def test_grand_falls_back_when_apply_fn_branches_on_batch_size():
  def apply_fn(params, x):  # traces differently for other batch sizes: no example axis is known.
    h = x @ params["w"]
    return h * 2.0 if x.shape[0] <= B else h

  params = {"w": jnp.asarray(np.random.default_rng(5).normal(size=(3, 3)), jnp.float32)}
  batch = {"x": jnp.asarray(np.random.default_rng(6).normal(size=(B, 3)), jnp.float32),
           "y": jnp.array([0, 1, 2, 0, 1])}
  assert scores.ghost_plan(apply_fn, params, batch["x"]).describe() == {"['w']": "materialized"}
  np.testing.assert_allclose(scores.grand(apply_fn, params, batch),
                             _loop_grad_norms(apply_fn, params, batch), rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# GraNd of the last layer.
# ----------------------------------------------------------------------------------------------


def test_grand_last_layer_closed_form_identity():
  with jax.enable_x64(True):
    apply_fn, variables, batch = _case("mlp")
    model = _model("mlp")
    features = lambda v, x: jax.nn.relu(model.apply(v, x, capture_intermediates=True)[1][
        "intermediates"]["dense_1"]["__call__"][0])
    h = features(variables, batch["x"])
    el2n = scores.el2n(apply_fn, variables, batch)
    expected = el2n * jnp.sqrt(1.0 + jnp.sum(h * h, axis=-1))
    got = jax.jit(functools.partial(scores.grand_last_layer, apply_fn))(variables, batch)
    np.testing.assert_allclose(got, expected, rtol=1e-10)
    # It is the exact gradient norm over the head's kernel and bias, and at most the full norm.
    head_only = _loop_grad_norms(apply_fn, variables, batch, lambda p: "['head']" in p)
    np.testing.assert_allclose(got, head_only, rtol=1e-10)
    assert np.all(np.asarray(got) <= _loop_grad_norms(apply_fn, variables, batch))
    np.testing.assert_allclose(
        scores.grand_last_layer(apply_fn, variables, batch, features_fn=features), expected,
        rtol=1e-10)


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
  other = jax.tree.map(lambda a: a * 1.1, variables)
  s1, s2 = traced(variables, batch), traced(other, batch)
  for s in (s1, s2):
    assert s.shape == (B,) and s.dtype == jnp.float32 and np.all(np.isfinite(s))
  assert not np.allclose(s1, s2)
  # Padding rows (mask False, zero inputs) score 0 and do not change the real rows.
  padded = {"x": jnp.concatenate([batch["x"], jnp.zeros_like(batch["x"][:3])]),
            "y": jnp.concatenate([batch["y"], jnp.zeros(3, jnp.int32)]),
            "mask": jnp.concatenate([batch["mask"], jnp.zeros(3, bool)])}
  sp = jax.jit(functools.partial(fn, apply_fn))(variables, padded)
  np.testing.assert_array_equal(sp[B:], 0.0)
  np.testing.assert_allclose(sp[:B], s1, rtol=1e-5)


def test_jit_score_helper_and_gpt_padding():
  apply_fn, variables, batch = _case("gpt")
  fn = scores.jit_score("grand", apply_fn)
  masked = dict(batch, mask=jnp.array([True, False, True, True, False]))
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
  bad = dict(batch, y=jnp.array([0, 3, -1, 1, 7]), mask=jnp.array([True, True, True, True, False]))
  got = np.asarray(fn(variables, bad))
  assert np.isnan(got[1]) and np.isnan(got[2]), got
  assert got[4] == 0.0
  np.testing.assert_allclose(got[[0, 3]], clean[[0, 3]], rtol=1e-6)  # other rows unchanged.


@pytest.mark.parametrize("score_name", LABELLED)
def test_float_labels_are_an_error(score_name):
  apply_fn, variables, batch = _case("mlp")
  with pytest.raises(DataError, match="labels must be integers in \\[0, 3\\)"):
    getattr(scores, score_name)(apply_fn, variables, dict(batch, y=batch["y"] + 0.7))


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
