"""Random-access data sources keyed by example id.

A :class:`Source` answers ``read(ids) -> {"x": [n, ...], "y": i32[n]}`` for any example ids, in the
order asked, without holding the dataset in memory unless it already is. The loader
(:func:`prunejax.data.batches`) reads one batch of ids at a time from it. Sources:

* :class:`ArraySource`: arrays in memory (the embedded datasets, a user's NumPy arrays, a
  ``np.memmap``).
* :class:`RecordSource`: any random-access sequence of example dicts: a TFDS ``as_data_source`` split
  (array_record, read lazily), a grain ``RandomAccessDataSource``, or a user's own.
* :class:`ArrayRecordSource`: prunejax's own on-disk format, one raw record per example in an
  array_record file plus a small index of ids and labels (:func:`write_array_record`); the fast path
  for a local copy of a large image dataset.

Images stay ``uint8`` (or whatever the source holds) until they reach the device, where
:class:`prunejax.data.Preprocess` normalizes and augments them.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np

from prunejax.data.ids import IdIndex
from prunejax.errors import DataError, FileError, check_device_ids


class Source:
  """Examples by id: ``read(ids)``, ``labels()``, ``spec`` and ``ids``.

  Subclasses implement ``_read_rows(rows) -> {"x", "y"}`` (rows are positions in ``ids``) and
  ``_all_labels()``.

  Attributes:
    ids: i64[N], the example ids in source order.
    spec: ``{"x": (shape, dtype), "y": ((), int32)}``, one example's shapes.
    name: what the source is, for messages.
    in_memory: whether reads are cheap memory gathers (the loader then needs no reader threads).
  """

  in_memory = False

  def __init__(self, ids: np.ndarray, spec: dict[str, tuple[tuple[int, ...], Any]], name: str):
    self.name = name
    self.index = IdIndex(ids, name)
    check_device_ids(f"the ids of {name}", self.index.ids)  # they travel to the device in batches
    self.spec = spec
    self._labels: np.ndarray | None = None

  @property
  def ids(self) -> np.ndarray:
    return self.index.ids

  def __len__(self) -> int:
    return len(self.index)

  def read(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The examples ``ids`` (in that order): ``{"x": [n, ...], "y": i32[n]}``.

    Raises:
      DataError: an id that is not in the source.
    """
    return self._read_rows(self.index.rows(ids))

  def read_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    """The examples at row positions ``rows`` (from ``index.rows``): :meth:`read` without the id
    lookup, for a loader that looked the ids up once per epoch."""
    return self._read_rows(np.asarray(rows, np.int64))

  def read_inputs(self, rows: np.ndarray) -> np.ndarray:
    """``x`` of the examples at row positions ``rows``: :meth:`read_rows` without the labels, for a
    loader that took the epoch's labels in visiting order when the epoch started."""
    return self._read_x_rows(np.asarray(rows, np.int64))

  def labels(self, ids: np.ndarray | None = None) -> np.ndarray:
    """Labels i32 of ``ids`` (all, in source order, by default); read once, then cached."""
    if self._labels is None:
      self._labels = np.asarray(self._all_labels(), np.int32)
    return self._labels if ids is None else self._labels[self.index.rows(ids)]

  def example(self) -> np.ndarray:
    """One example's ``x`` of zeros with a batch axis, for initializing models."""
    shape, dtype = self.spec["x"]
    return np.zeros((1,) + tuple(shape), dtype)

  def take(self, n: int | None) -> "Source":
    """The first ``n`` examples (all when ``n`` is None)."""
    return self if n is None or n >= len(self) else SubsetSource(self, self.ids[:n])

  def _read_rows(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    raise NotImplementedError

  def _read_x_rows(self, rows: np.ndarray) -> np.ndarray:
    return self._read_rows(rows)["x"]

  def _all_labels(self) -> np.ndarray:
    return self._read_rows(np.arange(len(self)))["y"]


class SubsetSource(Source):
  """The examples ``ids`` of ``parent``."""

  def __init__(self, parent: Source, ids: np.ndarray):
    parent.index.rows(ids)  # every id must exist in the parent
    super().__init__(ids, parent.spec, parent.name)
    self.parent = parent
    self.in_memory = parent.in_memory

  def _read_rows(self, rows):
    return self.parent.read(self.ids[rows])

  def _all_labels(self):
    return self.parent.labels(self.ids)


class RelabeledSource(Source):
  """``parent`` with other labels (``labels[i]`` for ``parent.ids[i]``), e.g. with label noise
  (:func:`prunejax.data.flip_labels`)."""

  def __init__(self, parent: Source, labels: np.ndarray):
    labels = np.asarray(labels)
    if labels.shape != (len(parent),) or not np.issubdtype(labels.dtype, np.integer):
      raise DataError(f"{parent.name}: new labels must be {len(parent)} integers, got "
                      f"{labels.dtype}{list(labels.shape)}")
    super().__init__(parent.ids, parent.spec, parent.name)
    self.parent, self.in_memory = parent, parent.in_memory
    self._labels = labels.astype(np.int32)

  def _read_rows(self, rows):
    return {"x": self.parent.read(self.ids[rows])["x"], "y": self._labels[rows]}


class ArraySource(Source):
  """Examples held in arrays: ``x`` [N, ...] (any dtype; images as uint8), ``y`` int [N].

  Args:
    x: inputs; a ``np.memmap`` works too (rows are read on demand).
    y: integer labels.
    ids: the example ids, default ``0..N-1``.
    name: what the data is, for messages.
  """

  in_memory = True

  def __init__(self, x: np.ndarray, y: np.ndarray, ids: np.ndarray | None = None,
               name: str = "arrays"):
    y = np.asarray(y)
    if len(x) != len(y) or (ids is not None and len(ids) != len(y)):
      raise DataError(f"{name}: arrays disagree in length: x={len(x)}, y={len(y)}"
                      + ("" if ids is None else f", ids={len(ids)}"))
    if not np.issubdtype(y.dtype, np.integer):
      raise DataError(f"{name}: labels must be integers, got {y.dtype}")
    ids = np.arange(len(y), dtype=np.int64) if ids is None else np.asarray(ids)
    super().__init__(ids, {"x": (tuple(x.shape[1:]), np.dtype(x.dtype)),
                           "y": ((), np.dtype(np.int32))}, name)
    self.x, self.y = x, y.astype(np.int32)

  def _read_rows(self, rows):
    return {"x": np.asarray(self.x[rows]), "y": self.y[rows]}

  def _read_x_rows(self, rows):
    return np.asarray(self.x[rows])

  def _all_labels(self):
    return self.y


def _getitems(records: Any, rows: np.ndarray) -> list:
  if getattr(records, "__getitems__", None) is not None:
    try:
      return list(records.__getitems__(rows.tolist()))
    except TypeError:  # some TFDS versions' batched read is broken: read one by one
      pass
  return [records[int(r)] for r in rows]


def _stack(values: list, ids: np.ndarray, key: str, shape: tuple, dtype: Any, name: str
           ) -> np.ndarray:
  out = np.empty((len(values),) + tuple(shape), dtype)
  for i, v in enumerate(values):
    v = np.asarray(v)
    if v.shape != tuple(shape):
      raise DataError(f"{name}: example id {int(ids[i])} has {key} of shape {v.shape}; expected "
                      f"{tuple(shape)} like the first example (for images of varying sizes set "
                      "dataset.image_size to resize and center-crop them)")
    out[i] = v
  return out


class RecordSource(Source):
  """Examples from any random-access sequence of dicts (``records[i] -> {key: value}``).

  A TFDS ``builder.as_data_source(split)``, a grain ``RandomAccessDataSource`` or a user's list work
  as they are: records are read only when their ids are asked for.

  Args:
    records: ``len(records)`` and ``records[i]`` (and ``records.__getitems__(rows)`` when it has it).
    x_key: the feature holding the input.
    y_key: the feature holding the integer label.
    ids: the example ids of the records (default: positions ``0..N-1``).
    name: what the data is, for messages.
    label_records: optionally a cheaper view of the same records for reading all labels (e.g. a
      TFDS data source with image decoding skipped); labels are read once, then cached.
    image_size: for images of varying sizes (ImageNet): resize the shorter side to this many
      pixels and take the central square, on the host as each example is read.
  """

  def __init__(self, records: Sequence[Mapping[str, Any]], *, x_key: str, y_key: str = "label",
               ids: np.ndarray | None = None, name: str = "records",
               label_records: Sequence[Mapping[str, Any]] | None = None,
               image_size: int | None = None):
    n = len(records)
    if n == 0:
      raise DataError(f"{name} has no examples")
    first = records[0]
    for key, field in ((x_key, "x_key"), (y_key, "y_key")):
      if key not in first:
        raise DataError(f"{name}: {field}={key!r} is not a feature of its examples; they have: "
                        f"{', '.join(sorted(map(str, first)))}")
    self.image_size = image_size
    x0 = self._x(first[x_key])
    ids = np.arange(n, dtype=np.int64) if ids is None else np.asarray(ids)
    if len(ids) != n:
      raise DataError(f"{name}: {len(ids)} ids for {n} records")
    super().__init__(ids, {"x": (x0.shape, x0.dtype), "y": ((), np.dtype(np.int32))}, name)
    self.records, self.x_key, self.y_key = records, x_key, y_key
    self.label_records = label_records

  def _read_rows(self, rows):
    recs = _getitems(self.records, rows)
    shape, dtype = self.spec["x"]
    ids = self.ids[rows]
    x = _stack([self._x(r[self.x_key]) for r in recs], ids, self.x_key, shape, dtype, self.name)
    return {"x": x, "y": np.asarray([r[self.y_key] for r in recs], np.int32)}

  def _x(self, value: Any) -> np.ndarray:
    value = np.asarray(value)
    return value if self.image_size is None else resize_center_crop(value, self.image_size)

  def _all_labels(self):
    src = self.label_records if self.label_records is not None else self.records
    out = np.empty(len(self), np.int32)
    for start in range(0, len(self), 4096):
      rows = np.arange(start, min(start + 4096, len(self)))
      out[rows] = [r[self.y_key] for r in _getitems(src, rows)]
    return out


def resize_center_crop(image_HxWxC: np.ndarray, size: int) -> np.ndarray:
  """The image resized (bilinear) so that its shorter side is ``size``, then its central
  ``size x size`` square; dtype kept (the usual ImageNet preprocessing before crop + flip)."""
  from PIL import Image
  h, w = image_HxWxC.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, int(round(h * scale))), max(size, int(round(w * scale)))
  squeeze = image_HxWxC.ndim == 3 and image_HxWxC.shape[-1] == 1
  img = Image.fromarray(image_HxWxC[..., 0] if squeeze else image_HxWxC)
  out = np.asarray(img.resize((nw, nh), Image.BILINEAR))
  top, left = (nh - size) // 2, (nw - size) // 2
  out = out[top:top + size, left:left + size]
  return out[..., None] if squeeze else out


# ----------------------------------------------------------------------------------------------
# prunejax's own on-disk format: array_record of raw examples + an index of ids and labels.
# ----------------------------------------------------------------------------------------------

_INDEX_SUFFIX = ".index.npz"


def write_array_record(path: str, x: Any, y: np.ndarray, ids: np.ndarray | None = None, *,
                       chunk: int = 4096) -> None:
  """Writes examples as one raw record each to ``path`` (array_record) and its index.

  Args:
    path: the array_record file to write; ``path + ".index.npz"`` gets the ids, labels and the
      example shape and dtype.
    x: inputs [N, ...] (an array or anything sliceable like one, e.g. a memmap), all one shape.
    y: integer labels [N].
    ids: example ids [N], unique (default ``0..N-1``).
    chunk: rows converted at a time (bounds the memory used while writing).
  """
  from array_record.python.array_record_module import ArrayRecordWriter
  from prunejax.fileio import atomic_savez
  y = np.asarray(y)
  ids = np.arange(len(y), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
  if len(x) != len(y) or len(ids) != len(y):
    raise DataError(f"write_array_record: x={len(x)}, y={len(y)}, ids={len(ids)} disagree")
  IdIndex(ids, path)  # unique ids
  first = np.asarray(x[:1])
  folder = os.path.dirname(os.path.abspath(path))
  if not os.path.isdir(folder):
    raise FileError(f"write_array_record: cannot write {path!r}: the folder {folder!r} does not "
                    "exist; create it first")
  tmp = path + ".tmp"
  try:
    writer = ArrayRecordWriter(tmp, "group_size:1")
    try:
      for start in range(0, len(y), chunk):
        block = np.ascontiguousarray(x[start:start + chunk], dtype=first.dtype)
        for row in block:
          writer.write(row.tobytes())
    finally:
      writer.close()
  except RuntimeError as e:  # array_record reports I/O failures (no space, no permission) so
    if os.path.exists(tmp):  # nothing half-written stays behind
      os.remove(tmp)
    raise FileError(f"write_array_record: cannot write {path!r}: {e}") from e
  os.replace(tmp, path)
  atomic_savez(path + _INDEX_SUFFIX, ids=ids, labels=y.astype(np.int32),
               shape=np.asarray(first.shape[1:], np.int64),
               dtype=np.asarray(json.dumps(first.dtype.str)))


class ArrayRecordSource(Source):
  """Examples written by :func:`write_array_record`, read lazily by id (``group_size:1``, so one
  record is one seek). Labels and ids come from the small index file."""

  def __init__(self, path: str, name: str | None = None):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    index_path = path + _INDEX_SUFFIX
    if not os.path.exists(path) or not os.path.exists(index_path):
      raise DataError(f"{path!r} is not a prunejax array_record dataset (needs the file and "
                      f"{os.path.basename(index_path)}); write one with write_array_record")
    with np.load(index_path) as f:
      ids, labels = f["ids"], f["labels"]
      shape, dtype = tuple(int(s) for s in f["shape"]), np.dtype(json.loads(str(f["dtype"])))
    super().__init__(ids, {"x": (shape, dtype), "y": ((), np.dtype(np.int32))},
                     name or os.path.basename(path))
    self.path = path
    self._source = ArrayRecordDataSource([path])
    if len(self._source) != len(ids):
      raise DataError(f"{path!r} holds {len(self._source)} records but its index has {len(ids)} ids")
    self._labels = labels.astype(np.int32)
    self._row_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize

  def __getstate__(self):  # picklable for loader worker processes: reopen the file there
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def __setstate__(self, state):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self.__dict__.update(state)
    self._source = ArrayRecordDataSource([self.path])

  def _read_rows(self, rows):
    raw = self._source.__getitems__(rows.tolist())
    shape, dtype = self.spec["x"]
    if any(len(r) != self._row_bytes for r in raw):
      raise DataError(f"{self.path!r}: a record has the wrong size; the file is damaged")
    x = np.frombuffer(b"".join(raw), dtype).reshape((len(rows),) + shape)
    return {"x": x, "y": self._labels[rows]}

  def _all_labels(self):
    return self._labels
