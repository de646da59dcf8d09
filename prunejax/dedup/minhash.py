"""Model-free near-duplicate text: MinHash signatures of character n-grams and LSH banding.

* Shingles: every character n-gram of the text after :func:`~prunejax.dedup.exact.normalize_text`
  (a text shorter than ``ngram`` is one shingle; an empty text has none), hashed to 64 bits by a
  splitmix64 chain over its code points.
* Signatures: for each of ``num_perm`` seeded hash functions
  ``h_p(s) = (s xor seed_p) * mult_p mod 2^64`` (``mult_p`` odd; the shingle hash ``s`` is already
  well mixed, and the ordering of the products is decided by their well-mixed high bits), the
  minimum over the text's shingles (all ones for an empty text). The fraction of equal entries of
  two signatures estimates the Jaccard similarity of their shingle sets (Broder 1997).
* LSH: the signature is cut into ``bands`` bands of ``rows`` entries; texts equal on a whole band
  are candidates. ``(bands, rows)`` default to the choice that minimizes the equally weighted
  false-positive and false-negative areas around ``threshold`` (datasketch's ``MinHashLSH`` rule).
  Each candidate is linked to its bucket's lowest-position member if their estimated Jaccard is at
  least ``threshold`` (``verify=True``), and the groups are the connected components of the links.

Everything is vectorized NumPy over all texts at once (no per-n-gram Python loop).

References:
  Broder. "On the resemblance and containment of documents." SEQUENCES 1997.
  Leskovec, Rajaraman, Ullman. "Mining of Massive Datasets", ch. 3 (LSH banding).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import numpy as np

from prunejax.dedup.exact import normalize_text
from prunejax.errors import (ConfigError, DataError, check_positive_int, check_range,
                             check_unique_ids)

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_SHINGLE_SEED = np.uint64(0x9E3779B97F4A7C15)
_CHUNK = 1 << 11  # shingles per block: 2048 x num_perm x 8 bytes stays in cache (fastest here)


def mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a fast, well-mixed hash."""
  x = np.asarray(x, np.uint64)
  x = (x ^ (x >> np.uint64(30))) * _M1
  x = (x ^ (x >> np.uint64(27))) * _M2
  return x ^ (x >> np.uint64(31))


def _check_texts(texts: Sequence[str], field: str) -> list[str]:
  if isinstance(texts, str):
    raise DataError(f"{field} must be a sequence of strings, not one string")
  out = list(texts)
  for i, s in enumerate(out):
    if not isinstance(s, str):
      raise DataError(f"{field}: item {i} is a {type(s).__name__}, not a str")
  return out


def shingle_hashes(texts: Sequence[str], *, ngram: int = 5,
                   normalize: bool = True) -> tuple[np.ndarray, np.ndarray]:
  """64-bit hashes of every character n-gram of every text.

  Returns:
    ``(hashes_S, text_S)``: the uint64 shingle hashes of all texts concatenated, and the index of
    the text each belongs to (non-decreasing). Repeated n-grams of a text appear repeatedly.
  """
  check_positive_int("ngram", ngram)
  texts = _check_texts(texts, "texts")
  if normalize:
    texts = [normalize_text(s) for s in texts]
  lengths = np.array([len(s) for s in texts], np.int64)
  codes = np.frombuffer("".join(texts).encode("utf-32-le"), "<u4").astype(np.uint64)
  codes = np.concatenate([codes, np.zeros(ngram, np.uint64)])
  offsets = np.cumsum(lengths) - lengths
  counts = np.where(lengths >= ngram, lengths - ngram + 1, np.minimum(lengths, 1))
  text_S = np.repeat(np.arange(len(texts)), counts)
  starts = np.repeat(offsets, counts) + np.arange(counts.sum()) - np.repeat(np.cumsum(counts)
                                                                            - counts, counts)
  width_S = np.minimum(lengths[text_S], ngram)
  h = np.full(len(starts), _SHINGLE_SEED, np.uint64)
  for k in range(ngram):
    h = np.where(k < width_S, mix64(h ^ codes[starts + k]), h)
  return h, text_S


def minhash_signatures(texts: Sequence[str], *, num_perm: int = 128, ngram: int = 5, seed: int = 0,
                       normalize: bool = True) -> np.ndarray:
  """MinHash signatures of the texts' character n-gram sets.

  Args:
    texts: ``N`` strings.
    num_perm: hash functions per signature.
    ngram: characters per shingle.
    seed: seeds the hash functions; compare only signatures made with the same seed.
    normalize: apply :func:`~prunejax.dedup.exact.normalize_text` first.

  Returns:
    uint64[N, num_perm]. ``mean(sig_a == sig_b)`` estimates the Jaccard similarity.
  """
  check_positive_int("num_perm", num_perm)
  texts = _check_texts(texts, "texts")
  seeds_P, mults_P = permutation_seeds(num_perm, seed)
  hashes_S, text_S = shingle_hashes(texts, ngram=ngram, normalize=normalize)
  sig_NxP = np.full((len(texts), num_perm), np.iinfo(np.uint64).max, np.uint64)
  h_CxP = np.empty((min(_CHUNK, len(hashes_S)), num_perm), np.uint64)
  for a in range(0, len(hashes_S), _CHUNK):
    c = min(_CHUNK, len(hashes_S) - a)
    h_CxP = h_CxP[:c]
    np.bitwise_xor(hashes_S[a:a + c, None], seeds_P[None, :], out=h_CxP)
    np.multiply(h_CxP, mults_P[None, :], out=h_CxP)
    t_C = text_S[a:a + c]
    first = np.flatnonzero(np.r_[True, t_C[1:] != t_C[:-1]])
    rows = t_C[first]
    sig_NxP[rows] = np.minimum(sig_NxP[rows], np.minimum.reduceat(h_CxP, first, axis=0))
  return sig_NxP


def permutation_seeds(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """The ``num_perm`` xor seeds and odd multipliers (uint64) of the MinHash hash functions."""
  rng = np.random.default_rng(seed)
  seeds_P = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64)
  mults_P = rng.integers(0, 2**64, size=num_perm, dtype=np.uint64) | np.uint64(1)
  return seeds_P, mults_P


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
  """``(bands, rows)`` with ``bands * rows <= num_perm`` minimizing FP + FN area at ``threshold``.

  The probability that two texts of Jaccard ``s`` share a band is ``1 - (1 - s^rows)^bands``; the
  false-positive area integrates it over ``[0, threshold]`` and the false-negative area its
  complement over ``[threshold, 1]`` (equal weights, as datasketch's default).
  """
  check_range("lsh threshold", threshold, 0.0, 1.0, lo_open=True)
  check_positive_int("num_perm", num_perm)
  from scipy import integrate

  best, best_err = (1, 1), np.inf
  for b in range(1, num_perm + 1):
    for r in range(1, num_perm // b + 1):
      fp = integrate.quad(lambda s: 1 - (1 - s**r)**b, 0.0, threshold)[0]
      fn = integrate.quad(lambda s: 1 - (1 - (1 - s**r)**b), threshold, 1.0)[0]
      if 0.5 * fp + 0.5 * fn < best_err:
        best, best_err = (b, r), 0.5 * fp + 0.5 * fn
  return best


def _components(n: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Connected-component label (the lowest member position) of each of ``n`` nodes."""
  labels = np.arange(n)
  while True:
    new = labels.copy()
    low = np.minimum(labels[u], labels[v])
    np.minimum.at(new, u, low)
    np.minimum.at(new, v, low)
    new = new[new]
    if np.array_equal(new, labels):
      return labels
    labels = new


def minhash_duplicates(ids_N: Any, texts: Sequence[str], *, threshold: float = 0.8,
                       num_perm: int = 128, ngram: int = 5, seed: int = 0,
                       bands: int | None = None, verify: bool = True,
                       normalize: bool = True) -> list[np.ndarray]:
  """Groups of near-duplicate texts by MinHash-LSH (estimated n-gram Jaccard >= ``threshold``).

  Args:
    ids_N: unique int ids of the texts.
    texts: the ``N`` strings.
    threshold: Jaccard similarity in (0, 1] above which two texts are near-duplicates.
    num_perm, ngram, seed, normalize: as in :func:`minhash_signatures`.
    bands: LSH bands (rows per band ``num_perm // bands``); default :func:`lsh_params`.
    verify: keep only candidate links whose estimated Jaccard reaches ``threshold``.

  Returns:
    One sorted int64 id array per group of two or more linked texts, ordered by lowest id. Exact
    duplicates (after normalization) are always grouped. Keep one per group with
    :func:`~prunejax.dedup.exact.redundant_ids`.
  """
  check_range("minhash_duplicates.threshold", threshold, 0.0, 1.0, lo_open=True)
  texts = _check_texts(texts, "minhash_duplicates.texts")
  ids = check_unique_ids("minhash_duplicates.ids_N", ids_N, len(texts))
  if len(ids) == 0:
    raise DataError("minhash_duplicates got no texts")
  if bands is None:
    bands, rows = lsh_params(threshold, num_perm)
  else:
    check_positive_int("minhash_duplicates.bands", bands)
    if bands > num_perm:
      raise ConfigError(f"minhash_duplicates.bands={bands} exceeds num_perm={num_perm}")
    rows = num_perm // bands
  sig_NxP = minhash_signatures(texts, num_perm=num_perm, ngram=ngram, seed=seed,
                               normalize=normalize)
  n = len(texts)
  us, vs = [], []
  for b in range(bands):
    _, bucket_N = np.unique(sig_NxP[:, b * rows:(b + 1) * rows], axis=0, return_inverse=True)
    bucket_N = bucket_N.reshape(-1)
    rep_B = np.full(bucket_N.max() + 1, n, np.int64)
    np.minimum.at(rep_B, bucket_N, np.arange(n))
    rep_N = rep_B[bucket_N]
    linked = rep_N != np.arange(n)
    us.append(np.flatnonzero(linked))
    vs.append(rep_N[linked])
  u, v = np.concatenate(us), np.concatenate(vs)
  if len(u):
    pairs = np.unique(np.stack([u, v], 1), axis=0)
    u, v = pairs[:, 0], pairs[:, 1]
  if verify and len(u):
    agree = np.mean(sig_NxP[u] == sig_NxP[v], axis=1)
    u, v = u[agree >= threshold], v[agree >= threshold]
  labels = _components(n, u, v)
  counts = np.bincount(labels, minlength=n)
  members = np.flatnonzero(counts[labels] > 1)
  order = np.lexsort((ids[members], labels[members]))
  members = members[order]
  groups = np.split(ids[members], np.flatnonzero(np.diff(labels[members])) + 1) if len(members) \
      else []
  return sorted([np.sort(g) for g in groups], key=lambda g: int(g[0]))
