"""SemDeDup and the kNN search spread over 8 forced CPU devices equal their one-device results."""

from __future__ import annotations

from conftest import run_on_devices

CODE = r"""
import json
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from prunejax import dedup, parallel, scores

assert jax.device_count() == 8
mesh = parallel.data_mesh()
rng = np.random.default_rng(0)
out = {}

def compare(name, a, b):
  out[name] = {
      "max_sim_err": float(np.max(np.abs(np.where(np.isfinite(a.max_similarity),
                                                  a.max_similarity - b.max_similarity, 0)))),
      "same_first": bool(np.array_equal(np.isinf(a.max_similarity), np.isinf(b.max_similarity))),
      "same_removed": all(np.array_equal(a.removed_ids(e), b.removed_ids(e))
                          for e in (1e-4, 0.05, 0.2, 0.5)),
      "same_dup": bool(np.array_equal(a.duplicate_of, b.duplicate_of)),
      "removed": int(len(a.removed_ids(0.05))),
  }

# k-means clusters; N = 203 is not a multiple of the 8 devices.
x = rng.normal(size=(203, 6)).astype(np.float32)
x[50:60] = x[7] + 0.05 * rng.normal(size=(10, 6))
ids = rng.permutation(1000)[:203]
one = dedup.semdedup(x, num_clusters=4, key=jax.random.key(0), ids_N=ids)
many = dedup.semdedup(x, num_clusters=4, key=jax.random.key(0), ids_N=ids, mesh=mesh)
compare("kmeans", one, many)

# One cluster of 150 examples: the halo reaches back over five devices.
clusters = np.where(np.arange(203) < 150, 0, 1 + np.arange(203) % 5)
one = dedup.semdedup(x, clusters_N=clusters, ids_N=ids, keep="lowest_id")
many = dedup.semdedup(x, clusters_N=clusters, ids_N=ids, keep="lowest_id", mesh=mesh)
compare("big_cluster", one, many)

# Embeddings that are already a sharded device array.
xs = jax.device_put(jnp.asarray(x[:200]), NamedSharding(mesh, P("data")))
one = dedup.semdedup(x[:200], num_clusters=3, key=jax.random.key(1))
many = dedup.semdedup(xs, num_clusters=3, key=jax.random.key(1), mesh=mesh)
compare("sharded_input", one, many)

# kNN: rows split over the devices, column blocks passed round the ring.
d1, i1 = scores.knn_distances(x, 7)
d8, i8 = scores.knn_distances(x, 7, mesh=mesh)
s1 = np.asarray(scores.knn_outlier_score(x, 7))
s8 = np.asarray(scores.knn_outlier_score(x, 7, mesh=mesh))
out["knn"] = {"dist_err": float(np.max(np.abs(d1 - d8))), "same_idx": bool(np.array_equal(i1, i8)),
              "score_err": float(np.max(np.abs(s1 - s8)))}
print(json.dumps(out))
"""


def test_sharded_dedup_equals_single_device():
  result = run_on_devices(CODE, 8)
  for name in ("kmeans", "big_cluster", "sharded_input"):
    r = result[name]
    assert r["max_sim_err"] < 1e-6, (name, r)
    assert r["same_first"] and r["same_removed"] and r["same_dup"], (name, r)
    assert r["removed"] > 0, (name, r)
  assert result["knn"]["dist_err"] < 1e-12 and result["knn"]["same_idx"], result["knn"]
  assert result["knn"]["score_err"] < 1e-6, result["knn"]
