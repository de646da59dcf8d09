"""SemDeDup: semantic near-duplicates from k-means clusters and within-cluster cosine similarity.

The definition, exactly as in Abbas et al. (2023), Algorithm 1 and the authors' code
(``facebookresearch/SemDeDup``: ``clustering/sort_clusters.py``, ``semdedup.py``):

1. L2-normalize the embeddings and cluster them with spherical k-means.
2. Inside each cluster, order the examples by keep priority. The paper's default (``keep_hard``)
   sorts by cosine distance to the cluster centroid, farthest first; Python's stable sort leaves
   ties in dataset order, so a tie goes to the lower id. ``keep="lowest_id"`` orders by id instead.
3. For each example ``j`` let ``M_j`` be the largest cosine similarity between ``j`` and an example
   ``i`` that comes before it in the same cluster (the column maximum of the strictly upper
   triangular similarity matrix).
4. Remove ``j`` when ``M_j > 1 - eps``. ``eps`` is a cosine-*distance* threshold in [0, 1]: a larger
   ``eps`` removes more. ``eps = 0`` removes nothing (similarities are clipped to [-1, 1]).

So the first example of every cluster is kept, and of a group of mutual near-duplicates the one
with the highest priority survives. The earlier example that makes ``j`` a duplicate may itself be
removed (chains are not repaired), as in the paper. The authors' ``M_j`` is ``max(0, ...)`` because
the masked-out entries of their triangular matrix are zeros; for ``eps`` in [0, 1] the threshold
``1 - eps`` is at least 0, so the decision is the same. Here ``M_j`` is the true maximum (``-inf``
for the first example of a cluster), which is more informative.

Computation: examples are sorted by (cluster, priority, id), so each cluster is a contiguous run.
Row tiles of ``tile`` examples are compared only with the column tiles between their cluster's
start and themselves (a ``while`` loop with a data-dependent trip count), so the work is about
``sum_k n_k^2 D`` and the working memory ``tile x tile``; no ``N x N`` matrix is formed. With a
``mesh`` the sorted rows are split over its devices and each device receives, from the devices
before it (``ppermute``), the ``halo >= largest cluster - 1`` rows its clusters may reach back to,
so per-device memory is ``(N / devices + largest cluster) x D``.

References:
  Abbas, Tirumala, Simig, Ganguli, Morcos. "SemDeDup: Data-efficient learning at web-scale through
  semantic deduplication." arXiv:2303.09540, 2023.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from prunejax import parallel
from prunejax.errors import (ConfigError, DataError, check_choice, check_positive_int, check_range,
                             check_unique_ids)
from prunejax.scores.prototypes import _sq_dists, kmeans

KEEP = ("farthest", "lowest_id")


class SemDedup(NamedTuple):
  """What SemDeDup found, per example in the input order (host NumPy arrays).

  Attributes:
    ids: i64[N] example ids.
    cluster: i32[N] k-means cluster of each example.
    centroids: f32[K, D] unit-norm cluster centroids.
    max_similarity: f32[N] ``M_j``: the largest cosine similarity to an example of the same cluster
      with higher keep priority; ``-inf`` for the first example of a cluster.
    duplicate_of: i64[N] id of that example (the earliest in processing order among equal
      maxima); the example's own id where there is none (no example is its own duplicate, and
      every int64 can be a valid id, so no other sentinel is safe). See :attr:`has_duplicate`.

  The result depends only on the key and on the examples by id: rows in another order give the
  same clusters, the same ``M_j`` and the same removed ids (k-means samples and seeds over the
  rows sorted by id).
  """

  ids: np.ndarray
  cluster: np.ndarray
  centroids: np.ndarray
  max_similarity: np.ndarray
  duplicate_of: np.ndarray

  @property
  def has_duplicate(self) -> np.ndarray:
    """bool[N]: whether the example has an earlier example in its cluster (``M_j > -inf``), i.e.
    whether ``duplicate_of`` names another example."""
    return self.duplicate_of != self.ids

  def keep(self, eps: float) -> np.ndarray:
    """bool[N]: True for the examples SemDeDup keeps at threshold ``eps`` (``M_j <= 1 - eps``)."""
    check_range("semdedup.eps", eps, 0.0, 1.0)
    return self.max_similarity.astype(np.float64) <= 1.0 - float(eps)

  def removed_ids(self, eps: float) -> np.ndarray:
    """Sorted ids of the examples removed at threshold ``eps``."""
    return np.sort(self.ids[~self.keep(eps)])


# ----------------------------------------------------------------------------------------------
# Pure functions (jit).
# ----------------------------------------------------------------------------------------------


@jax.jit
def _row_stats(x_NxD: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = x_NxD.astype(jnp.float32)
  return jnp.all(jnp.isfinite(x), axis=-1), jnp.sum(jnp.square(x), axis=-1)


@jax.jit
def normalize_rows(x_NxD: jax.Array) -> jax.Array:
  """Rows scaled to unit L2 norm (f32); rows of norm 0 stay 0."""
  x = jnp.asarray(x_NxD, jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)


@functools.partial(jax.jit, static_argnames=("num_clusters",))
def cluster_centroids(unit_NxD: jax.Array, clusters_N: jax.Array, num_clusters: int) -> jax.Array:
  """Unit-norm mean of each cluster's unit embeddings, f32[K, D] (0 for an empty cluster)."""
  sums_KxD = jax.ops.segment_sum(unit_NxD, clusters_N, num_segments=num_clusters)
  return normalize_rows(sums_KxD)


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters", "sample"))
def spherical_kmeans(key: jax.Array, unit_NxD: jax.Array, num_clusters: int, *, num_iters: int = 50,
                     sample: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Spherical k-means of unit embeddings, trained on a seeded subsample, then every point assigned.

  Args:
    key: PRNG key (subsample and k-means++ seeding).
    unit_NxD: unit-norm embeddings.
    num_clusters: ``K``.
    num_iters: Lloyd iterations.
    sample: train on this many points drawn without replacement (all when ``None`` or ``>= N``),
      as faiss does (at most 256 points per centroid by default), which the SemDeDup authors use.

  Returns:
    ``(centroids_KxD, clusters_N)``: unit centroids and each point's nearest centroid.
  """
  n = unit_NxD.shape[0]
  sample_key, key = jax.random.split(key)
  train_MxD = unit_NxD
  if sample is not None and sample < n:
    train_MxD = unit_NxD[jax.random.choice(sample_key, n, (sample,), replace=False)]
  # Weights of 1 computed from the data (x == x): with constant ones (kmeans's default) XLA
  # constant-folds the seeding's cumsum, which costs seconds of compile time at N = 1e5.
  weights_M = (train_MxD[:, 0] == train_MxD[:, 0]).astype(jnp.float32)
  c_KxD, _ = kmeans(key, train_MxD, num_clusters, num_iters=num_iters, weights_N=weights_M,
                    spherical=True)
  return c_KxD, jnp.argmin(_sq_dists(unit_NxD, c_KxD), axis=1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("keep",))
def semdedup_order(unit_NxD: jax.Array, centroids_KxD: jax.Array, clusters_N: jax.Array,
                   id_rank_N: jax.Array, keep: str = "farthest") -> jax.Array:
  """The SemDeDup processing order: a permutation sorting by (cluster, keep priority, id).

  Args:
    unit_NxD: unit-norm embeddings.
    centroids_KxD: cluster centroids (any norm; only their direction counts).
    clusters_N: int cluster of each example.
    id_rank_N: int32 rank of each example's id (ties in priority go to the lower id).
    keep: ``"farthest"`` (highest cosine distance to the centroid first, the paper's default) or
      ``"lowest_id"``.

  Returns:
    int32[N] positions, cluster by cluster, highest keep priority first.
  """
  if keep == "farthest":
    c_KxD = normalize_rows(centroids_KxD)
    # Ascending cosine similarity to the own centroid = descending cosine distance.
    key_N = jnp.sum(unit_NxD * c_KxD[clusters_N], axis=-1)
  else:
    key_N = jnp.zeros(unit_NxD.shape[:1], jnp.float32)
  return jnp.lexsort((id_rank_N, key_N, clusters_N)).astype(jnp.int32)


def _band(buf_MxD: jax.Array, cb_M: jax.Array, *, row_start: int, tile: int,
          pos_offset: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Max similarity to an earlier row of the same cluster for rows ``row_start:`` of a buffer.

  ``cb_M`` (cluster ids) must be non-decreasing; ``row_start`` and the buffer length are multiples
  of ``tile``. Returns f32 maxima (-inf where none) and the argmax as buffer position +
  ``pos_offset`` (-1 where none); a tie goes to the earliest row.
  """
  m = buf_MxD.shape[0]
  start_M = jnp.searchsorted(cb_M, cb_M, side="left").astype(jnp.int32)
  arange_T = jnp.arange(tile, dtype=jnp.int32)

  def row_tile(t):
    r0 = row_start + t * tile
    rows_TxD = lax.dynamic_slice_in_dim(buf_MxD, r0, tile)
    rc_T = lax.dynamic_slice_in_dim(cb_M, r0, tile)
    rpos_T = r0 + arange_T

    def body(j, carry):
      best_T, arg_T = carry
      c0 = j * tile
      cols_TxD = lax.dynamic_slice_in_dim(buf_MxD, c0, tile)
      cc_T = lax.dynamic_slice_in_dim(cb_M, c0, tile)
      sim_TxT = jnp.dot(rows_TxD, cols_TxD.T, precision=lax.Precision.HIGHEST)
      valid_TxT = (rc_T[:, None] == cc_T[None, :]) & ((c0 + arange_T)[None, :] < rpos_T[:, None])
      sim_TxT = jnp.where(valid_TxT, sim_TxT, -jnp.inf)
      tile_best_T = jnp.max(sim_TxT, axis=1)
      better_T = tile_best_T > best_T
      arg_new_T = c0 + jnp.argmax(sim_TxT, axis=1).astype(jnp.int32)
      return jnp.where(better_T, tile_best_T, best_T), jnp.where(better_T, arg_new_T, arg_T)

    init = (jnp.full((tile,), -jnp.inf, jnp.float32), jnp.full((tile,), -1, jnp.int32))
    # The first row of the tile has the earliest cluster start of the tile (rows are sorted).
    return lax.fori_loop(start_M[r0] // tile, r0 // tile + 1, body, init)

  best, arg = lax.map(row_tile, jnp.arange((m - row_start) // tile, dtype=jnp.int32))
  best, arg = best.reshape(-1), arg.reshape(-1)
  best = jnp.where(arg >= 0, jnp.clip(best, -1.0, 1.0), -jnp.inf)
  return best, jnp.where(arg >= 0, arg + pos_offset, -1)


def _band_sharded(e_NxD: jax.Array, c_N: jax.Array, *, mesh: Mesh, tile: int,
                  halo: int) -> tuple[jax.Array, jax.Array]:
  """:func:`_band` over a 1-D mesh: each device takes N / devices sorted rows plus a halo."""
  axis = mesh.axis_names[0]
  p = mesh.devices.size
  s = e_NxD.shape[0] // p
  hops = -(-halo // s)

  def local(e_SxD, c_S):
    parts_e, parts_c = [], []
    for h in range(hops, 0, -1):
      perm = [(i, i + h) for i in range(p - h)]
      parts_e.append(lax.ppermute(e_SxD, axis, perm))
      # Devices with no source receive zeros: shift by one so that they read as cluster -1.
      parts_c.append(lax.ppermute(c_S + 1, axis, perm) - 1)
    buf_e = jnp.concatenate(parts_e + [e_SxD])[hops * s - halo:]
    buf_c = jnp.concatenate(parts_c + [c_S])[hops * s - halo:]
    offset = lax.axis_index(axis).astype(jnp.int32) * s - halo
    return _band(buf_e, buf_c, row_start=halo, tile=tile, pos_offset=offset)

  # check_vma=False: the loop carries start as constants and become per-device values.
  return jax.shard_map(local, mesh=mesh, in_specs=(P(axis), P(axis)),
                       out_specs=(P(axis), P(axis)), check_vma=False)(e_NxD, c_N)


@functools.partial(jax.jit, static_argnames=("tile", "mesh", "halo"))
def _max_similarity(unit_NxD: jax.Array, clusters_N: jax.Array, order_N: jax.Array, *, tile: int,
                    mesh: Mesh | None, halo: int) -> tuple[jax.Array, jax.Array]:
  n, d = unit_NxD.shape
  devices = 1 if mesh is None else mesh.devices.size
  padded = -(-n // (tile * devices)) * tile * devices
  clusters_N = clusters_N.astype(jnp.int32)
  sentinel = jnp.max(clusters_N) + 1  # padding rows form their own cluster, sorted last.
  e_sorted = jnp.zeros((padded, d), jnp.float32).at[:n].set(unit_NxD[order_N].astype(jnp.float32))
  c_sorted = jnp.full((padded,), sentinel, jnp.int32).at[:n].set(clusters_N[order_N])
  if mesh is None:
    best, arg = _band(e_sorted, c_sorted, row_start=0, tile=tile, pos_offset=jnp.int32(0))
  else:
    sharding = NamedSharding(mesh, P(mesh.axis_names[0]))
    e_sorted = lax.with_sharding_constraint(e_sorted, sharding)
    c_sorted = lax.with_sharding_constraint(c_sorted, sharding)
    best, arg = _band_sharded(e_sorted, c_sorted, mesh=mesh, tile=tile, halo=halo)
  # Back from sorted positions to input positions.
  max_sim_N = jnp.zeros((n,), jnp.float32).at[order_N].set(best[:n])
  dup_sorted = jnp.where(arg[:n] >= 0, order_N[jnp.maximum(arg[:n], 0)], -1)
  dup_N = jnp.zeros((n,), jnp.int32).at[order_N].set(dup_sorted)
  return max_sim_N, dup_N


# ----------------------------------------------------------------------------------------------
# Host entry points: validation, then the pure functions above.
# ----------------------------------------------------------------------------------------------


def _check_embeddings(x: Any, ids_N: np.ndarray, field: str, *, unit: bool) -> None:
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 2 or shape[0] == 0 or shape[1] == 0:
    raise DataError(f"{field} must be a non-empty 2-D array [N, D]; got shape {shape}")
  finite_N, sq_N = (parallel.gather(a) for a in _row_stats(x))
  if not finite_N.all():
    bad = ids_N[~finite_N]
    raise DataError(f"{field} has NaN or inf in {len(bad)} rows (ids {bad[:5].tolist()}); clean or "
                    f"drop them before deduplicating")
  if unit and not (sq_N > 0).all():
    bad = ids_N[~(sq_N > 0)]
    raise DataError(f"{field} has {len(bad)} rows of zero norm (ids {bad[:5].tolist()}), whose "
                    f"cosine similarity is undefined")


def _host(a: Any) -> np.ndarray:
  return parallel.gather(a) if isinstance(a, jax.Array) else np.asarray(a)


def _check_mesh(mesh: Mesh | None) -> Mesh | None:
  if mesh is None or mesh.devices.size == 1:
    return None
  if len(mesh.axis_names) != 1:
    raise ConfigError(f"mesh has axes {mesh.axis_names}; pass a 1-D mesh such as "
                      f"prunejax.parallel.data_mesh()")
  return mesh


def _tile_for(n: int, tile: int, mesh: Mesh | None) -> int:
  check_positive_int("tile", tile)
  per_device = -(-n // (1 if mesh is None else mesh.devices.size))
  return max(8, min(tile, -(-per_device // 8) * 8))


def cluster_max_similarity(unit_NxD: Any, clusters_N: Any, order_N: Any, *, tile: int = 256,
                           mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
  """``M_j`` of SemDeDup for given clusters and processing order (step 3 of the module docstring).

  Args:
    unit_NxD: unit-norm embeddings (host or device, possibly sharded).
    clusters_N: non-negative int cluster of each example.
    order_N: a permutation of ``range(N)`` that lists each cluster's examples contiguously,
      highest keep priority first, clusters in increasing order (:func:`semdedup_order`).
    tile: rows per tile (the working set is ``tile x tile`` similarities).
    mesh: a 1-D device mesh to spread the rows over; ``None`` runs on one device.

  Returns:
    ``(max_similarity_N, duplicate_pos_N)`` in input positions: f32 ``M_j`` (-inf for the first of
    a cluster) and the position of the earlier example achieving it (the earliest in the order
    among equal maxima; -1 where none).
  """
  clusters, order = _host(clusters_N), _host(order_N)
  n = unit_NxD.shape[0]
  if clusters.shape != (n,) or order.shape != (n,):
    raise DataError(f"clusters_N {clusters.shape} and order_N {order.shape} must both be ({n},)")
  if not np.issubdtype(clusters.dtype, np.integer) or (n and clusters.min() < 0):
    raise DataError("clusters_N must hold non-negative int cluster ids")
  sorted_clusters = clusters[order]
  if not np.array_equal(np.sort(order), np.arange(n)) or np.any(np.diff(sorted_clusters) < 0):
    raise DataError("order_N must be a permutation of range(N) that sorts clusters_N (as "
                    "semdedup_order returns)")
  mesh = _check_mesh(mesh)
  tile = _tile_for(n, tile, mesh)
  halo = 0
  if mesh is not None:
    per_device = -(-n // (tile * mesh.devices.size)) * tile
    largest = int(np.bincount(clusters).max())
    halo = min(-(-(largest - 1) // tile) * tile, (mesh.devices.size - 1) * per_device)
  best, dup = _max_similarity(jnp.asarray(unit_NxD), jnp.asarray(clusters, jnp.int32),
                              jnp.asarray(order, jnp.int32), tile=tile, mesh=mesh, halo=halo)
  return parallel.gather(best), parallel.gather(dup).astype(np.int64)


def _clusters(unit, n, num_clusters, key, clusters_N, num_iters, max_points_per_centroid):
  """``(centroids, clusters)``: spherical k-means of ``unit``, or the given ``clusters_N``."""
  if clusters_N is None:
    check_positive_int("semdedup.num_clusters", num_clusters)
    if num_clusters > n:
      raise ConfigError(f"semdedup.num_clusters={num_clusters} exceeds the number of examples "
                        f"N={n}; expected 1..{n}")
    if key is None:
      raise ConfigError("semdedup needs key (a PRNG key for the k-means seeding) unless clusters_N "
                        "is given")
    sample = None if max_points_per_centroid is None else max_points_per_centroid * num_clusters
    centroids, clusters = spherical_kmeans(key, unit, num_clusters, num_iters=num_iters,
                                           sample=sample)
  else:
    clusters = np.asarray(clusters_N)
    if (clusters.shape != (n,) or not np.issubdtype(clusters.dtype, np.integer)
        or clusters.min() < 0):
      raise DataError(f"semdedup.clusters_N must be {n} non-negative ints; got dtype "
                      f"{clusters.dtype}, shape {clusters.shape}")
    clusters = jnp.asarray(clusters, jnp.int32)
    centroids = cluster_centroids(unit, clusters, int(clusters.max()) + 1)
  return centroids, clusters


def semdedup(embeddings_NxD: Any, *, num_clusters: int | None = None, key: jax.Array | None = None,
             ids_N: Any = None, keep: str = "farthest", clusters_N: Any = None,
             num_iters: int = 50, max_points_per_centroid: int | None = 256, tile: int = 256,
             mesh: Mesh | None = None) -> SemDedup:
  """SemDeDup's per-example maximum similarity; ``.keep(eps)`` then gives the kept examples.

  Args:
    embeddings_NxD: one embedding per example (e.g. the penultimate features of a trained model,
      :func:`prunejax.scores.penultimate`); host or device, possibly sharded. Normalized here.
    num_clusters: spherical k-means clusters (at most N); not used when ``clusters_N`` is given.
    key: PRNG key of the k-means seeding; the result is a deterministic function of it.
    ids_N: unique int ids (default ``0..N-1``); ties in priority go to the lower id. The result
      by id does not depend on the order of the rows.
    keep: ``"farthest"`` (the paper's default: of a duplicate group, keep the example farthest
      from its cluster centroid) or ``"lowest_id"``.
    clusters_N: precomputed non-negative int clusters (e.g. classes); skips k-means.
    num_iters: Lloyd iterations of k-means.
    max_points_per_centroid: k-means is trained on at most this many points per cluster (a seeded
      subsample, faiss's default 256), then every example is assigned to its nearest centroid;
      ``None`` trains on all examples.
    tile: rows per similarity tile.
    mesh: a 1-D device mesh (``prunejax.parallel.data_mesh()``) to spread the similarity step over.

  Returns:
    A :class:`SemDedup`; ``result.keep(eps)`` is the kept mask at cosine-distance threshold eps.

  References:
    Abbas et al. "SemDeDup: Data-efficient learning at web-scale through semantic
    deduplication." arXiv:2303.09540, 2023.
  """
  check_choice("semdedup.keep", keep, KEEP)
  check_positive_int("semdedup.num_iters", num_iters)
  embeddings_NxD, ids, clusters_N = _checked_inputs(embeddings_NxD, ids_N, clusters_N)
  n = len(ids)
  # Everything below runs on the rows sorted by id, so the k-means subsample and seeding (which
  # draw row positions) and every tie see the same rows whatever order the caller passed.
  by_id = np.argsort(ids, kind="stable")
  permuted = not np.array_equal(by_id, np.arange(n))
  if permuted:
    embeddings_NxD = embeddings_NxD[jnp.asarray(by_id) if isinstance(embeddings_NxD, jax.Array)
                                    else by_id]
    clusters_N = None if clusters_N is None else clusters_N[by_id]
  best, duplicate_of, clusters, centroids = _in_id_order(
      embeddings_NxD, ids[by_id], clusters_N, num_clusters=num_clusters, key=key, keep=keep,
      num_iters=num_iters, max_points_per_centroid=max_points_per_centroid, tile=tile, mesh=mesh)
  if permuted:  # back to the caller's rows.
    back = np.empty(n, np.int64)
    back[by_id] = np.arange(n)
    best, duplicate_of, clusters = best[back], duplicate_of[back], clusters[back]
  return SemDedup(ids=ids, cluster=clusters, centroids=centroids, max_similarity=best,
                  duplicate_of=duplicate_of)


def _checked_inputs(embeddings_NxD: Any, ids_N: Any, clusters_N: Any
                    ) -> tuple[Any, np.ndarray, np.ndarray | None]:
  """(embeddings as given, or as a NumPy array when they have no shape; the checked ids, default
  ``0..N-1``; the clusters as a NumPy array or None)."""
  shape = getattr(embeddings_NxD, "shape", None)
  if shape is None:
    embeddings_NxD = np.asarray(embeddings_NxD)
    shape = embeddings_NxD.shape
  n = shape[0] if len(shape) else 0
  ids = check_unique_ids("semdedup.ids_N", np.arange(n) if ids_N is None else ids_N, n)
  _check_embeddings(embeddings_NxD, ids, "semdedup.embeddings_NxD", unit=True)
  if clusters_N is not None:
    clusters_N = np.asarray(clusters_N)
    if clusters_N.shape != (n,):
      raise DataError(f"semdedup.clusters_N must be {n} non-negative ints; got dtype "
                      f"{clusters_N.dtype}, shape {clusters_N.shape}")
  return embeddings_NxD, ids, clusters_N


def _in_id_order(embeddings_NxD: Any, sorted_ids: np.ndarray, clusters_N: np.ndarray | None, *,
                 num_clusters: int | None, key: jax.Array | None, keep: str, num_iters: int,
                 max_points_per_centroid: int | None, tile: int, mesh: Mesh | None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """SemDeDup of rows sorted by id: (max similarity f32[N], duplicate_of ids i64[N], cluster
  i32[N], unit centroids [K, D]), host arrays."""
  n = len(sorted_ids)
  unit = normalize_rows(embeddings_NxD)
  centroids, clusters = _clusters(unit, n, num_clusters, key, clusters_N, num_iters,
                                  max_points_per_centroid)
  id_rank = jnp.arange(n, dtype=jnp.int32)  # rows are in id order.
  order = semdedup_order(unit, centroids, clusters, id_rank, keep)
  best, dup_pos = cluster_max_similarity(unit, clusters, order, tile=tile, mesh=mesh)
  duplicate_of = np.where(dup_pos >= 0, sorted_ids[np.maximum(dup_pos, 0)], sorted_ids)
  clusters = parallel.gather(clusters).astype(np.int32)
  return best, duplicate_of, clusters, parallel.gather(normalize_rows(centroids))
