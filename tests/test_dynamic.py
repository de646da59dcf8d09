"""Online data pruning: top-k selection, InfoBatch's plan and updates, the batch-pruned step."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax import dynamic, train
from prunejax.errors import ConfigError
from prunejax.models import build_model


def test_select_top_k_prefers_high_scores_skips_padding_and_breaks_ties_by_row():
  scores = jnp.array([0.5, 9.0, 2.0, 2.0, 100.0, 1.0])
  mask = jnp.array([True, True, True, True, False, True])
  np.testing.assert_array_equal(dynamic.select_top_k(scores, mask, 3), [1, 2, 3])
  # fewer real rows than k: padding fills the last slots
  idx = dynamic.select_top_k(scores, jnp.array([True, False, False, False, False, False]), 2)
  assert int(idx[0]) == 0 and not bool(mask[int(idx[1])] & (int(idx[1]) == 0))


def test_reducible_loss_needs_irreducible_losses():
  ce = jnp.array([1.0, 2.0])
  np.testing.assert_allclose(
      dynamic.selection_score(ce, {"irreducible_loss": jnp.array([0.5, 2.5])}, "reducible_loss"),
      [0.5, -0.5])
  with pytest.raises(ConfigError, match="irreducible_loss"):
    dynamic.selection_score(ce, {}, "reducible_loss")
  with pytest.raises(ConfigError, match="batch_pruning.score='rho'"):
    dynamic.selection_score(ce, {}, "rho")


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
  got_state, m = dynamic.batch_pruned_train_step(state, batch, k=3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), got_state.params,
               ref_state.params)
  assert float(m["forward_count"]) == 5 and float(m["count"]) == 3


def test_infobatch_plan_prunes_only_well_learned_and_is_unbiased():
  state = dynamic.InfoBatchState(jnp.array([1.0, 2.0, 3.0, 10.0]))  # mean 4: rows 0-2 well learned
  keeps = []
  for i in range(400):
    keep, w = dynamic.infobatch_plan(state, jax.random.key(i), prune_ratio=0.5, epoch=0,
                                     num_epochs=10)
    keep, w = np.asarray(keep), np.asarray(w)
    assert keep[3] and w[3] == 1.0
    np.testing.assert_array_equal(w[:3], np.where(keep[:3], 2.0, 0.0))
    keeps.append(keep * w)
  # E[keep * weight] = 1 for every example: the expected gradient is that of full data.
  np.testing.assert_allclose(np.mean(keeps, axis=0), 1.0, atol=0.12)
  keep, w = dynamic.infobatch_plan(state, jax.random.key(0), prune_ratio=0.5, epoch=9,
                                   num_epochs=10, delta=0.875)
  assert np.all(np.asarray(keep)) and np.all(np.asarray(w) == 1.0)


def test_infobatch_update_writes_losses_of_real_rows_only():
  state = dynamic.infobatch_init(5)
  state = dynamic.infobatch_update(state, jnp.array([4, 1, 0]), jnp.array([0.5, 0.25, 7.0]),
                                   jnp.array([True, True, False]))
  np.testing.assert_allclose(state.scores_N, [3.0, 0.25, 3.0, 3.0, 0.5])


def test_infobatch_train_step_records_the_training_forward_losses():
  state, batch = _tiny()
  batch = {**batch, "position": jnp.arange(6), "weight": jnp.ones(6)}
  logits = state.model.apply({"params": state.params}, batch["x"])
  ce = train.per_example_ce(logits, batch["y"])
  _, ib, _ = dynamic.infobatch_train_step(state, dynamic.infobatch_init(6), batch)
  np.testing.assert_allclose(ib.scores_N[:5], ce[:5], rtol=1e-6)
  assert float(ib.scores_N[5]) == 3.0  # the padding row kept its initial score


def test_random_epoch_subset():
  ids = np.arange(100, 200)
  a = dynamic.random_epoch_subset(ids, 0.3, seed=1, epoch=0)
  assert len(a) == 30 and set(a) <= set(ids)
  np.testing.assert_array_equal(a, dynamic.random_epoch_subset(ids, 0.3, seed=1, epoch=0))
  assert not np.array_equal(a, dynamic.random_epoch_subset(ids, 0.3, seed=1, epoch=1))
  with pytest.raises(ConfigError, match=r"random.keep_fraction=0.0 is out of range"):
    dynamic.random_epoch_subset(ids, 0.0, seed=1, epoch=0)
