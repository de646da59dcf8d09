"""bfloat16 against float32: train-step throughput and peak memory of ResNet-18 and a GPT-2-small-
shaped classifier, and GraNd on the same models.

    python -m experiments.bench_precision            # on one GPU: about 3 minutes
    python -m experiments.bench_precision --quick    # tiny sizes, a smoke run on a CPU

For each model it builds, in one process, the float32 model, the bfloat16 one (``compute_dtype``;
params and optimizer state stay float32) and the bfloat16 one with per-block rematerialization
(``remat=True``), and measures:

* the jitted train step (SGD with momentum, the state donated as in training): examples/s from the
  median of ``repeats`` timed steps after a warm-up, and XLA's memory analysis of the compiled step
  (arguments + outputs + temporaries - donated buffers, from ``compiled.memory_analysis()``);
* GraNd (:func:`prunejax.scores.grand` on ``make_apply_fn(model)``, the variables float32 in every
  case): the same two figures.

Each row also gives its ratio to the float32 row of the same model and function. Sizes: ResNet-18
(CIFAR, 32x32x3) at batch 256; the GPT classifier with GPT-2 small's shape (12 blocks, width 768,
12 heads, vocabulary 50,257) on 128 tokens at batch 64. ``--quick`` shrinks both to a few seconds of
CPU. Timings on a CPU say little: XLA's CPU backend has no fast bfloat16 matrix unit.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np
import optax

from experiments.bench.masks import median_time
from prunejax import scores, train
from prunejax.models import build_model, make_apply_fn

NUM_CLASSES = 10
VARIANTS = (("float32", False), ("bfloat16", False), ("bfloat16", True))


def make_case(name: str, quick: bool, compute_dtype: str, remat: bool,
              batch_size: int | None = None) -> tuple[Any, dict]:
  """(model, batch) with random inputs and labels, on the default device; ``batch_size`` None is
  the model's default (ResNet-18 256, the GPT 64; quick 16 and 8)."""
  rng = np.random.default_rng(0)
  fields = dict(compute_dtype=compute_dtype, remat=remat)
  if name == "resnet18":
    b, side = (16, 8) if quick else (256, 32)
    b = batch_size or b
    model = build_model("resnet18", NUM_CLASSES, width_multiplier=0.125 if quick else 1.0,
                        **fields)
    x = rng.normal(size=(b, side, side, 3)).astype(np.float32)
  elif name == "gpt":
    b, t = (8, 16) if quick else (64, 128)
    b = batch_size or b
    shape = (dict(vocab_size=500, depth=2, width=32, num_heads=2) if quick else
             dict(vocab_size=50257, depth=12, width=768, num_heads=12))
    model = build_model("gpt", NUM_CLASSES, context=t, pad_id=0, **shape, **fields)
    x = rng.integers(1, model.vocab_size, size=(b, t)).astype(np.int32)
  else:
    raise ValueError(f"unknown model {name!r}; expected 'resnet18' or 'gpt'")
  batch = {"x": x, "y": rng.integers(0, NUM_CLASSES, size=b).astype(np.int32),
           "mask": np.ones(b, bool)}
  return model, jax.device_put(batch)


def initial_variables(name: str, quick: bool, remat: bool) -> dict:
  """The model's initial variables (key 0), on the device, a fresh copy per call (train steps
  donate them). The parameters are float32 whatever the compute dtype, so every dtype and both
  functions share one initialization: one compiled init per model instead of one per variant."""
  return jax.device_put(_host_variables(name, quick, remat))


@functools.lru_cache(maxsize=8)
def _host_variables(name: str, quick: bool, remat: bool) -> dict:
  model, batch = make_case(name, quick, "float32", remat, 1)
  return jax.device_get(train.create_train_state(model, optax.sgd(0.1), jax.random.key(0),
                                                 batch["x"]).variables)


def compiled_bytes(compiled) -> int:
  """Peak device memory of a compiled function by XLA's account: arguments + outputs +
  temporaries - buffers the outputs reuse (donated arguments)."""
  m = compiled.memory_analysis()
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def bench_train_step(name: str, compute_dtype: str, remat: bool, quick: bool, repeats: int,
                     batch_size: int | None = None) -> tuple[dict, Any]:
  """The train-step row of one model variant, and its compiled step (for its HLO)."""
  model, batch = make_case(name, quick, compute_dtype, remat, batch_size)
  b = batch["y"].shape[0]
  state = train.create_train_state(model, optax.sgd(0.1, momentum=0.9), jax.random.key(0),
                                   batch["x"][:1], variables=initial_variables(name, quick, remat))
  step = jax.jit(train.train_step, donate_argnums=0).lower(state, batch).compile()
  holder = [state]

  def train_call():
    holder[0], metrics = step(holder[0], batch)
    return metrics

  row = {"model": name, "fn": "train step", "dtype": compute_dtype, "remat": remat, "batch": b,
         "examples_per_s": b / median_time(train_call, repeats), "peak_mb": compiled_bytes(step) / 2**20}
  return row, step


def bench_grand(name: str, compute_dtype: str, remat: bool, quick: bool, repeats: int) -> dict:
  """The GraNd row of one model variant (variables float32, as the model initializes them)."""
  model, batch = make_case(name, quick, compute_dtype, remat)
  b = batch["y"].shape[0]
  variables = initial_variables(name, quick, remat)
  apply_fn = make_apply_fn(model)
  grand = jax.jit(lambda v, bt: scores.grand(apply_fn, v, bt)).lower(variables, batch).compile()
  return {"model": name, "fn": "grand", "dtype": compute_dtype, "remat": remat,
          "examples_per_s": b / median_time(lambda: grand(variables, batch), repeats),
          "peak_mb": compiled_bytes(grand) / 2**20}


def bench_case(name: str, compute_dtype: str, remat: bool, quick: bool,
               repeats: int) -> list[dict]:
  """The train-step and GraNd rows of one model variant."""
  return [bench_train_step(name, compute_dtype, remat, quick, repeats)[0],
          bench_grand(name, compute_dtype, remat, quick, repeats)]


def measure(quick: bool = False, repeats: int | None = None,
            models: tuple[str, ...] = ("resnet18", "gpt")) -> list[dict]:
  """Rows for every model, variant (:data:`VARIANTS`) and function, with ratios to float32."""
  repeats = repeats or (2 if quick else 20)
  rows = []
  for name in models:
    for compute_dtype, remat in VARIANTS:
      rows += bench_case(name, compute_dtype, remat, quick, repeats)
  for r in rows:
    base = next(x for x in rows if x["model"] == r["model"] and x["fn"] == r["fn"]
                and x["dtype"] == "float32" and not x["remat"])
    r["speed_vs_f32"] = r["examples_per_s"] / base["examples_per_s"]
    r["memory_vs_f32"] = r["peak_mb"] / base["peak_mb"]
  return rows


def table(rows: list[dict]) -> str:
  """A Markdown table of :func:`measure`'s rows, and the bfloat16 goals (>= 1.6x the float32
  throughput, <= 0.6x its peak memory) checked for each model and function."""
  dev = jax.devices()[0]
  lines = [f"device: {dev.device_kind} ({dev.platform})", "",
           "| model | function | compute | remat | examples/s | x float32 | peak MB | x float32 |",
           "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |"]
  for r in rows:
    lines.append(f"| {r['model']} | {r['fn']} | {r['dtype']} | {'yes' if r['remat'] else 'no'} | "
                 f"{r['examples_per_s']:,.0f} | {r['speed_vs_f32']:.2f} | {r['peak_mb']:,.1f} | "
                 f"{r['memory_vs_f32']:.2f} |")
  lines.append("")
  for r in rows:
    if r["dtype"] == "bfloat16" and not r["remat"]:
      ok = r["speed_vs_f32"] >= 1.6 and r["memory_vs_f32"] <= 0.6
      lines.append(f"- {r['model']} {r['fn']}: bfloat16 {r['speed_vs_f32']:.2f}x the throughput, "
                   f"{r['memory_vs_f32']:.2f}x the peak memory of float32 (goal >= 1.6x, <= 0.6x:"
                   f" {'met' if ok else 'not met'})")
  return "\n".join(lines)


def main(argv: list[str]) -> None:
  del argv
  from absl import flags
  print(table(measure(quick=flags.FLAGS.quick, repeats=flags.FLAGS.repeats or None,
                      models=tuple(flags.FLAGS.models))), flush=True)


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_precision``)."""
  from absl import app, flags
  flags.DEFINE_bool("quick", False, "tiny sizes, for a smoke run on a CPU")
  flags.DEFINE_integer("repeats", 0, "timed calls per function (0: 20, or 2 with --quick)")
  flags.DEFINE_list("models", ["resnet18", "gpt"], "models: resnet18, gpt")
  app.run(main)


if __name__ == "__main__":
  cli()
