"""Worker of tests/test_multiprocess.py: trains a few steps, scores, selects and masks, on however many
processes and devices it is started with, and writes what it computed (gathered) as JSON.

Usage: python tests/mp_worker.py COORDINATOR NUM_PROCESSES PROCESS_ID DEVICES_PER_PROCESS OUT.json
"""

import json
import os
import sys

coordinator, nproc, pid, ndev, out_path = sys.argv[1:6]
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                           f"--xla_force_host_platform_device_count={ndev}")
os.environ["JAX_PLATFORMS"] = "cpu"

import functools  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from prunejax import data, masks, parallel, scores, select, train  # noqa: E402
from prunejax.models import build_model, make_apply_fn  # noqa: E402

parallel.initialize_distributed(coordinator, int(nproc), int(pid))
mesh = parallel.data_mesh()
ds = data.load_digits()
ids = np.sort(ds.train.ids)[:200]
prep = ds.preprocess()
model = build_model("mlp", 10, hidden=(32,))
state = train.create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0),
                                 ds.train.example(), prep)
init_params = jax.device_get(state.params)
state = parallel.replicate(state, mesh)
pi, pc = jax.process_index(), jax.process_count()


def score_all(variables, fn):
  out = {}
  jf = jax.jit(functools.partial(fn, make_apply_fn(model, prep)))
  for b in data.batches(ds.train, ids, batch_size=64, shuffle=False, process_index=pi,
                        process_count=pc):
    gb = parallel.shard_batch(b, mesh)
    s, gid, gm = (parallel.gather(a) for a in (jf(variables, gb), gb["id"], gb["mask"]))
    out.update({int(i): float(v) for i, v in zip(gid[gm], s[gm])})
  return np.asarray([out[int(i)] for i in ids])


result = {"process": pi, "num_devices": len(jax.devices())}
init_vars = parallel.replicate({"params": init_params}, mesh)
result["el2n_init"] = score_all(init_vars, scores.el2n).tolist()
result["grand_init"] = score_all(init_vars, scores.grand).tolist()
result["kept_init"] = select.select(ids, np.asarray(result["el2n_init"]), fraction=0.5,
                                    keep="hard", seed=0).tolist()
losses = []
for b in data.batches(ds.train, ids, batch_size=32, seed=0, epoch=0, process_index=pi,
                      process_count=pc):
  state, m = train.jit_train_step(state, parallel.shard_batch(b, mesh))
  losses.append(float(m["loss_sum"]) / float(m["count"]))
result["losses"] = losses
result["el2n_trained"] = score_all(state.variables, scores.el2n).tolist()
mask = masks.magnitude(parallel.replicate(init_params, mesh), 0.8)
result["mask_init"] = {k: np.asarray(parallel.gather(v)).ravel().astype(int).tolist()
                       for k, v in zip(masks.leaf_paths(mask), jax.tree.leaves(mask))}
with open(out_path, "w") as f:
  json.dump(result, f)
