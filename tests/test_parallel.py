"""A data-parallel train step on 8 devices equals the same step on 1 device."""

import pytest

CODE = """
import json
import jax, jax.numpy as jnp, numpy as np, optax
from prunejax import parallel, train
from prunejax.models import build_model

def run(devices, name, kw, x_shape):
  model = build_model(name, 3, **kw)
  state = train.create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0),
                                   jnp.zeros((1,) + x_shape))
  mesh = parallel.data_mesh(devices)
  state = parallel.replicate(state, mesh)
  rng = np.random.default_rng(0)
  n_real = 13  # does not divide by 8; padded to 16
  x = np.zeros((16,) + x_shape, np.float32); x[:n_real] = rng.normal(size=(n_real,) + x_shape)
  y = np.zeros(16, np.int32); y[:n_real] = rng.integers(0, 3, n_real)
  mask = np.arange(16) < n_real
  losses = []
  for _ in range(2):
    batch = parallel.shard_batch({"x": x, "y": y, "mask": mask}, mesh)
    state, m = train.jit_train_step(state, batch)
    losses.append(float(m["loss_sum"]) / float(m["count"]))
  flat = np.concatenate([np.ravel(np.asarray(l)) for l in jax.tree.leaves(state.params)])
  stats = [np.asarray(l).ravel() for l in jax.tree.leaves(state.batch_stats)]
  return losses, flat, np.concatenate(stats) if stats else np.zeros(0)

out = {}
assert len(jax.devices()) == 8
for name, kw, shape in [("mlp", {"hidden": (16,)}, (4, 4, 1)),
                        ("resnet20", {"width_multiplier": 0.25}, (8, 8, 3))]:
  l1, p1, s1 = run(jax.devices()[:1], name, kw, shape)
  l8, p8, s8 = run(jax.devices(), name, kw, shape)
  out[name] = {"loss_diff": max(abs(a - b) for a, b in zip(l1, l8)),
               "param_diff": float(np.max(np.abs(p1 - p8))),
               "stats_diff": float(np.max(np.abs(s1 - s8))) if s1.size else 0.0}
print(json.dumps(out))
"""


def test_sharded_train_step_equals_single_device(on_devices):
  out = on_devices(CODE, 8)
  for name, diffs in out.items():
    assert diffs["loss_diff"] < 1e-5, (name, diffs)
    assert diffs["param_diff"] < 1e-5, (name, diffs)
    assert diffs["stats_diff"] < 1e-5, (name, diffs)
