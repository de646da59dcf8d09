"""One compiled program per run and per sweep, measured: ratios against baselines in one process.

    python -m experiments.bench_sweep                       # every section, this 2-core CPU
    python -m experiments.bench_sweep --sections=one_run,sweep --repeats=5
    python -m experiments.bench_sweep --quick               # seconds (the smoke test)

Sections (each prints its table as soon as it is measured):

* ``one_run``: a dense digits run (LeNet-300-100, SGD + Nesterov, cosine, 20 epochs, batch 32)
  through prunejax's fused path and its host loop, against a hand-written ``lax.scan`` loop of the
  same model and optimizer over device-resident data. Compilation excluded from all three (each
  is warmed up once); the time of the whole call (state creation included) is reported.
* ``sweep``: EL2N scoring with ``--seeds`` seeds on a CIFAR-shaped ResNet-18 (width x0.125, the
  smallest in the benchmarks): the seeds one after another on the host loop, one after another on
  the fused path, and as one ``vmap``-ed program (``experiments/scoring.batch_score``). The scores
  of the vmapped sweep against the sequential fused one are reported too.
* ``main_job``: ``python -m experiments.run`` end to end, the host loop (``train.fused=False``)
  against the default fused path, alternating, each in a fresh process (wall time of the process).
* ``moonshot``: ``mnist5k_cnn.py`` (2 seeds): today's dense run (host loop) against InfoBatch on the
  fused path (r = 0.5, the paper's default, and 0.7); wall time, steps and test accuracy, and the
  time and steps each needs to reach dense's final test accuracy (time-to-accuracy, as RHO-LOSS and
  InfoBatch report their speed-ups; the per-epoch evaluation that measures it is left out of the
  clock).

:func:`accel_figures` is the ``fused`` section of ``experiments/bench/accel.py``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from experiments.bench.masks import median_time

SECTIONS = ("one_run", "sweep", "main_job", "moonshot")


def _ctx(config, workdir: str, **train):
  from experiments import common
  from experiments.configs import fields
  for k, v in train.items():
    config.train[k] = v
  fields.validate(config)
  common.prepare_workdir(workdir, config, True).release()
  return common.setup(config, workdir)


# ----------------------------------------------------------------------------------------------
# One run: fused vs host vs a hand-written scan.
# ----------------------------------------------------------------------------------------------


def hand_scan_run(x_NxD: jax.Array, y_N: jax.Array, *, epochs: int, batch_size: int, seed: int,
                  model, tx) -> Callable[[], Any]:
  """A training run as a careful user writes it: data on the device, one ``lax.scan`` per epoch
  over a fresh permutation, the last partial batch padded and masked. Returns a zero-argument
  function that runs it and returns the final params."""
  n = x_NxD.shape[0]
  steps = -(-n // batch_size)

  def loss_fn(params, x, y, m):
    logits = model.apply({"params": params}, x)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1)[:, 0]
    return jnp.sum(jnp.where(m, ce, 0.0)) / jnp.maximum(m.sum(), 1)

  @jax.jit
  def run(key):
    params = model.init(key, x_NxD[:1])["params"]
    opt = tx.init(params)

    def epoch(carry, e):
      params, opt = carry
      perm = jax.random.permutation(jax.random.fold_in(key, e), n)
      idx = jnp.concatenate([perm, jnp.full(steps * batch_size - n, -1)]).reshape(steps, -1)

      def step(carry, rows):
        params, opt = carry
        m = rows >= 0
        r = jnp.maximum(rows, 0)
        g = jax.grad(loss_fn)(params, x_NxD[r], y_N[r], m)
        upd, opt = tx.update(g, opt, params)
        return (jax.tree.map(jnp.add, params, upd), opt), None

      return jax.lax.scan(step, (params, opt), idx)[0], None

    return jax.lax.scan(epoch, (params, opt), jnp.arange(epochs))[0][0]

  return lambda: run(jax.random.key(seed))


def one_run(repeats: int, quick: bool) -> list[dict]:
  from experiments import trainer
  from experiments.configs import digits
  from prunejax import train
  cfg = digits.get_config("quick" if quick else "")
  epochs = cfg.train.epochs
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    fused_ctx = _ctx(digits.get_config("quick" if quick else ""), f"{tmp}/f")
    host_ctx = _ctx(digits.get_config("quick" if quick else ""), f"{tmp}/h", fused=False)
    ids = fused_ctx.ds.train.ids
    t_fused = median_time(lambda: trainer.train_model(fused_ctx, ids, seed=0).state.params,
                           repeats)
    t_host = median_time(lambda: trainer.train_model(host_ctx, ids, seed=0).state.params,
                          repeats)
    src = fused_ctx.ds.train
    got = src.read(ids)
    x = fused_ctx.preprocess.eval(jnp.asarray(got["x"]))
    steps = -(-len(ids) // cfg.train.batch_size)
    tx = train.make_optimizer(cfg.optimizer, steps, epochs)
    hand = hand_scan_run(x, jnp.asarray(got["y"]), epochs=epochs, batch_size=cfg.train.batch_size,
                         seed=0, model=fused_ctx.model(), tx=tx)
    t_hand = median_time(hand, repeats)
  for name, t in (("hand-written lax.scan loop", t_hand), ("prunejax fused", t_fused),
                  ("prunejax host loop", t_host)):
    rows.append({"run": name, "seconds": t, "vs_hand_scan": t / t_hand})
  return rows


# ----------------------------------------------------------------------------------------------
# Sweeps: EL2N with many seeds.
# ----------------------------------------------------------------------------------------------


def _cifar_shaped(n: int) -> str:
  from prunejax import data
  name = f"bench_cifar_shaped_{n}"
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (n + 64, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, n + 64)
  data.register_dataset(name, lambda **_: data.Dataset(
      name, data.ArraySource(x[:n], y[:n], np.arange(n)),
      data.ArraySource(x[n:], y[n:], np.arange(n, n + 64)), 10, "image", {"scale": 255.0}))
  return name


def _sweep_config(quick: bool, seeds: int, n: int):
  from experiments.configs import base
  cfg = base.get_config()
  cfg.dataset.name = _cifar_shaped(n)
  cfg.model.update(dict(name="resnet18", width_multiplier=0.125))
  cfg.train.batch_size = 32
  cfg.data_pruning.score_seeds = seeds
  cfg.data_pruning.score_epochs = 1 if quick else 2
  return cfg


def sweep(seeds: int, quick: bool) -> list[dict]:
  from experiments import scoring
  n = 64 if quick else 256
  out, scores = [], {}
  with tempfile.TemporaryDirectory() as tmp:
    for name, train in (("host loop, seeds one after another", dict(fused=False)),
                        ("fused, seeds one after another", dict(vmap_replicas="off")),
                        (f"fused, {seeds} seeds in one vmapped program", dict(vmap_replicas="on"))):
      ctx = _ctx(_sweep_config(quick, seeds, n), f"{tmp}/{len(out)}", **train)
      ids = np.sort(ctx.ds.train.ids)
      scoring.batch_score(ctx, "el2n", ids[:64], 0)  # compile on a smaller set
      t = time.perf_counter()
      scores[name], _ = scoring.batch_score(ctx, "el2n", ids, 0)
      out.append({"sweep": name, "seconds": time.perf_counter() - t})
  base = out[0]["seconds"]
  for row in out:
    row["speedup_vs_host"] = base / row["seconds"]
  names = list(scores)
  for a, b, what in ((2, 1, "vmapped - sequential fused"), (1, 0, "sequential fused - host loop")):
    d = np.abs(scores[names[a]] - scores[names[b]])
    out.append({"sweep": f"EL2N |{what}|: max (mean in the last column)",
                "seconds": float(d.max()), "speedup_vs_host": float(d.mean())})
  return out


# ----------------------------------------------------------------------------------------------
# The main job end to end.
# ----------------------------------------------------------------------------------------------


def main_job(repeats: int, quick: bool) -> list[dict]:
  config = "experiments/configs/digits.py" + (":quick" if quick else "")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  times: dict[str, list[float]] = {"host loop (train.fused=False)": [], "fused (default)": []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(repeats):
      for name, extra in (("host loop (train.fused=False)", ["--config.train.fused=False"]),
                          ("fused (default)", [])):
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "experiments.run", f"--config={config}",
                               f"--workdir={tmp}/{r}_{len(extra)}", "--overwrite"] + extra,
                              cwd=root, capture_output=True, text=True)
        if proc.returncode:
          raise RuntimeError(f"the main job failed: {proc.stderr[-2000:]}")
        times[name].append(time.perf_counter() - t)
        with open(f"{tmp}/{r}_{len(extra)}/results.json") as f:
          rows = json.load(f)["rows"]
        times.setdefault(name + " rows", rows)
  host = statistics.median(times["host loop (train.fused=False)"])
  out = []
  for name in ("host loop (train.fused=False)", "fused (default)"):
    med = statistics.median(times[name])
    out.append({"main_job": name, "median_seconds": med, "runs": times[name],
                "speedup": host / med})
  a = {(r["strategy"], r.get("nominal_fraction"), r.get("round"), r["replicate"]): r["test_accuracy"]
       for r in times["host loop (train.fused=False) rows"]}
  b = {(r["strategy"], r.get("nominal_fraction"), r.get("round"), r["replicate"]): r["test_accuracy"]
       for r in times["fused (default) rows"]}
  diffs = [abs(a[k] - b[k]) for k in a]
  out.append({"main_job": "rows whose test accuracy differs (fused vs host)",
              "median_seconds": sum(d > 0 for d in diffs), "runs": [len(diffs)],
              "speedup": max(diffs)})
  return out


# ----------------------------------------------------------------------------------------------
# Moonshot: InfoBatch on the fused path against today's dense run, time-to-accuracy.
# ----------------------------------------------------------------------------------------------


def _timed_run(ctx, ids, seed, pruner=None) -> dict:
  """A run whose per-epoch test accuracy is measured outside its clock."""
  from experiments import trainer
  marks, spent = [], [0.0]
  t0 = [None]

  def on_epoch(epoch, state):
    t = time.perf_counter()
    jax.block_until_ready(state.params)
    if t0[0] is None:
      t0[0] = t
    acc = trainer.evaluate(ctx, state)
    marks.append((t - t0[0] - spent[0], acc))
    spent[0] += time.perf_counter() - t

  t = time.perf_counter()
  run = trainer.train_model(ctx, ids, seed=seed, pruner=pruner, on_epoch=on_epoch)
  wall = time.perf_counter() - t - spent[0]
  return {"wall": wall, "steps": run.steps, "acc": marks[-1][1], "curve": marks,
          "steps_per_epoch": [h for h in run.history]}


def moonshot(quick: bool) -> list[dict]:
  from experiments.configs import mnist5k_cnn
  from prunejax import online
  seeds = (0, 1)
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    settings = [("dense, host loop (today)", dict(fused=False), None),
                ("dense, fused", {}, None),
                ("InfoBatch r=0.5, fused", {}, online.InfoBatch(0.5, 0.875)),
                ("InfoBatch r=0.7, fused", {}, online.InfoBatch(0.7, 0.875))]
    results = {}
    for name, train, pruner in settings:
      cfg = mnist5k_cnn.get_config("quick" if quick else "")
      ctx = _ctx(cfg, f"{tmp}/{len(results)}", **train)
      ids = np.sort(ctx.ds.train.ids)
      # Warm up on the same ids: InfoBatch's epochs differ in length, so a shorter warm-up left
      # some of its chunk programs to be compiled inside its first timed run (about 3 s of 16).
      _timed_run(ctx, ids if pruner is not None else ids[:256], 99, pruner)
      results[name] = [_timed_run(ctx, ids, s, pruner) for s in seeds]
  dense = results["dense, host loop (today)"]
  target = float(np.mean([r["acc"] for r in dense]))
  for name, runs in results.items():
    reach = []
    for r in runs:
      hit = [t for t, acc in r["curve"] if acc >= target]
      reach.append(hit[0] if hit else float("nan"))
    out.append({"setting": name, "test_acc": [round(r["acc"], 4) for r in runs],
                "wall_s": [round(r["wall"], 2) for r in runs], "steps": [r["steps"] for r in runs],
                "time_to_dense_acc_s": [round(x, 2) for x in reach],
                "wall_vs_today": float(np.mean([r["wall"] for r in runs])
                                       / np.mean([r["wall"] for r in dense]))})
  return out


# ----------------------------------------------------------------------------------------------
# The accelerator figures (bench_accel's "fused" section).
# ----------------------------------------------------------------------------------------------


def accel_figures(quick: bool, budget_s: float, emit: Callable[[str, Any, str], None]) -> None:
  """ResNet-18 (CIFAR-shaped, batch 128; a small MLP with ``quick``) on the fused path: examples/s
  of one run, of R = 8 replicas in one vmapped program, the ratio, the device-busy fraction (the
  compiled chunk alone over the whole run, host planning included) and the peak device memory."""
  from experiments import fused_loop, trainer
  from experiments.configs import base
  t_start = time.perf_counter()
  n = 64 if quick else 4096
  cfg = base.get_config()
  cfg.dataset.name = _cifar_shaped(n)
  # quick (the CPU smoke test): a small MLP, so that the section takes seconds.
  cfg.model = (ml_collections.ConfigDict(dict(name="mlp", hidden=(32,))) if quick else
               ml_collections.ConfigDict(dict(name="resnet18", width_multiplier=1.0)))
  cfg.train.batch_size = 32 if quick else 128
  cfg.train.epochs = 1
  cfg.train.vmap_replicas = "on"
  with tempfile.TemporaryDirectory() as tmp:
    ctx = _ctx(cfg, tmp)
    ids = np.sort(ctx.ds.train.ids)
    trainer.train_model(ctx, ids, seed=0)  # compile
    t = time.perf_counter()
    run = trainer.train_model(ctx, ids, seed=0)
    one = len(ids) / (time.perf_counter() - t)
    emit("fused run, examples/s (R=1)", round(one, 1), "examples/s")
    emit("fused run, busy fraction (scan wall / call wall)",
         round(run.wall / (time.perf_counter() - t), 3), "")
    if time.perf_counter() - t_start > budget_s / 2:
      emit("replicas", "skipped: over half the section's budget", "")
      return
    r = 2 if quick else 8
    trainer.train_models(ctx, [ids] * r, list(range(r)))  # compile
    t = time.perf_counter()
    trainer.train_models(ctx, [ids] * r, list(range(r)))
    many = r * len(ids) / (time.perf_counter() - t)
    emit(f"{r} replicas in one program, examples/s", round(many, 1), "examples/s")
    emit(f"{r} replicas vs one run, examples/s ratio", round(many / one, 2), "x")
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      emit("peak device memory", round(stats["peak_bytes_in_use"] / 2**30, 2), "GiB")
    emit("compiled programs", len(fused_loop._COMPILED), "")


# ----------------------------------------------------------------------------------------------
# The script.
# ----------------------------------------------------------------------------------------------


def _table(rows: list[dict]) -> str:
  keys = list(rows[0])
  fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
  lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  f = flags.FLAGS
  import logging
  logging.getLogger("prunejax").setLevel(logging.WARNING)
  sections = [s for s in f.sections.split(",") if s]
  for s in sections:
    if s not in SECTIONS:
      raise SystemExit(f"--sections: {s!r} is not one of {', '.join(SECTIONS)}")
  print(f"# bench_sweep on {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"load average {os.getloadavg()[0]:.1f}", flush=True)
  runs = {"one_run": lambda: one_run(f.repeats, f.quick),
          "sweep": lambda: sweep(f.seeds, f.quick),
          "main_job": lambda: main_job(f.main_job_repeats, f.quick),
          "moonshot": lambda: moonshot(f.quick)}
  for s in sections:
    t = time.perf_counter()
    print(f"\n## {s}\n\n{_table(runs[s]())}\n\n({s}: {time.perf_counter() - t:.0f} s)", flush=True)


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_sweep``)."""
  from absl import app, flags
  flags.DEFINE_string("sections", ",".join(SECTIONS), "Comma-separated sections to run.")
  flags.DEFINE_integer("repeats", 5, "Timed repeats per measurement (median).")
  flags.DEFINE_integer("main_job_repeats", 3, "Runs of the main job per path (median).")
  flags.DEFINE_integer("seeds", 10, "Seeds of the EL2N sweep.")
  flags.DEFINE_bool("quick", False, "Tiny sizes (seconds; the smoke test).")
  app.run(main)


if __name__ == "__main__":
  cli()
