"""Scores with the batch sharded over 8 forced CPU devices equal the single-device scores."""

from __future__ import annotations

from conftest import run_on_devices

CODE = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
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
cases = {
  "mlp": (build_model("mlp", 3, hidden=(16, 8)), rng.normal(size=(B, 8, 8, 3)).astype(np.float32)),
  "resnet": (ResNet(3, (1, 1), (4, 8)), rng.normal(size=(B, 8, 8, 3)).astype(np.float32)),
  "gpt": (build_model("gpt", 3, vocab_size=50, context=8, depth=1, width=16, num_heads=2),
          (rng.integers(1, 50, (B, 8)) * (np.arange(8)[None] < rng.integers(1, 9, (B, 1)))
           ).astype(np.int32)),
}
which = {"mlp": sorted(scores.SCORES), "resnet": ["grand"], "gpt": ["grand", "el2n"]}
mesh = parallel.data_mesh()
out = {}
for name, (model, x) in cases.items():
  x = x * mask.reshape((B,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  host = {"x": x, "y": rng.integers(0, 3, B).astype(np.int32), "mask": mask,
          "id": np.where(mask, np.arange(B), -1)}
  variables = random_variables(model, jnp.asarray(x[:1]))
  apply_fn = make_apply_fn(model)
  for score in which[name]:
    fn = jax.jit(functools.partial(scores.SCORES[score], apply_fn))
    single = np.asarray(fn(variables, jax.device_put(host, jax.devices()[0])))
    sharded_batch = parallel.shard_batch(host, mesh)
    sharded = fn(parallel.replicate(variables, mesh), sharded_batch)
    assert len(sharded.sharding.device_set) == 8
    sharded = np.asarray(sharded)
    rel_err = np.max(np.abs(sharded - single) / np.maximum(np.abs(single), 1e-6))
    out[f"{name}/{score}"] = [float(rel_err), float(np.max(np.abs(single[~mask]))),
                              float(np.min(np.abs(single[mask])))]
# A tracker updated with sharded batches.
tracker = scores.forgetting()
ids = np.arange(B)[mask]
logits = rng.normal(size=(3, B, 3)).astype(np.float32)
host = {"y": rng.integers(0, 3, B).astype(np.int32), "mask": mask,
        "id": np.where(mask, np.arange(B), -1)}
states = []
for put in (lambda t: jax.device_put(t, jax.devices()[0]), lambda t: parallel.shard_batch(t, mesh)):
  state = tracker.init(ids)
  for e in range(3):
    state = jax.jit(tracker.update)(state, put(host), put({"l": logits[e]})["l"])
  states.append(np.asarray(state.scores()))
out["forgetting"] = [float(np.max(np.abs(states[0] - states[1]))), 0.0, 1.0]
print(json.dumps(out))
"""


def test_sharded_scores_equal_single_device():
  result = run_on_devices(CODE, 8)
  assert len(result) == 6 + 1 + 2 + 1
  for key, (rel_err, padding_max, real_min) in result.items():
    assert rel_err < 1e-5, (key, rel_err)
    assert padding_max == 0.0, key
  for key in ("mlp/grand", "resnet/grand", "gpt/grand"):
    assert result[key][2] > 0.0, key
