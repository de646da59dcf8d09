"""Real processes on one workdir: runs started together (the same config, or another one with
--overwrite) never mix, crash or hang; SIGTERM and SIGINT stop a run at the next step with one line
and exit codes 143 / 130, and rerunning resumes to the results of an uninterrupted run."""

import json
import os
import subprocess
import sys

import pytest

from experiments import run
from experiments.configs import digits

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
RACES = 5
# A small run that still writes every kind of file: units, mid-run checkpoints at every step
# (orbax), IMP round checkpoints (orbax), masks, the report.
OVERRIDES = {"dataset.num_train": 64, "dataset.num_test": 64, "train.epochs": 1,
             "strategies": ("dense", "imp"), "imp.target_sparsity": 0.5,
             "train.checkpoint_every_steps": 1, "train.progress": False}


def _config(**more):
  cfg = digits.get_config("quick")
  for k, v in {**OVERRIDES, **more}.items():
    node = cfg
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return cfg


def _args(workdir, **more):
  return ["--config=experiments/configs/digits.py:quick", f"--workdir={workdir}"] + [
      f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}"
      for k, v in {**OVERRIDES, **more}.items()]


def _start(args, extra=(), env=None):
  return subprocess.Popen([sys.executable, "-m", "experiments.run"] + args + list(extra),
                          cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, **(env or {})})


def _finish(proc, timeout=300):
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.communicate()
    pytest.fail("a run hung (did not exit within its timeout)")
  assert "Traceback" not in err, err[-4000:]
  return proc.returncode, err


def _rows(workdir):
  rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
  return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def _strip(rows):
  return [{k: v for k, v in r.items() if k != "wall_time"} for r in rows]


def _error_lines(err):
  return [l for l in err.splitlines() if l.startswith(("error:", "interrupted by"))]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  """``ref(seed)``: the results of an uninterrupted run of the race config (in this process)."""
  done = {}

  def get(seed: int):
    if seed not in done:
      done[seed] = _strip(run.run(_config(seed=seed), str(tmp_path_factory.mktemp(f"ref{seed}"))))
    return done[seed]
  return get


def test_runs_started_together_on_one_workdir_never_mix_crash_or_hang(tmp_path, ref):
  assert ref(0) != ref(5)
  outcomes = []
  for race in range(RACES):
    w = tmp_path / f"race{race}"
    # Odd races: the second run is another config that asks to overwrite (the worst case).
    second = dict(seed=5) if race % 2 else {}
    procs = [_start(_args(w)), _start(_args(w, **second), ["--overwrite"] if second else [])]
    results = [_finish(p) for p in procs]
    codes = [c for c, _ in results]
    outcomes.append(codes)
    assert 0 in codes, results
    for code, err in results:
      assert code in (0, 2, 75), err[-3000:]
      if code == 75:  # refused before touching anything: one line naming the holder
        (line,) = _error_lines(err)
        assert "is in use by process" in line
      if code == 2:  # started after the other finished: a different config, refused
        (line,) = _error_lines(err)
        assert "holds a run of a different config" in line and "seed: 5 there, 0 here" in line
    stamp = json.load(open(w / "config.json"))["config"]["seed"]
    assert _rows(w) == ref(stamp), f"race {race}: results mix runs"
    fingerprints = {json.load(open(w / "units" / f))["fingerprint"] for f in os.listdir(w / "units")
                    if f.endswith(".json")}
    assert len(fingerprints) == 1, f"race {race}: units of several runs"
  assert any(75 in c for c in outcomes), f"no race overlapped: {outcomes}"


def test_sigterm_and_sigint_stop_at_the_next_step_and_resume_to_the_same_results(tmp_path, ref):
  """The signals come at known steps (``PRUNEJAX_KILL_AT=step:N:SIGNAME``, sent by the run to
  itself, :func:`prunejax.checkpoint.kill_point`), so where the run stops does not depend on how
  fast the machine is: the dense run has 2 steps, IMP's round 0 follows."""
  from prunejax.checkpoint import KILL_AT_ENV
  w = tmp_path / "w"
  # SIGTERM after the dense run's first step: it stops there and saves that step.
  proc = _start(_args(w), env={KILL_AT_ENV: "step:1:SIGTERM"})
  code, err = _finish(proc)
  assert code == 143, err[-3000:]
  (line,) = _error_lines(err)
  assert line.startswith("interrupted by SIGTERM: ") and "rerun the same command to resume" in line
  assert "saved the training run in progress at step 1;" in line
  assert (w / "checkpoints" / "runs" / "dense_r0").is_dir() and not list(w.glob("units/*.json"))
  # SIGINT (Ctrl-C) in the rerun, while IMP trains round 0: the rerun's step 1 finishes the dense
  # run (resumed at step 1), its step 2 is IMP's first.
  proc = _start(_args(w), env={KILL_AT_ENV: "step:2:SIGINT"})
  code, err = _finish(proc)
  assert code == 130, err[-3000:]
  (line,) = _error_lines(err)
  assert line.startswith("interrupted by SIGINT: ") and "rerun the same command to resume" in line
  assert " at step 1 " in line
  assert (w / "checkpoints" / "imp_r0").is_dir()
  assert [p.name for p in w.glob("units/*.json")] == ["dense_r0.json"]
  code, err = _finish(_start(_args(w)))
  assert code == 0, err[-3000:]
  assert _rows(w) == ref(0)


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, tmp_path, tag, envs=({}, {}), **more):
  addr = f"127.0.0.1:{_free_port()}"
  procs = []
  for i in range(2):
    # Logs to files: a full pipe that nobody reads would stall one process and both with it.
    err = open(tmp_path / f"{tag}.err{i}", "w+")
    procs.append((subprocess.Popen(
        [sys.executable, "-m", "experiments.run"] + _args(workdir, **more) +
        [f"--coordinator_address={addr}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err, text=True,
        env={**os.environ, **envs[i]}), err))
  return procs


def _wait_all(procs, timeout=300):
  out = []
  for p, err in procs:
    try:
      p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q, _ in procs:
        q.kill()
      pytest.fail("a process hung")
    err.seek(0)
    text = err.read()
    assert "Traceback" not in text, text[-3000:]
    out.append((p.returncode, text))
  return out


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  """A preemption notice (SIGTERM) to one process of a multi-process run: JAX's preemption service
  makes both stop after the same step and save it together; two new processes resume.

  Process 1 sends itself the SIGTERM after its second step (``PRUNEJAX_KILL_AT=step:2:SIGTERM``),
  so the notice comes at a known step however fast the machine is."""
  from prunejax.checkpoint import KILL_AT_ENV
  more = {"strategies": ("dense",), "dataset.num_train": 256, "train.epochs": 2}
  w = tmp_path / "w"
  procs = _two_processes(w, tmp_path, "first", envs=({}, {KILL_AT_ENV: "step:2:SIGTERM"}), **more)
  results = _wait_all(procs)
  lines = [_error_lines(text) for _, text in results]
  assert [c for c, _ in results] == [143, 143], results
  assert lines[0] == lines[1] and len(lines[0]) == 1  # the same step on both
  assert "saved the training run in progress at step" in lines[0][0]
  assert all(c == 0 for c, _ in _wait_all(_two_processes(w, tmp_path, "resume", **more)))
  single = _strip(run.run(_config(**more), str(tmp_path / "single")))
  got = _rows(w)
  assert len(got) == len(single) == 1
  for a, b in zip(got[0]["history"], single[0]["history"]):  # two processes = one, to float rounding
    assert a["epoch"] == b["epoch"] and abs(a["loss"] - b["loss"]) < 1e-4
    assert abs(a["accuracy"] - b["accuracy"]) < 1e-4
