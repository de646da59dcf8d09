"""Scores with the batch sharded over 8 forced CPU devices equal the single-device scores, with a
classic ``Mesh`` + ``NamedSharding``, with ``jax.make_mesh`` explicit axes (with and without
``jax.set_mesh``), under ``jax.shard_map`` and under ``jax.pmap``."""

from __future__ import annotations

from conftest import run_on_devices

CODE = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from experiments.bench_scores import plain_resnet_apply, plain_resnet_init
from prunejax import parallel, scores
from prunejax.models import build_model, make_apply_fn
from prunejax.models.resnet import ResNet

assert jax.device_count() == 8
rng = np.random.default_rng(0)

def random_variables(model, x):
  shapes = jax.eval_shape(lambda k, x: model.init(k, x, train=False), jax.random.key(0), x)
  def leaf(path, s):
    name = jax.tree_util.keystr(path)
    if len(s.shape) >= 2:
      return jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), jnp.float32)
    if "var" in name:
      return jnp.asarray(rng.uniform(0.5, 1.5, size=s.shape), jnp.float32)
    return jnp.asarray(0.2 * rng.normal(size=s.shape) + ("scale" in name), jnp.float32)
  return jax.tree_util.tree_map_with_path(leaf, dict(shapes))

B = 16
mask = np.arange(B) < 13  # three padding rows.
flax_cases = {
  "mlp": (build_model("mlp", 3, hidden=(16, 8)), rng.normal(size=(B, 8, 8, 3)).astype(np.float32)),
  "resnet": (ResNet(3, (1, 1), (4, 8)), rng.normal(size=(B, 8, 8, 3)).astype(np.float32)),
  "gpt": (build_model("gpt", 3, vocab_size=50, context=8, depth=1, width=16, num_heads=2),
          (rng.integers(1, 50, (B, 8)) * (np.arange(8)[None] < rng.integers(1, 9, (B, 1)))
           ).astype(np.int32)),
}
cases = {name: (make_apply_fn(m), random_variables(m, jnp.asarray(x[:1])), x)
         for name, (m, x) in flax_cases.items()}
cases["plain"] = (plain_resnet_apply, plain_resnet_init(jax.random.key(1), (4, 8), 1, 3),
                  rng.normal(size=(B, 3, 8, 8)).astype(np.float32))
which = {"mlp": list(scores.BATCH_SCORES), "resnet": ["grand"], "gpt": ["grand", "el2n"],
         "plain": ["grand"]}
classic = parallel.data_mesh()
explicit = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
out = {}

def compare(key, got, single):
  got = np.asarray(got).reshape(-1)
  rel_err = np.max(np.abs(got - single) / np.maximum(np.abs(single), 1e-6))
  out[key] = [float(rel_err), float(np.max(np.abs(single[~mask]))),
              float(np.min(np.abs(single[mask])))]

for name, (apply_fn, variables, x) in cases.items():
  x = x * mask.reshape((B,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  host = {"x": x, "y": rng.integers(0, 3, B).astype(np.int32), "mask": mask,
          "id": np.where(mask, np.arange(B), -1)}
  for score in which[name]:
    fn = jax.jit(functools.partial(scores.SCORES[score], apply_fn))
    single = np.asarray(fn(variables, jax.device_put(host, jax.devices()[0])))
    sharded = fn(parallel.replicate(variables, classic), parallel.shard_batch(host, classic))
    assert len(sharded.sharding.device_set) == 8
    compare(f"{name}/{score}", sharded, single)
    if score != "grand":
      continue
    # Explicit axes: jax.make_mesh, with and without jax.set_mesh.
    sb = jax.device_put(host, NamedSharding(explicit, P("data")))
    sv = jax.device_put(variables, NamedSharding(explicit, P()))
    compare(f"{name}/grand/explicit", fn(sv, sb), single)
    with jax.set_mesh(explicit):
      compare(f"{name}/grand/set_mesh", fn(sv, sb), single)
    # shard_map and pmap: each device scores its rows.
    sm = jax.jit(jax.shard_map(functools.partial(scores.grand, apply_fn), mesh=classic,
                               in_specs=(P(), P("data")), out_specs=P("data")))
    compare(f"{name}/grand/shard_map", sm(variables, host), single)
    pm = jax.pmap(functools.partial(scores.grand, apply_fn), in_axes=(None, 0))
    compare(f"{name}/grand/pmap",
            pm(variables, jax.tree.map(lambda a: a.reshape((8, -1) + a.shape[1:]), host)), single)
# Parameters sharded too (kernels split over their output features, FSDP-style), both styles.
apply_fn, variables, x = cases["mlp"]
host = {"x": x, "y": rng.integers(0, 3, B).astype(np.int32), "mask": mask}
fn = jax.jit(functools.partial(scores.grand, apply_fn))
single = np.asarray(fn(variables, host))
for style, mesh in (("classic", classic), ("explicit", explicit)):
  spec = lambda a: (P(*([None] * (a.ndim - 1)), "data") if a.ndim == 2 and a.shape[-1] % 8 == 0
                    else P())
  sv = jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, spec(a))), variables)
  compare(f"mlp/grand/{style}_fsdp", fn(sv, jax.device_put(host, NamedSharding(mesh, P("data")))),
          single)
# A tracker updated with sharded batches.
tracker = scores.forgetting()
ids = np.arange(B)[mask]
logits = rng.normal(size=(3, B, 3)).astype(np.float32)
host = {"y": rng.integers(0, 3, B).astype(np.int32), "mask": mask,
        "id": np.where(mask, np.arange(B), -1)}
states = []
for put in (lambda t: jax.device_put(t, jax.devices()[0]),
            lambda t: parallel.shard_batch(t, classic)):
  state = tracker.init(ids)
  for e in range(3):
    state = jax.jit(tracker.update)(state, put(host), put({"l": logits[e]})["l"])
  states.append(np.asarray(state.scores()))
out["forgetting"] = [float(np.max(np.abs(states[0] - states[1]))), 0.0, 1.0]
print(json.dumps(out))
"""


def test_sharded_scores_equal_single_device():
  result = run_on_devices(CODE, 8)
  styles = ("", "/explicit", "/set_mesh", "/shard_map", "/pmap")
  expected = ({f"mlp/{s}" for s in ("el2n", "loss", "margin", "entropy", "least_confidence", "grand_last_layer")}
              | {f"{m}/grand{s}" for m in ("mlp", "resnet", "gpt", "plain") for s in styles}
              | {"gpt/el2n", "mlp/grand/classic_fsdp", "mlp/grand/explicit_fsdp", "forgetting"})
  assert set(result) == expected
  for key, (rel_err, padding_max, real_min) in result.items():
    assert rel_err < 1e-5, (key, rel_err)
    assert padding_max == 0.0, key
    if "grand" in key:
      assert real_min > 0.0, key
