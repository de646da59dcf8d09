"""Batches over any subset of example ids, read from a :class:`~prunejax.data.Source` with grain.

Every batch is a dict ``{"x", "y", "id", "mask", "epoch"}`` (plus any per-example ``columns``) of
exactly ``batch_size`` rows (``batch_size / process_count`` per process): the last partial batch is
padded with zero inputs, label 0, id -1 and ``mask=False``, so every step has one shape (one
compilation) and padding never changes a loss, a metric or a score (they all weight rows by
``mask``). ``epoch`` repeats the epoch number on every row; with ``id`` it keys the on-device
augmentation (:class:`prunejax.data.Preprocess`).

The epoch's order is one permutation of the ids, drawn from ``(seed, epoch)``; batch ``b`` is its
``b``-th slice, and process ``p`` of ``P`` reads rows ``[p * B/P, (p + 1) * B/P)`` of it. Batch
assembly is a slice, an O(1) id -> row lookup per example and one gather from the source, so its cost
does not grow with the number of ids. The batches are a grain ``MapDataset`` over batch numbers
(reader threads for sources that are not in memory, prefetching); the returned iterator's
``get_state()`` / ``set_state()`` is its position, and ``start`` begins an epoch mid-way, so a
resumed run sees exactly the batches it had not trained on yet.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
from typing import Any, Iterator

import numpy as np

from prunejax.data.sources import Source
from prunejax.errors import ConfigError, DataError

PAD_ID = -1


_MALLOC_TUNED = False
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
MMAP_THRESHOLD = 256 * 1024


def tune_malloc(threshold: int | None = None) -> bool:
  """Fixes glibc's mmap threshold for the rest of the process (``mallopt(M_MMAP_THRESHOLD, t)``).

  Streaming from disk, each reader thread allocates batch buffers of about a megabyte. glibc serves
  the first from ``mmap`` and then raises its threshold to that size (the dynamic threshold), so
  later buffers come from the thread's own arena and, once freed, stay in it: with 8 reader
  threads the peak RSS of a 1.1 GB streaming epoch grew by 263-316 MB. With a fixed threshold of
  256 KiB every batch-sized buffer is ``mmap``-ed and given back to the system when freed.
  (``MALLOC_ARENA_MAX=2`` in the environment also helps, but glibc reads it only at process start;
  ``mallopt(M_ARENA_MAX)`` later changes nothing, because JAX's threads have made the arenas by
  then.) Called by :func:`batches` before it starts reader threads.

  Args:
    threshold: bytes; default ``PRUNEJAX_MALLOC_MMAP_THRESHOLD`` from the environment, else
      :data:`MMAP_THRESHOLD`. 0 leaves glibc's default. Nothing is changed when
      ``MALLOC_MMAP_THRESHOLD_`` is set in the environment (the user chose).

  Returns:
    Whether the threshold was set (False off Linux/glibc, or when left alone).
  """
  global _MALLOC_TUNED
  if threshold is None:
    if _MALLOC_TUNED or "MALLOC_MMAP_THRESHOLD_" in os.environ:
      return _MALLOC_TUNED
    threshold = int(os.environ.get("PRUNEJAX_MALLOC_MMAP_THRESHOLD", str(MMAP_THRESHOLD)))
  if threshold <= 0 or not sys.platform.startswith("linux"):
    return False
  try:
    ok = bool(ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, int(threshold)))
  except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune.
    return False
  _MALLOC_TUNED = _MALLOC_TUNED or ok
  return ok


def epoch_order(ids: np.ndarray, *, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
  """The order of ``ids`` in one epoch: a permutation seeded by (seed, epoch), or ``ids`` as given."""
  ids = np.asarray(ids, np.int64)
  return ids[_positions(len(ids), seed, epoch, shuffle)]


def _positions(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
  if not shuffle:
    return np.arange(n)
  return np.random.default_rng([seed, epoch, 0x5EED]).permutation(n)


def num_batches(n: int, batch_size: int, drop_remainder: bool = False) -> int:
  return n // batch_size if drop_remainder else -(-n // batch_size)


def _check_sizes(batch_size: int, process_index: int, process_count: int) -> int:
  if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise ConfigError(f"batch_size={batch_size!r} is not allowed; expected a positive integer")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} is out of range for process_count="
                      f"{process_count}")
  if batch_size % process_count:
    raise ConfigError(f"batch_size={batch_size} must be a multiple of the number of processes "
                      f"({process_count})")
  return batch_size // process_count


class _EpochBatches:
  """Batch ``b`` of one epoch, this process's rows (a grain map function)."""

  def __init__(self, source: Source, ids: np.ndarray, rows: np.ndarray, order: np.ndarray,
               batch_size: int, lo: int, local: int, columns: dict[str, np.ndarray], epoch: int):
    self.source = source
    # Once per epoch, so a batch's ids and source rows are slices: no id lookup per batch, whether
    # the ids are dense (a table) or sparse (a sorted search).
    self.ordered_ids = ids[order]
    self.ordered_rows = order if rows is None else rows[order]
    # In memory, the labels and columns too are put in visiting order once per epoch (one O(N)
    # gather), so a batch reads slices of them: 256 labels gathered at random rows of a 1.28M-row
    # array miss the cache row by row, and that made a batch at 1.28M ids cost 2x one at 50k.
    self.ordered_y = (np.asarray(source.labels(), np.int32)[self.ordered_rows]
                      if source.in_memory else None)
    self.columns = {k: v[order] for k, v in columns.items()}
    self.batch_size, self.lo, self.local, self.epoch = batch_size, lo, local, epoch

  def __call__(self, b: int) -> dict[str, np.ndarray]:
    window = slice(b * self.batch_size + self.lo,
                   min(b * self.batch_size + self.lo + self.local, (b + 1) * self.batch_size))
    chunk = self.ordered_ids[window]
    n, local = len(chunk), self.local
    if self.ordered_y is None:
      got = self.source.read_rows(self.ordered_rows[window])
    else:
      got = {"x": self.source.read_inputs(self.ordered_rows[window]), "y": self.ordered_y[window]}
    shape, dtype = self.source.spec["x"]
    x = np.zeros((local,) + tuple(shape), dtype)
    x[:n] = got["x"]
    batch = {"x": x, "y": np.zeros((local,), np.int32), "id": np.full((local,), PAD_ID, np.int64),
             "mask": np.zeros((local,), bool), "epoch": np.full((local,), self.epoch, np.int32)}
    batch["y"][:n], batch["id"][:n], batch["mask"][:n] = got["y"], chunk, True
    for name, values in self.columns.items():
      col = np.zeros((local,) + values.shape[1:], values.dtype)
      col[:n] = values[window]
      batch[name] = col
    return batch


def batches(source: Source, ids: np.ndarray | None = None, *, batch_size: int, seed: int = 0,
            epoch: int = 0, shuffle: bool = True, drop_remainder: bool = False,
            columns: dict[str, np.ndarray] | None = None, process_index: int = 0,
            process_count: int = 1, start: int = 0, num_threads: int | None = None,
            prefetch: int | None = None) -> Any:
  """Host batches over ``ids`` (all of ``source`` by default) for one epoch.

  Args:
    source: the examples.
    ids: which example ids to visit; reshuffled each epoch when ``shuffle``.
    batch_size: rows per global batch, padding included.
    seed, epoch: seed the order; the same pair gives the same batches.
    shuffle: visit ``ids`` in a seeded random order (else in the order given).
    drop_remainder: drop the last partial batch instead of padding it.
    columns: per-example arrays aligned with ``ids`` (``columns[k][i]`` belongs to ``ids[i]``),
      e.g. loss weights; batched alongside, 0 on padding rows.
    process_index, process_count: with several processes, each reads only its rows of every global
      batch (``batch_size / process_count`` of them, in process order), for
      ``jax.make_array_from_process_local_data``.
    start: the first batch to produce (resuming an epoch mid-way).
    num_threads: grain reader threads (default: 0 for in-memory sources, 8 otherwise).
    prefetch: batches read ahead by those threads (default: 2 per thread).

  Returns:
    A grain iterator of batch dicts; ``get_state()`` / ``set_state()`` save and restore its
    position.

  Raises:
    ConfigError: a bad batch size or process layout. DataError: ids that are not in ``source``.
  """
  import grain
  local = _check_sizes(batch_size, process_index, process_count)
  if ids is None or ids is source.ids:
    ids, rows = source.ids, None  # the source's own rows: row i is position i
  else:
    ids = np.asarray(ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
      raise DataError(f"ids must be a 1-D integer array; got dtype {ids.dtype}, shape {ids.shape}")
    ids = ids.astype(np.int64)
    rows = source.index.rows(ids)  # unknown ids fail here, before any batch
  columns = {k: np.asarray(v) for k, v in (columns or {}).items()}
  for k, v in columns.items():
    if len(v) != len(ids):
      raise ConfigError(f"column {k!r} has {len(v)} values for {len(ids)} ids")
  fn = _EpochBatches(source, ids, rows, _positions(len(ids), seed, epoch, shuffle), batch_size,
                     process_index * local, local, columns, epoch)
  total = num_batches(len(ids), batch_size, drop_remainder)
  threads = (0 if source.in_memory else 8) if num_threads is None else num_threads
  if threads:
    tune_malloc()
  options = grain.ReadOptions(num_threads=threads,
                              prefetch_buffer_size=(2 * threads if prefetch is None else prefetch)
                              if threads else 0)
  it = iter(grain.MapDataset.range(total).map(fn).to_iter_dataset(options))
  if start:
    it.set_state({"next_index": int(start)})
  return it


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
