"""gradient_dot and gradient_features with the batch sharded over 8 forced CPU devices (classic
``Mesh``, ``jax.make_mesh`` explicit axes, ``shard_map``) equal their single-device values: the
projection is one per key, whatever the sharding."""

from __future__ import annotations

from conftest import run_on_devices

CODE = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from prunejax import parallel, scores
from prunejax.models import build_model, init_variables, make_apply_fn

assert jax.device_count() == 8
rng = np.random.default_rng(0)
B = 16
mask = np.arange(B) < 13
model = build_model("gpt", 3, vocab_size=50, context=8, depth=1, width=16, num_heads=2)
x = rng.integers(1, 50, (B, 8)).astype(np.int32)
variables = init_variables(model, jax.random.key(0), jnp.asarray(x[:1]))
apply_fn = make_apply_fn(model)
host = {"x": x, "y": rng.integers(0, 3, B).astype(np.int32), "mask": mask}
target = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), variables)
key = jax.random.key(3)
fns = {"dot": jax.jit(lambda v, b, t, k: scores.gradient_dot(apply_fn, v, b, t)),
       "features": jax.jit(lambda v, b, t, k: scores.gradient_features(apply_fn, v, b, k, dim=64))}
classic = parallel.data_mesh()
explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
out = {}
for name, fn in fns.items():
  single = np.asarray(fn(variables, jax.device_put(host, jax.devices()[0]), target, key))
  def err(got):
    got = np.asarray(got)
    return float(np.max(np.abs(got - single)) / np.max(np.abs(single)))
  sharded = fn(parallel.replicate(variables, classic), parallel.shard_batch(host, classic), target,
               key)
  assert len(sharded.sharding.device_set) == 8
  out[name] = err(sharded)
  sb = jax.device_put(host, NamedSharding(explicit, P("data")))
  sv = jax.device_put(variables, NamedSharding(explicit, P()))
  out[name + "/explicit"] = err(fn(sv, sb, target, key))
  sm = jax.jit(jax.shard_map(lambda v, b, t: fn(v, b, t, key), mesh=classic,
                             in_specs=(P(), P("data"), P()), out_specs=P("data")))
  out[name + "/shard_map"] = err(sm(variables, host, target))
  out[name + "/padding"] = float(np.max(np.abs(single[~mask])))
print(json.dumps(out))
"""


def test_sharded_equals_single_device():
  out = run_on_devices(CODE)
  for k, v in out.items():
    if k.endswith("/padding"):
      assert v == 0.0, (k, v)
    else:
      assert v < 1e-5, (k, v)
