"""Pretrained GPT-2 checkpoints (Hugging Face layout) as prunejax :class:`GPTClassifier` params.

A checkpoint directory as ``huggingface-cli download openai-community/gpt2`` (or ``gpt2-medium``,
``gpt2-large``, ``gpt2-xl``) leaves it: ``config.json`` and ``model.safetensors`` (or a sharded
``model.safetensors.index.json``), plus ``vocab.json`` and ``merges.txt`` for the tokenizer
(:func:`prunejax.data.text.gpt2_tokenizer`). Tensors are read with ``safetensors``' NumPy API (no
PyTorch) and nothing is downloaded.

The mapping (Radford et al. 2019; Hugging Face ``GPT2Model``): ``wte`` and ``wpe`` are the token
and learned position tables; each block's ``attn.c_attn`` is a fused Conv1D whose ``(in, out)``
weight ``[D, 3D]`` splits into our ``query``, ``key`` and ``value`` kernels (in that order),
``attn.c_proj`` is our ``out``, ``mlp.c_fc`` / ``mlp.c_proj`` our ``mlp_fc`` / ``mlp_proj``; Conv1D
weights are already ``(in, out)`` like Flax kernels, so nothing is transposed. LayerNorms ``ln_1``,
``ln_2``, ``ln_f`` map ``weight`` to ``scale``. The LM head is tied to ``wte`` and not used; a new
linear classification head is initialized from ``key``. Keys may carry the ``transformer.`` prefix
of ``GPT2LMHeadModel`` saves or none (``GPT2Model``); the causal-mask buffers (``attn.bias``,
``attn.masked_bias``), ``lm_head`` and other task heads are skipped.

Padding: GPT-2 has no pad token. By default the pad id is a new id ``vocab_size`` whose embedding
row is zeros; it is never attended to or read, so it gets no gradient. Hugging Face users pad with
``<|endoftext|>`` (``pad_id=50256``) and pass an attention mask: both work, on either side (see
:class:`GPTClassifier`). The classifier reads the last real token (``pooling="last_token"``, Hugging
Face's rule): the end-of-text token that :func:`prunejax.data.text.encode` appends when the pad is
a new id, the last text token when the pad is the end-of-text token. Pass ``tokenizer=`` to take
pad and eos from the tokenizer, so that they agree by construction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import (ConfigError, DataError, check_choice, check_positive_int,
                             check_range)
from prunejax.models.gpt import POOLINGS, GPTClassifier
from prunejax.models.precision import dtype_of

# Hugging Face architectures whose base model is GPT2Model (their extra heads are skipped).
ARCHITECTURES = ("GPT2Model", "GPT2LMHeadModel", "GPT2DoubleHeadsModel",
                 "GPT2ForSequenceClassification", "GPT2ForTokenClassification",
                 "GPT2ForQuestionAnswering")
# Both are GELU with the tanh approximation (``gelu_new`` is GPT-2's own).
ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh")
_SKIPPED = re.compile(r"^(h\.\d+\.attn\.(bias|masked_bias)|lm_head\..*|score\..*|"
                      r"multiple_choice_head\..*|qa_outputs\..*|classifier\..*)$")
_PREFIX = "transformer."
# GPTClassifier fields a pretrained model may set (they leave the params' structure unchanged).
_FIELDS = ("compute_dtype", "param_dtype", "remat")


@dataclasses.dataclass(frozen=True)
class GPT2Config:
  """The fields of a Hugging Face GPT-2 ``config.json`` that define the network."""

  vocab_size: int
  n_positions: int
  n_embd: int
  n_layer: int
  n_head: int
  n_inner: int | None = None
  layer_norm_epsilon: float = 1e-5
  embd_pdrop: float = 0.1
  attn_pdrop: float = 0.1
  resid_pdrop: float = 0.1
  activation_function: str = "gelu_new"

  @property
  def mlp_dim(self) -> int:
    return self.n_inner or 4 * self.n_embd


def _config_error(path: str, field: str, value: Any, expected: str) -> DataError:
  return DataError(f"{path}: {field}={value!r} is not supported; expected {expected}")


def gpt2_config_from_dict(d: dict, *, source: str = "config.json") -> GPT2Config:
  """A :class:`GPT2Config` from a parsed ``config.json``, checked field by field.

  Args:
    d: the parsed JSON object.
    source: the file name used in error messages.

  Returns:
    The config. Optional fields take Hugging Face's ``GPT2Config`` defaults.

  Raises:
    DataError: ``model_type`` is not ``gpt2``, an architecture is not a GPT-2 one, a shape field is
      missing or not a positive integer, or an option prunejax's GPT does not implement is set
      (another activation, unscaled or layer-scaled attention, cross-attention).
  """
  if not isinstance(d, dict):
    raise DataError(f"{source}: expected a JSON object, got {type(d).__name__}")
  if d.get("model_type") != "gpt2":
    raise _config_error(source, "model_type", d.get("model_type"), "'gpt2'")
  archs = d.get("architectures") or []
  for a in archs if isinstance(archs, list) else [archs]:
    if a not in ARCHITECTURES:
      raise _config_error(source, "architectures", a, "one of " + ", ".join(ARCHITECTURES))
  if "n_positions" not in d and "n_ctx" in d:
    d = {**d, "n_positions": d["n_ctx"]}
  ints = {}
  for field in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
    v = d.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
      raise _config_error(source, field, v, "a positive integer")
    ints[field] = v
  if ints["n_embd"] % ints["n_head"]:
    raise _config_error(source, "n_head", ints["n_head"],
                        f"a divisor of n_embd={ints['n_embd']}")
  n_inner = d.get("n_inner")
  if n_inner is not None and (isinstance(n_inner, bool) or not isinstance(n_inner, int)
                              or n_inner <= 0):
    raise _config_error(source, "n_inner", n_inner, "null or a positive integer")
  act = d.get("activation_function", "gelu_new")
  if act not in ACTIVATIONS:
    raise _config_error(source, "activation_function", act,
                        "one of " + ", ".join(map(repr, ACTIVATIONS)))
  for field, allowed in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
    if d.get(field, allowed) != allowed:
      raise _config_error(source, field, d[field], repr(allowed))
  floats = {}
  for field, default, hi in (("layer_norm_epsilon", 1e-5, np.inf), ("embd_pdrop", 0.1, 1.0),
                             ("attn_pdrop", 0.1, 1.0), ("resid_pdrop", 0.1, 1.0)):
    v = d.get(field, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < hi:
      raise _config_error(source, field, v, f"a number in [0, {hi})")
    floats[field] = float(v)
  return GPT2Config(**ints, n_inner=n_inner, activation_function=act, **floats)


def read_gpt2_config(checkpoint_dir: str) -> GPT2Config:
  """Reads and checks ``checkpoint_dir/config.json`` (see :func:`gpt2_config_from_dict`)."""
  path = os.path.join(checkpoint_dir, "config.json")
  if not os.path.isdir(checkpoint_dir):
    raise DataError(f"GPT-2 checkpoint directory {checkpoint_dir!r} does not exist; download one "
                    "with: huggingface-cli download openai-community/gpt2 --local-dir DIR")
  if not os.path.exists(path):
    raise DataError(f"GPT-2 checkpoint {checkpoint_dir!r} has no config.json; expected a Hugging "
                    "Face GPT-2 directory (config.json, model.safetensors, vocab.json, merges.txt)")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{path} is not valid JSON ({type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''})") from None
  return gpt2_config_from_dict(d, source=path)


def gpt2_tensor_shapes(config: GPT2Config) -> dict[str, tuple[int, ...]]:
  """The shape of every tensor of a Hugging Face ``GPT2Model`` with ``config``, by name.

  Names carry no ``transformer.`` prefix; Conv1D weights are ``(in, out)``. The sum of their sizes
  is the model's parameter count with a tied LM head (124,439,808 for GPT-2 small).
  """
  d, m = config.n_embd, config.mlp_dim
  shapes = {"wte.weight": (config.vocab_size, d), "wpe.weight": (config.n_positions, d)}
  for i in range(config.n_layer):
    shapes.update({
        f"h.{i}.ln_1.weight": (d,), f"h.{i}.ln_1.bias": (d,),
        f"h.{i}.attn.c_attn.weight": (d, 3 * d), f"h.{i}.attn.c_attn.bias": (3 * d,),
        f"h.{i}.attn.c_proj.weight": (d, d), f"h.{i}.attn.c_proj.bias": (d,),
        f"h.{i}.ln_2.weight": (d,), f"h.{i}.ln_2.bias": (d,),
        f"h.{i}.mlp.c_fc.weight": (d, m), f"h.{i}.mlp.c_fc.bias": (m,),
        f"h.{i}.mlp.c_proj.weight": (m, d), f"h.{i}.mlp.c_proj.bias": (d,),
    })
  shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
  return shapes


def gpt2_classifier(config: GPT2Config, num_classes: int, *, context: int | None = None,
                    pad_id: int | None = None, dropout: float | None = None,
                    pooling: str = "last_token", eos_id: int | None = None,
                    tokenizer: Any = None, **fields: Any) -> GPTClassifier:
  """The :class:`GPTClassifier` with the architecture of ``config`` and a ``num_classes`` head.

  Args:
    config: a GPT-2 config (:func:`read_gpt2_config`).
    num_classes: outputs of the new classification head.
    context: longest sequence, at most ``config.n_positions`` (default: ``n_positions``).
    pad_id: the padding id. Default ``config.vocab_size``: a new id after the vocabulary, whose
      embedding row the loader adds as zeros. An id below ``vocab_size`` (e.g. end-of-text, 50256)
      reuses that token's row and masks every occurrence of it.
    dropout: one rate for the embedding, attention and residual dropout; default (None) the
      checkpoint's ``embd_pdrop``, ``attn_pdrop`` and ``resid_pdrop``.
    pooling: ``"last_token"`` (default, Hugging Face's ``GPT2ForSequenceClassification``: the last
      real token), ``"eos"`` (the last real ``eos_id``) or ``"mean"``; see :class:`GPTClassifier`.
    eos_id: the end-of-text id (default: the tokenizer's, else ``vocab_size - 1``, GPT-2's
      ``<|endoftext|>``).
    tokenizer: a :class:`prunejax.data.text.Tokenizer` (e.g. ``gpt2_tokenizer`` of the same
      directory): ``pad_id`` and ``eos_id`` are taken from it, so the two agree by construction,
      and its ``vocab_size`` must equal the model's.
    **fields: further :class:`GPTClassifier` fields that do not change the architecture:
      ``compute_dtype``, ``param_dtype``, ``remat``.

  Raises:
    ConfigError: ``num_classes``, ``context``, ``pad_id``, ``eos_id``, ``pooling`` or ``dropout``
      out of range, a field other than those three, or a tokenizer that disagrees (its
      ``vocab_size`` is not the model's, or ``pad_id`` given besides it).
  """
  pad_id, eos_id = _tokenizer_ids(tokenizer, pad_id, eos_id)
  extra = sorted(set(fields) - set(_FIELDS))
  if extra:
    raise ConfigError(f"gpt2_classifier got field {extra[0]!r}; a pretrained GPT-2's "
                      "architecture comes from its config.json, only "
                      f"{', '.join(map(repr, _FIELDS))} may be set")
  check_positive_int("num_classes", num_classes)
  context = config.n_positions if context is None else context
  check_positive_int("context", context)
  if context > config.n_positions:
    raise ConfigError(f"context={context} is out of range; this GPT-2 checkpoint has "
                      f"n_positions={config.n_positions}")
  pad_id, eos_id = _special_ids(config, pad_id, eos_id)
  check_choice("pooling", pooling, POOLINGS)
  rates = _dropout_rates(config, dropout)
  model = GPTClassifier(
      vocab_size=config.vocab_size + (pad_id == config.vocab_size), num_classes=num_classes,
      context=context, depth=config.n_layer, width=config.n_embd, num_heads=config.n_head,
      head_dim=config.n_embd // config.n_head, mlp_dim=config.mlp_dim, pad_id=pad_id,
      eos_id=eos_id, pooling=pooling, ln_epsilon=config.layer_norm_epsilon, embd_dropout=rates[0],
      attn_dropout=rates[1], resid_dropout=rates[2], **fields)
  if tokenizer is not None and tokenizer.vocab_size != model.vocab_size:
    raise ConfigError(f"the tokenizer's vocab_size={tokenizer.vocab_size} (ids it may emit, pad "
                      f"included) differs from the model's vocab_size={model.vocab_size} "
                      f"(config.json's {config.vocab_size} plus a new pad row if pad_id="
                      f"{config.vocab_size}); use the tokenizer of this checkpoint")
  return model


def _tokenizer_ids(tokenizer: Any, pad_id: int | None, eos_id: int | None
                   ) -> tuple[int | None, int | None]:
  """``(pad_id, eos_id)`` from the tokenizer when one is given (an ``eos_id`` given wins; a
  ``pad_id`` given must agree with the tokenizer's)."""
  if tokenizer is None:
    return pad_id, eos_id
  if pad_id is not None and pad_id != tokenizer.pad_id:
    raise ConfigError(f"pad_id={pad_id!r} disagrees with the tokenizer's pad_id="
                      f"{tokenizer.pad_id}; pass one of them")
  return tokenizer.pad_id, tokenizer.eos_id if eos_id is None else eos_id


def _special_ids(config: GPT2Config, pad_id: int | None, eos_id: int | None) -> tuple[int, int]:
  """Checked ``(pad_id, eos_id)``, defaults ``vocab_size`` (a new pad row) and ``vocab_size - 1``
  (GPT-2's ``<|endoftext|>``)."""
  pad_id = config.vocab_size if pad_id is None else pad_id
  if (isinstance(pad_id, bool) or not isinstance(pad_id, int)
      or not 0 <= pad_id <= config.vocab_size):
    raise ConfigError(f"pad_id={pad_id!r} is out of range; expected an integer in "
                      f"[0, {config.vocab_size}] ({config.vocab_size} adds a new pad row)")
  eos_id = config.vocab_size - 1 if eos_id is None else eos_id
  if isinstance(eos_id, bool) or not isinstance(eos_id, int) or not 0 <= eos_id < config.vocab_size:
    raise ConfigError(f"eos_id={eos_id!r} is out of range; expected an integer in "
                      f"[0, {config.vocab_size})")
  return pad_id, eos_id


def _dropout_rates(config: GPT2Config, dropout: float | None) -> tuple[float, float, float]:
  """(embedding, attention, residual) dropout: the checkpoint's, or ``dropout`` for all three."""
  if dropout is None:
    return (config.embd_pdrop, config.attn_pdrop, config.resid_pdrop)
  check_range("dropout", dropout, 0.0, 1.0, hi_open=True)
  return (float(dropout),) * 3


class _TensorFiles:
  """Read access to the tensors of ``model.safetensors`` or a sharded index, by stored key."""

  def __init__(self, checkpoint_dir: str):
    import safetensors
    single = os.path.join(checkpoint_dir, "model.safetensors")
    index = os.path.join(checkpoint_dir, "model.safetensors.index.json")
    if os.path.exists(single):
      files = {single: None}
    elif os.path.exists(index):
      try:
        with open(index, encoding="utf-8") as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{index} is not a safetensors index with a 'weight_map' "
                        f"({type(e).__name__})") from None
      files = {os.path.join(checkpoint_dir, name): None
               for name in sorted(set(weight_map.values()))}
    else:
      other = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
               if os.path.exists(os.path.join(checkpoint_dir, n))]
      hint = f" (found {other[0]}; save it as safetensors)" if other else ""
      raise DataError(f"GPT-2 checkpoint {checkpoint_dir!r} has no model.safetensors or "
                      f"model.safetensors.index.json{hint}")
    self.where: dict[str, str] = {}
    self.shapes: dict[str, tuple[int, ...]] = {}
    self.dtypes: dict[str, str] = {}
    for path in files:
      try:
        with safetensors.safe_open(path, framework="np") as f:
          for k in f.keys():
            s = f.get_slice(k)
            self.where[k], self.shapes[k] = path, tuple(s.get_shape())
            self.dtypes[k] = s.get_dtype()
      except Exception as e:  # noqa: BLE001 - safetensors raises several types for a bad file.
        raise DataError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None

  def get(self, key: str) -> np.ndarray:
    import safetensors
    with safetensors.safe_open(self.where[key], framework="np") as f:
      return np.asarray(f.get_tensor(key), np.float32)


def _check_tensors(files: _TensorFiles, config: GPT2Config, checkpoint_dir: str) -> dict[str, str]:
  """Maps each expected tensor name to its stored key, after checking presence, shape and dtype."""
  expected = gpt2_tensor_shapes(config)
  stored: dict[str, str] = {}
  for key in files.shapes:
    name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
    if name in stored:
      raise DataError(f"GPT-2 checkpoint {checkpoint_dir!r} stores tensor {name!r} twice (as "
                      f"{stored[name]!r} and {key!r})")
    stored[name] = key
  prefix = _PREFIX if any(k.startswith(_PREFIX) for k in files.shapes) else ""
  where = (f"n_layer={config.n_layer}, n_embd={config.n_embd}, n_inner={config.mlp_dim}, "
           f"vocab_size={config.vocab_size}, n_positions={config.n_positions} in config.json")
  for name, shape in expected.items():
    if name not in stored:
      raise DataError(f"GPT-2 checkpoint {checkpoint_dir!r} has no tensor {prefix + name!r}; "
                      f"expected shape {shape} ({where})")
    key = stored[name]
    if files.shapes[key] != shape:
      raise DataError(f"GPT-2 checkpoint tensor {key!r} has shape {files.shapes[key]}; expected "
                      f"{shape} ({where}; Conv1D weights are (in, out))")
    if files.dtypes[key] not in ("F16", "BF16", "F32", "F64"):
      raise DataError(f"GPT-2 checkpoint tensor {key!r} has dtype {files.dtypes[key]}; expected "
                      "a floating-point dtype (F16, BF16, F32, F64)")
  for name, key in stored.items():
    if name not in expected and not _SKIPPED.match(name):
      raise DataError(f"GPT-2 checkpoint {checkpoint_dir!r} has unexpected tensor {key!r} with "
                      f"shape {files.shapes[key]}; expected only GPT-2 tensors for {where}")
  return {name: stored[name] for name in expected}


def load_gpt2_classifier(checkpoint_dir: str, num_classes: int, *, key: jax.Array,
                         context: int | None = None, dropout: float | None = None,
                         pad_id: int | None = None, pooling: str = "last_token",
                         eos_id: int | None = None, tokenizer: Any = None,
                         **fields: Any) -> tuple[GPTClassifier, dict]:
  """A :class:`GPTClassifier` and its params from a Hugging Face GPT-2 checkpoint directory.

  Every tensor of the checkpoint is checked (present, shape from ``config.json``, floating dtype)
  before any is loaded; weights are converted to float32 (or ``param_dtype``). The classification
  head (``head``: kernel ``[n_embd, num_classes]``, bias) is new, initialized from ``key`` with the
  model's own initializers.

  Args:
    checkpoint_dir: a directory with ``config.json`` and ``model.safetensors`` (or a sharded
      ``model.safetensors.index.json``), any of gpt2, gpt2-medium, gpt2-large, gpt2-xl or a smaller
      GPT-2-shaped model.
    num_classes: outputs of the classification head.
    key: PRNG key of the head's initialization.
    context: longest sequence (default: the checkpoint's ``n_positions``); the position table is cut
      to its first ``context`` rows.
    dropout: one dropout rate for all three sites; default (None) the checkpoint's ``embd_pdrop``,
      ``attn_pdrop`` and ``resid_pdrop``. Dropout acts only with ``train=True``.
    pad_id: see :func:`gpt2_classifier` (default: a new id ``vocab_size``, zero embedding row).
    pooling, eos_id, tokenizer: see :func:`gpt2_classifier`. Pass the tokenizer that encodes the
      inputs (``prunejax.data.text.gpt2_tokenizer(checkpoint_dir, pad_id=...)``) so that pad, eos
      and the vocabulary agree by construction.
    **fields: ``compute_dtype``, ``param_dtype``, ``remat`` of the model (see
      :func:`gpt2_classifier`); the weights are converted to ``param_dtype`` (default float32).

  Returns:
    ``(model, params)``: ``params`` has exactly the structure, shapes and dtypes of
    ``model.init(key, tokens, train=False)["params"]``, so
    ``model.apply({"params": params}, tokens)`` gives logits ``f32[B, num_classes]`` for
    right-padded tokens ``i32[B, T]``, ``T <= context``.

  Raises:
    DataError: a missing file, an unsupported ``config.json`` (see
      :func:`gpt2_config_from_dict`), or a missing, misshapen, non-float or unexpected tensor (one
      line naming it and what was expected).
    ConfigError: ``num_classes``, ``context``, ``pad_id`` or ``dropout`` out of range.

  References:
    Radford et al. 2019, "Language Models are Unsupervised Multitask Learners".
  """
  config = read_gpt2_config(checkpoint_dir)
  model = gpt2_classifier(config, num_classes, context=context, pad_id=pad_id, dropout=dropout,
                          pooling=pooling, eos_id=eos_id, tokenizer=tokenizer, **fields)
  files = _TensorFiles(checkpoint_dir)
  keys = _check_tensors(files, config, checkpoint_dir)
  params = _classifier_params(model, config, lambda name: files.get(keys[name]))
  d = config.n_embd
  params["head"] = nn.Dense(num_classes).init(key, jnp.zeros((1, d), jnp.float32))["params"]
  param_dtype = dtype_of("param_dtype", model.param_dtype)
  params = jax.tree.map(lambda a: jnp.asarray(a, param_dtype), params)
  _check_structure(model, params)
  return model, params


def _classifier_params(model: GPTClassifier, config: GPT2Config, get) -> dict:
  """Our GPT's params (head aside) from the checkpoint's tensors, ``get(hf_name)``: the fused
  ``c_attn`` split into query/key/value, Conv1D weights kept (in, out), a zero row for a new pad."""
  d = config.n_embd
  wte = get("wte.weight")
  if model.vocab_size > config.vocab_size:
    wte = np.concatenate([wte, np.zeros((model.vocab_size - config.vocab_size, d), np.float32)])
  ln = lambda name: {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}
  dense = lambda name: {"kernel": get(f"{name}.weight"), "bias": get(f"{name}.bias")}
  params: dict[str, Any] = {"wte": {"embedding": wte}, "wpe": get("wpe.weight")[: model.context]}
  for i in range(config.n_layer):
    qkv_w, qkv_b = get(f"h.{i}.attn.c_attn.weight"), get(f"h.{i}.attn.c_attn.bias")
    params[f"block_{i}"] = {
        "ln_1": ln(f"h.{i}.ln_1"),
        "attn": {
            "query": {"kernel": qkv_w[:, :d], "bias": qkv_b[:d]},
            "key": {"kernel": qkv_w[:, d:2 * d], "bias": qkv_b[d:2 * d]},
            "value": {"kernel": qkv_w[:, 2 * d:], "bias": qkv_b[2 * d:]},
            "out": dense(f"h.{i}.attn.c_proj"),
        },
        "ln_2": ln(f"h.{i}.ln_2"),
        "mlp_fc": dense(f"h.{i}.mlp.c_fc"),
        "mlp_proj": dense(f"h.{i}.mlp.c_proj"),
    }
  params["ln_f"] = ln("ln_f")
  return params


def _check_structure(model: GPTClassifier, params: dict) -> None:
  """Asserts ``params`` matches ``model.init``'s params exactly (shapes by ``jax.eval_shape``)."""
  tokens = jax.ShapeDtypeStruct((1, model.context), jnp.int32)
  want = jax.eval_shape(lambda k, x: model.init(k, x, train=False)["params"], jax.random.key(0),
                        tokens)
  got_paths = {jax.tree_util.keystr(p): (l.shape, l.dtype)
               for p, l in jax.tree_util.tree_leaves_with_path(params)}
  want_paths = {jax.tree_util.keystr(p): (l.shape, l.dtype)
                for p, l in jax.tree_util.tree_leaves_with_path(want)}
  if got_paths != want_paths:  # a bug in this module, not in the checkpoint.
    diff = sorted(set(got_paths.items()) ^ set(want_paths.items()))
    raise AssertionError(f"loaded GPT-2 params do not match GPTClassifier.init: {diff[:3]}")
