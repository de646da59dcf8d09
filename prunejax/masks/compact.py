"""Compaction: a structured-pruned model rebuilt as a physically smaller dense model.

A unit is removable when, after the mask is applied, its whole incoming kernel slice and its bias
are exactly zero: its pre-activation is then zero, its activation ``f(0) = 0`` (ReLU, GELU,
max-pool) and everything it feeds receives zeros. :func:`prunejax.masks.structured.neurons` and
:func:`~prunejax.masks.structured.heads` produce exactly such masks. The compacted model drops
those units and the matching input rows of the next layer, so its logits equal the masked model's
(up to the order of float additions).

Supported: :class:`~prunejax.models.MLP` (hidden neurons), :class:`~prunejax.models.CNN` (conv
channels and the hidden dense layer) and :class:`~prunejax.models.GPTClassifier` (attention heads,
whose value projection is zero, and MLP neurons). The GPT has one ``num_heads`` and one ``mlp_dim``
for all blocks, so each block keeps as many heads (neurons) as the block that keeps most; the extra
ones are removable units, which contribute exactly zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prunejax.errors import ConfigError
from prunejax.masks.core import check_mask
from prunejax.models.cnn import CNN
from prunejax.models.gpt import GPTClassifier
from prunejax.models.mlp import MLP
from prunejax.types import Mask, Params


def _to_numpy(tree: Any) -> Any:
  """A nested plain-dict copy with NumPy leaves."""
  if isinstance(tree, dict) or hasattr(tree, "items"):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)


def _to_jax(tree: Any) -> Any:
  return jax.tree.map(jnp.asarray, tree)


def _alive(kernel_XxU: np.ndarray, bias_U: np.ndarray | None) -> np.ndarray:
  """Indices of units (last axis) with a nonzero incoming weight or bias; at least one is kept."""
  alive = np.any(kernel_XxU.reshape(-1, kernel_XxU.shape[-1]) != 0, axis=0)
  if bias_U is not None:
    alive |= bias_U != 0
  kept = np.flatnonzero(alive)
  return kept if kept.size else np.array([0])


def _compact_mlp(model: MLP, p: dict) -> tuple[nn.Module, dict]:
  kept_prev = None
  widths = []
  for i in range(len(model.hidden)):
    layer = p[f"dense_{i}"]
    if kept_prev is not None:
      layer["kernel"] = layer["kernel"][kept_prev]
    kept = _alive(layer["kernel"], layer.get("bias"))
    layer["kernel"] = layer["kernel"][:, kept]
    if "bias" in layer:
      layer["bias"] = layer["bias"][kept]
    widths.append(int(kept.size))
    kept_prev = kept
  if kept_prev is not None:
    p["head"]["kernel"] = p["head"]["kernel"][kept_prev]
  return model.clone(hidden=tuple(widths)), p


def _compact_cnn(model: CNN, p: dict) -> tuple[nn.Module, dict]:
  kept_prev = None
  features = []
  for i in range(len(model.features)):
    conv = p[f"conv_{i}"]
    if kept_prev is not None:
      conv["kernel"] = conv["kernel"][:, :, kept_prev, :]
    kept = _alive(conv["kernel"], conv.get("bias"))
    conv["kernel"] = conv["kernel"][..., kept]
    if "bias" in conv:
      conv["bias"] = conv["bias"][kept]
    features.append(int(kept.size))
    kept_prev = kept
  dense = p["dense_0"]
  if kept_prev is not None:
    # The flattened input of dense_0 is (H, W, C) row-major: channel c of position s is row s*C + c.
    c_last = model.features[-1]
    k = dense["kernel"]
    k = k.reshape(k.shape[0] // c_last, c_last, k.shape[1])[:, kept_prev, :]
    dense["kernel"] = k.reshape(-1, k.shape[-1])
  kept = _alive(dense["kernel"], dense.get("bias"))
  dense["kernel"] = dense["kernel"][:, kept]
  if "bias" in dense:
    dense["bias"] = dense["bias"][kept]
  p["head"]["kernel"] = p["head"]["kernel"][kept]
  return model.clone(features=tuple(features), dense=int(kept.size)), p


def _pad_to(kept: np.ndarray, total: int, size: int) -> np.ndarray:
  """``kept`` extended with the first other (removable) indices up to ``size`` entries, sorted."""
  extra = np.setdiff1d(np.arange(total), kept)[: size - kept.size]
  return np.sort(np.concatenate([kept, extra]))


def _compact_gpt(model: GPTClassifier, p: dict) -> tuple[nn.Module, dict]:
  num_heads = model.num_heads
  blocks = [p[f"block_{i}"] for i in range(model.depth)]
  inner = blocks[0]["attn"]["query"]["kernel"].shape[1]
  head_dim = inner // num_heads
  mlp_dim = blocks[0]["mlp_fc"]["kernel"].shape[1]
  kept_heads, kept_mlp = [], []
  for blk in blocks:
    v = blk["attn"]["value"]
    v_kernel = v["kernel"].reshape(-1, num_heads, head_dim).transpose(0, 2, 1)  # [D, hd, H]
    v_bias = v.get("bias")
    v_bias = None if v_bias is None else np.any(v_bias.reshape(num_heads, head_dim) != 0, axis=1)
    kept_heads.append(_alive(v_kernel, v_bias))
    kept_mlp.append(_alive(blk["mlp_fc"]["kernel"], blk["mlp_fc"].get("bias")))
  new_heads = max(k.size for k in kept_heads)
  new_mlp = max(k.size for k in kept_mlp)
  for blk, kh, km in zip(blocks, kept_heads, kept_mlp):
    kh = _pad_to(kh, num_heads, new_heads)
    cols = (kh[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)
    for name in ("query", "key", "value"):
      proj = blk["attn"][name]
      proj["kernel"] = proj["kernel"][:, cols]
      if "bias" in proj:
        proj["bias"] = proj["bias"][cols]
    blk["attn"]["out"]["kernel"] = blk["attn"]["out"]["kernel"][cols]
    km = _pad_to(km, mlp_dim, new_mlp)
    blk["mlp_fc"]["kernel"] = blk["mlp_fc"]["kernel"][:, km]
    if "bias" in blk["mlp_fc"]:
      blk["mlp_fc"]["bias"] = blk["mlp_fc"]["bias"][km]
    blk["mlp_proj"]["kernel"] = blk["mlp_proj"]["kernel"][km]
  return model.clone(num_heads=int(new_heads), head_dim=int(head_dim), mlp_dim=int(new_mlp)), p


def compact(model: nn.Module, params: Params, mask: Mask | None = None) -> tuple[nn.Module, Params]:
  """A smaller dense model with the outputs of ``model`` with ``params`` masked by ``mask``.

  Args:
    model: an :class:`MLP`, :class:`CNN` or :class:`GPTClassifier`.
    params: its Flax params dict (``variables["params"]``).
    mask: a mask with the structure of ``params`` (e.g. from :func:`~prunejax.masks.neurons` or
      :func:`~prunejax.masks.heads`); ``None`` compacts units that are already zero.

  Returns:
    ``(new_model, new_params)``: the model with fewer hidden neurons, channels, heads or MLP
    neurons, and its params (host-built, placed on the default device).

  Raises:
    ConfigError: the model type is not supported, or ``mask`` does not have the structure and
      leaf shapes of ``params``.
  """
  if mask is not None:
    check_mask(mask, params, "compact: mask")
  p = _to_numpy(jax.device_get(params))
  if mask is not None:
    p = jax.tree.map(lambda x, k: np.where(k, x, np.zeros_like(x)), p,
                     _to_numpy(jax.device_get(mask)))
  if isinstance(model, MLP):
    new_model, p = _compact_mlp(model, p)
  elif isinstance(model, CNN):
    new_model, p = _compact_cnn(model, p)
  elif isinstance(model, GPTClassifier):
    new_model, p = _compact_gpt(model, p)
  else:
    raise ConfigError(f"compact supports MLP, CNN and GPTClassifier, not {type(model).__name__}")
  return new_model, _to_jax(p)
