"""Two CPU processes (gloo collectives) x 2 devices compute the same scores, kept ids and masks as one
process on one device; and an experiment runs, writes and resumes with two processes."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
WORKER = os.path.join(os.path.dirname(__file__), "mp_worker.py")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(cmds, timeout=300):
  procs = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for c in cmds]
  outs = [p.communicate(timeout=timeout) for p in procs]
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, e[-3000:]
  return outs


def test_two_processes_match_one(tmp_path):
  single = tmp_path / "single.json"
  _launch([[sys.executable, WORKER, "none", "1", "0", "1", str(single)]])
  addr = f"127.0.0.1:{_free_port()}"
  outs = [tmp_path / f"p{i}.json" for i in range(2)]
  _launch([[sys.executable, WORKER, addr, "2", str(i), "2", str(outs[i])] for i in range(2)])
  ref = json.loads(single.read_text())
  assert ref["num_devices"] == 1
  for path in outs:
    got = json.loads(path.read_text())
    assert got["num_devices"] == 4
    for k in ("el2n_init", "grand_init", "el2n_trained", "losses"):
      np.testing.assert_allclose(got[k], ref[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert got["kept_init"] == ref["kept_init"]
    assert got["mask_init"] == ref["mask_init"]


def test_experiment_runs_and_resumes_on_two_processes(tmp_path):
  workdir = tmp_path / "w"
  base = [sys.executable, "-m", "experiments.run",
          "--config=experiments/configs/imp.py:quick", f"--workdir={workdir}",
          "--config.dataset.num_train=128", "--config.train.epochs=1",
          "--config.strategies=('imp',)"]
  env_flags = lambda i, addr: [f"--coordinator_address={addr}", "--num_processes=2",
                               f"--process_id={i}"]
  stamps = []
  for attempt in range(2):  # the second launch resumes: every unit is read back, none redone
    addr = f"127.0.0.1:{_free_port()}"
    _launch([base + env_flags(i, addr) for i in range(2)])
    stamps.append({f: os.stat(workdir / "units" / f).st_mtime_ns
                   for f in os.listdir(workdir / "units")})
  assert stamps[0] == stamps[1]
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert [r["round"] for r in rows] == [0, 1, 2]
  assert sorted(stamps[0]) == [f"imp_round{k}_r0.json" for k in range(3)]
