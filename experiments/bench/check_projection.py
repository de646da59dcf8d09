"""Does the Kronecker projection keep the ranking of exact gradient inner products? (issue 27)

    python -m experiments.check_projection                      # bench GPT, batch 128, dim 8192
    python -m experiments.check_projection --quick              # tiny GPT, a smoke run

On the benchmark's GPT-style classifier (``experiments.bench_scores.make_case("gpt")``: vocabulary
8192, 64 tokens, width 128, depth 2, random tokens and labels, a random initialization), the exact
``<g_i, t>`` of each training row with the mean gradient ``t`` of another batch
(:func:`prunejax.scores.gradient_dot`) is compared with the projected
``<f_i, mean_j f_j>`` (:func:`prunejax.scores.gradient_features` of both batches with one key),
for ``--keys`` keys: the Spearman rank correlation of each key, and the bias of the mean over keys
(``|mean_k proj_k - exact|`` against the standard error of that mean, per row).
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from experiments.bench import scores as bench_scores
from prunejax import scores

FLAGS = flags.FLAGS


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
  return float(np.corrcoef(ra, rb)[0, 1])


def measure(batch_size: int = 128, dim: int = 8192, keys: int = 8, quick: bool = False) -> dict:
  """``{spearman: [per key], max_bias_in_se: float, dim: D, describe: {...}}``."""
  case = bench_scores.make_case("gpt", 2 * batch_size, quick)
  apply_fn, params, both = case["apply_fn"], case["params"], case["batch"]
  train = jax.tree.map(lambda a: a[:batch_size], both)
  val = jax.tree.map(lambda a: a[batch_size:], both)
  target = scores.mean_gradient(apply_fn, params, val)
  exact = np.asarray(jax.jit(lambda p, b, t: scores.gradient_dot(apply_fn, p, b, t))(
      params, train, target), np.float64)
  feats = jax.jit(lambda p, b, k: scores.gradient_features(apply_fn, p, b, k, dim=dim))
  projected = []
  for k in jax.random.split(jax.random.key(0), keys):
    f_train = np.asarray(feats(params, train, k), np.float64)
    f_val = np.asarray(feats(params, val, k), np.float64)
    projected.append(f_train @ f_val.mean(0))
  projected = np.stack(projected)
  se = projected.std(0, ddof=1) / np.sqrt(keys)
  plan = scores.feature_plan(apply_fn, params, train["x"], dim)
  return {"spearman": [spearman(p, exact) for p in projected],
          "spearman_of_mean": spearman(projected.mean(0), exact),
          "max_bias_in_se": float(np.max(np.abs(projected.mean(0) - exact) / se)),
          "dim": plan.dim, "describe": plan.describe()}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = measure(FLAGS.batch_size, FLAGS.dim, FLAGS.keys, FLAGS.quick)
  print(f"features: {out['dim']} (asked {FLAGS.dim})")
  for path, how in out["describe"].items():
    print(f"  {path}: {how}")
  print(f"Spearman(projected, exact) per key: min {min(out['spearman']):.4f}, "
        f"mean {np.mean(out['spearman']):.4f}; of the mean over {FLAGS.keys} keys: "
        f"{out['spearman_of_mean']:.4f}")
  print(f"max over rows |mean over keys - exact| / standard error: {out['max_bias_in_se']:.2f}")


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.check_projection``)."""
  flags.DEFINE_integer("batch_size", 128, "Training rows (the target batch has as many).")
  flags.DEFINE_integer("dim", 8192, "Features asked for.")
  flags.DEFINE_integer("keys", 8, "Projection keys.")
  flags.DEFINE_bool("quick", False, "The benchmark's tiny GPT.")
  app.run(main)


if __name__ == "__main__":
  cli()
