"""The package map in docs/DESIGN.md is the code's: floors respected, no import cycles (lazy
imports included), and bench/ imports nothing from tests/."""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "agiasi"


def _imports(path: Path, package: str) -> set[str]:
    """Top-level ``package.X`` modules a file imports anywhere (``TYPE_CHECKING`` blocks do not
    run, so they do not count)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = {
        id(sub)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for sub in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == package:
                found.add(parts[1] if len(parts) > 1 else "__init__")
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for f in SRC.rglob("*.py"):
        top = f.relative_to(SRC).with_suffix("").parts[0]
        graph.setdefault(top, set()).update(_imports(f, "agiasi"))
    return {m: deps - {m} for m, deps in graph.items()}


def _floors() -> dict[str, int]:
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    block = text.split("## 0. The package map", 1)[1].split("```", 2)[1]
    floors = {}
    for line in block.strip().splitlines():
        m = re.match(r"floor (\d+)\s+\S+(?: \S+)?\s{2,}(.*)", line)
        assert m, line
        for mod in m.group(2).split():
            assert mod not in floors, f"{mod} is on two floors"
            floors[mod] = int(m.group(1))
    return floors


def test_every_module_is_on_the_map_and_imports_only_downwards():
    graph, floors = _graph(), _floors()
    assert set(graph) == set(floors), set(graph) ^ set(floors)
    upward = [
        f"{m} (floor {floors[m]}) imports {d} (floor {floors[d]})"
        for m, deps in graph.items()
        for d in deps
        if floors[d] > floors[m]
    ]
    assert not upward, upward


def test_no_import_cycles_lazy_imports_included():
    graph = _graph()

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for d in graph.get(todo.pop(), ()):
                if d not in seen:
                    seen.add(d)
                    todo.append(d)
        return seen

    assert [m for m in graph if m in reach(m)] == []


def test_bench_imports_nothing_from_tests():
    offenders = [f.name for f in (ROOT / "bench").glob("*.py") if _imports(f, "tests")]
    assert offenders == []
