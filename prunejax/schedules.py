"""Sparsity schedules: the target sparsity as a pure function of the training step.

A schedule is a ``Callable[[step], sparsity]``, like an optax learning-rate schedule: it works on
Python ints and on traced int32 steps inside a jitted train step, returns 0 before pruning starts,
and is piecewise constant, so :func:`prunejax.optim.masked` recomputes masks exactly at the steps
where its value changes.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from prunejax.errors import ConfigError, check_positive_int, check_range

Schedule = Callable[[Any], jax.Array]


def _check_step(field: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 0:
    raise ConfigError(f"{field}={value!r} is not allowed; expected a non-negative integer")
  return value


def one_shot(sparsity: float, step: int = 0) -> Schedule:
  """Sparsity 0 before ``step``, ``sparsity`` from ``step`` on (prune once)."""
  check_range("sparsity", sparsity, 0.0, 1.0)
  _check_step("step", step)

  def schedule(t):
    return jnp.where(jnp.asarray(t) >= step, jnp.float32(sparsity), jnp.float32(0.0))

  return schedule


def geometric_sparsity(rate: float, rounds: int) -> float:
  """Sparsity after ``rounds`` rounds that each remove ``rate`` of the remaining weights."""
  return 1.0 - (1.0 - rate) ** rounds


def rounds_to_reach(target: float, rate: float) -> int:
  """Fewest rounds of removing ``rate`` of the remaining weights that reach ``target`` sparsity."""
  check_range("rate", rate, 0.0, 1.0, lo_open=True, hi_open=True)
  check_range("target", target, 0.0, 1.0, hi_open=True)
  if target == 0.0:
    return 0
  r = math.ceil(math.log1p(-target) / math.log1p(-rate) - 1e-9)
  while geometric_sparsity(rate, r) < target - 1e-12:
    r += 1
  return r


def geometric_levels(rate: float, target: float, *, remaining: bool = False) -> list[float]:
  """Levels after each round of removing ``rate`` of what remains until ``target`` is reached.

  Sparsities ``round(1 - (1 - rate) ** r, 6)`` for the rounds before the last, then exactly
  ``target`` (IMP's schedule); with ``remaining=True``, the fractions that remain,
  ``round((1 - rate) ** r, 6)``, ending at ``target`` read as the fraction to keep (iterative data
  pruning).
  """
  total = rounds_to_reach(1.0 - target if remaining else target, rate)
  level = (lambda r: (1.0 - rate) ** r) if remaining else (lambda r: 1.0 - (1.0 - rate) ** r)
  return [round(level(r), 6) for r in range(1, total)] + [target]


def iterative(rate: float, steps_per_round: int, *, num_rounds: int | None = None,
              target: float | None = None, start_step: int = 0) -> Schedule:
  """Iterative geometric pruning, as iterative magnitude pruning (IMP) does.

  Round ``r = 1, 2, ...`` starts at step ``start_step + (r - 1) * steps_per_round`` and brings the
  sparsity to ``1 - (1 - rate) ** r``. With ``target`` the sparsity is capped at it, so the last
  round lands on the target exactly; ``num_rounds`` then defaults to the fewest rounds that reach
  it.

  Args:
    rate: fraction of the remaining weights removed per round (0.2 in Frankle and Carbin).
    steps_per_round: training steps per round.
    num_rounds: number of rounds.
    target: final sparsity.
    start_step: step of the first round.

  Returns:
    The schedule.

  Raises:
    ConfigError: an argument is out of range, neither ``num_rounds`` nor ``target`` is given, or
      ``num_rounds`` rounds cannot reach ``target``.

  References:
    Frankle and Carbin 2019, "The Lottery Ticket Hypothesis: Finding Sparse, Trainable Neural
    Networks", Sec. 2 (iterative pruning).
  """
  check_range("rate", rate, 0.0, 1.0, lo_open=True, hi_open=True)
  check_positive_int("steps_per_round", steps_per_round)
  _check_step("start_step", start_step)
  if num_rounds is None and target is None:
    raise ConfigError("iterative needs num_rounds or target")
  if target is not None:
    check_range("target", target, 0.0, 1.0, hi_open=True)
    needed = rounds_to_reach(target, rate)
    if num_rounds is None:
      num_rounds = max(needed, 1)
    elif num_rounds < needed:
      raise ConfigError(f"num_rounds={num_rounds} at rate={rate} reaches sparsity "
                        f"{geometric_sparsity(rate, num_rounds):.4f} < target={target}; "
                        f"it needs {needed} rounds")
  check_positive_int("num_rounds", num_rounds)
  cap = 1.0 if target is None else target

  def schedule(t):
    t = jnp.asarray(t, jnp.int32)
    r = jnp.clip((t - start_step) // steps_per_round + 1, 0, num_rounds)
    s = 1.0 - jnp.power(jnp.float32(1.0 - rate), r.astype(jnp.float32))
    return jnp.where(t >= start_step, jnp.minimum(s, cap), 0.0).astype(jnp.float32)

  return schedule


def polynomial(final_sparsity: float, begin_step: int, end_step: int, *,
               initial_sparsity: float = 0.0, frequency: int = 100, power: int = 3) -> Schedule:
  """Gradual magnitude pruning: ``s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t1 - t0)) ** 3``.

  The sparsity rises from ``initial_sparsity`` at ``begin_step`` to ``final_sparsity`` at
  ``end_step``, changing only every ``frequency`` steps (``t`` is rounded down to
  ``begin_step + k * frequency``), and stays there; it is 0 before ``begin_step``.

  Args:
    final_sparsity: ``s_f``.
    begin_step: ``t0``.
    end_step: ``t1 > t0``, the step from which the sparsity is ``s_f``.
    initial_sparsity: ``s_i <= s_f``.
    frequency: steps between mask updates (``Delta t``).
    power: the exponent (3 in Zhu and Gupta).

  Returns:
    The schedule.

  References:
    Zhu and Gupta 2017, "To prune, or not to prune: exploring the efficacy of pruning for model
    compression", Eq. 1.
  """
  check_range("final_sparsity", final_sparsity, 0.0, 1.0)
  check_range("initial_sparsity", initial_sparsity, 0.0, final_sparsity)
  _check_step("begin_step", begin_step)
  _check_step("end_step", end_step)
  if end_step <= begin_step:
    raise ConfigError(f"end_step={end_step} must be above begin_step={begin_step}")
  check_positive_int("frequency", frequency)
  check_positive_int("power", power)
  span = end_step - begin_step

  def schedule(t):
    t = jnp.asarray(t, jnp.int32)
    tq = begin_step + ((t - begin_step) // frequency) * frequency
    frac = jnp.clip((tq - begin_step).astype(jnp.float32) / span, 0.0, 1.0)
    s = final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - frac) ** power
    s = jnp.where(t >= end_step, final_sparsity, s)
    return jnp.where(t >= begin_step, s, 0.0).astype(jnp.float32)

  return schedule


def check_reachable(schedule: Schedule, target: float, num_steps: int, *,
                    atol: float = 1e-6) -> None:
  """Raises :class:`ConfigError` unless ``schedule`` reaches ``target`` within ``num_steps`` steps.

  Steps run from 0 to ``num_steps - 1``; a schedule that ends after training (a polynomial with
  ``end_step >= num_steps``, too few IMP rounds) never prunes to its target.
  """
  check_positive_int("num_steps", num_steps)
  reached = float(schedule(num_steps - 1))
  if reached < target - atol:
    raise ConfigError(f"the sparsity schedule reaches {reached:.4f} by step {num_steps - 1}, below "
                      f"the target {target}; lengthen training or end pruning earlier")
