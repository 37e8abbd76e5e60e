"""The package's imports point one way (docs/design.md §2): no cycles, and no layer imports one above it.

The import graph is read statically with `ast` from every `import` / `from ... import` in the package,
including function-level (lazy) imports, which are cycles all the same: they only defer them.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = "msf_jax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Layers, highest first; a module may import modules of its own layer or of lower ones only.
# Packages are matched by prefix (the first layer that matches wins). A new module must be placed here.
LAYERS = (
    ("entry points", ("main", "jobs.demo", "benchmark")),
    ("jobs", ("jobs",)),  # msf_jax/jobs/: one module per --mode and their helpers
    ("pipeline", ("pipeline",)),
    ("stages", ("stages", "stats")),  # stats: the factorizer statistics of a run (train, sample)
    ("converters", ("convert",)),  # PyTorch -> Flax at the boundary: above the models they fill
    ("numerics", ("models", "diffusion", "factorize", "train_step", "metrics")),  # metrics: numpy FID/IS/PR/SWD
    ("data", ("data",)),
    ("runtime", ("runtime", "")),  # msf_jax/runtime/: what every job runs on
)
JOBS = LAYERS[0][1] + LAYERS[1][1]
METHOD = ("factorize", "stages", "pipeline", "stats", "train_step", "diffusion", "models")

def _modules(root: str) -> dict[str, str]:
    """Dotted module name (without the package prefix; "" = the package) -> file path."""
    mods = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                parts = os.path.relpath(path, root)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                mods[".".join(parts)] = path
    return mods


def _resolve(name: str, mods) -> str | None:
    """The package module a dotted import target lives in ("a.b.func" -> "a.b")."""
    while name not in mods:
        if "." not in name:
            return None
        name = name.rsplit(".", 1)[0]
    return name


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
    """module -> modules of the package it imports (anywhere in the file)."""
    package = os.path.basename(root)
    mods = _modules(root)
    graph = {m: set() for m in mods}
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        is_package = path.endswith("__init__.py")
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: anchor at this module's package
                    anchor = [package] + (mod.split(".") if mod else [])
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                dep = _resolve(target[len(package) + 1:], mods)
                # A module's own package (its __init__) runs first anyway: not an edge.
                if dep is not None and dep != mod and not (mod.startswith(dep + ".") or dep == ""):
                    graph[mod].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _cycle_path(graph, comp) -> str:
    """One concrete import loop through a strongly connected component, e.g. 'a -> b -> a'."""
    return " -> ".join(f"{PACKAGE}.{m}" for m in _loop(graph, comp))


def _loop(graph, comp) -> list[str]:
    start, members = comp[0], set(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first back to start, inside the component
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{comp} is not a cycle")


def _layer_or_none(mod: str) -> int | None:
    """Index into LAYERS of a module (packages match by prefix), None when it is not placed."""
    for rank, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if mod == p or (p and mod.startswith(p + ".")):
                return rank
    return None


def _names(mods) -> str:
    return ", ".join(f"{PACKAGE}.{m}" if m else PACKAGE for m in sorted(mods))


def test_graph_sees_lazy_relative_and_from_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "def f():\n    from pkg import b  # lazy\n",
        "b.py": "from .sub import c\n",
        "sub/__init__.py": "",
        "sub/c.py": "from ..a import f\nimport os\n",
        "d.py": "import pkg.sub.c as c\nfrom pkg.b import something\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(str(pkg))
    assert graph == {"": set(), "a": {"b"}, "b": {"sub", "sub.c"}, "sub": set(), "sub.c": {"a"}, "d": {"sub.c", "b"}}
    assert cycles(graph) == [["a", "b", "sub.c"]]
    assert _loop(graph, ["a", "b", "sub.c"]) == ["a", "b", "sub.c", "a"]
    assert "jobs.stage_eval" in import_graph()["jobs.train"]  # train imports it only inside functions


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycle(s): " + " | ".join(_cycle_path(graph, c) for c in found)


def test_every_module_has_a_layer():
    unplaced = [m for m in import_graph() if _layer_or_none(m) is None]
    assert not unplaced, f"place {_names(unplaced)} in a layer of tests/test_import_cycles.py LAYERS"


def test_layers_point_down():
    graph = import_graph()
    rank = {m: r for m in graph for r in [_layer_or_none(m)] if r is not None}  # unplaced: reported above
    upward = [f"{PACKAGE}.{m} ({LAYERS[rank[m]][0]}) imports {PACKAGE}.{d} ({LAYERS[rank[d]][0]})"
              for m in sorted(rank) for d in sorted(graph[m]) if d in rank and rank[d] < rank[m]]
    assert not upward, "imports against the layering:\n  " + "\n  ".join(upward)


@pytest.mark.parametrize("lower, forbidden", [
    (("models", "diffusion"), JOBS + ("convert", "pipeline", "stages")),
    (("data",), JOBS + ("stages", "pipeline", "models")),
    (METHOD, JOBS),
    (("runtime",), JOBS + METHOD + ("data", "convert", "metrics")),
])
def test_key_rules(lower, forbidden):
    """The rules issue #9 names: models never import converters or jobs; data never imports jobs. And
    issue #18's: the method never imports a job; runtime imports neither a job nor the method."""
    graph = import_graph()
    within = lambda m, names: any(m == n or m.startswith(n + ".") for n in names)  # noqa: E731
    bad = [f"{PACKAGE}.{m} imports {PACKAGE}.{d}" for m in sorted(graph) if within(m, lower)
           for d in sorted(graph[m]) if within(d, forbidden)]
    assert not bad, "; ".join(bad)
