"""The layout of ``experiments/``: no import circles (imports inside functions count), the context
and file helpers below everything that uses them, and the old benchmark module names as aliases of
the scripts in ``experiments/bench/``."""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "experiments"


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
  """Module -> the experiments modules it imports anywhere (top level or inside functions)."""
  mods = {_module(p): p for p in ROOT.rglob("*.py")}
  graph = {}
  for name, path in mods.items():
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in mods else node.module
                   for a in node.names]
      else:
        continue
      for t in targets:
        while t and t not in mods:
          t = t.rpartition(".")[0]
        if t and t != name and t != "experiments":
          out.add(t)
    graph[name] = out
  return graph


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for m in graph.get(todo.pop(), ()):
      if m not in seen:
        seen.add(m)
        todo.append(m)
  return seen


def test_no_experiments_module_imports_itself_back():
  graph = _graph()
  circles = sorted(m for m in graph if m in _reach(graph, m))
  assert not circles, {m: sorted(graph[m] & {n for n in graph if m in _reach(graph, n)})
                       for m in circles}


@pytest.mark.parametrize("low", ["experiments.context", "experiments.files", "experiments.slices"])
def test_the_lower_floors_import_nothing_of_the_engine(low):
  assert _graph()[low] == set()


def test_strategies_and_cleaning_do_not_climb_to_common_or_run():
  graph = _graph()
  users = [m for m in graph if m.startswith("experiments.strategies") or m == "experiments.cleaning"]
  for m in users:
    assert not _reach(graph, m) & {"experiments.common", "experiments.run"}, m


@pytest.mark.parametrize("old,new", [
    ("bench_accel", "bench.accel"), ("bench_scores", "bench.scores"), ("bench_masks", "bench.masks"),
    ("bench_input", "bench.input"), ("bench_precision", "bench.precision"),
    ("bench_sweep", "bench.sweep"), ("bench_dedup", "bench.dedup"), ("bench_audit", "bench.audit"),
    ("step_flops", "bench.step_flops"), ("check_projection", "bench.check_projection"),
    ("hlo_profile", "bench.hlo_profile")])
def test_old_benchmark_names_are_the_moved_modules(old, new):
  assert (importlib.import_module(f"experiments.{old}")
          is importlib.import_module(f"experiments.{new}"))
