"""GPT-2 as Hugging Face users hold it: attention masks, padding on either side, pooling, features,
token-id and length errors, and the tokenizer's encode/decode.

References: the float64 NumPy GPT-2 of test_pretrained (written from the paper's equations on the
Hugging Face tensors, never calling prunejax's model), applied to each unpadded sequence; explicit
per-example gradients for GraNd; NumPy pooling over the reference's hidden states (by causality,
the reference's last hidden state on a prefix is the hidden state at that position).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_pretrained import (TINY, random_gpt2_tensors, reference_last_hidden, write_checkpoint,
                             write_tiny_gpt2_dir)

from prunejax import models, scores
from prunejax.data import text
from prunejax.errors import ConfigError, DataError

EOS = TINY["vocab_size"] - 1  # 60, the checkpoint's eos (GPT-2's <|endoftext|> is its last id)
LENGTHS = [16, 1, 5, 9, 12, 3]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  tensors = random_gpt2_tensors(TINY)
  return write_checkpoint(tmp_path_factory.mktemp("gpt2") / "ckpt", TINY, tensors), tensors


def _seqs(seed=1):
  rng = np.random.default_rng(seed)
  # Real tokens never use the eos id, so that eos padding is distinguishable in the eos pooling.
  return [list(rng.integers(0, EOS, n)) for n in LENGTHS]


def _pad(seqs, side, pad_id, t=16):
  ids = np.full((len(seqs), t), pad_id, np.int32)
  mask = np.zeros((len(seqs), t), bool)
  for r, s in enumerate(seqs):
    sl = slice(0, len(s)) if side == "right" else slice(t - len(s), t)
    ids[r, sl], mask[r, sl] = s, True
  return ids, mask


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def _unpadded_logits(model, params, seqs):
  apply = jax.jit(model.apply)  # one compile per length; op-by-op dispatch is ~4x slower here
  return np.stack([np.asarray(apply({"params": params}, {
      "input_ids": np.asarray([s], np.int32), "attention_mask": np.ones((1, len(s)), bool)}))[0]
                   for s in seqs])


@pytest.mark.parametrize("pad", ["eos", "new"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batches_give_the_unpadded_logits(ckpt, side, pad):
  path, tensors = ckpt
  pad_id = EOS if pad == "eos" else TINY["vocab_size"]
  model, params = models.load_gpt2_classifier(path, 3, key=jax.random.key(0), pad_id=pad_id)
  seqs = _seqs()
  ids, mask = _pad(seqs, side, pad_id)
  with jax.default_matmul_precision("highest"):
    ref = _unpadded_logits(model, params, seqs)
    apply = jax.jit(model.apply)
    got = np.asarray(apply({"params": params}, {"input_ids": ids, "attention_mask": mask}))
    got_kw = np.asarray(jax.jit(lambda v, x, m: model.apply(v, x, mask=m))(
        {"params": params}, ids, mask))  # mask= as a keyword
    perm = np.array([3, 0, 5, 1, 4, 2])  # rows in another order: the same logits by row
    got_perm = np.asarray(apply({"params": params}, {"input_ids": ids[perm],
                                                     "attention_mask": mask[perm]}))
  assert _rel(got, ref) <= 1e-5 and _rel(got_kw, ref) <= 1e-5
  np.testing.assert_allclose(got_perm, got[perm], rtol=1e-6, atol=1e-6)
  # And the unpadded logits are GPT-2's (float64 reference, the last real token).
  head_w = np.asarray(params["head"]["kernel"], np.float64)
  head_b = np.asarray(params["head"]["bias"], np.float64)
  ref64 = np.stack([reference_last_hidden(tensors, TINY, s) @ head_w + head_b for s in seqs])
  assert _rel(got, ref64) <= 1e-5
  if pad == "new":  # without a mask, tokens != pad_id is the mask, on either side
    got_nomask = np.asarray(apply({"params": params}, ids))
    assert _rel(got_nomask, ref) <= 1e-5


def test_padding_does_not_change_a_real_tokens_hidden_states(ckpt):
  model, params = models.load_gpt2_classifier(ckpt[0], 2, key=jax.random.key(0), pad_id=EOS)
  features = jax.jit(models.make_features_fn(model), static_argnames="hidden_states")
  seqs = _seqs()
  with jax.default_matmul_precision("highest"):
    for side in ("left", "right"):
      ids, mask = _pad(seqs, side, EOS)
      hs = np.asarray(features(params, {"input_ids": ids, "attention_mask": mask},
                               hidden_states=True)["hidden_states"])
      assert hs.shape == (TINY["n_layer"] + 1, len(seqs), 16, TINY["n_embd"])
      for r, s in enumerate(seqs):  # each row alone, unpadded (compiled once per length)
        one = np.asarray(features(params, np.asarray([s], np.int32), np.ones((1, len(s)), bool),
                                  hidden_states=True)["hidden_states"])[:, 0]
        assert _rel(hs[:, r][:, mask[r]], one) <= 1e-5, (side, r)


def _reference_states(tensors, seq):
  """Final hidden states (after ln_f) at every position of one sequence, float64."""
  return np.stack([reference_last_hidden(tensors, TINY, seq[:i + 1]) for i in range(len(seq))])


@pytest.mark.parametrize("pooling", ["last_token", "eos", "mean"])
def test_pooling_matches_numpy_reference(ckpt, pooling):
  path, tensors = ckpt
  model, params = models.load_gpt2_classifier(path, 3, key=jax.random.key(1), pad_id=EOS + 1,
                                              pooling=pooling, eos_id=EOS)
  rng = np.random.default_rng(3)
  seqs = _seqs()
  # Rows with an eos inside (a text followed by more tokens), one at the end, one without.
  seqs[0] = seqs[0][:6] + [EOS] + seqs[0][6:10]
  seqs[2] = seqs[2] + [EOS]
  seqs[3] = [EOS] + list(rng.integers(0, EOS, 4)) + [EOS] + [7, 8]
  ids, mask = _pad(seqs, "left", EOS + 1)
  feats = jax.jit(models.make_features_fn(model), static_argnames="hidden_states")
  with jax.default_matmul_precision("highest"):
    pooled = np.asarray(feats(params, {"input_ids": ids, "attention_mask": mask})["pooled"])
    logits = np.asarray(jax.jit(model.apply)({"params": params}, {"input_ids": ids,
                                                                   "attention_mask": mask}))
  ref = []
  for s in seqs:
    h = _reference_states(tensors, s)
    if pooling == "mean":
      ref.append(h.mean(0))
    elif pooling == "eos" and EOS in s:
      ref.append(h[len(s) - 1 - s[::-1].index(EOS)])
    else:  # last_token, and eos on a row without an eos
      ref.append(h[-1])
  ref = np.stack(ref)
  assert _rel(pooled, ref) <= 1e-5
  w, b = (np.asarray(params["head"][k], np.float64) for k in ("kernel", "bias"))
  assert _rel(logits, pooled @ w + b) <= 1e-5  # the head reads the pooled features
  if pooling != "mean":  # the pooled state is the last hidden state at the pooled position
    hs = np.asarray(feats(params, {"input_ids": ids, "attention_mask": mask},
                          hidden_states=True)["hidden_states"])[-1]
    assert _rel(pooled[1], hs[1, -1]) <= 1e-6


def test_grand_and_el2n_of_padded_rows_equal_the_unpadded_ones(ckpt):
  model, params = models.load_gpt2_classifier(ckpt[0], 3, key=jax.random.key(0), pad_id=EOS,
                                              dropout=0.0)
  seqs = _seqs()
  y = np.array([0, 1, 2, 1, 0, 2], np.int32)
  apply_fn = lambda p, x: model.apply({"params": p}, x)

  @jax.jit  # one compile per length gives the gradient and the logits (op by op: ~4x longer)
  def example_grad_and_logits(p, x, yi):
    def loss(p):
      logits = apply_fn(p, x)
      return -jax.nn.log_softmax(logits)[0, yi], logits[0]
    return jax.grad(loss, has_aux=True)(p)

  with jax.default_matmul_precision("highest"):
    ref_grand, logits = [], []
    for s, yi in zip(seqs, y):  # each example alone, unpadded
      g, z = example_grad_and_logits(params, {"input_ids": np.asarray([s], np.int32),
                                              "attention_mask": np.ones((1, len(s)), bool)}, yi)
      ref_grand.append(np.sqrt(sum(np.sum(np.square(np.asarray(l, np.float64)))
                                   for l in jax.tree.leaves(g))))
      logits.append(np.asarray(z, np.float64))
    ref_grand, logits = np.array(ref_grand), np.array(logits)
    p = np.exp(logits - logits.max(1, keepdims=True))  # float64 softmax of the logits
    ref_el2n = np.linalg.norm(p / p.sum(1, keepdims=True) - np.eye(3)[y], axis=1)
    # One compiled function per score, called on both sides (same shapes: no second compile).
    grand = {method: jax.jit(lambda p, b, method=method: scores.grand(apply_fn, p, b,
                                                                       method=method))
             for method in ("ghost", "vmap")}
    el2n = jax.jit(lambda p, b: scores.el2n(apply_fn, p, b))
    for side in ("left", "right"):
      ids, mask = _pad(seqs, side, EOS)
      batch = {"x": {"input_ids": ids, "attention_mask": mask}, "y": y, "mask": np.ones(6, bool)}
      for method in ("ghost", "vmap"):
        got = np.asarray(grand[method](params, batch))
        assert _rel(got, ref_grand) <= 1e-5, (side, method, got, ref_grand)
      got = np.asarray(el2n(params, batch))
      assert _rel(got, ref_el2n) <= 1e-5, side


def test_out_of_range_ids_and_long_sequences_are_one_line_errors(ckpt):
  model, params = models.load_gpt2_classifier(ckpt[0], 2, key=jax.random.key(0), pad_id=EOS)
  v = model.vocab_size
  assert v == TINY["vocab_size"]  # the eos pads: no new row
  ids = np.full((2, 8), 3, np.int32)
  flagged = jax.jit(lambda p, x: model.apply({"params": p}, x, mutable=["flags"]))  # one compile
  for bad in (v, v + 5, -1):
    ids_bad = ids.copy()
    ids_bad[1, 4] = bad
    for x in (ids_bad, jnp.asarray(ids_bad)):  # host, and device (checked on device)
      with pytest.raises(DataError, match=rf"token id {bad} at \[1, 4\].*\[0, {v}\).*"
                                          rf"vocab_size={v}") as e:
        model.apply({"params": params}, x)
      assert "\n" not in str(e.value)
    # Under jit ids cannot raise: no NaN, and the row's flag is set.
    out, flags = flagged(params, ids_bad)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_array_equal(flags["flags"]["bad_token_ids"][0], [False, True])
    with pytest.raises(DataError, match=f"token id {bad}"):
      models.check_token_ids(jnp.asarray(ids_bad), v)
  models.check_token_ids(ids, v)  # in range: nothing
  with pytest.raises(DataError, match="17 positions, more than the model's context=16") as e:
    model.apply({"params": params}, np.zeros((2, 17), np.int32))
  assert "\n" not in str(e.value)
  with pytest.raises(DataError, match="17 positions"):
    jax.jit(model.apply)({"params": params}, np.zeros((2, 17), np.int32))
  cases = [
      (np.zeros((2, 8), np.float32), "dtype float32"),
      (np.zeros((8,), np.int32), r"shape \(8,\)"),
      ({"input_ids": ids, "attention_mask": np.ones((2, 7), bool)}, "attention_mask has shape"),
      ({"input_ids": ids, "attention_mask": np.full((2, 8), 2)}, "expected 0/1"),
      ({"input_ids": ids, "attention_mask": np.ones((2, 8), np.float32)}, "dtype float32"),
      ({"ids": ids}, "expected 'input_ids'"),
  ]
  for x, msg in cases:
    with pytest.raises(DataError, match=msg):
      model.apply({"params": params}, x)
  with pytest.raises(DataError, match="given twice"):
    model.apply({"params": params}, {"input_ids": ids, "attention_mask": ids > 0}, False, ids > 0)
  with pytest.raises(ConfigError, match="pooling='max' is not allowed"):
    models.load_gpt2_classifier(ckpt[0], 2, key=jax.random.key(0), pooling="max")
  # A row mask [B] (the trainer's) is accepted and changes nothing; an empty batch is empty. One
  # compiled program (op by op, ~140 single ops compiled: 2 s); the inputs are host arrays closed
  # over, so the host checks of model.apply run on them as in an eager call.
  with_row_mask, without, empty = jax.jit(lambda p: (
      model.apply({"params": p}, ids, False, np.ones(2, bool)), model.apply({"params": p}, ids),
      model.apply({"params": p}, np.zeros((0, 8), np.int32))))(params)
  np.testing.assert_array_equal(with_row_mask, without)
  assert empty.shape == (0, 2)


def test_pad_and_vocab_agree_with_the_tokenizer_by_construction(tmp_path):
  d = write_tiny_gpt2_dir(tmp_path / "ckpt")
  tok_new = text.gpt2_tokenizer(d)
  tok_eos = text.gpt2_tokenizer(d, pad_id=tok_new.eos_id)
  v = tok_new.eos_id + 1  # config.json's vocab_size
  assert (tok_new.pad_id, tok_new.vocab_size) == (v, v + 1)
  assert (tok_eos.pad_id, tok_eos.vocab_size) == (tok_eos.eos_id, v)
  texts = ["a quiet triumph", "naïve café 😀 and more words here", "x"]
  outs = []
  for tok in (tok_new, tok_eos):
    model, params = models.load_gpt2_classifier(d, 2, key=jax.random.key(0), tokenizer=tok)
    assert (model.vocab_size, model.pad_id, model.eos_id) == (tok.vocab_size, tok.pad_id,
                                                               tok.eos_id)
    xs = [text.encode(tok, texts, 16, padding_side=side, return_mask=True)
          for side in ("right", "left")]
    # Both sides in one compiled program (op by op, ~90 single ops compiled: 0.7 s); the encoded
    # host arrays are closed over, so model.apply checks their ids and masks as in an eager call.
    for out in jax.jit(lambda p: [model.apply({"params": p}, x) for x in xs])(params):
      outs.append(np.asarray(out))
      assert np.isfinite(outs[-1]).all()
  # Both pads, both sides: one answer (the eos is real in every row, the pad never is).
  for o in outs[1:]:
    assert _rel(o, outs[0]) <= 1e-5
  # The case: pad_id=eos in the model, ids padded with the tokenizer's new pad id.
  model, params = models.load_gpt2_classifier(d, 2, key=jax.random.key(0), pad_id=v - 1)
  with pytest.raises(DataError, match=rf"token id {v} .*outside \[0, {v}\)"):
    model.apply({"params": params}, text.encode(tok_new, texts, 16))
  other = dataclasses.replace(tok_new, vocab_size=v + 5)  # another tokenizer's vocabulary
  with pytest.raises(ConfigError, match=f"tokenizer's vocab_size={v + 5} .* model's vocab_size="
                                        f"{v + 1}"):
    models.gpt2_classifier(models.read_gpt2_config(d), 2, tokenizer=other)
  with pytest.raises(ConfigError, match="disagrees"):
    models.load_gpt2_classifier(d, 2, key=jax.random.key(0), pad_id=v - 1, tokenizer=tok_new)
  with pytest.raises(ConfigError, match="pad_id=3 is not allowed"):
    text.gpt2_tokenizer(d, pad_id=3)


def test_tokenizer_encode_decode_round_trip_on_unicode(tmp_path):
  from test_text import _corpus
  d = write_tiny_gpt2_dir(tmp_path / "ckpt")
  for tok in (text.gpt2_tokenizer(d), text.gpt2_tokenizer(d, pad_id=text.gpt2_tokenizer(d).eos_id)):
    strings = _corpus(300, seed=5)
    assert sum(any(ord(c) > 127 for c in s) for s in strings) > 100
    for s in strings:
      ids = tok.encode(s)
      assert ids == tok.encode_batch([s])[0]
      assert tok.decode(ids) == s
      assert all(0 <= i < tok.vocab_size for i in ids)
    # Padded rows decode to the text plus the eos (pads dropped, on either side).
    for side in ("right", "left"):
      x = text.encode(tok, ["naïve café 😀", "日本語"], 24, padding_side=side, return_mask=True)
      for row, m, s in zip(x["input_ids"], x["attention_mask"], ["naïve café 😀", "日本語"]):
        # The appended eos is text unless it is also the pad (then it reads as padding).
        want = s if tok.pad_id == tok.eos_id else s + text.EOS
        assert tok.decode(row[m]) == want and tok.decode(row) == want
        assert tok.decode(row, skip_pad=False).count(text.EOS) == (row == tok.eos_id).sum()
    with pytest.raises(DataError, match=rf"token id {tok.vocab_size} outside \[0, "
                                        rf"{tok.vocab_size}\)"):
      tok.decode([1, tok.vocab_size])
    with pytest.raises(DataError, match="one sequence of integer ids"):
      tok.decode(np.zeros((2, 3), np.int32))
    with pytest.raises(DataError, match="needs a str"):
      tok.encode(["a"])
  assert tok.decode([]) == ""


def test_features_feed_semdedup_prototypes_knn_and_layer_taps_from_a_loaded_gpt2(ckpt):
  """Embeddings of texts padded differently (left, right, longer rows) are the same, so SemDeDup
  finds the copies, kNN puts them at distance 0, prototypes give them one score; the layer taps'
  penultimate features and SNIP's scores see the attention mask too."""
  from prunejax import dedup, masks
  model, params = models.load_gpt2_classifier(ckpt[0], 2, key=jax.random.key(0), pad_id=EOS,
                                              pooling="mean")
  features = jax.jit(models.make_features_fn(model))
  seqs = _seqs(seed=7)
  right, rmask = _pad(seqs, "right", EOS)
  left, lmask = _pad(seqs, "left", EOS)
  with jax.default_matmul_precision("highest"):
    e_r = np.asarray(features(params, {"input_ids": right, "attention_mask": rmask})["pooled"])
    e_l = np.asarray(features(params, left, lmask)["pooled"])
  assert _rel(e_l, e_r) <= 1e-5
  emb = np.concatenate([e_r, e_l])  # every text twice: examples i and i + 6
  n = len(seqs)
  result = dedup.semdedup(emb, num_clusters=2, key=jax.random.key(0))
  kept = np.asarray(result.keep(1e-4))
  assert kept.sum() == n and all(kept[i] != kept[i + n] for i in range(n))
  dist = np.asarray(scores.knn_distances(emb, k=1)[0])[:, 0]
  assert np.all(dist <= 1e-5)
  proto = np.asarray(scores.prototypes(emb, num_clusters=2, key=jax.random.key(0)))
  np.testing.assert_allclose(proto[:n], proto[n:], atol=1e-4)
  # The layer taps (GraNd's ghost path, penultimate features) take the same inputs. Compiled, once
  # for both sides (op by op, the walk and SNIP's backward pass compiled ~280 single ops: 4 s).
  apply_fn = lambda p, x: model.apply({"params": p}, x)
  penultimate = jax.jit(lambda p, x: scores.penultimate(apply_fn, p, x)[0])
  pen_r = np.asarray(penultimate(params, {"input_ids": right, "attention_mask": rmask}))
  pen_l = np.asarray(penultimate(params, {"input_ids": left, "attention_mask": lmask}))
  assert _rel(pen_r, e_r) <= 1e-5 and _rel(pen_l, e_r) <= 1e-5
  # SNIP's connection sensitivity of one batch: the same, padded left or right.
  y = np.array([0, 1, 1, 0, 1, 0], np.int32)
  snip_scores = jax.jit(lambda p, b: masks.snip_scores(apply_fn, p, b))
  snip = [snip_scores(params, {"x": {"input_ids": ids, "attention_mask": m}, "y": y})
          for ids, m in ((right, rmask), (left, lmask))]
  # (The attention key bias has a zero gradient in exact arithmetic: a scale over all leaves.)
  scale = max(float(np.abs(a).max()) for a in jax.tree.leaves(snip[0]))
  for a, b in zip(jax.tree.leaves(snip[0]), jax.tree.leaves(snip[1])):
    np.testing.assert_allclose(a, b, atol=1e-5 * scale)
