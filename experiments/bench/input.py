"""Input-pipeline benchmark: can the loader feed the accelerator?

    python -m experiments.bench_input              # the figures of BUILD_NOTES (about 4 minutes)
    python -m experiments.bench_input --quick      # a smoke run in seconds (the tests run it)

Prints, for CIFAR-shaped uint8 data (32x32x3, batch 256):
1. examples/s of the host pipeline (prunejax.data.batches) from an in-memory source and from an
   on-disk array_record source, and of the whole input path with the on-device crop + flip +
   normalization (batch put on the device, then the jitted augmentation), next to the pipeline this
   project had before (host NumPy augmentation with one random stream per example, an argsort of
   all ids per batch), run in the same process as the baseline;
2. the train-step examples/s of the paper configs' models (ResNet-18 of datadiet_cifar10, ResNet-20
   of openlth) measured in the same process, so the ratio says whether the pipeline keeps up;
3. the peak RSS growth while streaming one epoch of an on-disk dataset of ``--disk_gb`` GB;
4. the time to assemble a batch at 50k and at 1.28M ids (1-byte rows: assembly alone).
"""

from __future__ import annotations

import os
import tempfile
import threading
import time

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
BATCH = 256


# ----------------------------------------------------------------------------------------------
# The pipeline before this data layer, for the baseline (host augmentation, per-batch argsort).
# ----------------------------------------------------------------------------------------------


def _old_positions(all_ids, ids):
  order = np.argsort(all_ids, kind="stable")
  return order[np.searchsorted(all_ids[order], ids)]


def _old_augment(x_BxHxWxC, ids_B, seed, epoch, pad=4):
  out = x_BxHxWxC.copy()
  b, h, w, _ = x_BxHxWxC.shape
  for i, ex_id in enumerate(ids_B):
    rng = np.random.default_rng([seed, epoch, int(ex_id), 0xA06])
    padded = np.pad(x_BxHxWxC[i:i + 1], ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, 1))
    out[i] = padded[0, dy[0]:dy[0] + h, dx[0]:dx[0] + w]
    if rng.random(1)[0] < 0.5:
      out[i] = out[i, :, ::-1]
  return out


def _old_batches(x, y, all_ids, *, augment, seed=0, epoch=0):
  order = all_ids[np.random.default_rng([seed, epoch, 0x5EED]).permutation(len(all_ids))]
  for start in range(0, len(order), BATCH):
    chunk = order[start:start + BATCH]
    pos = _old_positions(all_ids, chunk)
    xb = np.zeros((BATCH,) + x.shape[1:], np.float32)
    xb[:len(chunk)] = x[pos] / 255.0
    if augment:
      xb = _old_augment(xb, chunk, seed, epoch)
    yield {"x": xb, "y": y[pos], "id": chunk}


# ----------------------------------------------------------------------------------------------
# Measurements.
# ----------------------------------------------------------------------------------------------


def _median_rate(fn, n_examples: int, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return n_examples / float(np.median(times))


def _drain(it, limit=None):
  n = 0
  for b in it:
    n += 1
    if limit and n >= limit:
      break
  return n


def pipeline_rates(source, n: int, repeats: int) -> dict[str, float]:
  """Host examples/s (no augmentation), and the full path with on-device augmentation."""
  import jax
  from prunejax import data, parallel
  prep = data.Preprocess(scale=255.0, crop_padding=4, flip=True)
  key = jax.random.key(0)
  mesh = parallel.data_mesh()
  step = jax.jit(lambda b: prep.train(b["x"], b["id"], b["epoch"], key).sum())
  ids = source.ids[:n]
  host = lambda: _drain(data.batches(source, ids, batch_size=BATCH, seed=0, epoch=0))

  def full():
    out = None
    for b in data.prefetch(iter(data.batches(source, ids, batch_size=BATCH, seed=0, epoch=0)), 2,
                           lambda b: parallel.shard_batch(b, mesh)):
      out = step(b)
    jax.block_until_ready(out)

  full()  # compile
  return {"host": _median_rate(host, n, repeats), "with_device_augment": _median_rate(
      full, n, repeats)}


def old_rates(x, y, n: int, repeats: int) -> dict[str, float]:
  ids = np.arange(n)
  return {"host": _median_rate(lambda: _drain(_old_batches(x[:n], y[:n], ids, augment=False)), n,
                               repeats),
          "with_host_augment": _median_rate(
              lambda: _drain(_old_batches(x[:n], y[:n], ids, augment=True)), n, repeats)}


def train_step_rates(quick: bool, models: dict[str, tuple[str, dict]] | None = None
                     ) -> dict[str, float]:
  """Examples/s of a train step, batch 128 (CIFAR-shaped), of ``models`` (label -> (model name,
  ``build_model`` keyword arguments)), by default the paper configs' models."""
  import jax
  import jax.numpy as jnp
  import optax
  from prunejax import data, train
  from prunejax.models import build_model
  out = {}
  # Quick: two tiny models (the smoke test checks the measurement; a ResNet's compile and its
  # steps were 10 of the quick run's 15 s here).
  models = models or ({"tiny cnn (quick)": ("cnn", {"features": (4, 8), "dense": 16}),
                       "tiny mlp (quick)": ("mlp", {"hidden": (32,)})} if quick else {
      "resnet18 (datadiet_cifar10)": ("resnet18", {"width_multiplier": 1.0}),
      "resnet20 (openlth_resnet20_cifar10)": ("resnet20", {"width_multiplier": 1.0})})
  x = np.random.default_rng(0).integers(0, 255, (128, 32, 32, 3)).astype(np.uint8)
  batch = {"x": x, "y": np.arange(128) % 10, "mask": np.ones(128, bool), "id": np.arange(128),
           "epoch": np.zeros(128, np.int32)}
  prep = data.Preprocess(scale=255.0, crop_padding=4, flip=True)
  for label, (name, kwargs) in models.items():
    state = train.create_train_state(build_model(name, 10, **kwargs), optax.sgd(0.1, 0.9),
                                     jax.random.key(0), x[:1], prep)
    state, m = train.jit_train_step(state, batch)
    jax.block_until_ready(m)
    steps = 2 if quick else 5
    t = time.perf_counter()
    for _ in range(steps):
      state, m = train.jit_train_step(state, batch)
    jax.block_until_ready(m)
    out[label] = steps * 128 / (time.perf_counter() - t)
  return out


def _rss_mb() -> float:
  import psutil
  return psutil.Process().memory_info().rss / 2**20


def stream_rss(tmpdir: str, gb: float) -> dict[str, float]:
  """Peak RSS growth (MB) while streaming one epoch of an on-disk dataset of ``gb`` GB."""
  from prunejax import data
  n = int(gb * 2**30 / (32 * 32 * 3))
  path = os.path.join(tmpdir, "stream.array_record")
  rng = np.random.default_rng(0)
  t = time.perf_counter()

  class Rows:  # the rows, generated chunk by chunk, never held whole
    shape = (n, 32, 32, 3)

    def __len__(self):
      return n

    def __getitem__(self, sl):
      k = len(range(*sl.indices(n)))
      return rng.integers(0, 255, (k, 32, 32, 3), dtype=np.uint8)

  data.write_array_record(path, Rows(), np.arange(n) % 10, chunk=8192)
  write_s = time.perf_counter() - t
  src = data.ArrayRecordSource(path)
  base, peak = _rss_mb(), [0.0]
  done = threading.Event()

  def sample():
    while not done.is_set():
      peak[0] = max(peak[0], _rss_mb())
      time.sleep(0.02)

  threading.Thread(target=sample, daemon=True).start()
  t = time.perf_counter()
  count = _drain(data.batches(src, batch_size=BATCH, seed=0, epoch=0))
  epoch_s = time.perf_counter() - t
  done.set()
  return {"size_gb": os.path.getsize(path) / 2**30, "examples": n, "batches": count,
          "write_s": write_s, "epoch_examples_per_s": n / epoch_s,
          "rss_growth_mb": max(peak[0], _rss_mb()) - base}


def sparse_ids(n: int, seed: int = 0) -> np.ndarray:
  """``n`` distinct ids spread over [0, 2**31) (hashed ids): far beyond the dense table's
  ``4 N + 1024``, so the source's index is a sorted search."""
  rng = np.random.default_rng(seed)
  ids = np.unique(rng.integers(0, 2**31 - 1, int(n * 1.01) + 16))
  return rng.permutation(ids)[:n]


def assembly_ms(sizes: tuple[int, ...], batches: int, repeats: int, *, sparse: bool = False,
                epoch_start: dict | None = None) -> dict[int, float]:
  """Median milliseconds per assembled batch of 1-byte rows at each number of ids (the epoch's
  one permutation of the ids is drawn before the clock starts: it is per epoch, not per batch).
  ``sparse`` spreads the ids over [0, 2**31); ``epoch_start`` (a dict) receives the median seconds
  from ``data.batches(...)`` to the first batch, per size."""
  from prunejax import data
  out = {}
  for n in sizes:
    ids = sparse_ids(n) if sparse else None
    src = data.ArraySource(np.zeros((n, 1), np.uint8), np.zeros(n, np.int32), ids)
    times, starts = [], []
    for r in range(repeats):
      t = time.perf_counter()
      it = data.batches(src, batch_size=BATCH, seed=r, epoch=0)
      next(it)
      starts.append(time.perf_counter() - t)
      t = time.perf_counter()
      done = _drain(it, batches)  # an epoch may hold fewer batches than asked for
      times.append((time.perf_counter() - t) / done)
    out[n] = 1000.0 * float(np.median(times))
    if epoch_start is not None:
      epoch_start[n] = float(np.median(starts))
  return out


def assembly_compare(repeats: int = 7, batches: int = 300) -> dict[str, tuple[float, float]]:
  """``{setting: (ms per batch, s to the first batch)}`` for dense and sparse ids at 50k and 1.28M,
  the four settings alternating in one process (medians of ``repeats``): the sparse-id figures of
  issue 25, less sensitive to a loaded machine than runs one after the other."""
  from prunejax import data
  srcs = {f"{kind} {n:,}": data.ArraySource(np.zeros((n, 1), np.uint8), np.zeros(n, np.int32),
                                            sparse_ids(n) if kind == "sparse" else None)
          for n in (50_000, 1_280_000) for kind in ("dense", "sparse")}
  per, start = {k: [] for k in srcs}, {k: [] for k in srcs}
  for r in range(repeats):
    for name, src in srcs.items():
      t = time.perf_counter()
      it = data.batches(src, batch_size=BATCH, seed=r, epoch=0)
      next(it)
      start[name].append(time.perf_counter() - t)
      t = time.perf_counter()
      done = _drain(it, batches)  # 50k ids hold 195 batches after the first, not 300
      per[name].append((time.perf_counter() - t) / done)
  return {k: (1000.0 * float(np.median(per[k])), float(np.median(start[k]))) for k in srcs}


def main(_):
  from prunejax import data
  quick, repeats = FLAGS.quick, 1 if FLAGS.quick else FLAGS.repeats
  n = 4096 if quick else 50_000
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (n, 32, 32, 3)).astype(np.uint8)
  y = rng.integers(0, 10, n).astype(np.int32)
  mem = pipeline_rates(data.ArraySource(x, y), n, repeats)
  old = old_rates(x, y, n if quick else 10_000, repeats)
  tmp = FLAGS.tmpdir or tempfile.mkdtemp(prefix="bench_input_")
  os.makedirs(tmp, exist_ok=True)
  path = os.path.join(tmp, "cifar.array_record")
  data.write_array_record(path, x, y)
  disk = pipeline_rates(data.ArrayRecordSource(path), n, repeats)
  print(f"CIFAR-shaped uint8, batch {BATCH}, examples/s (median of {repeats}):")
  print(f"  before (host NumPy):  plain {old['host']:>10,.0f}   with host augmentation "
        f"{old['with_host_augment']:>10,.0f}")
  print(f"  in memory:            host  {mem['host']:>10,.0f}   with device augmentation "
        f"{mem['with_device_augment']:>10,.0f}   ({mem['with_device_augment'] / old['with_host_augment']:.1f}x before)")
  print(f"  array_record on disk: host  {disk['host']:>10,.0f}   with device augmentation "
        f"{disk['with_device_augment']:>10,.0f}")
  for label, rate in train_step_rates(quick).items():
    print(f"  train step {label:<36} {rate:>10,.0f}   pipeline / step "
          f"{mem['with_device_augment'] / rate:>8.1f}x")
  rss = stream_rss(tmp, 0.02 if quick else FLAGS.disk_gb)
  print(f"streaming {rss['size_gb']:.2f} GB from disk ({rss['examples']:,} examples): "
        f"{rss['epoch_examples_per_s']:,.0f} examples/s, peak RSS growth {rss['rss_growth_mb']:.0f} MB "
        f"(written in {rss['write_s']:.0f} s)")
  ms = assembly_ms((50_000, 1_280_000) if not quick else (20_000, 200_000), 200 if not quick else 20,
                   repeats)
  (n1, t1), (n2, t2) = ms.items()
  print(f"batch assembly: {t1:.3f} ms at {n1:,} ids, {t2:.3f} ms at {n2:,} ids "
        f"(ratio {t2 / t1:.2f})")
  starts = {}
  sp = assembly_ms((n1, n2), 200 if not quick else 20, repeats, sparse=True, epoch_start=starts)
  print(f"batch assembly, sparse ids over [0, 2**31): {sp[n1]:.3f} ms at {n1:,} ids, "
        f"{sp[n2]:.3f} ms at {n2:,} ids (ratio {sp[n2] / sp[n1]:.2f}; {sp[n2] / t1:.2f} against "
        f"{n1:,} dense ids); epoch start {starts[n1]:.3f} s / {starts[n2]:.3f} s")
  if not FLAGS.tmpdir:
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)


def _define_flags() -> None:
  """The command line (defined only when run as a script, so other scripts can import this one)."""
  flags.DEFINE_bool("quick", False, "small sizes, for a smoke test")
  flags.DEFINE_float("disk_gb", 1.1, "size of the on-disk dataset streamed for the RSS figure")
  flags.DEFINE_string("tmpdir", None, "where the on-disk dataset is written (default: a temp dir)")
  flags.DEFINE_integer("repeats", 3, "timed repetitions; the median is printed")


def cli() -> None:
  """Runs this script with its flags (``python -m experiments.bench_input``)."""
  _define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
