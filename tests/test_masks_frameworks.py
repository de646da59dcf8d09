"""Masks on parameter trees prunejax did not create: Flax NNX, Equinox, Haiku and plain dicts.

The default filter's choices per framework, "selects nothing" errors, filters resolved before jit,
and structured masks in every kernel layout against NumPy references."""

from __future__ import annotations

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prunejax import masks
from prunejax.errors import ConfigError
from prunejax.masks import core, structured, unstructured
from prunejax.models import CNN, MLP, GPTClassifier, resnet20

RNG = np.random.default_rng(0)


def _normal(*shape):
  # Cast on the host and put as is: jnp.asarray(float64, float32) compiles a conversion per shape.
  return jax.device_put(RNG.standard_normal(shape).astype(np.float32))


def _chosen(tree, filter_fn=None):
  _, flags, _ = core.prunable_leaves(tree, filter_fn)
  return {p for p, f in zip(masks.leaf_paths(tree), flags) if f}


# ----------------------------------------------------------------------------------------------
# The default filter.
# ----------------------------------------------------------------------------------------------


class _NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.emb = nnx.Embed(10, 8, rngs=rngs)
    self.pos_embedding = nnx.Param(jnp.zeros((4, 8)))
    self.conv = nnx.Conv(3, 4, (3, 3), rngs=rngs)
    self.l1 = nnx.Linear(8, 8, rngs=rngs)
    self.ln = nnx.LayerNorm(8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                       rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)


def test_default_filter_on_an_nnx_state():
  # The filter reads paths, shapes and dtypes: the module's shapes are enough (not its init).
  _, state = nnx.split(nnx.eval_shape(lambda: _NNXNet(nnx.Rngs(0))))
  assert _chosen(state) == {"emb/embedding", "conv/kernel", "l1/kernel", "attn/query/kernel",
                            "attn/key/kernel", "attn/value/kernel", "attn/out/kernel"}
  assert "bn/mean" in masks.leaf_paths(state) and "drop/rngs/key" in masks.leaf_paths(state)


class _EqxNet(eqx.Module):
  emb: eqx.nn.Embedding
  pos_embed: jax.Array
  conv: eqx.nn.Conv2d
  l1: eqx.nn.Linear
  ln: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention

  def __init__(self, key):
    k = jax.random.split(key, 4)
    self.emb = eqx.nn.Embedding(10, 8, key=k[0])
    self.pos_embed = jnp.zeros((4, 8))
    self.conv = eqx.nn.Conv2d(3, 4, 3, key=k[1])
    self.l1 = eqx.nn.Linear(8, 8, key=k[2])
    self.ln = eqx.nn.LayerNorm(8)
    self.attn = eqx.nn.MultiheadAttention(2, 8, key=k[3])


def test_default_filter_on_an_equinox_partition():
  params, _ = eqx.partition(_EqxNet(jax.random.key(0)), eqx.is_inexact_array)
  assert _chosen(params) == {"emb/weight", "conv/weight", "l1/weight", "attn/query_proj/weight",
                             "attn/key_proj/weight", "attn/value_proj/weight",
                             "attn/output_proj/weight"}
  assert {"ln/weight", "conv/bias", "pos_embed"} <= set(masks.leaf_paths(params))
  # Structured masks leave the embedding alone although Equinox calls it "weight".
  assert _chosen(params, masks.structured_filter_fn) == _chosen(params) - {"emb/weight"}


def test_default_filter_on_haiku_params():
  def f(x, tokens):
    h = hk.Linear(8)(x) + hk.Embed(10, 8)(tokens)
    h = hk.LayerNorm(-1, True, True)(h)
    h = h + hk.get_parameter("pos_embs", (2, 8), init=jnp.zeros)
    c = hk.Conv2D(4, 3)(jnp.zeros((1, 5, 5, 3)))
    return hk.MultiHeadAttention(2, 4, w_init=hk.initializers.VarianceScaling())(h, h, h), c
  params = jax.eval_shape(hk.transform(f).init, jax.random.key(0), jnp.ones((2, 8)),
                          jnp.zeros((2,), jnp.int32))  # shapes only, as the filter reads them
  assert _chosen(params) == {"linear/w", "embed/embeddings", "conv2_d/w",
                             "multi_head_attention/query/w", "multi_head_attention/key/w",
                             "multi_head_attention/value/w", "multi_head_attention/linear/w"}


def test_default_filter_on_plain_dicts():
  tree = {"wte": _normal(10, 4), "wpe": _normal(6, 4), "W_pos": _normal(6, 4),
          "blocks": [{"W_q": _normal(4, 4), "b_q": _normal(4), "wq": _normal(4, 4),
                      "w1": _normal(4, 8), "w": _normal(8, 4), "b": _normal(4),
                      "ln": {"weight": _normal(4), "bias": _normal(4)},
                      "fc": {"weight": _normal(8, 4), "bias": _normal(8)}}],
          "gamma": _normal(4), "steps": jnp.zeros((3, 3), jnp.int32)}
  assert _chosen(tree) == {"wte", "blocks/0/W_q", "blocks/0/wq", "blocks/0/w1", "blocks/0/w",
                           "blocks/0/fc/weight"}
  assert _chosen(tree, masks.make_filter_fn(embeddings=False)) == _chosen(tree) - {"wte"}


@pytest.mark.parametrize("model,x", [
    (MLP(num_classes=3, hidden=(8,)), np.ones((1, 4, 4, 1), np.float32)),
    (CNN(num_classes=3, features=(4,), dense=8), np.ones((1, 8, 8, 3), np.float32)),
    (resnet20(10, width_multiplier=0.25), np.ones((1, 8, 8, 3), np.float32)),
    (GPTClassifier(vocab_size=11, num_classes=2, context=4, depth=1, width=8, num_heads=2),
     np.ones((1, 4), np.int32)),
], ids=["mlp", "cnn", "resnet20", "gpt"])
def test_default_filter_selects_what_it_selected_on_our_models(model, x):
  params = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  flags = lambda fn: core.prunable_leaves(params, fn)[1]
  assert flags(None) == flags(masks.make_filter_fn(names=masks.PRUNABLE_NAMES))
  kernels = masks.make_filter_fn(names=("kernel",))  # structured masks' filters before.
  assert flags(masks.structured_filter_fn) == flags(masks.make_filter_fn(prune_head=False,
                                                                         names=("kernel",)))
  assert flags(structured._n_m_filter_fn) == flags(kernels)


def test_masks_of_an_nnx_state_equal_those_of_its_pure_dict():
  _, state, _ = nnx.split(_NNXNet(nnx.Rngs(1)), nnx.Param, ...)
  pure = nnx.to_pure_dict(state)
  for fn in (lambda t: masks.magnitude(t, 0.6),
             lambda t: masks.random(t, 0.3, key=jax.random.key(3)),
             lambda t: masks.magnitude(t, 0.5, scope="layerwise", distribution="erk")):
    a, b = jax.tree.leaves(fn(state)), jax.tree.leaves(fn(pure))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  assert float(masks.sparsity_of(masks.magnitude(state, 0.6))) == pytest.approx(
      round(0.6 * masks.count_params(state)) / masks.count_params(state))


# ----------------------------------------------------------------------------------------------
# Nothing selected, stale filters, recompilation.
# ----------------------------------------------------------------------------------------------


_NOTHING = {"encoder": {"proj": _normal(4, 4), "b": _normal(4)}, "scale": _normal(4)}


@pytest.mark.parametrize("call", [
    lambda t: masks.magnitude(t, 0.5),
    lambda t: masks.random(t, 0.5, key=jax.random.key(0)),
    lambda t: masks.threshold_mask(t, 1),
    lambda t: masks.mask_from_scores(t, 0.5, scope="layerwise"),
    lambda t: masks.erk(t, 0.5),
    lambda t: masks.uniform(t, 0.5),
    lambda t: masks.sparsity_of(t),
    lambda t: masks.count_params(t),
    lambda t: masks.neurons(t, 0.5),
    lambda t: masks.n_m(t, 2, 4),
], ids=["magnitude", "random", "threshold_mask", "mask_from_scores", "erk", "uniform",
        "sparsity_of", "count_params", "neurons", "n_m"])
def test_a_filter_that_selects_nothing_is_an_error_listing_the_leaves(call):
  with pytest.raises(ConfigError, match="selects none of the 3 leaves") as e:
    call(_NOTHING)
  message = str(e.value)
  assert "\n" not in message
  assert "encoder/proj float32[4, 4]" in message and "make_filter_fn" in message
  with pytest.raises(ConfigError, match="no array leaves"):
    call({})


def test_a_custom_filter_fixes_it_and_errors_name_the_filter():
  by_name = masks.make_filter_fn(names=("proj",))
  mask = masks.magnitude(_NOTHING, 0.5, filter_fn=by_name)
  assert int(np.sum(~np.asarray(mask["encoder"]["proj"]))) == 8
  assert float(masks.sparsity_of(mask, by_name)) == 0.5
  with pytest.raises(ConfigError, match="filter_fn selects none"):
    masks.magnitude(_NOTHING, 0.5, filter_fn=masks.make_filter_fn(include=["nowhere"]))
  # Measured with the default filter, the mask prunes a leaf it does not select.
  with pytest.raises(ConfigError, match="encoder/proj, which filter_fn does not select"):
    masks.sparsity_of({**mask, "w": jnp.ones((2, 2), bool)})


def test_equal_selections_share_a_compilation():
  params = {"a": {"kernel": _normal(6, 5)}, "b": {"kernel": _normal(5, 4), "bias": _normal(4)}}
  before = unstructured._magnitude_mask._cache_size()
  got = [masks.magnitude(params, 0.5, filter_fn=lambda p, l: l.ndim == 2) for _ in range(3)]
  got.append(masks.magnitude(params, 0.5, filter_fn=masks.make_filter_fn(exclude=["bias"])))
  assert unstructured._magnitude_mask._cache_size() == before + 1
  for m in got[1:]:
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(m), jax.tree.leaves(got[0])))


# ----------------------------------------------------------------------------------------------
# Structured masks in every layout, against NumPy.
# ----------------------------------------------------------------------------------------------


def _ref_units(norms_U, k):
  """Keep flags: the ``k`` units of lowest norm go, ties to the lower index."""
  keep = np.ones(norms_U.shape, bool)
  keep[np.argsort(norms_U, kind="stable")[:k]] = False
  return keep


def test_neurons_of_equinox_linear_layers_are_rows():
  model = eqx.nn.Sequential([eqx.nn.Linear(5, 8, key=jax.random.key(0)),
                             eqx.nn.Linear(8, 6, key=jax.random.key(1))])
  params, _ = eqx.partition(model, eqx.is_inexact_array)
  m = masks.neurons(params, 0.5)  # no head in the tree: every layer is pruned.
  for i, units in enumerate([8, 6]):
    w = np.asarray(params.layers[i].weight)
    keep = _ref_units(np.sum(w.astype(np.float64) ** 2, axis=1), units // 2)
    np.testing.assert_array_equal(m.layers[i].weight, np.broadcast_to(keep[:, None], w.shape))
    np.testing.assert_array_equal(m.layers[i].bias, keep)
  flax_layout = {"l": {"kernel": params.layers[0].weight.T, "bias": params.layers[0].bias}}
  np.testing.assert_array_equal(masks.neurons(flax_layout, 0.5)["l"]["kernel"],
                                np.asarray(m.layers[0].weight).T)


def test_channels_of_equinox_and_haiku_convs():
  conv = eqx.nn.Conv2d(3, 6, 3, key=jax.random.key(0))  # weight (6, 3, 3, 3), bias (6, 1, 1).
  params, _ = eqx.partition(conv, eqx.is_inexact_array)
  m = masks.channels({"conv": params}, 0.5, criterion="l1")
  w = np.asarray(params.weight)
  keep = _ref_units(np.abs(w.astype(np.float64)).reshape(6, -1).sum(1), 3)
  np.testing.assert_array_equal(m["conv"].weight, np.broadcast_to(keep[:, None, None, None],
                                                                  w.shape))
  np.testing.assert_array_equal(m["conv"].bias, keep[:, None, None])
  hk_params = {"conv2_d": {"w": jnp.transpose(params.weight, (2, 3, 1, 0)),
                           "b": params.bias.reshape(6)}}
  hm = masks.channels(hk_params, 0.5, criterion="l1")
  np.testing.assert_array_equal(hm["conv2_d"]["b"], keep)
  np.testing.assert_array_equal(hm["conv2_d"]["w"], np.broadcast_to(keep, (3, 3, 3, 6)))


def test_neurons_of_dense_general_kernels_use_the_bias_axes():
  params = {"proj": {"kernel": _normal(4, 2, 3), "bias": _normal(2, 3)}}
  m = masks.neurons(params, 0.5)
  k = np.asarray(params["proj"]["kernel"], np.float64)
  keep = _ref_units(np.sum(k ** 2, axis=0).reshape(6), 3).reshape(2, 3)
  np.testing.assert_array_equal(m["proj"]["bias"], keep)
  np.testing.assert_array_equal(m["proj"]["kernel"], np.broadcast_to(keep, (4, 2, 3)))


def test_plain_dict_layouts_must_be_given_and_are_checked_against_the_bias():
  w = _normal(8, 5)  # used as x @ w.T: (out, in).
  tree = {"fc": {"W": w, "bias": _normal(8)}}
  with pytest.raises(ConfigError, match="fc/W .*does not tell.*layout='in_out'"):
    masks.neurons(tree, 0.5)
  m = masks.neurons(tree, 0.5, layout="out_in")
  keep = _ref_units(np.sum(np.asarray(w, np.float64) ** 2, axis=1), 4)
  np.testing.assert_array_equal(m["fc"]["bias"], keep)
  by_path = masks.neurons(tree, 0.5, layout={r"^fc/": "out_in"})
  np.testing.assert_array_equal(by_path["fc"]["W"], m["fc"]["W"])
  with pytest.raises(ConfigError, match="has 5 output units.*bias has 8 entries.*'out_in'") as e:
    masks.neurons(tree, 0.5, layout="in_out")
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="looks wrong"):  # an Equinox weight called in_out.
    masks.neurons({"l": {"weight": w, "bias": _normal(8)}}, 0.5, layout="in_out")
  with pytest.raises(ConfigError, match="layout='sideways' is not allowed"):
    masks.neurons(tree, 0.5, layout="sideways")
  with pytest.raises(ConfigError, match="looks wrong"):
    masks.n_m(tree, 2, 4, layout="in_out")


def test_n_m_blocks_run_along_the_input_axis_of_each_layout():
  w = _normal(6, 8)  # Equinox / PyTorch (out, in).
  m = np.asarray(masks.n_m({"l": {"weight": w}}, 2, 4)["l"]["weight"])
  ref = np.ones((6, 8), bool)
  for r in range(6):
    for b in range(2):
      block = np.abs(np.asarray(w))[r, 4 * b:4 * b + 4]
      ref[r, 4 * b + np.argsort(block, kind="stable")[:2]] = False
  np.testing.assert_array_equal(m, ref)
  flax = np.asarray(masks.n_m({"l": {"kernel": w.T}}, 2, 4)["l"]["kernel"])
  np.testing.assert_array_equal(flax, ref.T)
  conv = _normal(4, 8, 3, 3)  # Equinox conv (out, in, h, w): blocks over input channels.
  mc = np.asarray(masks.n_m({"c": {"weight": conv}}, 1, 4)["c"]["weight"])
  assert np.all(mc.reshape(4, 2, 4, 3, 3).sum(axis=2) == 1)
  with pytest.raises(ConfigError, match=r"input dimension 6 \(axis 1\)"):
    masks.n_m({"l": {"weight": w.T}}, 2, 4)


def _head_weights(scales, d, hd):
  """Columns of head ``i`` all equal ``scales[i]``: head norms rank like ``scales``."""
  return np.repeat(np.asarray(scales, np.float32), hd)[None, :] * np.ones((d, 1), np.float32)


def test_heads_of_equinox_haiku_and_nnx_attention():
  scales, d, hd = [0.5, 2.0, 0.1, 1.0], 8, 2  # heads 2 and 0 are the weakest.
  keep = np.array([False, True, False, True])
  qkv = _head_weights(scales, d, hd)  # (D, H * hd), in_out.
  attn = eqx.nn.MultiheadAttention(4, d, qk_size=hd, vo_size=hd, use_query_bias=True,
                                   key=jax.random.key(0))
  attn = eqx.tree_at(lambda a: (a.query_proj.weight, a.key_proj.weight, a.value_proj.weight,
                                a.output_proj.weight),
                     attn, tuple(jax.device_put(w) for w in (qkv.T, qkv.T, qkv.T, qkv)))
  params, _ = eqx.partition({"attn": attn}, eqx.is_inexact_array)
  m = masks.heads(params, 0.5, num_heads=4)["attn"]
  cols = np.repeat(keep, hd)
  np.testing.assert_array_equal(m.query_proj.weight, np.broadcast_to(cols[:, None], (8, d)))
  np.testing.assert_array_equal(m.query_proj.bias, cols)
  np.testing.assert_array_equal(m.output_proj.weight, np.broadcast_to(cols, (d, 8)))
  hk_params = {f"mha/{c}": {"w": jax.device_put(w), "b": jnp.ones(w.shape[1])}
               for c, w in [("query", qkv), ("key", qkv), ("value", qkv), ("linear", qkv.T)]}
  hm = masks.heads(hk_params, 0.5, num_heads=4)
  np.testing.assert_array_equal(hm["mha/value"]["w"], np.broadcast_to(cols, (d, 8)))
  np.testing.assert_array_equal(hm["mha/value"]["b"], cols)
  assert np.all(hm["mha/linear"]["b"])
  mha = nnx.MultiHeadAttention(num_heads=4, in_features=d, qkv_features=8, decode=False,
                               rngs=nnx.Rngs(0))
  for proj in (mha.query, mha.key, mha.value):
    proj.kernel[...] = jax.device_put(qkv.reshape(d, 4, hd))
  mha.out.kernel[...] = jax.device_put(qkv.T.reshape(4, hd, d))
  _, state = nnx.split(mha)
  nm = jax.tree.map(np.asarray, nnx.to_pure_dict(masks.heads(state, 0.5)))  # read on the host
  np.testing.assert_array_equal(nm["query"]["kernel"][0, :, 0], keep)
  np.testing.assert_array_equal(nm["out"]["kernel"][:, 0, 0], keep)
  np.testing.assert_array_equal(nm["value"]["bias"][:, 0], keep)
  narrow = {f"mha/{c}": {"w": jax.device_put(qkv[:, :6]), "b": jnp.ones(6)}
            for c in ("query", "key", "value")}
  narrow["mha/linear"] = {"w": jax.device_put(qkv.T[:6])}
  assert masks.heads(narrow, 0.5, num_heads=2)["mha/query"]["w"].shape == (8, 6)
  with pytest.raises(ConfigError, match="looks wrong"):  # Haiku weights read as (out, in).
    masks.heads(narrow, 0.5, num_heads=2, layout="out_in")
  with pytest.raises(ConfigError, match="no attention module"):
    masks.heads({"dense": {"kernel": jnp.ones((4, 4))}}, 0.5)


def test_trees_that_do_not_match_the_params_are_errors_not_broadcasts():
  params = {"a": {"kernel": _normal(4, 8), "bias": _normal(8)}}
  wide = {"a": {"kernel": _normal(1, 8), "bias": _normal(8)}}  # would broadcast over the rows.
  for call in (lambda: masks.neurons(params, 0.5, scores=wide),
               lambda: masks.heads(params, 0.5, scores=wide),
               lambda: masks.n_m(params, 2, 4, scores=wide)):
    with pytest.raises(ConfigError, match=r"scores leaf a/kernel has shape \(1, 8\)"):
      call()
  with pytest.raises(ConfigError, match="num_pruned is neither"):
    masks.threshold_mask(params, {"a": 1})
  with pytest.raises(ConfigError, match=r"mask leaf a/kernel has shape \(1, 8\)"):
    masks.apply_mask(params, jax.tree.map(lambda l: jnp.ones(l.shape, bool), wide))
  model = MLP(num_classes=3, hidden=(8,))
  mlp = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 2, 2, 1)))["params"]
  mlp = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), mlp)
  row = jax.tree.map(lambda l: jnp.ones((1,) + l.shape[1:], bool), mlp)
  with pytest.raises(ConfigError, match="compact: mask leaf"):
    masks.compact(model, mlp, row)
