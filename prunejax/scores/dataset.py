"""Whole-dataset passes: a per-batch function (a score, features, probabilities) over every example
of a stream of batches, gathered by id.

``map_batches(fn, batches)`` puts each host batch on the devices (sharded over the ``data`` axis, one
process's rows each with several processes), applies ``fn``, gathers the result to every process and
keeps the rows of real examples. Nothing but the per-example outputs is ever held whole.
"""

from __future__ import annotations

from typing import Callable, Iterable

import jax
import numpy as np

from prunejax import parallel
from prunejax.train import NumericalError
from prunejax.types import Params


def map_batches(fn: Callable[[dict], jax.Array], batches: Iterable[dict], mesh=None
                ) -> tuple[np.ndarray, np.ndarray]:
  """``fn(batch) -> [B, ...]`` over ``batches``; returns ``(ids_N, values_N...)`` of the real rows
  (``mask`` True), in the order the batches visited them.

  Raises:
    ValueError: ``batches`` was empty.
  """
  mesh = mesh or parallel.data_mesh()
  ids, values = [], []
  for host_batch in batches:
    batch = parallel.shard_batch(host_batch, mesh)
    out, mask = parallel.gather(fn(batch)), parallel.gather(batch["mask"])
    ids.append(parallel.gather(batch["id"])[mask])
    values.append(out[mask])
  if not values:
    raise ValueError("map_batches got no batches")
  return np.concatenate(ids).astype(np.int64), np.concatenate(values)


def score_dataset(score_fn: Callable[[Params, dict], jax.Array], params: Params,
                  batches: Iterable[dict], mesh=None, *, name: str = "score"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Per-example scores f32[N] of every example in ``batches`` with their ids.

  Args:
    score_fn: ``score_fn(params, batch) -> f32[B]``, e.g. ``prunejax.scores.jit_score("el2n",
      apply_fn)`` (jit it once and reuse it, so new checkpoints do not re-compile).
    params: the parameters.
    batches: host batches (``prunejax.data.batches``), each example once.
    mesh: the device mesh (default: all devices on a ``data`` axis).
    name: the score's name, for the error message.

  Returns:
    ``(ids_N, scores_N)``.

  Raises:
    NumericalError: a score is NaN or infinite (naming the first ids).
  """
  ids, scores = map_batches(lambda b: score_fn(params, b), batches, mesh)
  scores = scores.astype(np.float32)
  bad = ~np.isfinite(scores)
  if np.any(bad):
    raise NumericalError(f"non-finite {name} for examples {ids[bad][:16].tolist()}")
  return ids, scores
