"""Masked optax training and lottery-ticket rewinding."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from prunejax import masks, optim, schedules
from prunejax.errors import ConfigError
from prunejax.models import MLP

MODEL = MLP(num_classes=3, hidden=(16,))
# Host arrays cast on the host and put as they are: jnp.asarray compiles a copy, and a conversion
# from float64, per shape.
X = jax.device_put(np.random.default_rng(0).standard_normal((32, 2, 2, 2)).astype(np.float32))
BATCH = {"x": X, "y": jax.device_put(np.arange(32) % 3)}


def _params(seed=0):
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), X)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: jax.device_put((0.5 * rng.standard_normal(s.shape)).astype(s.dtype)), shapes)


def _loss(params, batch):
  return masks.mean_cross_entropy(MODEL.apply({"params": params}, batch["x"]), batch)


# The loss as one program (op by op, one forward compiled some thirty single ops).
_loss_jit = jax.jit(_loss)


def _make_step(tx):
  @jax.jit
  def step(params, opt_state):
    grads = jax.grad(_loss)(params, BATCH)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state
  return step


def _train(tx, params, steps):
  step, state = _make_step(tx), tx.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return params, state


@pytest.mark.parametrize("inner", [
    optax.adamw(1e-2, weight_decay=0.1),
    optax.chain(optax.add_decayed_weights(1e-2), optax.sgd(0.1, momentum=0.9)),
], ids=["adamw", "sgd_momentum_wd"])
def test_pruned_weights_stay_exactly_zero_for_100_steps(inner):
  params = _params()
  mask = masks.magnitude(params, 0.7)
  # Pruned weights start nonzero: the first update must set them to exactly zero.
  trained, state = _train(optim.masked(inner, mask), params, 100)
  for p, p0, m in zip(jax.tree.leaves(trained), jax.tree.leaves(params), jax.tree.leaves(mask)):
    p, p0, m = np.asarray(p), np.asarray(p0), np.asarray(m)
    assert np.all(p[~m] == 0.0)
    assert np.all(p[m] != p0[m])  # kept weights train.
  assert optim.get_mask(state) is not None
  assert float(_loss_jit(trained, BATCH)) < float(_loss_jit(masks.apply_mask(params, mask), BATCH))


def test_kept_weights_get_the_inner_update_unchanged():
  params = _params()
  mask = masks.magnitude(params, 0.5)
  pruned = masks.apply_mask(params, mask)
  inner = optax.sgd(0.1)
  masked_tx = optim.masked(inner, mask)

  @jax.jit  # one program for the gradient and both updates, instead of op by op
  def both_updates(params):
    grads = jax.grad(_loss)(params, BATCH)
    masked_updates, _ = masked_tx.update(grads, masked_tx.init(params), params)
    plain_updates, _ = inner.update(grads, inner.init(params), params)
    return masked_updates, plain_updates

  masked_updates, plain_updates = jax.tree.map(np.asarray, both_updates(pruned))
  for u, v, m in zip(jax.tree.leaves(masked_updates), jax.tree.leaves(plain_updates),
                     jax.tree.leaves(mask)):
    m = np.asarray(m)
    np.testing.assert_array_equal(u[m], v[m])
    assert np.all(u[~m] == 0.0)


def test_gradual_pruning_on_a_schedule_inside_jit():
  params = _params()
  n = masks.count_params(params)
  schedule = schedules.polynomial(0.8, begin_step=2, end_step=12, frequency=5)
  mask_fn = functools.partial(masks.magnitude, scope="global")
  tx = optim.masked(optax.sgd(0.05, momentum=0.9), mask_fn=mask_fn, schedule=schedule)
  step, state = _make_step(tx), tx.init(params)
  seen = []
  for t in range(15):
    params, state = step(params, state)
    mask_leaves = jax.tree.leaves(optim.get_mask(state))
    seen.append(int(sum(np.sum(~np.asarray(m)) for m in mask_leaves)))
    zeros = sum(int(np.sum(np.asarray(p) == 0)) for p, m in
                zip(jax.tree.leaves(params), mask_leaves) if not np.all(np.asarray(m)))
    assert zeros >= seen[-1]  # pruned weights are exactly zero.
  schedule_jit = jax.jit(schedule)  # one program for the 15 steps, as the step evaluates it
  expected = [round(float(schedule_jit(t)) * n) for t in range(15)]
  assert seen == expected
  assert seen[-1] == round(0.8 * n)
  assert step._cache_size() == 1


def test_masked_needs_mask_fn_and_schedule_together():
  with pytest.raises(ConfigError, match="together"):
    optim.masked(optax.sgd(0.1), mask_fn=masks.magnitude)


def test_set_and_get_mask_inside_a_chain():
  params = _params()
  tx = optax.chain(optax.clip_by_global_norm(1.0), optim.masked(optax.sgd(0.1)))
  state = tx.init(params)
  assert all(np.all(m) for m in jax.tree.leaves(optim.get_mask(state)))
  mask = masks.magnitude(params, 0.5)
  state = optim.set_mask(state, mask)
  for a, b in zip(jax.tree.leaves(optim.get_mask(state)), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)
  assert optim.get_mask(optax.sgd(0.1).init(params)) is None


def test_lottery_rewind_with_and_without_optimizer_reset():
  params = _params()
  tx = optim.masked(optax.adam(1e-2))
  step, state = _make_step(tx), tx.init(params)
  params, state = step(params, state)
  point = masks.save_rewind_point(1, params, state)  # weights at step k = 1.
  for _ in range(5):
    params, state = step(params, state)
  mask = masks.magnitude(params, 0.6)
  rewound, fresh = masks.rewind(point, mask, tx)
  for r, p0, m in zip(jax.tree.leaves(rewound), jax.tree.leaves(point.params),
                      jax.tree.leaves(mask)):
    np.testing.assert_array_equal(np.asarray(r), np.where(np.asarray(m), np.asarray(p0), 0.0))
  assert int(fresh.count) == 0 and int(fresh.inner_state[0].count) == 0
  for a, b in zip(jax.tree.leaves(optim.get_mask(fresh)), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)
  _, kept = masks.rewind(point, mask, tx, state, reset_optimizer=False)
  assert int(kept.inner_state[0].count) == 1  # the optimizer state saved at step 1.
  for a, b in zip(jax.tree.leaves(optim.get_mask(kept)), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)
  # Training from the rewind point keeps the pruned weights at zero.
  params, _ = step(rewound, fresh)
  for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)):
    assert np.all(np.asarray(p)[~np.asarray(m)] == 0.0)


def test_rewind_state_of_a_train_state():
  from prunejax.train import TrainState
  tx = optim.masked(optax.sgd(0.1, momentum=0.9))
  params = _params()
  state = TrainState(step=jnp.asarray(7, jnp.int32), params=params, batch_stats={},
                     opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)),
                     model=MODEL, tx=tx)
  point = masks.save_rewind_point(2, _params(seed=1))
  mask = masks.magnitude(params, 0.5)
  rewound = masks.rewind_state(state, point, mask)
  assert int(rewound.step) == 2
  for r, p0, m in zip(jax.tree.leaves(rewound.params), jax.tree.leaves(point.params),
                      jax.tree.leaves(mask)):
    np.testing.assert_array_equal(np.asarray(r), np.where(np.asarray(m), np.asarray(p0), 0.0))
  for a, b in zip(jax.tree.leaves(optim.get_mask(rewound.opt_state)), jax.tree.leaves(mask)):
    np.testing.assert_array_equal(a, b)


def test_masked_checks_the_mask_against_the_params_exactly():
  params = _params()
  row = jax.tree.map(lambda p: jnp.ones((1,) + p.shape[1:] if p.ndim == 2 else p.shape, bool),
                     params)  # (1, n) for (m, n) kernels.
  tx = optim.masked(optax.sgd(0.1), row)
  with pytest.raises(ConfigError, match=r"leaf dense_0/kernel has shape \(1, 16\); its parameter "
                                        r"has shape \(8, 16\)") as e:
    tx.init(params)
  assert "\n" not in str(e.value)
  missing = {k: v for k, v in masks.ones_mask(params).items() if k != "head"}
  with pytest.raises(ConfigError, match=r"structure of the params \(missing \['head/bias'"):
    optim.masked(optax.sgd(0.1), missing).init(params)
  floats = jax.tree.map(lambda p: jnp.ones(p.shape), params)
  with pytest.raises(ConfigError, match="dtype float32; expected bool"):
    optim.masked(optax.sgd(0.1), floats).init(params)
  tx = optim.masked(optax.sgd(0.1))
  state = tx.init(params)
  with pytest.raises(ConfigError, match="dense_0/kernel has shape"):
    optim.set_mask(state, row)
  with pytest.raises(ConfigError, match="the updates"):
    tx.update(jax.tree.map(lambda p: p[:1], params), state, params)
  bad_fn = lambda p, s: jax.tree.map(lambda x: jnp.ones(x.shape[-1:], bool), p)
  tx = optim.masked(optax.sgd(0.1), mask_fn=bad_fn, schedule=schedules.one_shot(0.5, step=0))
  with pytest.raises(ConfigError, match="mask_fn's mask leaf dense_0/kernel"):
    jax.jit(tx.update)(params, tx.init(params), params)
