"""Shared machinery of the experiment scripts: setup from a config, one trainer for every strategy,
resumable units of work, atomic result files and the report.

Every experiment is a list of *strategies* (``config.strategies``) run by :func:`run_workflow`; each
strategy (``experiments/strategies.py``) produces result rows. A strategy's work is split into *units*
(one training run, one round) whose results are written atomically once finished, so rerunning the same
command in the same workdir skips everything already done and ends with the same results.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from prunejax import data, dynamic, parallel, train
from prunejax.errors import ConfigError, check_choice, check_positive_int, check_range
from prunejax.fileio import atomic_savez, atomic_write_text
from prunejax.models import build_model, make_apply_fn

log = logging.getLogger("prunejax")

# ----------------------------------------------------------------------------------------------
# Files: atomic writes and the workdir.
# ----------------------------------------------------------------------------------------------


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=_json_default) + "\n")


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  return str(o)


def atomic_save_npz(path: str, **arrays: Any) -> None:
  """Atomic ``np.savez`` by process 0 only."""
  if jax.process_index() == 0:
    atomic_savez(path, **arrays)


def save_mask(path: str, mask: Any) -> None:
  """A mask as ``.npz``, one boolean array per leaf, named by its path (``dense_0/kernel``)."""
  from prunejax.masks import leaf_paths
  atomic_save_npz(path, **dict(zip(leaf_paths(mask), jax.tree.leaves(jax.device_get(mask)))))


def config_fingerprint(config: ml_collections.ConfigDict) -> str:
  """A stable hash of the settings that change results (not progress bars or logging)."""
  d = config.to_dict()
  d.get("train", {}).pop("progress", None)
  return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_workdir(workdir: str, config: ml_collections.ConfigDict, overwrite: bool) -> None:
  """Creates ``workdir`` or checks that it holds a run of the same config (to resume it).

  A workdir holding a different config is refused unless ``overwrite``, which clears it first.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir={workdir!r} is a file; expected a directory (new or from an "
                      "earlier run of the same config)")
  stamp = os.path.join(workdir, "config.json")
  fp = config_fingerprint(config)
  if os.path.exists(stamp):
    with open(stamp) as f:
      old = json.load(f).get("fingerprint")
    if old != fp:
      if not overwrite:
        raise ConfigError(f"--workdir={workdir!r} holds a run of a different config (fingerprint "
                          f"{old} != {fp}); choose another --workdir or pass --overwrite")
      shutil.rmtree(workdir)
  elif os.path.isdir(workdir) and os.listdir(workdir) and overwrite:
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  atomic_write_json(stamp, {"fingerprint": fp, "config": config.to_dict()})


class Units:
  """Finished units of work, one JSON file each under ``workdir/units``; resuming skips them."""

  def __init__(self, workdir: str):
    self.dir = os.path.join(workdir, "units")
    os.makedirs(self.dir, exist_ok=True)

  def _path(self, key: str) -> str:
    return os.path.join(self.dir, key.replace("/", "_") + ".json")

  def get(self, key: str) -> Any | None:
    """The result of a finished unit, or None. A file that does not parse (damaged on disk; our own
    writes are atomic) is moved aside to ``*.corrupt`` and the unit counts as not done."""
    path = self._path(key)
    if not os.path.exists(path):
      return None
    try:
      with open(path) as f:
        return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError):
      log.warning("unit %s: damaged result file, recomputing it", key)
      if jax.process_index() == 0:
        os.replace(path, path + ".corrupt")
      return None

  def run(self, key: str, fn: Callable[[], Any]) -> Any:
    done = self.get(key)
    if done is not None:
      return done
    result = fn()
    if jax.process_index() == 0:
      atomic_write_json(self._path(key), result)
    barrier(f"unit {key}")  # every process sees the file before going on
    return result


def barrier(name: str) -> None:
  """Waits for every process (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# ----------------------------------------------------------------------------------------------
# Config validation and setup.
# ----------------------------------------------------------------------------------------------

STRATEGIES = ("dense", "random", "random_dynamic", "el2n", "grand", "forgetting", "aum",
              "prototypes", "label_quality", "batch", "semi_batch", "iterative", "imp",
              "imp_random_reinit", "imp_random_mask", "pai", "joint")


PAI_METHODS = ("magnitude", "random", "snip", "grasp", "synflow")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks every field that can be checked before any work starts; one-line errors."""
  check_choice("dataset.name", config.dataset.name, data.ALL_DATASETS)
  from prunejax.models import MODELS
  check_choice("model.name", config.model.name, MODELS)
  if not config.strategies:
    raise ConfigError("strategies=() is empty; choose at least one of: " + ", ".join(STRATEGIES))
  for s in config.strategies:
    check_choice("strategies", s, STRATEGIES)
  check_positive_int("train.epochs", config.train.epochs)
  check_positive_int("train.batch_size", config.train.batch_size)
  check_positive_int("replicates", config.replicates)
  folds = config.get("cv_folds", 0)
  if folds and (not isinstance(folds, int) or folds < 2):
    raise ConfigError(f"cv_folds={folds!r} is not allowed; expected 0 (off) or an integer >= 2")
  parallel.check_batch_size(config.train.batch_size, parallel.data_mesh(), "train.batch_size")
  dp = config.data_pruning
  for f in dp.keep_fractions:
    check_range("data_pruning.keep_fractions", f, 0.0, 1.0, lo_open=True)
  check_choice("data_pruning.keep", dp.keep, ("hard", "easy", "random"))
  for c in dp.conventions:
    check_choice("data_pruning.conventions", c, ("epochs", "steps"))
  check_positive_int("data_pruning.score_seeds", dp.score_seeds)
  check_range("batch_pruning.keep_fraction", config.batch_pruning.keep_fraction, 0.0, 1.0,
              lo_open=True)
  check_choice("batch_pruning.score", config.batch_pruning.score, dynamic.SELECTION_SCORES)
  check_range("semi_batch.prune_ratio", config.semi_batch.prune_ratio, 0.0, 1.0, hi_open=True)
  check_range("semi_batch.delta", config.semi_batch.delta, 0.0, 1.0)
  it = config.iterative
  check_range("iterative.prune_per_round", it.prune_per_round, 0.0, 1.0, lo_open=True, hi_open=True)
  check_range("iterative.target_keep", it.target_keep, 0.0, 1.0, lo_open=True, hi_open=True)
  check_choice("iterative.score", it.score, ("el2n", "grand"))
  for m in config.pai.methods:
    check_choice("pai.methods", m, PAI_METHODS)
  for sp in config.pai.sparsities:
    check_range("pai.sparsities", sp, 0.0, 1.0, hi_open=True)
  check_choice("joint.data", config.joint.data, ("random_dynamic", "batch", "semi_batch"))
  imp = config.imp
  check_range("imp.prune_per_round", imp.prune_per_round, 0.0, 1.0, lo_open=True, hi_open=True)
  check_range("imp.target_sparsity", imp.target_sparsity, 0.0, 1.0, hi_open=True)
  check_choice("imp.scope", imp.scope, ("global", "layerwise"))
  if imp.get("max_rounds") is not None:
    need = imp_rounds(imp.prune_per_round, imp.target_sparsity)
    if need > imp.max_rounds:
      raise ConfigError(f"imp.max_rounds={imp.max_rounds} cannot reach imp.target_sparsity="
                        f"{imp.target_sparsity} at imp.prune_per_round={imp.prune_per_round} "
                        f"(needs {need} rounds)")


def imp_rounds(prune_per_round: float, target_sparsity: float) -> int:
  """Rounds of geometric pruning (``p`` of the remaining each round) to reach the target."""
  if target_sparsity <= 0:
    return 0
  return int(np.ceil(np.log(1 - target_sparsity) / np.log(1 - prune_per_round) - 1e-9))


def iterative_keeps(prune_per_round: float, target_keep: float) -> list[float]:
  """Fractions kept after each round of iterative data pruning, the last one exactly the target."""
  keeps, k = [], 1.0
  while k * (1 - prune_per_round) > target_keep + 1e-9:
    k *= 1 - prune_per_round
    keeps.append(round(k, 6))
  return keeps + [target_keep]


@dataclasses.dataclass
class Context:
  """What every strategy needs: config, data, mesh, the replicate splits and the report sinks."""

  config: ml_collections.ConfigDict
  ds: data.Dataset
  mesh: Any
  workdir: str
  units: Units

  @property
  def x_example(self) -> np.ndarray:
    return self.ds.train.x[:1]

  def model(self, **overrides):
    kw = {k: v for k, v in self.config.model.to_dict().items() if k != "name"}
    if self.config.model.name == "gpt":
      kw.setdefault("vocab_size", self.ds.meta["vocab_size"])
      kw.setdefault("pad_id", self.ds.meta["pad_id"])
      kw.setdefault("context", self.ds.meta["max_len"])
    kw.update(overrides)
    return build_model(self.config.model.name, self.ds.num_classes, **kw)

  def replicate_split(self, r: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(train ids, held-out ids or None, seed) of replicate ``r``: a seed, or a CV fold."""
    seed = int(self.config.seed) + r
    folds = self.config.get("cv_folds", 0)
    ids = np.sort(self.ds.train.id)
    if not folds:
      return ids, None, seed
    fold_of = np.random.default_rng([int(self.config.seed), 0xF01D]).permutation(len(ids)) % folds
    return ids[fold_of != r], ids[fold_of == r], seed

  def batches(self, ids: np.ndarray | None = None, *, split: str = "train", **kw):
    """This process's rows of each global batch over ``ids`` of ``split``."""
    sp = self.ds.train if split == "train" else self.ds.test
    kw.setdefault("batch_size", self.config.train.eval_batch_size)
    return data.batches(sp, ids, process_index=jax.process_index(),
                        process_count=jax.process_count(), **kw)

  @property
  def num_replicates(self) -> int:
    return self.config.get("cv_folds", 0) or self.config.replicates


def setup(config: ml_collections.ConfigDict, workdir: str) -> Context:
  validate_config(config)
  dc = config.dataset
  ds = data.load_dataset(dc.name, data_dir=dc.get("data_dir"), download=dc.get("download", False),
                         tokenizer=dc.get("tokenizer", "bpe"), vocab_size=dc.get("vocab_size", 8192),
                         max_len=dc.get("max_len", 64), cache_dir=dc.get("cache_dir"))
  ds = ds.take(dc.get("num_train"), dc.get("num_test"))
  for split in (ds.train, ds.test):
    if len(split) == 0:
      raise ConfigError(f"dataset {dc.name!r} has an empty split (num_train={dc.get('num_train')}, "
                        f"num_test={dc.get('num_test')})")
    if split.y.min() < 0 or split.y.max() >= ds.num_classes:
      raise ConfigError(f"dataset {dc.name!r} has labels outside [0, {ds.num_classes}): "
                        f"{sorted(set(split.y[(split.y < 0) | (split.y >= ds.num_classes)].tolist()))[:5]}")
  n_fit = len(ds.train) * (1 - 1 / config.cv_folds if config.get("cv_folds") else 1)
  for f in config.data_pruning.keep_fractions:
    if round(f * n_fit) < 1:
      raise ConfigError(f"data_pruning.keep_fractions={f} keeps no example of {int(n_fit)}; "
                        f"expected at least {1 / n_fit:.2g}")
  return Context(config, ds, parallel.data_mesh(), workdir, Units(workdir))


# ----------------------------------------------------------------------------------------------
# The one trainer.
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  """A finished training run: its state and what it cost (in example passes: forward 1, backward 2)."""

  state: train.TrainState
  forward: float = 0.0
  backward: float = 0.0
  steps: int = 0
  wall: float = 0.0
  rewind_params: Any = None
  history: list = dataclasses.field(default_factory=list)  # per epoch: train loss and accuracy
  first_step_end: float | None = None  # perf_counter after the first step (compile included)

  @property
  def compute(self) -> float:
    return self.forward + 2.0 * self.backward


def train_model(ctx: Context, ids: np.ndarray, *, seed: int, epochs: int | None = None,
                dynamic_strategy: str | None = None, mask: Any = None, init_params: Any = None,
                rewind_step: int | None = None, desc: str = "train",
                on_epoch: Callable[[int, train.TrainState], None] | None = None) -> Run:
  """Trains a fresh model (or ``init_params``) on the examples ``ids``.

  Args:
    ctx: the experiment context.
    ids: training example ids.
    seed: seeds the initialization, the shuffle and any random pruning.
    epochs: defaults to ``config.train.epochs``.
    dynamic_strategy: None (every example every epoch), "random_dynamic", "batch" or "semi_batch".
    mask: a weight mask; training keeps the masked weights at exactly zero.
    init_params: start from these params instead of a fresh initialization (IMP rewinding).
    rewind_step: capture the params after this many steps (``Run.rewind_params``).
    on_epoch: called after each epoch with (epoch, state), e.g. to record training dynamics.
  """
  cfg = ctx.config
  epochs = epochs or cfg.train.epochs
  bs = cfg.train.batch_size
  ids = np.asarray(ids, np.int64)
  model = ctx.model()
  if dynamic_strategy == "random_dynamic":
    steps_per_epoch = data.num_batches(max(1, int(round(cfg.data_pruning.dynamic_keep * len(ids)))), bs)
  else:
    steps_per_epoch = data.num_batches(len(ids), bs)
  tx = _optimizer(json.dumps(cfg.optimizer.to_dict(), sort_keys=True, default=str),
                  steps_per_epoch, epochs, mask is not None)
  # The step donates the state's buffers: copy what the caller passed in so it stays usable.
  own = lambda tree: None if tree is None else jax.tree.map(lambda a: jnp.array(a, copy=True), tree)
  mask, init_params = own(mask), own(init_params)
  state = train.create_train_state(model, tx, jax.random.key(seed), ctx.x_example)
  if init_params is not None:
    state = state.replace(params=init_params, opt_state=tx.init(init_params))
  if mask is not None and jax.tree.structure(mask) != jax.tree.structure(state.params):
    raise ConfigError(f"mask structure {jax.tree.structure(mask)} does not match the params "
                      f"{jax.tree.structure(state.params)}")
  if mask is not None:
    from prunejax import optim
    from prunejax.masks import apply_mask
    state = state.replace(params=apply_mask(state.params, mask),
                          opt_state=optim.set_mask(state.opt_state, mask))
  state = parallel.replicate(state, ctx.mesh)
  run = Run(state)
  step_fn = train.jit_train_step
  if dynamic_strategy == "batch":
    k = dynamic.num_selected(bs, cfg.batch_pruning.keep_fraction)
    step_fn = dynamic.make_batch_pruned_step(k, cfg.batch_pruning.score)
  ib_state = None
  if dynamic_strategy == "semi_batch":
    ib_state = parallel.replicate(dynamic.infobatch_init(len(ids)), ctx.mesh)
    pos_of = {int(i): p for p, i in enumerate(ids)}
  t0 = time.perf_counter()
  from tqdm.auto import tqdm
  bar = tqdm(range(epochs), desc=desc, leave=False, unit="epoch",
             disable=not (cfg.train.get("progress", True) and sys.stderr.isatty()))
  for epoch in bar:
    epoch_ids, extra = ids, None
    if dynamic_strategy == "random_dynamic":
      epoch_ids = dynamic.random_epoch_subset(ids, cfg.data_pruning.dynamic_keep, seed=seed,
                                              epoch=epoch)
    elif dynamic_strategy == "semi_batch":
      keep_N, weight_N = dynamic.infobatch_plan(
          ib_state, jax.random.fold_in(jax.random.key(seed), epoch),
          prune_ratio=cfg.semi_batch.prune_ratio, epoch=epoch, num_epochs=epochs,
          delta=cfg.semi_batch.delta)
      keep_N, weight_N = np.asarray(keep_N), np.asarray(weight_N)
      epoch_ids, extra = ids[keep_N], {"weight": weight_N[keep_N]}
    batches = ctx.batches(epoch_ids, batch_size=bs, seed=seed, epoch=epoch,
                          augment=ctx.config.dataset.get("augment", False), extra=extra)
    if dynamic_strategy == "semi_batch":
      batches = _with_positions(batches, pos_of)
    state, fwd, bwd, steps, ib_state = _epoch(ctx, state, batches, step_fn, dynamic_strategy,
                                              ib_state, rewind_step, run, desc, epoch)
    run.forward += fwd
    run.backward += bwd
    run.steps += steps
    if run.history:
      bar.set_postfix(loss=f"{run.history[-1]['loss']:.4f}", acc=f"{run.history[-1]['accuracy']:.3f}")
    if on_epoch is not None:
      on_epoch(epoch, state)
  jax.block_until_ready(state.params)
  # Wall time of the steps after the first: the first step of a run pays for compilation when no
  # earlier run compiled the same program, which would make the first strategy look slow.
  run.wall = time.perf_counter() - (run.first_step_end or t0)
  run.state = state
  return run


@functools.lru_cache(maxsize=64)
def _optimizer(cfg_json: str, steps_per_epoch: int, epochs: int, masked: bool):
  """One optimizer object per (config, schedule length, masked): runs that share it share the
  compiled train step (the optimizer is a static part of the state; the mask lives in its state)."""
  tx = train.make_optimizer(ml_collections.ConfigDict(json.loads(cfg_json)), steps_per_epoch, epochs)
  if masked:
    from prunejax import optim
    tx = optim.masked(tx)
  return tx


def _with_positions(batches: Iterable[dict], pos_of: dict[int, int]) -> Iterable[dict]:
  for b in batches:
    b["position"] = np.asarray([pos_of.get(int(i), 0) for i in b["id"]], np.int32)
    yield b


def _epoch(ctx, state, batches, step_fn, strategy, ib_state, rewind_step, run, desc, epoch):
  fwd = bwd = 0.0
  steps = 0
  acc = None
  faults, batch_ids = [], []  # per step, checked at the one host sync of the epoch
  for host_batch in data.prefetch(iter(batches), 2):
    batch_ids.append(host_batch["id"][host_batch["mask"]])
    batch = parallel.shard_batch(host_batch, ctx.mesh)
    if strategy == "semi_batch":
      state, ib_state, m = dynamic.jit_infobatch_train_step(state, ib_state, batch)
    else:
      state, m = step_fn(state, batch)
    steps += 1
    if run.first_step_end is None:
      jax.block_until_ready(m)
      run.first_step_end = time.perf_counter()
    faults.append(m["nonfinite"] + m["grad_nonfinite"])
    acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
    if rewind_step is not None and run.rewind_params is None and run.steps + steps == rewind_step:
      run.rewind_params = jax.tree.map(jnp.copy, state.params)
  if acc is not None:
    acc = jax.device_get(acc)  # one host sync per epoch.
    if acc["nonfinite"] or acc["grad_nonfinite"]:
      bad = int(np.argmax(np.asarray(jax.device_get(faults)) > 0))
      raise train.NumericalError(
          f"non-finite loss or gradient in {desc}, epoch {epoch}, step {run.steps + bad + 1} "
          f"(of the run); examples of that batch: {batch_ids[bad][:16].tolist()}; the last good "
          "checkpoint is kept")
    bwd = float(acc["count"])
    fwd = float(acc.get("forward_count", acc["count"]))
    run.history.append({"epoch": epoch, "loss": float(acc["loss_sum"]) / max(bwd, 1.0),
                        "accuracy": float(acc["correct"]) / max(bwd, 1.0)})
  return state, fwd, bwd, steps, ib_state


def evaluate(ctx: Context, state: train.TrainState, ids: np.ndarray | None = None,
             split: str = "test") -> float:
  """Accuracy on ``split`` (``ids`` of it, or all)."""
  res = train.evaluate(state, ctx.batches(ids, split=split, shuffle=False), ctx.mesh)
  return res["accuracy"]


def map_examples(ctx: Context, ids: np.ndarray, fn: Callable[[dict], jax.Array]) -> np.ndarray:
  """``fn(batch) -> [B, ...]`` over the training examples ``ids`` (sharded batches, every process
  sees the gathered result); the rows of real examples, in the order of ``ids``."""
  out = []
  for b in ctx.batches(ids, shuffle=False):
    gb = parallel.shard_batch(b, ctx.mesh)
    values, mask = parallel.gather(fn(gb)), parallel.gather(gb["mask"])
    out.append(values[mask])
  return np.concatenate(out)


def predict_probs(ctx: Context, state: train.TrainState, ids: np.ndarray) -> np.ndarray:
  """Softmax probabilities f32[len(ids), C] of the training examples ``ids``, in that order."""
  apply_fn = make_apply_fn(state.model)
  probs_fn = jax.jit(lambda v, x: jax.nn.softmax(apply_fn(v, x), -1))
  return map_examples(ctx, ids, lambda b: probs_fn(state.variables, b["x"]))


def result_row(ctx: Context, strategy: str, r: int, run: Run, held_out: np.ndarray | None,
               **fields) -> dict:
  """One row of results.csv: test (and CV-fold) accuracy, compute, wall time."""
  row = {"strategy": strategy, "replicate": r, "test_accuracy": evaluate(ctx, run.state),
         "compute": run.compute, "forward_examples": run.forward,
         "backward_examples": run.backward, "steps": run.steps, "wall_time": run.wall,
         "history": [{k: round(v, 6) for k, v in h.items()} for h in run.history]}
  if held_out is not None:
    row["val_accuracy"] = evaluate(ctx, run.state, held_out, split="train")
  row.setdefault("fraction_kept", 1.0)
  row.setdefault("sparsity", 0.0)
  row.update(fields)
  return row


# ----------------------------------------------------------------------------------------------
# Round checkpoints (orbax).
# ----------------------------------------------------------------------------------------------


class RoundCheckpoints:
  """One orbax checkpoint per finished round of an iterative loop, under ``workdir/checkpoints/key``.

  ``save(round, tree)`` is atomic (orbax writes to a temporary folder and renames it), so a killed
  run leaves either the whole round or nothing; ``restore(round, like)`` reads a round back into the
  structure of ``like``.
  """

  def __init__(self, workdir: str, key: str):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = os.path.abspath(os.path.join(workdir, "checkpoints", key))
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=None, create=True))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like: Any) -> tuple[int | None, Any]:
    """(round, state) of the newest round that restores cleanly; a damaged round is moved aside
    (``<round>.corrupt``) and the one before it is tried, so the run redoes the lost rounds instead of
    starting over or crashing. (None, None) when no round survives."""
    while (step := self.latest()) is not None:
      try:
        return step, self.restore(step, like)
      except Exception as e:  # noqa: BLE001 - orbax raises many types for damaged files.
        log.warning("checkpoint %s round %d is damaged (%s); falling back", self.dir, step,
                    type(e).__name__)
        self.manager.close()
        if jax.process_index() == 0:
          os.replace(os.path.join(self.dir, str(step)),
                     os.path.join(self.dir, f"{step}.corrupt-{time.time_ns()}"))
        barrier(f"fallback {self.dir} {step}")
        self.manager = self._ocp.CheckpointManager(
            self.dir, options=self._ocp.CheckpointManagerOptions(max_to_keep=None, create=True))
    return None, None

  def save(self, rnd: int, tree: Any) -> None:
    self.manager.save(rnd, args=self._ocp.args.StandardSave(jax.device_get(tree)))
    self.manager.wait_until_finished()

  def restore(self, rnd: int, like: Any) -> Any:
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)
    return self.manager.restore(rnd, args=self._ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self.manager.close()
