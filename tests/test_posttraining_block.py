"""Block-sequential post-training pruning (``sequential="block"``, the order of SparseGPT's and
Wanda's code) against a reference ordering written here, on a 2-block GPT; and calibration of the
GPT's Hugging Face-style inputs (attention mask, padding on either side)."""

import jax
import numpy as np
import pytest
from test_posttraining import sparsegpt_ref

from prunejax.errors import ConfigError
from prunejax.masks import posttraining as pt
from prunejax.models import GPTClassifier, init_variables

BLOCKSIZE = 8


def _gpt():
  return GPTClassifier(vocab_size=50, num_classes=2, context=8, depth=2, width=16, num_heads=2,
                       pad_id=0)


def _batches(num=3, rows=6, seed=0, side="right"):
  rng = np.random.default_rng(seed)
  out = []
  for i in range(num):
    lengths = rng.integers(2, 9, rows)
    toks = rng.integers(1, 50, (rows, 8))
    keep = np.arange(8)[None] < lengths[:, None]
    x = np.where(keep, toks, 0).astype(np.int32)
    if side == "left":  # the same sequences, moved to the end of their rows
      x = np.stack([np.roll(r, 8 - n) for r, n in zip(x, lengths)])
    out.append({"x": x, "mask": np.arange(rows) < rows - 1, "id": np.arange(rows) + rows * i})
  return out


def _not_pad(x):
  return x != 0


def _get(tree, name):
  for k in name.split("/"):
    tree = tree[k]
  return tree


def _set(tree, name, value):
  *path, last = name.split("/")
  for k in path:
    tree = tree[k]
  tree[last] = value


def _block_reference(apply_fn, params, batches, sparsity):
  """Block by block, as SparseGPT's opt_sequential: every layer of a block is calibrated on the
  current model (earlier blocks pruned and updated, this block dense), then the block is pruned
  layer by layer with Algorithm 1 in float64."""
  cur = jax.tree.map(lambda a: np.array(a, np.float64), params)
  mask = jax.tree.map(lambda a: np.ones(np.shape(a), bool), params)
  for block in ("block_0", "block_1", "head"):
    as32 = jax.tree.map(lambda a: np.asarray(a, np.float32), cur)
    cal = pt.calibrate(apply_fn, as32, batches, token_mask_fn=_not_pad)
    for layer in cal.layers:
      if not layer.name.startswith(block + "/"):
        continue
      kernel = _get(cur, layer.name)  # Flax (in K, out E)
      h = np.asarray(cal.stats[layer.name].gram, np.float64)[0]
      new_w, pruned = sparsegpt_ref(kernel.T, h, round(sparsity * kernel.size),
                                    blocksize=BLOCKSIZE)
      _set(cur, layer.name, new_w.T)
      _set(mask, layer.name, ~pruned.T)
  return mask, cur


def test_block_sequential_sparsegpt_equals_the_reference_ordering():
  model = _gpt()
  batches = _batches()
  params = init_variables(model, jax.random.key(0), batches[0]["x"])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  with jax.default_matmul_precision("highest"):
    ref_mask, ref_params = _block_reference(apply_fn, params, batches, 0.5)
    mask, new = pt.sparsegpt(apply_fn, params, batches, 0.5, blocksize=BLOCKSIZE,
                             sequential="block", token_mask_fn=_not_pad)
    g_mask, g_new = pt.sparsegpt(apply_fn, params, batches, 0.5, blocksize=BLOCKSIZE,
                                 sequential="group", token_mask_fn=_not_pad)
  layers = pt.linear_layers(apply_fn, params, batches[0]["x"])
  assert pt.sequential_passes(layers, "block") == 3 and pt.sequential_passes(layers, True) == 9
  differs = []
  for layer in layers:
    got_m, ref_m = np.asarray(_get(mask, layer.name)), _get(ref_mask, layer.name)
    np.testing.assert_array_equal(got_m, ref_m, err_msg=layer.name)
    got_w, ref_w = np.asarray(_get(new, layer.name)), _get(ref_params, layer.name)
    np.testing.assert_allclose(got_w, ref_w, atol=2e-4 * np.abs(ref_w).max(), err_msg=layer.name)
    differs.append(not np.allclose(np.asarray(_get(g_new, layer.name)), ref_w,
                                   atol=1e-3 * np.abs(ref_w).max()))
  # The orders agree on the first input group and differ inside the blocks after it.
  assert not differs[0] and differs[4] and differs[5], differs


def test_block_sequential_wanda_equals_the_reference_ordering():
  model = _gpt()
  batches = _batches(seed=1)
  params = init_variables(model, jax.random.key(1), batches[0]["x"])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  mask = pt.wanda(apply_fn, params, batches, 0.5, sequential="block", token_mask_fn=_not_pad)
  # Wanda updates no weight: each block is calibrated on the model with the earlier blocks masked.
  cur = jax.tree.map(np.asarray, params)
  for block in ("block_0", "block_1", "head"):
    cal = pt.calibrate(apply_fn, cur, batches, token_mask_fn=_not_pad, gram=False)
    for layer in cal.layers:
      if not layer.name.startswith(block + "/"):
        continue
      w = np.asarray(_get(cur, layer.name), np.float64)  # (K, E)
      s = np.abs(w) * np.sqrt(np.asarray(cal.stats[layer.name].norms_sq, np.float64)[0])[:, None]
      k = round(0.5 * w.shape[0])
      order = np.argsort(s, axis=0, kind="stable")
      want = np.ones_like(w, bool)
      np.put_along_axis(want, order[:k], False, axis=0)  # per output row (column of the kernel)
      np.testing.assert_array_equal(np.asarray(_get(mask, layer.name)), want, err_msg=layer.name)
      _set(cur, layer.name, np.where(want, w, 0).astype(np.float32))


def test_block_order_errors_are_one_line():
  model = _gpt()
  batches = _batches(num=1)
  params = init_variables(model, jax.random.key(0), batches[0]["x"])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  with pytest.raises(ConfigError, match="sequential='blocks' is not allowed"):
    pt.wanda(apply_fn, params, batches, 0.5, sequential="blocks")
  with pytest.raises(ConfigError, match="block 'even' of block_fn is not contiguous"):
    pt.wanda(apply_fn, params, batches, 0.5, sequential="block",
             block_fn=lambda n: "even" if n.startswith(("block_0", "head")) else "odd")
  with pytest.raises(ConfigError, match="read one input but block_fn puts them in blocks"):
    pt.wanda(apply_fn, params, batches, 0.5, sequential="block", block_fn=lambda n: n)
  # One block for everything is the dense order; a block per input group is the group order.
  one = pt.wanda(apply_fn, params, batches, 0.5, sequential="block", block_fn=lambda n: 0)
  dense = pt.wanda(apply_fn, params, batches, 0.5, sequential=False)
  group_fn = lambda n: n.rsplit("/", 1)[0].replace("query", "qkv").replace("key", "qkv").replace(
      "value", "qkv")
  per_group = pt.wanda(apply_fn, params, batches, 0.5, sequential="block", block_fn=group_fn)
  group = pt.wanda(apply_fn, params, batches, 0.5, sequential=True)
  for a, b in ((one, dense), (per_group, group)):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      np.testing.assert_array_equal(x, y)


def test_calibration_takes_the_attention_mask_and_padding_on_either_side():
  model = _gpt()
  right = _batches(seed=2)
  params = init_variables(model, jax.random.key(2), right[0]["x"])["params"]
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  ref = pt.calibrate(apply_fn, params, right, token_mask_fn=_not_pad)
  for side in ("right", "left"):
    # Pad with a real token id (7) and say where the padding is with the attention mask.
    batches = []
    for b in _batches(seed=2, side=side):
      keep = b["x"] != 0
      batches.append({**b, "x": {"input_ids": np.where(keep, b["x"], 7).astype(np.int32),
                                 "attention_mask": keep}})
    got = pt.calibrate(apply_fn, params, batches)
    for name, stats in ref.stats.items():
      scale = float(np.abs(stats.gram).max())
      np.testing.assert_allclose(got.stats[name].gram, stats.gram, atol=2e-5 * scale,
                                 err_msg=(side, name))
      assert float(got.stats[name].rows) == float(stats.rows)
    np.testing.assert_array_equal(got.ids, ref.ids)
