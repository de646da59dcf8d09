"""Exact duplicates and train/test leakage by content hash, reported by example id.

Every example gets a 128-bit BLAKE2b digest of its content (``bytes16[N]``, NumPy dtype ``S16``):

* ``kind="image"``: any fixed-shape array per example (uint8 images, float images, feature rows);
  the digest covers the dtype, the per-example shape and the raw little-endian bytes, so equal
  bytes of a different shape or dtype are different content.
* ``kind="text"``: the string after :func:`normalize_text` (Unicode NFKC, case-folded, whitespace
  collapsed, punctuation kept), so copies that differ only in case or spacing collide.
* ``kind="tokens"``: the token ids with every ``pad_id`` removed, as int64, so the same sequence
  padded to another length (or left- instead of right-padded) collides.

Duplicates are then found exactly on the digests (a false match needs a 128-bit collision). All
functions are host-side NumPy; :func:`hash_batches` streams over ``{"id", "x", "mask"}`` batches,
so a dataset never has to be held at once.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from prunejax.errors import ConfigError, DataError, check_choice, check_unique_ids

KINDS = ("image", "text", "tokens")
HASH_DTYPE = np.dtype("S16")


def normalize_text(text: str) -> str:
  """Unicode NFKC, case-folded (NFKC again after folding), whitespace runs collapsed to one space.

  Leading and trailing whitespace goes; punctuation and everything else stays.
  """
  folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text).casefold())
  return " ".join(folded.split())


def _digest(kind: str, payload: bytes, header: bytes = b"") -> bytes:
  h = hashlib.blake2b(digest_size=16, person=b"prunejax-" + kind.encode()[:7])
  h.update(header)
  h.update(payload)
  return h.digest()


def _check_hashes(hashes_N: Any, field: str) -> np.ndarray:
  hashes = np.asarray(hashes_N)
  if hashes.dtype != HASH_DTYPE or hashes.ndim != 1:
    raise DataError(f"{field} must be the bytes16[N] (dtype S16) digests of content_hashes; got "
                    f"dtype {hashes.dtype}, shape {hashes.shape}")
  return hashes


def content_hashes(x: Any, *, kind: str, pad_id: int | None = None) -> np.ndarray:
  """128-bit content digests, one per example.

  Args:
    x: ``kind="image"``: an array ``[N, ...]`` (one example per row, any dtype). ``kind="text"``: a
      sequence of ``N`` strings. ``kind="tokens"``: an int array ``[N, L]`` or a sequence of ``N``
      1-D int sequences (ragged allowed).
    kind: ``"image"``, ``"text"`` or ``"tokens"`` (see the module docstring for what is hashed).
    pad_id: the padding token id; required for ``kind="tokens"`` (every occurrence is dropped before
      hashing; pass an id that never occurs if the tokens are unpadded).

  Returns:
    ``bytes16[N]`` (NumPy dtype ``S16``): equal digests mean equal content under ``kind``.
  """
  check_choice("content_hashes.kind", kind, KINDS)
  if kind == "image":
    arr = np.asarray(x)
    if arr.ndim < 1 or arr.dtype == object:
      raise DataError(f"content_hashes(kind='image') needs a numeric array [N, ...]; got dtype "
                      f"{arr.dtype}, shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<"))
    header = f"{arr.dtype.str}{arr.shape[1:]}".encode()
    return np.array([_digest(kind, arr[i].tobytes(), header) for i in range(len(arr))],
                    HASH_DTYPE).reshape(len(arr))
  if kind == "text":
    if isinstance(x, str):
      raise DataError("content_hashes(kind='text') needs a sequence of strings, not one string")
    out = []
    for i, s in enumerate(x):
      if not isinstance(s, str):
        raise DataError(f"content_hashes(kind='text'): item {i} is a {type(s).__name__}, not a str")
      out.append(_digest(kind, normalize_text(s).encode("utf-8")))
    return np.array(out, HASH_DTYPE).reshape(len(out))
  if pad_id is None:
    raise ConfigError("content_hashes(kind='tokens') needs pad_id (the padding token id; pass an "
                      "id that never occurs when the tokens are not padded)")
  rows = list(x) if not isinstance(x, np.ndarray) else x
  out = []
  for i, row in enumerate(rows):
    row = np.asarray(row)
    if row.ndim != 1 or not (np.issubdtype(row.dtype, np.integer) or row.size == 0):
      raise DataError(f"content_hashes(kind='tokens'): example {i} is not a 1-D int sequence "
                      f"(dtype {row.dtype}, shape {row.shape})")
    out.append(_digest(kind, row[row != pad_id].astype("<i8").tobytes()))
  return np.array(out, HASH_DTYPE).reshape(len(out))


def _batch_ids(ids: Any, b: int) -> np.ndarray:
  """A batch's ids as int64: integer ids as they are, float ids only when every one is a whole
  number below 2**53 (a float 1.5 or 2**53 + 1 would silently become another example's id)."""
  ids = np.asarray(ids)
  if ids.ndim == 1 and np.issubdtype(ids.dtype, np.floating):
    whole = np.isfinite(ids) & (np.abs(ids) < 2.0**53)
    whole[whole] = ids[whole] == np.round(ids[whole])
    if whole.all():
      return ids.astype(np.int64)
    raise DataError(f"hash_batches: batch {b} 'id' holds {int((~whole).sum())} float values that "
                    f"are not whole numbers below 2**53 (e.g. {ids[~whole][:3].tolist()}); pass "
                    f"integer ids")
  if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
    raise DataError(f"hash_batches: batch {b} 'id' must be a 1-D array of integer ids; got dtype "
                    f"{ids.dtype}, shape {ids.shape}")
  return ids.astype(np.int64)


def hash_batches(batches: Iterable[Mapping[str, Any]], *, kind: str, pad_id: int | None = None,
                 key: str = "x") -> tuple[np.ndarray, np.ndarray]:
  """:func:`content_hashes` over a stream of batches, keeping only ids and digests.

  Args:
    batches: dicts with ``id``, ``key`` (``x`` by default) and optionally ``mask`` (False on padding
      rows, which are skipped). Host or device arrays; text batches may hold lists of strings.
    kind, pad_id: as in :func:`content_hashes`.
    key: which entry holds the content.

  Returns:
    ``(ids_N, hashes_N)`` over the real rows, in stream order.
  """
  check_choice("hash_batches.kind", kind, KINDS)
  ids_parts, hash_parts = [], []
  for b, batch in enumerate(batches):
    if "id" not in batch or key not in batch:
      raise DataError(f"hash_batches: batch {b} lacks 'id' or {key!r} (keys: {sorted(batch)})")
    ids = _batch_ids(batch["id"], b)
    mask = np.ones(len(ids), bool) if "mask" not in batch else np.asarray(batch["mask"])
    if mask.dtype != bool:
      raise DataError(f"hash_batches: batch {b} 'mask' must be bool; got dtype {mask.dtype}")
    content = batch[key]
    if kind == "text":
      content = np.asarray(list(content), dtype=object)
    else:
      content = np.asarray(content)
    if len(content) != len(ids) or len(mask) != len(ids):
      raise DataError(f"hash_batches: batch {b} has {len(ids)} ids, {len(mask)} mask entries and "
                      f"{len(content)} rows of {key!r}")
    ids_parts.append(ids[mask])
    hash_parts.append(content_hashes(content[mask], kind=kind, pad_id=pad_id))
  if not ids_parts or sum(len(p) for p in ids_parts) == 0:
    raise DataError("hash_batches: the batches hold no real rows (all padding, or no batch came)")
  ids = check_unique_ids("hash_batches ids", np.concatenate(ids_parts))
  return ids, np.concatenate(hash_parts)


def exact_duplicates(ids_N: Any, hashes_N: Any) -> list[np.ndarray]:
  """Groups of ids with equal content.

  Args:
    ids_N: unique int ids.
    hashes_N: their digests (:func:`content_hashes` or :func:`hash_batches`).

  Returns:
    One sorted int64 id array per group of two or more equal digests, groups ordered by their
    lowest id. Empty when there are no duplicates.
  """
  hashes = _check_hashes(hashes_N, "exact_duplicates.hashes_N")
  ids = check_unique_ids("exact_duplicates.ids_N", ids_N, len(hashes))
  if len(ids) == 0:
    raise DataError("exact_duplicates got no examples")
  _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
  dup = counts[inverse] > 1
  ids, inverse = ids[dup], inverse[dup]
  order = np.lexsort((ids, inverse))
  ids, inverse = ids[order], inverse[order]
  groups = np.split(ids, np.flatnonzero(np.diff(inverse)) + 1) if len(ids) else []
  return sorted(groups, key=lambda g: int(g[0]))


def redundant_ids(groups: Sequence[np.ndarray]) -> np.ndarray:
  """The ids to drop from duplicate groups: every member but the lowest id of each, sorted."""
  if not groups:
    return np.zeros((0,), np.int64)
  checked = [check_unique_ids(f"redundant_ids groups[{i}]", g) for i, g in enumerate(groups)]
  return np.sort(np.concatenate([np.sort(g)[1:] for g in checked]))


def leakage(train_ids: Any, train_hashes: Any, test_ids: Any,
            test_hashes: Any) -> tuple[np.ndarray, np.ndarray]:
  """Training examples whose content also occurs in the test split.

  Args:
    train_ids, train_hashes: ids and digests of the training split.
    test_ids, test_hashes: ids and digests of the test split (made with the same ``kind``).

  Returns:
    ``(train_ids_P, test_ids_P)``: every pair (train id, test id) with equal content, sorted by
    train id then test id. A training example that equals several test examples appears once per
    test example. Empty arrays when nothing leaks.
  """
  tr_h = _check_hashes(train_hashes, "leakage.train_hashes")
  te_h = _check_hashes(test_hashes, "leakage.test_hashes")
  tr_ids = check_unique_ids("leakage.train_ids", train_ids, len(tr_h))
  te_ids = check_unique_ids("leakage.test_ids", test_ids, len(te_h))
  if len(tr_ids) == 0 or len(te_ids) == 0:
    raise DataError(f"leakage needs examples in both splits; got {len(tr_ids)} train and "
                    f"{len(te_ids)} test")
  _, inverse = np.unique(np.concatenate([tr_h, te_h]), return_inverse=True)
  inv_tr, inv_te = inverse[:len(tr_h)], inverse[len(tr_h):]
  order_te = np.lexsort((te_ids, inv_te))
  sorted_te = inv_te[order_te]
  lo = np.searchsorted(sorted_te, inv_tr, side="left")
  counts = np.searchsorted(sorted_te, inv_tr, side="right") - lo
  total = int(counts.sum())
  first = np.repeat(np.cumsum(counts) - counts, counts)
  te_pos = order_te[np.repeat(lo, counts) + np.arange(total) - first]
  pairs_tr, pairs_te = np.repeat(tr_ids, counts), te_ids[te_pos]
  order = np.lexsort((pairs_te, pairs_tr))
  return pairs_tr[order], pairs_te[order]
