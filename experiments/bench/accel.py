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
import sys
import threading
import time
import traceback
from typing import Any, Callable

_T0 = time.monotonic()

import jax  # noqa: E402 - the budget counts the import of JAX.
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments.bench.accel_sections import (  # noqa: E402
    fused_section, input_section, loop_section, masks_section, precision_section, scores_section)

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
# The sections (experiments/bench/accel_sections.py), in the order of PRIORITY.
# ----------------------------------------------------------------------------------------------

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
