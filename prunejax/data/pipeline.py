"""Batches over any subset of example ids.

Every batch is a dict ``{"x", "y", "id", "mask"}`` of exactly ``batch_size`` rows: the last partial batch
is padded with zero inputs, label 0, id -1 and ``mask=False``, so every step has one shape (one
compilation) and padding never changes a loss, a metric or a score (they all weight rows by ``mask``).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Iterator

import numpy as np

from prunejax.data.datasets import Split
from prunejax.errors import ConfigError

PAD_ID = -1


def epoch_order(ids: np.ndarray, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order of ``ids`` in one epoch: a permutation seeded by (seed, epoch), or ``ids`` as given."""
  ids = np.asarray(ids, np.int64)
  if not shuffle:
    return ids
  rng = np.random.default_rng([seed, epoch, 0x5EED])
  return ids[rng.permutation(len(ids))]


def augment_images(x_BxHxWxC: np.ndarray, rng: np.random.Generator, *, pad: int = 4,
                   flip: bool = True) -> np.ndarray:
  """Random crop after zero padding by ``pad`` pixels, and random horizontal flip."""
  b, h, w, _ = x_BxHxWxC.shape
  padded = np.pad(x_BxHxWxC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  dy, dx = rng.integers(0, 2 * pad + 1, size=(2, b))
  out = np.empty_like(x_BxHxWxC)
  for i in range(b):
    out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
  if flip:
    flips = rng.random(b) < 0.5
    out[flips] = out[flips, :, ::-1]
  return out


def augment_by_id(x_BxHxWxC: np.ndarray, ids_B: np.ndarray, *, seed: int, epoch: int) -> np.ndarray:
  """:func:`augment_images` with one random stream per (seed, epoch, example id), so an example gets
  the same crop and flip however the batch is split over processes."""
  out = x_BxHxWxC.copy()
  for i, ex_id in enumerate(ids_B):
    if ex_id >= 0:
      rng = np.random.default_rng([seed, epoch, int(ex_id), 0xA06])
      out[i:i + 1] = augment_images(x_BxHxWxC[i:i + 1], rng)
  return out


def make_batch(split: Split, ids: np.ndarray, batch_size: int) -> dict[str, np.ndarray]:
  """One padded batch holding the examples ``ids`` (at most ``batch_size`` of them)."""
  n = len(ids)
  if n > batch_size:
    raise ConfigError(f"{n} ids do not fit in batch_size={batch_size}")
  pos = split.positions(ids)
  x = np.zeros((batch_size,) + split.x.shape[1:], split.x.dtype)
  y = np.zeros((batch_size,), np.int32)
  bid = np.full((batch_size,), PAD_ID, np.int64)
  mask = np.zeros((batch_size,), bool)
  x[:n], y[:n], bid[:n], mask[:n] = split.x[pos], split.y[pos], split.id[pos], True
  return {"x": x, "y": y, "id": bid, "mask": mask}


def batches(split: Split, ids: np.ndarray | None = None, *, batch_size: int, seed: int = 0,
            epoch: int = 0, shuffle: bool = True, drop_remainder: bool = False,
            augment: bool = False, extra: dict[str, np.ndarray] | None = None,
            process_index: int = 0, process_count: int = 1) -> Iterator[dict[str, np.ndarray]]:
  """Host batches over ``ids`` (all of ``split`` by default) for one epoch.

  Args:
    split: the examples.
    ids: which example ids to visit; the order is reshuffled each epoch when ``shuffle``.
    batch_size: rows per batch, padding included.
    seed, epoch: seed the shuffle and the augmentation; the same pair gives the same batches.
    drop_remainder: drop the last partial batch instead of padding it.
    augment: random crop and flip (images only).
    extra: per-example arrays keyed by the same ids (e.g. loss weights), batched alongside; the
      value for id ``i`` is ``extra[k][positions of i in ids]``, and 0 on padding rows.
    process_index, process_count: with several processes, each loads only its rows of every global
      batch (``batch_size / process_count`` of them, in process order), for
      ``jax.make_array_from_process_local_data``.
  """
  if batch_size <= 0:
    raise ConfigError(f"batch_size={batch_size} is not allowed; expected a positive integer")
  if batch_size % process_count:
    raise ConfigError(f"batch_size={batch_size} must be a multiple of the number of processes "
                      f"({process_count})")
  local = batch_size // process_count
  lo = process_index * local
  ids = split.id if ids is None else np.asarray(ids, np.int64)
  if extra:
    extra_by_id = {k: dict(zip(ids.tolist(), np.asarray(v))) for k, v in extra.items()}
  order = epoch_order(ids, seed=seed, epoch=epoch, shuffle=shuffle)
  stop = len(order) - (len(order) % batch_size if drop_remainder else 0)
  for start in range(0, stop, batch_size):
    chunk = order[start:start + batch_size][lo:lo + local]
    batch = make_batch(split, chunk, local)
    if augment:
      batch["x"] = augment_by_id(batch["x"], batch["id"], seed=seed, epoch=epoch)
    if extra:
      for k, table in extra_by_id.items():
        col = np.zeros((local,), np.float32)
        col[:len(chunk)] = [table[i] for i in chunk.tolist()]
        batch[k] = col
    yield batch


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def prefetch(iterator: Iterator[Any], size: int = 2, transform=None) -> Iterator[Any]:
  """Runs ``iterator`` (and ``transform``, e.g. a device put) in a background thread, ``size`` ahead."""
  if size <= 0:
    yield from (transform(b) if transform else b for b in iterator)
    return
  q: queue.Queue = queue.Queue(maxsize=size)
  sentinel = object()
  error: list[BaseException] = []

  def worker():
    try:
      for item in iterator:
        q.put(transform(item) if transform else item)
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer.
      error.append(e)
    finally:
      q.put(sentinel)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is sentinel:
      if error:
        raise error[0]
      return
    yield item
