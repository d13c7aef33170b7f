"""The import graph of the packages: no cycles (at module level or inside functions),
and the arrow goes one way, lit_modules -> experts -> arch, with torch.distributed
and Lightning kept out of arch/ and Lightning out of experts/ (DESIGN.md's rooms)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("arch", "experts", "lit_modules")


def _modules() -> Dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """Every module of ours (or third-party top name) that `name` imports, anywhere."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return found


def _graph() -> Dict[str, Set[str]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _ours(target: str, modules) -> str:
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target


def test_no_import_cycles():
    graph = _graph()
    edges = {m: {_ours(t, graph) for t in ts} - {"", m} for m, ts in graph.items()}
    # a package's __init__ may gather its own submodules; a submodule importing its
    # package's __init__ back is the cycle to catch
    cycles: List[List[str]] = []
    state: Dict[str, int] = {}

    def visit(m: str, stack: List[str]) -> None:
        state[m] = 1
        for t in sorted(edges[m]):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_rooms_import_one_way():
    graph = _graph()
    for m, targets in graph.items():
        room = m.split(".")[0]
        tops = {t.split(".")[0] for t in targets}
        if room == "arch":
            assert not tops & {"experts", "lit_modules", "lightning"}, (m, targets)
            assert not any(t.startswith("torch.distributed") for t in targets), m
        if room == "experts":
            assert not tops & {"lit_modules", "lightning"}, (m, targets)
            if any(t.startswith("torch.distributed") for t in targets):
                assert m == "experts.parallel", f"{m} touches torch.distributed; only experts/parallel.py may"
