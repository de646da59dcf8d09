"""The house's size and floor rules over all of ``prunejax/`` and ``experiments/``: no file over 500
lines, no function over 60 (docstring included), no import circle between modules and none between
rooms (``prunejax.masks``, ``prunejax.optim``, ``experiments.strategies``, ...: a room importing one
that imports it back is a lower floor importing a higher one). Imports inside functions count."""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
FILES = sorted(p for pkg in ("prunejax", "experiments") for p in (REPO / pkg).rglob("*.py"))
MAX_FILE_LINES, MAX_FUNCTION_LINES = 500, 60


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(REPO).with_suffix("").parts)
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in FILES}


def _imports(name: str, tree: ast.AST) -> set[str]:
  """The prunejax / experiments modules ``name`` imports anywhere (``from pkg import mod`` is
  ``pkg.mod``; relative imports resolved)."""
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        pkg = name.split(".") if MODULES[name].name == "__init__.py" else name.split(".")[:-1]
        base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
      targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    else:
      continue
    for t in targets:
      while t and t not in MODULES:
        t = t.rpartition(".")[0]
      if t and t != name and t not in ("prunejax", "experiments"):
        out.add(t)
  return out


@functools.cache
def _graph() -> dict[str, set[str]]:
  """Each module's imports (parsed when a test first asks: every xdist worker collects this file,
  one runs the tests)."""
  return {m: _imports(m, ast.parse(p.read_text())) for m, p in MODULES.items()}


def _room(module: str) -> str:
  return ".".join(module.split(".")[:2])


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one node (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while not comp or comp[-1] != v:
        comp.append(stack.pop())
        on.discard(comp[-1])
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_no_file_over_500_lines_and_no_function_over_60(path):
  text = path.read_text()
  assert text.count("\n") <= MAX_FILE_LINES
  long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(ast.parse(text))
          if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
          and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long


def test_no_import_circle_between_modules():
  assert _cycles(_graph()) == []


def test_no_room_imports_a_higher_one():
  rooms = {}
  for a, targets in _graph().items():
    rooms.setdefault(_room(a), set()).update(_room(b) for b in targets if _room(b) != _room(a))
  assert _cycles(rooms) == []


def test_the_checks_see_a_circle_when_there_is_one():
  # the walk must find a planted circle and the known edges (the checks above are not vacuous)
  assert "prunejax.masks.core" in _graph()["prunejax.optim"]
  planted = {k: set(v) for k, v in _graph().items()}
  planted["prunejax.masks.core"].add("prunejax.optim")
  assert any({"prunejax.masks.core", "prunejax.optim"} <= set(c) for c in _cycles(planted))
  src = "def f():\n  from prunejax import optim\n" + "  x = 1\n" * 70
  assert _imports("prunejax.masks.lottery", ast.parse(src)) == {"prunejax.optim"}
