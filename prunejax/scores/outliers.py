"""Outlier score: average distance to the k nearest neighbours in an embedding space.

This follows cleanlab's Datalab outlier issue on ``features`` (cleanlab 2.9,
``datalab/internal/issue_manager/outlier.py``): for each example, the mean distance to its ``k``
nearest *other* examples (exact duplicates included, at distance exactly 0), with the metric
``"cosine"`` (``1 - cos``) when the embedding has more than 3 dimensions and ``"euclidean"``
otherwise; Datalab's quality score is ``exp(-t * avg / scale)`` with ``scale = median(avg)`` (at
least ``100 * float64 eps``), set to 1 where ``avg`` is below a rounding tolerance (``100 * epsneg``
for cosine, ``sqrt(100 * eps)`` for euclidean). It is low for outliers; :func:`knn_outlier_score`
returns its negative log, ``t * avg / scale`` (0 below the tolerance), so **high = outlier**, and
ranks examples exactly as the average distance does: Datalab's score is ``exp(-ours)``. (``1 -``
Datalab's score would be the obvious "high = outlier" form, but in float32 it is exactly 1.0 once
``avg / scale`` passes about 17, so far outliers would tie.)

Differences from Datalab: the neighbours are found by exact brute force in JAX (f32, tiled, so
memory is ``tile x chunk`` similarities, never ``N x N``) and the distances to the neighbours found
are then recomputed on the host in float64; Datalab uses scikit-learn's exact search in float64.
Results agree to about 1e-6 except where two candidate neighbours are within f32 rounding of each
other, which can swap the k-th neighbour (the average moves by at most that rounding).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from prunejax import parallel
from prunejax.errors import (ConfigError, DataError, check_choice, check_positive_int,
                             check_unique_ids)
from prunejax.types import Scores

METRICS = ("auto", "cosine", "euclidean")


def _pairwise(rows_TxD, cols_CxD, metric: str):
  dot = jnp.dot(rows_TxD, cols_CxD.T, precision=lax.Precision.HIGHEST)
  if metric == "cosine":  # rows are unit norm here.
    return 1.0 - dot
  sq = (jnp.sum(jnp.square(rows_TxD), -1)[:, None] - 2.0 * dot
        + jnp.sum(jnp.square(cols_CxD), -1)[None, :])
  return jnp.maximum(sq, 0.0)  # squared: monotone in the distance, enough to pick neighbours.


def _merge(best_d, best_i, d, i, k):
  """The k smallest of (best, new) per row (top_k keeps the earlier entry among equal values)."""
  all_d = jnp.concatenate([best_d, d], axis=1)
  all_i = jnp.concatenate([best_i, i], axis=1)
  neg_d, where = lax.top_k(-all_d, k)
  return -neg_d, jnp.take_along_axis(all_i, where, axis=1)


def _local_knn(rows_SxD, rows_pos_S, cols_CxD, cols_pos_C, n, best_d, best_i, *, k, tile, chunk,
               metric):
  """Merges the neighbours among ``cols`` into the running best of every row tile."""
  num_tiles = rows_SxD.shape[0] // tile
  num_chunks = cols_CxD.shape[0] // chunk

  def row_tile(args):
    r_TxD, rp_T, bd_TxK, bi_TxK = args

    def body(j, carry):
      c_CxD = lax.dynamic_slice_in_dim(cols_CxD, j * chunk, chunk)
      cp_C = lax.dynamic_slice_in_dim(cols_pos_C, j * chunk, chunk)
      d_TxC = _pairwise(r_TxD, c_CxD, metric)
      d_TxC = jnp.where((cp_C[None, :] == rp_T[:, None]) | (cp_C[None, :] >= n), jnp.inf, d_TxC)
      return _merge(*carry, d_TxC, jnp.broadcast_to(cp_C[None, :], d_TxC.shape), k)

    return lax.fori_loop(0, num_chunks, body, (bd_TxK, bi_TxK))

  shape = lambda a: a.reshape((num_tiles, tile) + a.shape[1:])
  bd, bi = lax.map(row_tile, (shape(rows_SxD), shape(rows_pos_S), shape(best_d), shape(best_i)))
  return bd.reshape(best_d.shape), bi.reshape(best_i.shape)


@functools.partial(jax.jit, static_argnames=("k", "metric", "tile", "chunk", "mesh"))
def _knn(x_NxD, *, k: int, metric: str, tile: int, chunk: int, mesh: Mesh | None):
  n, d = x_NxD.shape
  devices = 1 if mesh is None else mesh.devices.size
  block = tile * chunk // np.gcd(tile, chunk)
  padded = -(-n // (block * devices)) * block * devices
  x = jnp.asarray(x_NxD, jnp.float32)
  if metric == "cosine":
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-30)
  x = jnp.zeros((padded, d), jnp.float32).at[:n].set(x)
  pos = jnp.arange(padded, dtype=jnp.int32)
  init_d = jnp.full((padded, k), jnp.inf, jnp.float32)
  init_i = jnp.full((padded, k), -1, jnp.int32)
  run = functools.partial(_local_knn, n=n, k=k, tile=tile, chunk=chunk, metric=metric)
  if mesh is None:
    bd, bi = run(x, pos, x, pos, best_d=init_d, best_i=init_i)
  else:
    axis = mesh.axis_names[0]
    ring = [(i, (i + 1) % devices) for i in range(devices)]

    def local(x_SxD, pos_S, bd, bi):
      cols, cols_pos = x_SxD, pos_S
      for step in range(devices):  # each device sees every block once as it goes round the ring.
        bd, bi = run(x_SxD, pos_S, cols, cols_pos, best_d=bd, best_i=bi)
        if step + 1 < devices:
          cols, cols_pos = lax.ppermute((cols, cols_pos), axis, ring)
      return bd, bi

    bd, bi = jax.shard_map(local, mesh=mesh, in_specs=(P(axis),) * 4,
                           out_specs=(P(axis), P(axis)))(x, pos, init_d, init_i)
  return bd[:n], bi[:n]


def _metric_for(d: int, metric: str) -> str:
  check_choice("metric", metric, METRICS)
  if metric == "auto":  # Datalab's rule (cleanlab.internal.neighbor.metric.decide_default_metric).
    return "cosine" if d > 3 else "euclidean"
  return metric


def _check(x_NxD: Any, k: int, metric: str, ids: np.ndarray | None = None
           ) -> tuple[np.ndarray, str]:
  x = np.asarray(parallel.gather(x_NxD) if isinstance(x_NxD, jax.Array) else x_NxD)
  if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
    raise DataError(f"embeddings_NxD must be a non-empty 2-D array [N, D]; got shape {x.shape}")
  check_positive_int("k", k)
  if k >= x.shape[0]:
    raise ConfigError(f"k={k} nearest neighbours need more than k examples; got N={x.shape[0]}, "
                      f"so k must be at most {x.shape[0] - 1}")
  x = x.astype(np.float64)
  finite = np.isfinite(x).all(axis=1)
  if not finite.all():
    bad = np.flatnonzero(~finite)
    raise DataError(f"embeddings_NxD has NaN or inf in {len(bad)} rows ({_where(bad, ids)})")
  metric = _metric_for(x.shape[1], metric)
  if metric == "cosine":
    zero = np.flatnonzero(~(np.linalg.norm(x, axis=1) > 0))
    if len(zero):
      raise DataError(f"embeddings_NxD has {len(zero)} rows of zero norm ({_where(zero, ids)}), "
                      f"whose cosine distance is undefined; use metric='euclidean'")
  return x, metric


def _where(rows: np.ndarray, ids: np.ndarray | None) -> str:
  return (f"positions {rows[:5].tolist()}" if ids is None else f"ids {ids[rows[:5]].tolist()}")


def knn_distances(embeddings_NxD: Any, k: int = 10, *, metric: str = "auto", tile: int = 256,
                  chunk: int = 1024, mesh: Mesh | None = None,
                  ids_N: Any = None) -> tuple[np.ndarray, np.ndarray]:
  """Exact k nearest neighbours of every example among the others, with float64 distances.

  Args:
    embeddings_NxD: one embedding per example (host or device).
    k: neighbours per example, at most ``N - 1``.
    metric: ``"cosine"`` (``1 - cos``), ``"euclidean"``, or ``"auto"`` (cosine above 3 dimensions,
      as Datalab).
    tile, chunk: rows and columns per block of the brute-force search (memory ``tile x chunk``).
    mesh: a 1-D device mesh: rows are split over it and column blocks passed round the ring, so each
      device holds ``N / devices`` embeddings.
    ids_N: unique int ids of the rows; when given, neighbours are reported by id (ties in distance
      go to the lower id, so the answer by id does not depend on the order of the rows).

  Returns:
    ``(distances_NxK, neighbours_NxK)``: float64 distances, ascending, and the neighbours: int64
    ids when ``ids_N`` is given, else positions (ties go to the lower position).
  """
  ids = _ids(ids_N, embeddings_NxD)
  dist_NxK, idx_NxK, _ = _knn_host(embeddings_NxD, k, metric, tile, chunk, mesh, ids)
  return dist_NxK, idx_NxK if ids is None else ids[idx_NxK]


def _ids(ids_N: Any, embeddings_NxD: Any) -> np.ndarray | None:
  if ids_N is None:
    return None
  shape = getattr(embeddings_NxD, "shape", None) or np.shape(embeddings_NxD)
  return check_unique_ids("ids_N", ids_N, shape[0] if len(shape) else 0)


def _knn_host(embeddings_NxD, k, metric, tile, chunk, mesh, ids=None):
  x, metric = _check(embeddings_NxD, k, metric, ids)
  check_positive_int("tile", tile)
  check_positive_int("chunk", chunk)
  n = x.shape[0]
  if mesh is not None and mesh.devices.size == 1:
    mesh = None
  if mesh is not None and len(mesh.axis_names) != 1:
    raise ConfigError(f"mesh has axes {mesh.axis_names}; pass a 1-D mesh such as "
                      f"prunejax.parallel.data_mesh()")
  per_device = -(-n // (1 if mesh is None else mesh.devices.size))
  tile = max(8, min(tile, -(-per_device // 8) * 8))
  chunk = max(8, min(chunk, -(-per_device // 8) * 8))
  # With ids, the search runs on the rows sorted by id, so its position tie-break is an id
  # tie-break and the neighbours by id do not depend on the order of the rows.
  by_id = None if ids is None else np.argsort(ids, kind="stable")
  xs = x if by_id is None else x[by_id]
  _, idx = _knn(jnp.asarray(xs, jnp.float32), k=k, metric=metric, tile=tile, chunk=chunk,
                mesh=mesh)
  idx = parallel.gather(idx).astype(np.int64)
  if by_id is not None:  # back to the caller's rows and positions.
    back = np.empty(n, np.int64)
    back[by_id] = np.arange(n)
    idx = by_id[idx[back]]
  # Exact float64 distances to the neighbours found, sorted (ties by position).
  if metric == "cosine":
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    dist = 1.0 - np.einsum("nd,nkd->nk", u, u[idx])
  else:
    dist = np.sqrt(np.sum(np.square(x[:, None, :] - x[idx]), axis=-1))
  # Exact duplicates at exactly 0, as Datalab's duplicate correction of its kNN graph.
  dist = np.where(np.all(x[:, None, :] == x[idx], axis=-1), 0.0, np.maximum(dist, 0.0))
  order = np.lexsort((idx if ids is None else ids[idx], dist), axis=1)
  return np.take_along_axis(dist, order, 1), np.take_along_axis(idx, order, 1), metric


def knn_outlier_score(embeddings_NxD: Any, k: int = 10, *, metric: str = "auto", t: float = 1.0,
                      scaling_factor: float | None = None, tile: int = 256, chunk: int = 1024,
                      mesh: Mesh | None = None, ids_N: Any = None) -> Scores:
  """Datalab's kNN outlier score as a negative log: ``t * avg_knn_distance / scale``.

  Datalab's ``outlier_score`` is ``exp(-ours)``; ours does not saturate, so it ranks examples
  exactly as the average distance does, far outliers included (``1 - exp(-x)`` is exactly 1.0 in
  float32 once ``x`` passes about 17).

  Args:
    embeddings_NxD: one embedding per example, e.g. the penultimate features
      (:func:`prunejax.scores.penultimate`) over the dataset.
    k: neighbours (Datalab's default 10), at most ``N - 1``.
    metric: ``"auto"`` (Datalab's choice: cosine above 3 dimensions), ``"cosine"`` or
      ``"euclidean"``.
    t: Datalab's sensitivity ``t``.
    scaling_factor: Datalab's scale; default the median average distance.
    tile, chunk, mesh: as in :func:`knn_distances`.
    ids_N: unique int ids of the rows (checked; errors name ids instead of positions). The score of
      an id does not depend on the order of the rows.

  Returns:
    f32[N] >= 0, aligned with the rows: **high = outlier**; 0 where the average distance is below
    Datalab's rounding tolerance (exact duplicates).

  References:
    cleanlab Datalab, outlier issue type (Kuan & Mueller, "Back to the Basics: Revisiting
    Out-of-Distribution Detection Baselines", ICML Workshop 2022).
  """
  if not (isinstance(t, (int, float)) and t > 0 and np.isfinite(t)):
    raise ConfigError(f"t={t!r} is not allowed; expected a positive number")
  ids = _ids(ids_N, embeddings_NxD)
  dist_NxK, _, metric = _knn_host(embeddings_NxD, k, metric, tile, chunk, mesh, ids)
  avg_N = dist_NxK.mean(axis=1)
  if scaling_factor is None:
    scale = max(float(np.median(avg_N)), 100 * np.finfo(np.float64).eps)
  elif not (isinstance(scaling_factor, (int, float)) and 0 < scaling_factor < np.inf):
    raise ConfigError(f"scaling_factor={scaling_factor!r} is not allowed; expected a positive "
                      f"number")  # NaN included.
  else:
    scale = float(scaling_factor)
  neg_log_quality_N = t * avg_N / scale
  tol = (100 * np.finfo(np.float64).epsneg if metric == "cosine"
         else np.sqrt(100 * np.finfo(np.float64).eps))
  neg_log_quality_N[avg_N < tol] = 0.0
  return jnp.asarray(neg_log_quality_N, jnp.float32)
