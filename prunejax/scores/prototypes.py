"""Self-supervised prototypes: distance to the nearest k-means centroid in an embedding space.

Examples close to a prototype are typical (easy); far ones are atypical (hard). The embeddings come
from any model (``embed_fn(params, x) -> e_BxD`` over the dataset, e.g. a self-supervised encoder);
this module clusters them with a seeded, deterministic k-means written in JAX.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from prunejax.errors import ConfigError, DataError, check_positive_int, check_unique_ids
from prunejax.types import Scores


def _sq_dists(x_NxD: jax.Array, c_KxD: jax.Array) -> jax.Array:
  """Squared Euclidean distances, f[N, K], clipped at 0 against rounding."""
  d = (jnp.sum(jnp.square(x_NxD), -1)[:, None] - 2.0 * x_NxD @ c_KxD.T
       + jnp.sum(jnp.square(c_KxD), -1)[None, :])
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames=("num_clusters", "num_iters", "spherical"))
def kmeans(key: jax.Array, x_NxD: jax.Array, num_clusters: int, *, num_iters: int = 50,
           weights_N: jax.Array | None = None,
           spherical: bool = False) -> tuple[jax.Array, jax.Array]:
  """k-means (Lloyd) from a k-means++ start; deterministic given ``key``.

  Args:
    key: PRNG key of the k-means++ seeding.
    x_NxD: the points.
    num_clusters: ``K``.
    num_iters: Lloyd iterations (a fixed count, so the function is jit-able).
    weights_N: optional non-negative weights; points of weight 0 are ignored (used to cluster one
      class of a larger array).
    spherical: rescale every centroid to unit norm after each update (spherical k-means, as faiss's
      ``spherical=True``). For unit-norm points the nearest centroid is then the one of highest
      cosine similarity.

  Returns:
    ``(centroids_KxD, assignment_N)``. A cluster that loses all its points keeps its centroid.

  References:
    Lloyd. "Least squares quantization in PCM." IEEE Trans. Inf. Theory 1982.
    Arthur, Vassilvitskii. "k-means++: The Advantages of Careful Seeding." SODA 2007.
  """
  n = x_NxD.shape[0]
  x_NxD = x_NxD.astype(jnp.promote_types(x_NxD.dtype, jnp.float32))
  w_N = jnp.ones(n, x_NxD.dtype) if weights_N is None else weights_N.astype(x_NxD.dtype)
  keys = jax.random.split(key, num_clusters)

  def pick(k, p_N):
    p_N = jnp.where(jnp.sum(p_N) > 0, p_N, w_N)  # all remaining mass at distance 0: any point.
    return jax.random.choice(k, n, p=p_N / jnp.sum(p_N))

  first = pick(keys[0], w_N)
  c_KxD = jnp.zeros((num_clusters, x_NxD.shape[1]), x_NxD.dtype).at[0].set(x_NxD[first])
  d2_N = _sq_dists(x_NxD, x_NxD[first][None])[:, 0]

  def seed_step(j, carry):
    c_KxD, d2_N = carry
    i = pick(keys[j], w_N * d2_N)
    c_KxD = c_KxD.at[j].set(x_NxD[i])
    return c_KxD, jnp.minimum(d2_N, _sq_dists(x_NxD, x_NxD[i][None])[:, 0])

  c_KxD, _ = lax.fori_loop(1, num_clusters, seed_step, (c_KxD, d2_N))

  def lloyd_step(_, c_KxD):
    assign_N = jnp.argmin(_sq_dists(x_NxD, c_KxD), axis=1)
    onehot_NxK = jax.nn.one_hot(assign_N, num_clusters, dtype=x_NxD.dtype) * w_N[:, None]
    counts_K = jnp.sum(onehot_NxK, axis=0)
    sums_KxD = onehot_NxK.T @ x_NxD
    new_KxD = jnp.where(counts_K[:, None] > 0, sums_KxD / jnp.maximum(counts_K, 1e-30)[:, None],
                        c_KxD)
    if spherical:  # a mean of zero norm (opposite points) keeps the previous centroid.
      norm_K1 = jnp.linalg.norm(new_KxD, axis=-1, keepdims=True)
      new_KxD = jnp.where(norm_K1 > 0, new_KxD / jnp.maximum(norm_K1, 1e-30), c_KxD)
    return new_KxD

  c_KxD = lax.fori_loop(0, num_iters, lloyd_step, c_KxD)
  return c_KxD, jnp.argmin(_sq_dists(x_NxD, c_KxD), axis=1)


def prototypes(embeddings_NxD: jax.Array, labels_N: jax.Array | np.ndarray | None = None, *,
               num_clusters: int, key: jax.Array, per_class: bool = False, num_iters: int = 50,
               normalize: bool = False, ids_N: jax.Array | np.ndarray | None = None) -> Scores:
  """Self-supervised prototype score: Euclidean distance to the nearest k-means centroid.

  Args:
    embeddings_NxD: one embedding per example (the whole dataset, or the part to be ranked).
    labels_N: int labels; needed when ``per_class``.
    num_clusters: k-means clusters, globally or in each class.
    key: PRNG key; the result is a deterministic function of it.
    per_class: cluster each class separately and measure each example against its own class's
      centroids (a supervised variant); otherwise one global clustering, as in Sorscher et al.
    num_iters: Lloyd iterations.
    normalize: L2-normalize the embeddings first (cosine geometry).
    ids_N: unique int ids of the rows. k-means seeds by row position, so without ids the result
      depends on the order of the rows; with ids the rows are clustered in id order and the score
      of an id is the same whatever order the rows come in.

  Returns:
    f32[N] distances, aligned with the rows. High means atypical (hard); keep the hardest with
    ``keep="hard"``.

  References:
    Sorscher, Geirhos, Shekhar, Ganguli, Morcos. "Beyond neural scaling laws: beating power law
    scaling via data pruning." NeurIPS 2022.
  """
  check_positive_int("prototypes.num_clusters", num_clusters)
  if ids_N is not None:
    n = int(np.shape(embeddings_NxD)[0]) if np.ndim(embeddings_NxD) else 0
    ids = check_unique_ids("prototypes.ids_N", ids_N, n)
    by_id = np.argsort(ids, kind="stable")
    back = np.empty(n, np.int64)
    back[by_id] = np.arange(n)
    labels = None if labels_N is None else np.asarray(labels_N)[by_id]
    out = prototypes(np.asarray(embeddings_NxD)[by_id], labels, num_clusters=num_clusters, key=key,
                     per_class=per_class, num_iters=num_iters, normalize=normalize)
    return out[jnp.asarray(back)]
  x_NxD = _checked_embeddings(embeddings_NxD, labels_N, num_clusters)
  if normalize:
    x_NxD = x_NxD / jnp.maximum(jnp.linalg.norm(x_NxD, axis=-1, keepdims=True), 1e-12)
  if not per_class:
    c_KxD, _ = kmeans(key, x_NxD, num_clusters, num_iters=num_iters)
    return jnp.sqrt(jnp.min(_sq_dists(x_NxD, c_KxD), axis=1))
  if labels_N is None:
    raise ConfigError("prototypes(per_class=True) needs labels_N")
  return _per_class_distances(key, x_NxD, np.asarray(labels_N), num_clusters, num_iters)


def _checked_embeddings(embeddings_NxD: Any, labels_N: Any, num_clusters: int) -> jax.Array:
  """f32[N, D] embeddings, non-empty and finite, with at least ``num_clusters`` rows and
  ``labels_N`` (when given) of length N."""
  x_NxD = jnp.asarray(embeddings_NxD, jnp.float32)
  if x_NxD.ndim != 2 or 0 in x_NxD.shape:
    raise DataError(f"prototypes.embeddings_NxD must be a non-empty 2-D array [N, D]; got shape "
                    f"{tuple(x_NxD.shape)}")
  if num_clusters > x_NxD.shape[0]:
    raise ConfigError(f"prototypes.num_clusters={num_clusters} exceeds the number of examples "
                      f"N={x_NxD.shape[0]}")
  finite_N = np.asarray(jnp.all(jnp.isfinite(x_NxD), axis=1))
  if not finite_N.all():
    raise DataError(f"prototypes.embeddings_NxD has NaN or inf in {int((~finite_N).sum())} rows "
                    f"(positions {np.flatnonzero(~finite_N)[:5].tolist()})")
  if labels_N is not None and np.shape(labels_N) != (x_NxD.shape[0],):
    raise DataError(f"prototypes.labels_N has shape {np.shape(labels_N)}; expected "
                    f"({x_NxD.shape[0]},)")
  return x_NxD


def _per_class_distances(key: jax.Array, x_NxD: jax.Array, labels_N: np.ndarray,
                         num_clusters: int, num_iters: int) -> jax.Array:
  """f32[N]: distance of each row to the nearest of its own class's k-means centroids (one
  clustering per class, vmapped, with the other classes' rows weighted 0)."""
  classes = np.unique(labels_N)
  weights_CxN = jnp.asarray(labels_N[None, :] == classes[:, None])
  keys = jax.random.split(key, len(classes))
  c_CxKxD, _ = jax.vmap(lambda k, w: kmeans(k, x_NxD, num_clusters, num_iters=num_iters,
                                            weights_N=w))(keys, weights_CxN)
  class_pos_N = jnp.asarray(np.searchsorted(classes, labels_N))
  d2_CxN = jax.vmap(lambda c_KxD: jnp.min(_sq_dists(x_NxD, c_KxD), axis=1))(c_CxKxD)
  return jnp.sqrt(jnp.take_along_axis(d2_CxN, class_pos_N[None], axis=0)[0])
