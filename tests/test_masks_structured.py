"""Structured masks: neurons, channels, heads and N:M, on hand-made kernels."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import masks
from prunejax.errors import ConfigError
from prunejax.models import GPTClassifier

_K = np.array([[1.0, 0.0, 3.0, 0.5],
               [1.0, 2.0, 0.0, 0.5],
               [1.0, 0.0, 0.0, 0.5]], np.float32)  # L1: 3, 2, 3, 1.5; squared L2: 3, 4, 9, 0.75.


def _dense(kernel):
  return {"kernel": jnp.asarray(kernel), "bias": jnp.ones((np.shape(kernel)[-1],))}


@pytest.mark.parametrize("criterion,keep", [("l1", [True, False, True, False]),
                                            ("l2", [False, True, True, False])])
def test_neurons_by_norm_mask_kernel_columns_and_bias(criterion, keep):
  params = {"dense_0": _dense(_K), "head": _dense(np.ones((4, 2)))}
  m = masks.neurons(params, 0.5, criterion=criterion)
  np.testing.assert_array_equal(m["dense_0"]["kernel"], np.broadcast_to(keep, (3, 4)))
  np.testing.assert_array_equal(m["dense_0"]["bias"], keep)
  assert np.all(m["head"]["kernel"]) and np.all(m["head"]["bias"])  # the classes stay.


def test_neurons_ties_scores_and_global_scope():
  params = {"a": _dense(np.ones((2, 4))), "b": _dense(np.full((2, 2), 3.0))}
  m = masks.neurons(params, 0.5)
  np.testing.assert_array_equal(m["a"]["bias"], [False, False, True, True])  # ties: lower first.
  np.testing.assert_array_equal(m["b"]["bias"], [False, True])
  scores = {"a": {"kernel": jnp.asarray([[4.0, 3.0, 2.0, 1.0]] * 2), "bias": jnp.zeros(4)},
            "b": {"kernel": jnp.asarray([[0.0, 9.0]] * 2), "bias": jnp.zeros(2)}}
  m = masks.neurons(params, 0.5, scores=scores, scope="global")  # 3 of 6 units over both.
  np.testing.assert_array_equal(m["a"]["bias"], [True, True, False, False])
  np.testing.assert_array_equal(m["b"]["bias"], [False, True])


def test_channels_of_conv_kernels():
  kernel = np.ones((2, 2, 3, 4), np.float32) * np.array([1.0, 0.1, 2.0, 0.2], np.float32)
  m = masks.channels({"conv_0": _dense(kernel)}, 0.5)
  np.testing.assert_array_equal(m["conv_0"]["bias"], [True, False, True, False])
  np.testing.assert_array_equal(m["conv_0"]["kernel"][1, 0, 2], [True, False, True, False])


def _attention(d, h, hd, weights_per_head):
  """A Dense-style attention module whose head ``i`` has all weights ``weights_per_head[i]``."""
  cols = np.repeat(np.asarray(weights_per_head, np.float32), hd)
  qkv = {"kernel": jnp.asarray(np.tile(cols, (d, 1))), "bias": jnp.ones((h * hd,))}
  return {"query": qkv, "key": qkv, "value": qkv,
          "out": {"kernel": jnp.asarray(np.tile(cols[:, None], (1, d))), "bias": jnp.ones((d,))}}


def test_heads_dense_kernels():
  params = {"attn": _attention(d=3, h=2, hd=2, weights_per_head=[0.1, 1.0])}
  m = masks.heads(params, 0.5, num_heads=2)
  for name in ("query", "key", "value"):
    np.testing.assert_array_equal(m["attn"][name]["kernel"], np.tile([False] * 2 + [True] * 2,
                                                                     (3, 1)))
    np.testing.assert_array_equal(m["attn"][name]["bias"], [False, False, True, True])
  np.testing.assert_array_equal(m["attn"]["out"]["kernel"][:, 0], [False, False, True, True])
  assert np.all(m["attn"]["out"]["bias"])
  with pytest.raises(ConfigError, match="num_heads"):
    masks.heads(params, 0.5)


def test_heads_dense_general_kernels_of_flax_attention():
  layer = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=8)
  x = jnp.ones((1, 3, 8))
  params = jax.jit(layer.init)(jax.random.key(0), x, x)["params"]
  m = masks.heads(params, 0.5)
  assert m["query"]["kernel"].shape == (8, 4, 2) and m["out"]["kernel"].shape == (4, 2, 8)
  kept = np.asarray(m["query"]["kernel"][0, :, 0])
  assert kept.sum() == 2
  np.testing.assert_array_equal(m["value"]["bias"][:, 0], kept)
  np.testing.assert_array_equal(m["out"]["kernel"][:, 0, 0], kept)


def test_heads_of_gpt_blocks_layerwise_and_global():
  gpt = GPTClassifier(vocab_size=16, num_classes=2, context=4, depth=2, width=8, num_heads=4)
  params = jax.jit(gpt.init)(jax.random.key(0), jnp.ones((1, 4), jnp.int32))["params"]
  heads_kept = lambda m, b: int(np.sum(m[f"block_{b}"]["attn"]["value"]["bias"])) // 2
  m = masks.heads(params, 0.5, num_heads=4)
  assert [heads_kept(m, b) for b in range(2)] == [2, 2]
  m = masks.heads(params, 0.25, num_heads=4, scope="global")
  assert sum(heads_kept(m, b) for b in range(2)) == 6


def test_n_m_pattern_hand_made():
  column = np.array([1.0, 4.0, 2.0, 3.0, 5.0, 5.0, 5.0, 5.0], np.float32)
  params = {"dense": _dense(np.stack([column, -column], axis=1))}
  m = masks.n_m(params, 2, 4)
  expected = [False, True, False, True, False, False, True, True]  # ties: lower index pruned.
  np.testing.assert_array_equal(m["dense"]["kernel"][:, 0], expected)
  np.testing.assert_array_equal(m["dense"]["kernel"][:, 1], expected)
  assert np.all(m["dense"]["bias"])


def test_n_m_on_conv_input_channels_and_errors():
  rng = np.random.default_rng(0)
  params = {"conv": _dense(rng.standard_normal((3, 3, 8, 5)).astype(np.float32)),
            "head": _dense(rng.standard_normal((12, 2)).astype(np.float32))}
  m = masks.n_m(params, 2, 4)
  blocks = np.asarray(m["conv"]["kernel"]).reshape(3, 3, 2, 4, 5)
  assert np.all(blocks.sum(axis=3) == 2)
  w = np.abs(np.asarray(params["conv"]["kernel"])).reshape(3, 3, 2, 4, 5)
  kept_min = np.where(blocks, w, np.inf).min(axis=3)
  pruned_max = np.where(blocks, -np.inf, w).max(axis=3)
  assert np.all(pruned_max <= kept_min)
  assert np.all(np.asarray(m["head"]["kernel"]).reshape(3, 4, 2).sum(axis=1) == 2)
  with pytest.raises(ConfigError, match="divisible"):
    masks.n_m(params, 2, 5)
  with pytest.raises(ConfigError, match="n="):
    masks.n_m(params, 5, 4)
