"""The fused path on 8 forced CPU devices: a run whose batches are split over a ``data`` mesh, and 8
replicas split over a ``replica`` mesh axis (ensemble parallelism), equal the same runs on one
device."""

from __future__ import annotations

from conftest import run_on_devices

CODE = r"""
import dataclasses, json, tempfile
import jax, numpy as np
from experiments import common, trainer
from experiments.configs import digits
from prunejax import fused, parallel

assert jax.device_count() == 8
cfg = digits.get_config("quick")
cfg.dataset.num_train = 100
cfg.train.vmap_replicas = "on"
tmp = tempfile.mkdtemp()
common.prepare_workdir(tmp, cfg, False).release()
ctx8 = common.setup(cfg, tmp)
ctx1 = dataclasses.replace(ctx8, mesh=parallel.data_mesh(jax.devices()[:1]), _device={})
ids = np.sort(ctx8.ds.train.ids)
assert fused.replica_sharding(8).mesh.axis_names == ("replica",)
assert fused.replica_sharding(8).mesh.devices.size == 8
assert fused.replica_sharding(9).mesh.devices.size == 3 and fused.replica_sharding(1) is None
out = {}
one = trainer.train_model(ctx1, ids, seed=0)
split = trainer.train_model(ctx8, ids, seed=0)
out["data_parallel"] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree.leaves(one.state.params),
                                           jax.tree.leaves(split.state.params)))
out["data_parallel_history"] = one.history == split.history
group = trainer.train_models(ctx8, [ids] * 8, list(range(8)))
out["replica_sharded"] = [str(l.sharding.spec) for l in jax.tree.leaves(group[0].state.params)][:1]
diffs = []
for s, g in enumerate(group):
  alone = trainer.train_model(ctx1, ids, seed=s)
  diffs.append(max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                   for a, b in zip(jax.tree.leaves(alone.state.params),
                                   jax.tree.leaves(g.state.params))))
  assert g.steps == alone.steps and g.forward == alone.forward
out["replicas"] = max(diffs)
print(json.dumps(out))
"""


def test_fused_runs_split_over_data_and_replica_axes_equal_one_device():
  got = run_on_devices(CODE)
  assert got["data_parallel"] < 1e-5 and got["replicas"] < 1e-5, got
