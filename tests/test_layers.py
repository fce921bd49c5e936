"""The package reads in layers: no import circle, no module importing a layer above its own, and
no Ray under the pure-torch packages.

Every import counts, at module level or inside a function (a function-level import hides a
circle from the interpreter, not from the reader), relative ones resolved. The checks are pure
functions of a module graph, tested on a small fake graph first so that they can fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "sepp_ray"
PACKAGE = "sepp_ray"

# lowest first; a module imports only its own group or a group of a lower rank
LAYERS: list[tuple[str, ...]] = [
    ("foundation",),
    ("models", "losses"),
    ("methods",),
    ("data",),
    ("mining",),
    ("train",),
    ("eval",),
    ("curate",),
    ("flow",),
    ("tune",),  # a sweep runs the flow's stages
    ("cli",),
]
RANK = {group: rank for rank, groups in enumerate(LAYERS) for group in groups}
# modules at the package root that form the foundation (the package's own __init__ too)
FOUNDATION = {
    "errors",
    "config",
    "console",
    "registry",
    "storage",
    "shared_storage",
    "resources",
    "dist",
    "ray_utils",
}
NO_RAY = ("models", "losses", "methods")

Graph = dict[str, set[str]]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(tree: ast.AST, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Absolute names a module imports anywhere in its body. ``from p import x`` names the
    module ``p.x`` when that is a module of ``known``, else ``p``."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                pkg = pkg[: len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return out


def parse_package(root: Path = ROOT) -> tuple[Graph, set[str]]:
    """(every module -> the names it imports, the package's modules)."""
    files = sorted(root.rglob("*.py"))
    known = {module_name(f, root) for f in files}
    imports: Graph = {}
    for f in files:
        name = module_name(f, root)
        tree = ast.parse(f.read_text(), str(f))
        imports[name] = imported_names(tree, name, f.name == "__init__.py", known)
    return imports, known


def internal(imports: Graph, known: set[str]) -> Graph:
    """The graph among the package's own modules (self-imports dropped)."""
    return {m: {t for t in names if t in known and t != m} for m, names in imports.items()}


def unknown_imports(imports: Graph, known: set[str]) -> list[str]:
    """Imports of a package module that does not exist (a stale name after a move)."""
    return sorted(
        f"{m} imports {t}, which is not a module of {PACKAGE}"
        for m, names in imports.items()
        for t in names
        if (t == PACKAGE or t.startswith(PACKAGE + ".")) and t not in known
    )


def find_cycles(graph: Graph) -> list[list[str]]:
    """One circle per strongly connected component of more than one module, as a path that
    starts and ends at the component's first module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_around(graph, comp) for comp in sorted(comps)]


def _path_around(graph: Graph, comp: list[str]) -> list[str]:
    """The shortest circle from ``comp[0]`` back to itself inside the component."""
    inside = set(comp)
    start = comp[0]
    prev: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, ()) & inside):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(prev[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, start]
                if w not in prev:
                    prev[w] = v
                    nxt.append(w)
        frontier = nxt
    return comp  # unreachable for a strongly connected component


def group_of(name: str) -> str | None:
    """The layer group of a package module, None when the layer order does not place it."""
    parts = name.split(".")
    if parts == [PACKAGE]:
        return "foundation"
    if len(parts) == 2 and parts[1] in FOUNDATION:
        return "foundation"
    if parts[1] == "cli" and len(parts) == 2:
        return "cli"
    if parts[1] in RANK and parts[1] not in ("foundation", "cli"):
        return parts[1]
    return None


def layer_violations(graph: Graph) -> list[str]:
    """Modules outside the layer order, and imports of another group that is not lower."""
    out = []
    for m in sorted(graph):
        g = group_of(m)
        if g is None:
            out.append(f"{m} is in no layer: move it into a package of the layer order")
            continue
        for t in sorted(graph[m]):
            h = group_of(t)
            if h is None or h == g:
                continue
            if RANK[h] >= RANK[g]:
                out.append(f"{m} ({g}) imports {t} ({h}), a layer not below its own")
    return out


def ray_violations(imports: Graph, known: set[str], groups: Iterable[str] = NO_RAY) -> list[str]:
    """Modules of ``groups`` that import Ray, directly or through package modules that do."""
    graph = internal(imports, known)
    direct = {
        m for m, names in imports.items() if any(n == "ray" or n.startswith("ray.") for n in names)
    }
    out = []
    for m in sorted(graph):
        if group_of(m) not in set(groups):
            continue
        # breadth-first through the package's modules, remembering how each was reached
        prev: dict[str, str | None] = {m: None}
        frontier = [m]
        hit = None
        while frontier and hit is None:
            nxt = []
            for v in frontier:
                if v in direct:
                    hit = v
                    break
                for w in sorted(graph.get(v, ())):
                    if w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        if hit is not None:
            chain = [hit]
            while prev[chain[-1]] is not None:
                chain.append(prev[chain[-1]])  # type: ignore[arg-type]
            out.append(f"{m} imports ray: {' -> '.join(reversed(chain))} -> ray")
    return out


def _report(title: str, lines: list[str]) -> str:
    return f"{title}:\n  " + "\n  ".join(lines)


# -- the checkers on a fake package: each violation is seen, a clean graph passes ----------


def test_checkers_catch_synthetic_violations() -> None:
    known = {
        "sepp_ray",
        "sepp_ray.errors",
        "sepp_ray.ray_utils",
        "sepp_ray.models",
        "sepp_ray.models.net",
        "sepp_ray.losses.nce",
        "sepp_ray.train.a",
        "sepp_ray.train.b",
        "sepp_ray.eval.knn",
        "sepp_ray.flow.run",
        "sepp_ray.tune.run",
        "sepp_ray.sweep",
    }
    imports: Graph = {
        "sepp_ray": set(),
        "sepp_ray.errors": set(),
        "sepp_ray.ray_utils": {"ray", "sepp_ray.errors"},
        "sepp_ray.models": {"sepp_ray.models.net"},
        "sepp_ray.models.net": {"torch", "sepp_ray.ray_utils"},  # Ray, through the foundation
        "sepp_ray.losses.nce": {"ray.train", "sepp_ray.models.net"},  # Ray; a peer group
        "sepp_ray.train.a": {"sepp_ray.train.b", "sepp_ray.eval.knn"},  # eval is above train
        "sepp_ray.train.b": {"sepp_ray.train.a", "sepp_ray.models"},  # a circle a <-> b
        "sepp_ray.eval.knn": {"sepp_ray.train.a", "sepp_ray.gone"},  # a stale name
        "sepp_ray.flow.run": {"sepp_ray.tune.run"},  # flow and tune are peers
        "sepp_ray.tune.run": {"sepp_ray.eval.knn"},
        "sepp_ray.sweep": set(),  # at the root, in no layer
    }
    graph = internal(imports, known)
    cycles = find_cycles(graph)
    assert ["sepp_ray.eval.knn", "sepp_ray.train.a", "sepp_ray.eval.knn"] in cycles
    assert len(cycles) == 1  # a, b and knn form one component
    without_eval = {k: v - {"sepp_ray.eval.knn"} for k, v in graph.items()}
    assert find_cycles(without_eval) == [
        ["sepp_ray.train.a", "sepp_ray.train.b", "sepp_ray.train.a"]
    ]
    layers = layer_violations(graph)
    assert any(v.startswith("sepp_ray.train.a (train) imports sepp_ray.eval.knn") for v in layers)
    assert any(v.startswith("sepp_ray.losses.nce (losses) imports sepp_ray.models") for v in layers)
    assert any(v.startswith("sepp_ray.flow.run (flow) imports sepp_ray.tune") for v in layers)
    assert any(v.startswith("sepp_ray.sweep is in no layer") for v in layers)
    assert not any(v.startswith("sepp_ray.tune.run") for v in layers)  # eval is below tune
    assert not any(v.startswith("sepp_ray.train.b") for v in layers)  # own group, lower group
    rays = ray_violations(imports, known)
    assert (
        "sepp_ray.models.net imports ray: sepp_ray.models.net -> sepp_ray.ray_utils -> ray" in rays
    )
    assert "sepp_ray.losses.nce imports ray: sepp_ray.losses.nce -> ray" in rays
    assert any(v.startswith("sepp_ray.models imports ray") for v in rays)
    assert unknown_imports(imports, known) == [
        "sepp_ray.eval.knn imports sepp_ray.gone, which is not a module of sepp_ray"
    ]
    clean = {"sepp_ray.errors": set(), "sepp_ray.models.net": {"sepp_ray.errors", "torch"}}
    clean_graph = internal(clean, set(clean))
    assert find_cycles(clean_graph) == layer_violations(clean_graph) == []
    assert ray_violations(clean, set(clean)) == []


def test_imports_are_read_everywhere_and_resolved(tmp_path: Path) -> None:
    pkg = tmp_path / "sepp_ray"
    (pkg / "mining").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("")
    (pkg / "mining" / "__init__.py").write_text("from .search import run\n")
    (pkg / "mining" / "search.py").write_text(
        "def run():\n    from .. import errors\n    from . import anchors\n    import ray.data\n"
    )
    (pkg / "mining" / "anchors.py").write_text("from sepp_ray.mining import search\n")
    imports, known = parse_package(pkg)
    assert known == {
        "sepp_ray",
        "sepp_ray.errors",
        "sepp_ray.mining",
        "sepp_ray.mining.search",
        "sepp_ray.mining.anchors",
    }
    assert imports["sepp_ray.mining"] == {"sepp_ray.mining.search"}
    assert imports["sepp_ray.mining.search"] == {
        "sepp_ray.errors",
        "sepp_ray.mining.anchors",
        "ray.data",
    }
    assert imports["sepp_ray.mining.anchors"] == {"sepp_ray.mining.search"}
    cycles = find_cycles(internal(imports, known))
    assert cycles == [
        ["sepp_ray.mining.anchors", "sepp_ray.mining.search", "sepp_ray.mining.anchors"]
    ]


# -- the real package ------------------------------------------------------------------------


def test_no_import_circle() -> None:
    imports, known = parse_package()
    cycles = find_cycles(internal(imports, known))
    assert not cycles, _report("import circles", [" -> ".join(c) for c in cycles])


def test_layers_import_only_downwards() -> None:
    imports, known = parse_package()
    bad = layer_violations(internal(imports, known)) + unknown_imports(imports, known)
    assert not bad, _report("imports out of the layer order", bad)


def test_pure_torch_packages_know_nothing_of_ray() -> None:
    imports, known = parse_package()
    bad = ray_violations(imports, known)
    assert not bad, _report("Ray below the data layer", bad)
