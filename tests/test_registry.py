"""Every registered score and mask method through the shared properties (optax's common tests):
a new registry entry is tested the day it is registered, with no test written for it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import masks, scores
from prunejax.masks import MaskInputs

B, D, C = 12, 6, 4


def _apply_fn(params, x):
  h = jnp.tanh(x.reshape(x.shape[0], -1) @ params["dense"]["w"] + params["dense"]["b"])
  return h @ params["head"]["kernel"] + params["head"]["bias"]


def _params(seed=0):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  return {"dense": {"w": jax.random.normal(k1, (D, 8)) * 0.5, "b": jnp.zeros(8)},
          "head": {"kernel": jax.random.normal(k2, (8, C)) * 0.5,
                   "bias": jax.random.normal(k3, (C,)) * 0.1}}


def _batch(n_real=9, rows=B, seed=1):
  rng = np.random.default_rng(seed)
  x = np.zeros((rows, D), np.float32)
  x[:n_real] = rng.normal(size=(n_real, D))
  y = np.zeros(rows, np.int32)
  y[:n_real] = rng.integers(0, C, n_real)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y), "mask": jnp.asarray(np.arange(rows) < n_real),
          "id": jnp.arange(rows)}


BATCH_SCORES = [s for s in scores.SCORES.values() if s.kind == "batch"]


@pytest.mark.parametrize("spec", BATCH_SCORES, ids=lambda s: s.name)
def test_every_batch_score_shape_padding_jit_and_determinism(spec):
  fn = jax.jit(lambda p, b: spec(_apply_fn, p, b))
  batch = _batch()
  s1 = np.asarray(fn(_params(0), batch))
  assert s1.shape == (B,) and s1.dtype == np.float32
  assert np.all(np.isfinite(s1[:9])) and np.all(s1[9:] == 0.0)
  np.testing.assert_array_equal(s1, np.asarray(fn(_params(0), batch)))  # deterministic
  fn(_params(1), batch)  # a new checkpoint of the same shapes: no new trace
  assert fn._cache_size() == 1
  # Each example's score does not depend on the padding around it.
  wider = np.asarray(fn(_params(0), _batch(9, 16)))
  np.testing.assert_allclose(wider[:9], s1[:9], rtol=1e-5, atol=1e-7)
  assert spec.passes > 0 and isinstance(spec.higher_is_harder, bool)
  np.testing.assert_array_equal(spec.hardness(s1), s1 if spec.higher_is_harder else -s1)


@pytest.mark.parametrize("spec", [s for s in scores.SCORES.values() if s.kind == "tracker"],
                         ids=lambda s: s.name)
def test_every_tracker_reads_one_score_per_example(spec):
  tracker = spec.tracker()
  ids = np.arange(9) * 5
  state = tracker.init(ids)
  batch = dict(_batch(), id=jnp.asarray(np.r_[ids, -1, -1, -1]))
  for seed in range(3):
    state = jax.jit(tracker.update)(state, batch, _apply_fn(_params(seed), batch["x"]))
  out = np.asarray(spec.read_tracker(state))
  assert out.shape == (9,) and np.all(np.isfinite(out))


def test_registries_derive_the_lists_configs_accept():
  assert scores.HIGHER_IS_HARDER == {n: s.higher_is_harder for n, s in scores.SCORES.items()}
  assert set(scores.BATCH_SCORES) == {n for n, s in scores.SCORES.items() if s.fn is not None}
  from experiments import scoring, strategies
  from experiments.configs import fields
  assert set(scoring.STATIC_SCORES) <= set(strategies.REGISTRY)
  for name in masks.METHODS:
    cfg = __import__("experiments.configs.prune_at_init", fromlist=["x"]).get_config("quick")
    cfg.pai.methods = (name,)
    fields.validate(cfg)


def _inputs(rows=B):
  return MaskInputs(apply_fn=_apply_fn, batch=_batch(9, rows), key=jax.random.key(3),
                    input_shape=(1, D))


@pytest.mark.parametrize("method", list(masks.METHODS.values()), ids=lambda m: m.name)
@pytest.mark.parametrize("scope", ["global", "layerwise"])
def test_every_mask_method_exact_count_structure_and_determinism(method, scope):
  params = _params()
  mask = method.mask(params, 0.6, _inputs(), scope=scope)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)):
    assert m.shape == p.shape and m.dtype == jnp.bool_
  # Biases are not prunable; the kernels lose exactly round(0.6 * n) weights (per leaf, layerwise).
  assert bool(jnp.all(mask["dense"]["b"])) and bool(jnp.all(mask["head"]["bias"]))
  pruned = {k: int((~np.asarray(mask[k][w])).sum()) for k, w in (("dense", "w"), ("head", "kernel"))}
  if scope == "global":
    assert sum(pruned.values()) == round(0.6 * (D * 8 + 8 * C))
  else:
    assert pruned == {"dense": round(0.6 * D * 8), "head": round(0.6 * 8 * C)}
  again = method.mask(params, 0.6, _inputs(), scope=scope)
  jax.tree.map(np.testing.assert_array_equal, mask, again)


def test_a_method_without_its_inputs_says_which():
  with pytest.raises(Exception, match="mask method 'snip' needs apply_fn, batch"):
    masks.METHODS["snip"].mask(_params(), 0.5)


def test_every_score_and_mask_method_equal_on_8_devices(on_devices):
  got = on_devices(f"""
      import json, jax, jax.numpy as jnp, numpy as np
      from jax.sharding import NamedSharding, PartitionSpec as P
      from prunejax import masks, parallel, scores
      import sys; sys.path.insert(0, {repr(__file__.rsplit('/', 1)[0])})
      from test_registry import _apply_fn, _batch, _inputs, _params
      mesh = parallel.data_mesh()
      batch = _batch(13, 16)
      sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
      params = parallel.replicate(_params(), mesh)
      out = {{}}
      for name in scores.BATCH_SCORES:
        fn = jax.jit(lambda p, b: scores.SCORES[name](_apply_fn, p, b))
        one, eight = np.asarray(fn(_params(), batch)), np.asarray(fn(params, sharded))
        out[name] = float(np.max(np.abs(one - eight) / (np.abs(one) + 1e-6)))
      for name, method in masks.METHODS.items():
        inputs = _inputs(16)
        a = method.mask(_params(), 0.6, inputs)
        inputs.batch = jax.device_put(inputs.batch, NamedSharding(mesh, P("data")))
        b = method.mask(params, 0.6, inputs)
        out["mask_" + name] = int(sum(int(np.sum(np.asarray(x) != np.asarray(y)))
                                      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
      print(json.dumps(out))
  """)
  for name, diff in got.items():
    assert diff <= (0 if name.startswith("mask_") else 1e-5), (name, diff)
  assert {f"mask_{m}" for m in masks.METHODS} <= set(got)
  assert set(scores.BATCH_SCORES) <= set(got)
