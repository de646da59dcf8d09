"""Time of one full data audit against SemDeDup alone, in one process, printed as a ratio.

    python -m experiments.bench_audit          # 100k x 256 embeddings, 10-class probabilities
    python -m experiments.bench_audit --n=20000

The audit (:func:`prunejax.audit.audit`) gets the embeddings and out-of-fold-like probabilities
(label issues, SemDeDup near-duplicates, kNN outliers searched inside SemDeDup's clusters above
20k examples); SemDeDup (:func:`prunejax.dedup.semdedup`) gets the same embeddings, clusters and
k-means settings. Each is called twice; the second (compiled) call is the figure, and the ratio
audit / SemDeDup is printed last. Goal: at most 2x on the 2-core development CPU. The embeddings are
those of ``bench_dedup`` (points around random directions, 10% planted near-copies); the labels are
the direction modulo 10 with 10% flipped, and the probabilities a softmax of noisy logits.
Measure on a quiet machine: other jobs on the same cores change both times, and not equally.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import app, flags

from experiments.bench.dedup import synthetic_embeddings
from prunejax import audit, dedup

FLAGS = flags.FLAGS
flags.DEFINE_integer("n", 100_000, "Examples.")
flags.DEFINE_integer("dim", 256, "Embedding dimensions.")
flags.DEFINE_integer("classes", 10, "Classes of the probabilities.")
flags.DEFINE_integer("num_clusters", 100, "k-means clusters (SemDeDup's and the audit's).")
flags.DEFINE_float("eps", 0.01, "SemDeDup threshold (cosine distance).")


def synthetic_probs(n: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  true = rng.integers(0, classes, n)
  labels = np.where(rng.random(n) < 0.1, rng.integers(0, classes, n), true)
  logits = 3.0 * np.eye(classes)[true] + rng.normal(size=(n, classes))
  probs = np.exp(logits - logits.max(1, keepdims=True))
  return (probs / probs.sum(1, keepdims=True)).astype(np.float32), labels


def seconds(fn) -> tuple[float, object]:
  fn()  # compile and warm up
  t0 = time.perf_counter()
  out = fn()
  return time.perf_counter() - t0, out


def main(argv):
  del argv
  x = synthetic_embeddings(FLAGS.n, FLAGS.dim, 100, 0.1)
  probs, labels = synthetic_probs(FLAGS.n, FLAGS.classes)
  ids = np.arange(FLAGS.n)
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; embeddings {x.shape}, "
        f"probabilities {probs.shape}", flush=True)
  t_sem, sem = seconds(lambda: dedup.semdedup(x, ids_N=ids, num_clusters=FLAGS.num_clusters,
                                              key=jax.random.key(0)))
  print(f"semdedup: {t_sem:.2f} s; removed at eps={FLAGS.eps}: {len(sem.removed_ids(FLAGS.eps))}",
        flush=True)
  t_audit, res = seconds(lambda: audit.audit(ids, labels_N=labels, probs_NxC=probs,
                                             embeddings_NxD=x, num_clusters=FLAGS.num_clusters,
                                             near_duplicate_eps=FLAGS.eps))
  print(f"audit:    {t_audit:.2f} s ({res.info['outlier_search']} outlier search)")
  print(audit.summary_markdown(res))
  print(f"ratio audit / semdedup: {t_audit / t_sem:.2f} (goal <= 2)")


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_audit``)."""
  app.run(main)


if __name__ == "__main__":
  cli()
