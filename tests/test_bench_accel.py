"""Smoke test of the one-shot accelerator script (experiments/bench_accel.py) and the input benchmark
(experiments/bench_input.py): ``--quick`` runs every section on this CPU, no section fails, and the
figures each section prints are there and are numbers in their ranges."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def _run(module: str, *args: str, timeout: int = 900) -> str:
  proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                        timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def _section(out: str, name: str) -> str:
  match = re.search(rf"^## {name}\n(.*?)^\({name}: \d+ s\)", out, re.S | re.M)
  assert match, f"no section {name!r} in:\n{out[-3000:]}"
  assert "FAILED" not in match.group(1), match.group(1)
  return match.group(1)


def test_bench_accel_quick_runs_every_section():
  out = _run("experiments.bench_accel", "--quick")
  assert re.match(r"# bench_accel on .+ \(cpu\), jax \S+, \d{4}-\d\d-\d\d", out)
  loop = _section(out, "loop")
  busy = re.search(r"\| (\d+)% \| ([\d,]+) \|", loop)
  # step time alone x steps over loop time: near or, with timing noise on a busy CPU, above 100%
  assert busy and 0 < int(busy.group(1)) and int(busy.group(2).replace(",", "")) > 0, loop
  inp = _section(out, "input")
  assert re.search(r"loader \+ device put \+ augmentation .*\| [\d,]+ \|", inp), inp
  assert re.search(r"slowest-model train step: [\d.]+x", inp), inp
  precision = _section(out, "precision")
  for dtype in ("float32", "bfloat16"):
    assert dtype in precision, precision
  scores = _section(out, "scores")
  for model in ("mlp", "plain_resnet"):
    note = re.search(rf"^{model}: GraNd [\d.]+x vmap\(grad\); max \|GraNd / vmap\(grad\) - 1\| = "
                     r"([\d.e+-]+)$", scores, re.M)
    assert note and float(note.group(1)) < 1e-5, scores
  assert "jacrev" not in scores  # left out on purpose: the slowest baseline, already recorded
  masks = _section(out, "masks")
  assert re.search(r"ResNet-18 x0.25 .* True ", masks), masks  # radix select == argsort reference
  assert re.search(r"^total \d+ s$", out, re.M)


def test_bench_input_quick_prints_every_figure(tmp_path):
  out = _run("experiments.bench_input", "--quick", f"--tmpdir={tmp_path}")
  rate = r"([\d,]+)"
  mem = re.search(rf"in memory: +host +{rate} +with device augmentation +{rate} +\(([\d.]+)x before\)",
                  out)
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
