"""Every accelerator figure of the project from one run, on whatever device JAX finds first.

    python -m experiments.bench_accel            # on one GPU: under 8 minutes
    python -m experiments.bench_accel --quick    # tiny sizes on this CPU (the tests run it)

Sections, each timed and guarded (a failing section prints its error and the others still run):

1. scores: GraNd against a train step and against ``vmap(grad)`` on the benchmark models
   (``experiments/bench_scores.py``): throughput and peak memory;
2. masks: the global magnitude mask on ResNet-18/50-shaped trees, the masked train step's
   overhead, compaction's inference speed-up (``experiments/bench_masks.py``);
3. input: the loader with on-device augmentation against the train step of the paper configs'
   models (``experiments/bench_input.py``);
4. loop: the device-busy fraction of the real training loop (loader, device put, jitted step,
   metrics on device) for datadiet_cifar10's model: the time of the jitted step alone times the
   number of steps, over the loop's wall time;
5. precision: bfloat16 against float32 train steps (throughput, peak memory) and GraNd.

Every figure is printed as a Markdown table with the device and the date, ready for BUILD_NOTES.md.
"""

from __future__ import annotations

import datetime
import time
import traceback
from typing import Any, Callable

import jax
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS


def _section(name: str, fn: Callable[[], str]) -> None:
  t = time.perf_counter()
  print(f"\n## {name}\n", flush=True)
  try:
    print(fn(), flush=True)
  except Exception:  # noqa: BLE001 - one failing section must not waste the device's time.
    print("FAILED:\n" + traceback.format_exc(limit=6), flush=True)
  print(f"\n({name}: {time.perf_counter() - t:.0f} s)", flush=True)


def scores_section(quick: bool) -> str:
  """GraNd against the train step and vmap(grad); the jacrev baseline (slowest by far, already in
  BUILD_NOTES) is left out to keep the script within the device's time. ResNet-18 at full width, as
  the paper configs train it; the largest models first."""
  from experiments import bench_scores
  models = ("mlp", "plain_resnet") if quick else ("resnet18", "plain_resnet", "gpt", "cnn", "mlp")
  rows = bench_scores.measure(models, batch_size=32 if quick else 128, repeats=1 if quick else 5,
                              quick=quick, jacrev=False, max_gb=4.0 if quick else 40.0,
                              resnet_width=1.0)
  return bench_scores.table(rows)


def masks_section(quick: bool) -> str:
  from experiments import bench_masks
  rows = bench_masks.run(repeats=1 if quick else 5, quick=quick, sparsity=0.9,
                         train_steps=5 if quick else 30, inference_repeats=3 if quick else 15,
                         depths=(18,) if quick else (18, 50))
  return bench_masks.format_tables(rows)


def input_section(quick: bool) -> str:
  from experiments import bench_input
  from prunejax import data
  n = 4096 if quick else 50_000
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 255, (n, 32, 32, 3)).astype(np.uint8),
                            rng.integers(0, 10, n).astype(np.int32))
  rates = bench_input.pipeline_rates(source, n, 1 if quick else 3)
  steps = bench_input.train_step_rates(quick)
  lines = ["| path | examples/s |", "| --- | ---: |",
           f"| host loader (in memory) | {rates['host']:,.0f} |",
           f"| loader + device put + augmentation (crop, flip, normalize) | "
           f"{rates['with_device_augment']:,.0f} |"]
  lines += [f"| train step {k} | {v:,.0f} |" for k, v in steps.items()]
  worst = min(steps.values())
  lines.append(f"\nloader with augmentation / slowest-model train step: "
               f"{rates['with_device_augment'] / worst:.1f}x; fastest: "
               f"{rates['with_device_augment'] / max(steps.values()):.1f}x")
  return "\n".join(lines)


def loop_busy(quick: bool) -> dict[str, float]:
  """Device-busy fraction of the training loop for datadiet_cifar10's model (ResNet-18, batch
  128, crop + flip on device, SGD Nesterov): step time alone x steps / loop wall time."""
  import optax
  from prunejax import data, parallel, train
  from prunejax.models import build_model
  name, width, n, batch = ("resnet20", 0.25, 512, 64) if quick else ("resnet18", 1.0, 128 * 120, 128)
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 255, (n, 32, 32, 3)).astype(np.uint8),
                            rng.integers(0, 10, n).astype(np.int32))
  prep = data.Preprocess(scale=255.0, crop_padding=4, flip=True)
  mesh = parallel.data_mesh()
  state = parallel.replicate(train.create_train_state(
      build_model(name, 10, width_multiplier=width), optax.sgd(0.1, 0.9, nesterov=True),
      jax.random.key(0), source.example(), prep), mesh)
  step = train.plain_step(train.jit_train_step)

  def epoch(state, e):
    res = train.run_epoch(state, data.batches(source, batch_size=batch, seed=0, epoch=e), step,
                          mesh)
    jax.block_until_ready(res.state.params)
    return res

  state = epoch(state, 0).state  # compile
  t = time.perf_counter()
  res = epoch(state, 1)
  loop_s = time.perf_counter() - t
  fixed = parallel.shard_batch(next(iter(data.batches(source, batch_size=batch, seed=0,
                                                      epoch=2))), mesh)
  state = res.state
  state, m = train.jit_train_step(state, fixed)
  jax.block_until_ready(m)
  t = time.perf_counter()
  for _ in range(res.steps):
    state, m = train.jit_train_step(state, fixed)
  jax.block_until_ready(state.params)
  step_s = (time.perf_counter() - t) / res.steps
  return {"steps": res.steps, "step_ms": 1e3 * step_s, "loop_ms_per_step": 1e3 * loop_s / res.steps,
          "busy": step_s * res.steps / loop_s, "examples_per_s": res.steps * batch / loop_s}


def loop_section(quick: bool) -> str:
  r = loop_busy(quick)
  return ("| model | steps | step alone (ms) | loop per step (ms) | device busy | examples/s |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |\n"
          f"| ResNet-18 (datadiet_cifar10), batch 128, augmentation on device | {r['steps']} | "
          f"{r['step_ms']:.2f} | {r['loop_ms_per_step']:.2f} | {100 * r['busy']:.0f}% | "
          f"{r['examples_per_s']:,.0f} |")


def precision_section(quick: bool) -> str:
  """bfloat16 (with and without remat) against float32; the quick run only on the tiny GPT (a
  convnet's six compiles cost minutes on a CPU; the tests cover ResNet in bfloat16 elsewhere)."""
  from experiments import bench_precision
  models = ("gpt",) if quick else ("resnet18", "gpt")
  return bench_precision.table(bench_precision.measure(quick=quick, models=models))


SECTIONS: dict[str, Callable[[bool], str]] = {
    "loop": loop_section, "input": input_section, "precision": precision_section,
    "scores": scores_section, "masks": masks_section}


def main(argv: list[str]) -> None:
  del argv
  dev = jax.devices()[0]
  print(f"# bench_accel on {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", flush=True)
  t = time.perf_counter()
  for name in FLAGS.sections:
    _section(name, lambda name=name: SECTIONS[name](FLAGS.quick))
  print(f"\ntotal {time.perf_counter() - t:.0f} s", flush=True)


def _define_flags() -> None:
  flags.DEFINE_bool("quick", False, "tiny sizes, for a smoke run on a CPU")
  flags.DEFINE_list("sections", list(SECTIONS), f"sections to run, from {list(SECTIONS)}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
