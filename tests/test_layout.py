"""The package layout's rules, checked on the source itself.

- ``protocol`` sits below everything; ``hypervisor`` and ``guest`` import ``protocol`` and never
  each other; ``balloonlab`` (the user's tools) may import all three and ``benchmarks``;
  ``benchmarks`` may import the processes' packages and ``balloonlab``.
- Nothing shipped imports ``tests`` or loads a file from the tests folder.
- No import cycle between modules (counting imports inside functions and under
  ``TYPE_CHECKING`` too: a deferred import is still a dependency).
- No ``exec``/``eval`` in product code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "hypervisor", "guest", "balloonlab", "benchmarks")

#: package -> packages it may import
ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "hypervisor": {"protocol", "hypervisor"},
    "guest": {"protocol", "guest"},
    "balloonlab": {"protocol", "hypervisor", "guest", "balloonlab", "benchmarks"},
    "benchmarks": {"protocol", "hypervisor", "guest", "balloonlab", "benchmarks"},
}


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """First-party modules that ``name`` imports (resolved to modules we have)."""
    tree = ast.parse(path.read_text(), str(path))
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if t.split(".")[0] not in (*PACKAGES, "tests"):
                continue
            # the longest known module prefix of t
            parts = t.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in MODULES or cand.split(".")[0] == "tests":
                    found.add(cand)
                    break
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_respect_the_layering(name: str) -> None:
    top = name.split(".")[0]
    bad = sorted(d for d in GRAPH[name] if d.split(".")[0] not in ALLOWED[top])
    assert not bad, f"{name} may not import {bad}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_shipped_code_never_loads_the_tests_folder(name: str) -> None:
    """No string in code (docstrings and comments may name a test) builds a path into the
    tests folder, and nothing loads a module from a file path."""
    tree = ast.parse(MODULES[name].read_text())
    docstrings = {id(n.value) for n in ast.walk(tree)
                  if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    bad = [n.value for n in ast.walk(tree)
           if isinstance(n, ast.Constant) and isinstance(n.value, str)
           and id(n) not in docstrings
           and (n.value == "tests" or n.value.startswith(("tests/", "tests.")))]
    loads = [n.attr for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and n.attr == "spec_from_file_location"]
    assert not bad and not loads, f"{name} reaches into the tests folder: {bad or loads}"


def test_no_import_cycle() -> None:
    # Tarjan's strongly connected components over the first-party module graph.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in GRAPH.get(v, ()):
            if w not in GRAPH:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_exec_or_eval_in_product_code(name: str) -> None:
    tree = ast.parse(MODULES[name].read_text())
    calls = [n.func.id for n in ast.walk(tree)
             if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
             and n.func.id in ("exec", "eval", "compile")]
    assert not calls, f"{name} calls {calls}"
