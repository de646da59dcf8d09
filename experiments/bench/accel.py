"""Every accelerator figure of the project from one short run, each written down as it is measured.

    python -m experiments.bench_accel                      # one GPU: every section in <= 6 minutes
    python -m experiments.bench_accel --sections=precision --budget_s=120
    python -m experiments.bench_accel --out_dir=/tmp/bench --compilation_cache_dir=/tmp/jax_cache
    python -m experiments.bench_accel --quick              # tiny sizes on a CPU (the tests run it)

Sections, in priority order (a lease that ends early loses the last ones, not the first):

1. ``scores``: GraNd against the train step (state donated, as in training) on ResNet-18, an MLP,
   a CNN and a GPT-2-small-shaped classifier: examples/s, XLA's peak memory, their ratios and the
   goal (>= 0.85x the throughput at <= 1.0x the memory); then, time allowing, GraNd against
   ``vmap(grad)`` (max relative difference) on the small models (``experiments/bench/scores.py``);
2. ``masks``: the global magnitude mask (radix select) against a sort baseline and, where it is
   installed, jaxpruner's global magnitude pruner, on ResNet-18/50-shaped trees; the masked train
   step's overhead; compaction's inference speed-up (``experiments/bench/masks.py``);
3. ``fused``: the fused training loop's device-busy fraction and the replicas' examples/s, from
   ``experiments.bench.sweep.accel_figures`` (issue "one compiled program"); recorded as skipped
   when that function does not exist;
4. ``precision``: bfloat16 against float32 train steps of ResNet-18 (first) and the GPT-2-small-
   shaped classifier, with a profile of the ResNet-18 step from its compiled HLO (share of the
   step per op category: convolutions, BatchNorm/elementwise, the optimizer update,
   copies/transposes, casts; ``experiments/bench/hlo_profile.py``); then GraNd and rematerialization;
5. ``input``: the loader with on-device augmentation against the paper configs' train steps;
6. ``loop``: the device-busy fraction of the host training loop (datadiet_cifar10's model).

Time: ``--budget_s`` (default 360 s, measured from the start of the process, compilation
included) is shared among the sections that run: each gets ``share / (shares left)`` of the time
left when it starts, so a section that finishes early leaves its time to the later ones. A section
checks its cap between measurements and records what it did not reach as skipped. A watchdog ends
the process (exit code 3) when ``--budget_s`` runs out during a measurement; every figure measured
until then is already on disk.

Output: each figure is appended, as soon as it is measured, to ``<out_dir>/bench_accel.json``
(``{"runs": [{"device", "jax", "date", "flags", "figures": [{"section", "name", "value",
"unit", "t_s"}]}]}``, rewritten atomically, so it is valid JSON at every moment; a rerun appends
a run) and as a row to ``<out_dir>/bench_accel.md``, and printed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import sys
import threading
import time
import traceback
from typing import Any, Callable

_T0 = time.monotonic()

import jax  # noqa: E402 - the budget counts the import of JAX.
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
_clock = time.monotonic  # the tests replace it with a fake clock
PRIORITY = ("scores", "masks", "fused", "precision", "input", "loop")
SHARES = {"scores": 0.30, "masks": 0.10, "fused": 0.17, "precision": 0.29, "input": 0.07,
          "loop": 0.07}
# Cooperative caps aim this far short of --budget_s, so the watchdog is a last resort.
_CAP_MARGIN = 0.92
CUT_EXIT_CODE = 3


# ----------------------------------------------------------------------------------------------
# Recording: one figure at a time, to JSON and Markdown.
# ----------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
  if isinstance(value, bool) or value is None or isinstance(value, str):
    return "-" if value is None else str(value)
  if isinstance(value, (int, np.integer)):
    return f"{int(value):,}"
  v = float(value)
  if not np.isfinite(v):
    return str(v)
  return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


class Recorder:
  """Appends figures to ``bench_accel.json`` (atomic rewrite) and ``bench_accel.md`` as they come.

  Thread-safe: the watchdog records the cut from its own thread.
  """

  def __init__(self, out_dir: str, header: dict[str, Any]):
    os.makedirs(out_dir, exist_ok=True)
    self.json_path = os.path.join(out_dir, "bench_accel.json")
    self.md_path = os.path.join(out_dir, "bench_accel.md")
    self._lock = threading.Lock()
    self._doc = {"runs": []}
    if os.path.exists(self.json_path):
      with open(self.json_path) as f:
        try:
          self._doc = json.load(f)
        except json.JSONDecodeError:  # a file that is not ours: keep it aside, start afresh
          os.replace(self.json_path, self.json_path + ".bad")
    self._run = dict(header, figures=[])
    self._doc["runs"].append(self._run)
    self._write_json()
    with open(self.md_path, "a") as f:
      f.write(f"\n# bench_accel on {header['device']}, jax {header['jax']}, {header['date']}\n"
              f"\nflags: {header['flags']}\n\n| section | figure | value | unit |\n"
              "| --- | --- | ---: | --- |\n")

  def _write_json(self) -> None:
    tmp = self.json_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self._doc, f, indent=1, default=str)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.json_path)

  def emit(self, section: str, name: str, value: Any, unit: str = "") -> None:
    """Records one figure (``value`` a number, a bool, a string or None for a note)."""
    if isinstance(value, np.generic):
      value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
      value = str(value)
    fig = {"section": section, "name": name, "value": value, "unit": unit,
           "t_s": round(time.monotonic() - _T0, 2)}
    row = f"| {section} | {name} | {_fmt(value)} | {unit} |"
    if not self._lock.acquire(timeout=10):
      return
    try:
      self._run["figures"].append(fig)
      self._write_json()
      with open(self.md_path, "a") as f:
        f.write(row + "\n")
      print(row, flush=True)
    finally:
      self._lock.release()

  @property
  def figures(self) -> list[dict]:
    return list(self._run["figures"])


@dataclasses.dataclass
class Section:
  """What a section sees: its name, ``quick``, its deadline (on ``_clock``), the recorder."""
  name: str
  quick: bool
  deadline: float
  recorder: Recorder

  def left(self) -> float:
    """Seconds left before this section's cap."""
    return self.deadline - _clock()

  def emit(self, name: str, value: Any, unit: str = "") -> None:
    self.recorder.emit(self.name, name, value, unit)

  def room(self, what: str) -> bool:
    """Whether there is time left to start measuring ``what``; records it as skipped if not."""
    if self.left() > 0:
      return True
    self.emit(what, None, "skipped: section cap reached")
    return False


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
  so that background load weighs on all alike."""
  for call in calls.values():
    jax.block_until_ready(call())
  times: dict[str, list[float]] = {k: [] for k in calls}
  for _ in range(repeats):
    for k, call in calls.items():
      t = time.perf_counter()
      jax.block_until_ready(call())
      times[k].append(time.perf_counter() - t)
  return {k: statistics.median(v) for k, v in times.items()}


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

  def ratio_figures(model: str, fn: str, dtype: str, remat: bool) -> None:
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
      ratio_figures(model, "train step", dtype, False)
      if model == "resnet18":
        compiled_text[dtype] = step.as_text()
        xla = step.cost_analysis()
        xla = (xla[0] if isinstance(xla, (list, tuple)) and xla else xla) or {}
        if "flops" in xla:  # XLA's own totals, a cross-check of the profile's counts
          sec.emit(f"resnet18 {dtype} step: XLA cost analysis flops", xla["flops"] / 1e9, "GFLOP")
        if "bytes accessed" in xla:
          sec.emit(f"resnet18 {dtype} step: XLA cost analysis bytes accessed",
                   xla["bytes accessed"] / 2**20, "MB")
      del step
    if model == "resnet18" and compiled_text and sec.room("resnet18 step profile"):
      step_ms = {d: 1e3 * rows[key]["batch"] / rows[key]["examples_per_s"]
                 for d in compiled_text for key in [("resnet18", "train step", d, False)]}
      _profile_figures(sec, compiled_text, step_ms, hlo_profile)
    if model == "resnet18" and not quick:
      # The profile's fixed cost per kernel does not shrink with the dtype; a larger batch
      # amortizes it, so the bfloat16 gain at batch 1024 tests that explanation.
      big = {}
      for dtype in ("float32", "bfloat16"):
        if sec.room(f"resnet18 train step {dtype}, batch 1024"):
          big[dtype], _ = bench_precision.bench_train_step(model, dtype, False, quick, repeats,
                                                           batch_size=1024)
          sec.emit(f"resnet18 train step {dtype}, batch 1024", big[dtype]["examples_per_s"],
                   "examples/s")
      if len(big) == 2:
        sec.emit("resnet18 train step bfloat16 / float32 throughput, batch 1024",
                 big["bfloat16"]["examples_per_s"] / big["float32"]["examples_per_s"], "x")
  for model in grand_models:
    for dtype in ("float32", "bfloat16"):
      if not sec.room(f"{model} grand {dtype}"):
        continue
      rows[(model, "grand", dtype, False)] = bench_precision.bench_grand(model, dtype, False,
                                                                        quick, repeats)
      ratio_figures(model, "grand", dtype, False)
  for model in remat_models:
    if not sec.room(f"{model} train step bfloat16 + remat"):
      continue
    row, _ = bench_precision.bench_train_step(model, "bfloat16", True, quick, repeats)
    rows[(model, "train step", "bfloat16", True)] = row
    ratio_figures(model, "train step", "bfloat16", True)


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


SECTIONS: dict[str, Callable[[Section], None]] = {
    "scores": scores_section, "masks": masks_section, "fused": fused_section,
    "precision": precision_section, "input": input_section, "loop": loop_section}


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------


def run(sections: list[str], quick: bool, budget_s: float, out_dir: str,
        start: float = _T0, watchdog: bool = True) -> Recorder:
  """Runs ``sections`` (in :data:`PRIORITY` order) within ``budget_s`` seconds from ``start``
  (``time.monotonic``); returns the recorder. A section that raises is recorded as failed and the
  next one runs. The watchdog (on unless ``watchdog=False``) ends the process with
  :data:`CUT_EXIT_CODE` when the budget runs out, however far a measurement has got."""
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    raise ValueError(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
  if not 0 < budget_s < float("inf"):
    raise ValueError(f"--budget_s must be a positive, finite number of seconds, got {budget_s}")
  if not sections:
    raise ValueError(f"--sections is empty; choose from {list(SECTIONS)}")
  order = [s for s in PRIORITY if s in sections] + [s for s in sections if s not in PRIORITY]
  dev = jax.devices()[0]
  date = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
  rec = Recorder(out_dir, {"device": f"{dev.device_kind} ({dev.platform})", "jax": jax.__version__,
                           "date": date,
                           "flags": {"sections": order, "quick": quick, "budget_s": budget_s}})
  print(f"# bench_accel on {dev.device_kind} ({dev.platform}), jax {jax.__version__}, {date}",
        flush=True)
  end = start + budget_s
  current = {"name": "start"}

  def cut() -> None:
    rec.emit(current["name"], "run cut", None,
             f"stopped at --budget_s={budget_s:g} during this section")
    sys.stdout.flush()
    os._exit(CUT_EXIT_CODE)

  timer = threading.Timer(max(0.0, end - _clock()), cut)
  timer.daemon = True
  if watchdog:
    timer.start()
  try:
    for i, name in enumerate(order):
      current["name"] = name
      left = (start + _CAP_MARGIN * budget_s) - _clock()
      weight = sum(SHARES.get(s, 0.1) for s in order[i:])
      cap = max(0.0, left) * SHARES.get(name, 0.1) / weight
      sec = Section(name, quick, _clock() + cap, rec)
      print(f"\n## {name} (cap {cap:.0f} s)\n", flush=True)
      t = _clock()
      if cap <= 0:
        sec.emit(name, None, "skipped: no time left in --budget_s")
        continue
      try:
        SECTIONS[name](sec)
      except Exception as e:  # noqa: BLE001 - one failing section must not waste the lease.
        print(traceback.format_exc(limit=8), flush=True)
        sec.emit(name, None, f"failed: {type(e).__name__}: {e}"[:300])
      sec.emit("section time", _clock() - t, f"s (cap {cap:.0f} s)")
    rec.emit("total", "wall time from process start", _clock() - start, "s")
  finally:
    timer.cancel()
  return rec


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.compilation_cache_dir:  # a rerun in the same lease skips the compiles already done
    jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    run(FLAGS.sections, FLAGS.quick, FLAGS.budget_s, FLAGS.out_dir)
  except ValueError as e:
    raise app.UsageError(str(e)) from e


def _define_flags() -> None:
  flags.DEFINE_bool("quick", False, "tiny sizes, for a smoke run on a CPU")
  flags.DEFINE_list("sections", list(PRIORITY), f"sections to run (in the order {PRIORITY})")
  flags.DEFINE_float("budget_s", 360.0, "wall-time budget of the whole run from process start, "
                     "compilation included; shared among the sections")
  flags.DEFINE_string("out_dir", ".", "where bench_accel.json and bench_accel.md are appended")
  flags.DEFINE_string("compilation_cache_dir", "", "JAX compilation cache (a rerun "
                      "of cut sections in the same lease reuses compiled programs); off if empty")


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_accel``)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
