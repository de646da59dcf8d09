"""A GPT-2-style transformer classifier (Radford et al. 2019).

Token and learned position embeddings, ``depth`` pre-LayerNorm blocks of causal multi-head
self-attention and a GELU (tanh approximation) MLP, a final LayerNorm, and a linear head on the
hidden state of the last real (non-padding) token. Padding is right-padding with ``pad_id``: padded
keys are masked out of attention, so a padded sequence gives the same logits as the unpadded one.

``num_heads``, ``head_dim`` and ``mlp_dim`` are separate fields so that structured pruning can
compact the model to fewer heads or MLP neurons. The optional tied LM head (``lm_head=True``) is
only used to count parameters against GPT-2 "small" (124M). Pretrained GPT-2 weights load with
:func:`prunejax.models.load_gpt2_classifier`.

Dropout follows GPT-2: on the summed embeddings (``embd_dropout``), on the attention probabilities
(``attn_dropout``) and on the residual branches after the attention and MLP output projections
(``resid_dropout``). It is active only with ``train=True`` and a rate above 0, and then draws from
the Flax rng stream ``"dropout"`` (``model.apply(..., train=True, rngs={"dropout": key})``). The
rates default to 0, where the model is exactly the dropout-free one and needs no rng.

Mixed precision (:mod:`prunejax.models.precision`): the projections, attention products and the
MLP compute in ``compute_dtype``; the residual stream (embeddings plus every block's output), the
LayerNorm statistics, the attention softmax and the logits are float32. (A bfloat16 residual stream
rounds every block's sum; on a small model it made the error of the loss against float32 three
times and that of GraNd twice as large.) ``remat=True`` rematerializes each block
(``jax.checkpoint``): its activations are recomputed in the backward pass instead of being stored.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prunejax.errors import check_range
from prunejax.models.precision import at_least_float32, is_narrow, module_dtypes


def _attention_probs(logits_BxHxTxT: jax.Array, allowed: jax.Array, head_dim: int,
                     dtype: Any) -> jax.Array:
  """``softmax(logits / sqrt(head_dim))`` over the allowed keys, in float32, cast to ``dtype``."""
  logits_BxHxTxT = at_least_float32(logits_BxHxTxT)
  logits_BxHxTxT = logits_BxHxTxT / jnp.sqrt(head_dim).astype(logits_BxHxTxT.dtype)
  logits_BxHxTxT = jnp.where(allowed, logits_BxHxTxT, jnp.finfo(logits_BxHxTxT.dtype).min)
  probs = jax.nn.softmax(logits_BxHxTxT, axis=-1)
  return probs if dtype is None else probs.astype(dtype)


# In a narrow compute dtype the float32 softmax and LayerNorms are recomputed in the backward pass
# from their narrow inputs, so that no float32 copy of an activation is kept for it.
_narrow_attention_probs = jax.checkpoint(_attention_probs, static_argnums=(2, 3))
_RematLayerNorm = nn.remat(nn.LayerNorm)


class Attention(nn.Module):
  num_heads: int
  head_dim: int
  width: int
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h_BxTxD: jax.Array, keep_BxT: jax.Array, train: bool = False) -> jax.Array:
    b, t, _ = h_BxTxD.shape
    inner = self.num_heads * self.head_dim
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    split = lambda z: z.reshape(b, t, self.num_heads, self.head_dim)
    q = split(dense(inner, "query")(h_BxTxD))
    k = split(dense(inner, "key")(h_BxTxD))
    v = split(dense(inner, "value")(h_BxTxD))
    logits_BxHxTxT = jnp.einsum("bqhd,bkhd->bhqk", q, k)
    causal_TxT = jnp.tril(jnp.ones((t, t), bool))
    allowed_Bx1xTxT = causal_TxT[None, None] & keep_BxT[:, None, None, :]
    # A query row with no allowed key (a padding query at position 0 of an all-pad row) attends to
    # itself so softmax stays finite; such rows never reach the classifier.
    allowed_Bx1xTxT = allowed_Bx1xTxT | jnp.eye(t, dtype=bool)[None, None]
    # The scaling and the softmax run in float32 whatever the compute dtype.
    if is_narrow(self.dtype):
      probs = _narrow_attention_probs(logits_BxHxTxT, allowed_Bx1xTxT, self.head_dim,
                                      jnp.dtype(self.dtype))
    else:
      probs = _attention_probs(logits_BxHxTxT, allowed_Bx1xTxT, self.head_dim, None)
    probs = nn.Dropout(self.attn_dropout, name="attn_drop")(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v).reshape(b, t, inner)
    out = dense(self.width, "out")(out)
    return nn.Dropout(self.resid_dropout, name="resid_drop")(out, deterministic=not train)


class Block(nn.Module):
  num_heads: int
  head_dim: int
  width: int
  mlp_dim: int
  ln_epsilon: float = 1e-5
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  dtype: Any = None
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, keep_BxT, train: bool = False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    layer_norm = _RematLayerNorm if is_narrow(self.dtype) else nn.LayerNorm
    ln = lambda name: layer_norm(epsilon=self.ln_epsilon, name=name, **kw)
    h = h + Attention(self.num_heads, self.head_dim, self.width, self.attn_dropout,
                      self.resid_dropout, name="attn", **kw)(ln("ln_1")(h), keep_BxT, train)
    z = ln("ln_2")(h)
    z = nn.Dense(self.mlp_dim, name="mlp_fc", **kw)(z)
    z = nn.gelu(z, approximate=True)
    z = nn.Dense(self.width, name="mlp_proj", **kw)(z)
    return h + nn.Dropout(self.resid_dropout, name="mlp_drop")(z, deterministic=not train)


# static_argnums counts self: (self, h, keep_BxT, train); train is a Python bool.
_RematBlock = nn.remat(Block, static_argnums=(3,))


class GPTClassifier(nn.Module):
  """GPT-2-style classifier: right-padded tokens ``i32[B, T]`` to logits ``f32[B, num_classes]``.

  Attributes:
    vocab_size: rows of the token embedding (including the pad id's row).
    num_classes: outputs of the classification head.
    context: the longest sequence (rows of the learned position table).
    depth: number of transformer blocks.
    width: hidden size.
    num_heads: attention heads per block.
    head_dim: size of each head (default ``width // num_heads``).
    mlp_dim: hidden size of the MLP (default ``4 * width``).
    pad_id: the padding token; ``tokens != pad_id`` is the attention mask, and the head reads the
      last position that is not padding.
    lm_head: add the tied LM head's use of the embedding (no parameters), only for parameter counts.
    ln_epsilon: LayerNorm epsilon (GPT-2: ``layer_norm_epsilon``, 1e-5).
    embd_dropout: dropout rate on the summed token and position embeddings (GPT-2: ``embd_pdrop``).
    attn_dropout: dropout rate on the attention probabilities (GPT-2: ``attn_pdrop``).
    resid_dropout: dropout rate on the attention and MLP output projections before they are added to
      the residual stream (GPT-2: ``resid_pdrop``).
    compute_dtype: dtype of the embeddings, projections and residual stream (None: that of the
      params); see :mod:`prunejax.models.precision`.
    param_dtype: dtype of the params.
    remat: recompute each block's activations in the backward pass (``jax.checkpoint``).
  """

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
  ln_epsilon: float = 1e-5
  embd_dropout: float = 0.0
  attn_dropout: float = 0.0
  resid_dropout: float = 0.0
  compute_dtype: Any = None
  param_dtype: Any = "float32"
  remat: bool = False

  def setup_dims(self):
    head_dim = self.head_dim or self.width // self.num_heads
    return head_dim, self.mlp_dim or 4 * self.width

  @nn.compact
  def __call__(self, tokens_BxT: jax.Array, train: bool = False,
               mask: jax.Array | None = None) -> jax.Array:
    """Logits ``f32[B, num_classes]``; dropout is active only with ``train=True``.

    ``mask`` (the batch's padding-row mask) is accepted for the trainer's uniform call and unused:
    rows never interact in this model.
    """
    del mask
    for field in ("embd_dropout", "attn_dropout", "resid_dropout"):
      check_range(f"GPTClassifier.{field}", getattr(self, field), 0.0, 1.0, hi_open=True)
    cd, pd = module_dtypes(self)
    head_dim, mlp_dim = self.setup_dims()
    b, t = tokens_BxT.shape
    tokens_BxT = tokens_BxT.astype(jnp.int32)
    keep_BxT = tokens_BxT != self.pad_id
    wte = nn.Embed(self.vocab_size, self.width, name="wte", dtype=cd, param_dtype=pd,
                   embedding_init=nn.initializers.normal(0.02))
    wpe = self.param("wpe", nn.initializers.normal(0.01), (self.context, self.width), pd)
    # The residual stream is float32; each block reads it through a LayerNorm in compute dtype.
    h = at_least_float32(wte(tokens_BxT)) + at_least_float32(wpe[None, :t])
    h = nn.Dropout(self.embd_dropout, name="drop")(h, deterministic=not train)
    block = _RematBlock if self.remat else Block
    for i in range(self.depth):
      h = block(self.num_heads, head_dim, self.width, mlp_dim, self.ln_epsilon, self.attn_dropout,
                self.resid_dropout, cd, pd, name=f"block_{i}")(h, keep_BxT, train)
    layer_norm = _RematLayerNorm if is_narrow(cd) else nn.LayerNorm
    h = layer_norm(epsilon=self.ln_epsilon, dtype=cd, param_dtype=pd, name="ln_f")(h)
    if self.lm_head:  # tied output embedding: adds no parameters, used only for counting.
      _ = wte.attend(h[:, :1])
    last = jnp.maximum(keep_BxT.sum(axis=1) - 1, 0)
    h_last_BxD = jnp.take_along_axis(h, last[:, None, None], axis=1)[:, 0]
    head = nn.Dense(self.num_classes, dtype=cd, param_dtype=pd, name="head")
    return at_least_float32(head(h_last_BxD))
