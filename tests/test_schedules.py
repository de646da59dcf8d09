"""Sparsity schedules: one-shot, iterative geometric (IMP) and polynomial (Zhu and Gupta)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prunejax import schedules
from prunejax.errors import ConfigError


def _values(schedule, steps):
  return np.array([float(schedule(t)) for t in steps])


def test_one_shot():
  s = schedules.one_shot(0.8, step=3)
  np.testing.assert_allclose(_values(s, [0, 2, 3, 100]), [0.0, 0.0, 0.8, 0.8], rtol=1e-7)


def test_iterative_geometric_rounds():
  s = schedules.iterative(0.2, steps_per_round=10, num_rounds=3, start_step=5)
  expected = [0.0, 0.2, 0.2, 1 - 0.8**2, 1 - 0.8**3, 1 - 0.8**3]
  np.testing.assert_allclose(_values(s, [4, 5, 14, 15, 25, 1000]), expected, rtol=1e-6)
  assert schedules.geometric_sparsity(0.2, 3) == pytest.approx(0.488)


def test_iterative_with_target_caps_the_last_round():
  assert schedules.rounds_to_reach(0.9, 0.2) == 11  # 0.8**10 = 0.107, 0.8**11 = 0.086.
  s = schedules.iterative(0.2, steps_per_round=1, target=0.9)
  np.testing.assert_allclose(_values(s, [9, 10, 11, 50]), [1 - 0.8**10, 0.9, 0.9, 0.9], rtol=1e-6)
  with pytest.raises(ConfigError, match="needs 11 rounds"):
    schedules.iterative(0.2, steps_per_round=1, target=0.9, num_rounds=5)
  with pytest.raises(ConfigError, match="num_rounds or target"):
    schedules.iterative(0.2, steps_per_round=1)


def test_polynomial_matches_zhu_gupta():
  s = schedules.polynomial(0.9, begin_step=10, end_step=110, initial_sparsity=0.1, frequency=25)
  zg = lambda t: 0.9 + (0.1 - 0.9) * (1 - (t - 10) / 100) ** 3
  steps = [0, 9, 10, 34, 35, 60, 109, 110, 500]
  expected = [0.0, 0.0, zg(10), zg(10), zg(35), zg(60), zg(85), 0.9, 0.9]
  np.testing.assert_allclose(_values(s, steps), expected, rtol=1e-6)
  traced = jax.jit(jax.vmap(s))(jnp.asarray(steps))
  np.testing.assert_allclose(np.asarray(traced), expected, rtol=1e-6)
  assert np.all(np.diff(_values(s, range(0, 120))) >= 0)


def test_check_reachable():
  s = schedules.polynomial(0.9, begin_step=0, end_step=100, frequency=10)
  schedules.check_reachable(s, 0.9, num_steps=101)
  with pytest.raises(ConfigError, match="below the target"):
    schedules.check_reachable(s, 0.9, num_steps=100)
  with pytest.raises(ConfigError, match="below the target"):
    schedules.check_reachable(schedules.iterative(0.2, 100, num_rounds=3), 0.488, num_steps=150)


@pytest.mark.parametrize("make,match", [
    (lambda: schedules.polynomial(0.9, 10, 10), "end_step"),
    (lambda: schedules.polynomial(0.5, 0, 10, initial_sparsity=0.6), "initial_sparsity"),
    (lambda: schedules.polynomial(1.5, 0, 10), "final_sparsity"),
    (lambda: schedules.iterative(1.0, 10, num_rounds=2), "rate"),
    (lambda: schedules.iterative(0.2, 0, num_rounds=2), "steps_per_round"),
    (lambda: schedules.one_shot(0.5, step=-1), "step"),
])
def test_schedule_config_errors(make, match):
  with pytest.raises(ConfigError, match=match):
    make()
