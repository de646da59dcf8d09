"""Adapters: Flax NNX, Equinox and Haiku models as ``(apply_fn, params)`` and back."""

from __future__ import annotations

import subprocess
import sys

import equinox as eqx
import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prunejax import adapters, masks
from prunejax.errors import ConfigError

X = jnp.asarray(np.random.default_rng(0).standard_normal((6, 5)), jnp.float32)


class NNXNet(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.l1 = nnx.Linear(5, 8, rngs=rngs)
    self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.bn(self.l1(x))))


class EqxNet(eqx.Module):
  layers: list

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.layers = [eqx.nn.Linear(5, 8, key=k1), eqx.nn.Linear(8, 3, key=k2)]

  def __call__(self, x):
    return self.layers[1](jax.nn.relu(self.layers[0](x)))


def _haiku_mlp(x):
  return hk.nets.MLP([8, 3])(x)


def _same(a, b):
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_library_imports_neither_equinox_nor_haiku():
  code = ("import sys, prunejax, prunejax.adapters, prunejax.masks; "
          "print(sorted(m for m in ('equinox', 'haiku') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
  assert out.stdout.strip().splitlines()[-1] == "[]"


def test_nnx_apply_fn_params_and_back():
  model = NNXNet(nnx.Rngs(0))
  model.bn.mean[...] = jnp.full((8,), 0.25)  # non-param state is kept, not reset.
  apply_fn, params = adapters.from_nnx(model)
  _same(apply_fn(params, X), model(X))
  assert set(masks.leaf_paths(params)) == {"l1/kernel", "l1/bias", "bn/scale", "bn/bias",
                                           "head/kernel", "head/bias"}
  mask = masks.magnitude(params, 0.5)
  pruned = masks.apply_mask(params, mask)
  rebuilt = adapters.to_nnx(model, pruned)
  _same(rebuilt(X), apply_fn(pruned, X))
  kernel, kept = np.asarray(rebuilt.l1.kernel[...]), np.asarray(mask["l1"]["kernel"][...])
  assert np.all(kernel[~kept] == 0)
  _same(kernel[kept], np.asarray(model.l1.kernel[...])[kept])
  _same(rebuilt.bn.mean[...], jnp.full((8,), 0.25))
  assert np.all(np.asarray(model.l1.kernel[...]) != 0)  # the original is untouched.
  with pytest.raises(ConfigError, match="nnx.Module"):
    adapters.from_nnx(EqxNet(jax.random.key(0)))
  with pytest.raises(ConfigError, match=r"head/kernel has shape \(1, 3\)"):
    adapters.to_nnx(model, jax.tree.map(lambda p: p[:1] if p.ndim == 2 else p, params))


def test_equinox_apply_fn_params_and_back():
  model = EqxNet(jax.random.key(0))
  apply_fn, params = adapters.from_equinox(model)
  _same(apply_fn(params, X), jax.vmap(model)(X))
  assert masks.leaf_paths(params) == ["layers/0/weight", "layers/0/bias", "layers/1/weight",
                                      "layers/1/bias"]
  mask = masks.magnitude(params, 0.5)
  pruned = masks.apply_mask(params, mask)
  rebuilt = adapters.to_equinox(model, pruned)
  _same(jax.vmap(rebuilt)(X), apply_fn(pruned, X))
  w, kept = np.asarray(rebuilt.layers[0].weight), np.asarray(mask.layers[0].weight)
  assert np.all(w[~kept] == 0) and np.all(w[kept] == np.asarray(model.layers[0].weight)[kept])
  batched_fn, _ = adapters.from_equinox(model, batched=True)
  _same(batched_fn(params, X[0]), model(X[0]))
  with pytest.raises(ConfigError, match="eqx.Module"):
    adapters.from_equinox({"w": X})
  with pytest.raises(ConfigError, match="partition"):
    adapters.to_equinox(model, {"w": X})
  with pytest.raises(ConfigError, match="layers/0/weight"):
    adapters.to_equinox(model, jax.tree.map(lambda p: p[:1] if p.ndim == 2 else p, params))


def test_haiku_apply_fn_params_and_back():
  transformed = hk.transform(_haiku_mlp)
  params = transformed.init(jax.random.key(0), X)
  apply_fn, same_params = adapters.from_haiku(transformed, params)
  assert same_params is params
  _same(apply_fn(params, X), transformed.apply(params, None, X))
  no_rng, _ = adapters.from_haiku(hk.without_apply_rng(transformed), params)
  _same(no_rng(params, X), apply_fn(params, X))
  mask = masks.magnitude(params, 0.5)
  pruned = adapters.to_haiku(masks.apply_mask(params, mask))
  assert type(pruned) is dict and type(pruned["mlp/~/linear_0"]) is dict
  _same(transformed.apply(pruned, None, X), apply_fn(masks.apply_mask(params, mask), X))
  with pytest.raises(ConfigError, match="mapping"):
    adapters.to_haiku({"w": X})
  with pytest.raises(ConfigError, match="hk.transform"):
    adapters.from_haiku(_haiku_mlp, params)


def test_haiku_with_state():
  def f(x):
    h = hk.Linear(8)(x)
    count = hk.get_state("count", (), jnp.float32, init=jnp.zeros)
    hk.set_state("count", count + 1)
    return hk.Linear(3)(h) + count
  transformed = hk.transform_with_state(f)
  params, state = transformed.init(jax.random.key(0), X)
  state = jax.tree.map(lambda s: s + 2.0, state)
  apply_fn, _ = adapters.from_haiku(transformed, params, state)
  _same(apply_fn(params, X), transformed.apply(params, state, None, X)[0])
  with pytest.raises(ConfigError, match="state="):
    adapters.from_haiku(transformed, params)
  with pytest.raises(ConfigError, match="only for"):
    adapters.from_haiku(hk.transform(_haiku_mlp), params, state)
