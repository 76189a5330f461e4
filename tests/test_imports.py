"""The package's import structure: no import cycles, and the torch-free packages stay torch-free.

The graph is read from the source with stdlib ``ast`` (module-level *and* function-level imports, so a
lazy import that closes a loop counts too): an edge ``a -> b`` for every ``import b`` / ``from b import
x`` in ``a`` (``b.x`` when that is a module). Cycles are found with Tarjan's strongly connected
components and named module by module.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import medlite

ROOT = Path(medlite.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, level: int, current: str, is_pkg: bool) -> str:
    if level == 0:
        return module
    base = current.split(".") if is_pkg else current.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of medlite it imports`` (anywhere in the file)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(node.module or "", node.level, name, path.name == "__init__.py")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                # "import medlite.a.b" runs medlite.a.b; take the longest name that is a medlite module
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and t.startswith("medlite"):
                    graph[name].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def strongconnect(v):
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return out


def _a_cycle(graph, comp: list[str]) -> list[str]:
    """One concrete loop through the component, for the failure message."""
    members, start = set(comp), comp[0]
    path, seen = [start], {start}
    node = start
    while True:
        nxt = sorted(w for w in graph[node] if w in members)
        back = [w for w in nxt if w in path]
        if back:
            return path[path.index(back[0]):] + [back[0]]
        node = next(w for w in nxt if w not in seen)
        path.append(node)
        seen.add(node)


def test_cycle_finder_finds_a_known_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(g) == [["a", "b", "c"]]
    assert _a_cycle(g, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_graph_sees_function_level_and_relative_imports():
    g = import_graph()
    # a lazy (function-level) import: the demo model's builder loads the written checkpoint
    assert "medlite.evaluation.evaluate" in g["medlite.demo.model"]
    assert "medlite.checkpoints.planning" in g["medlite.checkpoints.loader"]


def test_no_import_cycles():
    g = import_graph()
    found = cycles(g)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(_a_cycle(g, c)) for c in found)


TORCH_FREE = r"""
import importlib, json, pkgutil, sys
import medlite.runtime, medlite.imaging
names = []
for pkg in (medlite.runtime, medlite.imaging):
    for m in pkgutil.iter_modules(pkg.__path__):
        names.append(f"{pkg.__name__}.{m.name}")
        importlib.import_module(names[-1])
print(json.dumps({"imported": names,
                  "heavy": sorted(m for m in ("torch", "transformers") if m in sys.modules)}))
"""


def test_runtime_and_imaging_import_neither_torch_nor_transformers():
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "medlite.runtime.vlm" in out["imported"] and "medlite.imaging.dicom" in out["imported"]
    assert out["heavy"] == [], f"torch-free packages imported {out['heavy']}"
