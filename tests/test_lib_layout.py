"""The library's split modules: moved names stay importable (the same objects) from the modules that
held them, the id check one floor down, and no lower room importing a higher one."""

import ast
import importlib
import pathlib

import numpy as np
import pytest

from prunejax.errors import DataError, check_unique_ids

# (old module, new module, names moved from old to new and re-exported by old)
MOVED = [
    ("prunejax.checkpoint", "prunejax.stopping",
     ["Interrupted", "KILL_AT_ENV", "check_stop", "clear_stop", "install_signal_handlers",
      "interrupted_at_step", "kill_point", "request_stop", "stop_at_step", "stop_requested"]),
    ("prunejax.checkpoint", "prunejax.workdir_lock", ["NoLock", "WorkdirLock"]),
    ("prunejax.train", "prunejax.optimizers",
     ["OPTIMIZERS", "SCHEDULES", "TracedScheduleState", "make_optimizer", "make_schedule",
      "set_schedule", "traced_lr_schedule"]),
    ("prunejax.scores.grand", "prunejax.scores.ghost_taps",
     ["GhostPlan", "ghost_plan", "site_grads", "_after", "_dummies", "_layer_tap", "_like",
      "_site_tap", "_zeros_B"]),
]


@pytest.mark.parametrize("old,new,names", MOVED, ids=[f"{o}<-{n}" for o, n, _ in MOVED])
def test_moved_names_are_the_same_objects_at_the_old_path(old, new, names):
  old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
  for name in names:
    assert getattr(old_mod, name) is getattr(new_mod, name), name


def test_stop_requests_are_one_state_whichever_module_asks():
  from prunejax import checkpoint, stopping
  try:
    checkpoint.request_stop(15)
    assert stopping.stop_requested() == 15
    with pytest.raises(stopping.Interrupted, match="stopped before unit u0") as e:
      checkpoint.check_stop("unit u0")
    assert e.value.exit_code == 143
  finally:
    stopping.clear_stop()
  assert checkpoint.stop_requested() is None


def test_check_unique_ids_hand_cases():
  ids = check_unique_ids("f.ids", np.array([3, 1, 2], np.int32), 3)
  assert ids.dtype == np.int64 and ids.tolist() == [3, 1, 2]
  assert check_unique_ids("f.ids", np.zeros(0, np.float32)).shape == (0,)  # empty: any dtype
  with pytest.raises(DataError, match=r"^f\.ids repeats ids \[1\]; every example needs its own id$"):
    check_unique_ids("f.ids", [1, 2, 1])
  with pytest.raises(DataError, match=r"^f\.ids has 2 ids for 3 examples$"):
    check_unique_ids("f.ids", [1, 2], 3)
  with pytest.raises(DataError, match=r"^f\.ids must be a 1-D array of integer ids; got dtype "
                                      r"float64, shape \(2,\)$"):
    check_unique_ids("f.ids", [1.0, 2.0])
  with pytest.raises(DataError, match=r"shape \(1, 2\)"):
    check_unique_ids("f.ids", [[1, 2]])


def _imports(path: pathlib.Path) -> set[str]:
  """Every module a file imports, at top level or inside functions."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


# A room never imports the rooms above it (deduplication and the audit use the scores, not the
# reverse; the audit uses deduplication).
FLOORS = [("prunejax/scores", ("prunejax.dedup", "prunejax.audit")),
          ("prunejax/dedup", ("prunejax.audit",))]


@pytest.mark.parametrize("room,higher", FLOORS, ids=[r for r, _ in FLOORS])
def test_lower_rooms_do_not_import_higher_ones(room, higher):
  root = pathlib.Path(__file__).resolve().parent.parent
  for path in sorted((root / room).glob("*.py")):
    bad = sorted(m for m in _imports(path) if m.startswith(higher))
    assert not bad, f"{path.relative_to(root)} imports {bad}"
