"""The test harness's own helpers (tests/conftest.py): the Python with forced devices that serves
the multi-device snippets gives each snippet a fresh ``__main__``, reports a failing snippet with
its traceback, and a snippet that ends its process or outlives its timeout with a clear error,
after which the next snippet gets a new process."""

from __future__ import annotations

import pytest

from conftest import run_on_devices


def test_device_snippets_are_isolated_failures_are_reported_and_a_dead_python_is_replaced():
  first = run_on_devices("""
    import json, os, jax
    seen = 41
    print("noise before the answer")
    print(json.dumps({"devices": jax.device_count(), "pid": os.getpid()}))""")
  assert first["devices"] == 8
  second = run_on_devices("""
    import json, os
    print(json.dumps({"seen": "seen" in globals(), "pid": os.getpid()}))""")
  assert second == {"seen": False, "pid": first["pid"]}  # the same Python, a fresh __main__
  with pytest.raises(AssertionError, match=r"the snippet failed:[\s\S]*ZeroDivisionError"):
    run_on_devices("1 / 0")
  with pytest.raises(AssertionError, match=r"the 8-device Python died \(3\)"):
    run_on_devices("import os; os._exit(3)")
  with pytest.raises(AssertionError, match=r"the 8-device Python timed out"):
    run_on_devices("import time; time.sleep(120)", timeout=2)  # 60x the limit: not a race
  third = run_on_devices("""
    import json, os, jax
    print(json.dumps({"devices": jax.device_count(), "pid": os.getpid()}))""")
  assert third["devices"] == 8 and third["pid"] != first["pid"]
