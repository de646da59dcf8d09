"""Stopping cleanly on a signal or a preemption notice.

:func:`install_signal_handlers` turns SIGTERM and SIGINT into a request that training loops honour
at the next step (:func:`stop_at_step`: save a mid-run checkpoint, then raise :class:`Interrupted`)
and :meth:`prunejax.checkpoint.Units.run` at the next unit (:func:`check_stop`). With several
processes every process stops at the same step through JAX's preemption service (a preemption notice
on cloud TPUs is a SIGTERM: the same path). :func:`kill_point` is the fault injection that tests of
resumption use.

The names are re-exported by :mod:`prunejax.checkpoint`.
"""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax

log = logging.getLogger("prunejax")



class Interrupted(BaseException):
  """The run stopped on SIGTERM or SIGINT at a step or unit boundary, its state saved up to there.

  A ``BaseException`` (like ``KeyboardInterrupt``) so that no ``except Exception`` on the way out
  swallows it. ``exit_code`` is ``128 + signum`` (143 for SIGTERM, 130 for SIGINT).
  """

  def __init__(self, signum: int, detail: str):
    super().__init__(detail)
    self.signum = int(signum)
    self.detail = detail

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name


_STOP: dict[str, Any] = {"signum": None}
_STEPS = [0]  # training steps taken by this process, the step ids of JAX's preemption sync


def request_stop(signum: int = signal.SIGTERM) -> None:
  """Asks the run to stop at the next training step or unit boundary (what the signal handlers
  do)."""
  _STOP["signum"] = int(signum)


def stop_requested() -> int | None:
  """The signal number of a pending stop request, or None."""
  return _STOP["signum"]


def clear_stop() -> None:
  """Forgets a stop request (for a process that runs several experiments, e.g. tests)."""
  _STOP["signum"] = None


def stop_at_step(steps: int = 1) -> bool:
  """Whether training must save and stop after the step that just ended; call it after every step
  (or after every chunk of ``steps`` steps run in one dispatch).

  One process: whether a stop was requested. Several: whether every process has reached the step
  that JAX's preemption service chose after a SIGTERM to any of them
  (``multihost_utils.reached_preemption_sync_point``), so all save the same step together.
  """
  _STEPS[0] += steps
  kill_point("step", steps)
  if _multi_process():
    from jax.experimental import multihost_utils
    try:
      return bool(multihost_utils.reached_preemption_sync_point(_STEPS[0]))
    except RuntimeError:  # the preemption service is disabled
      return False
  return _STOP["signum"] is not None


_KILL_COUNTS = {"step": 0, "unit": 0}
KILL_AT_ENV = "PRUNEJAX_KILL_AT"


def kill_point(kind: str, count: int = 1) -> None:
  """Fault injection for tests of resumption: with ``PRUNEJAX_KILL_AT=KIND:N`` in the environment
  (``step:N`` or ``unit:N``) the process kills itself with SIGKILL once it has completed N training
  steps (at the end of the dispatch that reaches N, when steps run in chunks), or right after the
  N-th unit record it writes. ``KIND:N:SIGNAME`` (``step:3:SIGTERM``) sends that signal instead, as
  a user or a scheduler would. A test then knows
  exactly where the run died, however fast or slow the machine is. Unset: does nothing."""
  spec = os.environ.get(KILL_AT_ENV)
  if not spec:
    return
  want, n, *name = spec.split(":") + ([""] if ":" not in spec else [])
  if (want not in _KILL_COUNTS or not n.isdigit() or len(name) > 1
      or name and name[0] not in signal.Signals.__members__):
    raise ValueError(f"{KILL_AT_ENV}={spec!r}; expected 'step:N' or 'unit:N', optionally "
                     "followed by ':SIGNAME'")
  before = _KILL_COUNTS[kind]
  _KILL_COUNTS[kind] += count
  if kind == want and before < int(n) <= _KILL_COUNTS[kind]:
    os.kill(os.getpid(), signal.Signals[name[0]] if name else signal.SIGKILL)


def interrupted_at_step(step: int, saved: bool) -> Interrupted:
  """The :class:`Interrupted` a training loop raises after :func:`stop_at_step` said to stop."""
  return Interrupted(_STOP["signum"] or signal.SIGTERM,
                     f"saved the training run in progress at step {step}" if saved else
                     f"stopped a training run at step {step} (it has no mid-run checkpoint and "
                     "starts over)")


def check_stop(where: str) -> None:
  """Raises :class:`Interrupted` at a unit boundary if a stop was requested (one process only:
  several processes stop together at a training step, :func:`stop_at_step`)."""
  if _STOP["signum"] is not None and not _multi_process():
    raise Interrupted(_STOP["signum"], f"stopped before {where}")


def _multi_process() -> bool:
  return jax.distributed.is_initialized()  # never starts a backend (safe in a signal handler)


def _on_signal(signum, frame):  # noqa: ARG001 - the signal module's handler signature
  if _STOP["signum"] is not None:  # a second signal: stop at once
    raise Interrupted(signum, "stopped at once on a second signal; the work since the last "
                      "finished unit or checkpoint is lost")
  request_stop(signum)
  if signum == signal.SIGINT and _multi_process():
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption service makes every process stop
  log.warning("received %s: stopping at the next step (send it again to stop at once)",
              signal.Signals(signum).name)


def install_signal_handlers() -> None:
  """SIGTERM and SIGINT request a stop at the next step or unit (a second one stops at once).

  Call from the main thread, before ``jax.distributed.initialize``: with several processes JAX's
  preemption service then takes SIGTERM over and makes every process stop at the same step, and
  SIGINT is passed on to it as a SIGTERM.
  """
  signal.signal(signal.SIGINT, _on_signal)
  signal.signal(signal.SIGTERM, _on_signal)
