"""Cleaning and deduplication as data pruning.

* :mod:`~prunejax.dedup.exact`: exact duplicates and train/test leakage by content hash
  (:func:`content_hashes`, :func:`hash_batches`, :func:`exact_duplicates`, :func:`leakage`).
* :mod:`~prunejax.dedup.semantic`: SemDeDup (Abbas et al. 2023), semantic near-duplicates from
  spherical k-means clusters of embeddings (:func:`semdedup`).
* :mod:`~prunejax.dedup.minhash`: model-free near-duplicate text by MinHash-LSH on character
  n-grams (:func:`minhash_duplicates`).

Every function reports examples by id. The kNN outlier score lives with the other scores
(:func:`prunejax.scores.knn_outlier_score`).
"""

from prunejax.dedup.exact import (KINDS, content_hashes, exact_duplicates, hash_batches, leakage,
                                  normalize_text, redundant_ids)
from prunejax.dedup.minhash import (lsh_params, minhash_duplicates, minhash_signatures,
                                    shingle_hashes)
from prunejax.dedup.semantic import (KEEP, SemDedup, cluster_centroids, cluster_max_similarity,
                                     normalize_rows, semdedup, semdedup_order, spherical_kmeans)
