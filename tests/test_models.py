"""Model shapes, parameter counts against the reference architectures, padding and BatchNorm
modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import models
from prunejax.errors import ConfigError


@pytest.mark.parametrize("name,x_shape,expected", [
    ("mlp", (1, 28, 28, 1), 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10),  # LeNet-300-100
    ("resnet18", (1, 32, 32, 3), 11_173_962),  # CIFAR ResNet-18, as in Data Diet / kuangliu
    ("resnet20", (1, 32, 32, 3), 272_474),  # OpenLTH cifar_resnet_20
])
def test_parameter_counts_match_reference(name, x_shape, expected):
  model = models.build_model(name, 10)
  assert models.param_count(model, jnp.zeros(x_shape)) == expected


def test_gpt2_small_is_124m_with_tied_head():
  model = models.GPTClassifier(vocab_size=50257, num_classes=2, context=1024, depth=12, width=768,
                               num_heads=12, lm_head=True)
  classifier = 768 * 2 + 2
  # GPT-2 small: 124,439,808 parameters with the LM head tied to the token embedding.
  assert models.param_count(model, jnp.zeros((1, 8), jnp.int32)) - classifier == 124_439_808


def test_unknown_model_is_one_line_error():
  with pytest.raises(ConfigError, match="model.name='vgg' is not allowed; choose one of: 'mlp'"):
    models.build_model("vgg", 10)


@pytest.mark.parametrize("name,kwargs,x", [
    ("mlp", {"hidden": (16, 8)}, np.ones((3, 8, 8, 1), np.float32)),
    ("cnn", {"features": (4, 8), "dense": 16}, np.ones((3, 8, 8, 1), np.float32)),
    ("resnet20", {"width_multiplier": 0.25}, np.ones((3, 8, 8, 3), np.float32)),
    ("gpt", {"vocab_size": 50, "context": 8, "depth": 1, "width": 16, "num_heads": 2},
     np.ones((3, 8), np.int32)),
])
def test_output_shapes(name, kwargs, x):
  model = models.build_model(name, 7, **kwargs)
  # Shapes only: traced, not run.
  variables = jax.eval_shape(lambda k: models.init_variables(model, k, x), jax.random.key(0))
  assert jax.eval_shape(models.make_apply_fn(model), variables, x).shape == (3, 7)


def _gpt():
  model = models.GPTClassifier(vocab_size=30, num_classes=3, context=12, depth=2, width=16,
                               num_heads=2, pad_id=0)
  return model, models.init_variables(model, jax.random.key(1), jnp.ones((1, 12), jnp.int32))


def test_gpt_padding_does_not_change_logits():
  model, v = _gpt()
  apply_fn = jax.jit(models.make_apply_fn(model))  # op by op, the GPT's first call took ~40 s
  short = jnp.array([[5, 7, 9, 2, 0, 0]])
  longer = jnp.array([[5, 7, 9, 2, 0, 0, 0, 0, 0, 0, 0, 0]])
  np.testing.assert_allclose(apply_fn(v, short), apply_fn(v, longer), atol=1e-6)


def test_gpt_is_causal_and_reads_last_real_token():
  model, v = _gpt()
  apply_fn = jax.jit(models.make_apply_fn(model))
  a = jnp.array([[5, 7, 9, 2, 0, 0]])
  b = jnp.array([[5, 7, 9, 3, 0, 0]])  # last real token differs -> logits differ
  assert not np.allclose(apply_fn(v, a), apply_fn(v, b))
  c = jnp.array([[5, 7, 9, 2, 4, 0]])  # an extra token after -> logits differ (now read at pos 4)
  assert not np.allclose(apply_fn(v, a), apply_fn(v, c))


def _resnet():
  """A small ResNet (one block per stage; ResNet-20's stem, BatchNorm, stride-2 blocks with
  projection shortcuts, at a quarter of its widths) and its variables for 8x8 images."""
  model = models.ResNet(num_classes=3, stage_sizes=(1, 1, 1), stage_widths=(4, 8, 16))
  x = np.asarray(jax.random.normal(jax.random.key(0), (4, 8, 8, 3)))
  return model, models.init_variables(model, jax.random.key(1), x), x


def test_batchnorm_eval_uses_frozen_statistics_and_train_skips_padding():
  model, v, x = _resnet()
  apply_fn = models.make_apply_fn(model)
  pad = np.concatenate([x[:2], 100.0 * np.ones((2, 8, 8, 3), np.float32)])
  train_mode = lambda v, xs, mask: model.apply(v, xs, train=True, mask=mask,
                                               mutable=["batch_stats"])

  @jax.jit  # one program for the four calls (op by op, a ResNet-20 took seconds)
  def outputs(v):
    return (apply_fn(v, x), apply_fn(v, x[:1]),
            train_mode(v, pad, np.array([True, True, False, False])),
            train_mode(v, x[:2], np.ones(2, bool)))

  eval_all, eval_one, (out_p, upd_p), (out_r, upd_r) = outputs(v)
  # Eval: an example's logits do not depend on the rest of the batch.
  np.testing.assert_allclose(eval_all[:1], eval_one, atol=1e-5)
  # Train: padding rows (mask False) change neither the real rows' outputs nor the statistics.
  np.testing.assert_allclose(out_p[:2], out_r, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), upd_p, upd_r)


def test_apply_fn_gradients_ignore_batch_statistics():
  model, v, _ = _resnet()
  x = np.ones((2, 8, 8, 3), np.float32)
  g = jax.jit(jax.grad(lambda v: models.make_apply_fn(model)(v, x).sum()))(v)
  assert all(np.all(np.asarray(l) == 0) for l in jax.tree.leaves(g["batch_stats"]))
  assert any(np.any(np.asarray(l) != 0) for l in jax.tree.leaves(g["params"]))


def _gpt_dropout(**rates):
  model = models.GPTClassifier(vocab_size=30, num_classes=3, context=16, depth=2, width=32,
                               num_heads=2, pad_id=0, **rates)
  tokens = jax.random.randint(jax.random.key(5), (8, 16), 1, 30).at[:, 12:].set(0)
  plain = model.clone(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)
  return model, models.init_variables(plain, jax.random.key(1), tokens), tokens


def test_gpt_dropout_is_off_in_evaluation_and_at_rate_zero():
  model, v, tokens = _gpt_dropout(embd_dropout=0.3, attn_dropout=0.3, resid_dropout=0.3)
  plain = model.clone(embd_dropout=0.0, attn_dropout=0.0, resid_dropout=0.0)

  @jax.jit  # one program for the four calls (op by op, the GPT's first call took seconds)
  def outputs(v):
    return (plain.apply(v, tokens, train=False), model.apply(v, tokens, train=False),
            models.make_apply_fn(model)(v, tokens), plain.apply(v, tokens, train=True))

  ref, model_eval, model_apply_fn, plain_train = outputs(v)
  # train=False: bitwise the dropout-free model, and no rng is needed.
  np.testing.assert_array_equal(model_eval, ref)
  np.testing.assert_array_equal(model_apply_fn, ref)
  # Rate 0 (the default): train=True is the same model and needs no rng either.
  np.testing.assert_array_equal(plain_train, ref)
  with pytest.raises(ConfigError, match="GPTClassifier.attn_dropout=1.0 is out of range"):
    model.clone(attn_dropout=1.0).apply(v, tokens)


def test_gpt_dropout_in_training_is_deterministic_per_key():
  model, v, tokens = _gpt_dropout(embd_dropout=0.1, attn_dropout=0.1, resid_dropout=0.1)
  # One program for every key (op by op, the GPT's first call took seconds).
  run_key = jax.jit(lambda v, key: model.apply(v, tokens, train=True, rngs={"dropout": key}))
  run = lambda k: run_key(v, jax.random.key(k))
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))
  assert not np.allclose(run(0), jax.jit(lambda v: model.apply(v, tokens, train=False))(v))


@pytest.mark.parametrize("site,path,input_path", [
    ("embd_dropout", ("drop",), None),  # input: the embeddings, computed from the params
    ("attn_dropout", ("block_0", "attn", "attn_drop"), ()),  # input: the probs without dropout
    ("resid_dropout", ("block_1", "attn", "resid_drop"), ("block_1", "attn", "out")),
    ("resid_dropout", ("block_1", "mlp_drop"), ("block_1", "mlp_proj")),
])
def test_gpt_dropout_keeps_the_expected_share_and_rescales(site, path, input_path):
  rate = 0.3
  model, v, tokens = _gpt_dropout(**{site: rate})
  # Compiled (op by op, the GPT's first call took seconds).
  capture = lambda model, **rngs: jax.jit(lambda v: model.apply(
      v, tokens, train=True, rngs=rngs, capture_intermediates=True,
      mutable=["intermediates"])[1])(v)
  state = capture(model, dropout=jax.random.key(7))

  def get(state, p):
    out = state["intermediates"]
    for name in p:
      out = out[name]
    return np.asarray(out["__call__"][0])

  dropped = get(state, path)
  if input_path is None:
    params = jax.tree.map(np.asarray, v["params"])
    before = params["wte"]["embedding"][np.asarray(tokens)] + params["wpe"][None, :16]
  elif not input_path:  # the first dropout site: the same site of the dropout-free model
    before = get(capture(model.clone(**{site: 0.0})), path)
  else:  # the output of the layer that feeds this site, in the same run
    before = get(state, input_path)
  live = before != 0  # attention probabilities are exactly 0 where masked (causal, padding)
  kept = dropped[live] != 0
  n = live.sum()
  assert n > 1000
  # Keep share 1 - rate within 5 standard deviations of a binomial draw.
  assert abs(kept.mean() - (1 - rate)) < 5 * np.sqrt(rate * (1 - rate) / n)
  np.testing.assert_allclose(dropped[live][kept], before[live][kept] / (1 - rate), rtol=1e-5)
  assert np.all(dropped[~live] == 0)
