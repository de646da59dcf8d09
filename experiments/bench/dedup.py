"""Time and peak memory of deduplication at scale: SemDeDup, and optionally MinHash-LSH and kNN.

    python -m experiments.bench_dedup               # SemDeDup on 100k x 256, 100 clusters
    python -m experiments.bench_dedup --n=20000 --what=semdedup,minhash,knn,exact

Embeddings are synthetic: ``--n`` points around ``--centers`` random directions in ``--dim``
dimensions, of which ``--dup_fraction`` are near-copies (tiny noise) of other points, so SemDeDup
has something to find. Each step is timed twice in one process: the first call includes compilation,
the second does not. Peak memory is the process's peak resident set size (``ru_maxrss``), printed
with the RSS before the step, so the figure includes the JAX runtime and the input arrays. Goal on
the 2-core development CPU: SemDeDup on 100k x 256 in under a minute, peak RSS below 1 GB.
"""

from __future__ import annotations

import resource
import time

import jax
import numpy as np
from absl import app, flags

from prunejax import dedup, scores

FLAGS = flags.FLAGS


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mb() -> float:
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def synthetic_embeddings(n: int, dim: int, centers: int, dup_fraction: float,
                         seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  c_KxD = rng.normal(size=(centers, dim)).astype(np.float32)
  x_NxD = c_KxD[rng.integers(0, centers, n)] + 0.7 * rng.normal(size=(n, dim)).astype(np.float32)
  dups = rng.choice(n, int(dup_fraction * n), replace=False)
  x_NxD[dups] = x_NxD[rng.integers(0, n, len(dups))] + 1e-3 * rng.normal(size=(len(dups), dim))
  return x_NxD


def timed(label: str, fn, repeats: int = 2):
  out = None
  for r in range(repeats):
    rss = current_rss_mb()
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out) if isinstance(out, jax.Array) else None
    print(f"{label:<34} call {r + 1}: {time.perf_counter() - t0:7.2f} s   RSS before "
          f"{rss:6.0f} MB, peak so far {peak_rss_mb():6.0f} MB", flush=True)
  return out


def main(argv):
  del argv
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; start RSS "
        f"{current_rss_mb():.0f} MB")
  if "semdedup" in FLAGS.what:
    x = synthetic_embeddings(FLAGS.n, FLAGS.dim, FLAGS.centers, FLAGS.dup_fraction)
    print(f"embeddings {x.shape} ({x.nbytes / 2**20:.0f} MB)")
    result = timed(f"semdedup {FLAGS.n}x{FLAGS.dim}, K={FLAGS.num_clusters}",
                   lambda: dedup.semdedup(x, num_clusters=FLAGS.num_clusters,
                                          key=jax.random.key(0), num_iters=FLAGS.num_iters))
    sizes = np.bincount(result.cluster)
    print(f"  clusters: largest {sizes.max()}, smallest {sizes.min()}; removed at eps={FLAGS.eps}: "
          f"{len(result.removed_ids(FLAGS.eps))} of {FLAGS.n} (planted near-copies: "
          f"{int(FLAGS.dup_fraction * FLAGS.n)})")
    del x, result
  if "exact" in FLAGS.what:
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 50, (FLAGS.n, 64)).astype(np.int32)
    tokens[: FLAGS.n // 10] = tokens[FLAGS.n // 10: 2 * (FLAGS.n // 10)]
    hashes = timed(f"content_hashes tokens {FLAGS.n}x64",
                   lambda: dedup.content_hashes(tokens, kind="tokens", pad_id=0), repeats=1)
    groups = timed("exact_duplicates", lambda: dedup.exact_duplicates(np.arange(FLAGS.n), hashes),
                   repeats=1)
    print(f"  duplicate groups: {len(groups)}")
  if "minhash" in FLAGS.what:
    rng = np.random.default_rng(2)
    words = np.array(["".join(rng.choice(list("abcdefghij"), 6)) for _ in range(2000)])
    texts = [" ".join(rng.choice(words, 20)) for _ in range(FLAGS.minhash_n)]
    texts[1::50] = [t + "!" for t in texts[0::50][:len(texts[1::50])]]
    groups = timed(f"minhash_duplicates {FLAGS.minhash_n} texts",
                   lambda: dedup.minhash_duplicates(np.arange(len(texts)), texts), repeats=1)
    print(f"  near-duplicate groups: {len(groups)} (planted: {len(texts[1::50])})")
  if "knn" in FLAGS.what:
    x = synthetic_embeddings(FLAGS.knn_n, FLAGS.dim, FLAGS.centers, FLAGS.dup_fraction)
    timed(f"knn_outlier_score {FLAGS.knn_n}x{FLAGS.dim}, k=10",
          lambda: scores.knn_outlier_score(x, 10))
  print(f"peak RSS {peak_rss_mb():.0f} MB")


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_dedup``)."""
  # Flags only when run as a script, so that other scripts can import synthetic_embeddings.
  flags.DEFINE_integer("n", 100_000, "Examples.")
  flags.DEFINE_integer("dim", 256, "Embedding dimensions.")
  flags.DEFINE_integer("centers", 100, "Directions the synthetic embeddings gather around.")
  flags.DEFINE_float("dup_fraction", 0.1, "Fraction of examples that are near-copies of others.")
  flags.DEFINE_integer("num_clusters", 100, "SemDeDup k-means clusters.")
  flags.DEFINE_integer("num_iters", 50, "k-means iterations.")
  flags.DEFINE_float("eps", 0.01, "SemDeDup threshold (cosine distance) for the reported count.")
  flags.DEFINE_list("what", ["semdedup"], "Any of semdedup, exact, minhash, knn.")
  flags.DEFINE_integer("knn_n", 10_000, "Examples for the kNN outlier score (brute force, N^2).")
  flags.DEFINE_integer("minhash_n", 20_000, "Texts for MinHash-LSH.")
  app.run(main)


if __name__ == "__main__":
  cli()
