"""Speed of global magnitude masks, masked training and compacted inference.

    python -m experiments.bench_masks            # the full table (about 4 minutes on 2 CPU cores)
    python -m experiments.bench_masks --quick    # small trees and models, a smoke run (~1 min)
    python -m experiments.bench_masks --repeats=9

Three measurements, each in one process, after a warm-up, as the median of ``--repeats`` calls
(``--train_steps`` steps, ``--inference_repeats`` forward passes; the last two alternate between the
two variants, so that background load on a shared machine hits both alike):

1. Global magnitude masks of random-normal parameter trees shaped like ResNet-18 (11.7M parameters)
   and ResNet-50 (25.6M), at 90% sparsity: :func:`prunejax.masks.magnitude` (a radix select over
   integer keys, no sort) against a sort-based reference that takes the threshold from a
   ``jnp.argsort`` of all prunable magnitudes (as jaxpruner does). Both are jitted and checked for
   exact sparsity and for the same mask.
2. The overhead of a train step with :func:`prunejax.optim.masked` (AdamW) over the same step
   without it, on an MLP (hidden 1024, 1024, batch 256).
3. Inference speed-up of :func:`prunejax.masks.compact` at 50% structured sparsity: an MLP
   (hidden 2048, 2048, batch 512) with half of its neurons removed, and a GPT-style classifier
   (width 256, depth 4, 8 heads, 64 tokens, batch 64) with half of its heads and MLP neurons
   removed. The compacted logits are checked against the masked model's.
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from prunejax import masks, optim, train
from prunejax.models import MLP, GPTClassifier

FLAGS = flags.FLAGS


def median_time(fn: Callable[[], Any], repeats: int) -> float:
  """Median wall time of ``fn()`` over ``repeats`` calls after a warm-up (blocking on results)."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def alternate_times(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Wall times of each function, called in turn ``repeats`` times after a warm-up, so that
  background load on a shared machine hits all of them alike."""
  for fn in fns.values():
    jax.block_until_ready(fn())
  times: dict[str, list[float]] = {k: [] for k in fns}
  for _ in range(repeats):
    for k, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[k].append(time.perf_counter() - t0)
  return times


# ----------------------------------------------------------------------------------------------
# Parameter trees shaped like ResNets (He et al. 2016, the ImageNet models of torchvision).
# ----------------------------------------------------------------------------------------------


def resnet_shapes(depth: int, width: float = 1.0) -> dict[str, dict[str, tuple[int, ...]]]:
  """Params of ResNet-18 (basic blocks) or ResNet-50 (bottlenecks): conv kernels, BN scales and
  biases, and the 1000-way head; 11.69M and 25.56M parameters at ``width=1``."""
  w = lambda c: max(1, int(c * width))
  shapes: dict[str, dict[str, tuple[int, ...]]] = {}

  def conv(name, k, cin, cout):
    shapes[name] = {"kernel": (k, k, cin, cout)}
    shapes[name + "_bn"] = {"scale": (cout,), "bias": (cout,)}

  conv("stem", 7, 3, w(64))
  blocks, bottleneck = {18: ((2, 2, 2, 2), False), 50: ((3, 4, 6, 3), True)}[depth]
  cin = w(64)
  for s, (n, c) in enumerate(zip(blocks, (64, 128, 256, 512))):
    for b in range(n):
      name = f"stage{s}_block{b}"
      cout = w(c * 4) if bottleneck else w(c)
      if bottleneck:
        conv(name + "_conv1", 1, cin, w(c))
        conv(name + "_conv2", 3, w(c), w(c))
        conv(name + "_conv3", 1, w(c), cout)
      else:
        conv(name + "_conv1", 3, cin, cout)
        conv(name + "_conv2", 3, cout, cout)
      if b == 0 and (cin != cout or s > 0):
        conv(name + "_proj", 1, cin, cout)
      cin = cout
  shapes["head"] = {"kernel": (cin, 1000), "bias": (1000,)}
  return shapes


def random_tree(shapes: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s, dtype=np.float32)), shapes,
                      is_leaf=lambda s: isinstance(s, tuple))


def argsort_magnitude(params: dict, sparsity: float, filter_fn=masks.default_filter_fn) -> dict:
  """Sort-based reference: the threshold is the ``k``-th smallest |w| of a ``jnp.argsort`` of all
  prunable weights; weights below it or equal to it are pruned."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  prunable = [filter_fn(p, l) for p, l in leaves]
  flat = jnp.concatenate([jnp.abs(l).ravel() for (_, l), f in zip(leaves, prunable) if f])
  k = int(round(sparsity * flat.shape[0]))
  threshold = flat[jnp.argsort(flat)[k - 1]]
  out = [jnp.abs(l) > threshold if f else jnp.ones(l.shape, bool)
         for (_, l), f in zip(leaves, prunable)]
  return jax.tree.unflatten(jax.tree.structure(params), out)


def bench_global_magnitude(name: str, params: dict, sparsity: float, repeats: int) -> dict:
  n = masks.count_params(params)
  total = sum(l.size for l in jax.tree.leaves(params))
  ours = jax.jit(lambda p: masks.magnitude(p, sparsity))
  ref = jax.jit(lambda p: argsort_magnitude(p, sparsity))
  t0 = time.perf_counter()
  jax.block_until_ready(ours(params))
  compile_s = time.perf_counter() - t0
  t_ours = median_time(lambda: ours(params), repeats)
  logging.info("%s: radix select %.3f s", name, t_ours)
  t_ref = median_time(lambda: ref(params), repeats)
  logging.info("%s: argsort reference %.3f s", name, t_ref)
  m_ours, m_ref = ours(params), ref(params)
  pruned = lambda m: sum(int(np.sum(~np.asarray(x))) for x in jax.tree.leaves(m))
  same = all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(m_ours), jax.tree.leaves(m_ref)))
  return {"tree": name, "params": total, "prunable": n, "target": round(sparsity * n),
          "pruned_ours": pruned(m_ours), "pruned_ref": pruned(m_ref), "same_mask": same,
          "ours_s": t_ours, "ref_s": t_ref, "speedup": t_ref / t_ours, "compile_s": compile_s}


# ----------------------------------------------------------------------------------------------
# Masked train step.
# ----------------------------------------------------------------------------------------------


def bench_masked_step(quick: bool, steps: int) -> dict:
  hidden, batch = ((256, 256), 64) if quick else ((1024, 1024), 256)
  model = MLP(num_classes=10, hidden=hidden)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1), dtype=np.float32))
  data = {"x": x, "y": jnp.asarray(rng.integers(0, 10, batch)), "mask": jnp.ones((batch,), bool)}
  tx = optax.adamw(1e-3, weight_decay=1e-4)
  plain = train.create_train_state(model, tx, jax.random.key(0), x)
  mask = masks.magnitude(plain.params, 0.8)
  masked_tx = optim.masked(tx, mask)
  masked = plain.replace(params=masks.apply_mask(plain.params, mask),
                         opt_state=masked_tx.init(plain.params), tx=masked_tx)
  step = jax.jit(train.train_step)  # no donation: both states are reused.
  states = {"plain": plain, "masked": masked}

  def advance(key):
    states[key] = step(states[key], data)[0]
    return states[key].params

  times = alternate_times({k: functools.partial(advance, k) for k in states}, steps)
  zeros_kept = all(np.all(np.asarray(p)[~np.asarray(m)] == 0)
                   for p, m in zip(jax.tree.leaves(states["masked"].params), jax.tree.leaves(mask)))
  t_plain, t_masked = statistics.median(times["plain"]), statistics.median(times["masked"])
  return {"model": f"MLP{hidden} batch {batch}", "plain_ms": 1e3 * t_plain,
          "masked_ms": 1e3 * t_masked, "overhead": t_masked / t_plain - 1.0,
          "pruned_stay_zero": zeros_kept}


# ----------------------------------------------------------------------------------------------
# Compacted inference.
# ----------------------------------------------------------------------------------------------


def bench_compaction(name: str, model, params: dict, mask: dict, x: jax.Array,
                     repeats: int) -> dict:
  small, small_params = masks.compact(model, params, mask)
  masked_params = masks.apply_mask(params, mask)
  dense_fn = jax.jit(lambda p, x: model.apply({"params": p}, x))
  small_fn = jax.jit(lambda p, x: small.apply({"params": p}, x))
  diff = float(jnp.max(jnp.abs(dense_fn(masked_params, x) - small_fn(small_params, x))))
  times = alternate_times({"dense": lambda: dense_fn(masked_params, x),
                           "small": lambda: small_fn(small_params, x)}, repeats)
  t_dense, t_small = statistics.median(times["dense"]), statistics.median(times["small"])
  count = lambda p: sum(l.size for l in jax.tree.leaves(p))
  return {"model": name, "params_dense": count(params), "params_compact": count(small_params),
          "dense_ms": 1e3 * t_dense, "compact_ms": 1e3 * t_small, "speedup": t_dense / t_small,
          "max_abs_diff": diff}


def compaction_cases(quick: bool):
  rng = np.random.default_rng(0)

  def random_params(model, x):
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    return jax.tree.map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape, np.float32)),
                        shapes)

  hidden, batch, d_in = ((256, 256), 64, 128) if quick else ((2048, 2048), 512, 1024)
  mlp = MLP(num_classes=10, hidden=hidden)
  x = jnp.asarray(rng.standard_normal((batch, d_in), dtype=np.float32))
  params = random_params(mlp, x)
  yield f"MLP{hidden} batch {batch}", mlp, params, masks.neurons(params, 0.5), x

  width, depth, tokens, batch = (64, 2, 16, 16) if quick else (256, 4, 64, 64)
  gpt = GPTClassifier(vocab_size=1024, num_classes=10, context=tokens, depth=depth, width=width,
                      num_heads=8)
  x = jnp.asarray(rng.integers(1, 1024, (batch, tokens)))
  params = random_params(gpt, x)
  heads = masks.heads(params, 0.5, num_heads=8)
  mlp_neurons = masks.neurons(params, 0.5, filter_fn=masks.make_filter_fn(include=[r"mlp_fc/"]))
  mask = jax.tree.map(jnp.logical_and, heads, mlp_neurons)
  yield f"GPT width {width} depth {depth} x{tokens} tokens batch {batch}", gpt, params, mask, x


# ----------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------


def run(repeats: int, quick: bool, sparsity: float, train_steps: int,
        inference_repeats: int, depths: tuple[int, ...] = (18, 50)) -> dict[str, list[dict]]:
  """All three benchmarks (the global mask on ResNet trees of ``depths``); returns their rows."""
  width = 0.25 if quick else 1.0
  mask_rows = []
  for depth in depths:
    params = random_tree(resnet_shapes(depth, width))
    mask_rows.append(bench_global_magnitude(f"ResNet-{depth} x{width}", params, sparsity, repeats))
    del params
  step_rows = [bench_masked_step(quick, max(5, train_steps // (3 if quick else 1)))]
  compact_rows = [bench_compaction(name, model, params, mask, x, inference_repeats)
                  for name, model, params, mask, x in compaction_cases(quick)]
  return {"masks": mask_rows, "train_step": step_rows, "compaction": compact_rows}


def format_tables(rows: dict[str, list[dict]]) -> str:
  lines = [f"{'global magnitude mask':<22} {'params':>11} {'target pruned':>14} "
           f"{'ours pruned':>12} {'ref pruned':>11} {'same':>5} {'ours s':>8} {'argsort s':>10} "
           f"{'speed-up':>9} {'compile s':>10}"]
  for r in rows["masks"]:
    lines.append(f"{r['tree']:<22} {r['params']:>11,} {r['target']:>14,} {r['pruned_ours']:>12,} "
                 f"{r['pruned_ref']:>11,} {str(r['same_mask']):>5} {r['ours_s']:>8.3f} "
                 f"{r['ref_s']:>10.3f} {r['speedup']:>8.1f}x {r['compile_s']:>10.1f}")
  lines.append("")
  lines.append(f"{'masked train step':<40} {'plain ms':>9} {'masked ms':>10} {'overhead':>9} "
               f"{'pruned stay 0':>14}")
  for r in rows["train_step"]:
    lines.append(f"{r['model']:<40} {r['plain_ms']:>9.2f} {r['masked_ms']:>10.2f} "
                 f"{100 * r['overhead']:>8.1f}% {str(r['pruned_stay_zero']):>14}")
  lines.append("")
  lines.append(f"{'compaction at 50% structured':<44} {'params':>10} {'compact':>10} "
               f"{'dense ms':>9} {'compact ms':>11} {'speed-up':>9} {'max |diff|':>11}")
  for r in rows["compaction"]:
    lines.append(f"{r['model']:<44} {r['params_dense']:>10,} {r['params_compact']:>10,} "
                 f"{r['dense_ms']:>9.2f} {r['compact_ms']:>11.2f} {r['speedup']:>8.2f}x "
                 f"{r['max_abs_diff']:>11.2e}")
  return "\n".join(lines)


def main(argv):
  del argv
  logging.info("devices: %s", jax.devices())
  rows = run(FLAGS.repeats, FLAGS.quick, FLAGS.sparsity, FLAGS.train_steps,
             FLAGS.inference_repeats)
  print(format_tables(rows))


def _define_flags() -> None:
  """The command line (defined only when run as a script, so other scripts can import this one)."""
  flags.DEFINE_integer("repeats", 5, "Timed calls of each mask function (the median is reported).")
  flags.DEFINE_integer("inference_repeats", 15, "Timed calls of each forward pass (the median).")
  flags.DEFINE_bool("quick", False, "Small trees and models: a smoke run.")
  flags.DEFINE_float("sparsity", 0.9, "Sparsity of the global magnitude masks.")
  flags.DEFINE_integer("train_steps", 30, "Timed steps of each train step (masked and unmasked).")


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_masks``)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
