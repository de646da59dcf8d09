"""The one-shot accelerator script (experiments/bench/accel.py) and the input benchmark
(experiments/bench/input.py).

Fast tests drive ``bench_accel.run`` with stand-in sections and a fake clock: priority order, caps
shared by what is left, skipped measurements recorded, a failing section recorded while the next
runs, the fused section with and without ``bench_sweep.accel_figures``, every figure on disk (valid
JSON and a Markdown row) the moment it is emitted, and the watchdog that ends a run at
``--budget_s`` keeping what was measured. The slow smoke test runs ``--quick`` (tiny sizes, every
section) on this CPU and checks the figures each section writes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import types

import pytest

from experiments.bench import accel as bench_accel


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


@pytest.fixture
def clock(monkeypatch):
  c = FakeClock()
  monkeypatch.setattr(bench_accel, "_clock", c)
  return c


def _figures(out_dir) -> list[dict]:
  with open(os.path.join(out_dir, "bench_accel.json")) as f:
    return json.load(f)["runs"][-1]["figures"]


def _fake_sections(monkeypatch, fns: dict) -> None:
  sections = dict(bench_accel.SECTIONS)
  sections.update(fns)
  monkeypatch.setattr(bench_accel, "SECTIONS", sections)


def test_sections_run_in_priority_order_and_every_figure_is_on_disk_when_emitted(
    tmp_path, clock, monkeypatch):
  seen = []

  def section(name):
    def fn(sec):
      # what was emitted before is already in the JSON and the Markdown file
      on_disk = [f["name"] for f in _figures(tmp_path)]
      seen.append((name, on_disk))
      sec.emit(f"{name} figure", 1.5, "x")
      assert _figures(tmp_path)[-1] == {**_figures(tmp_path)[-1], "section": name,
                                         "name": f"{name} figure", "value": 1.5, "unit": "x"}
      with open(tmp_path / "bench_accel.md") as f:
        assert f.read().splitlines()[-1] == f"| {name} | {name} figure | 1.5 | x |"
    return fn

  _fake_sections(monkeypatch, {k: section(k) for k in bench_accel.PRIORITY})
  bench_accel.run(["loop", "precision", "scores", "masks"], False, 100.0, str(tmp_path),
                  start=clock(), watchdog=False)
  assert [name for name, _ in seen] == ["scores", "masks", "precision", "loop"]
  assert "scores figure" in seen[1][1] and "masks figure" in seen[2][1]
  names = [f["name"] for f in _figures(tmp_path)]
  assert names.count("section time") == 4 and names[-1] == "wall time from process start"
  doc = json.loads((tmp_path / "bench_accel.json").read_text())
  assert doc["runs"][0]["flags"] == {"sections": ["scores", "masks", "precision", "loop"],
                                     "quick": False, "budget_s": 100.0}


def test_caps_share_the_time_left_and_skipped_work_is_recorded(tmp_path, clock, monkeypatch):
  caps = {}

  def worker(name, unit_s, units):
    def fn(sec):
      caps[name] = sec.left()
      for i in range(units):
        if sec.room(f"{name} unit {i}"):
          clock.now += unit_s
          sec.emit(f"{name} unit {i}", i, "")
    return fn

  _fake_sections(monkeypatch, {"scores": worker("scores", 10.0, 100),
                               "masks": worker("masks", 1.0, 2),
                               "precision": worker("precision", 10.0, 100)})
  budget = 200.0
  bench_accel.run(["scores", "masks", "precision"], False, budget, str(tmp_path), start=clock(),
                  watchdog=False)
  usable = bench_accel._CAP_MARGIN * budget
  s, m, p = (bench_accel.SHARES[k] for k in ("scores", "masks", "precision"))
  assert caps["scores"] == pytest.approx(usable * s / (s + m + p))
  # scores ran over its cap by less than one unit; masks' leftover goes to precision
  used_scores = 10.0 * -(-caps["scores"] // 10.0)
  assert caps["masks"] == pytest.approx((usable - used_scores) * m / (m + p))
  assert caps["precision"] == pytest.approx(usable - used_scores - 2.0)
  figs = _figures(tmp_path)
  skipped = [f for f in figs if f["unit"] == "skipped: section cap reached"]
  assert {f["section"] for f in skipped} == {"scores", "precision"}
  assert all(f["value"] is None for f in skipped)
  done = [f for f in figs if f["name"].startswith("precision unit") and f["value"] is not None]
  assert len(done) == -(-int(caps["precision"]) // 10)


def test_failing_section_is_recorded_and_the_next_one_runs(tmp_path, clock, monkeypatch):
  def boom(sec):
    sec.emit("before", 1, "")
    raise RuntimeError("kernel crashed")

  _fake_sections(monkeypatch, {"scores": boom, "masks": lambda sec: sec.emit("after", 2, "")})
  bench_accel.run(["scores", "masks"], False, 50.0, str(tmp_path), start=clock(), watchdog=False)
  figs = [(f["section"], f["name"], f["value"], f["unit"]) for f in _figures(tmp_path)]
  assert ("scores", "before", 1, "") in figs
  assert ("scores", "scores", None, "failed: RuntimeError: kernel crashed") in figs
  assert ("masks", "after", 2, "") in figs


def test_no_time_left_skips_whole_sections(tmp_path, clock, monkeypatch):
  ran = []
  _fake_sections(monkeypatch, {"scores": lambda sec: ran.append("scores")})
  start = clock()
  clock.now += 500.0  # JAX's import and start-up ate the budget
  bench_accel.run(["scores"], False, 100.0, str(tmp_path), start=start, watchdog=False)
  assert ran == []
  assert [f["unit"] for f in _figures(tmp_path) if f["section"] == "scores"][0] == \
      "skipped: no time left in --budget_s"


def test_fused_section_with_and_without_bench_sweep(tmp_path, clock, monkeypatch):
  monkeypatch.delattr(sys.modules["experiments.bench"], "sweep", raising=False)
  monkeypatch.setitem(sys.modules, "experiments.bench.sweep", None)  # import fails
  bench_accel.run(["fused"], True, 100.0, str(tmp_path / "a"), start=clock(), watchdog=False)
  [fig] = [f for f in _figures(tmp_path / "a") if f["section"] == "fused"
           and f["name"] != "section time"]
  assert fig["unit"] == "skipped: bench_sweep.accel_figures not available"

  monkeypatch.setitem(sys.modules, "experiments.bench.sweep", types.ModuleType("bench_sweep"))
  bench_accel.run(["fused"], True, 100.0, str(tmp_path / "b"), start=clock(), watchdog=False)
  assert _figures(tmp_path / "b")[0]["unit"] == "skipped: bench_sweep.accel_figures not available"

  calls = []

  def accel_figures(quick, budget_s, emit):
    calls.append((quick, budget_s))
    emit("fused loop device busy", 97.0, "%")
    emit("replicas", 123456.0, "examples/s")

  fake = types.ModuleType("bench_sweep")
  fake.accel_figures = accel_figures
  monkeypatch.setitem(sys.modules, "experiments.bench.sweep", fake)
  monkeypatch.setattr(sys.modules["experiments.bench"], "sweep", fake, raising=False)
  bench_accel.run(["fused"], True, 100.0, str(tmp_path / "c"), start=clock(), watchdog=False)
  assert calls == [(True, pytest.approx(bench_accel._CAP_MARGIN * 100.0))]
  figs = [(f["section"], f["name"], f["value"]) for f in _figures(tmp_path / "c")]
  assert figs[:2] == [("fused", "fused loop device busy", 97.0),
                      ("fused", "replicas", 123456.0)]


def test_reruns_append_runs_and_a_foreign_file_is_kept_aside(tmp_path, clock, monkeypatch):
  _fake_sections(monkeypatch, {"masks": lambda sec: sec.emit("m", float("nan"), "ms")})
  (tmp_path / "bench_accel.json").write_text("not json")
  bench_accel.run(["masks"], False, 10.0, str(tmp_path), start=clock(), watchdog=False)
  bench_accel.run(["masks"], False, 10.0, str(tmp_path), start=clock(), watchdog=False)
  doc = json.loads((tmp_path / "bench_accel.json").read_text())
  assert len(doc["runs"]) == 2
  assert doc["runs"][0]["figures"][0]["value"] == "nan"  # strict JSON: no bare NaN
  assert (tmp_path / "bench_accel.json.bad").read_text() == "not json"
  assert (tmp_path / "bench_accel.md").read_text().count("# bench_accel on ") == 2


@pytest.mark.parametrize("sections,budget,match", [
    (["scores", "gpu"], 10.0, "--sections: unknown"),
    ([], 10.0, "--sections is empty"),
    (["scores"], 0.0, "--budget_s"),
    (["scores"], float("nan"), "--budget_s"),
    (["scores"], float("inf"), "--budget_s")])
def test_bad_flags_are_one_error_naming_the_flag(tmp_path, sections, budget, match):
  with pytest.raises(ValueError, match=match):
    bench_accel.run(sections, True, budget, str(tmp_path))
  assert not (tmp_path / "bench_accel.json").exists()


def test_watchdog_cuts_the_run_at_the_budget_and_keeps_what_was_measured(tmp_path):
  script = textwrap.dedent(f"""
      import threading
      from experiments import bench_accel
      def stuck(sec):
        sec.emit("measured before the hang", 42.0, "examples/s")
        threading.Event().wait()  # a compile that never ends
      bench_accel.SECTIONS["scores"] = stuck
      bench_accel.run(["scores", "masks"], True, 1.5, {str(tmp_path)!r},
                      start=bench_accel._clock())
      """)
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == bench_accel.CUT_EXIT_CODE, proc.stderr[-2000:]
  figs = [(f["section"], f["name"], f["value"]) for f in _figures(tmp_path)]
  assert figs == [("scores", "measured before the hang", 42.0), ("scores", "run cut", None)]
  assert "stopped at --budget_s=1.5" in _figures(tmp_path)[-1]["unit"]


# ----------------------------------------------------------------------------------------------
# Smoke runs of the scripts (slow).
# ----------------------------------------------------------------------------------------------


def _run(module: str, *args: str, timeout: int = 900) -> str:
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_bench_accel_quick_writes_every_sections_figures(tmp_path):
  # A generous budget: on a loaded CPU a cap could bind, and the caps are tested above.
  out = _run("experiments.bench_accel", "--quick", "--budget_s=3600", f"--out_dir={tmp_path}")
  assert out.startswith("# bench_accel on cpu (cpu), jax ")
  doc = json.loads((tmp_path / "bench_accel.json").read_text())
  [run] = doc["runs"]
  assert run["device"] == "cpu (cpu)" and run["flags"]["sections"] == list(bench_accel.PRIORITY)
  figs = run["figures"]
  by = lambda section: {f["name"]: f for f in figs if f["section"] == section}
  assert not [f for f in figs if str(f["unit"]).startswith(("failed", "skipped: section cap",
                                                            "skipped: no time"))], figs
  assert sum(f["name"] == "section time" for f in figs) == len(bench_accel.PRIORITY)
  md = (tmp_path / "bench_accel.md").read_text()
  assert md.count("\n| ") == len(figs) + 2  # the table's two header rows, one row per figure

  scores = by("scores")
  for model in ("mlp", "cnn"):
    assert scores[f"{model} max |GraNd / vmap(grad) - 1|"]["value"] < 1e-5
    assert scores[f"{model} GraNd / train step throughput"]["value"] > 0
    assert 0 < scores[f"{model} GraNd / train step peak memory"]["value"] < 10
    assert scores[f"{model} goal (>= 0.85x throughput, <= 1.0x memory)"]["value"] in (
        "met", "not met")
  assert not any("jacrev" in name for name in scores)  # left out: the slowest baseline

  masks = by("masks")
  assert masks["ResNet-18 x0.25 same mask as argsort"]["value"] is True  # radix select == sort
  assert masks["ResNet-18 x0.25 pruned exactly the target (744,926)"]["value"] is True
  assert masks["masked train step: pruned weights stay zero"]["value"] is True
  assert all(f["value"] < 1e-4 for n, f in masks.items() if "max |compact" in n)

  fused = by("fused")
  assert len(fused) >= 2  # its figures, or the note that bench_sweep is not there yet

  precision = by("precision")
  for dtype in ("float32", "bfloat16"):
    assert precision[f"resnet18 train step {dtype}"]["value"] > 0
    shares = [f["value"] for n, f in precision.items()
              if n.startswith(f"resnet18 {dtype} step: ") and "share" in n]
    assert sum(shares) == pytest.approx(100.0, abs=0.1)
    assert precision[f"resnet18 {dtype} step: estimated time"]["value"] > 0
    assert precision[f"resnet18 {dtype} step: XLA cost analysis flops"]["value"] > 0
    assert any(n.startswith(f"resnet18 {dtype} step: convolution share") for n in precision)
    assert any(n.startswith(f"resnet18 {dtype} step: optimizer update share") for n in precision)
  assert precision["resnet18 bfloat16 / float32 speed-up, estimated from the profile"]["value"] > 0
  assert precision["gpt grand bfloat16 / float32 throughput"]["value"] > 0

  inp = by("input")
  assert inp["loader + device put + augmentation (crop, flip, normalize)"]["value"] > 0
  assert inp["loader with augmentation / slowest-model train step"]["value"] > 0

  loop = by("loop")
  busy = next(f["value"] for n, f in loop.items() if n.endswith("device busy"))
  # step time alone x steps over loop time: near or, with timing noise on a busy CPU, above 100%
  assert busy > 0
  assert by("total")["wall time from process start"]["value"] > 0


@pytest.mark.slow
def test_bench_input_quick_prints_every_figure(tmp_path):
  out = _run("experiments.bench_input", "--quick", f"--tmpdir={tmp_path}")
  rate = r"([\d,]+)"
  mem = re.search(rf"in memory: +host +{rate} +with device augmentation +{rate} "
                  r"+\(([\d.]+)x before\)", out)
  disk = re.search(rf"array_record on disk: +host +{rate} +with device augmentation +{rate}", out)
  assert mem and disk, out
  assert all(int(g.replace(",", "")) > 0 for g in mem.groups()[:2] + disk.groups()), out
  assert len(re.findall(r"train step .* pipeline / step +[\d.]+x", out)) == 2, out
  stream = re.search(r"streaming ([\d.]+) GB from disk \(([\d,]+) examples\): [\d,]+ examples/s, "
                     r"peak RSS growth (-?\d+) MB", out)
  assert stream and float(stream.group(1)) >= 0.01, out
  assembly = re.search(r"batch assembly: ([\d.]+) ms at 20,000 ids, ([\d.]+) ms at 200,000 ids",
                       out)
  assert assembly and float(assembly.group(1)) > 0, out
  assert (tmp_path / "cifar.array_record").exists()  # a given --tmpdir is kept
