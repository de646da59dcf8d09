"""A GPT-2-style transformer classifier (Radford et al. 2019).

Token and learned position embeddings, ``depth`` pre-LayerNorm blocks of causal multi-head
self-attention and a GELU MLP, a final LayerNorm, and a linear head on the hidden state of the last
real (non-padding) token. Padding is right-padding with ``pad_id``: padded keys are masked out of
attention, so a padded sequence gives the same logits as the unpadded one.

``num_heads``, ``head_dim`` and ``mlp_dim`` are separate fields so that structured pruning can compact
the model to fewer heads or MLP neurons. The optional tied LM head (``lm_head=True``) is only used to
count parameters against GPT-2 "small" (124M).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class Attention(nn.Module):
  num_heads: int
  head_dim: int
  width: int

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array, keep_BxT: jax.Array) -> jax.Array:
    b, t, _ = h_BxTxD.shape
    inner = self.num_heads * self.head_dim
    split = lambda z: z.reshape(b, t, self.num_heads, self.head_dim)
    q = split(nn.Dense(inner, name="query")(h_BxTxD))
    k = split(nn.Dense(inner, name="key")(h_BxTxD))
    v = split(nn.Dense(inner, name="value")(h_BxTxD))
    logits_BxHxTxT = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(self.head_dim).astype(q.dtype)
    causal_TxT = jnp.tril(jnp.ones((t, t), bool))
    allowed = causal_TxT[None, None] & keep_BxT[:, None, None, :]
    # A query row with no allowed key (a padding query at position 0 of an all-pad row) attends to
    # itself so softmax stays finite; such rows never reach the classifier.
    allowed = allowed | jnp.eye(t, dtype=bool)[None, None]
    logits_BxHxTxT = jnp.where(allowed, logits_BxHxTxT, jnp.finfo(logits_BxHxTxT.dtype).min)
    probs = jax.nn.softmax(logits_BxHxTxT, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, inner)
    return nn.Dense(self.width, name="out")(out)


class Block(nn.Module):
  num_heads: int
  head_dim: int
  width: int
  mlp_dim: int

  @nn.compact
  def __call__(self, h, keep_BxT):
    h = h + Attention(self.num_heads, self.head_dim, self.width, name="attn")(
        nn.LayerNorm(epsilon=1e-5, name="ln_1")(h), keep_BxT)
    z = nn.LayerNorm(epsilon=1e-5, name="ln_2")(h)
    z = nn.Dense(self.mlp_dim, name="mlp_fc")(z)
    z = nn.gelu(z, approximate=True)
    return h + nn.Dense(self.width, name="mlp_proj")(z)


class GPTClassifier(nn.Module):
  """Args: vocab_size, num_classes, context (max tokens), depth, width, num_heads, head_dim (default
  width // num_heads), mlp_dim (default 4 * width), pad_id, lm_head (tied, for parameter counts)."""

  vocab_size: int = 8192
  num_classes: int = 2
  context: int = 64
  depth: int = 2
  width: int = 128
  num_heads: int = 4
  head_dim: int | None = None
  mlp_dim: int | None = None
  pad_id: int = 0
  lm_head: bool = False

  def setup_dims(self):
    head_dim = self.head_dim or self.width // self.num_heads
    return head_dim, self.mlp_dim or 4 * self.width

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    del train, mask
    head_dim, mlp_dim = self.setup_dims()
    b, t = tokens_BxT.shape
    tokens_BxT = tokens_BxT.astype(jnp.int32)
    keep_BxT = tokens_BxT != self.pad_id
    wte = nn.Embed(self.vocab_size, self.width, name="wte",
                   embedding_init=nn.initializers.normal(0.02))
    wpe = self.param("wpe", nn.initializers.normal(0.01), (self.context, self.width))
    h = wte(tokens_BxT) + wpe[None, :t]
    for i in range(self.depth):
      h = Block(self.num_heads, head_dim, self.width, mlp_dim, name=f"block_{i}")(h, keep_BxT)
    h = nn.LayerNorm(epsilon=1e-5, name="ln_f")(h)
    if self.lm_head:  # tied output embedding: adds no parameters, used only for counting.
      _ = wte.attend(h[:, :1])
    last = jnp.maximum(keep_BxT.sum(axis=1) - 1, 0)
    h_last_BxD = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    return nn.Dense(self.num_classes, name="head")(h_last_BxD)
