"""Throughput and peak memory of the data-importance scores against a plain train step.

    python -m experiments.bench_scores                         # MLP, CNN, GPT, ResNet-18, batch 128
    python -m experiments.bench_scores --quick --batch_size=16  # CPU smoke run (~2 min)
    python -m experiments.bench_scores --models=gpt --repeats=10

For each model it times, in one process and after a warm-up: a train step (SGD, forward + backward +
update), EL2N, GraNd (:func:`prunejax.scores.grand`, the ghost-norm path), GraNd by ``vmap(grad)``
over the whole batch, and GraNd by ``jacrev`` of the per-example losses (the Data Diet way).
Throughput is examples/s from the median of ``--repeats`` calls. Peak memory is XLA's own account
of the compiled function (arguments + outputs + temporaries - aliased buffers, from
``compiled.memory_analysis()``), so every function is measured the same way on CPU or GPU.

Inputs are random: 28x28x1 images for the MLP (LeNet-300-100), 32x32x3 for the CNN and ResNet-18
(``--resnet_width`` times the standard widths), ``--gpt_tokens`` tokens for the GPT classifier of
width ``--gpt_width``. Sized for a 2-core CPU: the full run takes 2-3 minutes there, most of it in
compiling and in the ``jacrev`` and ``vmap`` baselines (``--skip_baselines`` leaves them out). The
results of a CPU and an H100 run are in BUILD_NOTES.md.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np
import optax
from absl import app, flags, logging

from prunejax import scores, train
from prunejax.models import build_model, make_apply_fn

FLAGS = flags.FLAGS
flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
flags.DEFINE_integer("repeats", 5, "Timed calls per function (the median is reported).")
flags.DEFINE_list("models", ["mlp", "cnn", "gpt", "resnet18"], "Models to benchmark.")
flags.DEFINE_bool("quick", False, "Small inputs and narrow models: a smoke run.")
flags.DEFINE_float("resnet_width", 0.25, "Width multiplier of ResNet-18.")
flags.DEFINE_integer("gpt_tokens", 64, "Tokens per example for the GPT classifier.")
flags.DEFINE_integer("gpt_width", 128, "Width of the GPT classifier (depth 2, 4 heads).")
flags.DEFINE_bool("skip_baselines", False, "Leave out the vmap(grad) and jacrev baselines.")
flags.DEFINE_float("max_gb", 4.0, "Functions whose compiled peak memory exceeds this are compiled "
                   "and reported but not run.")

NUM_CLASSES = 10


def make_case(name: str, batch_size: int, quick: bool) -> tuple[Any, dict]:
  """(model, batch) with random inputs and labels."""
  rng = np.random.default_rng(0)
  side = 8 if quick else 32
  if name == "mlp":
    model = build_model("mlp", NUM_CLASSES, hidden=(32, 16) if quick else (300, 100))
    x = rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32)
  elif name == "cnn":
    model = build_model("cnn", NUM_CLASSES, features=(4, 8) if quick else (32, 64),
                        dense=16 if quick else 128)
    x = rng.normal(size=(batch_size, side, side, 3)).astype(np.float32)
  elif name == "resnet18":
    model = build_model("resnet18", NUM_CLASSES,
                        width_multiplier=0.125 if quick else FLAGS.resnet_width)
    x = rng.normal(size=(batch_size, side, side, 3)).astype(np.float32)
  elif name == "gpt":
    tokens = 8 if quick else FLAGS.gpt_tokens
    width = 16 if quick else FLAGS.gpt_width
    model = build_model("gpt", NUM_CLASSES, vocab_size=1000 if quick else 8192, context=tokens,
                        depth=2, width=width, num_heads=2 if quick else 4)
    x = rng.integers(1, model.vocab_size, size=(batch_size, tokens)).astype(np.int32)
  else:
    raise app.UsageError(f"--models: unknown model {name!r}")
  batch = {"x": x, "y": rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32),
           "mask": np.ones(batch_size, bool)}
  return model, jax.device_put(batch)


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def measure(fn: Callable, args: tuple, repeats: int) -> tuple[float, int]:
  """(median seconds per call, peak bytes) of ``jax.jit(fn)(*args)``; NaN seconds when the peak is
  over ``--max_gb``."""
  compiled = jax.jit(fn).lower(*args).compile()
  if peak_bytes(compiled) > FLAGS.max_gb * 2**30:
    return float("nan"), peak_bytes(compiled)
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times), peak_bytes(compiled)


def bench_model(name: str) -> list[dict]:
  b = FLAGS.batch_size
  model, batch = make_case(name, b, FLAGS.quick)
  state = train.create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0),
                                   batch["x"][:1])
  apply_fn = make_apply_fn(model)
  variables = state.variables
  fns: dict[str, tuple[Callable, tuple]] = {
      "train step": (train.train_step, (state, batch)),
      "el2n": (lambda v, bt: scores.el2n(apply_fn, v, bt), (variables, batch)),
      "grand": (lambda v, bt: scores.grand(apply_fn, v, bt), (variables, batch)),
  }
  if not FLAGS.skip_baselines:
    fns["grand vmap(grad)"] = (lambda v, bt: scores.grand_vmap(apply_fn, v, bt), (variables, batch))
    fns["grand jacrev"] = (lambda v, bt: scores.grand_jacrev(apply_fn, v, bt), (variables, batch))
  rows = []
  for fn_name, (fn, args) in fns.items():
    logging.info("%s: %s", name, fn_name)
    repeats = FLAGS.repeats if fn_name in ("train step", "el2n", "grand") else max(
        1, min(3, FLAGS.repeats))
    seconds, peak = measure(fn, args, repeats)
    rows.append({"model": name, "fn": fn_name, "examples_per_s": b / seconds,
                 "peak_mb": peak / 2**20})
  base = rows[0]
  for r in rows:
    r["speed_vs_train"] = r["examples_per_s"] / base["examples_per_s"]
    r["memory_vs_train"] = r["peak_mb"] / base["peak_mb"]
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| model | function | examples/s | x train step | peak MB | x train step |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    speed = (f"{r['examples_per_s']:.0f} | {r['speed_vs_train']:.2f}"
             if np.isfinite(r["examples_per_s"]) else "not run (over --max_gb) | -")
    lines.append(f"| {r['model']} | {r['fn']} | {speed} | {r['peak_mb']:.1f} | "
                 f"{r['memory_vs_train']:.2f} |")
  speedups = []
  for model in dict.fromkeys(r["model"] for r in rows):
    by_fn = {r["fn"]: r for r in rows if r["model"] == model}
    if "grand vmap(grad)" in by_fn:
      ours = by_fn["grand"]["examples_per_s"]
      vs_vmap = ours / by_fn["grand vmap(grad)"]["examples_per_s"]
      vs_jacrev = ours / by_fn["grand jacrev"]["examples_per_s"]
      speedups.append(f"{model}: GraNd runs {vs_vmap:.1f}x as fast as vmap(grad) and "
                      f"{vs_jacrev:.1f}x as fast as jacrev")
  return "\n".join(lines + [""] + speedups)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = []
  for name in FLAGS.models:
    rows += bench_model(name)
  device = jax.devices()[0]
  sizes = ("quick sizes" if FLAGS.quick else
           f"ResNet-18 width x{FLAGS.resnet_width} on 32x32x3, GPT {FLAGS.gpt_tokens} tokens "
           f"width {FLAGS.gpt_width} depth 2")
  print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, batch "
        f"{FLAGS.batch_size}, {sizes}")
  print(table(rows))


if __name__ == "__main__":
  app.run(main)
