"""The layers import downwards only, and nothing imports in a circle.

Every import counts, also those inside functions (a lazy import is still a dependency), except in the
composition root (``engine.cli``), which wires every layer together. See docs/architecture.md.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "shards", "router", "bench")

# (rank, layer) by module prefix, longest prefix first. A module may import its own layer and lower ranks.
LAYERS: list[tuple[str, int, str]] = [
    ("engine.core", 0, "core"),
    ("shards", 1, "shards"),
    ("router", 1, "router"),
    ("engine.sim", 1, "sim"),
    ("engine.kafka", 2, "kafka"),
    ("engine.ops", 3, "ops"),
    ("engine.verify", 4, "verify"),
    # Old module names kept runnable for supervisors started before an in-place upgrade: entry points only.
    ("engine.bridge", 5, "entry"),
    ("shards.kafka_shard", 5, "entry"),
    ("engine.cli", 5, "entry"),
    ("engine", 0, "core"),  # the package itself (its docstring)
    ("bench", 6, "bench"),
]
COMPOSITION_ROOT = "engine.cli"


def layer(module: str) -> tuple[int, str]:
    for prefix, rank, name in sorted(LAYERS, key=lambda x: -len(x[0])):
        if module == prefix or module.startswith(prefix + "."):
            return rank, name
    raise AssertionError(f"{module}: in no layer; add it to LAYERS in {__file__}")


def modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node, except under ``if TYPE_CHECKING:`` (an import for annotations only is no dependency)."""
    out: list[ast.AST] = []
    for child in ast.iter_child_nodes(tree):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            for other in child.orelse:
                out += [other, *_nodes(other)]
            continue
        out += [child, *_nodes(child)]
    return out


def imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``module`` imports (resolved to the longest known module name)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _nodes(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def upward(g: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in g.items():
        if src == COMPOSITION_ROOT:
            continue
        rank, name = layer(src)
        for dst in targets:
            dst_rank, dst_name = layer(dst)
            if dst_name != name and dst_rank >= rank:
                bad.append(f"{src} ({name}) imports {dst} ({dst_name})")
    return sorted(bad)


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), the composition root left out."""
    g = {m: {d for d in ds if d != COMPOSITION_ROOT} for m, ds in g.items() if m != COMPOSITION_ROOT}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_no_layer_imports_a_higher_or_sibling_layer() -> None:
    assert upward(graph()) == []


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_the_check_sees_an_upward_import_and_a_cycle() -> None:
    g = {"engine.core.wal": {"engine.ops.status"}, "engine.ops.status": {"engine.core.wal"},
         "shards.shard": {"router.router"}, "router.router": set()}
    assert upward(g) == ["engine.core.wal (core) imports engine.ops.status (ops)",
                         "shards.shard (shards) imports router.router (router)"]
    assert cycles(g) == [["engine.core.wal", "engine.ops.status"]]


def test_lazy_imports_count(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from engine.verify import demo\n")
    assert imports("engine.core.m", source, {"engine.verify.demo", "engine.core.m"}) == {"engine.verify.demo"}
