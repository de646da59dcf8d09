"""A GPT-2-style transformer classifier (Radford et al. 2019).

Token and learned position embeddings, ``depth`` pre-LayerNorm blocks of causal multi-head
self-attention and a GELU (tanh approximation) MLP, a final LayerNorm, and a linear head on a
pooled hidden state (``pooling``: the last real token by default, as Hugging Face's
``GPT2ForSequenceClassification``). An attention mask (Hugging Face semantics, padding on either
side) or, without one, ``tokens != pad_id`` masks padded keys out of attention and positions follow
the mask, so a padded sequence gives the logits of the unpadded one. :func:`make_features_fn` gives
the pooled representation and every layer's hidden states.

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

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError, DataError, check_choice, check_range
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


POOLINGS = ("last_token", "eos", "mean")
"""How :class:`GPTClassifier` pools a sequence into one vector: the last real token (Hugging Face
``GPT2ForSequenceClassification``), the last real end-of-text token, or the mean of the real
positions."""


def _is_traced(a: Any) -> bool:
  return isinstance(a, jax.core.Tracer)


def check_token_ids(tokens: Any, vocab_size: int, *, field: str = "input_ids") -> None:
  """Raises one :class:`DataError` naming the first token id outside ``[0, vocab_size)``.

  Host arrays (NumPy, lists) are checked on the host; a device array is checked on its device (one
  jitted reduction to a flag, the first bad position and its id; only those three scalars are
  copied back). Tracers cannot be checked (the model then looks such ids up as a zero row and
  raises a flag, see :class:`GPTClassifier`): check the batch before the jitted call.

  Args:
    tokens: integer token ids of any shape.
    vocab_size: the number of rows of the embedding (ids must lie in ``[0, vocab_size)``).
    field: the name used in the error.

  Raises:
    DataError: a non-integer dtype or an id out of range (its value, where, and ``vocab_size``).
  """
  if _is_traced(tokens):
    return
  if isinstance(tokens, jax.Array):
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise DataError(f"{field} has dtype {tokens.dtype}; expected integer token ids")
    if tokens.size == 0:
      return
    # A concrete array closed over by a traced function: evaluate now, or give up if it is traced.
    with jax.ensure_compile_time_eval():
      found = _first_bad(tokens, vocab_size)
    if _is_traced(found):
      return
    bad, first, value = (int(v) for v in jax.device_get(found))
    where = np.unravel_index(first, tokens.shape)
  else:
    arr = np.asarray(tokens)
    if not np.issubdtype(arr.dtype, np.integer):
      raise DataError(f"{field} has dtype {arr.dtype}; expected integer token ids")
    out = (arr < 0) | (arr >= vocab_size)
    bad = int(out.sum())
    if not bad:
      return
    where = np.unravel_index(int(np.argmax(out)), arr.shape)
    value = int(arr[where])
  if bad:
    at = ", ".join(str(int(i)) for i in where)
    raise DataError(f"{field} holds token id {value} at [{at}] ({bad} ids in all) outside "
                    f"[0, {vocab_size}), the model's vocab_size={vocab_size}; encode with the "
                    "tokenizer the model was built for (its pad_id and vocab_size)")


@functools.partial(jax.jit, static_argnums=1)
def _first_bad(tokens: jax.Array, vocab_size: int) -> jax.Array:
  flat = tokens.reshape(-1).astype(jnp.int64 if jax.config.jax_enable_x64 else jnp.int32)
  out = (flat < 0) | (flat >= vocab_size)
  first = jnp.argmax(out)
  return jnp.stack([out.sum(), first, flat[first]])


def split_inputs(x: Any, mask: Any = None) -> tuple[Any, Any, bool]:
  """``(tokens_BxT, attention_mask_BxT or None, explicit)`` from a model input.

  ``x`` is token ids ``[B, T]`` or a mapping with ``input_ids`` and optionally ``attention_mask``
  (what a Hugging Face tokenizer returns). ``mask`` is an attention mask ``[B, T]`` (Hugging Face
  semantics: True/1 at real tokens), or a padding-row mask ``[B]`` (the trainer's; rows never
  interact in this model, so it is ignored). Without an attention mask the model uses
  ``tokens != pad_id`` (``explicit`` False).

  Raises:
    DataError: ids not ``[B, T]``, a mask of another shape, a non-bool/int mask or one with values
      other than 0/1, a mask given twice, or a mapping with other keys.
  """
  attn = None
  if isinstance(x, Mapping):
    unknown = sorted(set(x) - {"input_ids", "attention_mask"})
    if "input_ids" not in x or unknown:
      raise DataError(f"GPT input mapping has keys {sorted(x)}; expected 'input_ids' and "
                      "optionally 'attention_mask'")
    tokens, attn = x["input_ids"], x.get("attention_mask")
  else:
    tokens = x
  if jnp.ndim(tokens) != 2:
    raise DataError(f"input_ids has shape {jnp.shape(tokens)}; expected token ids [B, T]")
  if mask is not None and jnp.ndim(mask) == 2:
    if attn is not None:
      raise DataError("the attention mask was given twice (x['attention_mask'] and mask=); pass "
                      "one")
    attn = mask
  elif mask is not None and jnp.shape(mask) != jnp.shape(tokens)[:1]:
    raise DataError(f"mask has shape {jnp.shape(mask)}; expected an attention mask "
                    f"{tuple(jnp.shape(tokens))} or a row mask {tuple(jnp.shape(tokens)[:1])}")
  if attn is not None:
    if jnp.shape(attn) != jnp.shape(tokens):
      raise DataError(f"attention_mask has shape {jnp.shape(attn)}; expected the shape of "
                      f"input_ids {tuple(jnp.shape(tokens))}")
    dt = jnp.result_type(attn)
    if not (jnp.issubdtype(dt, jnp.integer) or jnp.issubdtype(dt, jnp.bool_)):
      raise DataError(f"attention_mask has dtype {dt}; expected bool or 0/1 integers")
    if not _is_traced(attn):
      a = np.asarray(attn)
      if a.size and not np.isin(a, (0, 1)).all():
        raise DataError(f"attention_mask holds {a[~np.isin(a, (0, 1))].reshape(-1)[0]}; "
                        "expected 0/1 (or bool)")
  return tokens, attn, attn is not None


def _last_index(flags_BxT: jax.Array) -> jax.Array:
  """Index of the last True of each row (0 for a row without one)."""
  t = flags_BxT.shape[1]
  idx = jnp.where(flags_BxT, jnp.arange(t)[None], -1).max(axis=1)
  return jnp.maximum(idx, 0)


def _checked_tokens(tokens_BxT: Any, mask: Any, context: int, vocab_size: int, pad_id: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(tokens i32[B, T], keep bool[B, T], in_range bool[B, T])`` from the model's inputs: keep is
  the attention mask when given, else the non-``pad_id`` tokens.

  Raises:
    DataError: more positions than ``context``, ids that are not integers or (outside a trace)
      outside ``[0, vocab_size)``.
  """
  tokens_BxT, attn_BxT, explicit = split_inputs(tokens_BxT, mask)
  _, t = jnp.shape(tokens_BxT)
  if t > context:
    raise DataError(f"input_ids has {t} positions, more than the model's context={context}; "
                    f"truncate the sequences to at most {context} tokens")
  check_token_ids(tokens_BxT, vocab_size)
  if not jnp.issubdtype(jnp.result_type(tokens_BxT), jnp.integer):
    raise DataError(f"input_ids has dtype {jnp.result_type(tokens_BxT)}; expected integer ids")
  tokens_BxT = jnp.asarray(tokens_BxT).astype(jnp.int32)
  keep_BxT = (jnp.asarray(attn_BxT).astype(bool) if explicit else tokens_BxT != pad_id)
  in_range_BxT = (tokens_BxT >= 0) & (tokens_BxT < vocab_size)
  return tokens_BxT, keep_BxT, in_range_BxT


def _positions(keep_BxT: jax.Array) -> jax.Array:
  """i32[B, T] position ids. Positions count real tokens only (Hugging Face's cumsum(mask) - 1),
  so left padding does not shift them; a padding position (never read) counts from the first real
  token, so that right padding keeps arange(T) everywhere."""
  arange_1xT = jnp.arange(keep_BxT.shape[1], dtype=jnp.int32)[None]
  first_Bx1 = jnp.argmax(keep_BxT, axis=1).astype(jnp.int32)[:, None]
  return jnp.where(keep_BxT, jnp.cumsum(keep_BxT, axis=1, dtype=jnp.int32) - 1,
                   jnp.maximum(arange_1xT - first_Bx1, 0))


class GPTClassifier(nn.Module):
  """GPT-2-style classifier: tokens ``i32[B, T]`` to logits ``f32[B, num_classes]``.

  **Inputs.** ``x`` is token ids ``i32[B, T]`` (``T <= context``), or a mapping
  ``{"input_ids": i32[B, T], "attention_mask": [B, T]}`` as a Hugging Face tokenizer returns it;
  the attention mask may also be passed as ``mask=`` (``[B, T]``). With an attention mask (Hugging
  Face semantics, True/1 at real tokens) padding may be on either side and any id may pad (e.g.
  GPT-2's ``<|endoftext|>``); without one, ``tokens != pad_id`` is the mask.

  **Masking.** Masked keys are never attended to, and positions follow the mask (``position_ids =
  cumsum(mask) - 1``, as Hugging Face users pass for left padding), so a real token's hidden state
  does not depend on the padding around it, on either side (to float32 rounding).

  **Pooling** (``pooling``): ``"last_token"`` (default; Hugging Face's
  ``GPT2ForSequenceClassification``) reads the last real position; ``"eos"`` the last real position
  holding ``eos_id`` (a row without one, e.g. truncated, reads its last real position);
  ``"mean"`` averages the real positions. All read the hidden states after the final LayerNorm.

  **Token ids** outside ``[0, vocab_size)`` raise a :class:`prunejax.errors.DataError` naming the id
  and ``vocab_size`` when the ids are concrete (host arrays, or device arrays outside ``jit``,
  checked on the device by :func:`check_token_ids`). Under ``jit`` they cannot raise: they are
  looked up as a zero row (never NaN) and the flag ``bad_token_ids`` (``bool[B]``) is sown into the
  ``"flags"`` collection (``model.apply(..., mutable=["flags"])``); check such batches first with
  :func:`check_token_ids`. A sequence longer than ``context`` is a one-line ``DataError``.

  Attributes:
    vocab_size: rows of the token embedding (including a new pad id's row): ids lie in
      ``[0, vocab_size)``, as :attr:`prunejax.data.text.Tokenizer.vocab_size`.
    num_classes: outputs of the classification head.
    context: the longest sequence (rows of the learned position table).
    depth: number of transformer blocks.
    width: hidden size.
    num_heads: attention heads per block.
    head_dim: size of each head (default ``width // num_heads``).
    mlp_dim: hidden size of the MLP (default ``4 * width``).
    pad_id: the padding token; without an explicit attention mask, ``tokens != pad_id`` is the
      mask.
    eos_id: the end-of-text token, read by ``pooling="eos"`` (None: unset).
    pooling: one of :data:`POOLINGS`.
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
  eos_id: int | None = None
  pooling: str = "last_token"
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

  def _check_fields(self) -> None:
    for field in ("embd_dropout", "attn_dropout", "resid_dropout"):
      check_range(f"GPTClassifier.{field}", getattr(self, field), 0.0, 1.0, hi_open=True)
    check_choice("GPTClassifier.pooling", self.pooling, POOLINGS)
    if self.pooling == "eos" and self.eos_id is None:
      raise ConfigError("GPTClassifier.pooling='eos' needs eos_id (the end-of-text token id)")

  @nn.compact
  def __call__(self, tokens_BxT: Any, train: bool = False, mask: jax.Array | None = None, *,
               features: bool = False, hidden_states: bool = False) -> Any:
    """Logits ``f32[B, num_classes]``; dropout is active only with ``train=True``.

    Args:
      tokens_BxT: token ids ``[B, T]``, or ``{"input_ids", "attention_mask"}``.
      train: dropout on.
      mask: an attention mask ``[B, T]`` (True/1 at real tokens), or the batch's padding-row mask
        ``[B]`` (unused: rows never interact).
      features: return ``{"pooled": f32[B, width]}`` (the head's input) instead of the logits.
      hidden_states: with ``features``, also ``"hidden_states"``: ``f32[depth + 1, B, T, width]``,
        Hugging Face's ``output_hidden_states`` (the embeddings, each block's output, the last one
        after the final LayerNorm).
    """
    self._check_fields()
    cd, pd = module_dtypes(self)
    head_dim, mlp_dim = self.setup_dims()
    tokens_BxT, keep_BxT, in_range_BxT = _checked_tokens(tokens_BxT, mask, self.context,
                                                         self.vocab_size, self.pad_id)
    if not self.is_initializing():  # init makes every collection mutable: keep flags out of it
      self.sow("flags", "bad_token_ids", ~in_range_BxT.all(axis=1))
    wte = nn.Embed(self.vocab_size, self.width, name="wte", dtype=cd, param_dtype=pd,
                   embedding_init=nn.initializers.normal(0.02))
    wpe = self.param("wpe", nn.initializers.normal(0.01), (self.context, self.width), pd)
    # An id out of range (only possible under jit, where it cannot raise) reads a zero row, not NaN.
    tok_BxTxD = wte(jnp.where(in_range_BxT, tokens_BxT, 0))
    tok_BxTxD = jnp.where(in_range_BxT[..., None], tok_BxTxD, jnp.zeros((), tok_BxTxD.dtype))
    pos_BxT = _positions(keep_BxT)
    # The residual stream is float32; each block reads it through a LayerNorm in compute dtype.
    h = at_least_float32(tok_BxTxD) + at_least_float32(jnp.take(wpe, pos_BxT, axis=0))
    h = nn.Dropout(self.embd_dropout, name="drop")(h, deterministic=not train)
    block = _RematBlock if self.remat else Block
    states = [h]
    for i in range(self.depth):
      h = block(self.num_heads, head_dim, self.width, mlp_dim, self.ln_epsilon, self.attn_dropout,
                self.resid_dropout, cd, pd, name=f"block_{i}")(h, keep_BxT, train)
      states.append(h)
    layer_norm = _RematLayerNorm if is_narrow(cd) else nn.LayerNorm
    h = layer_norm(epsilon=self.ln_epsilon, dtype=cd, param_dtype=pd, name="ln_f")(h)
    if self.lm_head:  # tied output embedding: adds no parameters, used only for counting.
      _ = wte.attend(h[:, :1])
    pooled_BxD = self._pool(h, tokens_BxT, keep_BxT)
    head = nn.Dense(self.num_classes, dtype=cd, param_dtype=pd, name="head")
    if features:
      out = {"pooled": at_least_float32(pooled_BxD)}
      if hidden_states:
        states[-1] = h
        out["hidden_states"] = jnp.stack([at_least_float32(s) for s in states])
      if self.is_initializing():
        head(pooled_BxD)
      return out
    return at_least_float32(head(pooled_BxD))

  def _pool(self, h_BxTxD: jax.Array, tokens_BxT: jax.Array, keep_BxT: jax.Array) -> jax.Array:
    if self.pooling == "mean":
      w_BxT = keep_BxT.astype(h_BxTxD.dtype)
      total = jnp.einsum("bt,btd->bd", w_BxT, h_BxTxD)
      return total / jnp.maximum(w_BxT.sum(axis=1), 1)[:, None]
    last_B = _last_index(keep_BxT)
    if self.pooling == "eos":
      is_eos_BxT = keep_BxT & (tokens_BxT == self.eos_id)
      last_B = jnp.where(is_eos_BxT.any(axis=1), _last_index(is_eos_BxT), last_B)
    return jnp.take_along_axis(h_BxTxD, last_B[:, None, None], axis=1)[:, 0]


def make_features_fn(model: GPTClassifier) -> Callable[..., dict]:
  """``features(params, x, mask=None, *, hidden_states=False) -> dict``, the model's features.

  ``params`` is the model's params (or its variables ``{"params": ...}``); ``x`` and ``mask`` are
  as :class:`GPTClassifier` takes them. Returns ``{"pooled": f32[B, width]}`` (the representation
  the head reads, pooled by ``model.pooling``) and, with ``hidden_states=True``,
  ``"hidden_states"``: ``f32[depth + 1, B, T, width]`` (embeddings, each block's output, the last
  after the final LayerNorm; Hugging Face's ``output_hidden_states``). For embeddings of a dataset
  (SemDeDup, prototypes, kNN outliers) use ``pooled``, or ``pooling="mean"``.
  """
  if not isinstance(model, GPTClassifier):
    raise ConfigError(f"make_features_fn needs a GPTClassifier; got {type(model).__name__}")

  def features(params: Any, x: Any, mask: Any = None, *, hidden_states: bool = False) -> dict:
    variables = params if isinstance(params, Mapping) and "params" in params else {"params": params}
    return model.apply(variables, x, False, mask, features=True, hidden_states=hidden_states)

  return features
