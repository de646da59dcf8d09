"""Files that are written atomically with the umask's permissions, fail in one line, are read back
validated (npz, scores, unit records, orbax checkpoints, the tokenizer cache), carry fingerprints,
and a workdir lock that is exclusive and goes with its process."""

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest

from experiments import common
from experiments.configs import fields
from prunejax import fileio, workdir_lock
from prunejax.checkpoint import RoundCheckpoints, RunCheckpoint, Units, WorkdirLock
from prunejax.errors import ConfigError, DataError, FileError, WorkdirBusyError
from prunejax.scores import load_scores, save_scores

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


# ----------------------------------------------------------------------------------------------
# Atomic writes: permissions and write failures.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_new_files_honour_the_umask(tmp_path, umask):
  old = os.umask(umask)
  try:
    fileio.atomic_write_json(str(tmp_path / "a.json"), {"x": 1})
    fileio.atomic_savez(str(tmp_path / "b.npz"), x=np.arange(3))
    WorkdirLock(str(tmp_path / "w")).acquire().release()
  finally:
    os.umask(old)
  for name in ("a.json", "b.npz", "w/.lock"):
    assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("err,advice", [(errno.ENOSPC, "free space"),
                                        (errno.EROFS, "read-only"),
                                        (errno.EACCES, "no permission")])
def test_a_failed_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch, err, advice):
  path = tmp_path / "results.json"
  fileio.atomic_write_json(str(path), {"old": 1})

  def fail(fd):
    raise OSError(err, os.strerror(err))

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(FileError) as e:
    fileio.atomic_write_json(str(path), {"new": 2})
  msg = str(e.value)
  assert "\n" not in msg and str(path) in msg and os.strerror(err) in msg and advice in msg
  monkeypatch.undo()
  assert json.loads(path.read_text()) == {"old": 1}
  assert os.listdir(tmp_path) == ["results.json"]  # no temporary file left behind


def test_a_path_under_a_file_is_one_line(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(FileError, match=r"cannot create the directory .*/f/sub: Not a directory; a "
                     "parent of it is a file"):
    fileio.atomic_write_json(str(tmp_path / "f" / "sub" / "a.json"), {})


def test_orbax_disk_full_is_one_line(tmp_path, monkeypatch):
  ck = RoundCheckpoints(str(tmp_path), "imp_r0", fingerprint="A")

  def full(*a, **k):
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "a/0" in OCDBT database at local file '
                     '"/x/": Failed to write 56819 bytes to file 12: No space left on device '
                     "[os_error_code='28']")

  monkeypatch.setattr(ck.manager, "save", full)
  with pytest.raises(FileError) as e:
    ck.save(0, {"a": np.ones(3)})
  assert str(e.value) == (f"cannot write the checkpoint {ck.dir}: No space left on device; free "
                          "space (or use another workdir), then rerun to resume")
  ck.close()


# ----------------------------------------------------------------------------------------------
# Validated reads.
# ----------------------------------------------------------------------------------------------


def test_npz_reads_detect_truncation_bit_flips_and_another_runs_meta(tmp_path):
  x = np.arange(2000, dtype=np.float64)
  p = str(tmp_path / "s.npz")
  digest = fileio.atomic_savez(p, meta={"fingerprint": "abc", "seed": 0}, x=x)
  assert fileio.npz_digest(p) == digest
  arrays, meta = fileio.load_npz(p, meta={"fingerprint": "abc"})
  np.testing.assert_array_equal(arrays["x"], x)
  assert meta == {"fingerprint": "abc", "seed": 0}
  with pytest.raises(FileError, match=r"made by another run \(fingerprint differ"):
    fileio.load_npz(p, meta={"fingerprint": "xyz"})
  raw = open(p, "rb").read()
  flipped = bytearray(raw)
  flipped[raw.index(x[1000:1002].tobytes()) + 3] ^= 0x10  # one bit of one value
  for name, content in (("flipped.npz", bytes(flipped)), ("cut.npz", raw[: len(raw) // 2]),
                        ("empty.npz", b"")):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FileError, match="is damaged") as e:
      fileio.load_npz(str(tmp_path / name))
    assert "\n" not in str(e.value)
  with pytest.raises(FileError, match="does not exist"):
    fileio.load_npz(str(tmp_path / "missing.npz"))


def test_load_scores_validates_like_save_scores_and_checks_meta(tmp_path):
  p = str(tmp_path / "el2n.npz")
  save_scores(p, np.array([3, 1, 2]), meta={"dataset": "digits", "seed": 0},
              el2n=np.array([0.1, 0.2, 0.3]))
  ids, got = load_scores(p, meta={"dataset": "digits", "seed": 0})
  assert ids.tolist() == [3, 1, 2] and got["el2n"].tolist() == [0.1, 0.2, 0.3]
  with pytest.raises(FileError, match="seed differ"):
    load_scores(p, meta={"dataset": "digits", "seed": 1})
  bad = {"short.npz": dict(ids=np.array([0, 1, 2]), el2n=np.array([0.1, 0.2])),
         "dup.npz": dict(ids=np.array([0, 1, 1]), el2n=np.array([0.1, 0.2, 0.3])),
         "float_ids.npz": dict(ids=np.array([0.0, 1.0]), el2n=np.array([0.1, 0.2])),
         "no_ids.npz": dict(el2n=np.array([0.1, 0.2])),
         "no_scores.npz": dict(ids=np.array([0, 1]))}
  match = {"short.npz": r"expected first dimension 3", "dup.npz": r"unique; repeated: \[1\]",
           "float_ids.npz": "1-D integer", "no_ids.npz": "no 'ids' array",
           "no_scores.npz": "at least one score"}
  for name, arrays in bad.items():
    np.savez(tmp_path / name, **arrays)
    with pytest.raises(DataError, match=match[name]):
      load_scores(str(tmp_path / name))
    if "ids" in arrays:
      with pytest.raises(DataError, match=match[name]):
        save_scores(str(tmp_path / "out.npz"), **arrays)


def _record(tmp_path, key):
  return json.loads((tmp_path / "units" / f"{key}.json").read_text())


def test_units_recompute_damaged_foreign_or_incomplete_work(tmp_path):
  calls = []
  subset = tmp_path / "subsets" / "random_keep0.5_r0.npz"

  def fn():
    calls.append(1)
    common.save_npz(str(subset), ids=np.arange(5))  # recorded with the unit
    return {"test_accuracy": 0.5}

  def run(fingerprint="run-A"):
    assert Units(str(tmp_path), fingerprint).run("k", fn) == {"test_accuracy": 0.5}
    return len(calls)

  assert run() == 1 and run() == 1  # finished: read back
  assert fileio.read_meta(str(subset)) == {"fingerprint": "run-A"}
  assert _record(tmp_path, "k")["files"] == {"subsets/random_keep0.5_r0.npz":
                                             fileio.npz_digest(str(subset))}
  subset.write_bytes(subset.read_bytes()[:100])  # a truncated output file
  assert run() == 2
  fileio.load_npz(str(subset))  # rewritten
  subset.unlink()  # a deleted output file
  assert run() == 3 and subset.exists()
  assert run("run-B") == 4  # another config, dataset or code version
  assert run("run-B") == 4
  unit = tmp_path / "units" / "k.json"
  unit.write_text("{}")  # parses, but is no record
  assert run("run-B") == 5 and (tmp_path / "units" / "k.json.corrupt").exists()
  # A flipped digit in the result: valid JSON, fails its checksum.
  unit.write_text(unit.read_text().replace('"test_accuracy": 0.5', '"test_accuracy": 0.7'))
  assert run("run-B") == 6
  unit.write_text(unit.read_text()[:40])  # truncated
  assert run("run-B") == 7
  # An older prunejax's record (the bare result) is recomputed, not trusted.
  unit.write_text(json.dumps({"test_accuracy": 0.9}))
  assert run("run-B") == 8


def test_round_checkpoints_of_another_run_or_damaged_are_not_restored(tmp_path):
  rng = np.random.default_rng(0)
  tree = {"w": rng.random((64, 64)).astype(np.float32), "b": np.ones(3, np.float32)}
  ck = RoundCheckpoints(str(tmp_path), "imp_r0", fingerprint="A")
  ck.save(0, tree)
  ck.save(1, {"w": tree["w"] * 2, "b": tree["b"]})
  ck.save(2, {"w": tree["w"] * 3, "b": tree["b"]})
  ck.close()
  # One bit flipped in round 2's biggest data file: orbax restores wrong numbers without a word;
  # the digest saved with the round catches it and the run falls back to round 1.
  data = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(ck.dir, "2")) for f in fs
          if f"{os.sep}d{os.sep}" in os.path.join(r, f)]
  biggest = max(data, key=os.path.getsize)
  raw = bytearray(open(biggest, "rb").read())
  raw[len(raw) // 2] ^= 0x01
  open(biggest, "wb").write(raw)
  ck = RoundCheckpoints(str(tmp_path), "imp_r0", fingerprint="A")
  rnd, got = ck.restore_latest(tree)
  assert rnd == 1 and np.array_equal(got["w"], tree["w"] * 2)
  assert any(d.startswith("2.corrupt") for d in os.listdir(ck.dir))
  ck.close()
  # Rounds written by another run are never restored.
  ck = RoundCheckpoints(str(tmp_path), "imp_r0", fingerprint="B")
  assert ck.restore_latest(tree) == (None, None)
  ck.close()


def test_run_checkpoint_of_another_run_is_not_resumed(tmp_path):
  tree = {"w": np.arange(4.0)}
  a = RunCheckpoint(str(tmp_path / "dense_r0"), fingerprint="A")
  a.save(tree, {"epoch": 1})
  a.close()
  b = RunCheckpoint(str(tmp_path / "dense_r0"), fingerprint="B")
  assert b.meta() is None and b.restore(tree) is None
  b.close()
  a = RunCheckpoint(str(tmp_path / "dense_r0"), fingerprint="A")
  assert a.meta() == {"epoch": 1}
  got, meta = a.restore(tree)
  assert np.array_equal(got["w"], tree["w"]) and meta == {"epoch": 1}
  a.close()


def test_damaged_tokenizer_cache_is_retrained_and_rewritten(tmp_path):
  from prunejax.data import text
  texts = [f"the film {w} was {v} and {w} {v}" for w in ("plot", "cast", "score", "pace")
           for v in ("good", "bad", "long", "short", "fine")] * 4
  cache = tmp_path / "cache"
  ref = text.train_bpe(texts, 300, name="t", cache_dir=str(cache))
  expected = ref.encode_batch(texts[:5])
  (path,) = [p for p in cache.iterdir() if p.suffix == ".json"]
  good = path.read_text()
  for damage in (good[: len(good) // 2], good.replace('"the', '"thx', 1), ""):
    path.write_text(damage)
    tok = text.train_bpe(texts, 300, name="t", cache_dir=str(cache))
    assert tok.encode_batch(texts[:5]) == expected
    assert path.read_text() == good  # rewritten
  # A cache directory that cannot be created (it is a file) costs a retraining, nothing else.
  (tmp_path / "file").write_text("x")
  tok = text.train_bpe(texts, 300, name="t", cache_dir=str(tmp_path / "file"))
  assert tok.encode_batch(texts[:5]) == expected


# ----------------------------------------------------------------------------------------------
# The workdir lock and the config stamp.
# ----------------------------------------------------------------------------------------------

_HOLD = """
import sys
from prunejax.checkpoint import WorkdirLock
lock = WorkdirLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
"""


def test_workdir_lock_is_exclusive_and_goes_with_its_process(tmp_path):
  w = str(tmp_path / "w")
  a = WorkdirLock(w).acquire()
  with pytest.raises(WorkdirBusyError, match=f"in use by process {os.getpid()} on "):
    WorkdirLock(w).acquire()
  a.release()
  WorkdirLock(w).acquire().release()
  proc = subprocess.Popen([sys.executable, "-c", _HOLD, w], cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT})
  try:
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(WorkdirBusyError, match=f"in use by process {proc.pid} "):
      WorkdirLock(w).acquire()
  finally:
    proc.send_signal(signal.SIGKILL)  # a crashed run: the kernel drops its lock
    proc.wait()
  WorkdirLock(w).acquire().release()


def test_workdir_lock_without_flock_detects_stale_holders(tmp_path, monkeypatch):
  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, "No locks available")

  monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
  w = str(tmp_path / "w")
  a = WorkdirLock(w).acquire()
  with pytest.raises(WorkdirBusyError, match=f"process {os.getpid()}"):
    WorkdirLock(w).acquire()
  a.release()
  dead = subprocess.Popen(["true"])
  dead.wait()
  with open(os.path.join(w, ".lock.held"), "w") as f:
    json.dump({"pid": dead.pid, "host": socket.gethostname()}, f)
  WorkdirLock(w).acquire().release()  # the holder is gone: the stale lock is removed
  with open(os.path.join(w, ".lock.held"), "w") as f:
    json.dump({"pid": 1, "host": "another-host"}, f)
  with pytest.raises(WorkdirBusyError, match="another-host"):  # cannot tell: refused
    WorkdirLock(w).acquire()


def _cfg(**overrides):
  from test_experiments import _config
  return _config("digits", **overrides)


def test_workdir_refusal_names_the_fields_and_neutral_fields_may_change(tmp_path):
  w = str(tmp_path / "w")
  common.prepare_workdir(w, _cfg(), False).release()
  with pytest.raises(ConfigError) as e:
    common.prepare_workdir(w, _cfg(seed=5, **{"train.epochs": 3}), False)
  msg = str(e.value)
  assert "\n" not in msg and "seed: 0 there, 5 here" in msg
  assert "train.epochs: 2 there, 3 here" in msg and "--overwrite" in msg
  neutral = _cfg(name="renamed", replicates=3, strategies=("dense",),
                 **{"train.eval_batch_size": 64, "train.progress": False,
                    "train.checkpoint_every_steps": 7, "dataset.num_threads": 2,
                    "data_pruning.keep_fractions": (0.3,)})
  assert common.config_fingerprint(neutral) == common.config_fingerprint(_cfg())
  assert common.config_fingerprint(_cfg(seed=5)) != common.config_fingerprint(_cfg())
  common.prepare_workdir(w, neutral, False).release()
  assert json.load(open(os.path.join(w, "config.json")))["config"]["name"] == "renamed"
  # --overwrite starts over even with the same config; the lock file stays.
  os.makedirs(os.path.join(w, "units"))
  open(os.path.join(w, "units", "dense_r0.json"), "w").write("{}")
  common.prepare_workdir(w, neutral, True).release()
  assert sorted(os.listdir(w)) == [".lock", "config.json"]
  # A damaged stamp: rewritten (every unit still checks its own fingerprint).
  open(os.path.join(w, "config.json"), "w").write("{not json")
  common.prepare_workdir(w, _cfg(), False).release()
  assert json.load(open(os.path.join(w, "config.json")))["config"]["name"] == "digits"
  # --overwrite never deletes a directory that holds no prunejax run.
  other = tmp_path / "home"
  other.mkdir()
  (other / "thesis.tex").write_text("...")
  with pytest.raises(ConfigError, match="holds no prunejax run"):
    common.prepare_workdir(str(other), _cfg(), True)
  assert (other / "thesis.tex").exists()
  # A second run on a workdir in use is refused before it touches anything.
  with common.prepare_workdir(w, _cfg(), False):
    before = os.stat(os.path.join(w, "config.json")).st_mtime_ns
    with pytest.raises(WorkdirBusyError, match="in use by process"):
      common.prepare_workdir(w, _cfg(seed=5), True)
    assert os.stat(os.path.join(w, "config.json")).st_mtime_ns == before


def test_reset_optimizer_false_with_rewind_step_0_is_refused():
  with pytest.raises(ConfigError, match=r"imp.reset_optimizer=False does nothing with "
                     r"imp.rewind_step=0"):
    fields.validate(_cfg(**{"imp.reset_optimizer": False}))
  fields.validate(_cfg(**{"imp.reset_optimizer": False, "imp.rewind_step": 2}))


# ----------------------------------------------------------------------------------------------
# The command line: environment and file-system errors in one line.
# ----------------------------------------------------------------------------------------------


def _cli(args, env=None, timeout=300):
  return subprocess.run([sys.executable, "-m", "experiments.run",
                         "--config=experiments/configs/digits.py:quick"] + args, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, **(env or {})})


def _one_error_line(proc):
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1, proc.stderr[-3000:]
  return lines[0]


def test_cli_bad_environment_and_workdir_under_a_file(tmp_path):
  proc = _cli([f"--workdir={tmp_path}/w"], {"PRUNEJAX_NUM_PROCESSES": "two"})
  assert proc.returncode == 2
  assert "PRUNEJAX_NUM_PROCESSES='two' is not an integer" in _one_error_line(proc)
  (tmp_path / "f").write_text("x")
  proc = _cli([f"--workdir={tmp_path}/f/w"])
  assert proc.returncode == 74
  assert f"{tmp_path}/f" in _one_error_line(proc)


def test_cli_read_only_workdir_is_one_line(tmp_path):
  w = tmp_path / "w"
  common.prepare_workdir(str(w), _cfg(), False).release()
  if os.geteuid() == 0:  # root writes through permissions: a read-only mount instead
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(w)],
                      capture_output=True).returncode != 0:
      pytest.skip("needs a read-only directory: not root-mountable here")
    common.prepare_workdir(str(w), _cfg(), False).release()
    subprocess.run(["mount", "-o", "remount,ro", str(w)], check=True)
  else:
    w.chmod(0o555)
  try:
    proc = _cli([f"--workdir={w}"])
  finally:
    if os.geteuid() == 0:
      subprocess.run(["umount", str(w)], check=False)
    else:
      w.chmod(0o755)
  assert proc.returncode == 74, proc.stderr[-2000:]
  line = _one_error_line(proc)
  assert str(w) in line and ("Read-only" in line or "Permission denied" in line)


@pytest.mark.slow
def test_cli_disk_full_is_one_line_and_the_rerun_resumes(tmp_path):
  """A real full disk (a small tmpfs; needs root): orbax's RESOURCE_EXHAUSTED and Errno 28 become
  one line, exit 74; with space freed the same command resumes and finishes."""
  w = tmp_path / "disk"
  w.mkdir()
  if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs",
                                          str(w)], capture_output=True).returncode != 0:
    pytest.skip("needs a small file system: not root-mountable here")
  try:
    args = [f"--workdir={w}/run", "--config.dataset.num_train=64", "--config.train.epochs=1",
            "--config.strategies=('dense',)", "--config.train.checkpoint_every_steps=1"]
    proc = _cli(args)
    assert proc.returncode == 74, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert "No space left on device" in line and f"{w}/run" in line
    subprocess.run(["mount", "-o", "remount,size=64m", str(w)], check=True)
    proc = _cli(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(w / "run" / "results.json"))["rows"][0]["strategy"] == "dense"
  finally:
    subprocess.run(["umount", str(w)], check=False)
