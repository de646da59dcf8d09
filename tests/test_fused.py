"""The fused path (prunejax.fused, experiments/fused_loop.py): device-resident batches equal the host
loader's, K steps per dispatch and replicas in one vmapped program give the host loop's results,
and every boundary the host must see (rewind step, checkpoint, stop, NaN) is kept."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from conftest import FAST_COMPILE
from experiments import common, fused_loop, trainer
from experiments.configs import digits, fields
from prunejax import data, fused, online, train
from prunejax.errors import ConfigError, DataError


def _ctx(tmp_path, **train_fields):
  cfg = digits.get_config("quick")
  cfg.dataset.num_train = 150  # 5 steps of 32, the last one 22 rows + 10 padding
  cfg.train.epochs = 3
  for k, v in train_fields.items():
    cfg.train[k] = v
  common.prepare_workdir(str(tmp_path), cfg, False).release()
  return common.setup(cfg, str(tmp_path))


def _leaves_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


# ----------------------------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_device_batches_equal_the_host_loaders_rows_order_padding_and_columns(shuffle):
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (40, 4, 4, 3), dtype=np.uint8)
  ids = rng.permutation(1000)[:40] + 7  # sparse ids, not in row order
  src = data.ArraySource(x, np.arange(40) % 5, ids)
  subset = ids[rng.permutation(40)[:27]]  # a plan: 27 ids in plan order
  weight = rng.random(27).astype(np.float32)
  dev = fused.to_device(src)
  er = fused.epoch_rows(src.index, subset, batch_size=8, seed=3, epoch=2, shuffle=shuffle,
                        columns={"weight": weight})
  host = list(data.batches(src, subset, batch_size=8, seed=3, epoch=2, shuffle=shuffle,
                           columns={"weight": weight}))
  assert er.steps == len(host) == 4
  for s, hb in enumerate(host):
    got = jax.device_get(fused.gather_batch(dev, jnp.asarray(er.rows_SxB[s]),
                                            {"weight": jnp.asarray(er.columns["weight"][s])}, 2))
    assert set(got) == set(hb)
    for k in hb:
      np.testing.assert_array_equal(got[k], hb[k].astype(got[k].dtype), err_msg=k)
    np.testing.assert_array_equal(er.batch_ids(s), hb["id"][hb["mask"]])


def test_to_device_refuses_a_split_over_the_budget_and_ids_outside_int32():
  src = data.ArraySource(np.zeros((100, 8, 8, 3), np.uint8), np.zeros(100, np.int64),
                         np.arange(100))
  assert fused.source_nbytes(src) == 100 * (8 * 8 * 3 + 8)
  with pytest.raises(ConfigError, match=r"takes 0\.0 MiB.*over the budget of 0\.0 MiB"):
    fused.to_device(src, budget_bytes=1000)
  with pytest.raises(DataError, match=r"outside int32.*4294967301"):  # refused at the source
    data.ArraySource(np.zeros((2, 3), np.float32), np.zeros(2, np.int64), np.array([5, 5 + 2**32]))


def test_chunks_end_at_k_steps_and_at_every_break():
  assert fused.chunks(10, 4) == [(0, 4), (4, 4), (8, 2)]
  assert fused.chunks(10, 4, (3, 8)) == [(0, 3), (3, 4), (7, 1), (8, 2)]
  assert fused.chunks(5, 100, (0, 5, 9)) == [(0, 5)]
  assert sum(n for _, n in fused.chunks(37, 5, (11, 12, 30))) == 37
  for bad in (-1, 1.5, True, "2"):
    with pytest.raises(ConfigError, match="train.steps_per_dispatch"):
      fused.check_steps_per_dispatch(bad)


# ----------------------------------------------------------------------------------------------
# Learning-rate schedules whose length is data.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sgd", "adamw", "adam"])
@pytest.mark.parametrize("sched,extra,exact", [
    ("constant", {}, True), ("step", dict(step_epochs=(1.0, 2.5, 2.5)), True),
    ("step", dict(warmup_epochs=1.0, step_epochs=(2.0,)), True), ("cosine", {}, False),
    ("cosine", dict(warmup_epochs=0.5), False)])
def test_traced_schedule_equals_the_static_one(name, sched, extra, exact):
  """Bitwise for constant, step and warmup under XLA's default flags (to float32 rounding under the
  tests' fast-compile flags, which compile a constant folded in and the same value read at run time
  differently); cosine to 1 ulp of the learning rate (XLA compiles a division by a constant
  differently from a division by a variable)."""
  cfg = ml_collections.ConfigDict(dict(name=name, lr=0.1, schedule=sched, momentum=0.9,
                                       nesterov=True, weight_decay=1e-3, warmup_epochs=0.0,
                                       step_epochs=(), step_factor=0.1, b1=0.9, b2=0.999))
  cfg.update(extra)
  spe, epochs = 7, 3
  static = train.make_optimizer(cfg, spe, epochs)
  traced = train.make_optimizer(cfg, None, None, traced_schedule=True)
  p = {"w": jnp.linspace(-1, 1, 10)}
  sa, sb = static.init(p), train.set_schedule(traced.init(p), cfg, spe, epochs)
  pa = pb = p
  for t in range(spe * epochs + 3):
    g = {"w": jnp.sin(jnp.arange(10.0) * (t + 1))}
    ua, sa = jax.jit(static.update)(g, sa, pa)
    ub, sb = jax.jit(traced.update)(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
    if exact and not FAST_COMPILE:
      np.testing.assert_array_equal(pa["w"], pb["w"])
    else:  # (exact under the tests' fast-compile XLA flags, conftest: rounding apart, as cosine)
      np.testing.assert_allclose(pa["w"], pb["w"], rtol=0, atol=1e-6)


def test_traced_schedule_left_unset_gives_nan_and_set_schedule_needs_one():
  cfg = ml_collections.ConfigDict(dict(name="sgd", lr=0.1, schedule="cosine", momentum=0.0,
                                       weight_decay=0.0, warmup_epochs=0.0))
  tx = train.make_optimizer(cfg, None, None, traced_schedule=True)
  p = {"w": jnp.ones(3)}
  u, _ = tx.update(p, tx.init(p), p)
  assert np.all(np.isnan(u["w"]))  # caught by the loop's non-finite check, never silent
  with pytest.raises(ConfigError, match="no traced schedule"):
    train.set_schedule(optax.sgd(0.1).init(p), cfg, 5, 2)


# ----------------------------------------------------------------------------------------------
# Runs: fused = host loop, replicas = sequential runs.
# ----------------------------------------------------------------------------------------------


def _pruners(ctx):
  return {"full": online.FullData(), "batch": online.BatchTopK(0.5, "loss", 32),
          "random": online.RandomSubset(0.6), "infobatch": online.InfoBatch(0.5, 0.67)}


@pytest.mark.parametrize("pruner", ["full", "batch", "random", "infobatch"])
def test_fused_run_equals_the_host_loop(tmp_path, pruner):
  """Same batches, same augmentation keys, same metrics; parameters to float32 rounding (the
  scanned step is compiled as one program with the gather, so XLA may order reductions
  differently; the cosine learning rate may differ by 1 ulp)."""
  ctx = _ctx(tmp_path / "a", fused=False)
  ids = ctx.ds.train.ids
  pr = _pruners(ctx)[pruner]
  host = trainer.train_model(ctx, ids, seed=1, pruner=pr)
  ctx_f = _ctx(tmp_path / "b", steps_per_dispatch=2)  # chunks of 2 plus a remainder
  assert ctx_f.device_data() is not None
  got = trainer.train_model(ctx_f, ids, seed=1, pruner=pr)
  assert (got.steps, got.forward, got.backward) == (host.steps, host.forward, host.backward)
  for a, b in zip(host.history, got.history):
    assert a["epoch"] == b["epoch"] and abs(a["loss"] - b["loss"]) < 1e-5
    assert abs(a["accuracy"] - b["accuracy"]) < 1e-6
  _leaves_close(host.state.params, got.state.params, 1e-5)


def test_steps_per_dispatch_does_not_change_the_run(tmp_path):
  """K = 1, 3 (with a remainder) and a whole epoch: the same steps (to float32 rounding: the
  compiled scan differs with its length)."""
  ctxs = [_ctx(tmp_path / str(k), steps_per_dispatch=k) for k in (1, 3, 0)]
  runs = [trainer.train_model(c, c.ds.train.ids, seed=2) for c in ctxs]
  for r in runs[1:]:
    assert r.steps == runs[0].steps == 15
    for a, b in zip(runs[0].history, r.history):
      assert abs(a["loss"] - b["loss"]) < 1e-6 and a["accuracy"] == b["accuracy"]
    _leaves_close(runs[0].state.params, r.state.params, 1e-6)


def test_an_experiments_chunks_share_one_program_and_one_zero_tree(tmp_path, monkeypatch):
  """Every chunk of every epoch of two runs (5 steps an epoch in chunks of 2, 2 and a padded 1) is
  one compiled program: the epoch's fresh zero sums (placed on the one device) and the sums the
  program returns (on a 1-device mesh) are equivalent shardings, not two programs; and the zero
  sums' structure is traced once, not once per run."""
  for cache in ("_COMPILED", "_ZEROS", "_CANONICAL"):
    monkeypatch.setattr(fused_loop, cache, {})
  ctx = _ctx(tmp_path, steps_per_dispatch=2)
  runs = [trainer.train_model(ctx, ctx.ds.train.ids, seed=s) for s in (0, 1)]
  assert [r.steps for r in runs] == [15, 15]
  assert len(fused_loop._COMPILED) == 1 and len(fused_loop._ZEROS) == 1
  # The control: telling equivalent shardings apart, the same run is two programs.
  monkeypatch.setattr(fused_loop, "_COMPILED", {})
  monkeypatch.setattr(fused_loop, "_canonical", lambda sharding, ndim: sharding)
  again = trainer.train_model(ctx, ctx.ds.train.ids, seed=0)
  assert len(fused_loop._COMPILED) == 2 and again.history == runs[0].history


def test_runs_with_equal_pruners_trace_their_step_once_per_state_type(tmp_path, monkeypatch):
  """An unmasked run then a masked one (another optimizer state), each with its own but equal
  pruner (the cached runner holds the first one's step): two traces of the step, one per state
  type, the control-flow check, the zero sums and the chunk sharing each."""
  from prunejax import masks
  for cache in ("_COMPILED", "_ZEROS", "_SLOW", "_CANONICAL"):
    monkeypatch.setattr(fused_loop, cache, {})
  for cached in (fused_loop._step, fused_loop._runner, fused._traced_once):
    cached.cache_clear()
  traces = []
  step = online.BatchTopK.train_step

  def counted(self, state, pstate, batch):
    traces.append(type(state.opt_state).__name__)
    return step(self, state, pstate, batch)
  monkeypatch.setattr(online.BatchTopK, "train_step", counted)
  ctx = _ctx(tmp_path, steps_per_dispatch=2)
  ids = ctx.ds.train.ids
  first = trainer.train_model(ctx, ids, seed=0, epochs=1, pruner=online.BatchTopK(0.5, "loss", 32))
  mask = masks.ones_mask(first.state.params)
  trainer.train_model(ctx, ids, seed=0, epochs=1, pruner=online.BatchTopK(0.5, "loss", 32),
                      mask=mask)
  assert len(traces) == 2 and traces[0] != traces[1], traces


@pytest.mark.parametrize("replicas", [False, True])
def test_zero_metrics_start_an_epoch_as_none_does(tmp_path, replicas):
  """``fused.zero_metrics``: zeros of the structure, shapes and dtypes of the sums a chunk started
  from None returns; a chunk started from them returns those sums bitwise."""
  ctx = _ctx(tmp_path)
  pr = online.BatchTopK(0.5, "loss", 32)
  ids = ctx.ds.train.ids
  st = trainer.initial_state(ctx, ids, seed=0, epochs=1, pruner=pr)
  ps = pr.init(ids)
  plan = pr.plan(jax.device_get(ps), ids, seed=0, epoch=0, num_epochs=1)
  er = fused.epoch_rows(ctx.ds.train.index, plan.ids, batch_size=32, seed=0, epoch=0,
                        columns=plan.columns)
  rows, cols = er.rows_SxB[:3], {c: v[:3] for c, v in er.columns.items()}
  if replicas:
    st, ps = fused.stack([st, st]), fused.stack([ps, ps])
    rows, cols = np.stack([rows, rows]), {c: np.stack([v, v]) for c, v in cols.items()}
  data = ctx.device_data()
  zeros = fused.zero_metrics(pr.train_step, st, ps, data, rows, cols, replicas=replicas)
  run = fused.make_runner(pr.train_step, replicas=replicas)
  copy = lambda t: jax.tree.map(jnp.array, t)
  from_none = run(copy(st), copy(ps), data, rows, cols, np.int32(0), np.int32(3)).metrics
  from_zeros = run(copy(st), copy(ps), data, rows, cols, np.int32(0), np.int32(3), zeros).metrics
  assert jax.tree.structure(zeros) == jax.tree.structure(from_none)
  for z, a, b in zip(jax.tree.leaves(zeros), jax.tree.leaves(from_none),
                     jax.tree.leaves(from_zeros)):
    assert z.shape == a.shape and z.dtype == a.dtype and not np.any(np.asarray(z))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(np.sum(from_none["count"])) > 0


@pytest.mark.parametrize("replicas", [False, True])
def test_the_check_the_zero_sums_and_the_chunk_trace_the_step_once(replicas):
  """``control_flow_is_slow``, ``zero_metrics`` and the chunk's compilation (the step inside its
  scan and cond, ``vmap``-ed with replicas) share one trace of the step; another step function
  is traced anew (the control: the count sees every trace)."""
  from prunejax.models import build_model
  traces = []

  def counted(tag):
    def step(state, pstate, batch):
      traces.append(tag)
      return online.FullData().train_step(state, pstate, batch)
    return step

  data = fused.DeviceData(jnp.zeros((6, 8, 8, 1)), jnp.arange(6, dtype=jnp.int32) % 3,
                          jnp.arange(6, dtype=jnp.int32))
  st = train.create_train_state(build_model("mlp", 3, hidden=(8,)), optax.sgd(0.1),
                                jax.random.key(0), data.x[:2])
  rows = np.array([[0, 1], [2, 3], [4, -1]], np.int32)  # K = 3 steps of B = 2
  step = counted("a")
  assert not fused.control_flow_is_slow(step, st, (), data, rows, {})
  args = (st, (), data, rows, {})
  if replicas:
    args = (fused.stack([st, st]), (), data, np.stack([rows, rows]), {})
  zeros = fused.zero_metrics(step, *args, replicas=replicas)
  fused.make_runner(step, replicas=replicas).lower(*args, np.int32(0), np.int32(3), zeros)
  assert traces == ["a"]
  other = counted("b")
  fused.zero_metrics(other, *args, replicas=replicas)
  assert traces == ["a", "b"]


def test_replicas_in_one_program_equal_their_sequential_runs(tmp_path):
  """Three seeds (and two subsets of equal size) vmapped: each replica equals its own fused run
  to float32 rounding (a batched matmul reduces in another order than R separate ones)."""
  ctx = _ctx(tmp_path, vmap_replicas="on")
  rng = np.random.default_rng(0)
  all_ids = np.sort(ctx.ds.train.ids)
  ids_list = [all_ids, np.sort(rng.permutation(all_ids)[:140]), all_ids]
  seeds = [0, 1, 2]
  assert trainer.groupable(ctx, [len(i) for i in ids_list])
  group = trainer.train_models(ctx, ids_list, seeds, pruner=online.BatchTopK(0.5, "loss", 32))
  for ids, seed, g in zip(ids_list, seeds, group):
    single = trainer.train_model(ctx, ids, seed=seed, pruner=online.BatchTopK(0.5, "loss", 32))
    assert (g.steps, g.forward, g.backward) == (single.steps, single.forward, single.backward)
    for a, b in zip(single.history, g.history):
      assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["accuracy"] - b["accuracy"]) < 1e-6
    _leaves_close(single.state.params, g.state.params, 1e-5)
  # Replicas that cannot share a program (another schedule length; InfoBatch's epochs) run one
  # after another and still give each run's own result.
  assert not trainer.groupable(ctx, [150, 60])
  assert not trainer.groupable(ctx, [150, 150], online.InfoBatch(0.5, 0.67))
  mixed = trainer.train_models(ctx, [all_ids, all_ids[:60]], [0, 1])
  alone = trainer.train_model(ctx, all_ids[:60], seed=1)
  assert mixed[1].history == alone.history


def test_rewind_point_inside_a_chunk_equals_the_host_loops(tmp_path):
  ctx = _ctx(tmp_path / "c", vmap_replicas="on")
  ids = ctx.ds.train.ids
  host = trainer.train_model(_ctx(tmp_path / "a", fused=False), ids, seed=0, rewind_step=7)
  got = trainer.train_model(_ctx(tmp_path / "b"), ids, seed=0, rewind_step=7)
  assert int(got.rewind_point.step) == int(host.rewind_point.step) == 7
  _leaves_close(host.rewind_point.params, got.rewind_point.params, 1e-5)
  group = trainer.train_models(ctx, [ids] * 2, [0, 5], rewind_step=7)
  _leaves_close(got.rewind_point.params, group[0].rewind_point.params, 1e-5)
  single5 = trainer.train_model(ctx, ids, seed=5, rewind_step=7)
  _leaves_close(single5.rewind_point.params, group[1].rewind_point.params, 1e-5)


def test_nan_stops_the_fused_run_naming_epoch_step_and_example_ids(tmp_path):
  x = np.random.default_rng(0).random((96, 8, 8, 1)).astype(np.float32)
  x[7] = np.nan
  y = np.arange(96) % 10
  data.register_dataset("fused_with_a_nan", lambda **_: data.Dataset(
      "fused_with_a_nan", data.ArraySource(x[:64], y[:64], np.arange(1000, 1064)),
      data.ArraySource(x[64:], y[64:], np.arange(2000, 2032)), 10, "image", {"scale": 1.0}))
  cfg = digits.get_config("quick")
  cfg.dataset.name, cfg.dataset.num_train = "fused_with_a_nan", None
  cfg.train.vmap_replicas = "on"
  common.prepare_workdir(str(tmp_path), cfg, False).release()
  ctx = common.setup(cfg, str(tmp_path))
  assert ctx.device_data() is not None
  with pytest.raises(train.NumericalError,
                     match=r"epoch 0, step \d+ of this epoch; examples of that batch: \[") as e:
    trainer.train_model(ctx, ctx.ds.train.ids, seed=0, desc="dense r0")
  assert "1007" in str(e.value)
  with pytest.raises(train.NumericalError, match=r"replica 1, epoch 0.*1007"):
    trainer.train_models(ctx, [np.arange(1010, 1064), np.arange(1000, 1054)], [0, 1])


def test_a_stop_request_saves_at_the_chunk_and_resumes_exactly(tmp_path, monkeypatch):
  from prunejax import checkpoint
  ctx = _ctx(tmp_path, steps_per_dispatch=2, checkpoint_every_steps=4, vmap_replicas="on")
  ids = ctx.ds.train.ids
  ref = trainer.train_models(ctx, [ids, ids], [0, 1])
  calls = []

  def stop_at_step(steps=1):
    calls.append(steps)
    # Chunks of 2 that also end at every 4th step: 2, 4, 5 | 7, 8, 10 | ...; the stop comes
    # with the chunk that ends at step 7, in the second epoch.
    return sum(calls) >= 7

  monkeypatch.setattr(fused_loop, "stop_at_step", stop_at_step)
  with pytest.raises(checkpoint.Interrupted, match="saved the training run in progress at step 7"):
    trainer.train_models(ctx, [ids, ids], [0, 1], checkpoint="g")
  monkeypatch.undo()
  resumed = trainer.train_models(ctx, [ids, ids], [0, 1], checkpoint="g")
  for a, b in zip(ref, resumed):
    assert a.steps == b.steps == 15 and a.history == b.history
    _leaves_close(a.state.params, b.state.params, 0)


def test_fused_config_fields_are_checked(tmp_path):
  cfg = digits.get_config("quick")
  for field, value, match in [("train.fused", "yes", "train.fused='yes'"),
                              ("train.steps_per_dispatch", -2, "train.steps_per_dispatch=-2"),
                              ("train.vmap_replicas", "yes", "train.vmap_replicas='yes'"),
                              ("dataset.device_resident", "always", "dataset.device_resident"),
                              ("dataset.device_budget_mb", -1.0, "dataset.device_budget_mb")]:
    c = digits.get_config("quick")
    sect, leaf = field.split(".")  # a config built by hand, as a user's own may be
    c[sect] = ml_collections.ConfigDict({**c[sect].to_dict(), leaf: value})
    with pytest.raises(ConfigError, match=match):
      fields.validate(c)
  cfg.dataset.device_resident, cfg.dataset.device_budget_mb = "on", 0.01
  common.prepare_workdir(str(tmp_path), cfg, False).release()
  with pytest.raises(ConfigError, match=r"dataset.device_resident='on' but the training split "
                                        r"takes .* MiB on the device, over the budget of 0\.0 MiB"):
    common.setup(cfg, str(tmp_path)).device_data()
  cfg.dataset.device_resident = "auto"
  assert common.setup(cfg, str(tmp_path)).device_data() is None  # streams from the host


def test_auto_choices_on_cpu(tmp_path):
  """On CPU: a step with a convolution runs one per dispatch (XLA runs convolutions inside loops
  about 10x slower there), a dense one a whole epoch per dispatch; replicas run one after another
  unless train.vmap_replicas="on"."""
  from prunejax.models import build_model
  assert jax.default_backend() == "cpu"
  data = fused.DeviceData(jnp.zeros((6, 8, 8, 1)), jnp.zeros(6, jnp.int32), jnp.arange(6))
  rows = np.zeros((1, 4), np.int32)
  slow = {}
  for name, kw in (("cnn", dict(features=(4,), dense=8)), ("mlp", dict(hidden=(8,)))):
    state = train.create_train_state(build_model(name, 3, **kw), optax.sgd(0.1),
                                     jax.random.key(0), data.x[:4])
    slow[name] = fused.control_flow_is_slow(online.FullData().train_step, state, (), data, rows, {})
  assert slow == {"cnn": True, "mlp": False}
  ctx = _ctx(tmp_path)
  assert not trainer.groupable(ctx, [150, 150])


def test_imp_seeds_in_one_program_equal_one_after_another(tmp_path):
  """IMP's replicates train each round together (masks and rewind points per replica); every
  round's row equals the sequential run's, to float32 rounding."""
  from experiments import run
  from experiments.configs import imp
  got = {}
  for v in ("off", "on"):
    cfg = imp.get_config("quick")
    cfg.replicates, cfg.train.vmap_replicas, cfg.strategies = 2, v, ("imp",)
    cfg.dataset.num_train, cfg.train.epochs = 150, 1
    got[v] = run.run(cfg, str(tmp_path / v))
  assert len(got["on"]) == len(got["off"]) == 6
  for a, b in zip(got["off"], got["on"]):
    assert (a["replicate"], a["round"], a["sparsity"], a["steps"]) == (
        b["replicate"], b["round"], b["sparsity"], b["steps"])
    assert abs(a["history"][-1]["loss"] - b["history"][-1]["loss"]) < 1e-5
    assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 1 / 359 + 1e-9  # at most one example


@pytest.mark.parametrize("fused_path", [False, True])
def test_eval_every_epoch_records_each_epochs_test_accuracy_outside_the_clock(tmp_path, fused_path):
  """``train.eval_every_epoch``: each epoch's history gets the test accuracy of that epoch's
  state (checked against the caller's own on_epoch, which still runs, on the same state), the steps
  so far and nondecreasing training seconds; the training itself is unchanged; replicas then train
  one by one."""
  ctx = _ctx(tmp_path / "a", fused=fused_path, eval_every_epoch=True)
  ids = ctx.ds.train.ids
  seen = []  # the states are donated to the next epoch: evaluate them here
  run = trainer.train_model(ctx, ids, seed=3, pruner=online.InfoBatch(0.5, 0.67),
                            on_epoch=lambda e, s: seen.append((e, trainer.evaluate(ctx, s))))
  assert [h["epoch"] for h in run.history] == [0, 1, 2]
  steps = [h["steps"] for h in run.history]
  assert steps[-1] == run.steps and steps == sorted(steps) and len(set(steps)) == 3
  secs = [h["train_seconds"] for h in run.history]
  assert all(0 <= a <= b for a, b in zip(secs, secs[1:])) and run.eval_seconds > 0
  assert secs[-1] <= run.wall + 1e-6 + run.eval_seconds
  assert [e for e, _ in seen] == [0, 1, 2]
  for h, (_, acc) in zip(run.history, seen):
    assert h["test_accuracy"] == acc
  assert run.history[-1]["test_accuracy"] == pytest.approx(trainer.evaluate(ctx, run.state))
  # the same run without evaluation: the same steps and parameters
  plain = _ctx(tmp_path / "b", fused=fused_path)
  again = trainer.train_model(plain, ids, seed=3, pruner=online.InfoBatch(0.5, 0.67))
  assert again.steps == run.steps and "test_accuracy" not in again.history[-1]
  _leaves_close(again.state.params, run.state.params, 0)
  # with per-epoch evaluation, replicas are never grouped into one program
  grouped = _ctx(tmp_path / "c", vmap_replicas="on", eval_every_epoch=True)
  assert not trainer.groupable(grouped, [150, 150])
  assert trainer.groupable(_ctx(tmp_path / "d", vmap_replicas="on"), [150, 150])
