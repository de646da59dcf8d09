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
  scores = jnp.array([0.5, 9.0, 2.0, 2.0, 100.0, 1.0])
  mask = jnp.array([True, True, True, True, False, True])
  np.testing.assert_array_equal(online.select_top_k(scores, mask, 3), [1, 2, 3])
  # fewer real rows than k: padding fills the last slots
  idx = online.select_top_k(scores, jnp.array([True, False, False, False, False, False]), 2)
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
  model = build_model("mlp", 3, hidden=(8,))
  state = train.create_train_state(model, optax.sgd(0.3), jax.random.key(0), jnp.zeros((1, 4)))
  x = jax.random.normal(jax.random.key(1), (6, 4))
  batch = {"x": x, "y": jnp.array([0, 1, 2, 0, 1, 2]),
           "mask": jnp.array([True, True, True, True, True, False])}
  return state, batch


def test_batch_pruned_step_equals_a_train_step_on_the_highest_loss_rows():
  state, batch = _tiny()
  logits = state.model.apply({"params": state.params}, batch["x"])
  ce = np.array(train.per_example_ce(logits, batch["y"]))
  ce[~np.asarray(batch["mask"])] = -np.inf
  top = np.argsort(-ce, kind="stable")[:3]
  ref_state, _ = train.train_step(state, {k: v[top] for k, v in batch.items()})
  got_state, m = online.batch_pruned_train_step(state, batch, k=3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_state.params,
               ref_state.params)
  # honest count: 5 real rows forwarded to select, then the 3 selected forwarded again to train
  assert float(m["forward_count"]) == 5 + 3 and float(m["count"]) == 3


def _ib_state(ids, scores):
  return online.InfoBatchState(jnp.asarray(ids, jnp.int32), jnp.asarray(scores, jnp.float32))


def test_infobatch_plan_prunes_only_well_learned_and_is_unbiased():
  state = _ib_state([3, 8, 20, 41], [1.0, 2.0, 3.0, 10.0])  # mean 4: ids 3, 8, 20 well learned
  keeps = []
  for i in range(400):
    keep, w = online.infobatch_plan(state, jax.random.key(i), prune_ratio=0.5, epoch=0,
                                    num_epochs=10)
    keep, w = np.asarray(keep), np.asarray(w)
    assert keep[3] and w[3] == 1.0
    np.testing.assert_array_equal(w[:3], np.where(keep[:3], 2.0, 0.0))
    keeps.append(keep * w)
  # E[keep * weight] = 1 for every example: the expected gradient is that of full data.
  np.testing.assert_allclose(np.mean(keeps, axis=0), 1.0, atol=0.12)
  keep, w = online.infobatch_plan(state, jax.random.key(0), prune_ratio=0.5, epoch=9,
                                  num_epochs=10, delta=0.875)
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
  keep, _ = online.infobatch_plan(state, jax.random.key(1), prune_ratio=0.9, epoch=epoch,
                                  num_epochs=num_epochs, delta=delta)
  assert (not np.all(np.asarray(keep))) == prunes
  # A traced epoch gives the same plan (the plan can live inside a jitted loop).
  traced = jax.jit(lambda e: online.infobatch_plan(state, jax.random.key(1), prune_ratio=0.9,
                                                   epoch=e, num_epochs=num_epochs,
                                                   delta=delta)[0])(epoch)
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(keep))


def test_infobatch_update_writes_losses_of_real_rows_by_id():
  state = online.infobatch_init(np.array([40, 10, 30, 20, 50]))
  np.testing.assert_array_equal(state.ids_N, [10, 20, 30, 40, 50])
  state = online.infobatch_update(state, jnp.array([50, 20, 10, 99]),
                                  jnp.array([0.5, 0.25, 7.0, 1.0]),
                                  jnp.array([True, True, False, True]))
  # id 10 is a padding row here, id 99 is unknown: neither changes anything.
  np.testing.assert_allclose(state.scores_N, [3.0, 0.25, 3.0, 3.0, 0.5])


def test_infobatch_train_step_records_the_training_forward_losses():
  state, batch = _tiny()
  batch = {**batch, "id": jnp.arange(6) * 3 + 100, "weight": jnp.ones(6)}
  logits = state.model.apply({"params": state.params}, batch["x"])
  ce = train.per_example_ce(logits, batch["y"])
  _, ib, _ = online.infobatch_train_step(state, online.infobatch_init(np.arange(6) * 3 + 100),
                                         batch)
  np.testing.assert_allclose(ib.scores_N[:5], ce[:5], rtol=1e-6)
  assert float(ib.scores_N[5]) == 3.0  # the padding row kept its initial score


def test_infobatch_pruner_plans_by_id_whatever_the_order_of_ids():
  pruner = online.InfoBatch(prune_ratio=0.5, delta=1.0)
  ids = np.array([7, 3, 11, 5, 9, 1])
  state = online.infobatch_update(pruner.init(ids), jnp.asarray(ids), jnp.arange(6.0),
                                  jnp.ones(6, bool))
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
