"""Throughput and peak memory of the data-importance scores against a plain train step.

    python -m experiments.bench_scores                          # all five models, batch 128
    python -m experiments.bench_scores --quick --batch_size=16   # CPU smoke run
    python -m experiments.bench_scores --models=gpt --repeats=10

For each model it times, in one process: a train step (SGD with momentum, forward + backward +
update), EL2N, GraNd (:func:`prunejax.scores.grand`, one forward and one backward pass with
per-layer taps), GraNd by ``vmap(grad)`` over the whole batch, and GraNd by ``jacrev`` of the
per-example losses (the Data Diet way); then ``gradient_dot`` (the exact per-example inner product
with a fixed gradient pytree, one forward-mode pass) and ``gradient_features`` (Kronecker-projected
per-example gradients at ``--features_dim`` features, one forward and one backward pass with
taps). Throughput is examples/s from the median of ``--repeats``
calls, timed after a warm-up in interleaved rounds (one call of each function per round), so that
load from other processes weighs on all of them alike. Peak memory is XLA's own account of the
compiled function (arguments + outputs + temporaries - aliased buffers, from
``compiled.memory_analysis()``), so every function is measured the same way on CPU or GPU.
``max |GraNd / vmap(grad) - 1|`` checks the fast path on the device it ran on.

Models (random inputs and labels): ``mlp`` LeNet-300-100 on 28x28x1; ``cnn`` (32, 64) features,
dense 128 on 32x32x3; ``resnet18`` (``--resnet_width`` times the standard widths) on 32x32x3;
``gpt`` (``--gpt_width``, depth 2, 4 heads, ``--gpt_tokens`` tokens, vocabulary 8192);
``gpt2_small`` (GPT-2 small's shape: 12 blocks, width 768, 12 heads, vocabulary 50,257, on
``--gpt_tokens`` tokens); and
``plain_resnet``, a small residual convnet written in plain JAX as a user would (NCHW, a params
dict, widths 16/32/64, two blocks per stage, no BatchNorm). The measurement is importable:
``measure(models=..., batch_size=...) -> list[dict]`` (one row per model and function), so another
script can run it on an accelerator. The results of a CPU and a GPU run are in BUILD_NOTES.md.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from prunejax import scores, train
from prunejax.models import build_model, make_apply_fn

MODELS = ("mlp", "cnn", "gpt", "resnet18", "plain_resnet")  # the default list
ALL_MODELS = MODELS + ("gpt2_small",)
NUM_CLASSES = 10

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined only when this file runs as a script, so that another
  script can import :func:`measure` and define its own."""
  flags.DEFINE_integer("batch_size", 128, "Examples per batch.")
  flags.DEFINE_integer("repeats", 5, "Timed calls per function (the median is reported).")
  flags.DEFINE_list("models", list(MODELS), f"Models to benchmark, from {ALL_MODELS}.")
  flags.DEFINE_bool("quick", False, "Small inputs and narrow models: a smoke run.")
  flags.DEFINE_float("resnet_width", 0.25, "Width multiplier of ResNet-18.")
  flags.DEFINE_integer("gpt_tokens", 64, "Tokens per example for the GPT classifier.")
  flags.DEFINE_integer("gpt_width", 128, "Width of the GPT classifier (depth 2, 4 heads).")
  flags.DEFINE_bool("skip_baselines", False, "Leave out the vmap(grad) and jacrev baselines.")
  flags.DEFINE_integer("features_dim", 8192, "Features of the gradient_features row.")
  flags.DEFINE_float("max_gb", 4.0, "Functions whose compiled peak memory exceeds this are "
                     "compiled and reported but not run.")


# ----------------------------------------------------------------------------------------------
# A user's residual convnet in plain JAX.
# ----------------------------------------------------------------------------------------------


def plain_resnet_init(key: jax.Array, widths: Sequence[int] = (16, 32, 64), blocks: int = 2,
                      num_classes: int = NUM_CLASSES, in_channels: int = 3) -> dict:
  """Params of :func:`plain_resnet_apply`: He-initialised OIHW kernels, zero biases."""
  keys = iter(jax.random.split(key, 4 * len(widths) * blocks + 2))

  def conv(k, c_in, c_out):
    std = np.sqrt(2.0 / (c_in * k * k))
    return {"w": std * jax.random.normal(next(keys), (c_out, c_in, k, k)), "b": jnp.zeros(c_out)}

  params = {"stem": conv(3, in_channels, widths[0]), "blocks": []}
  c = widths[0]
  for w in widths:
    for _ in range(blocks):
      block = {"conv1": conv(3, c, w), "conv2": conv(3, w, w)}
      if c != w:
        block["skip"] = conv(1, c, w)
      params["blocks"].append(block)
      c = w
  params["head"] = {"w": jax.random.normal(next(keys), (c, num_classes)) / np.sqrt(c),
                    "b": jnp.zeros(num_classes)}
  return params


def _conv(x: jax.Array, p: dict, stride: int = 1) -> jax.Array:
  y = jax.lax.conv_general_dilated(x, p["w"], (stride, stride), "SAME",
                                   dimension_numbers=("NCHW", "OIHW", "NCHW"))
  return y + p["b"][None, :, None, None]


def plain_resnet_apply(params: dict, x_BxCxHxW: jax.Array) -> jax.Array:
  """Logits of a residual convnet: stem conv, blocks of two 3x3 convs with an identity (or strided
  1x1 projection) shortcut, global average pooling, a dense head."""
  h = jax.nn.relu(_conv(x_BxCxHxW, params["stem"]))
  for block in params["blocks"]:
    stride = 2 if "skip" in block else 1
    y = jax.nn.relu(_conv(h, block["conv1"], stride))
    y = _conv(y, block["conv2"])
    h = jax.nn.relu(y + (_conv(h, block["skip"], stride) if "skip" in block else h))
  return jnp.mean(h, axis=(2, 3)) @ params["head"]["w"] + params["head"]["b"]


# ----------------------------------------------------------------------------------------------
# Cases and measurement.
# ----------------------------------------------------------------------------------------------


def _flax_case(name: str, batch_size: int, quick: bool, resnet_width: float, gpt_tokens: int,
               gpt_width: int, rng: np.random.Generator) -> tuple[Any, Any]:
  side = 8 if quick else 32
  if name == "mlp":
    model = build_model("mlp", NUM_CLASSES, hidden=(32, 16) if quick else (300, 100))
    return model, rng.normal(size=(batch_size, 28, 28, 1)).astype(np.float32)
  if name == "cnn":
    model = build_model("cnn", NUM_CLASSES, features=(4, 8) if quick else (32, 64),
                        dense=16 if quick else 128)
    return model, rng.normal(size=(batch_size, side, side, 3)).astype(np.float32)
  if name == "resnet18":
    model = build_model("resnet18", NUM_CLASSES, width_multiplier=0.125 if quick else resnet_width)
    return model, rng.normal(size=(batch_size, side, side, 3)).astype(np.float32)
  if name == "gpt2_small":  # GPT-2 small's shape: 12 blocks, width 768, 12 heads, 50,257 tokens
    tokens = 8 if quick else gpt_tokens
    shape = (dict(vocab_size=1000, depth=2, width=16, num_heads=2) if quick else
             dict(vocab_size=50257, depth=12, width=768, num_heads=12))
    model = build_model("gpt", NUM_CLASSES, context=tokens, **shape)
    return model, rng.integers(1, model.vocab_size, size=(batch_size, tokens)).astype(np.int32)
  tokens, width = (8, 16) if quick else (gpt_tokens, gpt_width)
  model = build_model("gpt", NUM_CLASSES, vocab_size=1000 if quick else 8192, context=tokens,
                      depth=2, width=width, num_heads=2 if quick else 4)
  return model, rng.integers(1, model.vocab_size, size=(batch_size, tokens)).astype(np.int32)


def make_case(name: str, batch_size: int, quick: bool = False, resnet_width: float = 0.25,
              gpt_tokens: int = 64, gpt_width: int = 128) -> dict:
  """``apply_fn``, ``params`` (what the scores take), ``batch`` and a jit-able ``train_step``
  with its ``train_args``, for one benchmark model."""
  rng = np.random.default_rng(0)
  if name not in ALL_MODELS:
    raise app.UsageError(f"--models: unknown model {name!r}; choose from {ALL_MODELS}")
  y = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
  tx = optax.sgd(0.1, momentum=0.9)
  if name == "plain_resnet":
    widths = (4, 8) if quick else (16, 32, 64)
    params = plain_resnet_init(jax.random.key(0), widths, 1 if quick else 2)
    x = rng.normal(size=(batch_size, 3, 8 if quick else 32, 8 if quick else 32)).astype(np.float32)
    batch = jax.device_put({"x": x, "y": y, "mask": np.ones(batch_size, bool)})

    def step(state, batch):
      p, opt_state = state
      grads = jax.grad(lambda p: train.masked_mean_loss(plain_resnet_apply(p, batch["x"]),
                                                        batch)[0])(p)
      updates, opt_state = tx.update(grads, opt_state, p)
      return optax.apply_updates(p, updates), opt_state

    return {"apply_fn": plain_resnet_apply, "params": params, "batch": batch,
            "train_step": step, "train_args": ((params, tx.init(params)), batch)}
  model, x = _flax_case(name, batch_size, quick, resnet_width, gpt_tokens, gpt_width, rng)
  batch = jax.device_put({"x": x, "y": y, "mask": np.ones(batch_size, bool)})
  state = train.create_train_state(model, tx, jax.random.key(0), batch["x"][:1])
  return {"apply_fn": make_apply_fn(model), "params": state.variables, "batch": batch,
          "train_step": train.train_step, "train_args": (state, batch)}


def peak_bytes(compiled) -> int:
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def compile_fn(fn: Callable, args: tuple, max_gb: float) -> tuple[Any, int]:
  """(compiled ``jax.jit(fn)`` for ``args`` or None when its peak is over ``max_gb``, peak
  bytes)."""
  compiled = jax.jit(fn).lower(*args).compile()
  peak = peak_bytes(compiled)
  return (compiled if peak <= max_gb * 2**30 else None), peak


def interleaved_seconds(calls: dict[str, tuple[Any, tuple, int]]) -> dict[str, float]:
  """Median seconds per call of each compiled function, timed in rounds (one call of each per
  round, after a warm-up call), so that load from other processes affects all of them alike.

  Args:
    calls: name -> (compiled function, its arguments, number of timed calls).
  """
  for compiled, args, _ in calls.values():
    jax.block_until_ready(compiled(*args))
  times: dict[str, list[float]] = {name: [] for name in calls}
  for r in range(max(n for _, _, n in calls.values())):
    for name, (compiled, args, n) in calls.items():
      if r < n:
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times[name].append(time.perf_counter() - t)
  return {name: statistics.median(ts) for name, ts in times.items()}


def _score_fns(case: dict, baselines: bool, jacrev: bool = True) -> dict[str, Callable]:
  apply_fn = case["apply_fn"]
  fns = {"el2n": lambda v, b: scores.el2n(apply_fn, v, b),
         "grand": lambda v, b: scores.grand(apply_fn, v, b)}
  if baselines:
    fns["grand vmap(grad)"] = lambda v, b: scores.grand_vmap(apply_fn, v, b)
    if jacrev:
      fns["grand jacrev"] = lambda v, b: scores.grand_jacrev(apply_fn, v, b)
  return fns


def _similarity_fns(case: dict, features_dim: int) -> dict[str, tuple[Callable, tuple]]:
  """The gradient-similarity rows: the target pytree and the key are arguments, not constants."""
  apply_fn, params, batch = case["apply_fn"], case["params"], case["batch"]
  target = jax.tree.map(lambda a: jnp.full(jnp.shape(a), 0.01, jnp.result_type(a)), params)
  return {
      "gradient_dot": (lambda v, b, t: scores.gradient_dot(apply_fn, v, b, t),
                       (params, batch, target)),
      f"gradient_features d={features_dim}": (
          lambda v, b, k: scores.gradient_features(apply_fn, v, b, k, dim=features_dim),
          (params, batch, jax.random.key(0)))}


def bench_model(name: str, batch_size: int = 128, repeats: int = 5, *, quick: bool = False,
                baselines: bool = True, jacrev: bool = True, max_gb: float = 4.0,
                features_dim: int = 8192, **sizes: Any) -> list[dict]:
  """Rows ``{model, fn, seconds, examples_per_s, peak_mb, speed_vs_train, memory_vs_train}`` for
  one model; the GraNd row also has ``max_rel_diff_vs_vmap`` when the baseline ran."""
  case = make_case(name, batch_size, quick, **sizes)
  fns = {"train step": (case["train_step"], case["train_args"])}
  fns.update({k: (f, (case["params"], case["batch"])) for k, f in _score_fns(case, baselines,
                                                                               jacrev).items()})
  fns.update(_similarity_fns(case, features_dim))
  rows, calls = [], {}
  for fn_name, (fn, args) in fns.items():
    logging.info("%s: compiling %s", name, fn_name)
    compiled, peak = compile_fn(fn, args, max_gb)
    baseline = fn_name.startswith("grand ")
    n = max(1, min(3, repeats)) if baseline else repeats
    if compiled is not None:
      calls[fn_name] = (compiled, args, n)
    rows.append({"model": name, "fn": fn_name, "peak_mb": peak / 2**20})
  seconds = interleaved_seconds(calls)
  for r in rows:
    r["seconds"] = seconds.get(r["fn"], float("nan"))
    r["examples_per_s"] = batch_size / r["seconds"]
    r["speed_vs_train"] = r["examples_per_s"] / rows[0]["examples_per_s"]
    r["memory_vs_train"] = r["peak_mb"] / rows[0]["peak_mb"]
  if "grand vmap(grad)" in calls:
    ours = np.asarray(calls["grand"][0](*calls["grand"][1]))
    ref = np.asarray(calls["grand vmap(grad)"][0](*calls["grand vmap(grad)"][1]))
    rows[2]["max_rel_diff_vs_vmap"] = float(np.max(np.abs(ours / ref - 1.0)))
  return rows


def measure(models: Sequence[str] = MODELS, batch_size: int = 128, repeats: int = 5, *,
            quick: bool = False, baselines: bool = True, jacrev: bool = True, max_gb: float = 4.0,
            resnet_width: float = 0.25, gpt_tokens: int = 64, gpt_width: int = 128,
            features_dim: int = 8192) -> list[dict]:
  """Benchmark rows of every model in ``models`` (see :func:`bench_model`), measured in this
  process on the default device."""
  rows = []
  for name in models:
    rows += bench_model(name, batch_size, repeats, quick=quick, baselines=baselines, jacrev=jacrev,
                        max_gb=max_gb, features_dim=features_dim, resnet_width=resnet_width,
                        gpt_tokens=gpt_tokens, gpt_width=gpt_width)
  return rows


def table(rows: list[dict]) -> str:
  """A markdown table of :func:`measure` rows, and GraNd's speed-ups over the baselines."""
  lines = ["| model | function | examples/s | x train step | peak MB | x train step |",
           "| --- | --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    speed = (f"{r['examples_per_s']:.0f} | {r['speed_vs_train']:.2f}"
             if np.isfinite(r["examples_per_s"]) else "not run (over --max_gb) | -")
    lines.append(f"| {r['model']} | {r['fn']} | {speed} | {r['peak_mb']:.1f} | "
                 f"{r['memory_vs_train']:.2f} |")
  notes = []
  for model in dict.fromkeys(r["model"] for r in rows):
    by_fn = {r["fn"]: r for r in rows if r["model"] == model}
    if "grand vmap(grad)" in by_fn:
      ours = by_fn["grand"]["examples_per_s"]
      vs = {fn: ours / by_fn[fn]["examples_per_s"] for fn in ("grand vmap(grad)", "grand jacrev")
            if fn in by_fn and np.isfinite(by_fn[fn]["examples_per_s"])}
      speedups = ", ".join(f"{v:.1f}x {fn[6:]}" for fn, v in vs.items())
      notes.append(f"{model}: GraNd {speedups}; max |GraNd / vmap(grad) - 1| = "
                   f"{by_fn['grand'].get('max_rel_diff_vs_vmap', float('nan')):.1e}")
  return "\n".join(lines + [""] + notes)


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  rows = measure(FLAGS.models, FLAGS.batch_size, FLAGS.repeats, quick=FLAGS.quick,
                 baselines=not FLAGS.skip_baselines, max_gb=FLAGS.max_gb,
                 resnet_width=FLAGS.resnet_width, gpt_tokens=FLAGS.gpt_tokens,
                 gpt_width=FLAGS.gpt_width, features_dim=FLAGS.features_dim)
  device = jax.devices()[0]
  sizes = ("quick sizes" if FLAGS.quick else
           f"ResNet-18 width x{FLAGS.resnet_width} on 32x32x3, GPT {FLAGS.gpt_tokens} tokens "
           f"width {FLAGS.gpt_width} depth 2")
  print(f"device: {device.platform} ({device.device_kind}), jax {jax.__version__}, batch "
        f"{FLAGS.batch_size}, {sizes}")
  print(table(rows))


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_scores``)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
