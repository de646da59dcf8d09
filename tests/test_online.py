"""Online data pruning: top-k selection, InfoBatch by id (plan, update, epoch boundary), the
batch-pruned step, and the pruner objects a training loop takes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax import online, train
from prunejax.errors import ConfigError
from prunejax.models import build_model


def test_select_top_k_prefers_high_scores_skips_padding_and_breaks_ties_by_row():
  scores = np.array([0.5, 9.0, 2.0, 2.0, 100.0, 1.0], np.float32)
  mask = np.array([True, True, True, True, False, True])
  one_real = np.array([True, False, False, False, False, False])
  # Both selections in one compiled program (op by op, ~10 single ops compiled).
  top3, idx = map(np.asarray, jax.jit(lambda s, m, m1: (
      online.select_top_k(s, m, 3), online.select_top_k(s, m1, 2)))(scores, mask, one_real))
  np.testing.assert_array_equal(top3, [1, 2, 3])
  # fewer real rows than k: padding fills the last slots
  assert int(idx[0]) == 0 and not bool(mask[int(idx[1])] & (int(idx[1]) == 0))


def test_reducible_loss_needs_irreducible_losses():
  ce = jnp.array([1.0, 2.0])
  np.testing.assert_allclose(
      online.selection_score(ce, {"irreducible_loss": jnp.array([0.5, 2.5])}, "reducible_loss"),
      [0.5, -0.5])
  with pytest.raises(ConfigError, match="irreducible_loss"):
    online.selection_score(ce, {}, "reducible_loss")
  with pytest.raises(ConfigError, match="batch_pruning.score='rho'"):
    online.selection_score(ce, {}, "rho")


def _tiny():
  """A tiny MLP's train state and a batch of host arrays (the last row padding)."""
  model = build_model("mlp", 3, hidden=(8,))
  state = train.create_train_state(model, optax.sgd(0.3), jax.random.key(0),
                                   np.zeros((1, 4), np.float32))
  x = np.random.default_rng(1).normal(size=(6, 4)).astype(np.float32)
  batch = {"x": x, "y": np.array([0, 1, 2, 0, 1, 2], np.int32),
           "mask": np.array([True, True, True, True, True, False])}
  return state, batch


@jax.jit  # one compiled forward pass (op by op, each call compiled ~20 single ops)
def _forward_ce(state, x, y):
  """The per-example losses of ``state``'s model on ``(x, y)``, f32[B]."""
  return train.per_example_ce(state.model.apply({"params": state.params}, x), y)


def test_batch_pruned_step_equals_a_train_step_on_the_highest_loss_rows():
  state, batch = _tiny()
  ce = np.array(_forward_ce(state, batch["x"], batch["y"]))
  ce[~batch["mask"]] = -np.inf
  top = np.argsort(-ce, kind="stable")[:3]
  # The reference step on the rows chosen here and the pruned step in one compiled program (op by
  # op, the two steps compiled ~140 single ops).
  ref_state, (got_state, m) = jax.jit(lambda s, rows, b: (
      train.train_step(s, rows)[0], online.batch_pruned_train_step(s, b, k=3)))(
          state, {k: v[top] for k, v in batch.items()}, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_state.params,
               ref_state.params)
  # honest count: 5 real rows forwarded to select, then the 3 selected forwarded again to train
  assert float(m["forward_count"]) == 5 + 3 and float(m["count"]) == 3


def _ib_state(ids, scores):
  return online.InfoBatchState(np.asarray(ids, np.int32), np.asarray(scores, np.float32))


def test_infobatch_plan_prunes_only_well_learned_and_is_unbiased():
  state = _ib_state([3, 8, 20, 41], [1.0, 2.0, 3.0, 10.0])  # mean 4: ids 3, 8, 20 well learned
  # The 400 plans (keys 0..399) and the last epoch's in one compiled program; lax.map traces the
  # plan once and runs it key by key (op by op, 400 calls dispatched ~4,000 single ops).
  plans, last = jax.jit(lambda st, seeds: (
      jax.lax.map(lambda i: online.infobatch_plan(st, jax.random.key(i), prune_ratio=0.5,
                                                  epoch=0, num_epochs=10), seeds),
      online.infobatch_plan(st, jax.random.key(0), prune_ratio=0.5, epoch=9, num_epochs=10,
                            delta=0.875)))(state, np.arange(400, dtype=np.int32))
  keeps = []
  for keep, w in zip(*map(np.asarray, plans)):
    assert keep[3] and w[3] == 1.0
    np.testing.assert_array_equal(w[:3], np.where(keep[:3], 2.0, 0.0))
    keeps.append(keep * w)
  # E[keep * weight] = 1 for every example: the expected gradient is that of full data.
  np.testing.assert_allclose(np.mean(keeps, axis=0), 1.0, atol=0.12)
  keep, w = last
  assert np.all(np.asarray(keep)) and np.all(np.asarray(w) == 1.0)


@pytest.mark.parametrize("epoch,num_epochs,delta,prunes", [
    (28, 100, 0.29, True),    # 28 < 29.0 (0.29 * 100 is 28.999... in floating point)
    (29, 100, 0.29, False),
    (17, 20, 0.875, True),    # the paper's boundary: epochs below delta * num_epochs = 17.5
    (18, 20, 0.875, False),
    (0, 1, 1.0, True),
])
def test_infobatch_stops_pruning_at_delta_times_epochs(epoch, num_epochs, delta, prunes):
  state = _ib_state(np.arange(64), np.linspace(0, 1, 64))
  plan = lambda st, e: online.infobatch_plan(st, jax.random.key(1), prune_ratio=0.9, epoch=e,
                                             num_epochs=num_epochs, delta=delta)[0]
  # The plan of the Python int epoch and that of the same epoch traced, in one compiled program
  # (op by op, the first compiled ~13 single ops).
  keep, traced = jax.jit(lambda st, e: (plan(st, epoch), plan(st, e)))(state, epoch)
  assert (not np.all(np.asarray(keep))) == prunes
  # A traced epoch gives the same plan (the plan can live inside a jitted loop).
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(keep))


def test_infobatch_update_writes_losses_of_real_rows_by_id():
  state = online.infobatch_init(np.array([40, 10, 30, 20, 50]))
  np.testing.assert_array_equal(state.ids_N, [10, 20, 30, 40, 50])
  state = jax.jit(online.infobatch_update)(state, np.array([50, 20, 10, 99], np.int32),
                                           np.array([0.5, 0.25, 7.0, 1.0], np.float32),
                                           np.array([True, True, False, True]))
  # id 10 is a padding row here, id 99 is unknown: neither changes anything.
  np.testing.assert_allclose(state.scores_N, [3.0, 0.25, 3.0, 3.0, 0.5])


def test_infobatch_train_step_records_the_training_forward_losses():
  state, batch = _tiny()
  batch = {**batch, "id": np.arange(6, dtype=np.int32) * 3 + 100, "weight": np.ones(6, np.float32)}
  ce = np.asarray(_forward_ce(state, batch["x"], batch["y"]))
  ib = online.infobatch_init(np.arange(6) * 3 + 100)  # on the host: it checks the ids there
  # The step compiled, as the trainer runs it (op by op, ~60 single ops compiled).
  _, ib, _ = jax.jit(online.infobatch_train_step)(state, ib, batch)
  scores_N = np.asarray(ib.scores_N)
  np.testing.assert_allclose(scores_N[:5], ce[:5], rtol=1e-6)
  assert float(scores_N[5]) == 3.0  # the padding row kept its initial score


def test_infobatch_pruner_plans_by_id_whatever_the_order_of_ids():
  pruner = online.InfoBatch(prune_ratio=0.5, delta=1.0)
  ids = np.array([7, 3, 11, 5, 9, 1])
  state = jax.jit(online.infobatch_update)(pruner.init(ids), ids.astype(np.int32),
                                           np.arange(6, dtype=np.float32), np.ones(6, bool))
  a = pruner.plan(state, ids, seed=0, epoch=1, num_epochs=4)
  b = pruner.plan(state, ids[::-1], seed=0, epoch=1, num_epochs=4)
  np.testing.assert_array_equal(a.ids, b.ids)
  np.testing.assert_array_equal(a.columns["weight"], b.columns["weight"])
  assert set(a.ids) <= set(ids) and {5, 9, 1} <= set(a.ids)  # the highest losses stay
  with pytest.raises(ConfigError, match="ids differ"):
    pruner.plan(state, ids[:3], seed=0, epoch=1, num_epochs=4)


def test_batch_top_k_needs_irreducible_losses_for_reducible_loss():
  pruner = online.BatchTopK(0.5, "reducible_loss", 8)
  with pytest.raises(ConfigError, match="with_irreducible_loss"):
    pruner.plan((), np.arange(4), seed=0, epoch=0, num_epochs=1)
  plan = pruner.with_irreducible_loss(np.array([3, 2, 1, 0]), np.array([0.3, 0.2, 0.1, 0.0])).plan(
      (), np.array([1, 3]), seed=0, epoch=0, num_epochs=1)
  np.testing.assert_allclose(plan.columns["irreducible_loss"], [0.1, 0.3])
  assert online.count_of(0.5, 5) == 3 and online.count_of(0.25, 2) == 1


def test_random_epoch_subset():
  ids = np.arange(100, 200)
  a = online.random_epoch_subset(ids, 0.3, seed=1, epoch=0)
  assert len(a) == 30 and set(a) <= set(ids)
  np.testing.assert_array_equal(a, online.random_epoch_subset(ids, 0.3, seed=1, epoch=0))
  assert not np.array_equal(a, online.random_epoch_subset(ids, 0.3, seed=1, epoch=1))
  with pytest.raises(ConfigError, match=r"random.keep_fraction=0.0 is out of range"):
    online.random_epoch_subset(ids, 0.0, seed=1, epoch=0)
