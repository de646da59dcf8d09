"""Resumable work: finished units, per-round checkpoints of iterative loops, and mid-run checkpoints.

* :class:`Units`: the result of each finished unit of work (a training run, a round) as one JSON file;
  rerunning skips finished units.
* :class:`RoundCheckpoints`: one orbax checkpoint per finished round of an iterative loop (IMP's
  trained weights, mask and rewind point); a damaged round falls back to the one before.
* :class:`RunCheckpoint`: the state of one training run mid-way (train state, online-pruner state,
  the epoch's plan and position, counters), so a killed or preempted run resumes at the batch where it
  stopped and ends with the same result as an uninterrupted one.

Only process 0 writes JSON; orbax checkpoints are written by all processes together.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import numpy as np

from prunejax.fileio import atomic_write_json
from prunejax.parallel import barrier

log = logging.getLogger("prunejax")


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
    """``fn()``'s result for unit ``key``: read back if finished, else computed and written."""
    done = self.get(key)
    if done is not None:
      return done
    result = fn()
    if jax.process_index() == 0:
      atomic_write_json(self._path(key), result)
    barrier(f"unit {key}")  # every process sees the file before going on
    return result


def _abstract(like: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), like)


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
    self.manager = self._manager()

  def _manager(self):
    return self._ocp.CheckpointManager(
        self.dir, options=self._ocp.CheckpointManagerOptions(max_to_keep=None, create=True))

  def latest(self) -> int | None:
    return self.manager.latest_step()

  def restore_latest(self, like: Any) -> tuple[int | None, Any]:
    """(round, state) of the newest round that restores cleanly; a damaged round is moved aside
    (``<round>.corrupt-<time>``) and the one before it is tried, so the run redoes the lost rounds
    instead of starting over or crashing. (None, None) when no round survives."""
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
        self.manager = self._manager()
    return None, None

  def save(self, rnd: int, tree: Any) -> None:
    self.manager.save(rnd, args=self._ocp.args.StandardSave(jax.device_get(tree)))
    self.manager.wait_until_finished()

  def restore(self, rnd: int, like: Any) -> Any:
    return self.manager.restore(rnd, args=self._ocp.args.StandardRestore(_abstract(like)))

  def close(self) -> None:
    self.manager.close()


class RunCheckpoint:
  """The state of one training run mid-way, in ``directory`` (one orbax checkpoint, replaced on each
  save): a pytree of arrays and a JSON-able ``meta`` dict (epoch, batch, counters, ...).

  ``restore(like)`` returns ``(tree, meta)`` or None when there is nothing (or nothing readable) to
  resume from; ``delete()`` removes it once the run's result is safely stored.
  """

  def __init__(self, directory: str):
    import orbax.checkpoint as ocp
    self._ocp = ocp
    self.dir = os.path.abspath(directory)
    self.manager = ocp.CheckpointManager(
        self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True),
        item_names=("tree", "meta"))
    self._saves = int(self.manager.latest_step() or 0)

  def save(self, tree: Any, meta: dict) -> None:
    self._saves += 1
    args = self._ocp.args.Composite(tree=self._ocp.args.StandardSave(jax.device_get(tree)),
                                    meta=self._ocp.args.JsonSave(meta))
    self.manager.save(self._saves, args=args)
    self.manager.wait_until_finished()

  def meta(self) -> dict | None:
    """The ``meta`` of the saved state (None when there is none or it does not read)."""
    step = self.manager.latest_step()
    if step is None:
      return None
    try:
      got = self.manager.restore(step, args=self._ocp.args.Composite(
          meta=self._ocp.args.JsonRestore()))
    except Exception:  # noqa: BLE001 - damaged: treated as absent.
      return None
    return dict(got["meta"])

  def restore(self, like: Any) -> tuple[Any, dict] | None:
    step = self.manager.latest_step()
    if step is None:
      return None
    try:
      got = self.manager.restore(step, args=self._ocp.args.Composite(
          tree=self._ocp.args.StandardRestore(_abstract(like)), meta=self._ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - a damaged or incompatible checkpoint: start over.
      log.warning("run checkpoint %s does not restore (%s); starting the run over", self.dir,
                  type(e).__name__)
      return None
    return got["tree"], dict(got["meta"])

  def delete(self) -> None:
    self.manager.close()
    if jax.process_index() == 0 and os.path.isdir(self.dir):
      shutil.rmtree(self.dir, ignore_errors=True)
    barrier(f"delete {self.dir}")

  def close(self) -> None:
    self.manager.close()
