"""The sections of ``experiments/bench/accel.py``: each measures one topic's figures and emits them
as it goes (``sec.emit``), checking its time cap between measurements (``sec.room``)."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Protocol

import jax
import numpy as np


class Section(Protocol):
  """What a section sees (:class:`experiments.bench.accel.Section`): its name, ``quick``, the time
  left before its cap, and where its figures go."""

  name: str
  quick: bool

  def left(self) -> float: ...

  def emit(self, name: str, value: Any, unit: str = "") -> None: ...

  def room(self, what: str) -> bool: ...


# ----------------------------------------------------------------------------------------------
# Timing helpers.
# ----------------------------------------------------------------------------------------------


def _donated_step(fn: Callable, state: Any, batch: Any) -> tuple[Callable[[], Any], Any]:
  """(a call that advances ``state`` by one donated step, the compiled step)."""
  compiled = jax.jit(fn, donate_argnums=0).lower(state, batch).compile()
  holder = [state]

  def call():
    holder[0], out = compiled(holder[0], batch)
    return out

  return call, compiled


def _interleaved(calls: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
  """Median seconds of each call, after a warm-up, timed in rounds (one call of each per round)
  so that background load weighs on all alike (:func:`experiments.bench.masks.alternate_times`)."""
  from experiments.bench import masks as bench_masks
  return {k: statistics.median(v) for k, v in bench_masks.alternate_times(calls, repeats).items()}


def _goal(ok: bool) -> str:
  return "met" if ok else "not met"


# ----------------------------------------------------------------------------------------------
# 1. scores
# ----------------------------------------------------------------------------------------------


def scores_section(sec: Section) -> None:
  """GraNd against the donated train step, the largest models first; then GraNd against
  vmap(grad) on the models whose per-example gradients fit."""
  from experiments.bench import scores as bench_scores
  from prunejax import scores
  quick = sec.quick
  models = ("mlp", "cnn") if quick else ("resnet18", "mlp", "cnn", "gpt2_small")
  batch_of = lambda m: (16 if quick else (64 if m == "gpt2_small" else 128))
  repeats = 2 if quick else 10
  for name in models:
    if not sec.room(f"{name}: GraNd vs train step"):
      continue
    case = bench_scores.make_case(name, batch_of(name), quick, resnet_width=1.0, gpt_tokens=128)
    b = batch_of(name)
    # The step donates its state; the scores' params share its arrays, so it gets copies.
    state, train_batch = jax.tree.map(lambda a: a.copy(), case["train_args"])
    train_call, train_compiled = _donated_step(case["train_step"], state, train_batch)
    apply_fn, params, batch = case["apply_fn"], case["params"], case["batch"]
    grand_compiled = jax.jit(lambda v, bt: scores.grand(apply_fn, v, bt)).lower(
        params, batch).compile()
    secs = _interleaved({"train": train_call, "grand": lambda: grand_compiled(params, batch)},
                        repeats)
    train_mb = bench_scores.peak_bytes(train_compiled) / 2**20
    grand_mb = bench_scores.peak_bytes(grand_compiled) / 2**20
    speed = secs["train"] / secs["grand"]
    memory = grand_mb / train_mb
    sec.emit(f"{name} train step (batch {b})", b / secs["train"], "examples/s")
    sec.emit(f"{name} GraNd (batch {b})", b / secs["grand"], "examples/s")
    sec.emit(f"{name} GraNd / train step throughput", speed, "x")
    sec.emit(f"{name} train step peak memory", train_mb, "MB")
    sec.emit(f"{name} GraNd peak memory", grand_mb, "MB")
    sec.emit(f"{name} GraNd / train step peak memory", memory, "x")
    sec.emit(f"{name} goal (>= 0.85x throughput, <= 1.0x memory)",
             _goal(speed >= 0.85 and memory <= 1.0), "")
    del case, train_call, train_compiled, grand_compiled
  for name in ("mlp", "cnn") if quick else ("mlp", "cnn", "resnet18"):
    if not sec.room(f"{name}: GraNd vs vmap(grad)"):
      continue
    case = bench_scores.make_case(name, batch_of(name), quick, resnet_width=1.0)
    apply_fn, params, batch = case["apply_fn"], case["params"], case["batch"]
    ours = np.asarray(jax.jit(lambda v, bt: scores.grand(apply_fn, v, bt))(params, batch))
    ref = np.asarray(jax.jit(lambda v, bt: scores.grand_vmap(apply_fn, v, bt))(params, batch))
    sec.emit(f"{name} max |GraNd / vmap(grad) - 1|", float(np.max(np.abs(ours / ref - 1.0))), "")


# ----------------------------------------------------------------------------------------------
# 2. masks
# ----------------------------------------------------------------------------------------------


def _jaxpruner_mask(sparsity: float) -> Callable | None:
  """jaxpruner's global magnitude pruner as ``params -> mask`` (None when not installed)."""
  try:
    import functools
    import jaxpruner
  except ImportError:
    return None
  pruner = jaxpruner.GlobalMagnitudePruning(sparsity_distribution_fn=functools.partial(
      jaxpruner.sparsity_distributions.uniform, sparsity=sparsity))
  return lambda p: pruner.instant_sparsify(p)[1]


def masks_section(sec: Section) -> None:
  from experiments.bench import masks as bench_masks
  quick, sparsity = sec.quick, 0.9
  repeats = 2 if quick else 5
  width = 0.25 if quick else 1.0
  jp = _jaxpruner_mask(sparsity)
  if jp is None:
    sec.emit("jaxpruner", None, "skipped: not installed here; the sort baseline stands in")
  for depth in (18,) if quick else (18, 50):
    tree = f"ResNet-{depth} x{width}"
    if not sec.room(f"{tree}: global magnitude mask"):
      continue
    params = bench_masks.random_tree(bench_masks.resnet_shapes(depth, width))
    r = bench_masks.bench_global_magnitude(tree, params, sparsity, repeats)
    sec.emit(f"{tree} global mask, radix select", 1e3 * r["ours_s"], "ms")
    sec.emit(f"{tree} global mask, argsort baseline", 1e3 * r["ref_s"], "ms")
    sec.emit(f"{tree} radix select speed-up over argsort", r["speedup"], "x")
    sec.emit(f"{tree} same mask as argsort", bool(r["same_mask"]), "")
    sec.emit(f"{tree} pruned exactly the target ({r['target']:,})",
             r["pruned_ours"] == r["target"], "")
    if jp is not None and sec.room(f"{tree}: jaxpruner"):
      try:
        fn = jax.jit(jp)
        t_jp = bench_masks.median_time(lambda: fn(params), repeats)
        sec.emit(f"{tree} global mask, jaxpruner", 1e3 * t_jp, "ms")
        sec.emit(f"{tree} radix select speed-up over jaxpruner", t_jp / r["ours_s"], "x")
      except Exception as e:  # noqa: BLE001 - jaxpruner's API may differ by version.
        sec.emit(f"{tree} jaxpruner", None, f"failed: {type(e).__name__}: {e}"[:200])
    del params
  if sec.room("masked train step overhead"):
    r = bench_masks.bench_masked_step(quick, 5 if quick else 30)
    sec.emit(f"masked train step overhead, {r['model']}", 100 * r["overhead"], "%")
    sec.emit("masked train step: pruned weights stay zero", bool(r["pruned_stay_zero"]), "")
  for name, model, params, mask, x in bench_masks.compaction_cases(quick):
    if not sec.room(f"compaction {name}"):
      continue
    r = bench_masks.bench_compaction(name, model, params, mask, x, 3 if quick else 15)
    sec.emit(f"compaction at 50% structured, {name}: inference speed-up", r["speedup"], "x")
    sec.emit(f"compaction, {name}: max |compact - masked logits|", r["max_abs_diff"], "")


# ----------------------------------------------------------------------------------------------
# 3. fused (issue "one compiled program")
# ----------------------------------------------------------------------------------------------


def fused_section(sec: Section) -> None:
  try:
    from experiments.bench import sweep as bench_sweep
    figures = bench_sweep.accel_figures
  except (ImportError, AttributeError):
    sec.emit("fused", None, "skipped: bench_sweep.accel_figures not available")
    return
  figures(sec.quick, max(0.0, sec.left()), sec.emit)


# ----------------------------------------------------------------------------------------------
# 4. precision, with the profile of the bfloat16 ResNet-18 step
# ----------------------------------------------------------------------------------------------


def precision_section(sec: Section) -> None:
  """bfloat16 against float32: ResNet-18's train step and its profile first (the open question),
  then the GPT's train step, GraNd of both, and rematerialization."""
  from experiments.bench import hlo_profile
  from experiments.bench import precision as bench_precision
  quick = sec.quick
  repeats = 3 if quick else 20
  rows: dict[tuple, dict] = {}

  # The quick run times ResNet-18's train step (for the profile) and GraNd on the tiny GPT only:
  # each compile costs tens of seconds on a loaded CPU (tests/test_mixed_precision.py covers both
  # models in bfloat16, remat included).
  step_models, grand_models = (("resnet18",), ("gpt",)) if quick else (("resnet18", "gpt"),) * 2
  remat_models = () if quick else ("resnet18", "gpt")
  compiled_text: dict[str, str] = {}
  for model in step_models:
    for dtype in ("float32", "bfloat16"):
      if not sec.room(f"{model} train step {dtype}"):
        continue
      row, step = bench_precision.bench_train_step(model, dtype, False, quick, repeats)
      rows[(model, "train step", dtype, False)] = row
      _ratio_figures(sec, rows, model, "train step", dtype, False)
      if model == "resnet18":
        compiled_text[dtype] = step.as_text()
        _xla_cost_figures(sec, dtype, step)
      del step
    if model == "resnet18" and compiled_text and sec.room("resnet18 step profile"):
      step_ms = {d: 1e3 * rows[key]["batch"] / rows[key]["examples_per_s"]
                 for d in compiled_text for key in [("resnet18", "train step", d, False)]}
      _profile_figures(sec, compiled_text, step_ms, hlo_profile)
    if model == "resnet18" and not quick:
      _big_batch_figures(sec, repeats, bench_precision)
  for model in grand_models:
    for dtype in ("float32", "bfloat16"):
      if not sec.room(f"{model} grand {dtype}"):
        continue
      rows[(model, "grand", dtype, False)] = bench_precision.bench_grand(model, dtype, False,
                                                                        quick, repeats)
      _ratio_figures(sec, rows, model, "grand", dtype, False)
  for model in remat_models:
    if not sec.room(f"{model} train step bfloat16 + remat"):
      continue
    row, _ = bench_precision.bench_train_step(model, "bfloat16", True, quick, repeats)
    rows[(model, "train step", "bfloat16", True)] = row
    _ratio_figures(sec, rows, model, "train step", "bfloat16", True)


def _ratio_figures(sec: Section, rows: dict, model: str, fn: str, dtype: str, remat: bool) -> None:
  """Throughput and peak memory of one measured row, and its ratios to float32 with the goal."""
  r, base = rows[(model, fn, dtype, remat)], rows.get((model, fn, "float32", False))
  label = f"{model} {fn} {dtype}{' + remat' if remat else ''}"
  sec.emit(f"{label}", r["examples_per_s"], "examples/s")
  sec.emit(f"{label} peak memory", r["peak_mb"], "MB")
  if base is not None and (dtype, remat) != ("float32", False):
    speed = r["examples_per_s"] / base["examples_per_s"]
    memory = r["peak_mb"] / base["peak_mb"]
    sec.emit(f"{label} / float32 throughput", speed, "x")
    sec.emit(f"{label} / float32 peak memory", memory, "x")
    if not remat:
      sec.emit(f"{label} goal (>= 1.6x throughput, <= 0.6x memory)",
               _goal(speed >= 1.6 and memory <= 0.6), "")


def _xla_cost_figures(sec: Section, dtype: str, step) -> None:
  """XLA's own totals for the compiled ResNet-18 step, a cross-check of the profile's counts."""
  xla = step.cost_analysis()
  xla = (xla[0] if isinstance(xla, (list, tuple)) and xla else xla) or {}
  if "flops" in xla:
    sec.emit(f"resnet18 {dtype} step: XLA cost analysis flops", xla["flops"] / 1e9, "GFLOP")
  if "bytes accessed" in xla:
    sec.emit(f"resnet18 {dtype} step: XLA cost analysis bytes accessed",
             xla["bytes accessed"] / 2**20, "MB")


def _big_batch_figures(sec: Section, repeats: int, bench_precision) -> None:
  """ResNet-18's train step at batch 1024 in both dtypes. The profile's fixed cost per kernel does
  not shrink with the dtype; a larger batch amortizes it, so the bfloat16 gain at batch 1024
  tests that explanation."""
  big = {}
  for dtype in ("float32", "bfloat16"):
    if sec.room(f"resnet18 train step {dtype}, batch 1024"):
      big[dtype], _ = bench_precision.bench_train_step("resnet18", dtype, False, False, repeats,
                                                       batch_size=1024)
      sec.emit(f"resnet18 train step {dtype}, batch 1024", big[dtype]["examples_per_s"],
               "examples/s")
  if len(big) == 2:
    sec.emit("resnet18 train step bfloat16 / float32 throughput, batch 1024",
             big["bfloat16"]["examples_per_s"] / big["float32"]["examples_per_s"], "x")


def _profile_figures(sec: Section, hlo_texts: dict[str, str], measured_ms: dict[str, float],
                     hlo_profile) -> None:
  """Share of the estimated step time per op category, for each dtype, and what the estimate
  says bfloat16 can gain at most."""
  peaks = hlo_profile.chip_peaks(jax.devices()[0])
  sec.emit("profile peaks", f"{peaks.name}: bf16 {peaks.bf16_flops / 1e12:g} TFLOP/s, tf32 "
           f"{peaks.tf32_flops / 1e12:g}, {peaks.bytes_per_s / 1e12:g} TB/s, "
           f"{peaks.per_op_s * 1e6:g} us per kernel", "")
  profiles = {d: hlo_profile.profile(t, peaks) for d, t in hlo_texts.items()}
  for dtype, prof in profiles.items():
    for cat in hlo_profile.CATEGORIES:
      r = prof[cat]
      if r["ops"]:
        sec.emit(f"resnet18 {dtype} step: {cat} share ({r['ops']} kernels, "
                 f"{r['gflop']:.1f} GFLOP, {r['mb']:.0f} MB)", 100 * r["share"], "% of est. time")
    sec.emit(f"resnet18 {dtype} step: estimated time", prof["total"]["est_ms"], "ms")
    sec.emit(f"resnet18 {dtype} step: measured time", measured_ms[dtype], "ms")
  if len(profiles) == 2:
    est = profiles["float32"]["total"]["est_ms"] / profiles["bfloat16"]["total"]["est_ms"]
    sec.emit("resnet18 bfloat16 / float32 speed-up, estimated from the profile", est, "x")
  print(hlo_profile.table(profiles, measured_ms), flush=True)


# ----------------------------------------------------------------------------------------------
# 5. input, 6. loop
# ----------------------------------------------------------------------------------------------


def input_section(sec: Section) -> None:
  from experiments.bench import input as bench_input
  from prunejax import data
  quick = sec.quick
  if not sec.room("input pipeline"):
    return
  n = 2048 if quick else 50_000
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 255, (n, 32, 32, 3)).astype(np.uint8),
                            rng.integers(0, 10, n).astype(np.int32))
  rates = bench_input.pipeline_rates(source, n, 1 if quick else 3)
  sec.emit("host loader (in memory)", rates["host"], "examples/s")
  sec.emit("loader + device put + augmentation (crop, flip, normalize)",
           rates["with_device_augment"], "examples/s")
  if not sec.room("train steps of the paper configs' models"):
    return
  # The quick run checks the measurement on a tiny CNN (a ResNet's compile costs a minute here).
  tiny = {"tiny cnn (quick)": ("cnn", {"features": (4, 8), "dense": 16})}
  steps = bench_input.train_step_rates(quick, models=tiny if quick else None)
  for k, v in steps.items():
    sec.emit(f"train step {k}", v, "examples/s")
  sec.emit("loader with augmentation / slowest-model train step",
           rates["with_device_augment"] / min(steps.values()), "x")


def loop_busy(quick: bool) -> dict[str, float]:
  """Device-busy fraction of the training loop for datadiet_cifar10's model (ResNet-18, batch
  128, crop + flip on device, SGD Nesterov): step time alone x steps / loop wall time. The quick
  run uses a tiny CNN: it checks the measurement, not the model."""
  import optax
  from prunejax import data, parallel, train
  from prunejax.models import build_model
  n, batch = (256, 32) if quick else (128 * 120, 128)
  model = (build_model("cnn", 10, features=(4, 8), dense=16) if quick else
           build_model("resnet18", 10, width_multiplier=1.0))
  rng = np.random.default_rng(0)
  source = data.ArraySource(rng.integers(0, 255, (n, 32, 32, 3)).astype(np.uint8),
                            rng.integers(0, 10, n).astype(np.int32))
  prep = data.Preprocess(scale=255.0, crop_padding=4, flip=True)
  mesh = parallel.data_mesh()
  state = parallel.replicate(train.create_train_state(
      model, optax.sgd(0.1, 0.9, nesterov=True), jax.random.key(0), source.example(), prep), mesh)
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


def loop_section(sec: Section) -> None:
  if not sec.room("host training loop"):
    return
  r = loop_busy(sec.quick)
  what = "tiny CNN (quick)" if sec.quick else "ResNet-18 (datadiet_cifar10), batch 128"
  sec.emit(f"host loop, {what}: steps", r["steps"], "")
  sec.emit(f"host loop, {what}: step alone", r["step_ms"], "ms")
  sec.emit(f"host loop, {what}: loop per step", r["loop_ms_per_step"], "ms")
  sec.emit(f"host loop, {what}: device busy", 100 * r["busy"], "%")
  sec.emit(f"host loop, {what}: examples/s", r["examples_per_s"], "examples/s")
