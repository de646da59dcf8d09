"""Shared test helpers."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap

import pytest

# Share compiled XLA programs between test processes (xdist workers, subprocesses): the same model
# inits and steps are compiled in many tests, and a compile can take 10+ s on a small CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "prunejax-test-jax-cache"))
# Only programs that took over 1 s to compile (JAX's default), and no size bound: caching every
# program (minimum 0 s, with an LRU bound) made the whole suite 3x slower on the quiet 2-core
# machine (1,972 s against 652 s): every small op-by-op compile became a locked write to a folder
# of 16k files that the bound scans, shared by both workers and every subprocess.


def run_on_devices(code: str, num_devices: int = 8, timeout: int = 600) -> dict:
  """Runs ``code`` in a fresh Python with ``num_devices`` forced CPU devices.

  The code must print one JSON object as its last line of stdout; that object is returned.
  XLA_FLAGS must be set before jax is imported, hence the subprocess.
  """
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                        text=True, timeout=timeout)
  if proc.returncode != 0:
    raise AssertionError(f"subprocess failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def on_devices():
  return run_on_devices


def once_per_run(tmp_path_factory: pytest.TempPathFactory, name: str, make) -> tuple:
  """``make(dir) -> JSON value`` once per test run, shared by every xdist worker.

  Several tests only read the outputs of one expensive run (a quick job's workdir, its console);
  the first test to ask runs it under a file lock, the others (in any worker) wait for it and read
  the same directory. A run that raises is retried by the next test that asks (which then fails the
  same way). Returns ``(dir, value)``.
  """
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the workers' base folders share this parent, one per test run
  out = root / f"shared-{name}"
  done = root / f"shared-{name}.json"
  with open(root / f"shared-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not done.exists():
      shutil.rmtree(out, ignore_errors=True)
      out.mkdir()
      value = make(out)
      done.write_text(json.dumps(value))
  return out, json.loads(done.read_text())


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="session")
def main_job_cli(tmp_path_factory) -> dict:
  """The main job's command line (``experiments.run``, digits quick) run once per test run.

  Returns ``{"workdir", "returncode", "stdout", "stderr"}``; the tests that read its console, its
  files and its rows share it instead of running the job each.
  """
  def make(d):
    workdir = str(d / "w")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-m", "experiments.run",
                           "--config=experiments/configs/digits.py:quick", f"--workdir={workdir}"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    return {"workdir": workdir, "returncode": proc.returncode, "stdout": proc.stdout,
            "stderr": proc.stderr}
  return once_per_run(tmp_path_factory, "main_job_cli", make)[1]
