"""Shared test helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

# Share compiled XLA programs between test processes (xdist workers, subprocesses): the same model
# inits and steps are compiled in many tests, and a compile can take 10+ s on a small CPU.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "prunejax-test-jax-cache"))


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
