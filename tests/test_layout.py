"""The house plan, checked: import direction, no circles, no private reach, sizes.

Reads the source with ``ast`` (nothing is imported), so it runs in a second. The
rules are the layout's (README "Where each algorithm lives"):

- arrows run one way: studies -> trainer -> data/models -> sparse_jax, and
  benchmarks -> trainer/data/models; the library imports nothing of experiments/;
  benchmark scripts share ``benchmarks/_harness.py`` instead of importing each other;
- no import circle between modules (imports inside functions count: a lazy import
  hides a circle, it does not remove it);
- no module uses another module's underscored names, and experiments/ uses only
  the library's public names (``sparse_jax.x``, never ``sparse_jax._module``);
- no module over 450 lines and no function over 80 (its docstring not counted),
  configs aside.
"""

from __future__ import annotations

import ast
import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("sparse_jax", "experiments")
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, pathlib.Path]:
  """Dotted module name -> path, for every .py file of the two packages."""
  found = {}
  for package in PACKAGES:
    for path in sorted((REPO / package).rglob("*.py")):
      parts = path.relative_to(REPO).with_suffix("").parts
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join(parts)] = path
  return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
  """The longest prefix of dotted ``name`` that is one of our modules."""
  while name and name not in MODULES:
    name = name.rpartition(".")[0]
  return name or None


def _imports(module: str, tree: ast.AST):
  """Yields ``(imported module, imported name or None, line)`` for each import."""
  package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, None, node.lineno
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(anchor + ([base] if base else []))
      for alias in node.names:
        yield base, alias.name, node.lineno


def _edges() -> dict[str, set[str]]:
  """module -> the modules of ours it imports."""
  edges = {}
  for module, path in MODULES.items():
    targets = set()
    for base, name, _ in _imports(module, ast.parse(path.read_text())):
      target = _resolve(f"{base}.{name}" if name else base)
      if target and target != module and not module.startswith(target + "."):
        targets.add(target)  # a package's __init__ is not an edge from inside it
    edges[module] = targets
  return edges


EDGES = _edges()


def _room(module: str) -> str:
  parts = module.split(".")
  if parts[0] == "sparse_jax":
    return "sparse_jax"
  return parts[1] if len(parts) > 1 else "experiments"


# Which rooms a room may import (besides itself and the packages' __init__).
ALLOWED = {
    "sparse_jax": {"sparse_jax"},
    "models": {"sparse_jax", "models"},
    "data": {"sparse_jax", "data"},
    "configs": {"sparse_jax", "configs", "models", "data", "trainer"},
    "trainer": {"sparse_jax", "trainer", "data", "models", "configs"},
    "studies": {"sparse_jax", "studies", "trainer", "data", "models", "configs"},
    "benchmarks": {"sparse_jax", "benchmarks", "trainer", "data", "models", "configs"},
    "notebooks": set(),
}


def test_imports_run_one_way():
  wrong = []
  for module, targets in EDGES.items():
    room = _room(module)
    for target in targets:
      if target in PACKAGES:
        continue
      target_room = _room(target)
      allowed = ALLOWED.get(room, {"sparse_jax", "trainer", "data", "models", "configs",
                                   "studies", "experiments"})
      if target_room not in allowed:
        wrong.append(f"{module} -> {target}")
      elif room == "benchmarks" == target_room and not target.endswith("._harness"):
        wrong.append(f"{module} -> {target} (benchmark scripts share _harness instead)")
  assert not wrong, "imports against the house plan:\n" + "\n".join(sorted(wrong))


def _cycle_from(start: str) -> list[str] | None:
  stack, seen = [(start, [start])], set()
  while stack:
    node, path = stack.pop()
    for nxt in sorted(EDGES.get(node, ())):
      if nxt == start:
        return path + [start]
      if nxt not in seen:
        seen.add(nxt)
        stack.append((nxt, path + [nxt]))
  return None


def test_no_import_circle():
  circles = {" -> ".join(c) for m in EDGES if (c := _cycle_from(m))}
  assert not circles, "import circles:\n" + "\n".join(sorted(circles))


def _private_uses(module: str, tree: ast.AST):
  """Yields a description of every use of another module's underscored name."""
  aliases = {}  # local name -> our module it stands for
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        if _resolve(a.name) == a.name:
          aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
    elif isinstance(node, ast.ImportFrom):
      for base, name, line in _imports(module, ast.Module(body=[node], type_ignores=[])):
        full = f"{base}.{name}"
        if name.startswith("_") and full not in MODULES:
          yield f"line {line}: from {base} import {name}"
        elif full in MODULES:
          aliases[next(a.asname or a.name for a in node.names if a.name == name)] = full
  for node in ast.walk(tree):
    if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
      chain, value = [node.attr], node.value
      while isinstance(value, ast.Attribute):
        chain.append(value.attr)
        value = value.value
      if isinstance(value, ast.Name) and value.id in aliases:
        full = ".".join([aliases[value.id]] + chain[::-1])
        if full not in MODULES or module.split(".")[0] != "sparse_jax":
          yield f"line {node.lineno}: {value.id}.{'.'.join(chain[::-1])}"


def test_no_private_names_across_modules():
  found = []
  for module, path in MODULES.items():
    tree = ast.parse(path.read_text())
    found += [f"{module} {use}" for use in _private_uses(module, tree)]
    if module.startswith("experiments"):
      for base, name, line in _imports(module, tree):
        target = _resolve(f"{base}.{name}" if name else base) or ""
        if target.startswith("sparse_jax._"):
          found.append(f"{module} line {line}: imports the library's private {target}")
  assert not found, "private names used across modules:\n" + "\n".join(sorted(found))


def _sized():
  for module, path in MODULES.items():
    if ".configs." not in module:
      yield module, path


@pytest.mark.parametrize("module", [m for m, _ in _sized()])
def test_module_and_function_sizes(module):
  path = MODULES[module]
  source = path.read_text()
  lines = source.count("\n")
  assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines"
  long = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      body = node.body
      if (body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
          and isinstance(body[0].value.value, str)):
        doc = body[0].end_lineno - body[0].lineno + 1
      else:
        doc = 0
      length = node.end_lineno - node.lineno + 1 - doc
      if length > MAX_FUNCTION_LINES:
        long.append(f"{node.name} (line {node.lineno}): {length} lines")
  assert not long, f"{path.relative_to(REPO)}: functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_the_rules_catch_what_they_should(monkeypatch):
  """The checks above find a planted circle, a wrong arrow and private names."""
  monkeypatch.setattr(sys.modules[__name__], "EDGES", {
      "experiments.trainer.train": {"experiments.studies.scsdc"},
      "experiments.studies.scsdc": {"experiments.trainer.train"}})
  assert _cycle_from("experiments.trainer.train") == [
      "experiments.trainer.train", "experiments.studies.scsdc", "experiments.trainer.train"]
  with pytest.raises(AssertionError, match="trainer.train -> experiments.studies.scsdc"):
    test_imports_run_one_way()
  with pytest.raises(AssertionError, match="circles"):
    test_no_import_circle()
  planted = ast.parse("from sparse_jax import _masks\nx = _masks._split(1)\n"
                      "from sparse_jax._prune import _helper\n")
  uses = list(_private_uses("experiments.trainer.train", planted))
  assert any("_masks._split" in u for u in uses) and any("_helper" in u for u in uses), uses
