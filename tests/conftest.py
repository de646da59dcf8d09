"""Shared test helpers."""

from __future__ import annotations

import atexit
import fcntl
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

# Bytecode caches (__pycache__, ignored by git) for the project's modules, even where
# PYTHONDONTWRITEBYTECODE is set (as on this project's machines): without them each xdist worker
# and each of the ~50 Pythons the tests start compiles the same modules from source again, and
# pytest rewrites every test module's asserts again (collection 3.6 s -> 1.6 s per worker). Python
# and pytest write them atomically; a folder that cannot be written is skipped. Set here, before
# the workers and any subprocess start, so they all inherit it.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False

# Compile the tests' programs fast rather than well: three quarters of the suite's time was XLA
# compiling small programs that then run for milliseconds. Level 0 skips LLVM's optimizations, and
# the older elemental emitters (instead of the MLIR fusion emitters) lower fusions with less work:
# together they compile a CNN, ResNet-20 and MLP gradient and per-example gradient 4.6x faster
# (10.1 s -> 2.2 s here); emitting each program as one LLVM module instead of splitting it into 32
# for parallel code generation (which this 2-core machine cannot use) saves another 13-20% on a
# ResNet-20, GPT or CNN train step. The HLO passes (fusion, simplification) still run, so what is
# computed is the same program; only the machine code is less tuned. Set before jax is imported
# (the test modules import it at collection); subprocesses inherit it.
# PRUNEJAX_TEST_XLA_DEFAULTS=1 runs the suite with XLA's defaults instead, as the experiments
# compile (slower; the same tests must pass).
_TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                   "--xla_cpu_parallel_codegen_split_count=1")
if (os.environ.get("PRUNEJAX_TEST_XLA_DEFAULTS", "0") in ("", "0")
    and _TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", "")):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_TEST_XLA_FLAGS}".strip()
# Whether this run compiles with those flags: a bitwise equality of two different programs (a
# constant folded in against the same value read at run time) holds under XLA's defaults but may be
# 1 ulp off under them (another instruction selection, no FMA contraction).
FAST_COMPILE = _TEST_XLA_FLAGS in os.environ.get("XLA_FLAGS", "")


def _run_root(tmp_path_factory: pytest.TempPathFactory):
  """This test run's temporary folder, the same in every xdist worker (each worker's base folder is
  a child of it)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
  """Share compiled XLA programs within one test run: every program, in one cache folder under the
  run's temporary root (shared by the xdist workers and every subprocess they start; pytest removes
  old runs' folders, so each run starts cold, as on a fresh clone).

  Subprocess tests (kills, signals, resumes, concurrent runs, the CLI) start Python after Python on
  the same quick configs, and each compiled every program again: 95 s -> 68 s for those tests here.
  Every program, not only those over JAX's 1 s default (at optimization level 0 almost none is):
  without a size bound a write is one file (an LRU bound made every write scan and lock the folder,
  which once made the suite 3x slower). A folder given in JAX_COMPILATION_CACHE_DIR is kept.
  """
  if "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(_run_root(config._tmp_path_factory) / "jax-cache")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  if "jax" in sys.modules:  # imported by a plugin: its config read the environment already
    import jax
    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs",
                      float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))


def pytest_collection_finish(session):
  """Python's cyclic garbage collector, tuned for a process that holds JAX's caches: a worker ends
  the suite with about a million live objects (traced programs, lowered modules, compiled-program
  handles), and each full collection walks all of them (0.3 s each, about 5% of a worker's time).
  What is alive after collection (modules, test functions) is frozen out of every later
  collection, and collections run a tenth as often (a young generation of 7,000 objects instead of
  700): the garbage collector's share of the workers' time drops from 5.2% to 1.7% (measured with
  ``gc.callbacks`` on four test files), with the same peak memory."""
  gc.collect()
  gc.freeze()
  gc.set_threshold(7000, 10, 10)


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


# One Python per xdist worker with the forced devices runs every snippet in turn (a fresh
# ``__main__`` module each, as ``python -c`` would): each of ten snippets used to start its own
# interpreter and import jax, flax and prunejax again (2 s each), and compile again what another
# had.
_SERVER = r"""
import contextlib, gc, io, json, os, sys, traceback, types
gc.set_threshold(7000, 10, 10)  # as in the test workers (pytest_collection_finish)
reply_to = sys.stdout
main = sys.modules["__main__"]
for line in sys.stdin:
  module = types.ModuleType("__main__")
  sys.modules["__main__"] = module
  out = io.StringIO()
  try:
    with contextlib.redirect_stdout(out):
      exec(compile(json.loads(line), "<run_on_devices>", "exec"), module.__dict__)
    reply = {"ok": True, "stdout": out.getvalue()}
  except BaseException:
    reply = {"ok": False, "stdout": out.getvalue(), "error": traceback.format_exc()}
  finally:
    sys.modules["__main__"] = main
  reply_to.write(json.dumps(reply) + "\n")
  reply_to.flush()
# End of input: every reply is written. Exit without JAX's exit-time clean-up (it clears every
# compiled program, seconds after a worker's share of the suite) and the interpreter's teardown.
sys.stderr.flush()
os._exit(0)
"""
_SERVERS: dict = {}


def _device_server(num_devices: int):
  """This process's Python with ``num_devices`` forced CPU devices (started on first use, and again
  if it died), and the file its stderr goes to."""
  proc, log = _SERVERS.get(num_devices, (None, None))
  if proc is None or proc.poll() is not None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (f"{env.get('XLA_FLAGS', '')} "
                        f"--xla_force_host_platform_device_count={num_devices}")
    env["JAX_PLATFORMS"] = "cpu"
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen([sys.executable, "-c", _SERVER], env=env, cwd=ROOT, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
    _SERVERS[num_devices] = (proc, log)
  return proc, log


def pytest_unconfigure(config):
  """Ends this worker's device Pythons (end of input, then a kill if one does not exit), so the
  worker exits at once; an xdist worker then exits without JAX's exit-time clean-up."""
  for proc, log in _SERVERS.values():
    proc.stdin.close()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()
  _SERVERS.clear()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    atexit.register(_exit_now)


def _exit_now():
  """A worker's last act, once it has reported everything to the controller: JAX's exit-time
  clean-up (registered at import, so run after this) clears every compiled program the worker holds
  (6 s at the end of the suite, which the controller waits for), then the interpreter tears down
  every object; neither matters to a process about to end."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(0)


def run_on_devices(code: str, num_devices: int = 8, timeout: int = 600) -> dict:
  """Runs ``code`` in a Python with ``num_devices`` forced CPU devices (XLA_FLAGS must be set
  before jax is imported, hence another process; one per xdist worker serves every call).

  The code must print one JSON object as its last line of stdout; that object is returned.
  """
  proc, log = _device_server(num_devices)
  got = []
  reader = threading.Thread(target=lambda: got.append(proc.stdout.readline()), daemon=True)
  proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
  proc.stdin.flush()
  reader.start()
  reader.join(timeout)
  if not got or not got[0]:
    timed_out = not got
    proc.kill()
    proc.wait()
    log.seek(0)
    what = "timed out" if timed_out else f"died ({proc.returncode})"
    raise AssertionError(f"the {num_devices}-device Python {what}:\n{log.read()[-4000:]}")
  reply = json.loads(got[0])
  if not reply["ok"]:
    raise AssertionError(f"the snippet failed:\n{reply['error'][-4000:]}")
  return json.loads(reply["stdout"].strip().splitlines()[-1])


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
  root = _run_root(tmp_path_factory)
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
