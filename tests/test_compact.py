"""Compaction: structured-pruned MLP, CNN and GPT rebuilt smaller, with the masked logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import masks
from prunejax.errors import ConfigError
from prunejax.models import CNN, MLP, GPTClassifier, param_count, resnet20


def _random_params(model, x, seed=0):
  """Random params with the model's structure, drawn on the host (a jitted init compiles slowly)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes)


_both = jax.jit(lambda a, b: jax.tree.map(jnp.logical_and, a, b))


def _logits(model, params, x):
  return np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x))


def _check(model, params, mask, x):
  small, small_params = masks.compact(model, params, mask)
  np.testing.assert_allclose(_logits(small, small_params, x),
                             _logits(model, masks.apply_mask(params, mask), x), atol=1e-5,
                             rtol=1e-5)
  assert param_count(small, x) < param_count(model, x)
  return small, small_params


def test_mlp_neurons_compact_to_half_width():
  model = MLP(num_classes=3, hidden=(16, 12))
  x = jax.random.normal(jax.random.key(1), (5, 4, 4, 1))
  params = _random_params(model, x)
  mask = masks.neurons(params, 0.5)
  small, small_params = _check(model, params, mask, x)
  assert tuple(small.hidden) == (8, 6)
  assert small_params["dense_1"]["kernel"].shape == (8, 6)
  # Unstructured sparsity on top of the structured mask survives compaction exactly.
  both = _both(mask, masks.magnitude(params, 0.3))
  _check(model, params, both, x)


def test_cnn_channels_and_dense_compact():
  model = CNN(num_classes=3, features=(4, 6), dense=8)
  x = jax.random.normal(jax.random.key(1), (2, 8, 8, 3))
  params = _random_params(model, x)
  small, _ = _check(model, params, masks.channels(params, 0.5), x)
  assert tuple(small.features) == (2, 3) and small.dense == 4


@pytest.fixture(scope="module")
def gpt():
  model = GPTClassifier(vocab_size=32, num_classes=3, context=8, depth=2, width=16, num_heads=4)
  tokens = jax.random.randint(jax.random.key(1), (3, 8), 1, 32)
  tokens = tokens.at[0, 5:].set(0)  # right padding.
  return model, _random_params(model, tokens), tokens


def test_gpt_heads_and_mlp_compact(gpt):
  model, params, tokens = gpt
  heads = masks.heads(params, 0.5, num_heads=4)
  mlp = masks.neurons(params, 0.5, filter_fn=masks.make_filter_fn(include=[r"mlp_fc/"]))
  small, small_params = _check(model, params, _both(heads, mlp), tokens)
  assert (small.num_heads, small.head_dim, small.mlp_dim) == (2, 4, 32)
  assert small_params["block_0"]["attn"]["query"]["kernel"].shape == (16, 8)
  assert small_params["block_0"]["attn"]["out"]["kernel"].shape == (8, 16)


def test_gpt_uneven_blocks_pad_with_removed_heads(gpt):
  model, params, tokens = gpt
  # Tiny attention weights in block 0: global pruning of 2 of 8 heads takes both from block 0,
  # which then keeps 2 heads while block 1 keeps 4; block 0 is padded with 2 removed (zero) heads.
  attn = params["block_0"]["attn"]
  params = {**params, "block_0": {**params["block_0"], "attn": {
      k: {**v, "kernel": v["kernel"] * 0.01} for k, v in attn.items()}}}
  mask = masks.heads(params, 0.25, num_heads=4, scope="global")
  assert int(np.sum(mask["block_0"]["attn"]["value"]["bias"])) == 2 * 4
  mlp = masks.neurons(params, 0.5, scope="global",
                      filter_fn=masks.make_filter_fn(include=[r"mlp_fc/"]))
  small, _ = _check(model, params, _both(mask, mlp), tokens)
  assert small.num_heads == 4 and small.mlp_dim < 64


def test_compact_rejects_unsupported_models():
  model = resnet20(10, width_multiplier=0.25)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 8, 8, 3)))["params"]
  with pytest.raises(ConfigError, match="ResNet"):
    masks.compact(model, params, None)
